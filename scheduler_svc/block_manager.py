"""KV blocks for the scheduler: integer block ids only, no torch.

`BlockAllocator` hands out block ids from one pool (the device's, or the swap daemon's host pool),
preferring contiguous runs so that a swap can move a request's blocks with one copy per run instead
of one copy per block. `BlockManager` is the device pool seen through requests' block tables: how
many blocks a request's tokens need, growing its table, and which blocks the executor has not been
told about yet.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler_svc.sequence import Sequence


@dataclass(frozen=True, slots=True)
class Extent:
    """Consecutive block ids `start .. start + length - 1` of one pool: one copy on swap."""

    start: int
    length: int


class BlockAllocator:
    """Hands out KV block ids in contiguous runs whenever it can.

    A swap moves a request's block table run by run, so every run that stays whole saves a copy.
    Allocation therefore extends the caller's last block first, then takes the best-fitting free
    extent, and only when no single extent holds the request spreads it over the fewest (largest)
    extents. Free space is kept as maximal extents: a list of starts sorted with `bisect`, their
    lengths, and a `(length, start)` list sorted for best-fit lookups.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._num_free = 0
        self._starts: list[int] = []  # free extent starts, sorted
        self._lengths: dict[int, int] = {}  # free extent start -> length
        self._by_size: list[tuple[int, int]] = []  # (length, start), sorted
        self._add_extent(0, num_blocks)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self._num_free

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """Return `n` free block ids in block-table order, or None when fewer than `n` are free.

        `after` is the caller's current last block; the blocks right after it are used first so the
        caller's last run grows instead of a new run starting.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if after is not None and not self._is_allocated(after):
            raise ValueError(f"after={after} is not an allocated block")
        if n > self._num_free:
            return None

        blocks: list[int] = []
        remaining = n
        if after is not None and remaining and after + 1 in self._lengths:
            taken = self._take(after + 1, remaining)
            blocks.extend(taken)
            remaining -= len(taken)
        while remaining:
            i = bisect_left(self._by_size, (remaining, -1))
            if i == len(self._by_size):
                i -= 1  # nothing holds the rest: take the largest extent whole
            taken = self._take(self._by_size[i][1], remaining)
            blocks.extend(taken)
            remaining -= len(taken)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Return blocks to the pool; raise ValueError, freeing nothing, if any is not allocated."""
        to_free = list(blocks)
        seen: set[int] = set()
        for block in to_free:
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"cannot free block {block}: out of range 0..{self.num_blocks - 1}")
            if block in seen or not self._is_allocated(block):
                raise ValueError(f"cannot free block {block}: it is not allocated (double free?)")
            seen.add(block)
        for run in self.runs(sorted(seen)):
            self._release(run.start, run.length)

    def free_runs(self) -> list[Extent]:
        """The current free extents, sorted by start."""
        return [Extent(start, self._lengths[start]) for start in self._starts]

    def largest_free_run(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    @staticmethod
    def runs(blocks: list[int]) -> list[Extent]:
        """Coalesce a block table, in table order, into maximal runs of consecutive ids."""
        result: list[Extent] = []
        run_start = 0
        for i in range(1, len(blocks) + 1):
            if i == len(blocks) or blocks[i] != blocks[i - 1] + 1:
                result.append(Extent(blocks[run_start], i - run_start))
                run_start = i
        return result

    def _is_allocated(self, block: int) -> bool:
        if not 0 <= block < self.num_blocks:
            return False
        i = bisect_right(self._starts, block) - 1
        return i < 0 or block >= self._starts[i] + self._lengths[self._starts[i]]

    def _take(self, start: int, limit: int) -> list[int]:
        """Take up to `limit` blocks from the front of the free extent beginning at `start`."""
        length = self._remove_extent(start)
        count = min(length, limit)
        if count < length:
            self._add_extent(start + count, length - count)
        return list(range(start, start + count))

    def _release(self, start: int, length: int) -> None:
        """Add a run of just-freed blocks, merging it with the free extents on either side."""
        end = start + length
        if end in self._lengths:
            length += self._remove_extent(end)
        i = bisect_left(self._starts, start) - 1
        if i >= 0:
            left = self._starts[i]
            if left + self._lengths[left] == start:
                length += self._remove_extent(left)
                start = left
        self._add_extent(start, length)

    def _add_extent(self, start: int, length: int) -> None:
        insort(self._starts, start)
        self._lengths[start] = length
        insort(self._by_size, (length, start))
        self._num_free += length

    def _remove_extent(self, start: int) -> int:
        length = self._lengths.pop(start)
        del self._starts[bisect_left(self._starts, start)]
        del self._by_size[bisect_left(self._by_size, (length, start))]
        self._num_free -= length
        return length


class BlockManager:
    """The device pool and the block tables that use it.

    A request owns blocks for its first `num_computed + n` tokens before a step computes n of them;
    blocks join the end of its table (contiguous after its last block when they can). The executor
    learns a table as a diff: the trailing `unsent_blocks` of a table are sent with the next chunk.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold the KV of `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def shortfall(self, seq: Sequence, n: int) -> int:
        """Blocks seq lacks to compute its next n tokens (<= 0: it has enough)."""
        return self.blocks_for(seq.num_computed + n) - len(seq.block_table)

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Make sure seq owns blocks for its first num_computed + n tokens; False if the pool is short."""
        needed = self.shortfall(seq, n)
        if needed <= 0:
            return True
        blocks = self.allocator.allocate(needed, after=seq.block_table[-1] if seq.block_table else None)
        if blocks is None:
            return False
        seq.block_table.extend(blocks)
        seq.unsent_blocks += len(blocks)
        return True

    def take_unsent(self, seq: Sequence) -> list[int]:
        """The blocks of seq's table the executor has not been sent yet (now counted as sent)."""
        unsent, seq.unsent_blocks = seq.unsent_blocks, 0
        return seq.block_table[len(seq.block_table) - unsent :] if unsent else []

    def allocate(self, n: int) -> list[int] | None:
        return self.allocator.allocate(n)

    def free(self, blocks: Iterable[int]) -> None:
        self.allocator.free(blocks)

    def release(self, seq: Sequence) -> None:
        """Free seq's whole block table."""
        if seq.block_table:
            self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.unsent_blocks = 0
