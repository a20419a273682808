"""The scheduler's parts together, driven by hypothesis through random runs.

Requests and conversation turns arrive; steps are scheduled (and, with --lookahead, the next decode
step while one is in flight) and their outputs applied in order; copies land
(ok or failed) in any order; requests are cancelled, stopped and re-prioritised; the executor or the
swap daemon is lost and comes back; conversations end or expire. After every event each device
and host block is free or owned exactly once, every live request is queued exactly once, and its
phase clock runs in the phase its state says. At the end every request finishes, with the tokens
an undisturbed run gives (the fake executor's tokens depend on every KV slot it reads, so a wrong
swap, reuse or recompute shows), and once the conversations end both pools are exactly free.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import scheduler_svc.sequence
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish, RequestState, Sequence
from scheduler_svc.swap_manager import SwapOrder
from svc_common.errors import ResourceExhaustedError
from svc_common.plan import Sampling, StepPlan
from svc_common.swap import Direction
from tests.conftest import FakeClock
from tests.test_scheduler import BLOCK, EOS, FakeExecutor, assert_ownership, expected_output

MAX_TOKENS = st.integers(1, 6)
CONVERSATIONS = 3


class Daemon:
    """The swap daemon: copies wait until the test lands them, in any order, moving the modelled KV."""

    def __init__(self) -> None:
        self.pending: list[SwapOrder] = []
        self.host_kv: dict[int, list[int | None]] = {}

    def land(self, order: SwapOrder, device_kv: dict[int, list[int | None]]) -> None:
        for d, h in zip(order.device_blocks, order.host_blocks, strict=True):
            if order.direction is Direction.OUT:
                self.host_kv[h] = list(device_kv.get(d, [None] * BLOCK))
            else:
                device_kv[d] = list(self.host_kv.get(h, [None] * BLOCK))


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(8, 24),
        host_blocks=st.sampled_from([32, 8, 0]),
        policy=st.sampled_from(["fcfs", "priority", "vtc"]),
        preemption=st.sampled_from(["swap", "recompute", "vllm-like"]),
        max_running=st.integers(1, 4),
        conversation_host_blocks=st.sampled_from([0, 6]),
        max_conversations=st.sampled_from([100, 2]),
    )
    def start(
        self,
        num_blocks: int,
        host_blocks: int,
        policy: str,
        preemption: str,
        max_running: int,
        conversation_host_blocks: int,
        max_conversations: int,
    ) -> None:
        self.clock = FakeClock()
        self.real_clock = scheduler_svc.sequence.clock
        scheduler_svc.sequence.clock = self.clock
        config = SchedulerConfig(
            max_step_tokens=16,
            max_running=max_running,
            policy=policy,
            preemption=preemption,
            conversation_host_blocks=conversation_host_blocks,
            max_conversations=max_conversations,
        )
        self.sched = Scheduler(config, num_blocks=num_blocks, block_size=BLOCK, eos_token_ids={EOS})
        self.num_blocks, self.host_blocks = num_blocks, host_blocks
        self.executor = FakeExecutor()
        self.daemon = Daemon()
        if host_blocks:
            self.sched.attach_host_pool(host_blocks)
        self.plans: list[StepPlan] = []  # sent and not answered yet, oldest first (two: one planned ahead)
        self.seqs: list[Sequence] = []
        self.history: dict[int, list[int]] = {c: [30 + 10 * c, 31 + 10 * c] for c in range(CONVERSATIONS)}
        self.turns: dict[int, Sequence] = {}
        self.n = 0
        self.aheads = 0  # steps planned ahead

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        try:
            self.check_the_end()
        finally:
            scheduler_svc.sequence.clock = self.real_clock

    # -- arrivals ---------------------------------------------------------------------------------

    def _fits(self, prompt_len: int, max_tokens: int) -> bool:
        return -(-(prompt_len + max_tokens) // BLOCK) <= self.num_blocks  # else the engine rejects it

    @rule(
        count=st.integers(1, 3),
        prompt_len=st.integers(1, 20),
        max_tokens=MAX_TOKENS,
        priority=st.integers(0, 3),
        tenant=st.sampled_from("ab"),
    )
    def arrive(self, count: int, prompt_len: int, max_tokens: int, priority: int, tenant: str) -> None:
        if not self._fits(prompt_len, max_tokens):
            return
        for _ in range(count):
            self.n += 1
            prompt = list(range(100 + self.n, 100 + self.n + prompt_len))
            s = Sequence(f"r{self.n}", prompt, Sampling(), max_tokens, tenant=tenant, priority=priority)
            self.sched.add(s)
            self.seqs.append(s)

    @rule(
        conv=st.integers(0, CONVERSATIONS - 1),
        new=st.integers(1, 6),
        max_tokens=MAX_TOKENS,
        retokenised=st.integers(0, 8),
    )
    def arrive_turn(self, conv: int, new: int, max_tokens: int, retokenised: int) -> None:
        if conv in self.turns and not self.turns[conv].finished:
            return  # the user waits for the answer before the next turn
        # Re-tokenised history can differ from the tokens generated: here, its last few.
        history = self.history[conv]
        history = history[: max(1, len(history) - retokenised)] + [99] * min(retokenised, 2)
        prompt = history + list(range(60, 60 + new))
        if not self._fits(len(prompt), max_tokens):
            self.sched.conversations.end(("t", str(conv)))
            self.history[conv] = [30 + 10 * conv]
            return
        self.n += 1
        s = Sequence(f"c{conv}-{self.n}", prompt, Sampling(), max_tokens, tenant="t", conversation=("t", str(conv)))
        live_before = set(self.sched.requests)
        try:
            self.sched.add(s, [{"role": "user", "content": str(self.n)}])
        except ResourceExhaustedError:
            assert set(self.sched.requests) == live_before, "a refused turn changes nothing"
            return
        self.seqs.append(s)
        self.turns[conv] = s

    # -- steps and copies -------------------------------------------------------------------------

    @precondition(lambda self: not self.plans)
    @rule()
    def schedule(self) -> None:
        """As the executor link does: the walk only with no step in flight."""
        self.clock.now += 1.0
        plan = self.sched.schedule()
        if plan is not None:
            self.plans.append(plan)
        self.daemon.pending += self.sched.take_swap_orders()

    @precondition(lambda self: len(self.plans) == 1)
    @rule()
    def plan_ahead(self) -> None:
        """The next decode step, planned while the one in flight runs."""
        plan = self.sched.plan_ahead()
        if plan is not None:
            self.plans.append(plan)
            self.aheads += 1

    @precondition(lambda self: bool(self.plans))
    @rule(stop=st.booleans())
    def step_output(self, stop: bool) -> None:
        self.clock.now += 1.0
        # The executor runs the plans in order; its KV writes happen here, so a copy that lands into a
        # block a plan still in flight writes would corrupt the outputs.
        events = self.sched.on_step_output(self.executor.run(self.plans.pop(0)))
        self.daemon.pending += self.sched.take_swap_orders()
        self._remember_turns()
        if stop and events and not events[0].seq.finished:
            self.sched.finish(events[0].seq, Finish.STOP)  # a stop string in the text
            self._remember_turns()

    def _step(self, i: int, land_every: int) -> None:
        """One whole step, as the executor link makes it (with a step planned ahead where one can be);
        the oldest copy lands every `land_every` steps."""
        if not self.plans:
            self.schedule()
        if len(self.plans) == 1:
            self.plan_ahead()
        if self.plans:
            self.step_output(stop=False)
        if self.daemon.pending and i % land_every == 0:
            self.land(0, ok=True)

    @rule(steps=st.integers(1, 10), land_every=st.integers(1, 4), replies=st.booleans())
    def run_steps(self, steps: int, land_every: int, replies: bool) -> None:
        """Several whole steps; with `replies`, each answered conversation sends its next turn."""
        for i in range(steps):
            self._step(i, land_every)
            for conv, s in list(self.turns.items()):
                if replies and s.finished:
                    self.arrive_turn(conv, new=1 + i % 4, max_tokens=3, retokenised=i % 3)

    @rule(
        conv=st.integers(0, CONVERSATIONS - 1),
        land_every=st.integers(1, 3),
        retokenised=st.integers(0, 3),
        crowd=st.booleans(),
        then=st.sampled_from([None, "executor_lost", "daemon_lost", "land"]),
    )
    def turn_then_reply(self, conv: int, land_every: int, retokenised: int, crowd: bool, then: str | None) -> None:
        """A turn runs to its end; with `crowd`, other traffic then needs the whole pool while the
        conversation idles (its kept KV spills to the host, or is dropped); then the conversation
        sends its next turn, which starts from the kept KV, and `then` happens right away."""
        if conv in self.turns and not self.turns[conv].finished:
            return
        self.arrive_turn(conv, new=2, max_tokens=2, retokenised=retokenised)
        self._run_until(self.turns.get(conv), land_every)
        if crowd:
            self.arrive(1, prompt_len=self.num_blocks * BLOCK - 2, max_tokens=1, priority=3, tenant="b")
            self._run_until(self.seqs[-1], land_every)
        self.arrive_turn(conv, new=2, max_tokens=3, retokenised=retokenised)
        if then == "executor_lost":
            self.executor_lost()
        elif then == "daemon_lost" and self.sched.swaps.host is not None:
            self.daemon_lost()
        elif then == "land" and not self.plans:  # its swap-in lands before it is scheduled
            self.schedule()
            while self.daemon.pending:
                self.land(0, ok=True)

    def _run_until(self, seq: Sequence | None, land_every: int) -> None:
        for i in range(100):
            if seq is None or (seq.finished and not self.daemon.pending):
                return
            self._step(i, land_every)

    @precondition(lambda self: self.daemon.pending)
    @rule(index=st.integers(0, 10), ok=st.sampled_from([True, True, True, False]))
    def land(self, index: int, ok: bool) -> None:
        order = self.daemon.pending.pop(index % len(self.daemon.pending))
        if ok:
            self.daemon.land(order, self.executor.kv)
        self.sched.on_swap_done(order.swap_id, ok)
        self._remember_turns()

    # -- clients ----------------------------------------------------------------------------------

    def _live(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    @precondition(lambda self: any(not s.finished for s in self.seqs))
    @rule(index=st.integers(0, 50))
    def cancel(self, index: int) -> None:
        live = self._live()
        victim = live[index % len(live)]
        assert self.sched.abort(victim.request_id) is victim
        assert victim.finish is Finish.CANCELLED

    @precondition(lambda self: any(not s.finished for s in self.seqs))
    @rule(index=st.integers(0, 50), priority=st.integers(0, 3))
    def set_priority(self, index: int, priority: int) -> None:
        live = self._live()
        live[index % len(live)].priority = priority

    @rule(conv=st.integers(0, CONVERSATIONS - 1))
    def end_conversation(self, conv: int) -> None:
        self.sched.conversations.end(("t", str(conv)))
        self.history[conv] = [30 + 10 * conv]

    @rule()
    def time_passes(self) -> None:
        self.clock.now += self.sched.config.conversation_ttl_s + 1

    # -- faults -----------------------------------------------------------------------------------

    @rule()
    def executor_lost(self) -> None:
        """As the engine handles it: the device KV is gone, and the daemon is re-attached to the new pool."""
        self.sched.on_executor_lost()
        self.executor = FakeExecutor()
        self.plans = []
        if self.sched.swaps.host is not None:
            self.daemon_lost()
            self.daemon_back()

    @precondition(lambda self: self.sched.swaps.host is not None)
    @rule()
    def daemon_lost(self) -> None:
        self.sched.on_swap_daemon_lost()
        self.daemon = Daemon()
        self._remember_turns()

    @precondition(lambda self: self.sched.swaps.host is None and self.host_blocks > 0)
    @rule()
    def daemon_back(self) -> None:
        self.sched.attach_host_pool(self.host_blocks)

    # -- checks -----------------------------------------------------------------------------------

    def _remember_turns(self) -> None:
        for conv, s in self.turns.items():
            if s.finished and s.finish in (Finish.LENGTH, Finish.EOS, Finish.STOP):
                self.history[conv] = s.tokens

    @invariant()
    def every_block_is_free_or_owned_once(self) -> None:
        assert_ownership(self.sched)

    @invariant()
    def every_live_request_is_queued_once_and_in_the_phase_its_state_says(self) -> None:
        sched = self.sched
        assert set(map(id, sched.running)) | set(map(id, sched.waiting)) == set(map(id, sched.requests.values()))
        assert len(sched.running) + len(sched.waiting) == len(sched.requests)
        for s in sched.requests.values():
            assert (s in sched.running) == (s.state is RequestState.RUNNING)
            assert s.phases.current is s.phase(), s
        for s in self.seqs:
            assert s.finished == (s.request_id not in sched.requests)

    @invariant()
    def every_output_so_far_is_what_an_undisturbed_run_gives(self) -> None:
        for s in self.seqs:
            assert s.output_ids == expected_output(s.prompt_ids, len(s.output_ids)), s.request_id

    def drain(self) -> None:
        """Run until every request has finished: copies land, steps run, a lost daemon stays lost."""
        for _ in range(5000):
            while self.plans:
                self.step_output(stop=False)
            for order in self.daemon.pending:
                self.daemon.land(order, self.executor.kv)
                self.sched.on_swap_done(order.swap_id, ok=True)
            self.daemon.pending = []
            self._remember_turns()
            if all(s.finished for s in self.seqs) and not self.plans:
                return
            self.schedule()
            self.plan_ahead()
        raise AssertionError("the scheduler made no progress")

    def check_the_end(self) -> None:
        self.drain()
        for s in self.seqs:
            assert s.finished
            if s.finish is Finish.LENGTH:
                assert s.output_ids == expected_output(s.prompt_ids, s.max_tokens), s.request_id
            seconds = s.phases.seconds()
            assert sum(seconds.values()) == pytest.approx(s.phases.since - s.arrival), "phases cover its life"
        for conv in range(CONVERSATIONS):
            self.sched.conversations.end(("t", str(conv)))
        self.drain()  # spills of ended conversations land
        if self.sched.swaps.host is None and self.host_blocks > 0:
            self.daemon_back()  # a re-attached daemon ends the quarantine of its broken stream's copies
        assert not self.sched.swaps.quarantined
        assert_ownership(self.sched)
        assert self.sched.blocks.num_free == self.num_blocks
        host = self.sched.swaps.host
        assert host is None or host.num_free == host.num_blocks


SchedulerMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_random_runs_never_leak_or_double_own_a_block_and_every_request_ends = SchedulerMachine.TestCase
