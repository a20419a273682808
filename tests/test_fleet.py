"""The fleet's decisions across nodes, without a model or gRPC: each node's plans run on its own fake
executor, and the fleet places, balances and evacuates requests the way the node links drive it."""

from __future__ import annotations

import pytest

from scheduler_svc.config import NodeAddress, SchedulerConfig
from scheduler_svc.fleet import Fleet, Node, NodeState
from scheduler_svc.sequence import Finish, RequestState, Sequence
from tests.test_scheduler import BLOCK, FakeExecutor, assert_ownership, expected_output, seq, turn


def make_fleet(nodes: int, num_blocks: int = 32, **config: object) -> tuple[Fleet, dict[int, FakeExecutor]]:
    config.setdefault("max_step_tokens", 16)
    config.setdefault("max_running", 4)
    fleet = Fleet(SchedulerConfig(**config), [NodeAddress(f"node{i}:1") for i in range(nodes)])  # type: ignore[arg-type]
    fleet.eos_token_ids.add(0)
    for node in fleet.nodes:
        up(fleet, node, num_blocks)
    return fleet, {n.index: FakeExecutor() for n in fleet.nodes}


def up(fleet: Fleet, node: Node, num_blocks: int = 32) -> None:
    fleet.attach(node, num_blocks, BLOCK)
    fleet.node_up(node)


def step_all(fleet: Fleet, executors: dict[int, FakeExecutor]) -> bool:
    """One step of every node that is up, as its link runs it; True if any node had work."""
    busy = False
    for node in fleet.up_nodes():
        sched = node.scheduler
        assert sched is not None
        plan = sched.schedule()
        if sched.passed_over:
            fleet.balance()
        assert_queue_totals(fleet)
        if plan is None:
            fleet.balance()
            continue
        busy = True
        node.steps += 1
        sched.on_step_output(executors[node.index].run(plan))
        assert_ownership(sched)
    return busy


def assert_queue_totals(fleet: Fleet) -> None:
    """Each node's running total of its queue's block needs (what placement weighs) is the sum over it."""
    for node in fleet.up_nodes():
        assert node.scheduler is not None and node.scheduler.queued_blocks == queued_need(node)


def run(fleet: Fleet, executors: dict[int, FakeExecutor], *seqs: Sequence, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if all(s.finished for s in seqs):
            return
        step_all(fleet, executors)
    raise AssertionError("the fleet made no progress")


def where(fleet: Fleet, s: Sequence) -> int:
    node = fleet.node_of(s)
    assert node is not None, f"{s.request_id} is on no node"
    return node.index


def test_new_requests_spread_over_the_nodes_with_the_most_free_capacity() -> None:
    fleet, executors = make_fleet(3)
    seqs = [seq(f"r{i}", prompt_len=6, max_tokens=5) for i in range(6)]
    for s in seqs:
        fleet.add(s)
    assert sorted(where(fleet, s) for s in seqs) == [0, 0, 1, 1, 2, 2]
    run(fleet, executors, *seqs)
    assert all(s.output_ids == expected_output(s.prompt_ids, 5) for s in seqs)
    assert [n.scheduler.generated_tokens for n in fleet.nodes if n.scheduler] == [10, 10, 10]


def test_the_nodes_share_one_policy_one_statistics_and_one_conversation_cache() -> None:
    fleet, _ = make_fleet(2, policy="vtc")
    a, b = (n.scheduler for n in fleet.nodes)
    assert a is not None and b is not None
    assert a.policy is b.policy is fleet.policy and a.stats is b.stats is fleet.stats
    assert a.conversations is b.conversations is fleet.conversations
    assert a.blocks is not b.blocks and a.swaps is not b.swaps, "each node's pools are its own"


def test_vtc_counts_a_tenant_as_live_when_its_requests_run_on_another_node() -> None:
    fleet, executors = make_fleet(2, policy="vtc", max_running=1)
    busy = seq("busy", prompt_len=4, max_tokens=30, tenant="heavy")
    fleet.add(busy)
    for _ in range(10):
        step_all(fleet, executors)
    other = seq("light", prompt_len=4, max_tokens=30, tenant="light")
    fleet.add(other)
    assert where(fleet, other) != where(fleet, busy)
    served = fleet.policy.service("heavy")  # type: ignore[attr-defined]
    assert served > 0
    # A second request of the heavy tenant lands on the light tenant's node: heavy is still live on
    # the other node, so it is not lifted to the floor as if it came back from idle.
    second = seq("busy2", prompt_len=4, max_tokens=3, tenant="heavy")
    fleet.add(second)
    assert fleet.policy.service("heavy") == served  # type: ignore[attr-defined]


def test_a_conversations_next_turn_goes_to_the_node_that_keeps_its_kv_and_reuses_it() -> None:
    fleet, executors = make_fleet(3)
    filler = [seq(f"f{i}", prompt_len=4, max_tokens=30) for i in range(2)]
    for s in filler:
        fleet.add(s)
    t1 = turn("t1", list(range(10, 22)), max_tokens=4)
    fleet.add(t1)
    home = where(fleet, t1)
    run(fleet, executors, t1)
    assert fleet.nodes[home].scheduler is not None
    assert fleet.conversations.node_of(("ten", "c")) is fleet.nodes[home].scheduler.swaps
    # However busy its home is, the next turn goes back to it and reuses its KV.
    for i in range(3):
        fleet.nodes[home].scheduler.add(seq(f"load{i}", prompt_len=4, max_tokens=10))
    t2 = turn("t2", t1.tokens + [7, 8, 9], max_tokens=4)
    fleet.add(t2)
    assert where(fleet, t2) == home and t2.reused_tokens == len(t1.tokens) - 1  # all but the last token's KV
    run(fleet, executors, t2, *filler)
    assert t2.output_ids == expected_output(t2.prompt_ids, 4)


def test_a_node_that_comes_up_takes_the_requests_another_node_queues() -> None:
    fleet, executors = make_fleet(2, max_running=2)
    fleet.nodes[1].state = NodeState.CONNECTING  # not up yet: everything goes to node 0
    seqs = [seq(f"r{i}", prompt_len=4, max_tokens=12) for i in range(6)]
    for s in seqs:
        fleet.add(s)
    step_all(fleet, executors)
    assert all(where(fleet, s) == 0 for s in seqs)
    assert fleet.nodes[0].scheduler is not None and len(fleet.nodes[0].scheduler.waiting) == 4
    fleet.node_up(fleet.nodes[1])  # its link attached it
    step_all(fleet, executors)
    on_new = [s for s in seqs if where(fleet, s) == 1]
    assert len(on_new) == 2, "the idle node takes as many as it can run at once"
    assert all(s.state is RequestState.RUNNING for s in on_new)
    run(fleet, executors, *seqs)
    assert all(s.output_ids == expected_output(s.prompt_ids, 12) for s in seqs)
    assert fleet.stats.counter("requests_rebalanced") == 2


def test_no_node_idles_while_another_queues() -> None:
    fleet, executors = make_fleet(3, max_running=2)
    seqs = [seq(f"r{i}", prompt_len=4, max_tokens=6 + 8 * (i % 3 == 0)) for i in range(12)]
    for s in seqs:
        fleet.add(s)
    for _ in range(200):
        step_all(fleet, executors)
        queued = [n for n in fleet.nodes if n.scheduler and n.scheduler.waiting]
        idle = [n for n in fleet.nodes if n.scheduler and not n.scheduler.running and not n.scheduler.waiting]
        assert not (queued and idle), f"node {idle[0].index} idles while node {queued[0].index} queues"
        if all(s.finished for s in seqs):
            break
    assert all(s.output_ids == expected_output(s.prompt_ids, s.max_tokens) for s in seqs)


def test_a_higher_priority_request_preempts_the_lowest_ranked_one_anywhere_in_the_fleet() -> None:
    fleet, executors = make_fleet(2, max_running=1, policy="priority")
    mid = seq("mid", prompt_len=4, max_tokens=40, priority=3)
    low = seq("low", prompt_len=4, max_tokens=40, priority=0)
    fleet.add(mid)
    fleet.add(low)
    assert {where(fleet, mid), where(fleet, low)} == {0, 1}
    step_all(fleet, executors)
    # A priority-1 request queued on mid's node ranks below mid there, but above low on the other node.
    high = seq("high", prompt_len=4, max_tokens=3, priority=1)
    mid_node = fleet.nodes[where(fleet, mid)]
    assert mid_node.scheduler is not None
    mid_node.scheduler.add(high)
    step_all(fleet, executors)
    step_all(fleet, executors)
    assert where(fleet, high) == where(fleet, low)
    run(fleet, executors, high)
    assert low.preemptions == 1 and mid.preemptions == 0
    run(fleet, executors, mid, low)
    assert all(s.output_ids == expected_output(s.prompt_ids, s.max_tokens) for s in (mid, low, high))


def test_a_request_that_only_waits_for_its_nodes_step_budget_preempts_nobody_elsewhere() -> None:
    """Its node has a batch place for it, and the step's tokens go to a long prompt ranked above it: it
    runs there within a few steps, so moving it to preempt a lower-ranked request on another node would
    only churn."""
    fleet, executors = make_fleet(2, max_running=2, max_step_tokens=16, policy="priority")
    lows = [seq(f"low{i}", prompt_len=4, max_tokens=30, priority=0) for i in range(2)]
    node1 = fleet.nodes[1].scheduler
    assert node1 is not None
    for s in lows:
        node1.add(s)
    long = seq("long", prompt_len=96, max_tokens=3, priority=5)
    later = seq("later", prompt_len=4, max_tokens=3, priority=4)
    node0 = fleet.nodes[0].scheduler
    assert node0 is not None
    node0.add(long)
    node0.add(later)
    step_all(fleet, executors)  # long's prefill takes the whole budget: later is passed over, for budget
    assert later in node0.passed_over and not node0.short_of_room
    assert where(fleet, later) == 0 and all(s.preemptions == 0 for s in lows)
    run(fleet, executors, long, later)
    assert where(fleet, lows[0]) == 1 and all(s.preemptions == 0 for s in lows)
    assert later.output_ids == expected_output(later.prompt_ids, 3)
    run(fleet, executors, *lows)


def test_a_lost_nodes_requests_recompute_on_the_others_and_complete_token_identical() -> None:
    fleet, executors = make_fleet(3)
    seqs = [seq(f"r{i}", prompt_len=5, max_tokens=20) for i in range(9)]
    for s in seqs:
        fleet.add(s)
    for _ in range(6):
        step_all(fleet, executors)
    lost = fleet.nodes[1]
    assert lost.scheduler is not None
    victims = list(lost.scheduler.requests.values())
    assert victims and all(len(s.output_ids) > 0 for s in victims)
    lost.scheduler.on_executor_lost()  # what its link does, then tells the fleet
    assert fleet.node_lost(lost) == len(victims)
    assert not lost.scheduler.requests and lost.state is NodeState.DOWN
    run(fleet, executors, *seqs)
    assert all(s.output_ids == expected_output(s.prompt_ids, 20) for s in seqs)
    assert fleet.stats.counter("requests_moved_from_lost_nodes") == len(victims)


def test_a_lost_node_keeps_its_requests_when_no_other_node_is_up_and_serves_them_when_back() -> None:
    fleet, executors = make_fleet(1)
    node = fleet.nodes[0]
    seqs = [seq(f"r{i}", prompt_len=5, max_tokens=8) for i in range(2)]
    for s in seqs:
        fleet.add(s)
    step_all(fleet, executors)
    assert node.scheduler is not None
    node.scheduler.on_executor_lost()
    assert fleet.node_lost(node) == 0 and len(node.scheduler.requests) == 2
    with pytest.raises(LookupError):
        fleet.add(seq("new", prompt_len=3, max_tokens=2))
    executors[0] = FakeExecutor()  # a new executor process: an empty pool
    up(fleet, node)
    run(fleet, executors, *seqs)
    assert all(s.output_ids == expected_output(s.prompt_ids, 8) for s in seqs)


def test_a_lost_nodes_conversations_keep_their_history_and_recompute_on_their_next_turn() -> None:
    fleet, executors = make_fleet(2)
    t1 = turn("t1", list(range(10, 22)), max_tokens=4)
    fleet.add(t1)
    home = fleet.nodes[where(fleet, t1)]
    run(fleet, executors, t1)
    assert home.scheduler is not None
    home.scheduler.on_executor_lost()
    fleet.node_lost(home)
    assert fleet.conversations.node_of(("ten", "c")) is None and fleet.conversations.get(("ten", "c"))
    t2 = turn("t2", t1.tokens + [7, 8], max_tokens=4)
    fleet.add(t2)
    assert fleet.nodes[where(fleet, t2)] is not home and t2.reused_tokens == 0
    run(fleet, executors, t2)
    assert t2.finish is Finish.LENGTH and t2.output_ids == expected_output(t2.prompt_ids, 4)


def queued_need(node: Node) -> int:
    """What the node's queue still needs, summed over it (what placement weighed before the running total)."""
    sched = node.scheduler
    assert sched is not None
    return sum(max(0, sched.blocks.blocks_for(len(s.tokens)) - len(s.block_table)) for s in sched.waiting)


def test_placement_weighs_each_queue_by_a_running_total_that_matches_the_sum_over_it() -> None:
    import random

    rng = random.Random(3)
    fleet, executors = make_fleet(4, num_blocks=24, max_running=6)
    fleet.nodes[3].state = NodeState.CONNECTING  # it comes up later and takes queued requests
    seqs, checked = [], 0
    for i in range(120):
        if i == 50:
            fleet.node_up(fleet.nodes[3])
        if i == 80:  # node 0 is lost: its requests move
            assert fleet.nodes[0].scheduler is not None
            fleet.nodes[0].scheduler.on_executor_lost()
            fleet.node_lost(fleet.nodes[0])
        if i == 100:
            executors[0] = FakeExecutor()
            fleet.node_up(fleet.nodes[0])
        for _ in range(rng.choice([0, 0, 1, 3])):  # bursts fill queues between steps
            s = seq(f"r{len(seqs)}", prompt_len=rng.randint(1, 12), max_tokens=rng.randint(1, 10))
            seqs.append(s)
            fleet.add(s)
            for node in fleet.up_nodes():
                assert node.scheduler is not None and node.scheduler.queued_blocks == queued_need(node)
                checked += bool(node.scheduler.waiting)
        if i % 10 == 9 and (queued := [s for s in seqs if s.state is RequestState.WAITING]):
            fleet.abort(rng.choice(queued).request_id)  # leaves a queue between steps
            for node in fleet.up_nodes():
                assert node.scheduler is not None and node.scheduler.queued_blocks == queued_need(node)
        step_all(fleet, executors)  # (moves between nodes included)
        for node in fleet.up_nodes():
            assert node.scheduler is not None and node.scheduler.queued_blocks == queued_need(node)
    run(fleet, executors, *seqs)
    assert checked > 50 and fleet.stats.counter("requests_moved") > 0
    assert all(n.scheduler is not None and n.scheduler.queued_blocks == 0 for n in fleet.nodes)
