"""The engine's step loop against a fake executor and a swap daemon whose copies land instantly
(during the send), the timing that once lost a wake-up and hung the loop."""

from __future__ import annotations

import asyncio

from test_scheduler import BLOCK, FakeExecutor, FakeSwapDaemon, expected_output, seq

from fastswitch.v1 import swap_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine
from scheduler_svc.scheduler import Scheduler
from svc_common.plan import StepPlan


class _Executor:
    """The Execute stream: each plan written is run by a FakeExecutor, its result read back."""

    def __init__(self, executor: FakeExecutor) -> None:
        self.executor = executor
        self.result = None

    async def write(self, plan: object) -> None:
        self.result = self.executor.run(StepPlan.from_proto(plan)).to_proto()  # type: ignore[arg-type]

    async def read(self) -> object:
        await asyncio.sleep(0)
        return self.result


class _InstantDaemon:
    """The Swap stream: a copy lands (contents moved, SwapDone applied) before write() returns."""

    def __init__(self, engine: Engine, copier: FakeSwapDaemon) -> None:
        self.engine, self.copier = engine, copier

    async def write(self, command: swap_pb2.SwapCommand) -> None:
        order = self.engine.scheduler.swaps[command.swap_id]  # type: ignore[union-attr]
        self.copier.land_contents(order)
        self.engine._on_swap_done(swap_pb2.SwapDone(swap_id=command.swap_id, ok=True))


def test_a_copy_landing_while_its_order_is_sent_wakes_the_loop() -> None:
    async def scenario() -> None:
        config = SchedulerConfig(max_step_tokens=16, max_running=4, swapd_addr="daemon")
        engine = Engine(config)
        sched = Scheduler(config, num_blocks=8, block_size=BLOCK, eos_token_ids={0})
        sched.attach_host_pool(32)
        engine.scheduler = sched
        executor = FakeExecutor()
        copier = FakeSwapDaemon(sched, executor=executor)
        # A request computes a few tokens and is swapped out; nothing else is live.
        alone = seq("alone", prompt_len=5, max_tokens=8)
        sched.add(alone)
        for _ in range(3):
            plan = sched.schedule()
            assert plan is not None
            sched.on_step_output(executor.run(plan))
        sched._preempt(alone)
        copier.drain()
        assert sched._releases == ["alone"]  # as if a step had already carried the release
        executor.tables.pop(sched._releases.pop())
        assert alone.status.value == "swapped"
        # The loop's first schedule() orders the swap-in and has nothing to run: it must not sleep
        # through the copy landing while the order is being sent.
        engine._swap_call = _InstantDaemon(engine, copier)
        loop = asyncio.create_task(engine._drive(_Executor(executor)))
        try:
            await asyncio.wait_for(_finished(alone), timeout=10)
        finally:
            loop.cancel()
        assert alone.output_ids == expected_output(alone.prompt_ids, 8)

    asyncio.run(scenario())


async def _finished(*seqs: object) -> None:
    while not all(s.finished for s in seqs):  # type: ignore[attr-defined]
        await asyncio.sleep(0.001)
