"""Swap daemon: copy engine (plain classes), the gRPC Swap stream, and the CUDA backend (GPU only).

The device pool here is a real shared-memory segment laid out block-major, the way a CPU executor
makes one; the daemon maps it through its `shm:` handle exactly as in production.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch.v1 import swap_pb2, swap_pb2_grpc
from svc_common.errors import FailedPrecondition, InvalidArgument
from svc_common.server import ServiceHost
from swap_daemon import pools
from swap_daemon.config import SwapDaemonConfig
from swap_daemon.copier import (
    AttachSpec,
    BlockRun,
    CpuCopyEngine,
    Direction,
    Granularity,
    SwapRejected,
    make_engine,
    plan_copies,
    split_even,
)

LAYERS = 3
BLOCK_BYTES = LAYERS * 2 * 256  # 6 pieces of 256 bytes
DEVICE_BLOCKS = 32
HOST_BLOCKS = 24
SERVICE = swap_pb2.DESCRIPTOR.services_by_name["SwapDaemon"].full_name


class ShmPool:
    """A device pool the way the executor makes one, with a numpy view for the test to poke at."""

    def __init__(self, num_blocks: int = DEVICE_BLOCKS, block_bytes: int = BLOCK_BYTES, seed: int = 0) -> None:
        self.shm, self.handle = pools.create_shm_pool(num_blocks, block_bytes)
        self.view = np.frombuffer(self.shm.buf, dtype=np.uint8, count=num_blocks * block_bytes).reshape(
            num_blocks, block_bytes
        )
        self.view[:] = np.random.default_rng(seed).integers(0, 256, self.view.shape, dtype=np.uint8)
        self.spec = AttachSpec(self.handle, num_blocks, block_bytes, LAYERS)

    def close(self) -> None:
        del self.view
        pools.destroy_shm_pool(self.shm)


@pytest.fixture
def device() -> Iterator[ShmPool]:
    pool = ShmPool()
    yield pool
    pool.close()


@pytest.fixture
def engine(device: ShmPool) -> Iterator[CpuCopyEngine]:
    eng = CpuCopyEngine(num_host_blocks=HOST_BLOCKS, workers=2)
    eng.attach(device.spec, owner="test")
    yield eng
    eng.close()


# --- copy engine --------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", list(Granularity))
def test_swap_out_then_in_restores_exact_bytes(
    device: ShmPool, engine: CpuCopyEngine, granularity: Granularity
) -> None:
    original = device.view.copy()
    runs = [BlockRun(0, 10, 3), BlockRun(3, 13, 2), BlockRun(20, 0, 4)]
    out = engine.swap(Direction.OUT, runs, granularity)
    assert out.bytes == 9 * BLOCK_BYTES
    for r in runs:
        np.testing.assert_array_equal(
            engine.host_view[r.host_start : r.host_start + r.num_blocks],
            original[r.device_start : r.device_start + r.num_blocks],
        )
    device.view[:] = 0xAA  # the executor reuses the blocks
    back = engine.swap(Direction.IN, runs, granularity)
    assert back == out
    moved = np.zeros(DEVICE_BLOCKS, dtype=bool)
    for r in runs:
        moved[r.device_start : r.device_start + r.num_blocks] = True
    np.testing.assert_array_equal(device.view[moved], original[moved])
    assert (device.view[~moved] == 0xAA).all(), "blocks outside the runs must not be written"


def test_copy_calls_are_exact_for_each_granularity(engine: CpuCopyEngine) -> None:
    # The first two runs continue each other on both sides and coalesce; the third does not.
    runs = [BlockRun(0, 10, 2), BlockRun(2, 12, 3), BlockRun(8, 0, 1)]
    expected = {Granularity.RUN: 2, Granularity.BLOCK: 6, Granularity.BLOCK_LAYER: 6 * 2 * LAYERS}
    for granularity, calls in expected.items():
        result = engine.swap(Direction.OUT, runs, granularity)
        assert (result.copy_calls, result.bytes) == (calls, 6 * BLOCK_BYTES), granularity


def test_runs_contiguous_on_one_side_only_are_not_coalesced(engine: CpuCopyEngine) -> None:
    assert engine.swap(Direction.OUT, [BlockRun(0, 0, 2), BlockRun(2, 5, 2)], Granularity.RUN).copy_calls == 2
    assert engine.swap(Direction.OUT, [BlockRun(4, 8, 2), BlockRun(0, 10, 2)], Granularity.RUN).copy_calls == 2


def test_block_layer_copies_are_the_pieces_of_the_kv_layout() -> None:
    from swap_daemon.copier import Geometry

    geometry = Geometry(DEVICE_BLOCKS, HOST_BLOCKS, BLOCK_BYTES, LAYERS)
    piece = BLOCK_BYTES // (2 * LAYERS)
    copies = plan_copies([BlockRun(5, 2, 1)], Granularity.BLOCK_LAYER, geometry)
    # (layer l, kv k) piece sits at (2l + k) * piece inside the block, on both sides.
    assert copies == [(5 * BLOCK_BYTES + p * piece, 2 * BLOCK_BYTES + p * piece, piece) for p in range(6)]


def test_large_group_is_split_across_workers_but_counts_as_one_copy() -> None:
    block_bytes = 2 * LAYERS * 64 * 1024  # 384 KiB: 16 blocks = 6 MiB, above the split threshold
    pool = ShmPool(num_blocks=16, block_bytes=block_bytes, seed=3)
    eng = CpuCopyEngine(num_host_blocks=16, workers=2)
    try:
        eng.attach(AttachSpec(pool.handle, 16, block_bytes, LAYERS), owner="t")
        result = eng.swap(Direction.OUT, [BlockRun(0, 0, 16)], Granularity.RUN)
        assert (result.copy_calls, result.bytes) == (1, 16 * block_bytes)
        np.testing.assert_array_equal(eng.host_view, pool.view)
    finally:
        eng.close()
        pool.close()


def test_split_even_covers_every_byte_once_in_balanced_batches() -> None:
    copies = [(0, 100_000, 10_000_000), (20_000_000, 0, 3_000_000), (50_000_000, 40_000_000, 5000)]
    batches = split_even(copies, 4)
    assert 1 < len(batches) <= 4
    flat = [c for b in batches for c in b]
    rebuilt: list[tuple[int, int, int]] = []
    for dev, host, n in flat:  # glue consecutive slices back together
        if rebuilt and rebuilt[-1][0] + rebuilt[-1][2] == dev and rebuilt[-1][1] + rebuilt[-1][2] == host:
            rebuilt[-1] = (rebuilt[-1][0], rebuilt[-1][1], rebuilt[-1][2] + n)
        else:
            rebuilt.append((dev, host, n))
    assert rebuilt == copies
    sizes = [sum(c[2] for c in b) for b in batches]
    assert max(sizes[:-1]) == min(sizes[:-1]) and sizes[-1] <= sizes[0]


@pytest.mark.parametrize(
    ("direction", "runs", "reason"),
    [
        (Direction.OUT, [BlockRun(DEVICE_BLOCKS - 1, 0, 2)], "outside the device pool"),
        (Direction.IN, [BlockRun(0, HOST_BLOCKS - 1, 2)], "outside the host pool"),
        (Direction.OUT, [BlockRun(0, 4, 3), BlockRun(10, 6, 1)], "overlap on the host"),
        (Direction.IN, [BlockRun(0, 0, 3), BlockRun(2, 10, 1)], "overlap on the device"),
        (Direction.OUT, [BlockRun(0, 0, 0)], "zero-length"),
        (Direction.OUT, [], "no block runs"),
    ],
)
def test_invalid_runs_fail_the_swap_and_touch_nothing(
    device: ShmPool, engine: CpuCopyEngine, direction: Direction, runs: list[BlockRun], reason: str
) -> None:
    device_before, host_before = device.view.copy(), engine.host_view.copy()
    with pytest.raises(SwapRejected, match=reason):
        engine.swap(direction, runs, Granularity.RUN)
    np.testing.assert_array_equal(device.view, device_before)
    np.testing.assert_array_equal(engine.host_view, host_before)
    assert engine.swap(Direction.OUT, [BlockRun(0, 0, 1)], Granularity.RUN).copy_calls == 1


def test_overlapping_sources_are_allowed(device: ShmPool, engine: CpuCopyEngine) -> None:
    engine.swap(Direction.OUT, [BlockRun(1, 0, 1), BlockRun(1, 5, 1)], Granularity.RUN)
    np.testing.assert_array_equal(engine.host_view[0], device.view[1])
    np.testing.assert_array_equal(engine.host_view[5], device.view[1])


def test_swap_before_attach_is_rejected(device: ShmPool) -> None:
    eng = CpuCopyEngine(num_host_blocks=HOST_BLOCKS, workers=1)
    try:
        with pytest.raises(SwapRejected, match="no device pool attached"):
            eng.swap(Direction.OUT, [BlockRun(0, 0, 1)], Granularity.RUN)
        eng.attach(device.spec, owner="a")
        eng.detach("a")
        with pytest.raises(SwapRejected, match="no device pool attached"):
            eng.swap(Direction.OUT, [BlockRun(0, 0, 1)], Granularity.RUN)
    finally:
        eng.close()


@pytest.mark.parametrize(
    ("handle", "blocks", "reason"),
    [
        ("shm:fastswitch-test-no-such-segment", DEVICE_BLOCKS, "cannot open shared memory"),
        ("bogus", DEVICE_BLOCKS, "pool handle must be"),
        ("cuda-ipc:" + "00" * 64, DEVICE_BLOCKS, "cpu backend maps 'shm:'"),
        (None, DEVICE_BLOCKS * 2, "the pool needs"),
    ],
)
def test_attach_with_bad_handle_raises_invalid_argument(
    device: ShmPool, handle: str | None, blocks: int, reason: str
) -> None:
    eng = CpuCopyEngine(num_host_blocks=HOST_BLOCKS, workers=1)
    try:
        with pytest.raises(InvalidArgument, match=reason):
            eng.attach(AttachSpec(handle or device.handle, blocks, BLOCK_BYTES, LAYERS), owner="a")
        assert not eng.attached
        eng.attach(device.spec, owner="b")  # a failed attach leaves the engine free
        assert eng.attached
    finally:
        eng.close()


def test_attach_rejects_geometry_that_does_not_split_into_layers(device: ShmPool) -> None:
    eng = CpuCopyEngine(num_host_blocks=HOST_BLOCKS, workers=1)
    try:
        with pytest.raises(InvalidArgument, match="num_layers"):
            eng.attach(AttachSpec(device.handle, DEVICE_BLOCKS, BLOCK_BYTES, 7), owner="a")
    finally:
        eng.close()


def test_second_attach_while_attached_is_refused(device: ShmPool, engine: CpuCopyEngine) -> None:
    with pytest.raises(FailedPrecondition, match="already attached"):
        engine.attach(device.spec, owner="someone-else")


@pytest.fixture(scope="module")
def shared_engine() -> Iterator[tuple[ShmPool, CpuCopyEngine]]:
    pool = ShmPool(seed=7)
    eng = CpuCopyEngine(num_host_blocks=HOST_BLOCKS, workers=2)
    eng.attach(pool.spec, owner="property")
    yield pool, eng
    eng.close()
    pool.close()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_valid_command_round_trips(shared_engine: tuple[ShmPool, CpuCopyEngine], data: st.DataObject) -> None:
    pool, eng = shared_engine
    pool.view[:] = np.random.default_rng(data.draw(st.integers(0, 2**16))).integers(
        0, 256, pool.view.shape, dtype=np.uint8
    )
    original = pool.view.copy()
    # Distinct device and host blocks, cut into runs of random length.
    n = data.draw(st.integers(1, HOST_BLOCKS))
    dev_blocks = data.draw(st.permutations(range(DEVICE_BLOCKS)))[:n]
    host_blocks = data.draw(st.permutations(range(HOST_BLOCKS)))[:n]
    runs = [BlockRun(d, h, 1) for d, h in zip(dev_blocks, host_blocks, strict=True)]
    granularity = data.draw(st.sampled_from(list(Granularity)))
    assert eng.swap(Direction.OUT, runs, granularity).bytes == n * BLOCK_BYTES
    pool.view[:] = 0
    eng.swap(Direction.IN, runs, granularity)
    np.testing.assert_array_equal(pool.view[dev_blocks], original[dev_blocks])


# --- config, CLI, backend choice ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{"workers": 0}, {"host_blocks": 0}, {"backend": "gpu"}, {"port": 70000}, {"workers": 65}]
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SwapDaemonConfig(**kwargs)  # type: ignore[arg-type]


def test_auto_backend_falls_back_to_cpu_without_a_gpu() -> None:
    if pools.cuda_device_count() > 0:
        pytest.skip("a GPU is visible: auto picks cuda here")
    eng = make_engine("auto", num_host_blocks=4, workers=1)
    try:
        assert eng.backend == "cpu-memcpy"
    finally:
        eng.close()


def test_daemon_modules_do_not_import_torch() -> None:
    code = "import sys, swap_daemon.__main__, swap_daemon.server, swap_daemon.bench\n"
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


# --- gRPC Swap stream ----------------------------------------------------------------------------


class GatedEngine(CpuCopyEngine):
    """Holds any command that touches device block 0 until `gate` is set: a copy that takes long."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()

    def _execute(self, direction, copies):  # type: ignore[no-untyped-def]
        if any(dev == 0 for dev, _, _ in copies):
            assert self.gate.wait(10), "test never opened the gate"
        super()._execute(direction, copies)


def serve_and_run(engine: CpuCopyEngine, body: Callable[[swap_pb2_grpc.SwapDaemonStub], object]) -> None:
    """Run `body(stub)` against a real server (interceptor, health, reflection) on a free port."""
    from swap_daemon.server import SwapDaemonServicer

    async def main() -> None:
        host = ServiceHost("127.0.0.1:0", [SERVICE])
        servicer = SwapDaemonServicer(engine)
        swap_pb2_grpc.add_SwapDaemonServicer_to_server(servicer, host.server)
        await host.server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
                await asyncio.wait_for(body(swap_pb2_grpc.SwapDaemonStub(channel)), timeout=15)  # type: ignore[arg-type]
        finally:
            await host.server.stop(None)
            servicer.close()

    asyncio.run(main())


def attach_msg(pool: ShmPool) -> swap_pb2.SwapCommand:
    return swap_pb2.SwapCommand(
        attach=swap_pb2.Attach(
            pool_handle=pool.handle,
            num_device_blocks=DEVICE_BLOCKS,
            block_bytes=BLOCK_BYTES,
            num_layers=LAYERS,
        )
    )


def command(
    swap_id: int, direction: int, runs: list[tuple[int, int, int]], granularity: int = 0
) -> swap_pb2.SwapCommand:
    return swap_pb2.SwapCommand(
        swap_id=swap_id,
        direction=direction,
        granularity=granularity,
        runs=[swap_pb2.BlockRun(device_start=d, host_start=h, num_blocks=n) for d, h, n in runs],
    )


class Stream:
    """A Swap call fed from a queue, so a test can interleave sends and receives."""

    def __init__(self, stub: swap_pb2_grpc.SwapDaemonStub) -> None:
        self.queue: asyncio.Queue[swap_pb2.SwapCommand | None] = asyncio.Queue()
        self.call = stub.Swap(self._requests(), timeout=20)

    async def _requests(self):  # type: ignore[no-untyped-def]
        while (msg := await self.queue.get()) is not None:
            yield msg

    def send(self, msg: swap_pb2.SwapCommand) -> None:
        self.queue.put_nowait(msg)

    async def recv(self) -> swap_pb2.SwapDone:
        return await self.call.read()

    def close(self) -> None:
        self.queue.put_nowait(None)


OUT, IN = swap_pb2.SWAP_DIRECTION_OUT, swap_pb2.SWAP_DIRECTION_IN


def test_swap_stream_runs_commands_concurrently_and_reports_in_completion_order(device: ShmPool) -> None:
    engine = GatedEngine(num_host_blocks=HOST_BLOCKS, workers=2)
    original = device.view.copy()

    async def body(stub: swap_pb2_grpc.SwapDaemonStub) -> None:
        info = await stub.Describe(swap_pb2.SwapDescribeRequest(), timeout=5)
        assert (info.backend, info.attached, info.block_bytes) == ("cpu-memcpy", False, 0)
        s = Stream(stub)
        s.send(attach_msg(device))
        s.send(command(1, OUT, [(0, 0, 4)]))  # held at the gate
        s.send(command(2, OUT, [(8, 8, 2), (10, 10, 2)], swap_pb2.COPY_GRANULARITY_RUN))
        s.send(command(3, OUT, [(16, 16, 2)], swap_pb2.COPY_GRANULARITY_BLOCK_LAYER))
        s.send(command(4, OUT, [(30, 0, 4)]))  # out of the device pool: fails alone
        early = {d.swap_id: d for d in [await s.recv() for _ in range(3)]}
        assert set(early) == {2, 3, 4}, "commands behind a slow copy must not wait for it"
        assert (early[2].ok, early[2].bytes, early[2].copy_calls) == (True, 4 * BLOCK_BYTES, 1)
        assert (early[3].ok, early[3].copy_calls) == (True, 2 * 2 * LAYERS)
        assert not early[4].ok and "outside the device pool" in early[4].error
        assert all(d.duration_ns > 0 for d in early.values())
        info = await stub.Describe(swap_pb2.SwapDescribeRequest(), timeout=5)
        assert (info.attached, info.block_bytes, info.num_host_blocks) == (True, BLOCK_BYTES, HOST_BLOCKS)

        engine.gate.set()
        first = await s.recv()
        assert (first.swap_id, first.ok, first.bytes) == (1, True, 4 * BLOCK_BYTES)

        device.view[:] = 0  # the stream still serves after a failed command: swap everything back
        s.send(command(5, IN, [(0, 0, 4), (8, 8, 4), (16, 16, 2)]))
        back = await s.recv()
        assert (back.swap_id, back.ok, back.bytes) == (5, True, 10 * BLOCK_BYTES)
        s.close()
        assert await s.recv() is grpc.aio.EOF
        info = await stub.Describe(swap_pb2.SwapDescribeRequest(), timeout=5)
        assert not info.attached, "the pool is unmapped once the stream ends"

    serve_and_run(engine, body)
    for lo, hi in ((0, 4), (8, 12), (16, 18)):
        np.testing.assert_array_equal(device.view[lo:hi], original[lo:hi])


def test_attach_with_bad_handle_aborts_stream_with_invalid_argument() -> None:
    async def body(stub: swap_pb2_grpc.SwapDaemonStub) -> None:
        s = Stream(stub)
        s.send(
            swap_pb2.SwapCommand(
                attach=swap_pb2.Attach(pool_handle="shm:fastswitch-test-missing", num_device_blocks=4, block_bytes=64)
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.recv()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cannot open shared memory" in (err.value.details() or "")

    serve_and_run(CpuCopyEngine(num_host_blocks=4, workers=1), body)


def test_commands_before_attach_fail_but_the_stream_keeps_serving(device: ShmPool) -> None:
    async def body(stub: swap_pb2_grpc.SwapDaemonStub) -> None:
        s = Stream(stub)
        s.send(command(7, OUT, [(0, 0, 1)]))
        early = await s.recv()
        assert (early.swap_id, early.ok) == (7, False) and "Attach" in early.error
        s.send(attach_msg(device))
        s.send(command(8, OUT, [(0, 0, 1)]))
        s.send(command(9, swap_pb2.SWAP_DIRECTION_UNSPECIFIED, [(1, 1, 1)]))
        done = {d.swap_id: d for d in [await s.recv(), await s.recv()]}
        assert done[8].ok and done[8].bytes == BLOCK_BYTES
        assert not done[9].ok and "direction" in done[9].error
        s.close()
        assert await s.recv() is grpc.aio.EOF

    serve_and_run(CpuCopyEngine(num_host_blocks=HOST_BLOCKS, workers=1), body)


def test_second_stream_cannot_attach_while_one_is_attached(device: ShmPool) -> None:
    async def body(stub: swap_pb2_grpc.SwapDaemonStub) -> None:
        first = Stream(stub)
        first.send(attach_msg(device))
        first.send(command(1, OUT, [(0, 0, 1)]))
        assert (await first.recv()).ok
        second = Stream(stub)
        second.send(attach_msg(device))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await second.recv()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        first.close()
        assert await first.recv() is grpc.aio.EOF
        third = Stream(stub)  # detached on stream end: a new stream may attach
        third.send(attach_msg(device))
        third.send(command(2, OUT, [(0, 0, 1)]))
        assert (await third.recv()).ok
        third.close()
        assert await third.recv() is grpc.aio.EOF

    serve_and_run(CpuCopyEngine(num_host_blocks=HOST_BLOCKS, workers=1), body)


# --- CUDA backend (needs cuda-python and a GPU) ---------------------------------------------------

_EXPORTER = textwrap.dedent(
    """
    import sys
    import numpy as np
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        from cuda import cudart as rt

    def ok(result):
        assert result[0] == rt.cudaError_t.cudaSuccess, result
        return result[1] if len(result) == 2 else None

    n = int(sys.argv[1])
    ok(rt.cudaSetDevice(0))
    ptr = ok(rt.cudaMalloc(n))
    pattern = (np.arange(n, dtype=np.uint64) * 7 % 251).astype(np.uint8)
    ok(rt.cudaMemcpy(ptr, pattern.ctypes.data, n, rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
    handle = ok(rt.cudaIpcGetMemHandle(ptr))
    print(bytes(b & 0xFF for b in handle.reserved).hex(), flush=True)
    sys.stdin.readline()  # keep the allocation alive until the test is done
    ok(rt.cudaFree(ptr))
    """
)


@pytest.fixture
def cuda_pool() -> Iterator[str]:
    """A device pool exported by another process (CUDA IPC cannot be opened by its exporter)."""
    pytest.importorskip("cuda")
    try:
        pools.load_cudart()
    except ImportError:
        pytest.skip("cuda-python runtime bindings not importable")
    if pools.cuda_device_count() == 0:
        pytest.skip("no CUDA GPU visible")
    child = subprocess.Popen(
        [sys.executable, "-c", _EXPORTER, str(DEVICE_BLOCKS * BLOCK_BYTES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert len(line) == 128, f"exporter failed: {line!r}"
        yield "cuda-ipc:" + line
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)


@pytest.mark.gpu
def test_cuda_engine_round_trips_through_pinned_host_pool(cuda_pool: str) -> None:
    from swap_daemon.copier import CudaCopyEngine

    expected = (np.arange(DEVICE_BLOCKS * BLOCK_BYTES, dtype=np.uint64) * 7 % 251).astype(np.uint8)
    expected = expected.reshape(DEVICE_BLOCKS, BLOCK_BYTES)
    eng = CudaCopyEngine(num_host_blocks=HOST_BLOCKS, workers=2)
    try:
        eng.attach(AttachSpec(cuda_pool, DEVICE_BLOCKS, BLOCK_BYTES, LAYERS), owner="gpu")
        out = eng.swap(Direction.OUT, [BlockRun(0, 0, 4), BlockRun(10, 4, 2)], Granularity.RUN)
        assert (out.copy_calls, out.bytes) == (2, 6 * BLOCK_BYTES)
        np.testing.assert_array_equal(eng.host_view[0:4], expected[0:4])
        np.testing.assert_array_equal(eng.host_view[4:6], expected[10:12])
        # New bytes on the host go in per layer, then come back out per block somewhere else.
        eng.host_view[8:12] = np.random.default_rng(1).integers(0, 256, (4, BLOCK_BYTES), dtype=np.uint8)
        back = eng.swap(Direction.IN, [BlockRun(20, 8, 4)], Granularity.BLOCK_LAYER)
        assert back.copy_calls == 4 * 2 * LAYERS
        again = eng.swap(Direction.OUT, [BlockRun(20, 16, 4)], Granularity.BLOCK)
        assert again.copy_calls == 4
        np.testing.assert_array_equal(eng.host_view[16:20], eng.host_view[8:12])
        with pytest.raises(SwapRejected):
            eng.swap(Direction.IN, [BlockRun(DEVICE_BLOCKS, 0, 1)], Granularity.RUN)
        eng.detach("gpu")
    finally:
        eng.close()


@pytest.mark.gpu
def test_auto_backend_picks_cuda_when_a_gpu_is_visible() -> None:
    pytest.importorskip("cuda")
    if pools.cuda_device_count() == 0:
        pytest.skip("no CUDA GPU visible")
    eng = make_engine("auto", num_host_blocks=4, workers=1)
    try:
        assert eng.backend == "cuda"
    finally:
        eng.close()


# --- between daemons: a migrating request's KV pulled from another daemon's host pool ------------------


def serve_two_and_run(engines: tuple[CpuCopyEngine, CpuCopyEngine], body: Callable[..., object]) -> None:
    """Two daemons on free ports: `body(stub_a, stub_b, addr_a)`; b pulls from a by `addr_a`."""
    from swap_daemon.server import SwapDaemonServicer

    async def main() -> None:
        hosts, servicers = [], []
        for engine in engines:
            host = ServiceHost("127.0.0.1:0", [SERVICE])
            servicer = SwapDaemonServicer(engine)
            swap_pb2_grpc.add_SwapDaemonServicer_to_server(servicer, host.server)
            await host.server.start()
            hosts.append(host)
            servicers.append(servicer)
        addr_a = f"127.0.0.1:{hosts[0].port}"
        try:
            async with (
                grpc.aio.insecure_channel(addr_a) as a,
                grpc.aio.insecure_channel(f"127.0.0.1:{hosts[1].port}") as b,
            ):
                stubs = swap_pb2_grpc.SwapDaemonStub(a), swap_pb2_grpc.SwapDaemonStub(b)
                await asyncio.wait_for(body(*stubs, addr_a), timeout=15)  # type: ignore[arg-type]
        finally:
            for host, servicer in zip(hosts, servicers, strict=True):
                await host.server.stop(None)
                servicer.close()

    asyncio.run(main())


def pull(
    swap_id: int, source_addr: str, source: list[tuple[int, int]], dest: list[tuple[int, int]]
) -> swap_pb2.SwapCommand:
    ranges = [swap_pb2.HostRange(start=s, num_blocks=n) for s, n in source]
    into = [swap_pb2.HostRange(start=s, num_blocks=n) for s, n in dest]
    return swap_pb2.SwapCommand(swap_id=swap_id, pull=swap_pb2.Pull(source_addr=source_addr, ranges=ranges, dest=into))


def test_a_daemon_pulls_another_daemons_host_blocks_byte_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from swap_daemon import server

    monkeypatch.setattr(server, "PIECE_BYTES", 1000)  # pieces that straddle blocks (a block is 1536 bytes)
    pool_a, pool_b = ShmPool(seed=1), ShmPool(seed=2)
    engines = CpuCopyEngine(HOST_BLOCKS, workers=1), CpuCopyEngine(HOST_BLOCKS, workers=1)

    async def body(a: swap_pb2_grpc.SwapDaemonStub, b: swap_pb2_grpc.SwapDaemonStub, addr_a: str) -> None:
        sa, sb = Stream(a), Stream(b)
        sa.send(attach_msg(pool_a))
        sa.send(command(1, OUT, [(0, 3, 2), (5, 9, 3)]))  # a request's 5 blocks on a's host: 3, 4, 9, 10, 11
        assert (await sa.recv()).ok
        sb.send(attach_msg(pool_b))
        sb.send(pull(2, addr_a, [(3, 2), (9, 3)], [(20, 1), (0, 4)]))  # into b's host: 20, 0, 1, 2, 3
        done = await sb.recv()
        assert (done.swap_id, done.ok, done.error) == (2, True, "")
        assert done.bytes == 5 * BLOCK_BYTES and done.copy_calls == 4 + 5  # pieces: each range is cut apart
        sb.send(command(3, IN, [(10, 20, 1), (11, 0, 4)]))  # and onto b's device: 10..14
        assert (await sb.recv()).ok
        # Errors fail that command only, and say what was wrong.
        sb.send(pull(4, addr_a, [(3, 2)], [(0, 3)]))
        sb.send(pull(5, addr_a, [(HOST_BLOCKS - 1, 2)], [(0, 2)]))
        sb.send(pull(6, "127.0.0.1:1", [(3, 1)], [(0, 1)]))
        sb.send(pull(7, addr_a, [(3, 1)], [(HOST_BLOCKS, 1)]))
        failed = {d.swap_id: d for d in [await sb.recv() for _ in range(4)]}
        assert not any(d.ok for d in failed.values())
        assert "same number of blocks" in failed[4].error
        assert "INVALID_ARGUMENT" in failed[5].error and "outside the host pool" in failed[5].error
        assert "pull from 127.0.0.1:1 failed: UNAVAILABLE" in failed[6].error
        assert "outside the host pool" in failed[7].error
        for s in (sa, sb):
            s.close()
            assert await s.recv() is grpc.aio.EOF

    try:
        expected = np.concatenate([pool_a.view[0:2], pool_a.view[5:8]])
        serve_two_and_run(engines, body)
        np.testing.assert_array_equal(pool_b.view[10:15], expected)
    finally:
        pool_a.close()
        pool_b.close()


def test_reading_host_blocks_is_refused_before_a_host_pool_exists_and_outside_it(device: ShmPool) -> None:
    async def body(stub: swap_pb2_grpc.SwapDaemonStub) -> None:
        request = swap_pb2.ReadHostBlocksRequest(ranges=[swap_pb2.HostRange(start=0, num_blocks=1)])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [piece async for piece in stub.ReadHostBlocks(request, timeout=5)]
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        s = Stream(stub)
        s.send(attach_msg(device))
        s.send(command(1, OUT, [(0, 0, 1)]))
        assert (await s.recv()).ok
        pieces = [p.data async for p in stub.ReadHostBlocks(request, timeout=5)]
        assert b"".join(pieces) == device.view[0].tobytes()
        outside = swap_pb2.ReadHostBlocksRequest(ranges=[swap_pb2.HostRange(start=HOST_BLOCKS, num_blocks=1)])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [piece async for piece in stub.ReadHostBlocks(outside, timeout=5)]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        s.close()

    serve_and_run(CpuCopyEngine(num_host_blocks=HOST_BLOCKS, workers=1), body)


def test_a_pull_between_pools_of_different_block_sizes_fails_and_says_why() -> None:
    pool_a, pool_b = ShmPool(), ShmPool(block_bytes=2 * BLOCK_BYTES)
    engines = CpuCopyEngine(HOST_BLOCKS, workers=1), CpuCopyEngine(HOST_BLOCKS, workers=1)

    async def body(a: swap_pb2_grpc.SwapDaemonStub, b: swap_pb2_grpc.SwapDaemonStub, addr_a: str) -> None:
        sa, sb = Stream(a), Stream(b)
        sa.send(attach_msg(pool_a))
        sa.send(command(1, OUT, [(0, 0, 2)]))
        assert (await sa.recv()).ok
        sb.send(swap_pb2.SwapCommand(attach=swap_pb2.Attach(
            pool_handle=pool_b.handle, num_device_blocks=DEVICE_BLOCKS, block_bytes=2 * BLOCK_BYTES, num_layers=LAYERS
        )))  # fmt: skip
        sb.send(pull(2, addr_a, [(0, 2)], [(0, 2)]))
        done = await sb.recv()
        assert not done.ok and "same size" in done.error
        for s in (sa, sb):
            s.close()

    try:
        serve_two_and_run(engines, body)
    finally:
        pool_a.close()
        pool_b.close()
