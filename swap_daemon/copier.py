"""Copy engines: turn a swap command (block runs + granularity) into copies and execute them.

Plain classes, no gRPC. `CopyEngine` holds what both backends share: the attachment (which device pool,
its geometry), the host pool, command validation and the copy plan. A command's granularity decides how
many copies it costs:

- RUN: one copy per run, after coalescing runs that are contiguous on both sides (FastSwitch groups);
- BLOCK: one copy per block;
- BLOCK_LAYER: one copy per (block, layer, K/V) piece, what vLLM's per-layer KV tensors cost.

`CpuCopyEngine` runs copies as `np.copyto` on uint8 views (numpy drops the GIL for the memcpy) in a pool
of `workers` threads; a large command is cut into `workers` equal byte slices so one big group can use
every worker. `CudaCopyEngine` issues `cudaMemcpyAsync` on its own non-blocking streams and waits on one
event per command. Either way `swap()` blocks its calling thread until the bytes have landed, so the
server runs it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from svc_common.errors import FailedPrecondition, InvalidArgument
from svc_common.swap import BlockRun, Direction, Granularity, HostRange
from swap_daemon import pools

log = structlog.get_logger(__name__)

# Below this many bytes a command is copied by one worker: splitting costs more than it saves.
PARALLEL_MIN_BYTES = 4 << 20
# Slices handed to different workers start on this boundary (keeps memcpy on aligned cache lines).
SLICE_ALIGN = 4096


@dataclass(frozen=True, slots=True)
class AttachSpec:
    """The executor's device pool, as the scheduler relays it from ExecutorInfo."""

    pool_handle: str
    num_device_blocks: int
    block_bytes: int
    num_layers: int


@dataclass(frozen=True, slots=True)
class Geometry:
    num_device_blocks: int
    num_host_blocks: int
    block_bytes: int
    num_layers: int


@dataclass(frozen=True, slots=True)
class SwapResult:
    bytes: int
    copy_calls: int


class SwapRejected(ValueError):
    """A command that cannot run (bad runs, not attached): fails that swap only, not the stream."""


# A planned copy: (device byte offset, host byte offset, bytes).
Copy = tuple[int, int, int]


def validate_runs(runs: Sequence[BlockRun], direction: Direction, geometry: Geometry) -> None:
    """Reject runs that are empty, out of range of either pool, or whose destinations overlap."""
    if not runs:
        raise SwapRejected("command has no block runs")
    for run in runs:
        if run.num_blocks <= 0:
            raise SwapRejected(f"zero-length run {run}")
        if run.device_start < 0 or run.device_start + run.num_blocks > geometry.num_device_blocks:
            raise SwapRejected(f"run {run} is outside the device pool ({geometry.num_device_blocks} blocks)")
        if run.host_start < 0 or run.host_start + run.num_blocks > geometry.num_host_blocks:
            raise SwapRejected(f"run {run} is outside the host pool ({geometry.num_host_blocks} blocks)")
    starts = sorted((r.host_start if direction is Direction.OUT else r.device_start, r.num_blocks) for r in runs)
    side = "host" if direction is Direction.OUT else "device"
    for (a_start, a_len), (b_start, _) in itertools.pairwise(starts):
        if b_start < a_start + a_len:
            raise SwapRejected(f"destination runs overlap on the {side} pool at block {b_start}")


def coalesce(runs: Sequence[BlockRun]) -> list[BlockRun]:
    """Merge runs that continue each other on both sides (sorted by device position)."""
    merged: list[BlockRun] = []
    for run in sorted(runs, key=lambda r: r.device_start):
        if merged:
            last = merged[-1]
            if (
                last.device_start + last.num_blocks == run.device_start
                and last.host_start + last.num_blocks == run.host_start
            ):
                merged[-1] = BlockRun(last.device_start, last.host_start, last.num_blocks + run.num_blocks)
                continue
        merged.append(run)
    return merged


def plan_copies(runs: Sequence[BlockRun], granularity: Granularity, geometry: Geometry) -> list[Copy]:
    """The copies a validated command costs at `granularity`; one tuple per logical copy call."""
    bb = geometry.block_bytes
    if granularity is Granularity.RUN:
        return [(r.device_start * bb, r.host_start * bb, r.num_blocks * bb) for r in coalesce(runs)]
    if granularity is Granularity.BLOCK:
        return [((r.device_start + i) * bb, (r.host_start + i) * bb, bb) for r in runs for i in range(r.num_blocks)]
    pieces = 2 * geometry.num_layers
    if pieces <= 0 or bb % pieces:
        raise SwapRejected(
            f"per-layer copies need block_bytes ({bb}) divisible by 2 x num_layers ({geometry.num_layers})"
        )
    piece = bb // pieces
    return [
        ((r.device_start + i) * bb + p * piece, (r.host_start + i) * bb + p * piece, piece)
        for r in runs
        for i in range(r.num_blocks)
        for p in range(pieces)
    ]


def split_even(copies: Sequence[Copy], parts: int, align: int = SLICE_ALIGN) -> list[list[Copy]]:
    """Cut a copy list into at most `parts` batches of about equal bytes, splitting copies as needed."""
    total = sum(c[2] for c in copies)
    target = max(align, -(-total // parts // align) * align) if total else 1
    batches: list[list[Copy]] = []
    batch: list[Copy] = []
    room = target
    for dev, host, nbytes in copies:
        while nbytes:
            take = min(nbytes, room)
            batch.append((dev, host, take))
            dev, host, nbytes, room = dev + take, host + take, nbytes - take, room - take
            if room == 0:
                batches.append(batch)
                batch, room = [], target
    if batch:
        batches.append(batch)
    return batches


class CopyEngine:
    """Attachment, host pool, validation and planning shared by the CPU and CUDA backends."""

    backend = "none"

    def __init__(self, num_host_blocks: int, workers: int) -> None:
        self.num_host_blocks = num_host_blocks
        self.workers = workers
        self._lock = threading.Condition()
        self._geometry: Geometry | None = None
        self._owner: object | None = None
        self._device: Any = None
        self._host: Any = None
        self._inflight = 0

    # --- attachment ---------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._geometry is not None

    @property
    def block_bytes(self) -> int:
        geometry = self._geometry
        return geometry.block_bytes if geometry else 0

    @property
    def host_view(self) -> np.ndarray:
        """The host pool as [num_host_blocks, block_bytes] uint8 (for tests and diagnostics)."""
        if self._host is None:
            raise FailedPrecondition("no host pool yet: attach first")
        return self._host.view

    def attach(self, spec: AttachSpec, owner: object) -> Geometry:
        """Map the executor's pool for `owner` (one stream); size the host pool to its blocks."""
        if spec.num_device_blocks <= 0:
            raise InvalidArgument(f"num_device_blocks must be > 0, got {spec.num_device_blocks}")
        if spec.block_bytes <= 0:
            raise InvalidArgument(f"block_bytes must be > 0, got {spec.block_bytes}")
        if spec.num_layers < 0 or (spec.num_layers and spec.block_bytes % (2 * spec.num_layers)):
            raise InvalidArgument(
                f"block_bytes ({spec.block_bytes}) must divide into 2 x num_layers ({spec.num_layers}) pieces"
            )
        kind, payload = pools.parse_pool_handle(spec.pool_handle)
        with self._lock:
            if self._owner is not None:
                raise FailedPrecondition("the swap daemon is already attached to another stream")
            self._owner = owner  # reserve while mapping
        try:
            device = self._map_device(kind, payload, spec)
            try:
                if self._host is None or self._host.block_bytes != spec.block_bytes:
                    if self._host is not None:
                        self._host.close()
                        self._host = None
                    self._host = self._alloc_host(spec.block_bytes)
            except Exception:
                device.close()
                raise
        except BaseException:
            with self._lock:
                self._owner = None
            raise
        geometry = Geometry(spec.num_device_blocks, self.num_host_blocks, spec.block_bytes, spec.num_layers)
        with self._lock:
            self._device = device
            self._geometry = geometry
        return geometry

    def detach(self, owner: object) -> None:
        """Unmap the device pool once no copy is in flight; the host pool (and its data) stays."""
        with self._lock:
            if self._owner is not owner:
                return
            self._geometry = None
            while self._inflight:
                self._lock.wait()
            device, self._device, self._owner = self._device, None, None
        if device is not None:
            device.close()

    def close(self) -> None:
        """Release everything (process shutdown)."""
        with self._lock:
            owner = self._owner
        if owner is not None:
            self.detach(owner)
        if self._host is not None:
            self._host.close()
            self._host = None
        self._shutdown()

    # --- swaps --------------------------------------------------------------------------------

    def swap(self, direction: Direction, runs: Sequence[BlockRun], granularity: Granularity) -> SwapResult:
        """Validate, plan and execute one command; blocks until its bytes have landed."""
        with self._lock:
            geometry = self._geometry
            if geometry is None:
                raise SwapRejected("no device pool attached")
            self._inflight += 1
        try:
            validate_runs(runs, direction, geometry)
            copies = plan_copies(runs, granularity, geometry)
            self._execute(direction, copies)
            return SwapResult(bytes=sum(c[2] for c in copies), copy_calls=len(copies))
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

    # --- the host pool between daemons (migration) ----------------------------------------------

    def host_slices(self, ranges: Sequence[HostRange]) -> list[tuple[int, int]]:
        """(byte offset, bytes) of each range in the host pool, checked: FailedPrecondition before the
        host pool exists, InvalidArgument for an empty range or one outside the pool."""
        host = self._host
        if host is None:
            raise FailedPrecondition("no host pool yet: this daemon has never been attached to an executor")
        slices = []
        for r in ranges:
            if r.num_blocks <= 0 or r.start + r.num_blocks > host.num_blocks:
                raise InvalidArgument(
                    f"host range {r.start}+{r.num_blocks} is empty or outside the host pool ({host.num_blocks} blocks)"
                )
            slices.append((r.start * host.block_bytes, r.num_blocks * host.block_bytes))
        return slices

    def read_host(self, slices: Sequence[tuple[int, int]], piece_bytes: int) -> Iterator[bytes]:
        """The bytes of host slices (from `host_slices`), in order, in pieces of at most piece_bytes."""
        flat = self._host.flat
        for offset, nbytes in slices:
            for start in range(offset, offset + nbytes, piece_bytes):
                yield flat[start : min(start + piece_bytes, offset + nbytes)].tobytes()

    def host_writer(self, ranges: Sequence[HostRange]) -> HostWriter:
        """A sequential writer into host ranges (checked like `host_slices`)."""
        slices = self.host_slices(ranges)  # (raises before the host pool exists)
        return HostWriter(self._host.flat, slices)

    # --- backend hooks --------------------------------------------------------------------------

    def _map_device(self, kind: str, payload: str, spec: AttachSpec) -> Any:
        raise NotImplementedError

    def _alloc_host(self, block_bytes: int) -> Any:
        raise NotImplementedError

    def _execute(self, direction: Direction, copies: list[Copy]) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        pass


class HostWriter:
    """Bytes arriving in order (another daemon's host blocks), written into host slices in order."""

    def __init__(self, flat: np.ndarray, slices: list[tuple[int, int]]) -> None:
        self.flat = flat
        self.slices = slices
        self.expected = sum(n for _, n in slices)
        self.written = 0
        self._slice = 0  # the slice being written
        self._into = 0  # bytes written into it

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.expected:
            raise SwapRejected(
                f"the source sent more than the {self.expected} bytes expected: do both nodes' KV blocks have the "
                "same size (the same model and block size)?"
            )
        src = np.frombuffer(data, dtype=np.uint8)
        while src.size:
            offset, nbytes = self.slices[self._slice]
            n = min(nbytes - self._into, src.size)
            np.copyto(self.flat[offset + self._into : offset + self._into + n], src[:n])
            src = src[n:]
            self._into += n
            self.written += n
            if self._into == nbytes:
                self._slice, self._into = self._slice + 1, 0

    def finish(self) -> None:
        if self.written != self.expected:
            raise SwapRejected(
                f"the source sent {self.written} bytes, {self.expected} expected: do both nodes' KV blocks have the "
                "same size (the same model and block size)?"
            )


def _copy_batch(dst: np.ndarray, src: np.ndarray, batch: Sequence[Copy], out: bool) -> None:
    if out:
        for dev, host, nbytes in batch:
            np.copyto(dst[host : host + nbytes], src[dev : dev + nbytes])
    else:
        for dev, host, nbytes in batch:
            np.copyto(dst[dev : dev + nbytes], src[host : host + nbytes])


class CpuCopyEngine(CopyEngine):
    """memcpy workers over a shared-memory device pool and an in-process host pool."""

    backend = "cpu-memcpy"

    def __init__(self, num_host_blocks: int, workers: int) -> None:
        super().__init__(num_host_blocks, workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="swapd-memcpy")

    def _map_device(self, kind: str, payload: str, spec: AttachSpec) -> Any:
        if kind != "shm":
            raise InvalidArgument(f"the cpu backend maps 'shm:' pools, got a {kind!r} handle")
        return pools.ShmDevicePool(payload, spec.num_device_blocks, spec.block_bytes)

    def _alloc_host(self, block_bytes: int) -> Any:
        return pools.NumpyHostPool(self.num_host_blocks, block_bytes)

    def _execute(self, direction: Direction, copies: list[Copy]) -> None:
        out = direction is Direction.OUT
        dev, host = self._device.flat, self._host.flat
        dst, src = (host, dev) if out else (dev, host)
        total = sum(c[2] for c in copies)
        if self.workers == 1 or total < PARALLEL_MIN_BYTES:
            self._pool.submit(_copy_batch, dst, src, copies, out).result()
            return
        futures = [self._pool.submit(_copy_batch, dst, src, batch, out) for batch in split_even(copies, self.workers)]
        for future in futures:
            future.result()

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class CudaCopyEngine(CopyEngine):
    """cudaMemcpyAsync on the daemon's own streams between pinned host memory and the IPC-mapped pool.

    Each command goes to one of `workers` non-blocking streams (round robin), so swaps in both
    directions overlap each other and the executor's compute stream; an event recorded after the
    command's last copy tells when it has landed.
    """

    backend = "cuda"
    POLL_MIN_S = 20e-6
    POLL_MAX_S = 1e-3

    def __init__(self, num_host_blocks: int, workers: int, device: int = 0) -> None:
        super().__init__(num_host_blocks, workers)
        self._rt = pools.load_cudart()
        rt = self._rt
        count = pools.cuda_check(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if int(count) <= device:
            raise RuntimeError(f"CUDA device {device} not present ({count} visible)")
        self._device_index = device
        pools.cuda_check(rt, rt.cudaSetDevice(device), "cudaSetDevice")
        self._streams = [
            pools.cuda_check(rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
            for _ in range(workers)
        ]
        self._next_stream = itertools.cycle(range(workers))
        self._stream_lock = threading.Lock()

    def _map_device(self, kind: str, payload: str, spec: AttachSpec) -> Any:
        if kind != "cuda-ipc":
            raise InvalidArgument(f"the cuda backend maps 'cuda-ipc:' pools, got a {kind!r} handle")
        pools.cuda_check(self._rt, self._rt.cudaSetDevice(self._device_index), "cudaSetDevice")
        return pools.CudaIpcDevicePool(self._rt, payload, spec.num_device_blocks, spec.block_bytes)

    def _alloc_host(self, block_bytes: int) -> Any:
        pools.cuda_check(self._rt, self._rt.cudaSetDevice(self._device_index), "cudaSetDevice")
        return pools.PinnedHostPool(self._rt, self.num_host_blocks, block_bytes)

    def _execute(self, direction: Direction, copies: list[Copy]) -> None:
        rt = self._rt
        check = pools.cuda_check
        # The current device is per thread; this worker thread may never have set it.
        check(rt, rt.cudaSetDevice(self._device_index), "cudaSetDevice")
        with self._stream_lock:
            stream = self._streams[next(self._next_stream)]
        dev_base, host_base = self._device.ptr, self._host.ptr
        if direction is Direction.OUT:
            kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        else:
            kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        event = check(rt, rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreate")
        try:
            try:
                for dev, host, nbytes in copies:
                    if direction is Direction.OUT:
                        dst, src = host_base + host, dev_base + dev
                    else:
                        dst, src = dev_base + dev, host_base + host
                    check(rt, rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync")
                check(rt, rt.cudaEventRecord(event, stream), "cudaEventRecord")
            except Exception:
                # Copies already queued still run: report failure only once they are done.
                rt.cudaStreamSynchronize(stream)
                raise
            self._wait(event)
        finally:
            rt.cudaEventDestroy(event)

    def _wait(self, event: Any) -> None:
        """Poll the event with a short back-off; sleeping keeps the GIL free for other commands."""
        rt = self._rt
        delay = self.POLL_MIN_S
        while True:
            (err,) = rt.cudaEventQuery(event)
            if err == rt.cudaError_t.cudaSuccess:
                return
            if err != rt.cudaError_t.cudaErrorNotReady:
                raise RuntimeError(f"copy failed: {pools.cuda_error_name(rt, err)}")
            time.sleep(delay)
            delay = min(delay * 2, self.POLL_MAX_S)

    def _shutdown(self) -> None:
        rt = self._rt
        for stream in self._streams:
            rt.cudaStreamSynchronize(stream)
            rt.cudaStreamDestroy(stream)
        self._streams = []


def make_engine(backend: str, num_host_blocks: int, workers: int) -> CopyEngine:
    """`auto` picks CUDA when cuda-python imports and sees a GPU, else the CPU memcpy engine."""
    if backend == "cpu":
        return CpuCopyEngine(num_host_blocks, workers)
    if backend == "cuda":
        return CudaCopyEngine(num_host_blocks, workers)
    if pools.cuda_device_count() > 0:
        try:
            return CudaCopyEngine(num_host_blocks, workers)
        except Exception as exc:  # noqa: BLE001 - fall back, but say why
            log.warning("cuda_backend_unavailable", error=str(exc))
    return CpuCopyEngine(num_host_blocks, workers)
