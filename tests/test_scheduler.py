"""The scheduler's decisions, without a model: a fake executor checks every plan it is sent."""

from __future__ import annotations

import dataclasses
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.conversations import KeptKV
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish, Sequence
from scheduler_svc.swap_manager import QUARANTINE_S, SwapOrder
from svc_common.plan import Sampling, ScheduledChunk, StepOutput, StepPlan
from svc_common.swap import Direction, Granularity
from tests.conftest import FakeClock

BLOCK = 4
EOS = 0


class FakeExecutor:
    """Mirrors what executor_svc keeps (block tables from diffs) and checks each plan against it.

    It also models the KV pool's contents: a chunk writes its tokens into their slots, and the token
    it "samples" is a function of every token it reads back from the pool. So a block that was
    swapped, reused or recomputed wrongly changes the outputs, as it would with a real model.
    """

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}
        self.kv: dict[int, list[int | None]] = {}  # device block -> the token whose KV each slot holds
        self.slots: dict[int, str] = {}  # the request each slot names (NewRequest.slot)
        self.last: dict[int, int] = {}  # what each slot sampled in the last step that sampled it

    def run(self, plan: StepPlan) -> StepOutput:
        for rid in plan.released_request_ids:
            self.tables.pop(rid, None)
            self.slots = {slot: r for slot, r in self.slots.items() if r != rid}
        for new in plan.new_requests:
            assert new.slot not in self.slots, "a slot was given while the request holding it is known"
            self.tables[new.request_id] = []
            self.slots[new.slot] = new.request_id
        batch = plan.decodes
        if batch.previous_tokens:  # planned while the last step ran: the tokens that step sampled
            assert not batch.token_ids and all(slot in self.last for slot in batch.slots)
            batch = dataclasses.replace(batch, token_ids=[self.last[slot] for slot in batch.slots])
        decodes = batch.chunks(self.slots)
        assert len({c.request_id for c in plan.chunks + decodes}) == len(plan.chunks) + len(decodes)
        tokens = [self._compute(chunk) for chunk in plan.chunks]
        decode_tokens = [self._compute(chunk) for chunk in decodes]
        chunk_tokens = [(c.request_id, t) for c, t in zip(plan.chunks, tokens, strict=True) if c.sample]
        slot_of = {rid: slot for slot, rid in self.slots.items()}
        self.last.update((slot_of[rid], t) for rid, t in chunk_tokens)
        self.last.update(zip(batch.slots, decode_tokens, strict=True))  # type: ignore[arg-type]
        return StepOutput(plan.step_id, chunk_tokens, decode_tokens=[t for t in decode_tokens if t is not None])

    def forget_all(self) -> None:
        """A new Execute stream: the executor knows no request."""
        self.tables.clear()
        self.slots.clear()

    def request_ids(self, plan: StepPlan) -> list[str]:
        """The requests a plan computes (its decodes by the slots the executor knows)."""
        return [c.request_id for c in plan.chunks] + [self.slots[slot] for slot in plan.decodes.slots]

    def _compute(self, chunk: ScheduledChunk) -> int | None:
        """Write the chunk's KV; the token it samples, if it samples."""
        table = self.tables[chunk.request_id]
        table.extend(chunk.new_block_ids)
        end = chunk.start_position + len(chunk.token_ids)
        assert len(table) * BLOCK >= end, "a chunk's tokens must fit the blocks it was given"
        for pos, token in enumerate(chunk.token_ids, start=chunk.start_position):
            self.kv.setdefault(table[pos // BLOCK], [None] * BLOCK)[pos % BLOCK] = token
        context = [self.kv.get(table[pos // BLOCK], [None] * BLOCK)[pos % BLOCK] for pos in range(end)]
        assert None not in context, "attention read a slot nobody wrote"
        return 1 + sum((i + 1) * t for i, t in enumerate(context)) % 97 if chunk.sample else None


def make(num_blocks: int, max_step_tokens: int = 16, max_running: int = 4, policy: str = "fcfs") -> Scheduler:
    config = SchedulerConfig(max_step_tokens=max_step_tokens, max_running=max_running, policy=policy)
    return Scheduler(config, num_blocks=num_blocks, block_size=BLOCK, eos_token_ids={EOS})


def seq(rid: str, prompt_len: int, max_tokens: int, **kw: object) -> Sequence:
    return Sequence(rid, list(range(10, 10 + prompt_len)), Sampling(), max_tokens, ignore_eos=False, **kw)


def run_to_completion(sched: Scheduler, executor: FakeExecutor, max_steps: int = 10_000) -> int:
    steps = 0
    while (plan := sched.schedule()) is not None:
        assert plan.num_tokens <= sched.config.max_step_tokens
        sched.on_step_output(executor.run(plan))
        assert_ownership(sched)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def assert_ownership(sched: Scheduler) -> None:
    """Every device and host block is free, owned exactly once (by a request or a conversation's
    kept KV), or under one copy."""
    in_copy = sched.swaps.orders()
    owned = [b for s in sched.requests.values() for b in s.block_table if s.state.value not in ("swapping_in",)]
    owned += [b for o in in_copy for b in o.device_blocks]
    owned += [b for k in sched.conversations.kept(sched.swaps) for b in k.blocks]
    owned += sched.swaps.quarantined
    assert len(owned) == len(set(owned)), "a device block is owned twice"
    assert sched.blocks.num_free + len(owned) == sched.blocks.num_blocks
    host_pool = sched.swaps.host
    if host_pool is not None:
        host = [b for s in sched.requests.values() if s.state.value != "swapping_in" for b in s.host_table]
        host += [b for o in in_copy for b in o.host_blocks]
        host += [b for k in sched.conversations.kept(sched.swaps) for b in k.host_blocks]
        host += [b for loan in sched.swaps.loans for b in loan.blocks]  # read by another node's pull
        assert len(host) == len(set(host)), "a host block is owned twice"
        assert host_pool.num_free + len(host) == host_pool.num_blocks
    for s in sched.requests.values():
        assert s.host_tokens <= len(s.host_table) * BLOCK


def kept(sched: Scheduler, key: tuple[str, str]) -> KeptKV:
    """The KV a conversation keeps for its next turn (failing if it keeps none)."""
    conv = sched.conversations.get(key)
    assert conv is not None and conv.kv is not None, f"conversation {key} keeps no KV"
    return conv.kv


def test_long_prompt_is_prefilled_in_chunks_within_the_step_budget() -> None:
    sched, ex = make(num_blocks=64, max_step_tokens=8), FakeExecutor()
    s = seq("a", prompt_len=30, max_tokens=3)
    sched.add(s)
    plans = []
    while (plan := sched.schedule()) is not None:
        plans.append(plan)
        sched.on_step_output(ex.run(plan))
    prefill_sizes = [len(p.chunks[0].token_ids) for p in plans[:4]]
    assert prefill_sizes == [8, 8, 8, 6]
    assert [p.chunks[0].sample for p in plans[:4]] == [False, False, False, True]
    assert s.finish is Finish.LENGTH and len(s.output_ids) == 3


def test_a_known_request_gets_only_new_blocks_as_a_diff() -> None:
    sched, ex = make(num_blocks=64, max_step_tokens=64), FakeExecutor()
    sched.add(seq("a", prompt_len=5, max_tokens=10))
    first = sched.schedule()
    assert first is not None and [r.request_id for r in first.new_requests] == ["a"]
    assert first.chunks[0].new_block_ids == [0, 1]
    sched.on_step_output(ex.run(first))
    sent = list(first.chunks[0].new_block_ids)
    while (plan := sched.schedule()) is not None:
        assert not plan.new_requests or plan.new_requests[0].request_id != "a"
        for c in plan.chunks:
            sent += c.new_block_ids
        sent += plan.decodes.block_ids
        sched.on_step_output(ex.run(plan))
    assert sent == list(range(len(sent))), "blocks are sent once each, contiguous from an empty pool"


def test_pool_exhaustion_preempts_the_latest_arrival_and_everything_completes() -> None:
    sched, ex = make(num_blocks=6, max_step_tokens=16, max_running=4), FakeExecutor()
    seqs = [seq(f"r{i}", prompt_len=3, max_tokens=8) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_to_completion(sched, ex)
    assert sched.stats.counter("preemptions") > 0
    assert all(s.finish is Finish.LENGTH and len(s.output_ids) == 8 for s in seqs)
    assert sched.blocks.num_free == 6


def test_recomputed_request_produces_the_same_tokens_as_an_unpreempted_one() -> None:
    alone, ex1 = make(num_blocks=64), FakeExecutor()
    ref = seq("x", prompt_len=3, max_tokens=8)
    alone.add(ref)
    run_to_completion(alone, ex1)
    crowded, ex2 = make(num_blocks=6), FakeExecutor()
    seqs = [seq(f"r{i}", prompt_len=3, max_tokens=8) for i in range(4)]
    for s in seqs:
        crowded.add(s)
    run_to_completion(crowded, ex2)
    assert any(s.preemptions for s in seqs)
    assert all(s.output_ids == ref.output_ids for s in seqs)


def test_batch_cap_limits_running_requests() -> None:
    sched, ex = make(num_blocks=64, max_running=2), FakeExecutor()
    for i in range(5):
        sched.add(seq(f"r{i}", prompt_len=2, max_tokens=4))
    while (plan := sched.schedule()) is not None:
        assert len(plan.chunks) + len(plan.decodes) <= 2
        sched.on_step_output(ex.run(plan))


def test_abort_frees_blocks_and_tells_the_executor_to_release() -> None:
    sched, ex = make(num_blocks=64), FakeExecutor()
    sched.add(seq("a", prompt_len=5, max_tokens=50))
    plan = sched.schedule()
    assert plan is not None
    sched.on_step_output(ex.run(plan))
    assert sched.blocks.num_free < 64
    assert sched.abort("a") is not None
    assert sched.blocks.num_free == 64
    plan = sched.schedule()
    assert plan is not None and plan.released_request_ids == ["a"] and not plan.chunks and not plan.decodes
    assert sched.abort("a") is None


def test_abort_while_a_step_is_in_flight_ignores_its_result() -> None:
    sched, ex = make(num_blocks=64), FakeExecutor()
    sched.add(seq("a", prompt_len=5, max_tokens=50))
    sched.add(seq("b", prompt_len=5, max_tokens=2))
    plan = sched.schedule()
    assert plan is not None
    sched.abort("a")
    events = sched.on_step_output(ex.run(plan))
    assert [e.seq.request_id for e in events] == ["b"]
    run_to_completion(sched, ex)
    assert sched.blocks.num_free == 64


def test_eos_finishes_unless_ignore_eos() -> None:
    sched = make(num_blocks=64)
    s = seq("a", prompt_len=2, max_tokens=10)
    sched.add(s)
    plan = sched.schedule()
    assert plan is not None
    sched.on_step_output(StepOutput(plan.step_id, [("a", EOS)]))
    assert s.finish is Finish.EOS


def test_priority_policy_preempts_the_lowest_priority_first() -> None:
    sched, ex = make(num_blocks=5, max_running=4, policy="priority"), FakeExecutor()
    low = seq("low", prompt_len=3, max_tokens=12, priority=0)
    high = seq("high", prompt_len=3, max_tokens=12, priority=5)
    sched.add(low)
    sched.add(high)
    run_to_completion(sched, ex)
    assert high.preemptions == 0 and low.preemptions > 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 20), st.integers(1, 12), st.booleans(), st.integers(0, 3)),
        min_size=1,
        max_size=12,
    ),
    st.integers(6, 40),
)
def test_random_load_with_aborts_never_double_owns_and_frees_everything(
    requests: list[tuple[int, int, bool, int]], num_blocks: int
) -> None:
    sched, ex = make(num_blocks=num_blocks, max_step_tokens=16, max_running=4), FakeExecutor()
    seqs = []
    for i, (prompt_len, max_tokens, abort, _) in enumerate(requests):
        if (prompt_len + max_tokens + BLOCK - 1) // BLOCK > num_blocks:
            continue  # the engine rejects these up front
        s = seq(f"r{i}", prompt_len, max_tokens)
        seqs.append((s, abort, requests[i][3]))
        sched.add(s)
    step = 0
    while (plan := sched.schedule()) is not None:
        sched.on_step_output(ex.run(plan))
        assert_ownership(sched)
        for s, abort, when in seqs:
            if abort and step == when:
                sched.abort(s.request_id)
                assert_ownership(sched)
        step += 1
        assert step < 5000
    assert sched.blocks.num_free == num_blocks
    assert not sched.running and not sched.waiting
    for s, _abort, _ in seqs:
        assert s.finished
        if s.finish is Finish.LENGTH:
            assert len(s.output_ids) == s.max_tokens


class FakeSwapDaemon:
    """Lands each copy `delay` steps after it was ordered (or fails it), like an async daemon; a
    landed copy moves the modelled KV contents between the executor's pool and the host pool."""

    def __init__(self, sched: Scheduler, delay: int = 1, fail: bool = False, executor: FakeExecutor | None = None):
        self.sched, self.delay, self.fail, self.executor = sched, delay, fail, executor
        self.pending: list[tuple[int, int]] = []  # (due step, swap id)
        self.step = 0
        self.copies = {"out": 0, "in": 0}
        self.blocks = {"out": 0, "in": 0}  # blocks moved
        self.host_kv: dict[int, list[int | None]] = {}

    def tick(self) -> None:
        for order in self.sched.take_swap_orders():
            self.pending.append((self.step + self.delay, order.swap_id))
            self.copies[order.direction.value] += 1
        self.step += 1
        due = [sid for when, sid in self.pending if when <= self.step]
        self.pending = [(w, sid) for w, sid in self.pending if sid not in due]
        for sid in due:
            self.land(sid)

    def land(self, swap_id: int) -> None:
        order = self.sched.swaps.in_flight(swap_id)
        assert order is not None
        if not self.fail:
            self.land_contents(order)
        self.sched.on_swap_done(swap_id, ok=not self.fail)

    def land_contents(self, order: SwapOrder) -> None:
        self.blocks[order.direction.value] += len(order.device_blocks)
        if self.executor is not None:
            device = self.executor.kv
            for d, h in zip(order.device_blocks, order.host_blocks, strict=True):
                if order.direction is Direction.OUT:
                    self.host_kv[h] = list(device.get(d, [None] * BLOCK))
                else:
                    device[d] = list(self.host_kv.get(h, [None] * BLOCK))

    def drain(self) -> None:
        self.tick()
        for _, sid in self.pending:
            self.land(sid)
        self.pending = []


def run_with_swaps(
    sched: Scheduler, ex: FakeExecutor, daemon: FakeSwapDaemon, aborts: dict[int, str] | None = None
) -> None:
    for step in range(5000):
        plan = sched.schedule()
        daemon.tick()
        if plan is not None:
            sched.on_step_output(ex.run(plan))
        assert_ownership(sched)
        if aborts and step in aborts:
            sched.abort(aborts[step])
            assert_ownership(sched)
        if plan is None and not sched.swaps.num_in_flight and not daemon.pending and not sched.has_work():
            return
    raise AssertionError("no progress")


def make_swapping(num_blocks: int, host_blocks: int, preemption: str = "swap", policy: str = "fcfs") -> Scheduler:
    config = SchedulerConfig(max_step_tokens=16, max_running=4, policy=policy, preemption=preemption)
    sched = Scheduler(config, num_blocks=num_blocks, block_size=BLOCK, eos_token_ids={EOS})
    sched.attach_host_pool(host_blocks)
    return sched


def test_swap_preemption_moves_kv_out_and_back_and_tokens_match_an_unpreempted_run() -> None:
    alone, ex1 = make(num_blocks=64), FakeExecutor()
    ref = seq("x", prompt_len=3, max_tokens=10)
    alone.add(ref)
    run_to_completion(alone, ex1)
    sched, ex = make_swapping(num_blocks=7, host_blocks=32), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=2, executor=ex)
    seqs = [seq(f"r{i}", prompt_len=3, max_tokens=10) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_with_swaps(sched, ex, daemon)
    # A request swapped in and preempted again before computing more needs no copy out: its host copy is whole.
    assert daemon.copies["out"] > 0 and daemon.copies["in"] >= daemon.copies["out"]
    assert sched.stats.counter("recomputed_tokens") == 0
    assert all(s.output_ids == ref.output_ids for s in seqs)
    assert sched.blocks.num_free == 7 and sched.swaps.host is not None and sched.swaps.host.num_free == 32


def test_swapped_blocks_are_not_reused_until_the_copy_lands() -> None:
    sched, ex = make_swapping(num_blocks=7, host_blocks=32), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=3, executor=ex)
    for i in range(4):
        sched.add(seq(f"r{i}", prompt_len=3, max_tokens=10))
    for _ in range(40):
        plan = sched.schedule()
        in_copy = {b for o in sched.swaps.orders() for b in o.device_blocks}
        if plan is not None:
            for blocks in [c.new_block_ids for c in plan.chunks] + [plan.decodes.block_ids]:
                assert not in_copy & set(blocks), "a block under a copy was handed out"
            sched.on_step_output(ex.run(plan))
        daemon.tick()


def test_cancel_during_swap_out_and_swap_in_frees_both_pools_once_the_copy_lands() -> None:
    for when in range(2, 14):
        sched, ex = make_swapping(num_blocks=7, host_blocks=32), FakeExecutor()
        daemon = FakeSwapDaemon(sched, delay=3, executor=ex)
        for i in range(4):
            sched.add(seq(f"r{i}", prompt_len=3, max_tokens=10))
        run_with_swaps(sched, ex, daemon, aborts={when: "r3", when + 1: "r2"})
        assert sched.blocks.num_free == 7
        assert sched.swaps.host is not None and sched.swaps.host.num_free == 32


def test_full_host_pool_falls_back_to_recompute_and_says_so() -> None:
    sched, ex = make_swapping(num_blocks=7, host_blocks=1), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=1, executor=ex)
    seqs = [seq(f"r{i}", prompt_len=3, max_tokens=10) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_with_swaps(sched, ex, daemon)
    assert sched.stats.counter("swap_fallback_recompute") > 0
    assert all(len(s.output_ids) == 10 for s in seqs)


def test_failed_copies_and_a_lost_daemon_recompute_every_affected_request() -> None:
    sched, ex = make_swapping(num_blocks=7, host_blocks=32), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=2, fail=True, executor=ex)
    seqs = [seq(f"r{i}", prompt_len=3, max_tokens=10) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_with_swaps(sched, ex, daemon)
    assert sched.stats.counter("swap_fallback_recompute") > 0
    assert all(len(s.output_ids) == 10 for s in seqs)
    sched2, ex2 = make_swapping(num_blocks=7, host_blocks=32), FakeExecutor()
    daemon2 = FakeSwapDaemon(sched2, delay=50, executor=ex2)
    seqs2 = [seq(f"r{i}", prompt_len=3, max_tokens=10) for i in range(4)]
    for s in seqs2:
        sched2.add(s)
    for _ in range(12):
        plan = sched2.schedule()
        daemon2.tick()
        if plan is not None:
            sched2.on_step_output(ex2.run(plan))
    assert sched2.swaps.num_in_flight, "copies should be in flight when the daemon dies"
    under_copy = {b for o in sched2.swaps.orders() for b in o.device_blocks}
    sched2.on_swap_daemon_lost()
    daemon2.pending.clear()
    assert sched2.swaps.host is None
    run_to_completion(sched2, ex2)
    assert all(len(s.output_ids) == 10 for s in seqs2)
    # The blocks under those copies stay quarantined (the daemon may still write them) until it attaches again.
    assert set(sched2.swaps.quarantined) == under_copy
    assert sched2.blocks.num_free == 7 - len(under_copy)
    # ... or, when it does not come back, until QUARANTINE_S have passed (a dead daemon writes nothing;
    # a live one ends those copies within milliseconds): a daemon down for good costs no capacity.
    assert not sched2.expire_quarantine(), "too early: the daemon may come back and end those copies"
    assert sched2.expire_quarantine(now=time.monotonic() + QUARANTINE_S)
    assert sched2.blocks.num_free == 7 and not sched2.swaps.quarantined


def test_a_swap_in_under_a_broken_stream_never_has_its_blocks_handed_out_before_the_daemon_reattaches() -> None:
    """The race: the daemon's stream breaks while it is still copying KV *into* device blocks; if the
    scheduler gave those blocks to another request, the late copy would overwrite that request's KV."""
    sched = make_conversing(num_blocks=8, host_blocks=32, max_running=1, policy="priority", preemption="swap")
    ex = FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=1000, executor=ex)
    low = seq("low", prompt_len=6, max_tokens=20)
    sched.add(low)
    for _ in range(3):
        step(sched, ex, daemon)
    high = seq("high", prompt_len=3, max_tokens=2, priority=5)
    sched.add(high)
    while not high.finished:
        step(sched, ex, daemon)
    daemon.drain()  # low's copy out lands; now swap it back in, and keep that copy in flight
    step(sched, ex, daemon)
    swap_in = [o for o in sched.swaps.orders() if o.direction is Direction.IN]
    assert swap_in, "low's KV should be on its way back"
    late_writes = set(swap_in[0].device_blocks)
    sched.on_swap_daemon_lost()
    others = [seq(f"o{i}", prompt_len=8, max_tokens=3) for i in range(3)]
    for s in others:
        sched.add(s)
    for _ in range(40):  # while the daemon is away (low cannot fit beside the quarantine: it recomputes)
        plan = sched.schedule()
        taken = {b for s in sched.requests.values() for b in s.block_table}
        assert not taken & late_writes, "a block the daemon may still write was handed out"
        if plan is None:
            break
        sched.on_step_output(ex.run(plan))
    assert len(sched.swaps.quarantined) == len(late_writes)
    sched.attach_host_pool(32)  # the daemon re-attaches: its old stream's copies have ended
    assert not sched.swaps.quarantined
    run_to_completion(sched, ex)
    assert all(s.finished for s in [low, *others]) and low.output_ids == expected_output(low.prompt_ids, 20)


def test_vllm_like_mode_orders_per_layer_copies() -> None:
    sched, ex = make_swapping(num_blocks=7, host_blocks=32, preemption="vllm-like"), FakeExecutor()
    for i in range(4):
        sched.add(seq(f"r{i}", prompt_len=3, max_tokens=10))
    grans = set()
    for _ in range(30):
        plan = sched.schedule()
        for o in sched.take_swap_orders():
            grans.add(o.granularity)
            sched.on_swap_done(o.swap_id, ok=True)
        if plan is not None:
            sched.on_step_output(ex.run(plan))
    assert grans == {Granularity.BLOCK_LAYER}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 3)), min_size=2, max_size=10),
    st.integers(6, 20),
    st.integers(1, 40),
    st.integers(0, 4),
    st.integers(0, 30),
    st.sampled_from(["fcfs", "priority"]),
)
def test_random_priorities_swaps_and_cancels_leave_both_pools_exactly_full(
    requests: list[tuple[int, int, int]],
    num_blocks: int,
    host_blocks: int,
    delay: int,
    abort_at: int,
    policy: str,
) -> None:
    sched, ex = make_swapping(num_blocks=num_blocks, host_blocks=host_blocks, policy=policy), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=delay, executor=ex)
    ids = []
    for i, (prompt_len, max_tokens, prio) in enumerate(requests):
        if (prompt_len + max_tokens + BLOCK - 1) // BLOCK > num_blocks:
            continue
        s = seq(f"r{i}", prompt_len, max_tokens, priority=prio)
        sched.add(s)
        ids.append(s.request_id)
    sched.priority_updates = __import__("scheduler_svc.policy", fromlist=["x"]).PriorityUpdates(
        "random", 0.3, 4, abort_at
    )
    aborts = {abort_at: ids[0]} if ids else {}
    run_with_swaps(sched, ex, daemon, aborts=aborts)
    assert sched.blocks.num_free == num_blocks
    assert sched.swaps.host is not None and sched.swaps.host.num_free == host_blocks


def test_a_higher_priority_arrival_preempts_when_the_batch_cap_blocks_it() -> None:
    sched, ex = make(num_blocks=64, max_running=2, policy="priority"), FakeExecutor()
    low = [seq(f"low{i}", prompt_len=2, max_tokens=30, priority=0) for i in range(2)]
    for s in low:
        sched.add(s)
    for _ in range(3):
        plan = sched.schedule()
        assert plan is not None
        sched.on_step_output(ex.run(plan))
    high = seq("high", prompt_len=2, max_tokens=3, priority=9)
    sched.add(high)
    plan = sched.schedule()
    assert plan is not None
    assert "high" in [c.request_id for c in plan.chunks], "KV had room; only the batch cap blocked it"
    assert sum(s.preemptions for s in low) == 1
    sched.on_step_output(ex.run(plan))
    run_to_completion(sched, ex)
    assert all(s.finish is Finish.LENGTH for s in [*low, high])


def test_per_tenant_service_counts_prompt_and_generated_tokens_once() -> None:
    sched, ex = make(num_blocks=6), FakeExecutor()
    for i in range(4):
        sched.add(seq(f"r{i}", prompt_len=3, max_tokens=8, tenant="a" if i % 2 else "b"))
    run_to_completion(sched, ex)
    assert sched.stats.counter("preemptions") > 0  # recomputation happened but is not service
    for tenant in ("a", "b"):
        served = sched.stats.tenants()[tenant]
        assert (served.prompt_tokens, served.generated_tokens) == (6, 16)


def test_next_turn_reuses_the_kept_prefix_and_computes_only_the_rest() -> None:
    sched, ex = make(num_blocks=64, max_step_tokens=64), FakeExecutor()
    turn1 = seq("t1", prompt_len=10, max_tokens=5, conversation=("ten", "c"))
    sched.add(turn1)
    run_to_completion(sched, ex)
    assert kept(sched, ("ten", "c")).num_tokens == 14  # the last sampled token has no KV yet
    assert sched.conversations.get(("ten", "c")).tokens == turn1.tokens  # type: ignore[union-attr]
    kept_blocks = list(kept(sched, ("ten", "c")).blocks)
    turn2_prompt = turn1.tokens[:12] + [99, 98, 97, 96]  # diverges at 12 (re-tokenised history may)
    turn2 = Sequence("t2", turn2_prompt, Sampling(), 3, conversation=("ten", "c"))
    sched.add(turn2)
    assert turn2.reused_tokens == 12 and turn2.num_computed == 12
    assert turn2.block_table == kept_blocks[:3]
    plan = sched.schedule()
    assert plan is not None and plan.chunks[0].start_position == 12 and plan.chunks[0].token_ids == [99, 98, 97, 96]
    sched.on_step_output(ex.run(plan))
    run_to_completion(sched, ex)
    assert sched.stats.counter("reused_prefix_tokens") == 12
    assert_ownership(sched)


def test_kept_kv_is_evicted_before_any_request_is_preempted() -> None:
    sched, ex = make(num_blocks=8, max_step_tokens=64), FakeExecutor()
    sched.add(seq("t1", prompt_len=10, max_tokens=5, conversation=("ten", "c")))
    run_to_completion(sched, ex)
    assert sched.conversations.kept() and sched.blocks.num_free < 8
    others = [seq(f"o{i}", prompt_len=6, max_tokens=6) for i in range(2)]
    for s in others:
        sched.add(s)
    run_to_completion(sched, ex)
    assert not sched.conversations.kept() and sched.stats.counter("kept_kv_evicted") == 1
    assert sched.stats.counter("preemptions") == 0
    assert sched.blocks.num_free == 8


def test_an_idle_conversation_expires_after_the_ttl_with_its_history_and_end_frees_it_now(clock: FakeClock) -> None:
    sched, ex = make(num_blocks=64), FakeExecutor()
    for conv in ("a", "b"):
        sched.add(seq(f"t-{conv}", prompt_len=5, max_tokens=3, conversation=("ten", conv)))
    run_to_completion(sched, ex)
    assert sched.conversations.end(("ten", "a")) and not sched.conversations.end(("ten", "a"))
    clock.now += sched.config.conversation_ttl_s - 1
    sched.add(seq("x", prompt_len=2, max_tokens=1))
    run_to_completion(sched, ex)
    assert kept(sched, ("ten", "b")).num_tokens == 7, "not idle for the TTL yet"
    clock.now += 2
    sched.add(seq("y", prompt_len=2, max_tokens=1))
    run_to_completion(sched, ex)
    assert sched.conversations.get(("ten", "b")) is None, "the history expires with the KV"
    assert sched.stats.counter("kept_kv_expired") == 1 and sched.stats.counter("conversations_expired") == 1
    assert sched.blocks.num_free == 64


def test_another_tenant_never_reuses_a_conversations_kv() -> None:
    sched, ex = make(num_blocks=64), FakeExecutor()
    first = seq("t1", prompt_len=8, max_tokens=3, conversation=("alice", "c"))
    sched.add(first)
    run_to_completion(sched, ex)
    intruder = Sequence("t2", first.tokens[:10], Sampling(), 3, tenant="bob", conversation=("bob", "c"))
    sched.add(intruder)
    assert intruder.reused_tokens == 0 and intruder.num_computed == 0
    assert kept(sched, ("alice", "c")).num_tokens == 10


# -- conversations: KV kept across turns, on the device or the host ------------------------------


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What FakeExecutor generates for a prompt when every KV slot it reads is right."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(1 + sum((i + 1) * t for i, t in enumerate(tokens)) % 97)
    return tokens[len(prompt) :]


def make_conversing(num_blocks: int, host_blocks: int, **config: object) -> Scheduler:
    config.setdefault("max_running", 4)
    sched = Scheduler(
        SchedulerConfig(max_step_tokens=16, **config),  # type: ignore[arg-type]
        num_blocks=num_blocks,
        block_size=BLOCK,
        eos_token_ids={EOS},
    )
    if host_blocks:
        sched.attach_host_pool(host_blocks)
    return sched


def step(sched: Scheduler, ex: FakeExecutor, daemon: FakeSwapDaemon | None) -> bool:
    plan = sched.schedule()
    if daemon is not None:
        daemon.tick()
    if plan is not None:
        sched.on_step_output(ex.run(plan))
    assert_ownership(sched)
    return plan is not None or bool(sched.swaps.num_in_flight) or sched.has_work()


def finish(sched: Scheduler, ex: FakeExecutor, daemon: FakeSwapDaemon | None, *seqs: Sequence) -> None:
    for s in seqs:
        if s.request_id not in sched.requests:
            sched.add(s)
    for _ in range(2000):
        if all(s.finished for s in seqs):
            return
        step(sched, ex, daemon)
    raise AssertionError("no progress")


def turn(rid: str, prompt: list[int], max_tokens: int = 5, conv: str = "c", tenant: str = "ten") -> Sequence:
    return Sequence(rid, prompt, Sampling(), max_tokens, tenant=tenant, conversation=(tenant, conv))


def crowd(sched: Scheduler, ex: FakeExecutor, daemon: FakeSwapDaemon | None, blocks: int, rid: str) -> None:
    """A request that needs `blocks` blocks of the device, forcing kept KV off it."""
    other = seq(rid, prompt_len=blocks * BLOCK - 1, max_tokens=1)
    finish(sched, ex, daemon, other)
    assert other.output_ids == expected_output(other.prompt_ids, 1)


def test_kept_kv_spills_to_the_host_and_a_later_spill_moves_only_the_blocks_written_since() -> None:
    sched, ex = make_conversing(num_blocks=16, host_blocks=64), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=2, executor=ex)
    t1 = turn("t1", list(range(10, 40)))  # 30 prompt tokens
    finish(sched, ex, daemon, t1)
    n1 = 34  # tokens with KV: the prompt and 4 of the 5 generated (the last has none yet)
    assert kept(sched, ("ten", "c")).num_tokens == n1 and daemon.blocks["out"] == 0

    crowd(sched, ex, daemon, blocks=16, rid="crowd1")  # the whole pool: the kept KV must leave the device
    kv = kept(sched, ("ten", "c"))
    assert not kv.blocks and kv.host_tokens == n1
    assert daemon.blocks["out"] == -(-n1 // BLOCK) == 9  # the first spill moves everything

    t2 = turn("t2", t1.tokens + [90, 91, 92, 93, 94, 95])  # the history, then a new user message
    sched.add(t2)
    assert t2.state.value == "swapped" and t2.num_computed == n1 and t2.reused_tokens == n1
    finish(sched, ex, daemon, t2)
    assert t2.output_ids == expected_output(t2.prompt_ids, 5), "KV swapped back in from the host was wrong"
    assert daemon.blocks["in"] == 9
    n2 = len(t2.prompt_ids) + 4
    assert kept(sched, ("ten", "c")).host_tokens == n1, "the host copy of turn 1 is still valid"

    out_before, saved_before = daemon.blocks["out"], sched.stats.counter("swap_out_blocks_saved")
    crowd(sched, ex, daemon, blocks=16, rid="crowd2")
    # Blocks 0-7 hold turn 1's 32 tokens on the host already; block 8 (2 of its slots on the host)
    # is copied again, with the blocks written since: 8..ceil(n2/4)-1.
    assert daemon.blocks["out"] - out_before == -(-n2 // BLOCK) - n1 // BLOCK == 4
    assert sched.stats.counter("swap_out_blocks_saved") - saved_before == n1 // BLOCK == 8

    t3 = turn("t3", t2.tokens + [80, 81])
    finish(sched, ex, daemon, t3)
    assert t3.reused_tokens == n2 and t3.output_ids == expected_output(t3.prompt_ids, 5)
    assert sched.stats.counter("reused_from_host_tokens") == n1 + n2
    assert sched.conversations.end(("ten", "c"))
    assert sched.blocks.num_free == 16 and sched.swaps.host is not None and sched.swaps.host.num_free == 64


def test_a_preempted_turn_swapped_back_in_moves_only_its_new_blocks_out_again() -> None:
    sched, ex = make_conversing(num_blocks=12, host_blocks=64, policy="priority"), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=1, executor=ex)
    low = seq("low", prompt_len=20, max_tokens=24, priority=0)  # 44 tokens: 11 blocks at the end
    sched.add(low)
    for _ in range(4):
        step(sched, ex, daemon)
    high = seq("high", prompt_len=31, max_tokens=1, priority=5)  # 8 blocks: low must go
    finish(sched, ex, daemon, high)
    assert low.preemptions == 1
    first_out = daemon.blocks["out"]
    for _ in range(100):
        if low.state.value == "running" and low.num_computed >= low.host_tokens + 2 * BLOCK:
            break
        step(sched, ex, daemon)
    computed, on_host = low.num_computed, low.host_tokens
    assert on_host > 0, "the host copy is kept after the swap-in"
    high2 = seq("high2", prompt_len=31, max_tokens=1, priority=5)
    finish(sched, ex, daemon, high2)
    assert low.preemptions == 2
    assert daemon.blocks["out"] - first_out == -(-computed // BLOCK) - on_host // BLOCK
    finish(sched, ex, daemon, low)
    assert low.output_ids == expected_output(low.prompt_ids, 24)


def test_a_turn_arriving_while_its_kv_spills_waits_for_the_copy_then_reuses_it() -> None:
    """(A second turn arriving meanwhile does not wait too: it recomputes.)"""
    sched, ex = make_conversing(num_blocks=16, host_blocks=64), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=50, executor=ex)
    t1 = turn("t1", list(range(10, 30)))
    finish(sched, ex, daemon, t1)
    sched.add(seq("big", prompt_len=63, max_tokens=1))
    while not sched.swaps.num_in_flight:
        step(sched, ex, daemon)
    t2, t3 = turn("t2", t1.tokens + [77]), turn("t3", t1.tokens + [78])
    sched.add(t2)
    sched.add(t3)
    assert t2.state.value == "awaiting_kv" and t3.state.value == "waiting"
    daemon.drain()
    assert t2.state.value in ("swapped", "swapping_in") and t2.reused_tokens == 24
    finish(sched, ex, daemon, t2, t3)
    assert t2.output_ids == expected_output(t2.prompt_ids, 5)
    assert t3.reused_tokens == 0 and t3.output_ids == expected_output(t3.prompt_ids, 5)
    assert sched.conversations.end(("ten", "c"))
    daemon.drain()
    assert_ownership(sched)
    assert sched.blocks.num_free == 16


def test_the_host_budget_evicts_the_least_recently_used_conversation_which_then_recomputes() -> None:
    sched, ex = make_conversing(num_blocks=12, host_blocks=64, conversation_host_blocks=6), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=1, executor=ex)
    a, b = turn("a1", list(range(10, 26)), conv="a"), turn("b1", list(range(30, 46)), conv="b")  # 5 blocks each
    finish(sched, ex, daemon, a)
    finish(sched, ex, daemon, b)
    crowd(sched, ex, daemon, blocks=12, rid="crowd")
    assert sched.stats.counter("kept_kv_host_evicted") >= 1
    assert sched.conversations.get(("ten", "a")).kv is None  # type: ignore[union-attr]
    assert kept(sched, ("ten", "b")).host_tokens == 20
    a2, b2 = turn("a2", a.tokens + [5], conv="a"), turn("b2", b.tokens + [6], conv="b")
    finish(sched, ex, daemon, a2, b2)
    assert a2.reused_tokens == 0 and b2.reused_tokens == 20
    # History computed again: all 21 tokens of a's turn 1, and the last token b's turn 1 generated
    # (the last sampled token never had KV).
    assert sched.stats.counter("recomputed_prefix_tokens") == 21 + 1
    assert a2.output_ids == expected_output(a2.prompt_ids, 5) and b2.output_ids == expected_output(b2.prompt_ids, 5)


def test_kept_kv_on_the_host_is_lost_with_the_daemon_and_the_next_turn_recomputes() -> None:
    sched, ex = make_conversing(num_blocks=12, host_blocks=64), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=1, executor=ex)
    t1 = turn("t1", list(range(10, 26)))
    finish(sched, ex, daemon, t1)
    crowd(sched, ex, daemon, blocks=12, rid="crowd")
    assert kept(sched, ("ten", "c")).host_tokens == 20
    sched.on_swap_daemon_lost()
    assert not sched.conversations.kept()
    t2 = turn("t2", t1.tokens + [3])
    finish(sched, ex, None, t2)
    assert t2.reused_tokens == 0 and t2.output_ids == expected_output(t2.prompt_ids, 5)


def test_without_kv_reuse_nothing_is_kept_and_swap_ins_drop_the_host_copy() -> None:
    sched, ex = make_conversing(num_blocks=64, host_blocks=64, kv_reuse=False), FakeExecutor()
    t1 = turn("t1", list(range(10, 26)))
    finish(sched, ex, None, t1)
    assert not sched.conversations.kept()
    t2 = turn("t2", t1.tokens + [3])
    finish(sched, ex, None, t2)
    assert t2.reused_tokens == 0 and sched.stats.counter("recomputed_prefix_tokens") == 21


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 9), min_size=2, max_size=4), min_size=1, max_size=4),
    st.integers(8, 20),
    st.sampled_from([0, 6, 24, 64]),
    st.integers(0, 3),
    st.sampled_from([0, 4, 12]),
    st.sampled_from([0, 11, 23]),
    st.data(),
)
def test_random_conversations_under_pressure_match_the_reference_and_free_everything(
    conversations: list[list[int]],
    num_blocks: int,
    host_blocks: int,
    delay: int,
    budget: int,
    filler: int,
    data: st.DataObject,
) -> None:
    """Conversations of several turns, each turn sent once the last ended, with crowding requests,
    random priority churn, copies landing late, and now and then a turn cancelled. Every turn's
    output is what it would be alone, and once every conversation ends both pools are exactly free."""
    sched = make_conversing(num_blocks, host_blocks, conversation_host_blocks=budget, policy="priority")
    ex = FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=delay, executor=ex) if host_blocks else None
    sched.priority_updates = __import__("scheduler_svc.policy", fromlist=["x"]).PriorityUpdates("random", 0.2, 4, 7)
    history = {i: list(range(10 + 20 * i, 14 + 20 * i)) for i in range(len(conversations))}
    live: dict[int, Sequence] = {}
    done: list[Sequence] = []
    pending = {i: list(turns) for i, turns in enumerate(conversations)}
    n = 0
    ready_at = dict.fromkeys(pending, 0)  # a user's think time between turns: kept KV may spill meanwhile
    for clock in range(4000):
        for i, turns in pending.items():
            if i in live and live[i].finished:
                s = live.pop(i)
                done.append(s)
                history[i] = s.tokens if s.finish is Finish.LENGTH else history[i]
                ready_at[i] = clock + data.draw(st.sampled_from([0, 3, 12]), label="think")
            if i not in live and turns and clock >= ready_at[i]:
                new = turns.pop(0)
                prompt = history[i] + list(range(60, 60 + new))
                if -(-(len(prompt) + 3) // BLOCK) > num_blocks:
                    turns.clear()
                    continue
                n += 1
                live[i] = turn(f"c{i}-{n}", prompt, max_tokens=3, conv=str(i))
                sched.add(live[i])
                if filler and n % 2:
                    other = seq(f"f{n}", prompt_len=filler, max_tokens=2)
                    if -(-(filler + 2) // BLOCK) <= num_blocks:
                        sched.add(other)
                        done.append(other)
        if live and data.draw(st.integers(0, 150), label="cancel") == 0:
            victim = next(iter(live.values()))
            sched.abort(victim.request_id)
            assert_ownership(sched)
        busy = step(sched, ex, daemon)
        if not busy and not live and not any(pending.values()):
            break
    else:
        raise AssertionError("no progress")
    for s in done:
        assert s.finished
        if s.finish is Finish.LENGTH:
            assert s.output_ids == expected_output(s.prompt_ids, s.max_tokens), s.request_id
    if daemon is not None:
        daemon.drain()
    for i in range(len(conversations)):
        sched.conversations.end(("ten", str(i)))
    assert_ownership(sched)
    assert sched.blocks.num_free == num_blocks
    assert sched.swaps.host is None or sched.swaps.host.num_free == host_blocks


def test_a_lost_executor_takes_kept_and_swapped_in_kv_with_it_and_those_turns_recompute() -> None:
    sched, ex = make_conversing(num_blocks=32, host_blocks=64), FakeExecutor()
    t1 = turn("t1", list(range(10, 30)))
    finish(sched, ex, None, t1)
    assert kept(sched, ("ten", "c")).blocks
    sched.on_executor_lost()
    ex = FakeExecutor()  # a new process: an empty pool
    assert not sched.conversations.kept()
    t2 = turn("t2", t1.tokens + [4])
    finish(sched, ex, None, t2)
    assert t2.reused_tokens == 0 and t2.output_ids == expected_output(t2.prompt_ids, 5)
    sched.conversations.end(("ten", "c"))
    assert sched.blocks.num_free == 32


def test_phases_say_where_a_preempted_requests_time_went(clock: FakeClock) -> None:
    sched, ex = make_conversing(num_blocks=8, host_blocks=32, policy="priority"), FakeExecutor()
    daemon = FakeSwapDaemon(sched, delay=2, executor=ex)

    def timed_step() -> None:  # each step (and each wait between steps) takes a second
        plan = sched.schedule()
        daemon.tick()
        clock.now += 1.0
        if plan is not None:
            sched.on_step_output(ex.run(plan))

    low = seq("low", prompt_len=6, max_tokens=10, priority=0)
    sched.add(low)
    for _ in range(4):  # a prefill step, then decodes
        timed_step()
    high = seq("high", prompt_len=27, max_tokens=2, priority=5)  # 8 blocks: low must leave the device
    sched.add(high)
    while not low.finished:
        timed_step()
    low_s, high_s = low.phases.seconds(), high.phases.seconds()
    assert low.preemptions == 1 and low_s["queued"] == 0.0 and low_s["prefill"] == 1.0 and low_s["decode"] > 0
    assert low_s["preempted"] > 0 and low_s["swap_in"] > 0, "swapped out, then waited for its KV to come back"
    assert low_s["blocked"] > 0, "while high held the whole pool"
    assert high_s["blocked"] > 0, "it waited for low's blocks to be copied out"
    assert sum(low_s.values()) == low.phases.since - low.arrival
    assert sum(high_s.values()) == high.phases.since - high.arrival
