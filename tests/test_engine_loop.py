"""The executor link's step loop against a fake executor and a swap daemon whose copies land instantly
(during the send), the timing that once lost a wake-up and hung the loop."""

from __future__ import annotations

import asyncio
import collections

from test_scheduler import BLOCK, FakeExecutor, FakeSwapDaemon, expected_output, seq

from fastswitch.v1 import swap_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.executor_link import ExecutorLink
from scheduler_svc.fleet import Fleet, NodeState
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import RequestState
from scheduler_svc.swapd_link import SwapDaemonLink
from svc_common.plan import StepPlan


class _Executor:
    """The Execute stream: each plan written is run by a FakeExecutor, its result read back."""

    def __init__(self, executor: FakeExecutor) -> None:
        self.executor = executor
        self.results: collections.deque[object] = collections.deque()  # one per plan written (two in flight)

    async def write(self, plan: object) -> None:
        self.results.append(self.executor.run(StepPlan.from_proto(plan)).to_proto())  # type: ignore[arg-type]

    async def read(self) -> object:
        await asyncio.sleep(0)
        return self.results.popleft()

    def done(self) -> bool:
        return False


class _InstantDaemon:
    """The Swap stream: a copy lands (contents moved, SwapDone applied) before write() returns."""

    def __init__(self, link: SwapDaemonLink, copier: FakeSwapDaemon) -> None:
        self.link, self.copier = link, copier

    async def write(self, command: swap_pb2.SwapCommand) -> None:
        order = self.link.scheduler.swaps.in_flight(command.swap_id)
        assert order is not None
        self.copier.land_contents(order)
        self.link.on_done(swap_pb2.SwapDone(swap_id=command.swap_id, ok=True))


def test_a_copy_landing_while_its_order_is_sent_wakes_the_loop() -> None:
    async def scenario() -> None:
        config = SchedulerConfig(max_step_tokens=16, max_running=1, policy="priority", swapd_addr="daemon")
        sched = Scheduler(config, num_blocks=8, block_size=BLOCK, eos_token_ids={0})
        fleet = Fleet(config)
        node = fleet.nodes[0]
        node.scheduler, node.state = sched, NodeState.UP
        link = ExecutorLink(config, fleet, node, on_tokens=lambda n, events, ns: None, on_fail=lambda ids, error: None)
        link.swapd = SwapDaemonLink("daemon", sched, on_change=link.wake)
        executor = FakeExecutor()
        copier = FakeSwapDaemon(sched, delay=1000, executor=executor)
        link.swapd.on_attached(_InstantDaemon(link.swapd, copier), num_host_blocks=32)
        # A request computes a few tokens, then a higher-priority one takes its place in the batch:
        # it is swapped out, and its copy lands only after the other has finished and been released.
        alone = seq("alone", prompt_len=5, max_tokens=8)
        sched.add(alone)
        for _ in range(3):
            plan = sched.schedule()
            assert plan is not None
            sched.on_step_output(executor.run(plan))
        high = seq("high", prompt_len=3, max_tokens=2, priority=5)
        sched.add(high)
        while (plan := sched.schedule()) is not None:
            copier.tick()
            sched.on_step_output(executor.run(plan))
        copier.drain()
        assert high.finished and alone.state is RequestState.SWAPPED and not sched.swaps.num_in_flight
        # The loop's first schedule() orders the swap-in and has nothing to run: it must not sleep
        # through the copy landing while the order is being sent.
        loop = asyncio.create_task(link.drive(_Executor(executor)))
        try:
            await asyncio.wait_for(_finished(alone), timeout=10)
        finally:
            loop.cancel()
        assert alone.output_ids == expected_output(alone.prompt_ids, 8)

    asyncio.run(scenario())


async def _finished(*seqs: object) -> None:
    while not all(s.finished for s in seqs):  # type: ignore[attr-defined]
        await asyncio.sleep(0.001)
