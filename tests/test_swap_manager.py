"""The swap manager alone: copy plans that move only what the host lacks, the host pool and its
reclaiming, the life of a request's copies, and what a lost daemon takes with it."""

from __future__ import annotations

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sequence import RequestState, Sequence
from scheduler_svc.stats import Stats
from scheduler_svc.swap_manager import SwapManager, SwapOrder, pair_runs
from svc_common.plan import Sampling
from svc_common.swap import BlockRun, Direction, Granularity

BLOCK = 4


class Reclaimer:
    """Stands in for the scheduler: gives back host blocks it was holding, one batch per call."""

    def __init__(self) -> None:
        self.held: list[list[int]] = []
        self.spares: list[object] = []
        self.swaps: SwapManager | None = None

    def __call__(self, spare: object) -> bool:
        self.spares.append(spare)
        if not self.held or self.swaps is None:
            return False
        self.swaps.free_host(self.held.pop(0))
        return True


def make(host_blocks: int = 16, device_blocks: int = 16, **config: object) -> tuple[SwapManager, Reclaimer]:
    reclaimer = Reclaimer()
    swaps = SwapManager(
        SchedulerConfig(**config),  # type: ignore[arg-type]
        BlockManager(device_blocks, BLOCK),
        Stats(),
        reclaim_host=reclaimer,
    )
    reclaimer.swaps = swaps
    if host_blocks:
        swaps.attach(host_blocks)
    return swaps, reclaimer


def running(swaps: SwapManager, computed: int) -> Sequence:
    """A preempted request (taken off the running set) whose KV covers `computed` tokens."""
    seq = Sequence("r", list(range(computed + 1)), Sampling(), max_tokens=4)
    seq.move_to(RequestState.RUNNING)
    assert swaps.blocks.reserve(seq, computed)
    seq.num_computed = computed
    seq.preemptions = 1
    return seq


def swapped_out(swaps: SwapManager, computed: int) -> tuple[Sequence, SwapOrder]:
    """A preempted request whose copy out is in flight, and that copy."""
    seq = running(swaps, computed)
    assert swaps.swap_out(seq)
    [order] = swaps.take_orders()
    return seq, order


def copy_ends(swaps: SwapManager, order: SwapOrder, ok: bool) -> None:
    assert swaps.complete(order.swap_id) is order
    swaps.request_copy_done(order, ok)


def test_pair_runs_names_block_groups_contiguous_on_both_sides() -> None:
    assert pair_runs([4, 5, 6, 9], [0, 1, 2, 3]) == [BlockRun(4, 0, 3), BlockRun(9, 3, 1)]
    assert pair_runs([4, 5], [7, 3]) == [BlockRun(4, 7, 1), BlockRun(5, 3, 1)]
    assert pair_runs([], []) == []


def test_a_first_copy_out_moves_every_block_and_a_later_one_only_those_the_host_lacks() -> None:
    swaps, _ = make()
    plan = swaps.plan_copy_out("owner", num_tokens=10, host_tokens=0, host_blocks=[])
    assert plan is not None and plan.start == 0 and len(plan.host_blocks) == 3
    # The host holds 10 tokens validly: blocks 0-1 stay, block 2 (2 of its 4 slots) is copied again
    # into the host block it has, and blocks 3-4 get new host blocks right after it.
    again = swaps.plan_copy_out("owner", num_tokens=18, host_tokens=10, host_blocks=plan.host_blocks)
    assert again is not None and again.start == 2
    assert again.host_blocks[0] == plan.host_blocks[2] and len(again.host_blocks) == 3
    assert again.host_blocks == list(range(again.host_blocks[0], again.host_blocks[0] + 3)), "one group"
    assert swaps.stats.counter("swap_out_blocks_saved") == 2
    whole = swaps.plan_copy_out("owner", num_tokens=8, host_tokens=8, host_blocks=plan.host_blocks[:2])
    assert whole is not None and whole.start == 2 and whole.host_blocks == []


def test_a_full_host_pool_reclaims_other_copies_for_the_spare_or_says_no() -> None:
    swaps, reclaimer = make(host_blocks=4)
    assert swaps.host is not None
    held = swaps.host.allocate(3)
    assert held is not None
    reclaimer.held.append(held)
    plan = swaps.plan_copy_out("mine", num_tokens=12, host_tokens=0, host_blocks=[])
    assert plan is not None and len(plan.host_blocks) == 3
    assert reclaimer.spares == ["mine"], "asked once, sparing the copy it makes room for"
    assert swaps.plan_copy_out("next", num_tokens=12, host_tokens=0, host_blocks=[]) is None
    assert swaps.host.num_free == 1


def test_a_preempted_request_is_swapped_out_and_its_device_blocks_wait_for_the_copy() -> None:
    swaps, _ = make()
    seq = running(swaps, computed=10)
    table = list(seq.block_table)
    assert swaps.swap_out(seq)
    assert seq.state is RequestState.SWAPPING_OUT and seq.block_table == []
    [order] = swaps.take_orders()
    assert order.direction is Direction.OUT and order.granularity is Granularity.RUN
    assert order.device_blocks == table and order.tokens == 10
    assert swaps.blocks.num_free == 16 - 3, "blocks under the copy are not free yet"
    assert swaps.landing_blocks() == 3
    assert swaps.complete(order.swap_id) is order and swaps.complete(order.swap_id) is None
    swaps.request_copy_done(order, ok=True)
    assert seq.state is RequestState.SWAPPED and seq.host_table == order.host_blocks and seq.host_tokens == 10
    assert swaps.blocks.num_free == 16


def test_swapping_back_in_then_out_again_moves_only_the_new_blocks() -> None:
    swaps, _ = make()
    seq, out = swapped_out(swaps, computed=10)
    copy_ends(swaps, out, ok=True)
    assert swaps.swap_in(seq) and seq.state is RequestState.SWAPPING_IN
    [back] = swaps.take_orders()
    assert back.direction is Direction.IN and back.host_blocks == out.host_blocks
    copy_ends(swaps, back, ok=True)
    assert seq.state is RequestState.WAITING and seq.host_tokens == 10, "the host copy stays valid"
    seq.move_to(RequestState.RUNNING)
    assert swaps.blocks.reserve(seq, 10)
    seq.num_computed = 20
    assert swaps.swap_out(seq)
    [again] = swaps.take_orders()
    assert len(again.device_blocks) == 5 - 2, "blocks 0-1 are on the host already"


def test_without_a_daemon_or_in_recompute_mode_nothing_is_swapped() -> None:
    for swaps in (make(host_blocks=0)[0], make(preemption="recompute")[0]):
        seq = running(swaps, computed=6)
        assert not swaps.swap_out(seq)
        assert seq.state is RequestState.RUNNING and not swaps.orders()


def test_a_failed_copy_out_frees_both_sides_and_the_request_recomputes() -> None:
    swaps, _ = make()
    seq, order = swapped_out(swaps, computed=10)
    copy_ends(swaps, order, ok=False)
    assert seq.state is RequestState.WAITING and seq.num_computed == 0 and seq.host_table == []
    assert swaps.blocks.num_free == 16 and swaps.host is not None and swaps.host.num_free == 16
    assert swaps.stats.counter("swap_fallback_recompute") == 1
    assert swaps.stats.counter("recomputed_tokens") == 10


def test_a_request_that_finished_during_its_copy_only_gets_its_blocks_freed() -> None:
    swaps, _ = make()
    seq, order = swapped_out(swaps, computed=10)
    seq.move_to(RequestState.FINISHED)
    copy_ends(swaps, order, ok=True)
    assert seq.state is RequestState.FINISHED and seq.host_table == []
    assert swaps.blocks.num_free == 16 and swaps.host is not None and swaps.host.num_free == 16


def test_a_lost_daemon_hands_back_every_order_and_the_host_pool_goes_with_it() -> None:
    swaps, _ = make()
    first, second = running(swaps, computed=5), running(swaps, computed=6)
    swaps.swap_out(first)
    swaps.take_orders()  # in flight
    swaps.swap_out(second)  # decided, never sent
    orders = swaps.detach()
    assert {o.owner for o in orders} == {first, second}
    assert swaps.host is None and not swaps.enabled and not swaps.orders() and swaps.num_in_flight == 0
