"""Thin grpc.aio adapter: SwapCommand protos in, `CopyEngine.swap` in worker threads, SwapDone out.

One `Swap` stream is one attachment. Commands on it run concurrently (copies happen in threads, never
on the event loop) and their completions are streamed back in completion order. When the stream ends,
for whatever reason, in-flight copies are waited for and then the device pool is unmapped.

Between daemons (a request migrating from one node to another through the host tier): a `Pull` command
makes this daemon read host blocks from another daemon (`ReadHostBlocks`, a stream of byte pieces) into
its own host pool. The scheduler holds both ends' blocks until the pull's SwapDone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

from fastswitch.v1 import swap_pb2, swap_pb2_grpc
from svc_common.errors import InvalidArgument, Unavailable
from svc_common.server import link_channel
from svc_common.swap import BlockRun, Direction, Granularity, HostRange, Pull
from swap_daemon.copier import AttachSpec, CopyEngine, SwapRejected, SwapResult

log = structlog.get_logger(__name__)

PIECE_BYTES = 1 << 20  # ReadHostBlocks streams host bytes in pieces of this size (well under gRPC's message cap)
PULL_DEADLINE_S = 300.0  # a pull that has not finished by then fails (its request recomputes)


def _to_domain(cmd: swap_pb2.SwapCommand) -> tuple[Direction, list[BlockRun], Granularity]:
    direction = Direction.from_proto(cmd.direction)
    if direction is None:
        raise SwapRejected(f"direction must be OUT or IN, got {cmd.direction}")
    granularity = Granularity.from_proto(cmd.granularity)
    if granularity is None:
        raise SwapRejected(f"unknown granularity {cmd.granularity}")
    runs = [BlockRun.from_proto(r) for r in cmd.runs]
    return direction, runs, granularity


def _direction_name(cmd: swap_pb2.SwapCommand) -> str | int:
    if cmd.HasField("pull"):
        return Direction.PULL.value
    direction = Direction.from_proto(cmd.direction)
    return direction.value if direction is not None else cmd.direction


class SwapDaemonServicer(swap_pb2_grpc.SwapDaemonServicer):
    def __init__(self, engine: CopyEngine | None = None, dispatch_threads: int = 8, link_tls_ca: str = "") -> None:
        self.engine = engine  # None until the daemon is ready (health is NOT_SERVING meanwhile)
        self.link_tls_ca = link_tls_ca  # verifies other daemons' certificates when pulling from them
        self._peers: dict[str, grpc.aio.Channel] = {}  # channels to other daemons, by address
        # Threads that run whole commands (each blocks until its copies land); the engine's own
        # memcpy workers / CUDA streams bound how much copying happens at once.
        self._dispatch = ThreadPoolExecutor(max_workers=dispatch_threads, thread_name_prefix="swapd-cmd")

    def close(self) -> None:
        """Stop the copy threads and the engine (process shutdown; peer channels close with the loop)."""
        self._dispatch.shutdown(wait=True)
        if self.engine is not None:
            self.engine.close()

    def _ready_engine(self) -> CopyEngine:
        if self.engine is None:
            raise Unavailable("the swap daemon is still starting")
        return self.engine

    async def Describe(
        self, request: swap_pb2.SwapDescribeRequest, context: grpc.aio.ServicerContext
    ) -> swap_pb2.SwapDaemonInfo:
        engine = self._ready_engine()
        return swap_pb2.SwapDaemonInfo(
            backend=engine.backend,
            num_host_blocks=engine.num_host_blocks,
            block_bytes=engine.block_bytes,
            attached=engine.attached,
        )

    async def ReadHostBlocks(
        self, request: swap_pb2.ReadHostBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swap_pb2.HostBlockData]:
        engine = self._ready_engine()
        slices = engine.host_slices([HostRange.from_proto(r) for r in request.ranges])  # checked before any byte
        for piece in engine.read_host(slices, PIECE_BYTES):
            yield swap_pb2.HostBlockData(data=piece)

    async def pull(self, pull: Pull) -> SwapResult:
        """Copy another daemon's host blocks into this host pool (a `Pull` command)."""
        engine = self._ready_engine()
        if sum(r.num_blocks for r in pull.source) != sum(r.num_blocks for r in pull.dest):
            raise SwapRejected("a pull's source and destination ranges must hold the same number of blocks")
        writer = engine.host_writer(pull.dest)
        channel = self._peers.get(pull.source_addr)
        if channel is None:
            channel = self._peers[pull.source_addr] = link_channel(pull.source_addr, self.link_tls_ca)
        request = swap_pb2.ReadHostBlocksRequest(ranges=[r.to_proto() for r in pull.source])
        pieces = 0
        async for piece in swap_pb2_grpc.SwapDaemonStub(channel).ReadHostBlocks(request, timeout=PULL_DEADLINE_S):
            writer.write(piece.data)
            pieces += 1
        writer.finish()
        return SwapResult(bytes=writer.written, copy_calls=pieces)

    async def Swap(
        self, request_iterator: AsyncIterator[swap_pb2.SwapCommand], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[swap_pb2.SwapDone]:
        stream = _SwapStream(self, self._ready_engine())
        async for done in stream.serve(request_iterator):
            yield done


class _SwapStream:
    """State of one Swap stream: its attachment, in-flight commands and the completion queue."""

    def __init__(self, servicer: SwapDaemonServicer, engine: CopyEngine) -> None:
        self.servicer = servicer
        self.engine = engine
        self.attached = False
        self.inflight: set[asyncio.Task[None]] = set()
        self.done: asyncio.Queue[swap_pb2.SwapDone | BaseException | None] = asyncio.Queue()

    async def serve(self, requests: AsyncIterator[swap_pb2.SwapCommand]) -> AsyncIterator[swap_pb2.SwapDone]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                item = await self.done.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            # Shielded: a cancelled RPC must still not unmap the pool under a running copy.
            await asyncio.shield(asyncio.ensure_future(self._drain_and_detach(reader)))

    async def _read(self, requests: AsyncIterator[swap_pb2.SwapCommand]) -> None:
        try:
            async for cmd in requests:
                received_ns = time.perf_counter_ns()
                if cmd.HasField("attach"):
                    await self._attach(cmd.attach)
                    if not cmd.runs:
                        continue
                task = asyncio.create_task(self._run(cmd, received_ns))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
            if self.inflight:
                await asyncio.wait(set(self.inflight))
            self.done.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the generator, which re-raises it
            self.done.put_nowait(exc)

    async def _attach(self, attach: swap_pb2.Attach) -> None:
        if self.attached:
            raise InvalidArgument("this stream is already attached; Attach goes on the first message only")
        spec = AttachSpec(attach.pool_handle, attach.num_device_blocks, attach.block_bytes, attach.num_layers)
        loop = asyncio.get_running_loop()
        geometry = await loop.run_in_executor(self.servicer._dispatch, self.engine.attach, spec, self)
        self.attached = True
        log.info(
            "attached",
            backend=self.engine.backend,
            pool=spec.pool_handle[:40],
            device_blocks=geometry.num_device_blocks,
            host_blocks=geometry.num_host_blocks,
            block_bytes=geometry.block_bytes,
            layers=geometry.num_layers,
        )

    async def _run(self, cmd: swap_pb2.SwapCommand, received_ns: int) -> None:
        done = swap_pb2.SwapDone(swap_id=cmd.swap_id, ok=True)
        try:
            if not self.attached:
                raise SwapRejected("no Attach on this stream yet: the first message must carry attach")
            if cmd.HasField("pull"):
                result = await self.servicer.pull(Pull.from_proto(cmd.pull))
            else:
                direction, runs, granularity = _to_domain(cmd)
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(
                    self.servicer._dispatch, self.engine.swap, direction, runs, granularity
                )
            done.bytes, done.copy_calls = result.bytes, result.copy_calls
        except (SwapRejected, InvalidArgument) as exc:
            done.ok, done.error = False, str(exc)
        except grpc.aio.AioRpcError as exc:  # a pull's source daemon failed or is gone
            done.ok, done.error = False, f"pull from {cmd.pull.source_addr} failed: {exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 - a failed copy fails this swap, not the stream
            log.exception("swap_failed", swap_id=cmd.swap_id)
            done.ok, done.error = False, f"copy failed: {type(exc).__name__}: {exc}"
        done.duration_ns = time.perf_counter_ns() - received_ns
        log.debug(
            "swap",
            swap_id=done.swap_id,
            direction=_direction_name(cmd),
            ok=done.ok,
            error=done.error or None,
            bytes=done.bytes,
            copy_calls=done.copy_calls,
            duration_us=done.duration_ns // 1000,
        )
        self.done.put_nowait(done)

    async def _drain_and_detach(self, reader: asyncio.Task[None]) -> None:
        await asyncio.gather(reader, return_exceptions=True)
        while self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)
        if self.attached:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.servicer._dispatch, self.engine.detach, self)
            self.attached = False
            log.info("detached", backend=self.engine.backend)
