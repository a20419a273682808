"""The paged KV pool, laid out block-major.

Shape [num_blocks, num_layers, 2 (K, V), block_size, kv_heads, head_dim]: every block holds its
tokens' K and V for all layers, so a run of consecutive blocks is one contiguous region of memory
and the swap daemon moves a whole block group with one copy. On a CPU-only machine the pool lives in
a named POSIX shared-memory segment the swap daemon maps; on a GPU it is a CUDA allocation exported
with a CUDA IPC handle.
"""

from __future__ import annotations

import os
from multiprocessing import shared_memory

import torch


class KVPool:
    def __init__(
        self,
        num_blocks: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_size = block_size
        self.shape = (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
        numel = num_blocks * num_layers * 2 * block_size * num_kv_heads * head_dim
        self.block_bytes = numel // num_blocks * torch.empty((), dtype=dtype).element_size()
        self._shm: shared_memory.SharedMemory | None = None
        if device.type == "cpu":
            self._shm = shared_memory.SharedMemory(
                create=True, size=self.block_bytes * num_blocks, name=f"fastswitch-kv-{os.getpid()}"
            )
            self.tensor = torch.frombuffer(self._shm.buf, dtype=dtype, count=numel).view(self.shape)
            self.handle = f"shm:{self._shm.name}"
        else:
            self.tensor = torch.zeros(self.shape, dtype=dtype, device=device)
            self.handle = _cuda_ipc_handle(self.tensor)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of one layer, each [num_blocks, block_size, kv_heads, head_dim] (strided)."""
        return self.tensor[:, layer_idx, 0], self.tensor[:, layer_idx, 1]

    def close(self) -> None:
        if self._shm is not None:
            del self.tensor
            try:
                self._shm.close()
            except BufferError:  # a view is still alive; unlinking below still frees the name
                pass
            self._shm.unlink()
            self._shm = None


def _cuda_ipc_handle(tensor: torch.Tensor) -> str:
    """Export the pool's allocation as a CUDA IPC handle (hex) for the swap daemon to open."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:  # older cuda-python
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError:
            return ""
    err, handle = cudart.cudaIpcGetMemHandle(tensor.data_ptr())
    if int(err) != 0:
        return ""
    return "cuda-ipc:" + bytes(handle.reserved).hex()
