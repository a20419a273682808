"""The steady-state decode path plans exactly what the full walk plans; the packed plan round-trips.

Each step of a randomized run is planned twice from the same state: by the scheduler as it runs (the
fast path where the state is steady) and by a copy with the fast path off (the full walk). The plans,
the executor's answers and every piece of state after applying them must be the same.
"""

from __future__ import annotations

import copy
import random

import pytest

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish, Sequence
from scheduler_svc.vtc import VirtualTokenCounter
from svc_common.plan import DecodeBatch, NewRequest, Sampling, ScheduledChunk, StepOutput, StepPlan
from tests.test_scheduler import BLOCK, EOS, FakeExecutor, assert_ownership, expected_output

TENANTS = ("ann", "bob", "cy")


def canonical(plan: StepPlan | None) -> object:
    """A plan with its decode batch as a set (its order only pairs decodes with their tokens)."""
    if plan is None:
        return None
    d = plan.decodes
    grants: dict[int, list[int]] = {}
    for slot, block in zip(d.block_slots, d.block_ids, strict=True):
        grants.setdefault(slot, []).append(block)
    return (
        plan.step_id,
        plan.new_requests,
        plan.chunks,
        plan.released_request_ids,
        sorted(zip(d.slots, d.token_ids, d.positions, strict=True)),
        grants,
    )


def state(sched: Scheduler) -> object:
    """Everything a step can change, in comparable form."""
    requests = sorted(
        (
            s.request_id,
            s.state.value,
            s.num_computed,
            tuple(s.tokens),
            tuple(s.block_table),
            s.unsent_blocks,
            s.executor_known,
            s.slot if s.executor_known else None,
            s.priority,
            s.prompt_served,
            s.preemptions,
            s.blocked,
            s.queued_blocks,
            s.phases.current,
        )
        for s in sched.requests.values()
    )
    counters = {k: v for k, v in sched.stats.counters().items() if k != "steps_decode_only"}
    service = sched.policy.tenant_service() if isinstance(sched.policy, VirtualTokenCounter) else None
    return (
        requests,
        [s.request_id for s in sched.running],
        [s.request_id for s in sched.waiting],
        sched.blocks.allocator.free_runs(),
        sched._releases,
        sched.queued_blocks,
        counters,
        sched.stats.tenants(),
        service,
    )


def new_request(rng: random.Random, i: int) -> Sequence:
    prompt = [rng.randrange(1, 90) for _ in range(rng.randint(1, 9))]
    return Sequence(
        f"r{i}",
        prompt,
        Sampling(),
        max_tokens=rng.randint(1, 14),
        ignore_eos=rng.random() < 0.5,
        tenant=rng.choice(TENANTS),
        priority=rng.randrange(3),
    )


def run_both_ways(policy: str, seed: int) -> dict[str, int]:
    """A random run, each step planned both ways; returns how often the fast path planned a step, gave a
    request a new block on the way and carried releases."""
    rng = random.Random(seed)
    max_running = rng.choice([2, 4, 8])
    config = SchedulerConfig(
        max_step_tokens=rng.choice([max_running, 16, 64]),
        max_running=max_running,
        policy=policy,
        priority_updates=rng.choice(["none", "random"]),
        priority_update_prob=0.05,
        tenant_weights={"bob": 2.0} if rng.random() < 0.5 else {},
        seed=seed,
    )
    sched = Scheduler(config, num_blocks=rng.choice([6, 12, 64]), block_size=BLOCK, eos_token_ids={EOS})
    ex = FakeExecutor()
    seen = {"fast": 0, "grown": 0, "released": 0}
    arrivals = 0
    for _ in range(120):
        if rng.random() < 0.12 or not sched.requests:
            sched.add(new_request(rng, arrivals))
            arrivals += 1
        if sched.requests and rng.random() < 0.03:
            sched.abort(rng.choice(sorted(sched.requests)))
        walk, walk_ex = copy.deepcopy((sched, ex))
        walk.fast_path = False
        fast_before = sched.stats.counter("steps_decode_only")
        plan, walk_plan = sched.schedule(), walk.schedule()
        assert canonical(plan) == canonical(walk_plan)
        assert state(sched) == state(walk)
        lowest, walk_lowest = sched.lowest_running, walk.lowest_running
        assert (lowest and lowest.request_id) == (walk_lowest and walk_lowest.request_id)
        if sched.stats.counter("steps_decode_only") > fast_before:
            assert plan is not None and not plan.chunks
            seen["fast"] += 1
            seen["grown"] += bool(plan.decodes.block_ids)
            seen["released"] += bool(plan.released_request_ids)
        if plan is None or walk_plan is None:
            continue
        out, walk_out = ex.run(plan), walk_ex.run(walk_plan)
        events, walk_events = sched.on_step_output(out), walk.on_step_output(walk_out)
        assert sorted((e.seq.request_id, e.token_id) for e in events) == sorted(
            (e.seq.request_id, e.token_id) for e in walk_events
        )
        assert state(sched) == state(walk)
        assert_ownership(sched)
        for s in sched.requests.values():
            assert s.phases.current is s.phase(), f"{s.request_id}'s phase clock is behind its state"
    return seen


@pytest.mark.parametrize("policy", ["fcfs", "priority", "vtc"])
def test_the_decode_path_plans_what_the_full_walk_plans(policy: str) -> None:
    totals = {"fast": 0, "grown": 0, "released": 0}
    for seed in range(25):
        for key, n in run_both_ways(policy, seed).items():
            totals[key] += n
    # The comparison means something only if the fast path ran, crossed block boundaries and released.
    assert totals["fast"] > 1000 and totals["grown"] > 200 and totals["released"] > 50, totals


def test_the_steady_state_skips_the_walk_and_a_short_pool_falls_back_to_it() -> None:
    config = SchedulerConfig(max_step_tokens=16, max_running=4)
    sched, ex = Scheduler(config, num_blocks=8, block_size=BLOCK, eos_token_ids={EOS}), FakeExecutor()
    seqs = [Sequence(f"r{i}", [10 + i, 11, 12, 13], Sampling(), 9, ignore_eos=True) for i in range(4)]
    for s in seqs:
        sched.add(s)
    plans, fast = [], []
    while (plan := sched.schedule()) is not None:
        plans.append(plan)
        fast.append(sched.stats.counter("steps_decode_only") == sum(fast) + 1)
        sched.on_step_output(ex.run(plan))
    # Step 1 prefills the 4-token prompts (4 blocks); step 2 decodes into a new block each (8 in all),
    # steps 3-5 within them; step 6 needs 4 more and the pool is empty: the walk preempts.
    assert fast[:6] == [False, True, True, True, True, False]
    assert plans[1].decodes.block_ids and not any(p.decodes.block_ids for p in plans[2:5])
    assert sched.stats.counter("preemptions") > 0 and plans[5].released_request_ids
    assert all(len(s.output_ids) == 9 for s in seqs) and sched.blocks.num_free == 8


def test_a_packed_plan_and_result_round_trip_through_protobuf() -> None:
    plan = StepPlan(
        7,
        [NewRequest("n", Sampling(temperature=0.5, top_k=3, seed=9), slot=4)],
        [ScheduledChunk("n", [1, 2, 3], 0, [8, 9], True)],
        ["gone"],
        DecodeBatch([0, 2, 3], [5, 6, 7], [16, 31, 4], block_slots=[2, 2], block_ids=[11, 12]),
    )
    msg = plan.to_proto()
    assert list(msg.decodes.slots) == [0, 2, 3] and msg.new_requests[0].slot == 4
    assert StepPlan.from_proto(type(msg).FromString(msg.SerializeToString())) == plan
    assert StepPlan.from_proto(StepPlan(8).to_proto()) == StepPlan(8)
    out = StepOutput(7, [("n", 42)], forward_ns=5, sample_ns=6, decode_tokens=[1, 0, 3])
    assert StepOutput.from_proto(type(out.to_proto()).FromString(out.to_proto().SerializeToString())) == out


def test_a_decode_batch_is_the_same_work_as_one_chunk_per_decode() -> None:
    batch = DecodeBatch(slots=[3, 1], token_ids=[5, 6], positions=[16, 9], block_slots=[3, 3], block_ids=[40, 41])
    assert batch.chunks({1: "b", 3: "a"}) == [
        ScheduledChunk("a", [5], 16, [40, 41], True),
        ScheduledChunk("b", [6], 9, [], True),
    ]
    assert StepPlan(0, decodes=batch).num_tokens == 2


def run_with_lookahead(seed: int) -> dict[str, int]:
    """A random run driven as the executor link drives it: the walk with no step in flight, and the next
    decode step planned while one runs; cancellations and stop strings land between the two."""
    rng = random.Random(seed)
    config = SchedulerConfig(max_step_tokens=32, max_running=rng.choice([2, 4, 8]))
    sched = Scheduler(config, num_blocks=rng.choice([8, 16, 64]), block_size=BLOCK, eos_token_ids={EOS})
    ex = FakeExecutor()
    seqs: list[Sequence] = []
    in_flight: list[StepPlan] = []
    ended_in_flight = 0
    for i in range(400):
        if i < 300 and (rng.random() < 0.06 or not sched.requests):
            seqs.append(new_request(rng, len(seqs)))
            sched.add(seqs[-1])
        if not in_flight and (plan := sched.schedule()) is not None:
            in_flight.append(plan)
        if (ahead := sched.plan_ahead()) is not None:
            assert ahead.decodes.previous_tokens and not ahead.decodes.token_ids and not ahead.chunks
            in_flight.append(ahead)
        assert len(in_flight) <= 2
        if len(in_flight) == 2 and sched.requests and rng.random() < 0.1:  # while two steps are in flight
            victim = sched.requests[rng.choice(sorted(sched.requests))]
            if rng.random() < 0.5:
                sched.abort(victim.request_id)
            else:
                sched.finish(victim, Finish.STOP)
            ended_in_flight += 1
        if in_flight:
            sched.on_step_output(ex.run(in_flight.pop(0)))
        assert_ownership(sched)
        for s in seqs:
            assert s.output_ids == expected_output(s.prompt_ids, len(s.output_ids)), s.request_id
    assert not sched.requests and not in_flight
    assert sched.blocks.num_free == sched.blocks.num_blocks
    for s in seqs:
        assert s.finish is not Finish.LENGTH or len(s.output_ids) == s.max_tokens
    return {"ahead": int(sched.stats.counter("steps_ahead")), "ended_in_flight": ended_in_flight}


def test_steps_planned_ahead_give_the_tokens_of_one_step_at_a_time() -> None:
    """Each step planned while another runs feeds the tokens that step samples (the executor knows them
    first); requests ending meanwhile (max_tokens, a stop string, a cancellation) compute a token in
    vain, which is dropped, and leak no block."""
    totals = {"ahead": 0, "ended_in_flight": 0}
    for seed in range(20):
        for key, n in run_with_lookahead(seed).items():
            totals[key] += n
    assert totals["ahead"] > 1000 and totals["ended_in_flight"] > 50, totals


def test_no_lookahead_plans_one_step_at_a_time() -> None:
    config = SchedulerConfig(max_step_tokens=16, max_running=4, lookahead=False)
    sched, ex = Scheduler(config, num_blocks=16, block_size=BLOCK, eos_token_ids={EOS}), FakeExecutor()
    sched.add(Sequence("r", [10, 11], Sampling(), 6, ignore_eos=True))
    while (plan := sched.schedule()) is not None:
        assert sched.plan_ahead() is None
        sched.on_step_output(ex.run(plan))
    assert sched.stats.counter("steps_ahead") == 0
