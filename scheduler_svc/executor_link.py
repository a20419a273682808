"""The link to the executor: the step loop over one Execute stream, and what happens when a step breaks.

One step is in flight at a time: schedule -> send the step's copies to the swap daemon -> send the
plan -> await the result -> apply it -> hand the new tokens to the request front. Client calls touch
the scheduler only between steps, on the event loop, so no block can be reused while a step that
writes it runs.

Faults are judged in one place, `on_fault`. Either way the executor has forgotten its requests, so
every request whose KV was on the device is requeued to recompute from its tokens.
- A *failing* executor answered the step INTERNAL (the model raised): it is alive, so the step is
  replayed on a new stream. The same failure on the same requests twice in a row fails those requests
  with INTERNAL (`StepFailed`); the others carry on.
- A *lost* executor (stream closed, UNAVAILABLE, or a step longer than `step_timeout_s`): health goes
  NOT_SERVING, the link waits for an executor to come back (backing off), attaches the swap daemon to
  the new executor's pool, and replays.
Requests fail with UNAVAILABLE only when no step has succeeded for `executor_timeout_s`. Retries back
off, so neither fault is a storm.

An executor, its swap daemon and their pools make one node; this link and its `SwapDaemonLink` drive one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from fastswitch.v1 import executor_pb2, executor_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler, TokenEvent
from scheduler_svc.swap_manager import SwapOrder
from scheduler_svc.swapd_link import DESCRIBE_DEADLINE_S, SwapDaemonLink
from svc_common.errors import ServingError, Unavailable
from svc_common.plan import StepOutput, StepPlan
from svc_common.server import link_channel

log = structlog.get_logger(__name__)

RETRY_DELAY_S = 0.5
RECONNECT_BACKOFF_S = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0)  # after the 1st, 2nd, ... fault without a good step
FAILED_STEP = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)  # the executor ran the step and it failed


class StepFailed(ServingError):
    """The model step failed the same way twice: the requests in it end with this error (INTERNAL)."""


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class ExecutorLink:
    """Drives one executor (and the swap daemon beside it) for the scheduler.

    `on_tokens(events, produced_unix_ns)` receives each step's sampled tokens; `on_fail(request_ids,
    error)` ends requests with an error (`None`: every live request); `on_attached(bool)` says whether
    an executor is attached (health)."""

    def __init__(
        self,
        config: SchedulerConfig,
        on_tokens: Callable[[list[TokenEvent], int], None],
        on_fail: Callable[[list[str] | None, ServingError], None],
        on_plan: Callable[[StepPlan], None] | None = None,
        on_attached: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.info: executor_pb2.ExecutorInfo | None = None
        self.scheduler: Scheduler | None = None
        self.swapd: SwapDaemonLink | None = None
        self._on_tokens = on_tokens
        self._on_fail = on_fail
        self._on_plan = on_plan or (lambda plan: None)
        self._on_attached = on_attached
        self._step_ids: list[str] = []  # the requests in the step in flight
        self._last_failure: tuple[str, frozenset[str]] | None = None  # a failed step's error and requests
        self._faults_in_a_row = 0
        self._lost_since: float | None = None  # when steps stopped succeeding
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._stub: executor_pb2_grpc.ExecutorStub | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    async def connect(self) -> executor_pb2.ExecutorInfo:
        """Describe the executor, waiting up to `executor_timeout_s` for it to be ready."""
        self._channel = link_channel(self.config.executor_addr, self.config.link_tls_ca)
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
            self.swapd = SwapDaemonLink(
                self.config.swapd_addr, scheduler, on_change=self.wake, tls_ca=self.config.link_tls_ca
            )
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
        assert self._stub is not None
        await self._attached(True)
        while True:
            call = self._stub.Execute()
            try:
                await self.drive(call)
            except grpc.aio.AioRpcError as err:
                call.cancel()
                await self.on_fault(err)

    # -- faults -----------------------------------------------------------------------------------

    async def on_fault(self, err: grpc.aio.AioRpcError) -> None:
        """A step broke: classify it (failing or lost executor) and decide retry, failing requests, or
        reconnecting. Returns when a new stream may be opened."""
        sched = self.scheduler
        assert sched is not None
        self._faults_in_a_row += 1
        self._lost_since = self._lost_since or time.monotonic()
        sched.on_executor_lost()  # either way the executor forgot its requests: they recompute
        if err.code() in FAILED_STEP:  # failing: alive, the model raised; replay, fail a repeat
            sched.stats.count("failed_steps")
            self._fail_repeated_step(err.details() or err.code().name)
            self._fail_if_lost_too_long()  # failures that never repeat exactly still end
            await asyncio.sleep(self._backoff())
            return
        log.warning("executor_lost", code=err.code().name, details=err.details())  # lost: reconnect
        sched.stats.count("executor_reconnects")
        await self._attached(False)
        await asyncio.sleep(self._backoff())
        await self._await_executor()
        await self._attached(True)
        if self.swapd is not None:
            assert self.info is not None
            await self.swapd.restart(self.info)

    def _fail_repeated_step(self, details: str) -> None:
        """Once: the step is replayed, it may pass. The same failure on the same requests twice in a row:
        those requests fail with INTERNAL, the others carry on."""
        in_step = frozenset(self._step_ids)
        last = self._last_failure
        again = last is not None and last[0] == details and bool(in_step & last[1])
        log.warning("step_failed", details=details, requests=len(in_step), again=again)
        if not again:
            self._last_failure = (details, in_step)
            return
        self._last_failure = None
        self._on_fail(
            sorted(in_step),
            StepFailed(f"the model step failed twice with the same error, so this request was stopped: {details}"),
        )

    def _on_step_done(self) -> None:
        self._lost_since, self._faults_in_a_row, self._last_failure = None, 0, None

    def _backoff(self) -> float:
        return RECONNECT_BACKOFF_S[min(self._faults_in_a_row - 1, len(RECONNECT_BACKOFF_S) - 1)]

    def _fail_if_lost_too_long(self) -> None:
        """Fail every live request once no step has succeeded for `executor_timeout_s`; requests that
        arrive later get their own `executor_timeout_s`."""
        now = time.monotonic()
        if self._lost_since is not None and now - self._lost_since > self.config.executor_timeout_s:
            self._lost_since = now
            self._on_fail(
                None,
                Unavailable(
                    f"no executor has completed a step for {self.config.executor_timeout_s:g}s "
                    "(--executor-timeout); the request could not be completed"
                ),
            )

    async def _attached(self, attached: bool) -> None:
        if self._on_attached is not None:
            await self._on_attached(attached)

    async def _await_executor(self) -> None:
        assert self._stub is not None and self.info is not None
        while True:
            self._fail_if_lost_too_long()
            try:
                info = await self._stub.Describe(executor_pb2.DescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if (info.num_blocks, info.block_size) != (self.info.num_blocks, self.info.block_size):
                log.error("executor_geometry_changed", old=self.info.num_blocks, new=info.num_blocks)
            self.info = info
            log.info("executor_reattached", pool=info.pool_handle)
            return

    # -- the step loop ----------------------------------------------------------------------------

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
            self._step_ids = [c.request_id for c in plan.chunks]
            await call.write(plan.to_proto())
            try:
                result = await asyncio.wait_for(call.read(), self.config.step_timeout_s)
            except TimeoutError:  # a hung step: the executor counts as lost
                sched.stats.count("step_timeouts")
                raise _unavailable(f"a step took longer than --step-timeout {self.config.step_timeout_s:g}s") from None
            if result is grpc.aio.EOF:
                raise _unavailable("executor closed")
            self._on_step_done()
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
