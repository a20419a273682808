"""Moving KV between the device pool and the swap daemon's host pool: which copies, into which blocks.

The scheduler decides copies; the swap daemon makes them. A `SwapOrder` is one copy: block runs, a
direction, and its owner (a preempted request, or a conversation's kept KV). Orders are decided
while a step is scheduled, taken by the engine (`take_orders`), sent, and completed (`complete`)
when the daemon's SwapDone arrives. Until then the order owns its blocks. The device blocks of a
copy to the host are reused only once it has landed, even if their request is gone meanwhile.

A host copy stays valid while its tokens do not change, so a copy to the host moves only the blocks
written since the last one, and the partly filled block before them (`plan_copy_out`). A request
that cannot be swapped out (no daemon, host pool full) is recomputed instead, and so is one whose
copy fails. When the daemon is lost, every copy fails and every host copy is gone (`detach`).

Between nodes (migration.py): a request leaving this node lends its host blocks (`lend`) to the
target's pull, which reads them through this node's daemon; they are freed when the pull ends
(`HostLoan.release`). On the target, a `Direction.PULL` order owns the blocks the KV lands in.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scheduler_svc.block_manager import BlockAllocator, BlockManager
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sequence import RequestState, Sequence
from scheduler_svc.stats import Stats
from svc_common.swap import BlockRun, Direction, Granularity

# How long device blocks under the copies of a broken daemon stream stay out of use when the daemon
# does not re-attach. A live daemon finishes those copies before it detaches (each moves one block
# group: milliseconds); a dead one writes nothing. Without a bound, a daemon that is down for good
# would cost its in-flight blocks for ever, and a request that needs the whole pool would wait for
# ever (a 6-block pool lost 3). The one case it does not cover: a daemon frozen mid-copy for longer.
QUARANTINE_S = 10.0

if TYPE_CHECKING:
    from scheduler_svc.conversations import KeptKV

    Owner = Sequence | KeptKV


@dataclass(slots=True, eq=False)
class SwapOrder:
    """A copy the swap daemon must make, and the blocks it holds until it lands."""

    swap_id: int
    direction: Direction
    owner: Owner  # a preempted request, or a conversation's kept KV (spilled to the host)
    device_blocks: list[int]
    host_blocks: list[int]
    runs: list[BlockRun]
    granularity: Granularity
    tokens: int  # tokens whose KV the host holds once a copy out (or a pull) lands
    source: HostLoan | None = None  # a pull's: the other node's host blocks it reads (freed when it ends)
    source_addr: str = ""  # a pull's: the other node's swap daemon


@dataclass(slots=True, eq=False)
class HostLoan:
    """Host blocks of this node that another node's daemon is reading (a request migrating away): nobody
    here owns them, and they are freed once the read has ended (ok or not)."""

    lender: SwapManager
    blocks: list[int]

    def release(self) -> None:
        self.lender.end_loan(self)


@dataclass(frozen=True, slots=True)
class CopyOutPlan:
    """What a copy to the host moves: the blocks of the table from `start` on, into `host_blocks`.

    The blocks before `start` are on the host already (a valid earlier copy)."""

    start: int
    host_blocks: list[int]


def pair_runs(device: list[int], host: list[int]) -> list[BlockRun]:
    """Coalesce block pairs into runs contiguous on both sides: one copy per run."""
    runs: list[BlockRun] = []
    for d, h in zip(device, host, strict=True):
        last = runs[-1] if runs else None
        if last is not None and last.device_start + last.num_blocks == d and last.host_start + last.num_blocks == h:
            runs[-1] = BlockRun(last.device_start, last.host_start, last.num_blocks + 1)
        else:
            runs.append(BlockRun(d, h, 1))
    return runs


class SwapManager:
    """Swap orders (decided, in flight), the host pool's allocator, and requests' swaps out and in.

    `reclaim_host(spare)` is asked for host room when the host pool is full: it drops some other
    host copy (never `spare`'s) and says whether it could.
    """

    def __init__(
        self, config: SchedulerConfig, blocks: BlockManager, stats: Stats, reclaim_host: Callable[[Owner], bool]
    ) -> None:
        self.config = config
        self.blocks = blocks
        self.stats = stats
        self.host: BlockAllocator | None = None  # the swap daemon's host pool, while attached
        self._reclaim_host = reclaim_host
        self._decided: list[SwapOrder] = []  # not sent yet
        self._in_flight: dict[int, SwapOrder] = {}
        self._ids = itertools.count(1)
        # Device blocks of copies that were in flight when the daemon's stream broke: the daemon may
        # still be writing them, so nobody owns them and nobody may allocate them until it is safe.
        self.quarantined: list[int] = []
        self.quarantined_at = 0.0  # time.monotonic() of the last break that quarantined blocks
        self.loans: list[HostLoan] = []  # host blocks lent to pulls from other nodes

    # -- the daemon -------------------------------------------------------------------------------

    def attach(self, num_host_blocks: int) -> None:
        self.host = BlockAllocator(num_host_blocks)

    @property
    def enabled(self) -> bool:
        """Whether preemption may swap (a daemon is attached and the mode swaps)."""
        return self.config.preemption != "recompute" and self.host is not None

    def quarantine(self, order: SwapOrder) -> None:
        """Keep a failed in-flight copy's device blocks out of use (the order no longer frees them)."""
        self.quarantined += order.device_blocks
        order.device_blocks = []
        self.quarantined_at = time.monotonic()

    def release_quarantine(self) -> None:
        """No copy of a broken stream can still touch the device pool (a new attachment, or a new
        pool): quarantined blocks are free again."""
        if self.quarantined:
            self.blocks.free(self.quarantined)
            self.stats.count("quarantined_blocks_released", len(self.quarantined))
            self.quarantined = []

    def quarantine_expired(self, now: float | None = None) -> bool:
        """Whether quarantined blocks have waited QUARANTINE_S for a re-attachment that did not come."""
        now = time.monotonic() if now is None else now
        return bool(self.quarantined) and now - self.quarantined_at >= QUARANTINE_S

    def detach(self) -> list[SwapOrder]:
        """The daemon is gone: returns every order, decided or in flight, for its owner to fail.

        The host pool goes with the daemon (owners forget their host copies)."""
        orders = [*self._in_flight.values(), *self._decided]
        self._in_flight.clear()
        self._decided.clear()
        self.host = None
        self.loans = []  # what they lent is gone with the pool (the pulls reading it fail)
        return orders

    # -- orders -----------------------------------------------------------------------------------

    def order(self, direction: Direction, owner: Owner, device: list[int], host: list[int], tokens: int) -> SwapOrder:
        runs = pair_runs(device, host) if direction is not Direction.PULL else []  # a pull has no device side
        order = SwapOrder(next(self._ids), direction, owner, device, host, runs, self.config.copy_granularity, tokens)
        self._decided.append(order)
        self.stats.count(f"swap_{direction.value}_orders")
        return order

    def take_orders(self) -> list[SwapOrder]:
        """The orders decided since the last call, now in flight (the engine sends them)."""
        orders, self._decided = self._decided, []
        for order in orders:
            self._in_flight[order.swap_id] = order
        return orders

    def in_flight(self, swap_id: int) -> SwapOrder | None:
        return self._in_flight.get(swap_id)

    def complete(self, swap_id: int) -> SwapOrder | None:
        """The order whose copy ended (None if unknown: already failed with a lost daemon)."""
        order = self._in_flight.pop(swap_id, None)
        if order is not None:
            self.stats.count(f"swap_{order.direction.value}_done")
        return order

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def has_decided(self) -> bool:
        return bool(self._decided)

    def orders(self) -> list[SwapOrder]:
        """Every order that holds blocks: decided or in flight."""
        return [*self._decided, *self._in_flight.values()]

    def landing_blocks(self) -> int:
        """Device blocks that copies to the host will free once they land."""
        return sum(len(o.device_blocks) for o in self.orders() if o.direction is Direction.OUT)

    # -- the host pool ----------------------------------------------------------------------------

    def lend(self, blocks: list[int]) -> HostLoan:
        """Hand host blocks to another node's pull; they stay allocated until `HostLoan.release`."""
        loan = HostLoan(self, blocks)
        self.loans.append(loan)
        return loan

    def end_loan(self, loan: HostLoan) -> None:
        """The pull reading a loan ended: free its blocks (unless the pool was lost meanwhile)."""
        if any(held is loan for held in self.loans):
            self.loans = [held for held in self.loans if held is not loan]
            self.free_host(loan.blocks)

    def pull(self, seq: Sequence, dest: list[int], source: HostLoan, source_addr: str, tokens: int) -> SwapOrder:
        """Order a pull of another node's host blocks (`source`, at `source_addr`) into `dest` here."""
        order = self.order(Direction.PULL, seq, [], dest, tokens)
        order.source, order.source_addr = source, source_addr
        return order

    def free_host(self, blocks: list[int]) -> None:
        if self.host is not None and blocks:
            self.host.free(blocks)

    def allocate_host(self, n: int, after: int | None, spare: Owner) -> list[int] | None:
        """n host blocks for `spare`'s copy (after its block `after` when it can), reclaiming other
        host copies while the pool is full; None if it stays full."""
        assert self.host is not None
        if n == 0:
            return []
        while (blocks := self.host.allocate(n, after=after)) is None:
            if not self._reclaim_host(spare):
                return None
        return blocks

    def plan_copy_out(
        self, owner: Owner, num_tokens: int, host_tokens: int, host_blocks: list[int]
    ) -> CopyOutPlan | None:
        """Which blocks a copy to the host must move, given a host copy valid for host_tokens tokens;
        None if the host pool is full.

        Blocks wholly inside the valid host copy stay; a partly filled one is copied again, into the
        host block it already has.
        """
        kv_blocks = self.blocks.blocks_for(num_tokens)
        if host_tokens >= num_tokens:
            return CopyOutPlan(kv_blocks, [])
        start = host_tokens // self.blocks.block_size
        rewrite = host_blocks[start:kv_blocks]
        after = (host_blocks[: start + len(rewrite)] or [None])[-1]
        new = self.allocate_host(kv_blocks - start - len(rewrite), after, spare=owner)
        if new is None:
            return None
        self.stats.count("swap_out_blocks_saved", start)
        return CopyOutPlan(start, rewrite + new)

    # -- requests ---------------------------------------------------------------------------------

    def swap_out(self, seq: Sequence) -> bool:
        """Start copying a preempted request's KV to the host; False if it cannot (no daemon, host
        pool full): then it must be recomputed. Only blocks written since the last copy move."""
        if not self.enabled or seq.num_computed == 0:
            return False
        plan = self.plan_copy_out(seq, seq.num_computed, min(seq.host_tokens, seq.num_computed), seq.host_table)
        if plan is None:
            self.stats.count("swap_fallback_recompute")
            return False
        kv_blocks = self.blocks.blocks_for(seq.num_computed)
        device_copy = seq.block_table[plan.start : kv_blocks]
        self.blocks.free(seq.block_table[: plan.start] + seq.block_table[kv_blocks:])  # not under any copy
        seq.host_table = seq.host_table[: plan.start]
        seq.host_tokens = min(seq.host_tokens, plan.start * self.blocks.block_size)  # the part outside the copy
        seq.block_table = []
        seq.unsent_blocks = 0
        if not device_copy:  # the host copy is already whole
            seq.host_tokens = seq.num_computed
            seq.move_to(RequestState.SWAPPED)
            return True
        seq.move_to(RequestState.SWAPPING_OUT)
        self.order(Direction.OUT, seq, device_copy, plan.host_blocks, seq.num_computed)
        return True

    def swap_in(self, seq: Sequence) -> bool:
        """Allocate device blocks for a swapped request's host KV and start copying it back."""
        device_blocks = self.blocks.allocate(len(seq.host_table))
        if device_blocks is None:
            return False
        seq.block_table = device_blocks
        seq.unsent_blocks = len(device_blocks)
        seq.move_to(RequestState.SWAPPING_IN)
        self.order(Direction.IN, seq, device_blocks, seq.host_table, seq.host_tokens)
        return True

    def request_copy_done(self, order: SwapOrder, ok: bool) -> None:
        """A request's copy ended: its KV is on the host (out) or back on the device (in); if the copy
        failed, the request recomputes. A request that finished meanwhile only gets its blocks freed."""
        seq = order.owner
        assert isinstance(seq, Sequence)
        if order.direction is Direction.PULL:
            self._pull_done(seq, order, ok)
            return
        if order.direction is Direction.OUT:
            self.blocks.free(order.device_blocks)  # the copy has landed: reusable now
            if seq.finished or not ok:
                self.free_host(order.host_blocks)
                if not seq.finished:
                    self.drop_host_copy(seq)
                    self.fall_back_to_recompute(seq)
                return
            seq.host_table = seq.host_table + order.host_blocks
            seq.host_tokens = order.tokens
            seq.move_to(RequestState.SWAPPED)
            return
        if seq.finished or not ok:
            self.blocks.free(order.device_blocks)
            self.free_host(order.host_blocks)
            if not seq.finished:
                seq.block_table, seq.host_table, seq.host_tokens = [], [], 0
                self.fall_back_to_recompute(seq)
            return
        if not self.config.reuse:
            self.drop_host_copy(seq)  # else it stays valid: the next swap-out moves only newer blocks
        seq.move_to(RequestState.WAITING)  # KV is back on the device: schedulable

    def _pull_done(self, seq: Sequence, order: SwapOrder, ok: bool) -> None:
        """A migrating request's KV has arrived in this host pool (it is swapped here now), or the pull
        failed (it recomputes here)."""
        if order.source is not None:
            order.source.release()
        self.stats.count("migrations_landed" if ok else "migrations_failed")
        if seq.finished or not ok:
            self.free_host(order.host_blocks)
            if not seq.finished:
                self.fall_back_to_recompute(seq)
            return
        seq.host_table, seq.host_tokens = order.host_blocks, order.tokens
        seq.move_to(RequestState.SWAPPED)

    def drop_host_copy(self, seq: Sequence) -> None:
        self.free_host(seq.host_table)
        seq.host_table, seq.host_tokens = [], 0

    def fall_back_to_recompute(self, seq: Sequence) -> None:
        """The request's KV is lost (a failed copy, a lost daemon): it waits to compute it again."""
        self.stats.count("swap_fallback_recompute")
        self.stats.count("recomputed_tokens", seq.num_computed)
        seq.num_computed = 0
        seq.move_to(RequestState.WAITING)
