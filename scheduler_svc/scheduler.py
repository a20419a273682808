"""The scheduler: decides, every step, which tokens run and which KV blocks they use.

Read `schedule()` top to bottom: every live request in policy order gets the tokens it needs this
step and the blocks to hold them, preempting lower-ranked requests when room runs out.
`on_step_output()` applies the executor's sampled tokens; `on_swap_done()` a swap daemon's
completion. Every block, on the device and on the host, is allocated and freed here and nowhere else.

Preemption either recomputes (drop the KV, keep the tokens) or swaps: the KV's blocks are copied to
the host pool as block groups (`SwapOrder`s the engine sends to the swap daemon) while the executor
keeps computing. Blocks under an in-flight copy are never reused until the copy lands, even if
their request is cancelled meanwhile; a swapped request is scheduled only once its KV is back.

Conversations keep their KV between turns (`KeptKV`): on the device while there is room, else
copied ("spilled") to the host. A host copy stays valid while its tokens do not change, so a later
copy to the host moves only the blocks written since the last one (and the partly filled block
before them). The next turn reuses the longest common token prefix with the kept tokens, from the
device directly or by a swap-in from the host, and prefills only the rest.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import structlog

from scheduler_svc.block_manager import BlockAllocator
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.policy import Policy, PriorityUpdates, make_policy
from scheduler_svc.sequence import Finish, Sequence, Status
from svc_common.plan import NewRequest, ScheduledChunk, StepOutput, StepPlan

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class TokenEvent:
    """A token the executor sampled for a live sequence (the engine detokenises and streams it)."""

    seq: Sequence
    token_id: int


@dataclass(slots=True, eq=False)
class KeptKV:
    """A finished turn's KV, kept for the conversation's next turn: on the device, the host, or both."""

    key: tuple[str, str]
    tokens: list[int]  # the tokens whose KV is kept, in order
    blocks: list[int]  # device blocks holding all of it (empty once spilled to the host)
    host_blocks: list[int]  # host blocks holding the KV of tokens[:host_tokens]
    host_tokens: int
    last_used: float
    spill: SwapOrder | None = None  # the copy to the host in flight
    waiter: Sequence | None = None  # the next turn, waiting for that copy to land


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(slots=True, eq=False)
class SwapOrder:
    """A copy the swap daemon must make: runs of (device_start, host_start, num_blocks)."""

    swap_id: int
    direction: str  # "out" | "in"
    owner: Sequence | KeptKV  # a preempted request, or a conversation's kept KV (spilled to the host)
    device_blocks: list[int]
    host_blocks: list[int]
    runs: list[tuple[int, int, int]]
    granularity: str  # "run" (block groups) | "block_layer" (vllm-like)
    tokens: int  # tokens whose KV the host holds once an "out" copy lands


def pair_runs(device: list[int], host: list[int]) -> list[tuple[int, int, int]]:
    """Coalesce block pairs into runs contiguous on both sides: one copy per run."""
    runs: list[tuple[int, int, int]] = []
    for d, h in zip(device, host, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == d and runs[-1][1] + runs[-1][2] == h:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((d, h, 1))
    return runs


@dataclass(slots=True)
class TenantService:
    """Service a tenant received: prompt tokens computed and tokens generated (recomputation excluded)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0

    def weighted(self, prompt_price: float = 1.0, gen_price: float = 2.0) -> float:
        return prompt_price * self.prompt_tokens + gen_price * self.generated_tokens


@dataclass(slots=True)
class Stats:
    counters: Counter[str] = field(default_factory=Counter)
    tenants: dict[str, TenantService] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        eos_token_ids: set[int],
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.policy = policy or make_policy(config.policy)
        self.eos_token_ids = eos_token_ids
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self._releases: list[str] = []
        self._step_ids = itertools.count()
        self.in_flight: StepPlan | None = None
        self.stats = Stats()
        # Conversations' KV between turns, least recently used first; evicted before anyone is preempted.
        self.kept: OrderedDict[tuple[str, str], KeptKV] = OrderedDict()
        self.last_turn: dict[tuple[str, str], list[int]] = {}  # each conversation's latest finished turn
        self.host: BlockAllocator | None = None  # the swap daemon's host pool, while attached
        self.swaps: dict[int, SwapOrder] = {}  # in flight
        self._swap_orders: list[SwapOrder] = []  # decided, not yet sent
        self._swap_ids = itertools.count(1)
        self.priority_updates = PriorityUpdates(
            config.priority_updates, config.priority_update_prob, config.priority_levels, config.seed
        )

    # -- the swap daemon --------------------------------------------------------------------------

    @property
    def swapping_enabled(self) -> bool:
        return self.config.preemption != "recompute" and self.host is not None

    def attach_host_pool(self, num_host_blocks: int) -> None:
        self.host = BlockAllocator(num_host_blocks)

    def take_swap_orders(self) -> list[SwapOrder]:
        orders, self._swap_orders = self._swap_orders, []
        for order in orders:
            self.swaps[order.swap_id] = order
        return orders

    def on_swap_done(self, swap_id: int, ok: bool) -> None:
        order = self.swaps.pop(swap_id, None)
        if order is None:
            return
        self.stats.counters["swap_out_done" if order.direction == "out" else "swap_in_done"] += 1
        if isinstance(order.owner, KeptKV):
            self._spill_landed(order, ok)
            return
        seq = order.owner
        if order.direction == "out":
            self.allocator.free(order.device_blocks)  # the copy has landed: reusable now
            if seq.finished or not ok:
                self._free_host(order.host_blocks)
                if not seq.finished:
                    self._drop_host_copy(seq)
                    self._requeue_for_recompute(seq)
                return
            seq.host_table = seq.host_table + order.host_blocks
            seq.host_tokens = order.tokens
            seq.status = Status.SWAPPED
        else:
            if seq.finished or not ok:
                self.allocator.free(order.device_blocks)
                self._free_host(order.host_blocks)
                if not seq.finished:
                    seq.block_table, seq.host_table, seq.host_tokens = [], [], 0
                    self._requeue_for_recompute(seq)
                return
            if not self.config.reuse:
                self._drop_host_copy(seq)  # else it stays valid: the next swap-out moves only newer blocks
            seq.status = Status.WAITING  # KV is back on the device: schedulable

    def on_swap_daemon_lost(self) -> None:
        """Copies in flight and KV on the host are gone: those requests recompute from tokens."""
        for swap_id in list(self.swaps):
            self.on_swap_done(swap_id, ok=False)
        for order in self._swap_orders:  # decided but never sent
            self.swaps[order.swap_id] = order
            self.on_swap_done(order.swap_id, ok=False)
        self._swap_orders = []
        for seq in self.requests.values():
            if seq.status is Status.SWAPPED:
                self._requeue_for_recompute(seq)
            seq.host_table, seq.host_tokens = [], 0
        for key, kept in list(self.kept.items()):
            kept.host_blocks, kept.host_tokens = [], 0
            if not kept.blocks:
                del self.kept[key]
        self.host = None
        self.stats.counters["swap_daemon_lost"] += 1

    def _free_host(self, blocks: list[int]) -> None:
        if self.host is not None and blocks:
            self.host.free(blocks)

    def _drop_host_copy(self, seq: Sequence) -> None:
        self._free_host(seq.host_table)
        seq.host_table, seq.host_tokens = [], 0

    def _allocate_host(self, n: int, after: int | None, spare: Sequence | KeptKV) -> list[int] | None:
        """n host blocks for `spare`'s copy; when the pool is full, idle conversations' host copies go
        first (LRU), then the host copies of requests whose KV is on the device (they only save
        copying later). `spare`'s own host copy stays."""
        assert self.host is not None
        if n == 0:
            return []
        while (blocks := self.host.allocate(n, after=after)) is None:
            if self._evict_kept_host(spare):
                continue
            on_device = (Status.RUNNING, Status.WAITING)
            mirrors = [s for s in self.requests.values() if s.host_table and s.status in on_device and s is not spare]
            if not mirrors:
                return None
            for seq in mirrors:
                self._drop_host_copy(seq)
            self.stats.counters["host_copies_dropped"] += len(mirrors)
        return blocks

    def _requeue_for_recompute(self, seq: Sequence) -> None:
        self.stats.counters["swap_fallback_recompute"] += 1
        self.stats.counters["recomputed_tokens"] += seq.num_computed
        seq.num_computed = 0
        seq.status = Status.WAITING
        if seq not in self.waiting:
            self.waiting.append(seq)

    def _copy_plan(
        self, owner: Sequence | KeptKV, num_tokens: int, host_tokens: int, host_blocks: list[int]
    ) -> tuple[int, list[int]] | None:
        """Which blocks a copy to the host must move, given a host copy valid for host_tokens tokens.

        Returns (first block to move, host blocks to move it into), or None if the host pool is full.
        Blocks wholly inside the valid host copy stay; a partly filled one is copied again, into the
        host block it already has.
        """
        kv_blocks = -(-num_tokens // self.block_size)
        if host_tokens >= num_tokens:
            return kv_blocks, []
        start = host_tokens // self.block_size
        rewrite = host_blocks[start:kv_blocks]
        after = (host_blocks[: start + len(rewrite)] or [None])[-1]
        new = self._allocate_host(kv_blocks - start - len(rewrite), after, spare=owner)
        if new is None:
            return None
        self.stats.counters["swap_out_blocks_saved"] += start
        return start, rewrite + new

    def _swap_out(self, seq: Sequence) -> bool:
        """Start copying seq's KV to the host; False if it cannot (no daemon, host pool full).

        Only the blocks written since the last copy to the host move (see `_copy_plan`).
        """
        if not self.swapping_enabled or seq.num_computed == 0:
            return False
        plan = self._copy_plan(seq, seq.num_computed, min(seq.host_tokens, seq.num_computed), seq.host_table)
        if plan is None:
            self.stats.counters["swap_fallback_recompute"] += 1
            return False
        start, host_targets = plan
        kv_blocks = -(-seq.num_computed // self.block_size)
        device_copy = seq.block_table[start:kv_blocks]
        self.allocator.free(seq.block_table[:start] + seq.block_table[kv_blocks:])  # not under any copy
        seq.host_table = seq.host_table[:start]
        seq.host_tokens = min(seq.host_tokens, start * self.block_size)  # the part outside the copy
        seq.block_table = []
        seq.unsent_blocks = 0
        if not device_copy:  # the host copy is already whole
            seq.host_tokens = seq.num_computed
            seq.status = Status.SWAPPED
            return True
        seq.status = Status.SWAPPING_OUT
        self._order("out", seq, device_copy, host_targets, seq.num_computed)
        return True

    def _swap_in(self, seq: Sequence) -> bool:
        """Allocate device blocks for seq's host KV and start copying it back."""
        device_blocks = self.allocator.allocate(len(seq.host_table))
        if device_blocks is None:
            return False
        seq.block_table = device_blocks
        seq.unsent_blocks = len(device_blocks)
        seq.status = Status.SWAPPING_IN
        self._order("in", seq, device_blocks, seq.host_table, seq.host_tokens)
        return True

    def _order(
        self, direction: str, owner: Sequence | KeptKV, device: list[int], host: list[int], tokens: int
    ) -> SwapOrder:
        granularity = self.config.copy_granularity
        runs = pair_runs(device, host)
        order = SwapOrder(next(self._swap_ids), direction, owner, device, host, runs, granularity, tokens)
        self._swap_orders.append(order)
        self.stats.counters[f"swap_{direction}_orders"] += 1
        return order

    # -- requests in and out ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.policy.on_arrival(seq, self.requests.values())
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        if seq.conversation is not None:
            previous = self.last_turn.get(seq.conversation)
            if previous is not None:  # how much of the prompt is history (reused or not)
                seq.history_tokens = min(common_prefix(previous, seq.prompt_ids), seq.num_prompt - 1)
            self._reuse(seq)

    # -- conversations ----------------------------------------------------------------------------

    def _reuse(self, seq: Sequence) -> None:
        """Start seq from its conversation's kept KV: the longest common token prefix is not recomputed.

        KV on the device is taken over directly; KV on the host is swapped in first (the request is
        queued as swapped). If the kept KV is still being copied to the host, the request waits for it.
        """
        assert seq.conversation is not None
        kept = self.kept.get(seq.conversation)
        if kept is None or not self.config.reuse:
            self._count_prefix(seq)
            return
        if kept.spill is not None:
            kept.waiter = seq
            seq.status = Status.AWAITING_KV
            return
        del self.kept[seq.conversation]
        # At least the last prompt token is computed again: its logits give the first new token.
        reuse = min(common_prefix(kept.tokens, seq.prompt_ids), seq.num_prompt - 1)
        on_host = min(kept.host_tokens, reuse)
        host_keep = -(-on_host // self.block_size)
        self._free_host(kept.host_blocks[host_keep:])
        seq.host_table, seq.host_tokens = kept.host_blocks[:host_keep], on_host
        if kept.blocks:
            keep = -(-reuse // self.block_size)
            self.allocator.free(kept.blocks[keep:])
            seq.block_table = kept.blocks[:keep]
        else:
            reuse = on_host  # only what the host holds
            if reuse:
                seq.status = Status.SWAPPED
                self.stats.counters["reused_from_host_tokens"] += reuse
        seq.num_computed = reuse
        seq.reused_tokens = reuse
        seq.prompt_served = reuse  # reused KV is service the tenant already received
        self.stats.counters["reused_prefix_tokens"] += reuse
        self._count_prefix(seq)

    def _count_prefix(self, seq: Sequence) -> None:
        self.stats.counters["recomputed_prefix_tokens"] += max(0, seq.history_tokens - seq.reused_tokens)

    def _keep(self, seq: Sequence) -> None:
        """A conversation turn ended: keep its KV (and any host copy of it) for the next turn."""
        assert seq.conversation is not None
        kv_blocks = -(-seq.num_computed // self.block_size)
        self.allocator.free(seq.block_table[kv_blocks:])
        self.drop_conversation(seq.conversation, forget=False)
        self.kept[seq.conversation] = KeptKV(
            seq.conversation,
            seq.tokens[: seq.num_computed],
            seq.block_table[:kv_blocks],
            seq.host_table,
            seq.host_tokens,
            time.monotonic(),
        )
        seq.block_table, seq.host_table, seq.host_tokens = [], [], 0
        self._enforce_host_budget()

    def drop_conversation(self, conversation: tuple[str, str], forget: bool = True) -> bool:
        """Free the KV kept for a conversation (and, with `forget`, what the scheduler knows of it)."""
        if forget:
            self.last_turn.pop(conversation, None)
        kept = self.kept.pop(conversation, None)
        if kept is None:
            return False
        self.allocator.free(kept.blocks)  # blocks under a spill are freed when it lands
        self._free_host(kept.host_blocks)
        kept.blocks, kept.host_blocks, kept.host_tokens = [], [], 0
        self._wake_waiter(kept)
        return True

    def _wake_waiter(self, kept: KeptKV) -> None:
        waiter, kept.waiter = kept.waiter, None
        if waiter is not None and waiter.status is Status.AWAITING_KV:
            waiter.status = Status.WAITING
            self._reuse(waiter)

    def _spill(self, kept: KeptKV) -> bool:
        """Start copying kept KV from the device to the host (only blocks the host lacks); False if
        it cannot (no daemon, no reuse, host budget or pool exhausted)."""
        if not self.swapping_enabled or not self.config.reuse:
            return False
        budget = self.config.conversation_host_blocks or (self.host.num_blocks if self.host else 0)
        num_tokens = len(kept.tokens)
        new_blocks = len(kept.blocks) - min(kept.host_tokens, num_tokens) // self.block_size
        while self._kept_host_blocks() + new_blocks > budget:
            if not self._evict_kept_host(spare=kept):
                return False
        plan = self._copy_plan(kept, num_tokens, kept.host_tokens, kept.host_blocks)
        if plan is None:
            return False
        start, host_targets = plan
        device_copy = kept.blocks[start:]
        self.allocator.free(kept.blocks[:start])
        kept.blocks = []
        kept.host_blocks = kept.host_blocks[:start]
        kept.host_tokens = min(kept.host_tokens, start * self.block_size)  # the part outside the copy
        self.stats.counters["kept_kv_spilled"] += 1
        if device_copy:
            kept.spill = self._order("out", kept, device_copy, host_targets, num_tokens)
        else:
            kept.host_tokens = num_tokens
        return True

    def _spill_landed(self, order: SwapOrder, ok: bool) -> None:
        kept = order.owner
        assert isinstance(kept, KeptKV)
        kept.spill = None
        self.allocator.free(order.device_blocks)
        if ok and self.kept.get(kept.key) is kept:
            kept.host_blocks = kept.host_blocks + order.host_blocks
            kept.host_tokens = order.tokens
            self._wake_waiter(kept)
            self._enforce_host_budget()
            return
        self._free_host(order.host_blocks)
        if self.kept.get(kept.key) is kept:
            self.drop_conversation(kept.key, forget=False)  # wakes the waiter: it recomputes

    def _kept_host_blocks(self) -> int:
        return sum(len(k.host_blocks) for k in self.kept.values())

    def _enforce_host_budget(self) -> None:
        budget = self.config.conversation_host_blocks
        while budget and self._kept_host_blocks() > budget and self._evict_kept_host():
            pass

    def _evict_kept_host(self, spare: Sequence | KeptKV | None = None) -> bool:
        """Drop the least recently used idle conversation's host copy (its device copy, if any, stays)."""
        for key, kept in self.kept.items():
            if kept.host_blocks and kept.spill is None and kept is not spare:
                self._free_host(kept.host_blocks)
                kept.host_blocks, kept.host_tokens = [], 0
                if not kept.blocks:
                    del self.kept[key]
                self.stats.counters["kept_kv_host_evicted"] += 1
                return True
        return False

    def _free_kept_device(self) -> bool:
        """Make device room from the least recently used kept KV: spill it to the host, or drop it."""
        kept = next((k for k in self.kept.values() if k.blocks), None)
        if kept is None:
            return False
        if self._spill(kept):
            return True
        self.allocator.free(kept.blocks)
        kept.blocks = []
        if not kept.host_tokens:
            del self.kept[kept.key]
        self.stats.counters["kept_kv_evicted"] += 1
        return True

    def expire_kept(self, now: float) -> None:
        """Drop kept KV idle past the TTL now (the engine calls it while no step runs, too)."""
        self._expire_kept(now)

    def _expire_kept(self, now: float) -> None:
        """Drop kept KV idle for longer than the TTL (the dict is in last-use order)."""
        while self.kept:
            kept = next(iter(self.kept.values()))
            if now - kept.last_used <= self.config.conversation_ttl_s or kept.spill is not None:
                return
            self.drop_conversation(kept.key, forget=False)
            self.stats.counters["kept_kv_expired"] += 1

    def abort(self, request_id: str, reason: Finish = Finish.CANCELLED) -> Sequence | None:
        """End a live request now; returns it, or None if it is not live."""
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return None
        self._finish(seq, reason)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._releases or self._swap_orders)

    # -- one step ---------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to do.

        Walk every live request in policy order. Each gets the tokens it needs this step (a decode,
        or a prefill chunk within the step's token budget) and the blocks to hold them. When blocks
        or the batch cap stand in the way, requests ranked below it are preempted, lowest first;
        when none is left to preempt, the walk stops, so nobody overtakes a higher-ranked request.
        """
        self.stats.counters["priority_changes"] += self.priority_updates.apply(self.requests.values())
        self._expire_kept(time.monotonic())
        budget = self.config.max_step_tokens
        chunks: list[ScheduledChunk] = []
        new_requests: list[NewRequest] = []
        ranked = self.policy.order([*self.running, *self.waiting])
        # Set once a request waits for swapped-out blocks to land: nobody ranked below may take blocks.
        blocked = False
        for i, seq in enumerate(ranked):
            if budget <= 0:
                break
            if seq.status not in (Status.RUNNING, Status.WAITING, Status.SWAPPED):
                continue  # a copy is in flight for it, or it was preempted earlier in this walk
            n = min(seq.num_pending, budget)
            needed = len(seq.host_table) if seq.status is Status.SWAPPED else self._blocks_short(seq, n)
            capped = seq.status is not Status.RUNNING and len(self.running) >= self.config.max_running
            # Preemptible: lower-ranked requests holding device blocks (running, or swapped back in),
            # lowest first. Built only when room is short: it is the walk's one O(n) step.
            below = (
                [s for s in reversed(ranked[i + 1 :]) if s.block_table and s.status in (Status.RUNNING, Status.WAITING)]
                if capped or needed > self.allocator.num_free
                else []
            )
            if seq.status is not Status.RUNNING:
                running_below = [s for s in below if s.status is Status.RUNNING]
                while len(self.running) >= self.config.max_running and running_below:
                    victim = running_below.pop(0)
                    below.remove(victim)
                    self._preempt(victim)
                if len(self.running) >= self.config.max_running:
                    break
            if seq.status is Status.SWAPPED:
                # Bring its KV back first; it runs once the copy lands.
                room = "wait" if blocked else self._make_room(len(seq.host_table), below)
                if room == "ok":
                    self._swap_in(seq)
                elif room == "wait":
                    blocked = True
                else:
                    break
                continue
            if needed > 0:
                room = "wait" if blocked else self._make_room(needed, below)
                if room == "wait":
                    blocked = True
                    continue
                if room == "no":
                    if seq.status is Status.RUNNING:
                        self._preempt(seq)
                    break
                self._reserve(seq, n)
            if seq.status is Status.WAITING:
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
            budget -= n
            chunks.append(self._chunk(seq, n, new_requests))

        if not chunks and not self._releases:
            if self._swap_orders:
                self.stats.counters["steps_without_compute"] += 1
            return None
        plan = StepPlan(next(self._step_ids), new_requests, chunks, self._releases)
        self._releases = []
        self.in_flight = plan
        self.stats.counters["steps"] += 1
        return plan

    def on_step_output(self, output: StepOutput) -> list[TokenEvent]:
        """Advance every sequence of the in-flight plan; returns the tokens to stream."""
        plan = self.in_flight
        if plan is None or plan.step_id != output.step_id:
            raise RuntimeError(f"step result {output.step_id} does not match the plan in flight")
        self.in_flight = None
        sampled = dict(output.tokens)
        events: list[TokenEvent] = []
        for chunk in plan.chunks:
            seq = self.requests.get(chunk.request_id)
            if seq is None or seq.finished or seq.status is not Status.RUNNING:
                continue  # cancelled or preempted while the step ran
            seq.num_computed = chunk.start_position + len(chunk.token_ids)
            prompt_done = max(0, min(seq.num_computed, seq.num_prompt) - max(chunk.start_position, seq.prompt_served))
            seq.prompt_served += prompt_done
            self.policy.on_served(seq, prompt_done, 1 if chunk.sample else 0)
            served = self.stats.tenants.setdefault(seq.tenant, TenantService())
            served.prompt_tokens += prompt_done
            served.generated_tokens += 1 if chunk.sample else 0
            if not chunk.sample:
                continue
            token = sampled[chunk.request_id]
            seq.tokens.append(token)
            self.stats.counters["generated_tokens"] += 1
            events.append(TokenEvent(seq, token))
            if len(seq.output_ids) >= seq.max_tokens:
                self._finish(seq, Finish.LENGTH)
            elif not seq.ignore_eos and token in self.eos_token_ids:
                self._finish(seq, Finish.EOS)
        return events

    def finish(self, seq: Sequence, reason: Finish) -> None:
        """End a sequence for a reason found outside the scheduler (a stop string)."""
        if not seq.finished:
            self._finish(seq, reason)

    def reset_executor_state(self) -> None:
        """The executor was lost, and the device KV with it: requests whose KV was on the device
        recompute from tokens, and conversations keep only what the host holds."""
        self.in_flight = None
        for seq in list(self.running):
            self._preempt(seq, count=False)
        for seq in self.waiting:
            if seq.status is Status.WAITING and seq.block_table:  # swapped back in, or reusing kept KV
                self.stats.counters["recomputed_tokens"] += seq.num_computed
                self._release(seq)
                seq.num_computed = 0
        for kept in list(self.kept.values()):
            self.allocator.free(kept.blocks)
            kept.blocks = []
            if not kept.host_tokens and kept.spill is None:
                self.drop_conversation(kept.key, forget=False)
        self._releases = []  # the new executor knows no request: nothing to release

    # -- blocks -----------------------------------------------------------------------------------

    def _blocks_short(self, seq: Sequence, n: int) -> int:
        return -(-(seq.num_computed + n) // self.block_size) - len(seq.block_table)

    def _make_room(self, needed: int, below: list[Sequence]) -> str:
        """Free `needed` device blocks by preempting `below` (lowest first): "ok", "wait" or "no".

        "wait": blocks already being swapped out will cover it when their copies land, so preempting
        more would only throw work away.
        """
        while self.allocator.num_free < needed:
            if self.allocator.num_free + self._landing_blocks() >= needed:
                return "wait"
            if self._free_kept_device():  # idle conversations' KV goes before anyone is preempted
                continue
            if not below:
                return "no"
            self._preempt(below.pop(0))
        return "ok"

    def _landing_blocks(self) -> int:
        orders = [*self.swaps.values(), *self._swap_orders]
        return sum(len(o.device_blocks) for o in orders if o.direction == "out")

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Make sure seq owns blocks for its first num_computed + n tokens."""
        needed = self._blocks_short(seq, n)
        if needed <= 0:
            return True
        blocks = self.allocator.allocate(needed, after=seq.block_table[-1] if seq.block_table else None)
        if blocks is None:
            return False
        seq.block_table.extend(blocks)
        seq.unsent_blocks += len(blocks)
        return True

    def _chunk(self, seq: Sequence, n: int, new_requests: list[NewRequest]) -> ScheduledChunk:
        if not seq.executor_known:
            new_requests.append(NewRequest(seq.request_id, seq.sampling))
            seq.executor_known = True
            seq.unsent_blocks = len(seq.block_table)
        new_blocks = seq.block_table[len(seq.block_table) - seq.unsent_blocks :] if seq.unsent_blocks else []
        seq.unsent_blocks = 0
        start = seq.num_computed
        return ScheduledChunk(
            request_id=seq.request_id,
            token_ids=seq.tokens[start : start + n],
            start_position=start,
            new_block_ids=new_blocks,
            sample=start + n == len(seq.tokens),
        )

    def _release(self, seq: Sequence) -> None:
        if seq.status is Status.SWAPPING_IN:
            # Both tables are under the copy: on_swap_done frees them once it lands.
            seq.block_table, seq.host_table, seq.host_tokens = [], [], 0
            seq.unsent_blocks = 0
            return
        # (While swapping out, the tables hold only blocks outside the copy; the copy's own are
        # freed when it lands.)
        self._drop_host_copy(seq)
        if seq.block_table:
            self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.unsent_blocks = 0
        if seq.executor_known:
            self._releases.append(seq.request_id)
            seq.executor_known = False

    def _preempt(self, seq: Sequence, count: bool = True) -> None:
        """Swap the KV out if possible, else drop it (recompute); either way requeue the request."""
        if count:
            seq.preemptions += 1
            self.stats.counters["preemptions"] += 1
        if seq in self.running:
            self.running.remove(seq)
        if seq.executor_known:
            self._releases.append(seq.request_id)
            seq.executor_known = False
        if count and self._swap_out(seq):
            log.debug("preempted_swap", request_id=seq.request_id, computed=seq.num_computed)
        else:
            if count:
                self.stats.counters["recomputed_tokens"] += seq.num_computed
            log.debug("preempted_recompute", request_id=seq.request_id, computed=seq.num_computed)
            self._release(seq)
            seq.num_computed = 0
            seq.status = Status.WAITING
        if seq not in self.waiting:
            self.waiting.append(seq)

    def _finish(self, seq: Sequence, reason: Finish) -> None:
        if seq.conversation is not None and reason in (Finish.LENGTH, Finish.EOS, Finish.STOP):
            self.last_turn[seq.conversation] = seq.tokens
            if seq.status is Status.RUNNING and self.config.reuse:
                self._keep(seq)
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish = reason
        self.requests.pop(seq.request_id, None)
        self.stats.counters[f"finished_{reason.value}"] += 1
