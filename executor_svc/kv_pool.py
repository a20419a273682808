"""The paged KV pool, laid out block-major.

Shape [num_blocks + 1, num_layers, 2 (K, V), block_size, kv_heads, head_dim]: every block holds its
tokens' K and V for all layers, so a run of consecutive blocks is one contiguous region of memory
and the swap daemon moves a whole block group with one copy. The last block is the executor's own
scratch block (padded rows of a CUDA-graph step write there); the scheduler and the swap daemon see
only the first `num_blocks`.

On a CPU-only machine the pool lives in a named POSIX shared-memory segment the swap daemon maps. On
a GPU it is its own `cudaMalloc` allocation (so its CUDA IPC handle starts at the pool's first byte,
whatever torch's caching allocator does); the handle is `cuda-ipc:HEX:OFFSET`, OFFSET being where the
pool starts inside the exported allocation (0 for its own allocation, computed for a torch one).
"""

from __future__ import annotations

import itertools
import os
from multiprocessing import shared_memory
from typing import Any

import structlog
import torch

log = structlog.get_logger(__name__)
_pool_ids = itertools.count()


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
        self.scratch_block = num_blocks
        self.shape = (num_blocks + 1, num_layers, 2, block_size, num_kv_heads, head_dim)
        self.block_bytes = block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)
        total = self.block_bytes * (num_blocks + 1)
        self._shm: shared_memory.SharedMemory | None = None
        self._cuda: _CudaAllocation | None = None
        if device.type == "cpu":
            name = f"fastswitch-kv-{os.getpid()}-{next(_pool_ids)}"
            self._shm = shared_memory.SharedMemory(create=True, size=total, name=name)
            self.tensor = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=total).view(dtype).view(self.shape)
            self.handle = f"shm:{self._shm.name}"
        else:
            self._cuda = _CudaAllocation.create(total, device)
            if self._cuda is not None:
                self.tensor = torch.as_tensor(self._cuda, device=device).view(dtype).view(self.shape)
            else:  # no cuda-python: a torch allocation, exported (if at all) with its offset
                self.tensor = torch.zeros(self.shape, dtype=dtype, device=device)
            self.handle = cuda_ipc_handle(self.tensor)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of one layer, each [num_blocks + 1, block_size, kv_heads, head_dim] (strided)."""
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
        if self._cuda is not None:
            del self.tensor
            self._cuda.free()
            self._cuda = None


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one block: K and V of `block_size` tokens for every layer."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _cuda_modules() -> tuple[Any, Any] | None:
    """cuda-python's (runtime, driver) bindings, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import driver, runtime
    except ImportError:  # cuda-python before 12.8
        try:
            from cuda import cuda as driver  # type: ignore[no-redef]
            from cuda import cudart as runtime  # type: ignore[no-redef]
        except ImportError:
            return None
    return runtime, driver


class _CudaAllocation:
    """A zeroed `cudaMalloc` region that torch can view (`__cuda_array_interface__`, bytes)."""

    def __init__(self, runtime: Any, ptr: int, nbytes: int) -> None:
        self._rt = runtime
        self.ptr: int | None = ptr
        self.nbytes = nbytes
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }

    @classmethod
    def create(cls, nbytes: int, device: torch.device) -> _CudaAllocation | None:
        mods = _cuda_modules()
        if mods is None:
            return None
        rt, _ = mods
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_device(index)
        _check(rt.cudaSetDevice(index), "cudaSetDevice")
        ptr = _check(rt.cudaMalloc(nbytes), f"cudaMalloc of the {nbytes / 2**30:.2f} GiB KV pool (use fewer blocks)")
        _check(rt.cudaMemset(ptr, 0, nbytes), "cudaMemset of the KV pool")
        _check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        return cls(rt, int(ptr), nbytes)

    def free(self) -> None:
        if self.ptr is not None:
            torch.cuda.synchronize()
            self._rt.cudaFree(self.ptr)
            self.ptr = None


def cuda_ipc_handle(tensor: torch.Tensor) -> str:
    """`cuda-ipc:HEX:OFFSET` for the allocation holding `tensor`; "" when it cannot be exported.

    `cudaIpcGetMemHandle` names a whole allocation and the opener gets that allocation's base back,
    so the offset of the tensor's first byte inside it (found with `cuMemGetAddressRange`) travels
    with the handle; the swap daemon adds it (swap_daemon/pools.py)."""
    mods = _cuda_modules()
    if mods is None:
        return ""
    rt, drv = mods
    ptr = tensor.data_ptr()
    try:
        base, _size = _check(drv.cuMemGetAddressRange(drv.CUdeviceptr(ptr)), "cuMemGetAddressRange")
        base = int(base)
        handle = _check(rt.cudaIpcGetMemHandle(base), "cudaIpcGetMemHandle")
    except Exception as exc:  # noqa: BLE001 - the pool still serves; swaps then fall back to recompute
        log.warning("kv_pool_not_exportable", error=str(exc))
        return ""
    return encode_ipc_handle(handle.reserved, ptr - base)


def _check(result: Any, what: str) -> Any:
    """Unpack cuda-python's `(err, *values)`; raise unless err is success (0, runtime or driver)."""
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def encode_ipc_handle(reserved: Any, offset: int) -> str:
    """The handle's 64 bytes (cuda-python gives them as signed chars) as hex, and the offset."""
    raw = bytes(int(b) & 0xFF for b in reserved)
    return f"cuda-ipc:{raw.hex()}:{offset}"
