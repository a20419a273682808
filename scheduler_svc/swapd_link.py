"""The link to the swap daemon beside the executor: one Swap stream, the scheduler's copies out, their
completions back.

The stream opens by attaching the daemon to the executor's KV pool; the daemon's host pool then
becomes the scheduler's. Every copy the scheduler decides is sent as a SwapCommand (`send`), and each
SwapDone, in whatever order copies finish, is applied to the scheduler as it arrives (`on_done`).
When the stream breaks the daemon is lost: the scheduler recomputes whatever depended on it, and
the link reconnects. A new executor has a new pool: the node starts a new link for it, once the old
one has stopped (the daemon accepts the new attachment only after the old stream's copies ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from fastswitch.v1 import executor_pb2, swap_pb2, swap_pb2_grpc
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.swap_manager import SwapOrder
from svc_common.server import link_channel
from svc_common.swap import Direction, Pull, host_ranges

log = structlog.get_logger(__name__)

DESCRIBE_DEADLINE_S = 10.0
RECONNECT_DELAY_S = 1.0


def _command(order: SwapOrder) -> swap_pb2.SwapCommand:
    if order.direction is Direction.PULL:  # another node's host blocks into this daemon's host pool
        assert order.source is not None
        pull = Pull(order.source_addr, host_ranges(order.source.blocks), host_ranges(order.host_blocks))
        return swap_pb2.SwapCommand(swap_id=order.swap_id, pull=pull.to_proto())
    return swap_pb2.SwapCommand(
        swap_id=order.swap_id,
        direction=order.direction.to_proto(),
        runs=[run.to_proto() for run in order.runs],
        granularity=order.granularity.to_proto(),
    )


class SwapDaemonLink:
    """One Swap stream to the daemon at `addr`, applying completions to `scheduler`.

    `on_change` is called whenever a copy lands or fails (the step loop may have work again); with
    `tls_ca` the stream uses TLS, verified against that CA."""

    def __init__(self, addr: str, scheduler: Scheduler, on_change: Callable[[], None], tls_ca: str = "") -> None:
        self.addr = addr
        self.tls_ca = tls_ca
        self.scheduler = scheduler
        self.landed = asyncio.Event()  # set whenever a copy ends (or the daemon is lost)
        self._on_change = on_change
        self._call: Any = None  # the attached stream, or None
        self._task: asyncio.Task[None] | None = None

    def start(self, info: executor_pb2.ExecutorInfo, after: Awaitable[None] | None = None) -> None:
        """Connect (and keep reconnecting) to the daemon, attaching it to the pool `info` describes
        (once `after`, the previous link's stop, is done)."""
        self._task = asyncio.create_task(self._run(info, after), name="swap-link")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._call = None

    def on_attached(self, call: Any, num_host_blocks: int) -> None:
        """The stream `call` is attached: the daemon's host pool is the scheduler's from now on."""
        self._call = call
        self.scheduler.attach_host_pool(num_host_blocks)
        log.info("swap_daemon_attached", addr=self.addr, host_blocks=num_host_blocks)

    def on_done(self, done: swap_pb2.SwapDone) -> None:
        if not done.ok:
            log.warning("swap_failed", swap_id=done.swap_id, error=done.error)
        self.scheduler.on_swap_done(
            done.swap_id,
            done.ok,
            bytes_moved=done.bytes,
            copy_calls=done.copy_calls,
            copy_s=done.duration_ns / 1e9,
        )
        self._changed()

    async def send(self, orders: list[SwapOrder]) -> None:
        """Send copies to the daemon; without one (or if the stream breaks) they fail: recompute."""
        for order in orders:
            call = self._call
            if call is None:
                self.scheduler.on_swap_done(order.swap_id, ok=False)
                continue
            command = _command(order)
            try:
                await call.write(command)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
                self.scheduler.on_swap_done(order.swap_id, ok=False)

    async def wait(self, swap_ids: set[int]) -> None:
        """Synchronous swaps (vllm-like): the step waits until these copies land, the stall that mode pays."""
        start = time.perf_counter()
        while any(self.scheduler.swaps.in_flight(swap_id) is not None for swap_id in swap_ids):
            self.landed.clear()
            await self.landed.wait()
        self.scheduler.stats.count("swap_stall_s", time.perf_counter() - start)

    async def _run(self, info: executor_pb2.ExecutorInfo, after: Awaitable[None] | None) -> None:
        if after is not None:
            await after
        channel = link_channel(self.addr, self.tls_ca)
        stub = swap_pb2_grpc.SwapDaemonStub(channel)
        try:
            while True:
                try:
                    await self._serve(stub, info)
                except grpc.aio.AioRpcError as err:
                    if self._call is not None or self.scheduler.swaps.host is not None:
                        log.warning("swap_daemon_lost", code=err.code().name, details=err.details())
                    self._lost()
                    await asyncio.sleep(RECONNECT_DELAY_S)
                    if self.scheduler.expire_quarantine():
                        self._changed()
        finally:
            await channel.close()

    async def _serve(self, stub: swap_pb2_grpc.SwapDaemonStub, info: executor_pb2.ExecutorInfo) -> None:
        """Attach, then apply completions until the stream ends (which raises: the daemon is lost)."""
        daemon = await stub.Describe(swap_pb2.SwapDescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
        call = stub.Swap()
        attach = swap_pb2.Attach(
            pool_handle=info.pool_handle,
            num_device_blocks=info.num_blocks,
            block_bytes=info.block_bytes,
            num_layers=info.num_layers,
        )
        await call.write(swap_pb2.SwapCommand(attach=attach))
        self.on_attached(call, daemon.num_host_blocks)
        async for done in call:
            self.on_done(done)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "swap stream ended"
        )

    def _lost(self) -> None:
        self._call = None
        if self.scheduler.swaps.host is not None:
            self.scheduler.on_swap_daemon_lost()
            self._changed()

    def _changed(self) -> None:
        self.landed.set()
        self._on_change()
