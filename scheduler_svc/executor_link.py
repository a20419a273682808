"""The link to one node's executor: the node's step loop over one Execute stream, and reconnection.

One step is in flight at a time per node: schedule -> send the step's copies to the swap daemon ->
send the plan -> await the result -> apply it -> hand the new tokens to the request front -> let the
fleet move what this node passed over. Client calls touch the schedulers only between steps, on the
event loop, so no block can be reused while a step that writes it runs.

If the stream breaks, the node is lost: the KV on its device and (the daemon's mapping of the pool
being gone with it) on its host are forgotten, and the fleet moves its requests to the nodes that are
up, where they recompute from their tokens. The link keeps trying the executor; once it is back, the
swap daemon is attached to its new pool and the node takes work again. Requests still on the node
(no other node was up) fail after `executor_timeout_s`.

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
from scheduler_svc.fleet import Fleet, Node
from scheduler_svc.scheduler import Scheduler, TokenEvent
from scheduler_svc.swap_manager import SwapOrder
from scheduler_svc.swapd_link import DESCRIBE_DEADLINE_S, SwapDaemonLink
from svc_common.plan import StepOutput, StepPlan
from svc_common.server import CHANNEL_OPTIONS

log = structlog.get_logger(__name__)

RETRY_DELAY_S = 0.5


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class ExecutorLink:
    """Drives one node of the fleet: its executor's step loop, and the swap daemon beside it.

    `on_tokens(node, events, produced_unix_ns)` receives each step's sampled tokens; `on_gone(node,
    message)` is called while the node has been lost for longer than `executor_timeout_s` and still
    holds requests (no other node took them)."""

    def __init__(
        self,
        config: SchedulerConfig,
        fleet: Fleet,
        node: Node,
        on_tokens: Callable[[Node, list[TokenEvent], int], None],
        on_gone: Callable[[Node, str], None],
        on_plan: Callable[[StepPlan], None] | None = None,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.node = node
        self.info: executor_pb2.ExecutorInfo | None = None
        self.swapd: SwapDaemonLink | None = None
        self._on_tokens = on_tokens
        self._on_gone = on_gone
        self._on_plan = on_plan or (lambda plan: None)
        self._wake = asyncio.Event()
        node.wake = self.wake
        self._channel = grpc.aio.insecure_channel(node.address.executor, options=CHANNEL_OPTIONS)
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)
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
        self._task = asyncio.create_task(self._run(), name=f"node-{self.node.index}")

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
        await self._channel.close()

    async def _run(self) -> None:
        self._attach(await self._describe())
        while True:
            call = self._stub.Execute()
            call.add_done_callback(lambda _: self.wake())  # an idle node notices its executor dying
            try:
                await self.drive(call)
            except grpc.aio.AioRpcError as err:
                call.cancel()
                lost_since = time.monotonic()
                log.warning("executor_lost", node=self.node.index, code=err.code().name, details=err.details())
                self._lost()
                self._attach(await self._describe(lost_since))

    async def _describe(self, lost_since: float | None = None) -> executor_pb2.ExecutorInfo:
        """The executor's description, once it answers; while the node is lost for longer than
        `executor_timeout_s`, the requests it still holds fail."""
        while True:
            try:
                return await self._stub.Describe(executor_pb2.DescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
            except grpc.aio.AioRpcError as err:
                if lost_since is not None and time.monotonic() - lost_since > self.config.executor_timeout_s:
                    self._on_gone(
                        self.node, f"executor {self.node.address.executor} unavailable ({err.code().name}) for "
                        f"{self.config.executor_timeout_s:g}s and no other node took the request"
                    )  # fmt: skip
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
            self.swapd = SwapDaemonLink(self.node.address.swapd, sched, on_change=self.wake)
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
        self.fleet.node_lost(self.node)

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
            plan = sched.schedule()
            if sched.passed_over:
                fleet.balance()
            orders = sched.take_swap_orders()
            if orders:
                await self._send_swaps(orders)
            if plan is None:
                fleet.balance()  # an idle node takes what others passed over
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
            self.node.steps += 1
            self._on_tokens(self.node, sched.on_step_output(output), produced_ns)

    async def _send_swaps(self, orders: list[SwapOrder]) -> None:
        sched = self.scheduler
        if self.swapd is None:
            for order in orders:  # no daemon: the copies fail, their requests recompute
                sched.on_swap_done(order.swap_id, ok=False)
            return
        await self.swapd.send(orders)
        if self.config.swaps_stall:
            await self.swapd.wait({o.swap_id for o in orders})
