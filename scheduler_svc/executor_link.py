"""The link to the executor: the step loop over one Execute stream, and reconnection.

One step is in flight at a time: schedule -> send the step's copies to the swap daemon -> send the
plan -> await the result -> apply it -> hand the new tokens to the request front. Client calls touch
the scheduler only between steps, on the event loop, so no block can be reused while a step that
writes it runs. If the stream breaks, every request whose KV was on the device is requeued to
recompute from its tokens. The link then waits for an executor to come back, failing the live
requests after `executor_timeout_s`, and attaches the swap daemon to the new executor's pool.

An executor, its swap daemon and their pools make one node; this link and its `SwapDaemonLink` drive one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import grpc
import structlog

from fastswitch.v1 import executor_pb2, executor_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler, TokenEvent
from scheduler_svc.swap_manager import SwapOrder
from scheduler_svc.swapd_link import DESCRIBE_DEADLINE_S, SwapDaemonLink
from svc_common.errors import Unavailable
from svc_common.plan import StepOutput, StepPlan
from svc_common.server import CHANNEL_OPTIONS

log = structlog.get_logger(__name__)

RETRY_DELAY_S = 0.5


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class ExecutorLink:
    """Drives one executor (and the swap daemon beside it) for the scheduler.

    `on_tokens(events, produced_unix_ns)` receives each step's sampled tokens; `on_gone(message)` is
    called while no executor has come back for longer than `executor_timeout_s`."""

    def __init__(
        self,
        config: SchedulerConfig,
        on_tokens: Callable[[list[TokenEvent], int], None],
        on_gone: Callable[[str], None],
        on_plan: Callable[[StepPlan], None] | None = None,
    ) -> None:
        self.config = config
        self.info: executor_pb2.ExecutorInfo | None = None
        self.scheduler: Scheduler | None = None
        self.swapd: SwapDaemonLink | None = None
        self._on_tokens = on_tokens
        self._on_gone = on_gone
        self._on_plan = on_plan or (lambda plan: None)
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._stub: executor_pb2_grpc.ExecutorStub | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def connect(self) -> executor_pb2.ExecutorInfo:
        """Describe the executor, waiting up to `executor_timeout_s` for it to be ready."""
        self._channel = grpc.aio.insecure_channel(self.config.executor_addr, options=CHANNEL_OPTIONS)
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        deadline = time.monotonic() + self.config.executor_timeout_s
        while True:
            try:
                self.info = await self._stub.Describe(executor_pb2.DescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
                return self.info
            except grpc.aio.AioRpcError as err:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"executor at {self.config.executor_addr} not ready after "
                        f"{self.config.executor_timeout_s:.0f}s: {err.details()}"
                    ) from err
                await asyncio.sleep(RETRY_DELAY_S)

    def run(self, scheduler: Scheduler) -> None:
        """Start the step loop (and the swap daemon link, if there is a daemon to swap with)."""
        assert self.info is not None, "connect() first"
        self.scheduler = scheduler
        if self.config.swapd_addr and self.config.preemption != "recompute":
            self.swapd = SwapDaemonLink(self.config.swapd_addr, scheduler, on_change=self.wake)
            self.swapd.start(self.info)
        self._task = asyncio.create_task(self._run(), name="step-loop")

    def wake(self) -> None:
        """Something changed (a request, a priority, a copy): the loop looks for work again."""
        self._wake.set()

    async def stop(self) -> None:
        if self.swapd is not None:
            await self.swapd.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        assert self._stub is not None and self.scheduler is not None
        while True:
            call = self._stub.Execute()
            try:
                await self.drive(call)
            except grpc.aio.AioRpcError as err:
                call.cancel()
                lost_since = time.monotonic()
                log.warning("executor_lost", code=err.code().name, details=err.details())
                self.scheduler.on_executor_lost()
                self.scheduler.stats.count("executor_reconnects")
                await self._await_executor(lost_since)
                if self.swapd is not None:
                    assert self.info is not None
                    await self.swapd.restart(self.info)

    async def _await_executor(self, lost_since: float) -> None:
        assert self._stub is not None and self.info is not None
        while True:
            try:
                info = await self._stub.Describe(executor_pb2.DescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
            except grpc.aio.AioRpcError:
                if time.monotonic() - lost_since > self.config.executor_timeout_s:
                    self._on_gone("executor unavailable; the request could not be completed")
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if (info.num_blocks, info.block_size) != (self.info.num_blocks, self.info.block_size):
                log.error("executor_geometry_changed", old=self.info.num_blocks, new=info.num_blocks)
            self.info = info
            log.info("executor_reattached", pool=info.pool_handle)
            return

    async def drive(self, call: Any) -> None:
        """The step loop over one Execute stream; raises AioRpcError when the stream breaks."""
        sched = self.scheduler
        assert sched is not None
        while True:
            # Cleared before scheduling, never after an await: a copy landing while the orders are
            # being sent must wake the next iteration, not be forgotten (that was a hang).
            self._wake.clear()
            plan = sched.schedule()
            orders = sched.take_swap_orders()
            if orders:
                await self._send_swaps(orders)
            if plan is None:
                stalled = sched.swaps.num_in_flight > 0
                start = time.perf_counter()
                await self._wake.wait()
                if stalled:
                    sched.stats.count("swap_stall_s", time.perf_counter() - start)
                continue
            self._on_plan(plan)
            await call.write(plan.to_proto())
            result = await call.read()
            if result is grpc.aio.EOF:
                raise _unavailable("executor closed")
            produced_ns = time.time_ns()
            output = StepOutput.from_proto(result)
            sched.stats.count("forward_s", output.forward_ns / 1e9)
            sched.stats.count("sample_s", output.sample_ns / 1e9)
            self._on_tokens(sched.on_step_output(output), produced_ns)

    async def _send_swaps(self, orders: list[SwapOrder]) -> None:
        sched = self.scheduler
        assert sched is not None
        if self.swapd is None:
            for order in orders:  # no daemon: the copies fail, their requests recompute
                sched.on_swap_done(order.swap_id, ok=False)
            return
        await self.swapd.send(orders)
        if self.config.swaps_stall:
            await self.swapd.wait({o.swap_id for o in orders})
