"""The torch-free KV block allocator (exact accounting, no double hand-out, contiguous runs) and the
block manager that grows requests' block tables and sends them to the executor as diffs."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scheduler_svc.block_manager import BlockAllocator, BlockManager, Extent
from scheduler_svc.sequence import Sequence
from svc_common.plan import Sampling


def _state(alloc: BlockAllocator) -> tuple[int, int, list[Extent], int]:
    return alloc.num_free, alloc.num_used, alloc.free_runs(), alloc.largest_free_run()


def _fragmented(num_blocks: int, keep_free: list[Extent]) -> BlockAllocator:
    """An allocator whose only free extents are `keep_free`."""
    alloc = BlockAllocator(num_blocks)
    assert alloc.allocate(num_blocks) == list(range(num_blocks))
    alloc.free(b for run in keep_free for b in range(run.start, run.start + run.length))
    assert alloc.free_runs() == keep_free
    return alloc


# --- plain unit tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_constructor_rejects_non_positive_pool_size(num_blocks: int) -> None:
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks)


def test_new_pool_is_one_free_run_covering_every_block() -> None:
    alloc = BlockAllocator(8)
    assert alloc.num_blocks == 8
    assert (alloc.num_free, alloc.num_used) == (8, 0)
    assert alloc.free_runs() == [Extent(0, 8)]
    assert alloc.largest_free_run() == 8


def test_allocate_negative_count_raises() -> None:
    alloc = BlockAllocator(4)
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    assert not alloc.can_allocate(-1)
    assert alloc.num_free == 4


def test_allocate_zero_returns_empty_list_and_takes_nothing() -> None:
    alloc = BlockAllocator(4)
    assert alloc.allocate(0) == []
    assert alloc.num_free == 4


def test_allocate_more_than_free_returns_none_and_changes_nothing() -> None:
    alloc = BlockAllocator(6)
    alloc.allocate(4)
    before = _state(alloc)
    assert not alloc.can_allocate(3)
    assert alloc.allocate(3) is None
    assert _state(alloc) == before
    assert alloc.can_allocate(2)
    assert alloc.allocate(2) == [4, 5]
    assert alloc.allocate(1) is None


def test_allocate_with_after_extends_the_callers_last_run() -> None:
    alloc = BlockAllocator(10)
    table = alloc.allocate(3)
    other = alloc.allocate(2)
    assert (table, other) == ([0, 1, 2], [3, 4])
    alloc.free(other)
    assert alloc.allocate(4, after=table[-1]) == [3, 4, 5, 6]


def test_allocate_with_after_spills_into_best_fit_when_extension_is_short() -> None:
    # Free: 3 (one block right after the caller), 5..6, 8..13.
    alloc = _fragmented(14, [Extent(3, 1), Extent(5, 2), Extent(8, 6)])
    assert alloc.allocate(3, after=2) == [3, 5, 6]


def test_allocate_with_after_ignores_extension_when_next_block_is_taken() -> None:
    alloc = _fragmented(10, [Extent(6, 4)])
    assert alloc.allocate(2, after=2) == [6, 7]


@pytest.mark.parametrize("after", [-1, 10, 5])
def test_allocate_rejects_after_that_is_not_an_allocated_block(after: int) -> None:
    alloc = BlockAllocator(10)
    alloc.allocate(5)
    before = _state(alloc)
    with pytest.raises(ValueError, match="after"):
        alloc.allocate(1, after=after)
    assert _state(alloc) == before


def test_allocate_takes_start_of_smallest_extent_that_fits() -> None:
    alloc = _fragmented(20, [Extent(0, 5), Extent(7, 3), Extent(12, 8)])
    assert alloc.allocate(3) == [7, 8, 9]
    assert alloc.allocate(4) == [0, 1, 2, 3]
    assert alloc.free_runs() == [Extent(4, 1), Extent(12, 8)]


def test_allocate_uses_largest_extents_first_when_none_fits_whole() -> None:
    alloc = _fragmented(20, [Extent(0, 2), Extent(4, 3), Extent(9, 1), Extent(12, 5)])
    # 7 blocks: the 5-run whole, then the remaining 2 go best fit into the 2-run.
    blocks = alloc.allocate(7)
    assert blocks == [12, 13, 14, 15, 16, 0, 1]
    assert BlockAllocator.runs(blocks) == [Extent(12, 5), Extent(0, 2)]
    assert alloc.free_runs() == [Extent(4, 3), Extent(9, 1)]


def test_free_merges_adjacent_free_extents() -> None:
    alloc = BlockAllocator(9)
    a, b, c = alloc.allocate(3), alloc.allocate(3), alloc.allocate(3)
    assert alloc.free_runs() == []
    alloc.free(a)
    alloc.free(c)
    assert alloc.free_runs() == [Extent(0, 3), Extent(6, 3)]
    alloc.free(b)
    assert alloc.free_runs() == [Extent(0, 9)]
    assert alloc.largest_free_run() == 9


def test_free_accepts_blocks_in_any_order_and_any_iterable() -> None:
    alloc = BlockAllocator(6)
    alloc.allocate(6)
    alloc.free(iter([5, 1, 4, 0]))
    assert alloc.free_runs() == [Extent(0, 2), Extent(4, 2)]


@pytest.mark.parametrize("bad", [-1, 8, 100])
def test_free_out_of_range_raises_naming_block_and_frees_nothing(bad: int) -> None:
    alloc = BlockAllocator(8)
    blocks = alloc.allocate(4)
    before = _state(alloc)
    with pytest.raises(ValueError, match=rf"block {bad}\b"):
        alloc.free([*blocks, bad])
    assert _state(alloc) == before


def test_double_free_raises_naming_block_and_frees_nothing() -> None:
    alloc = BlockAllocator(8)
    blocks = alloc.allocate(4)
    alloc.free([blocks[0]])
    before = _state(alloc)
    with pytest.raises(ValueError, match="block 0"):
        alloc.free([blocks[1], blocks[0]])
    assert _state(alloc) == before


def test_same_block_twice_in_one_free_call_is_a_double_free() -> None:
    alloc = BlockAllocator(8)
    alloc.allocate(4)
    before = _state(alloc)
    with pytest.raises(ValueError, match="block 2"):
        alloc.free([2, 3, 2])
    assert _state(alloc) == before


def test_runs_coalesces_consecutive_ids_in_table_order() -> None:
    assert BlockAllocator.runs([4, 5, 6, 9, 10, 2]) == [Extent(4, 3), Extent(9, 2), Extent(2, 1)]
    assert BlockAllocator.runs([]) == []
    assert BlockAllocator.runs([3, 2, 1]) == [Extent(3, 1), Extent(2, 1), Extent(1, 1)]


def test_block_run_is_immutable() -> None:
    run = Extent(1, 2)
    with pytest.raises(AttributeError):
        run.start = 3  # type: ignore[misc]


# --- property tests ----------------------------------------------------------------------------


@given(st.lists(st.integers(0, 50), max_size=40))
def test_runs_round_trip_to_the_table_and_are_maximal(blocks: list[int]) -> None:
    runs = BlockAllocator.runs(blocks)
    assert [b for r in runs for b in range(r.start, r.start + r.length)] == blocks
    assert all(r.length >= 1 for r in runs)
    assert all(b.start != a.start + a.length for a, b in pairwise(runs))


@given(st.integers(1, 500).flatmap(lambda size: st.tuples(st.just(size), st.integers(1, size))))
def test_allocate_on_empty_pool_returns_one_contiguous_run(size_and_n: tuple[int, int]) -> None:
    size, n = size_and_n
    alloc = BlockAllocator(size)
    assert alloc.allocate(n) == list(range(n))
    assert alloc.free_runs() == ([Extent(n, size - n)] if n < size else [])


def _fewest_runs(free_lengths: list[int], n: int) -> int:
    covered = 0
    for count, length in enumerate(sorted(free_lengths, reverse=True), start=1):
        covered += length
        if covered >= n:
            return count
    raise AssertionError("not enough free blocks")


class AllocatorMachine(RuleBasedStateMachine):
    """Drives the allocator against a model: the set of free blocks and each request's block table."""

    @initialize(num_blocks=st.integers(1, 48))
    def start(self, num_blocks: int) -> None:
        self.alloc = BlockAllocator(num_blocks)
        self.free_model: set[int] = set(range(num_blocks))
        self.tables: list[list[int]] = []

    def _check_handed_out(self, blocks: list[int], n: int) -> None:
        assert len(blocks) == n
        assert len(set(blocks)) == n, "allocation repeats a block"
        assert set(blocks) <= self.free_model, "allocation hands out a block that is in use"
        self.free_model -= set(blocks)

    def _expect_no_room(self, n: int, after: int | None) -> None:
        before = _state(self.alloc)
        assert not self.alloc.can_allocate(n)
        assert self.alloc.allocate(n, after=after) is None
        assert _state(self.alloc) == before

    @rule(n=st.integers(0, 50))
    def allocate_new_table(self, n: int) -> None:
        if n > len(self.free_model):
            self._expect_no_room(n, None)
            return
        lengths = [r.length for r in self.alloc.free_runs()]
        fitting = [r for r in self.alloc.free_runs() if r.length >= n]
        blocks = self.alloc.allocate(n)
        assert blocks is not None
        self._check_handed_out(blocks, n)
        if n == 0:
            return
        runs = BlockAllocator.runs(blocks)
        if fitting:
            best = min(fitting, key=lambda r: (r.length, r.start))
            assert runs == [Extent(best.start, n)], "did not take the start of the best-fitting extent"
        else:
            assert len(runs) == _fewest_runs(lengths, n), "spread over more runs than needed"
        self.tables.append(blocks)

    @precondition(lambda self: any(self.tables))
    @rule(data=st.data(), n=st.integers(0, 20))
    def extend_table_after_last_block(self, data: st.DataObject, n: int) -> None:
        table = data.draw(st.sampled_from([t for t in self.tables if t]))
        last = table[-1]
        if n > len(self.free_model):
            self._expect_no_room(n, last)
            return
        room = 0
        while last + 1 + room in self.free_model:
            room += 1
        blocks = self.alloc.allocate(n, after=last)
        assert blocks is not None
        self._check_handed_out(blocks, n)
        k = min(room, n)
        assert blocks[:k] == list(range(last + 1, last + 1 + k)), "did not extend after the last block"
        table.extend(blocks)

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free_whole_table(self, data: st.DataObject) -> None:
        table = self.tables.pop(data.draw(st.integers(0, len(self.tables) - 1)))
        self.alloc.free(table)
        self.free_model |= set(table)

    @precondition(lambda self: any(len(t) > 1 for t in self.tables))
    @rule(data=st.data())
    def free_tail_of_table(self, data: st.DataObject) -> None:
        table = data.draw(st.sampled_from([t for t in self.tables if len(t) > 1]))
        keep = data.draw(st.integers(1, len(table) - 1))
        tail = table[keep:]
        del table[keep:]
        self.alloc.free(tail)
        self.free_model |= set(tail)

    @precondition(lambda self: self.free_model)
    @rule(data=st.data())
    def double_free_raises_and_frees_nothing(self, data: st.DataObject) -> None:
        stale = data.draw(st.sampled_from(sorted(self.free_model)))
        live = [b for t in self.tables for b in t]
        before = _state(self.alloc)
        with pytest.raises(ValueError, match=rf"block {stale}\b"):
            self.alloc.free([*live, stale])
        assert _state(self.alloc) == before

    @rule(offset=st.integers(0, 5), below=st.booleans())
    def out_of_range_free_raises_and_frees_nothing(self, offset: int, below: bool) -> None:
        bad = -1 - offset if below else self.alloc.num_blocks + offset
        live = [b for t in self.tables for b in t]
        before = _state(self.alloc)
        with pytest.raises(ValueError, match=rf"block {bad}\b"):
            self.alloc.free([*live, bad])
        assert _state(self.alloc) == before

    @invariant()
    def live_allocations_never_overlap(self) -> None:
        live = [b for t in self.tables for b in t]
        assert len(live) == len(set(live))
        assert not set(live) & self.free_model

    @invariant()
    def capacity_accounting_is_exact(self) -> None:
        live = sum(len(t) for t in self.tables)
        assert self.alloc.num_free + live == self.alloc.num_blocks
        assert self.alloc.num_used == live
        assert self.alloc.num_free == len(self.free_model)

    @invariant()
    def free_runs_are_the_maximal_sorted_extents_of_free_blocks(self) -> None:
        runs = self.alloc.free_runs()
        assert BlockAllocator.runs(sorted(self.free_model)) == runs
        assert self.alloc.largest_free_run() == max((r.length for r in runs), default=0)

    def teardown(self) -> None:
        if not hasattr(self, "alloc"):
            return
        for table in self.tables:
            self.alloc.free(table)
        assert self.alloc.num_free == self.alloc.num_blocks
        assert self.alloc.free_runs() == [Extent(0, self.alloc.num_blocks)]


AllocatorMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_allocator_state_machine_keeps_blocks_unique_and_accounting_exact = AllocatorMachine.TestCase


# -- the block manager: block tables on the device pool ------------------------------------------


def _request(prompt_len: int) -> Sequence:
    return Sequence("r", list(range(prompt_len)), Sampling(), max_tokens=8)


def test_a_table_grows_by_whole_blocks_contiguously_and_the_executor_gets_only_the_new_ones() -> None:
    blocks = BlockManager(num_blocks=16, block_size=4)
    seq = _request(prompt_len=6)
    assert blocks.shortfall(seq, 6) == 2
    assert blocks.reserve(seq, 6) and seq.block_table == [0, 1]
    assert blocks.take_unsent(seq) == [0, 1] and blocks.take_unsent(seq) == []
    seq.num_computed = 6
    assert blocks.shortfall(seq, 2) == 0 and blocks.reserve(seq, 2)  # slots 6 and 7 are in block 1
    assert blocks.take_unsent(seq) == []
    assert blocks.reserve(seq, 3) and seq.block_table == [0, 1, 2]
    assert blocks.take_unsent(seq) == [2]
    assert blocks.num_free == 13


def test_a_reservation_the_pool_cannot_hold_changes_nothing() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    other, seq = _request(prompt_len=8), _request(prompt_len=12)
    assert blocks.reserve(other, 8)
    assert not blocks.reserve(seq, 12)
    assert seq.block_table == [] and seq.unsent_blocks == 0 and blocks.num_free == 2


def test_release_frees_the_whole_table_and_forgets_unsent_blocks() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    seq = _request(prompt_len=9)
    assert blocks.reserve(seq, 9)
    blocks.release(seq)
    assert seq.block_table == [] and seq.unsent_blocks == 0
    assert blocks.num_free == 8
    assert blocks.blocks_for(0) == 0 and blocks.blocks_for(4) == 1 and blocks.blocks_for(5) == 2
