"""The scheduler: decides, every step, which tokens run and which KV blocks they use.

Read `schedule()` top to bottom: every live request in policy order gets the tokens it needs this
step and the blocks to hold them, preempting lower-ranked requests when room runs out.
`on_step_output()` applies the executor's sampled tokens; `on_swap_done()` a swap daemon's
completion. Every block, on the device and on the host, is allocated and freed here and nowhere else.

Preemption either recomputes (drop the KV, keep the tokens) or swaps: the KV's blocks are copied to
the host pool as block groups (`SwapOrder`s the engine sends to the swap daemon) while the executor
keeps computing. Blocks under an in-flight copy are never reused until the copy lands, even if
their request is cancelled meanwhile; a swapped request is scheduled only once its KV is back.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import structlog

from fastswitch.common.plan import NewRequest, ScheduledChunk, StepOutput, StepPlan
from scheduler_svc.block_manager import BlockAllocator
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.policy import Policy, PriorityUpdates, make_policy
from scheduler_svc.sequence import Finish, Sequence, Status

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class TokenEvent:
    """A token the executor sampled for a live sequence (the engine detokenises and streams it)."""

    seq: Sequence
    token_id: int


@dataclass(slots=True)
class KeptKV:
    """A finished turn's KV, kept on the device for the conversation's next turn."""

    tokens: list[int]  # the tokens whose KV the blocks hold, in order
    blocks: list[int]
    last_used: float


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(slots=True)
class SwapOrder:
    """A copy the swap daemon must make: runs of (device_start, host_start, num_blocks)."""

    swap_id: int
    direction: str  # "out" | "in"
    seq: Sequence
    device_blocks: list[int]
    host_blocks: list[int]
    runs: list[tuple[int, int, int]]
    granularity: str  # "run" (block groups) | "block_layer" (vllm-like)


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
        seq = order.seq
        self.stats.counters["swap_out_done" if order.direction == "out" else "swap_in_done"] += 1
        if order.direction == "out":
            self.allocator.free(order.device_blocks)  # the copy has landed: reusable now
            if seq.finished or not ok:
                self._free_host(order.host_blocks)
                if not seq.finished:
                    self._requeue_for_recompute(seq)
                return
            seq.host_table = order.host_blocks
            seq.status = Status.SWAPPED
        else:
            self._free_host(order.host_blocks)
            seq.host_table = []
            if seq.finished or not ok:
                self.allocator.free(order.device_blocks)
                if not seq.finished:
                    seq.block_table = []
                    self._requeue_for_recompute(seq)
                return
            seq.status = Status.WAITING  # KV is back on the device: schedulable

    def on_swap_daemon_lost(self) -> None:
        """Copies in flight and KV on the host are gone: those requests recompute from tokens."""
        for swap_id in list(self.swaps):
            self.on_swap_done(swap_id, ok=False)
        for order in self._swap_orders:  # decided but never sent
            self.swaps[order.swap_id] = order
            self.on_swap_done(order.swap_id, ok=False)
        self._swap_orders = []
        for seq in list(self.waiting):
            if seq.status is Status.SWAPPED:
                seq.host_table = []
                self._requeue_for_recompute(seq)
        self.host = None
        self.stats.counters["swap_daemon_lost"] += 1

    def _free_host(self, blocks: list[int]) -> None:
        if self.host is not None and blocks:
            self.host.free(blocks)

    def _requeue_for_recompute(self, seq: Sequence) -> None:
        self.stats.counters["swap_fallback_recompute"] += 1
        self.stats.counters["recomputed_tokens"] += seq.num_computed
        seq.num_computed = 0
        seq.status = Status.WAITING
        if seq not in self.waiting:
            self.waiting.append(seq)

    def _swap_out(self, seq: Sequence) -> bool:
        """Start copying seq's KV to the host; False if it cannot (no daemon, host pool full)."""
        if not self.swapping_enabled or seq.num_computed == 0:
            return False
        assert self.host is not None
        kv_blocks = -(-seq.num_computed // self.block_size)
        host_blocks = self.host.allocate(kv_blocks)
        if host_blocks is None:
            self.stats.counters["swap_fallback_recompute"] += 1
            return False
        device_blocks = seq.block_table[:kv_blocks]
        extra = seq.block_table[kv_blocks:]
        if extra:
            self.allocator.free(extra)
        seq.block_table = []
        seq.unsent_blocks = 0
        seq.status = Status.SWAPPING_OUT
        self._order("out", seq, device_blocks, host_blocks)
        return True

    def _swap_in(self, seq: Sequence) -> bool:
        """Allocate device blocks for seq's host KV and start copying it back."""
        device_blocks = self.allocator.allocate(len(seq.host_table))
        if device_blocks is None:
            return False
        seq.block_table = device_blocks
        seq.unsent_blocks = len(device_blocks)
        seq.status = Status.SWAPPING_IN
        self._order("in", seq, device_blocks, seq.host_table)
        return True

    def _order(self, direction: str, seq: Sequence, device: list[int], host: list[int]) -> None:
        granularity = self.config.copy_granularity
        order = SwapOrder(next(self._swap_ids), direction, seq, device, host, pair_runs(device, host), granularity)
        self._swap_orders.append(order)
        self.stats.counters[f"swap_{direction}_orders"] += 1

    # -- requests in and out ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.policy.on_arrival(seq, self.requests.values())
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        if seq.conversation is not None:
            self._reuse(seq)

    # -- conversations ----------------------------------------------------------------------------

    def _reuse(self, seq: Sequence) -> None:
        """Start seq from its conversation's kept KV: the longest common token prefix is not recomputed."""
        kept = self.kept.pop(seq.conversation, None)  # type: ignore[arg-type]
        if kept is None:
            return
        # At least the last prompt token is computed again: its logits give the first new token.
        reuse = min(common_prefix(kept.tokens, seq.prompt_ids), seq.num_prompt - 1)
        keep = -(-reuse // self.block_size)
        self.allocator.free(kept.blocks[keep:])
        if reuse == 0:
            return
        seq.block_table = kept.blocks[:keep]
        seq.num_computed = reuse
        seq.reused_tokens = reuse
        seq.prompt_served = reuse  # reused KV is service the tenant already received
        self.stats.counters["reused_prefix_tokens"] += reuse

    def _keep(self, seq: Sequence) -> None:
        """A conversation turn ended: keep its KV on the device for the next turn."""
        assert seq.conversation is not None
        kv_blocks = -(-seq.num_computed // self.block_size)
        self.allocator.free(seq.block_table[kv_blocks:])
        old = self.kept.pop(seq.conversation, None)
        if old is not None:
            self.allocator.free(old.blocks)
        self.kept[seq.conversation] = KeptKV(
            seq.tokens[: seq.num_computed], seq.block_table[:kv_blocks], time.monotonic()
        )
        seq.block_table = []

    def drop_conversation(self, conversation: tuple[str, str]) -> bool:
        kept = self.kept.pop(conversation, None)
        if kept is not None:
            self.allocator.free(kept.blocks)
        return kept is not None

    def _evict_kept(self, now: float | None = None) -> bool:
        """Drop the least recently used kept KV (all of it older than the TTL when `now` is given)."""
        if not self.kept:
            return False
        if now is not None:
            expired = [k for k, v in self.kept.items() if now - v.last_used > self.config.conversation_ttl_s]
            for key in expired:
                self.drop_conversation(key)
                self.stats.counters["kept_kv_expired"] += 1
            return bool(expired)
        key = next(iter(self.kept))
        self.drop_conversation(key)
        self.stats.counters["kept_kv_evicted"] += 1
        return True

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
        self._evict_kept(now=time.monotonic())
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
        """The executor was lost: its KV is gone, so every running request recomputes from tokens."""
        self.in_flight = None
        for seq in list(self.running):
            self._preempt(seq, count=False)
        self._releases = []  # the new executor knows no request: nothing to release

    # -- blocks -----------------------------------------------------------------------------------

    def _blocks_short(self, seq: Sequence, n: int) -> int:
        return -(-(seq.num_computed + n) // self.block_size) - len(seq.block_table)

    def _make_room(self, needed: int, below: list[Sequence]) -> str:
        """Free `needed` device blocks by preempting `below` (lowest first): "ok", "wait" or "no".

        "wait": blocks already being swapped out will cover it when their copies land, so preempting
        more would only throw work away.
        """
        while self.allocator.num_free < needed and self._evict_kept():
            pass
        while self.allocator.num_free < needed:
            if self.allocator.num_free + self._landing_blocks() >= needed:
                return "wait"
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
        if seq.status in (Status.SWAPPING_OUT, Status.SWAPPING_IN):
            # on_swap_done frees both sides once the copy lands (blocks are not reused before).
            seq.block_table = []
            seq.host_table = []
            seq.unsent_blocks = 0
            return
        if seq.host_table:
            self._free_host(seq.host_table)
            seq.host_table = []
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
        if (
            seq.conversation is not None
            and reason in (Finish.LENGTH, Finish.EOS, Finish.STOP)
            and seq.status is Status.RUNNING
        ):
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
