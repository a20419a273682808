"""The link to one node's executor: the node's step loop over one Execute stream, and what happens when
a step breaks.

One step is in flight at a time per node: schedule -> send the step's copies to the swap daemon ->
send the plan -> await the result -> apply it -> hand the new tokens to the request front -> let the
fleet move what this node passed over. Client calls touch the schedulers only between steps, on the
event loop, so no block can be reused while a step that writes it runs.

Faults are judged in one place, `on_fault`. Either way the executor has forgotten its requests.
- A *failing* executor answered the step INTERNAL (the model raised): it is alive, so its requests
  recompute on this node and the step is replayed on a new stream. The same failure on the same
  requests twice in a row fails those requests with INTERNAL (`StepFailed`); the others carry on.
- A *lost* executor (stream closed, UNAVAILABLE, or a step longer than `step_timeout_s`): the node is
  down; the KV on its device and (the daemon's mapping of the pool being gone with it) on its host is
  forgotten, and the fleet moves its requests to the nodes that are up, where they recompute from their
  tokens. With no other node up they stay and replay here once the executor is back. The link keeps
  trying the executor (backing off); once it answers, the swap daemon is attached to its new pool and
  the node takes work again. Health is NOT_SERVING while no node is up.
Requests still on a node fail with UNAVAILABLE only when it has completed no step for
`executor_timeout_s`. Retries back off, so neither fault is a storm.

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
from scheduler_svc.fleet import Fleet, Node
from scheduler_svc.scheduler import Scheduler, TokenEvent
from scheduler_svc.sequence import Sequence
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
    """Drives one node of the fleet: its executor's step loop, and the swap daemon beside it.

    `on_tokens(node, events, produced_unix_ns)` receives each step's sampled tokens; `on_fail(request_ids,
    error)` ends requests of this node with an error; `on_attached(bool)` says whether this node's executor
    is attached (the request front turns it into health across the fleet)."""

    def __init__(
        self,
        config: SchedulerConfig,
        fleet: Fleet,
        node: Node,
        on_tokens: Callable[[Node, list[TokenEvent], int], None],
        on_fail: Callable[[list[str], ServingError], None],
        on_plan: Callable[[StepPlan], None] | None = None,
        on_attached: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.node = node
        self.info: executor_pb2.ExecutorInfo | None = None
        self.swapd: SwapDaemonLink | None = None
        self._on_tokens = on_tokens
        self._on_fail = on_fail
        self._on_plan = on_plan or (lambda plan: None)
        self._on_attached = on_attached
        self._step: tuple[StepPlan | None, list[Sequence]] = (None, [])  # the step in flight, its decodes' requests
        self._last_failure: tuple[str, frozenset[str]] | None = None  # a failed step's error and requests
        self._faults_in_a_row = 0
        self._lost_since: float | None = None  # when steps stopped succeeding
        self._wake = asyncio.Event()
        node.wake = self.wake
        self._channel: grpc.aio.Channel | None = None  # opened by start(), on the event loop
        self._stub: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def scheduler(self) -> Scheduler:
        assert self.node.scheduler is not None, "the node has not been attached yet"
        return self.node.scheduler

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Reach the executor (retrying until it is ready), then run the node's step loop."""
        if self._stub is None:
            self._channel = link_channel(self.node.address.executor, self.config.link_tls_ca)
            self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self._task = asyncio.create_task(self._run(), name=f"node-{self.node.index}")

    def wake(self) -> None:
        """Something changed (a request, a priority, a copy): the loop looks for work again."""
        self._wake.set()

    async def stop(self) -> None:
        if self.swapd is not None:
            await self.swapd.stop()
        task = self._task
        while task is not None and not task.done():
            # Again until it ends: Python 3.11's wait_for can swallow a cancellation that lands as the
            # step's read completes (the loop then went on, and stop() hung).
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        if self.info is None:  # (else attached already)
            self._attach(await self._describe())
        await self._attached(True)
        while True:
            call = self._stub.Execute()
            call.add_done_callback(lambda _: self.wake())  # an idle node notices its executor dying
            try:
                await self.drive(call)
            except grpc.aio.AioRpcError as err:
                call.cancel()
                await self.on_fault(err)
            except Exception as exc:  # noqa: BLE001 - a bug on this side of the step must not stop the node
                call.cancel()
                log.exception("step_loop_error", node=self.node.index)
                self.scheduler.stats.count("step_loop_errors")
                self._faults_in_a_row += 1
                self._lost_since = self._lost_since or time.monotonic()
                await self._replay(f"scheduler error: {type(exc).__name__}: {exc}")

    # -- faults -----------------------------------------------------------------------------------

    async def on_fault(self, err: grpc.aio.AioRpcError) -> None:
        """A step broke: classify it (failing or lost executor) and decide retry, failing requests, or
        reconnecting. Returns when a new stream may be opened."""
        self._faults_in_a_row += 1
        self._lost_since = self._lost_since or time.monotonic()
        if err.code() in FAILED_STEP:  # failing: alive, the model raised; replay here, fail a repeat
            self.scheduler.stats.count("failed_steps")
            await self._replay(err.details() or err.code().name)
            return
        log.warning("executor_lost", node=self.node.index, code=err.code().name, details=err.details())
        self._lost()
        await self._attached(False)
        await asyncio.sleep(self._backoff())
        self._attach(await self._describe())
        await self._attached(True)

    async def _replay(self, details: str) -> None:
        """A step failed, the node is alive (the model raised, or the scheduler's own step path did): its
        requests recompute on a new stream and the step is replayed; the same failure twice fails them."""
        self.scheduler.on_executor_lost()  # a new stream: the executor forgets its requests, they recompute
        self._fail_repeated_step(details)
        self._fail_if_lost_too_long()  # failures that never repeat exactly still end
        await asyncio.sleep(self._backoff())

    def _fail_repeated_step(self, details: str) -> None:
        """Once: the step is replayed, it may pass. The same failure on the same requests twice in a row:
        those requests fail with INTERNAL, the others carry on."""
        plan, decoding = self._step
        in_step = frozenset([c.request_id for c in plan.chunks] if plan else []) | {s.request_id for s in decoding}
        last = self._last_failure
        again = last is not None and last[0] == details and bool(in_step & last[1])
        log.warning("step_failed", node=self.node.index, details=details, requests=len(in_step), again=again)
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
        """Fail the requests still on this node once it has completed no step for `executor_timeout_s`
        (no other node took them); requests that arrive later get their own `executor_timeout_s`."""
        now = time.monotonic()
        if self._lost_since is not None and now - self._lost_since > self.config.executor_timeout_s:
            self._lost_since = now
            stranded = list(self.node.scheduler.requests) if self.node.scheduler is not None else []
            if stranded:
                self._on_fail(
                    stranded,
                    Unavailable(
                        f"executor {self.node.address.executor} has completed no step for "
                        f"{self.config.executor_timeout_s:g}s (--executor-timeout) and no other node took "
                        "the request; it could not be completed"
                    ),
                )

    async def _attached(self, attached: bool) -> None:
        if self._on_attached is not None:
            await self._on_attached(attached)

    async def _describe(self) -> executor_pb2.ExecutorInfo:
        """The executor's description, once it answers; while the node is lost for longer than
        `executor_timeout_s`, the requests it still holds fail."""
        while True:
            self._fail_if_lost_too_long()
            try:
                return await self._stub.Describe(executor_pb2.DescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(RETRY_DELAY_S)

    def _attach(self, info: executor_pb2.ExecutorInfo) -> None:
        """The executor answers: the node's scheduler covers its pool, the swap daemon is attached to
        that pool, and the node takes work."""
        new_pool = self.info is not None and info.pool_handle != self.info.pool_handle
        self.info = info
        sched = self.fleet.attach(self.node, info.num_blocks, info.block_size)
        self.node.pid = info.pid
        if new_pool:  # no copy of the old daemon stream can touch this pool
            sched.swaps.release_quarantine()
        log.info(
            "executor_attached",
            node=self.node.index,
            executor=self.node.address.executor,
            blocks=info.num_blocks,
            block_size=info.block_size,
            pid=info.pid,
        )
        old = self.swapd
        if self.node.address.swapd and self.config.preemption != "recompute":
            self.swapd = SwapDaemonLink(
                self.node.address.swapd, sched, on_change=self.wake, tls_ca=self.config.link_tls_ca
            )
            self.swapd.start(info, after=old.stop() if old is not None else None)
        self.fleet.node_up(self.node)
        self.wake()

    def _lost(self) -> None:
        """The executor is gone and the device KV with it; the daemon's mapping of that pool too (it is
        re-attached to the next one), so host copies are forgotten: the fleet moves the requests."""
        sched = self.scheduler
        sched.on_executor_lost()
        if sched.swaps.host is not None:
            sched.on_swap_daemon_lost()
        sched.stats.count("executor_reconnects")
        self.fleet.node_lost(self.node)  # its requests move to the nodes up (or wait here for the executor)

    # -- the step loop ----------------------------------------------------------------------------

    async def drive(self, call: Any) -> None:
        """The step loop over one Execute stream; raises AioRpcError when the stream breaks."""
        sched = self.scheduler
        fleet = self.fleet
        while True:
            # Cleared before scheduling, never after an await: a copy landing while the orders are
            # being sent must wake the next iteration, not be forgotten (that was a hang).
            self._wake.clear()
            if call.done():
                raise _unavailable("the executor's stream ended")
            plan = None
            if not sched.in_flight:  # (the walk runs only with no step in flight: Scheduler.plan_ahead)
                plan = sched.schedule()
                if sched.passed_over:
                    fleet.balance()
            orders = sched.take_swap_orders()  # (with steps in flight too: a finished turn's KV spilled)
            if orders:
                await self._send_swaps(orders)
            if not sched.in_flight:
                fleet.balance()  # an idle node takes what others passed over
                stalled = sched.swaps.num_in_flight > 0
                start = time.perf_counter()
                await self._wake.wait()
                if stalled:
                    sched.stats.count("swap_stall_s", time.perf_counter() - start)
                continue
            if plan is not None:
                self._on_plan(plan)
                await call.write(plan.to_proto())
            ahead = sched.plan_ahead()  # the next decode step, sent while this one runs
            if ahead is not None:
                await call.write(ahead.to_proto())
            oldest = sched.in_flight[0]
            self._step = (oldest.plan, oldest.decoding)
            try:
                result = await asyncio.wait_for(call.read(), self.config.step_timeout_s)
            except TimeoutError:  # a hung step: the executor counts as lost
                sched.stats.count("step_timeouts")
                raise _unavailable(f"a step took longer than --step-timeout {self.config.step_timeout_s:g}s") from None
            if result is grpc.aio.EOF:
                raise _unavailable("executor closed")
            produced_ns = time.time_ns()
            output = StepOutput.from_proto(result)
            sched.stats.count("forward_s", output.forward_ns / 1e9)
            sched.stats.count("sample_s", output.sample_ns / 1e9)
            self.node.steps += 1
            self._on_tokens(self.node, sched.on_step_output(output), produced_ns)
            self._on_step_done()  # (after the output is applied: an error applying it is a failed step too)

    async def _send_swaps(self, orders: list[SwapOrder]) -> None:
        sched = self.scheduler
        if self.swapd is None:
            for order in orders:  # no daemon: the copies fail, their requests recompute
                sched.on_swap_done(order.swap_id, ok=False)
            return
        await self.swapd.send(orders)
        if self.config.swaps_stall:
            await self.swapd.wait({o.swap_id for o in orders})
