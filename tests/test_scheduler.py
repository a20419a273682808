"""The scheduler's decisions, without a model: a fake executor checks every plan it is sent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fastswitch.common.plan import Sampling, StepOutput, StepPlan
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish, Sequence

BLOCK = 4
EOS = 0


class FakeExecutor:
    """Mirrors what executor_svc keeps (block tables from diffs) and checks each plan against it."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}

    def run(self, plan: StepPlan) -> StepOutput:
        for rid in plan.released_request_ids:
            self.tables.pop(rid, None)
        for new in plan.new_requests:
            self.tables[new.request_id] = []
        tokens = []
        for chunk in plan.chunks:
            table = self.tables[chunk.request_id]
            table.extend(chunk.new_block_ids)
            end = chunk.start_position + len(chunk.token_ids)
            assert len(table) * BLOCK >= end, "a chunk's tokens must fit the blocks it was given"
            if chunk.sample:
                tokens.append((chunk.request_id, 1 + (end % 7)))  # deterministic, never EOS
        return StepOutput(plan.step_id, tokens)


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
    owned = [b for s in sched.requests.values() for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert sched.allocator.num_free + len(owned) == sched.allocator.num_blocks


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
        sched.on_step_output(ex.run(plan))
    assert sent == list(range(len(sent))), "blocks are sent once each, contiguous from an empty pool"


def test_pool_exhaustion_preempts_the_latest_arrival_and_everything_completes() -> None:
    sched, ex = make(num_blocks=6, max_step_tokens=16, max_running=4), FakeExecutor()
    seqs = [seq(f"r{i}", prompt_len=3, max_tokens=8) for i in range(4)]
    for s in seqs:
        sched.add(s)
    run_to_completion(sched, ex)
    assert sched.stats.counters["preemptions"] > 0
    assert all(s.finish is Finish.LENGTH and len(s.output_ids) == 8 for s in seqs)
    assert sched.allocator.num_free == 6


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
        assert len(plan.chunks) <= 2
        sched.on_step_output(ex.run(plan))


def test_abort_frees_blocks_and_tells_the_executor_to_release() -> None:
    sched, ex = make(num_blocks=64), FakeExecutor()
    sched.add(seq("a", prompt_len=5, max_tokens=50))
    plan = sched.schedule()
    assert plan is not None
    sched.on_step_output(ex.run(plan))
    assert sched.allocator.num_free < 64
    assert sched.abort("a") is not None
    assert sched.allocator.num_free == 64
    plan = sched.schedule()
    assert plan is not None and plan.released_request_ids == ["a"] and not plan.chunks
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
    assert sched.allocator.num_free == 64


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
        st.tuples(st.integers(1, 20), st.integers(1, 12), st.booleans(), st.integers(0, 3)), min_size=1, max_size=12
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
    assert sched.allocator.num_free == num_blocks
    assert not sched.running and not sched.waiting
    for s, abort, _ in seqs:
        assert s.finished
        if s.finish is Finish.LENGTH:
            assert len(s.output_ids) == s.max_tokens
