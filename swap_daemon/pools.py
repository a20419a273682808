"""The two memory pools a swap moves bytes between.

Both pools share the executor's block-major layout: block b is bytes [b*block_bytes, (b+1)*block_bytes),
so a run of consecutive blocks is one contiguous byte range on either side. The device pool belongs to
the executor and is only mapped here (never freed or unlinked); the host pool belongs to the daemon.

CPU-only machine: the device pool is a POSIX shared-memory segment (`shm:NAME`) and the host pool plain
process memory, both exposed as numpy uint8 views shaped [num_blocks, block_bytes]. GPU: the device pool
is a CUDA IPC handle (`cuda-ipc:HEX[:OFFSET]`) and the host pool pinned memory from `cudaHostAlloc`;
cuda-python is imported lazily, only by the CUDA classes.
"""

from __future__ import annotations

import ctypes
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from svc_common.errors import InvalidArgument

CUDA_IPC_HANDLE_BYTES = 64


# --- cuda-python helpers ------------------------------------------------------------------------


def load_cudart() -> Any:
    """The cuda-python runtime module (`cuda.bindings.runtime`, or `cuda.cudart` before 12.8)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef]
    return cudart


def cuda_check(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python `(err, *values)` tuple; raise RuntimeError unless err is cudaSuccess."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:  # defensive: some bindings return the bare error for void calls
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {cuda_error_name(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_error_name(cudart: Any, err: Any) -> str:
    try:
        name_err, name = cudart.cudaGetErrorName(err)
        if name_err == cudart.cudaError_t.cudaSuccess:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - only used to decorate an error message
        pass
    return repr(err)


def cuda_device_count() -> int:
    """GPUs visible through cuda-python; 0 when cuda-python, the driver or a GPU is missing."""
    try:
        cudart = load_cudart()
        err, count = cudart.cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - ImportError, missing libcuda, ...: no usable GPU
        return 0
    if err != cudart.cudaError_t.cudaSuccess:
        return 0
    return int(count)


# --- handles ------------------------------------------------------------------------------------


def parse_pool_handle(handle: str) -> tuple[str, str]:
    """Split `KIND:PAYLOAD` into its kind ("shm" or "cuda-ipc") and payload."""
    kind, sep, payload = handle.partition(":")
    if not sep or not payload or kind not in ("shm", "cuda-ipc"):
        raise InvalidArgument(f"pool handle must be 'shm:NAME' or 'cuda-ipc:HEX', got {handle[:80]!r}")
    return kind, payload


def parse_cuda_ipc_payload(payload: str) -> tuple[bytes, int]:
    """`HEX[:OFFSET]` -> (64 handle bytes, byte offset of the pool inside the exported allocation)."""
    hex_part, _, offset_part = payload.partition(":")
    try:
        raw = bytes.fromhex(hex_part)
        offset = int(offset_part) if offset_part else 0
    except ValueError as exc:
        raise InvalidArgument(f"malformed cuda-ipc handle: {exc}") from exc
    if len(raw) != CUDA_IPC_HANDLE_BYTES:
        raise InvalidArgument(f"cuda-ipc handle must be {CUDA_IPC_HANDLE_BYTES} bytes, got {len(raw)}")
    if offset < 0:
        raise InvalidArgument(f"cuda-ipc offset must be >= 0, got {offset}")
    return raw, offset


# --- CPU pools ----------------------------------------------------------------------------------


class ShmDevicePool:
    """The executor's pool in a named shared-memory segment, mapped (not owned) by the daemon."""

    def __init__(self, name: str, num_blocks: int, block_bytes: int) -> None:
        try:
            shm = shared_memory.SharedMemory(name=name)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise InvalidArgument(f"cannot open shared memory {name!r}: {exc}") from exc
        # The executor owns the segment: keep this process's resource tracker from unlinking it.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        need = num_blocks * block_bytes
        if shm.size < need:
            shm.close()
            raise InvalidArgument(
                f"shared memory {name!r} holds {shm.size} bytes, the pool needs {need} "
                f"({num_blocks} blocks x {block_bytes} bytes)"
            )
        self._shm: shared_memory.SharedMemory | None = shm
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.flat: np.ndarray = np.frombuffer(shm.buf, dtype=np.uint8, count=need)
        self.view: np.ndarray = self.flat.reshape(num_blocks, block_bytes)

    def close(self) -> None:
        if self._shm is None:
            return
        del self.flat, self.view
        try:
            self._shm.close()
        except BufferError:  # a view escaped; the mapping goes away with the last reference
            pass
        self._shm = None


class NumpyHostPool:
    """Host pool in ordinary process memory, pre-faulted so the first swap does not pay page faults."""

    def __init__(self, num_blocks: int, block_bytes: int) -> None:
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.view: np.ndarray = np.empty((num_blocks, block_bytes), dtype=np.uint8)
        self.view.fill(0)
        self.flat: np.ndarray = self.view.reshape(-1)

    def close(self) -> None:
        pass


def create_shm_pool(num_blocks: int, block_bytes: int) -> tuple[shared_memory.SharedMemory, str]:
    """A device-pool segment the way the executor makes one; for tests and the bench only.

    Returns the segment and its pool handle. Release it with `destroy_shm_pool`.
    """
    shm = shared_memory.SharedMemory(create=True, size=num_blocks * block_bytes)
    return shm, f"shm:{shm.name}"


def destroy_shm_pool(shm: shared_memory.SharedMemory) -> None:
    """Close and unlink a segment from `create_shm_pool`.

    A daemon that mapped it in this same process unregistered the name from the shared resource
    tracker; register it again so `unlink` (which unregisters) leaves the tracker balanced.
    """
    resource_tracker.register(shm._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        shm.close()
    except BufferError:
        pass
    shm.unlink()


# --- CUDA pools ---------------------------------------------------------------------------------


class CudaIpcDevicePool:
    """The executor's GPU pool, opened from its CUDA IPC handle in this process's context."""

    def __init__(self, cudart: Any, payload: str, num_blocks: int, block_bytes: int) -> None:
        raw, offset = parse_cuda_ipc_payload(payload)
        handle = cudart.cudaIpcMemHandle_t()
        handle.reserved = raw
        err, base = cudart.cudaIpcOpenMemHandle(handle, cudart.cudaIpcMemLazyEnablePeerAccess)
        if err != cudart.cudaError_t.cudaSuccess:
            raise InvalidArgument(f"cudaIpcOpenMemHandle failed: {cuda_error_name(cudart, err)}")
        self._cudart = cudart
        self._base: int | None = int(base)
        self.ptr = int(base) + offset
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes

    def close(self) -> None:
        if self._base is None:
            return
        base, self._base = self._base, None
        cuda_check(self._cudart, self._cudart.cudaIpcCloseMemHandle(base), "cudaIpcCloseMemHandle")


class PinnedHostPool:
    """Host pool in page-locked memory (`cudaHostAlloc`), so `cudaMemcpyAsync` is truly async."""

    def __init__(self, cudart: Any, num_blocks: int, block_bytes: int) -> None:
        size = num_blocks * block_bytes
        ptr = cuda_check(cudart, cudart.cudaHostAlloc(size, cudart.cudaHostAllocPortable), "cudaHostAlloc")
        self._cudart = cudart
        self.ptr: int | None = int(ptr)
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        buffer = (ctypes.c_uint8 * size).from_address(self.ptr)
        self.flat: np.ndarray = np.ctypeslib.as_array(buffer)
        self.view: np.ndarray = self.flat.reshape(num_blocks, block_bytes)
        self.view.fill(0)

    def close(self) -> None:
        if self.ptr is None:
            return
        ptr, self.ptr = self.ptr, None
        del self.flat, self.view
        cuda_check(self._cudart, self._cudart.cudaFreeHost(ptr), "cudaFreeHost")
