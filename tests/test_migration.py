"""Migration of a queued request's KV between nodes (scheduler_svc/migration.py), without a model or gRPC.

Every node has a fake executor that models its device pool's contents and a fake swap daemon that models
its host pool's; a copy, out, in or pulled from another node's daemon, moves the modelled KV. A request
whose KV travelled wrongly reads slots nobody wrote, or generates other tokens.
"""

from __future__ import annotations

import pytest

from scheduler_svc.config import NodeAddress, SchedulerConfig
from scheduler_svc.fleet import Fleet, Node
from scheduler_svc.sequence import RequestState, Sequence
from scheduler_svc.swap_manager import SwapOrder
from svc_common.swap import Direction
from tests.test_fleet import assert_queue_totals
from tests.test_scheduler import BLOCK, FakeExecutor, assert_ownership, expected_output, seq, turn

HOST_BLOCKS = 64


class FleetDaemons:
    """One fake swap daemon per node: each copy lands `delay` rounds after it was ordered (pulls fail
    when `fail_pulls`)."""

    def __init__(self, fleet: Fleet, executors: dict[int, FakeExecutor], delay: int = 1) -> None:
        self.fleet, self.executors, self.delay = fleet, executors, delay
        self.host_kv: dict[int, dict[int, list[int | None]]] = {n.index: {} for n in fleet.nodes}
        self.pending: list[tuple[int, Node, SwapOrder]] = []
        self.round = 0
        self.fail_pulls = False
        self.pulls: list[SwapOrder] = []

    def tick(self) -> None:
        """Land the copies due this round, then take the copies the nodes decided (due `delay` rounds on)."""
        self.round += 1
        due = [p for p in self.pending if p[0] <= self.round]
        self.pending = [p for p in self.pending if p[0] > self.round]
        for _, node, order in due:
            self.land(node, order)
        for node in self.fleet.up_nodes():
            assert node.scheduler is not None
            for order in node.scheduler.take_swap_orders():
                self.pending.append((self.round + self.delay, node, order))
                if order.direction is Direction.PULL:
                    self.pulls.append(order)

    def land(self, node: Node, order: SwapOrder) -> None:
        assert node.scheduler is not None
        ok = not (self.fail_pulls and order.direction is Direction.PULL)
        device, host = self.executors[node.index].kv, self.host_kv[node.index]
        if ok and order.direction is Direction.OUT:
            for d, h in zip(order.device_blocks, order.host_blocks, strict=True):
                host[h] = list(device.get(d, [None] * BLOCK))
        elif ok and order.direction is Direction.IN:
            for d, h in zip(order.device_blocks, order.host_blocks, strict=True):
                device[d] = list(host.get(h, [None] * BLOCK))
        elif ok:  # a pull: the source node's host blocks, read through its daemon
            assert order.source is not None
            source = next(n for n in self.fleet.nodes if n.address.swapd == order.source_addr)
            for s, h in zip(order.source.blocks, order.host_blocks, strict=True):
                host[h] = list(self.host_kv[source.index][s])
        node.scheduler.on_swap_done(order.swap_id, ok)


def make_fleet(nodes: int = 2, **config: object) -> tuple[Fleet, dict[int, FakeExecutor], FleetDaemons]:
    config.setdefault("max_step_tokens", 16)
    config.setdefault("max_running", 1)
    addresses = [NodeAddress(f"node{i}:1", f"swapd{i}:1") for i in range(nodes)]
    fleet = Fleet(SchedulerConfig(**config), addresses)  # type: ignore[arg-type]
    fleet.eos_token_ids.add(0)
    for node in fleet.nodes:
        fleet.attach(node, 32, BLOCK).attach_host_pool(HOST_BLOCKS)
        fleet.node_up(node)
    executors = {n.index: FakeExecutor() for n in fleet.nodes}
    return fleet, executors, FleetDaemons(fleet, executors)


def round_(fleet: Fleet, executors: dict[int, FakeExecutor], daemons: FleetDaemons) -> None:
    """One step of every node, as its link runs it, then the copies due land."""
    for node in fleet.up_nodes():
        sched = node.scheduler
        assert sched is not None
        plan = sched.schedule()
        fleet.balance()
        assert_queue_totals(fleet)
        if plan is not None:
            sched.on_step_output(executors[node.index].run(plan))
    daemons.tick()
    for node in fleet.nodes:
        assert node.scheduler is not None
        assert_ownership(node.scheduler)


def run(fleet: Fleet, executors: dict[int, FakeExecutor], daemons: FleetDaemons, *seqs: Sequence) -> list[str]:
    """Rounds until seqs finish; returns the states the first of them went through, in order."""
    states: list[str] = []
    for _ in range(500):
        if all(s.finished for s in seqs):
            return states
        round_(fleet, executors, daemons)
        if not states or states[-1] != seqs[0].state.value:
            states.append(seqs[0].state.value)
    raise AssertionError("the fleet made no progress")


def node_index(fleet: Fleet, s: Sequence) -> int:
    node = fleet.node_of(s)
    assert node is not None, f"{s.request_id} is on no node"
    return node.index


def busy_home(fleet: Fleet, executors: dict[int, FakeExecutor], daemons: FleetDaemons) -> tuple[Sequence, ...]:
    """A conversation's first turn finishes on node 0, which keeps its KV; then node 0 runs a long
    request and node 1 a short one, and the second turn arrives: its home is busy for long, and node 1
    idles soon. Returns (t1, t2, long, short)."""
    t1 = turn("t1", list(range(10, 30)), max_tokens=4)
    fleet.add(t1)
    assert node_index(fleet, t1) == 0
    run(fleet, executors, daemons, t1)
    assert fleet.nodes[0].scheduler is not None and fleet.nodes[1].scheduler is not None
    long, short = seq("long", prompt_len=4, max_tokens=40), seq("short", prompt_len=4, max_tokens=3)
    fleet.nodes[0].scheduler.add(long)
    fleet.nodes[1].scheduler.add(short)
    round_(fleet, executors, daemons)  # both run
    t2 = turn("t2", t1.tokens + [7, 8, 9], max_tokens=5)
    fleet.add(t2)
    assert node_index(fleet, t2) == 0, "a turn goes to the node that keeps its conversation's KV"
    assert t2.reused_tokens == len(t1.tokens) - 1 and t2.block_table, "it starts from the kept KV on the device"
    return t1, t2, long, short


def test_a_turn_whose_home_is_busy_migrates_its_kv_through_the_host_tier_to_an_idle_node() -> None:
    fleet, executors, daemons = make_fleet()
    _, t2, long, short = busy_home(fleet, executors, daemons)
    states = run(fleet, executors, daemons, t2)
    # Its device KV went to node 0's host first, was pulled into node 1's host pool, then swapped in there.
    assert states[:4] == ["waiting", "swapping_out", "swapped", "migrating"], states
    assert "swapping_in" in states and long.state is RequestState.RUNNING, "it ran before its home was free"
    assert t2.output_ids == expected_output(t2.prompt_ids, 5)  # the KV arrived intact: nothing recomputed
    stats = fleet.stats
    assert stats.counter("migrations_staged") == 1 and stats.counter("migrations_host") == 1
    assert stats.counter("migrations_landed") == 1 and stats.counter("migrated_tokens") == t2.reused_tokens
    assert stats.counter("migration_recomputed_tokens") == 0
    assert len(daemons.pulls) == 1 and daemons.pulls[0].source_addr == "swapd0:1"
    # The conversation's KV lives on its new node now; node 0's host blocks were freed once read.
    sched0, sched1 = fleet.nodes[0].scheduler, fleet.nodes[1].scheduler
    assert sched0 is not None and sched1 is not None
    assert fleet.conversations.node_of(("ten", "c")) is sched1.swaps
    assert sched0.swaps.host is not None and sched0.swaps.host.num_free == HOST_BLOCKS and not sched0.swaps.loans
    run(fleet, executors, daemons, long, short)
    assert long.output_ids == expected_output(long.prompt_ids, 40)


def test_in_recompute_mode_the_turn_moves_at_once_and_recomputes_its_history_there() -> None:
    fleet, executors, daemons = make_fleet(migration="recompute")
    _, t2, _, _ = busy_home(fleet, executors, daemons)
    reused = t2.reused_tokens
    states = run(fleet, executors, daemons, t2)
    assert "migrating" not in states and "swapping_out" not in states
    assert t2.output_ids == expected_output(t2.prompt_ids, 5)
    assert fleet.stats.counter("migrations_recompute") == 1
    assert fleet.stats.counter("migration_recomputed_tokens") == reused
    assert not daemons.pulls


def test_with_migration_off_the_turn_waits_for_its_home() -> None:
    fleet, executors, daemons = make_fleet(migration="off")
    _, t2, long, _ = busy_home(fleet, executors, daemons)
    run(fleet, executors, daemons, t2)
    assert long.finished, "it ran only once its home's long request had finished"
    assert t2.output_ids == expected_output(t2.prompt_ids, 5) and not daemons.pulls
    assert fleet.stats.counter("migrations_host") == 0


def test_a_failed_pull_leaves_the_request_to_recompute_on_the_target_and_frees_both_pools() -> None:
    fleet, executors, daemons = make_fleet()
    _, t2, _, _ = busy_home(fleet, executors, daemons)
    daemons.fail_pulls = True
    run(fleet, executors, daemons, t2)
    assert t2.output_ids == expected_output(t2.prompt_ids, 5)
    assert fleet.stats.counter("migrations_failed") == 1 and fleet.stats.counter("migrations_landed") == 0
    for node in fleet.nodes:
        sched = node.scheduler
        assert sched is not None and sched.swaps.host is not None
        assert not sched.swaps.loans
    sched0 = fleet.nodes[0].scheduler
    assert sched0 is not None and sched0.swaps.host is not None and sched0.swaps.host.num_free == HOST_BLOCKS


def pulling(fleet: Fleet, executors: dict[int, FakeExecutor], daemons: FleetDaemons, t2: Sequence) -> None:
    """Rounds until t2 is migrating (its pull in flight)."""
    daemons.delay = 3
    for _ in range(200):
        round_(fleet, executors, daemons)
        if t2.state is RequestState.MIGRATING:
            return
    raise AssertionError("the turn never migrated")


def test_a_request_cancelled_while_its_kv_is_pulled_frees_both_pools_once_the_pull_ends() -> None:
    fleet, executors, daemons = make_fleet()
    _, t2, long, short = busy_home(fleet, executors, daemons)
    pulling(fleet, executors, daemons, t2)
    assert fleet.abort("t2") is t2
    run(fleet, executors, daemons, long, short)
    for node in fleet.nodes:
        sched = node.scheduler
        assert sched is not None and sched.swaps.host is not None
        kept = sum(len(kv.host_blocks) for kv in fleet.conversations.kept(sched.swaps))
        assert sched.swaps.host.num_free + kept == HOST_BLOCKS and not sched.swaps.loans


def test_the_source_daemon_lost_during_a_pull_does_not_free_blocks_of_its_next_pool() -> None:
    fleet, executors, daemons = make_fleet()
    _, t2, long, short = busy_home(fleet, executors, daemons)
    pulling(fleet, executors, daemons, t2)
    sched0 = fleet.nodes[0].scheduler
    assert sched0 is not None
    sched0.on_swap_daemon_lost()  # node 0's daemon restarts: a new, empty host pool
    sched0.attach_host_pool(HOST_BLOCKS)
    daemons.fail_pulls = True  # (reading from a daemon that is gone fails)
    run(fleet, executors, daemons, t2, long, short)
    assert t2.output_ids == expected_output(t2.prompt_ids, 5)
    assert sched0.swaps.host is not None and sched0.swaps.host.num_free == HOST_BLOCKS


def test_no_migration_without_room_in_the_targets_host_pool() -> None:
    fleet, executors, daemons = make_fleet()
    sched1 = fleet.nodes[1].scheduler
    assert sched1 is not None
    sched1.attach_host_pool(2)  # too small for the turn's KV
    _, t2, _, _ = busy_home(fleet, executors, daemons)
    for _ in range(12):
        round_(fleet, executors, daemons)
    assert t2.state is RequestState.SWAPPED and node_index(fleet, t2) == 0, "it stays, its KV on its home's host"
    assert fleet.stats.counter("migrations_host") == 0
    sched1.attach_host_pool(HOST_BLOCKS)  # (its daemon came back with a larger pool)
    run(fleet, executors, daemons, t2)
    assert t2.output_ids == expected_output(t2.prompt_ids, 5)


@pytest.mark.parametrize("mode", ["host", "recompute"])
def test_migrating_requests_keep_every_output_identical_under_churn(mode: str) -> None:
    """Many conversations over three nodes, turns arriving while their homes are busy: whatever moves,
    every turn's output is what an undisturbed run gives."""
    fleet, executors, daemons = make_fleet(3, migration=mode, max_running=2)
    turns: list[Sequence] = []
    history = {c: list(range(10 + c, 22 + c)) for c in range(6)}
    for wave in range(3):
        busy = fleet.nodes[wave % 3].scheduler
        assert busy is not None
        fillers = [seq(f"fill{wave}{i}", prompt_len=4, max_tokens=25) for i in range(2)]
        for f in fillers:
            busy.add(f)  # this node's conversations' turns find it busy
        wave_turns = []
        for c in range(6):
            t = turn(f"c{c}w{wave}", history[c] + [5 + wave], max_tokens=3 + (c + wave) % 4, conv=f"c{c}")
            fleet.add(t)
            wave_turns.append(t)
            if c % 2 == 0:
                round_(fleet, executors, daemons)
        run(fleet, executors, daemons, *wave_turns, *fillers)
        for t in wave_turns:
            assert t.output_ids == expected_output(t.prompt_ids, t.max_tokens), t.request_id
            history[int(t.request_id[1])] = list(t.tokens)
        turns += wave_turns
    moved = fleet.stats.counter("migrations_host") + fleet.stats.counter("migrations_recompute")
    assert moved > 0, "the workload made some turn move with its KV"
