"""The scheduler: decides, every step, which tokens run and which KV blocks they use.

It is the one place that moves requests between states, through four parts with their own modules:

- `BlockManager` (block_manager.py): the device pool and requests' block tables;
- `SwapManager` (swap_manager.py): copies to and from the swap daemon's host pool;
- `ConversationCache` (conversations.py): conversations' histories and the KV kept between turns;
- the policy (policy.py, vtc.py): the order in which requests deserve to run.

Read `schedule()` top to bottom. It walks the live requests in policy order and admits each one: the
request gets the tokens it needs this step and the blocks to hold them, and lower-ranked requests
are preempted when room runs out. Then it plans the step. `on_step_output()` applies the executor's
sampled tokens; `on_swap_done()` applies a swap daemon's completion.

The steady state has a fast path, because it is most steps of a busy node: every live request of the
node runs and decodes, and nothing waits. Then the ranking decides nothing (everyone runs; there is
nobody to admit and, with the blocks there, nobody to preempt), so `schedule()` skips the walk and plans
one decode for every running request (`_plan_decodes`); the plan is the one the walk would make (a test
compares them). Plain decodes travel packed (`DecodeBatch`), and `on_step_output()` applies them in one
tight loop and counts service once per tenant.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

import structlog

from scheduler_svc.block_manager import BlockManager
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.conversations import ConversationCache, KeptKV, Message
from scheduler_svc.policy import Policy, PriorityUpdates, make_policy
from scheduler_svc.sequence import Finish, Phase, RequestState, Sequence, now
from scheduler_svc.stats import Stats
from scheduler_svc.swap_manager import SwapManager, SwapOrder
from svc_common.plan import DecodeBatch, NewRequest, ScheduledChunk, StepOutput, StepPlan
from svc_common.swap import Direction

if TYPE_CHECKING:
    from scheduler_svc.swap_manager import HostLoan, Owner

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class TokenEvent:
    """A token the executor sampled for a live sequence (the engine detokenises and streams it)."""

    seq: Sequence
    token_id: int


_QUEUED = (RequestState.WAITING, RequestState.SWAPPED)
_RUNNING = RequestState.RUNNING
_slot_of = attrgetter("slot")
_tenant_of = attrgetter("tenant")


class Room(enum.Enum):
    """Whether a request can have the device blocks it needs."""

    OK = "ok"  # they are free now
    WAIT = "wait"  # copies to the host in flight will free them: preempting more would only throw work away
    NO = "no"  # nothing left to preempt


@dataclass(slots=True)
class _Step:
    """The step being planned."""

    budget: int  # tokens still free in this step
    chunks: list[ScheduledChunk] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    decodes: DecodeBatch = field(default_factory=DecodeBatch)  # plain decodes of requests the executor knows
    decoding: list[Sequence] = field(default_factory=list)  # their requests, in the batch's order
    # Set once a request waits for blocks that copies in flight will free: nobody ranked below may take blocks.
    blocked: bool = False


@dataclass(slots=True)
class InFlight:
    """A plan sent to the executor and not answered yet."""

    plan: StepPlan
    decoding: list[Sequence]  # the requests of its DecodeBatch, in the batch's order
    covered: bool  # it holds every request running when it was made


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        block_size: int,
        eos_token_ids: set[int],
        policy: Policy | None = None,
        *,
        stats: Stats | None = None,
        conversations: ConversationCache | None = None,
        priority_updates: PriorityUpdates | None = None,
    ) -> None:
        """One node's scheduler. A fleet of nodes shares one `policy`, `stats`, `conversations` and
        `priority_updates` (fairness and histories are fleet-wide); alone, the scheduler makes its own."""
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.stats = stats if stats is not None else Stats()
        self.blocks = BlockManager(num_blocks, block_size)
        self.swaps = SwapManager(config, self.blocks, self.stats, reclaim_host=self._reclaim_host)
        self.conversations = conversations if conversations is not None else ConversationCache(config, self.stats)
        self.policy = policy or make_policy(config)
        self.priority_updates = priority_updates or PriorityUpdates(
            config.priority_updates, config.priority_update_prob, config.priority_levels, config.seed
        )
        self.requests: dict[str, Sequence] = {}  # every live request of this node, by id
        self.running: list[Sequence] = []  # the live requests in state RUNNING
        self.waiting: list[Sequence] = []  # every other live request
        # Plans sent and not answered yet, oldest first: one, or two while a plan made ahead (`plan_ahead`)
        # follows the running one.
        self.in_flight: deque[InFlight] = deque()
        self.generated_tokens = 0  # tokens this node's steps produced
        self.passed_over: list[Sequence] = []  # queued requests the last step did not admit, best-ranked first
        # Whether the last walk stopped for want of room (batch cap, blocks), not of step budget: only then do
        # its passed-over requests outrank every request running here (so they may preempt elsewhere).
        self.short_of_room = False
        # Device blocks the queued requests still need (each one's `queued_blocks`, counted as it joined the
        # queue and again after every step that walked the queue): what placement weighs, in O(1).
        self.queued_blocks = 0
        self.fast_path = True  # plan the steady state without the walk (tests turn it off to compare)
        self._lowest: Sequence | None = None  # the lowest-ranked running request at the last ranking
        self._lowest_stale = False  # the last step skipped the ranking: rank when asked
        self._steady = False  # every running request decodes: the last plan held each one, and each sampled
        self._releases: list[str] = []  # requests the executor must forget with the next plan
        self._step_ids = itertools.count()
        self._free_slots: list[int] = []  # (a heap) slots of requests the executor has been told to forget
        self._slot_ids = itertools.count()

    # -- requests in and out ----------------------------------------------------------------------

    def add(self, seq: Sequence, messages: list[Message] | None = None) -> None:
        """Queue a new request (a conversation's turn starts from its kept KV; `messages` is the
        conversation's history with this turn's prompt). The policy weighs it against the tenants with
        live requests (across the fleet: `stats` is shared). Raises ResourceExhaustedError, changing
        nothing, when a new conversation finds no room."""
        if seq.conversation is not None:
            self.conversations.start_turn(seq, self.swaps, messages)
        self.policy.on_arrival(seq, self.stats.live_tenants())
        self.stats.request_started(seq.tenant)
        self.adopt(seq)

    def adopt(self, seq: Sequence) -> None:
        """Queue a request that arrived elsewhere (moved from another node: it holds no KV here)."""
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        self._count_queued(seq)

    def movable(self, seq: Sequence) -> bool:
        """Whether seq can leave this node at no cost: queued, with no KV here and no copy in flight."""
        return seq.state is RequestState.WAITING and not seq.block_table and not seq.host_table

    def detach(self, seq: Sequence) -> None:
        """Take a movable request off this node (the caller adopts it elsewhere)."""
        if not self.movable(seq):
            raise ValueError(f"request {seq.request_id} holds KV or a copy on this node ({seq.state.value})")
        del self.requests[seq.request_id]
        self._unqueue(seq)
        if seq.executor_known:  # (never: it holds no blocks) kept for safety
            self._forget(seq)

    # -- migration (the fleet moves a queued request that holds KV: migration.py) -------------------

    def stage_for_migration(self, seq: Sequence) -> bool:
        """Start copying a queued request's device KV to the host, so that it can migrate from there once
        the copy lands; False if it cannot (no daemon, host pool full: it stays as it is)."""
        if seq.state is not RequestState.WAITING or not seq.block_table or seq.num_computed == 0:
            return False
        if not self.swaps.swap_out(seq):  # (a queued request is not the executor's: nothing to release)
            return False
        self._count_queued(seq)
        self.stats.count("migrations_staged")
        return True

    def hand_over(self, seq: Sequence) -> HostLoan:
        """Take a swapped request off this node for another node to pull its KV: its host blocks stay
        allocated, lent to that pull, until it ends."""
        if seq.state is not RequestState.SWAPPED or not seq.host_table:
            raise ValueError(f"request {seq.request_id} has no KV on this node's host ({seq.state.value})")
        loan = self.swaps.lend(seq.host_table)
        seq.host_table = []
        del self.requests[seq.request_id]
        self._unqueue(seq)
        return loan

    def host_room(self, num_blocks: int, seq: Sequence) -> list[int] | None:
        """Host blocks for a request migrating here (reclaiming idle host copies); None if there is no room."""
        return self.swaps.allocate_host(num_blocks, None, spare=seq) if self.swaps.enabled else None

    def receive(self, seq: Sequence, dest: list[int], source: HostLoan, source_addr: str, tokens: int) -> None:
        """Queue a request migrating here: pull the KV of its first `tokens` tokens from the other node's
        host blocks (`source`, through its daemon at `source_addr`) into `dest` (from `host_room`); once
        they land it swaps in as usual."""
        self.adopt(seq)
        seq.host_tokens = 0  # until the pull lands
        seq.move_to(RequestState.MIGRATING)
        self.swaps.pull(seq, dest, source, source_addr, tokens)

    def forget_kv(self, seq: Sequence) -> None:
        """Drop a queued request's KV (device and host): it recomputes wherever it runs next."""
        if seq.state not in _QUEUED:
            raise ValueError(f"request {seq.request_id} is not queued ({seq.state.value})")
        self.stats.count("recomputed_tokens", seq.num_computed)
        self._release(seq)
        seq.num_computed = 0
        if seq.state is RequestState.SWAPPED:
            seq.move_to(RequestState.WAITING)
        self._count_queued(seq)

    def abort(self, request_id: str, reason: Finish = Finish.CANCELLED) -> Sequence | None:
        """End a live request now; returns it, or None if it is not live."""
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return None
        self._finish(seq, reason)
        return seq

    def finish(self, seq: Sequence, reason: Finish) -> None:
        """End a sequence for a reason found outside the scheduler (a stop string)."""
        if not seq.finished:
            self._finish(seq, reason)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._releases or self.swaps.has_decided)

    # -- one step ---------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to do.

        Walk every live request in policy order and admit it. When blocks or the batch cap stand in
        its way, requests ranked below it are preempted, lowest first. When none is left to preempt,
        the walk stops, so nobody overtakes a higher-ranked request.
        """
        self.stats.count("priority_changes", self.priority_updates.apply(self.requests.values()))
        self.conversations.expire(now())
        grown = self._grow_decodes()
        if grown is not None and self.fast_path:
            return self._plan_decodes(grown)
        step = _Step(budget=self.config.max_step_tokens)
        ranked = self.policy.order([*self.running, *self.waiting])
        self._lowest = next((s for s in reversed(ranked) if s.state is RequestState.RUNNING), None)
        self._lowest_stale = False
        self.short_of_room = False
        for i, seq in enumerate(ranked):
            if step.budget <= 0:
                break
            if not seq.state.schedulable:
                continue  # a copy is in flight for it
            if not self._admit(seq, ranked, i, step):
                self.short_of_room = True
                break
        # What this step passed over, best-ranked first: the fleet may place it on another node.
        self.passed_over = [s for s in ranked if s.state in _QUEUED] if self.waiting else []
        self._recount_queued()
        return self._plan(step)

    def _grow_decodes(self) -> list[Sequence] | None:
        """In the steady state (every live request of the node runs and decodes, nothing waits, the step
        has room for all of them and the pool for their new blocks), give the decodes that cross into a
        new block that block now, in the running list's order, and return them. None otherwise: the walk
        decides.

        Handed out before the walk, in one fixed order, the blocks are the same whether the walk or the
        fast path plans the step; which request the walk ranks first does not matter here, as every
        one is admitted."""
        running = self.running
        if not self._steady or self.waiting or not running or len(running) > self.config.max_step_tokens:
            return None
        bs = self.blocks.block_size
        # (The table holds the KV of num_computed tokens: it lacks a block only at a block boundary.)
        grown = [s for s in running if not s.num_computed % bs and s.num_computed >= len(s.block_table) * bs]
        if len(grown) > self.blocks.num_free:
            return None
        for seq in grown:
            self.blocks.reserve(seq, 1)
        return grown

    def _plan_decodes(self, grown: list[Sequence]) -> StepPlan | None:
        """The steady state's plan without the walk: one decode for every running request (`grown`: those
        given a new block). VTC stays as fair as the walk: counters move only by what each request is
        served, and each is served one token, as it would be in any order."""
        running = self.running
        step = _Step(budget=self.config.max_step_tokens - len(running), decoding=list(running))
        batch = step.decodes
        batch.slots = [s.slot for s in running]
        batch.token_ids = [s.tokens[-1] for s in running]
        batch.positions = [s.num_computed for s in running]
        for seq in grown:
            blocks = self.blocks.take_unsent(seq)
            batch.block_slots += [seq.slot] * len(blocks)
            batch.block_ids += blocks
        self.passed_over = []
        self.short_of_room = False
        self._lowest_stale = True
        self.stats.count("steps_decode_only")
        return self._plan(step)

    @property
    def lowest_running(self) -> Sequence | None:
        """The lowest-ranked running request at the last ranking (ranked now when the last step skipped it)."""
        if self._lowest_stale:
            ranked = self.policy.order([*self.running, *self.waiting])
            self._lowest = next((s for s in reversed(ranked) if s.state is RequestState.RUNNING), None)
            self._lowest_stale = False
        return self._lowest

    def _admit(self, seq: Sequence, ranked: list[Sequence], i: int, step: _Step) -> bool:
        """Give seq (ranked[i]) its tokens for this step and their blocks, or start its swap-in;
        preempt below it when room is short. False: the walk stops here."""
        n = min(seq.num_pending, step.budget)
        swapped = seq.state is RequestState.SWAPPED
        needed = len(seq.host_table) if swapped else self.blocks.shortfall(seq, n)
        admitted = seq.state is RequestState.RUNNING
        capped = not admitted and len(self.running) >= self.config.max_running
        # Built only when room is short: it is the walk's one O(n) step.
        victims = self._victims(ranked[i + 1 :]) if capped or needed > self.blocks.num_free else []
        if not admitted and not self._make_batch_room(victims):
            return False
        if needed > 0:
            room = Room.WAIT if step.blocked else self._make_room(needed, victims)
            if room is Room.WAIT:  # copies in flight will free the blocks; those ranked below wait too
                step.blocked = True
                seq.set_blocked(True)
                return True
            if room is Room.NO:
                if admitted:
                    self._preempt(seq)  # it cannot go on: off the device, back in line
                else:
                    seq.set_blocked(True)
                return False
        if seq.blocked:
            seq.set_blocked(False)
        if swapped:
            self.swaps.swap_in(seq)  # it runs once its KV is back
            return True
        self.blocks.reserve(seq, n)
        if seq.state is RequestState.WAITING:
            self._unqueue(seq)
            seq.move_to(RequestState.RUNNING)
            self.running.append(seq)
        step.budget -= n
        self._chunk(seq, n, step)
        return True

    def _victims(self, lower: list[Sequence]) -> list[Sequence]:
        """Requests below one in the ranking that hold device blocks (running, or swapped back in),
        lowest first: whom it may preempt."""
        on_device = (RequestState.RUNNING, RequestState.WAITING)
        return [s for s in reversed(lower) if s.block_table and s.state in on_device]

    def _make_batch_room(self, victims: list[Sequence]) -> bool:
        """Preempt running victims until the batch cap leaves a place; False if it cannot."""
        running_victims = [s for s in victims if s.state is RequestState.RUNNING]
        while len(self.running) >= self.config.max_running and running_victims:
            victim = running_victims.pop(0)
            victims.remove(victim)
            self._preempt(victim)
        return len(self.running) < self.config.max_running

    def _make_room(self, needed: int, victims: list[Sequence]) -> Room:
        """Free `needed` device blocks: idle conversations' kept KV first, then `victims` (lowest first)."""
        while self.blocks.num_free < needed:
            if self.blocks.num_free + self.swaps.landing_blocks() >= needed:
                return Room.WAIT
            if self.conversations.free_device_room(self.swaps):
                continue
            if not victims:
                return Room.NO
            self._preempt(victims.pop(0))
        return Room.OK

    def _chunk(self, seq: Sequence, n: int, step: _Step) -> None:
        """Add seq's n tokens to the step: a plain decode of a request the executor knows to the packed
        batch, anything else as a chunk."""
        if seq.executor_known and seq.grammar is None and seq.num_pending == 1 and len(seq.tokens) > seq.num_prompt:
            batch = step.decodes
            batch.slots.append(seq.slot)
            batch.token_ids.append(seq.tokens[-1])
            batch.positions.append(seq.num_computed)
            if seq.unsent_blocks:
                blocks = self.blocks.take_unsent(seq)
                batch.block_slots += [seq.slot] * len(blocks)
                batch.block_ids += blocks
            step.decoding.append(seq)
            return
        if not seq.executor_known:  # new to the executor: it gets the whole block table
            seq.slot = heapq.heappop(self._free_slots) if self._free_slots else next(self._slot_ids)
            step.new_requests.append(NewRequest(seq.request_id, seq.sampling, seq.slot))
            seq.executor_known = True
            seq.unsent_blocks = len(seq.block_table)
        start = seq.num_computed
        sample = start + n == len(seq.tokens)
        step.chunks.append(
            ScheduledChunk(
                request_id=seq.request_id,
                token_ids=seq.tokens[start : start + n],
                start_position=start,
                new_block_ids=self.blocks.take_unsent(seq),
                sample=sample,
                token_bitmask=seq.grammar.mask if seq.grammar is not None and sample else b"",
            )
        )

    def _plan(self, step: _Step) -> StepPlan | None:
        if not step.chunks and not step.decoding and not self._releases:
            if self.swaps.has_decided:
                self.stats.count("steps_without_compute")
            return None
        plan = StepPlan(next(self._step_ids), step.new_requests, step.chunks, self._releases, step.decodes)
        self._releases = []
        covered = len(step.chunks) + len(step.decoding) == len(self.running)
        self.in_flight.append(InFlight(plan, step.decoding, covered))
        self.stats.count("steps")
        return plan

    def plan_ahead(self) -> StepPlan | None:
        """The next decode step, planned while the one in flight runs (`--lookahead`): the GPU then finds
        it waiting when it ends, instead of idling while the output crosses to the scheduler, is
        streamed, and the next plan is made and sent back. None unless nothing but decoding goes on.

        Only in the steady state: the plan in flight decodes every running request and nothing else,
        nothing waits, and no copy is decided. Its requests decode again, at the next position, fed
        the tokens that step samples (`DecodeBatch.previous_tokens`: the executor knows them first);
        a request the step in flight brings to max_tokens is left out. One that ends there otherwise
        (EOS, a stop string, a cancellation) computes one token in vain, which is dropped. The walk
        (preemption, admission, copies) runs only with nothing in flight, so no block a step in
        flight writes is ever the target of a copy."""
        if not self.config.lookahead or len(self.in_flight) != 1:
            return None
        ahead = self.in_flight[0]
        if ahead.plan.chunks or not ahead.covered or not ahead.decoding or self.waiting or self.swaps.has_decided:
            return None
        bs = self.blocks.block_size
        keep: list[Sequence] = []
        positions: list[int] = []
        for seq, position in zip(ahead.decoding, ahead.plan.decodes.positions, strict=True):
            if seq.state is _RUNNING and len(seq.tokens) + 1 - seq.num_prompt < seq.max_tokens:
                keep.append(seq)
                positions.append(position + 1)
        # (A request's num_computed is still the in-flight step's position: the step ahead needs room for two.)
        grown = [(s, p) for s, p in zip(keep, positions, strict=True) if p >= len(s.block_table) * bs]
        if not keep or len(grown) > self.blocks.num_free:
            return None
        batch = DecodeBatch([s.slot for s in keep], [], positions, previous_tokens=True)
        for seq, position in grown:
            self.blocks.reserve(seq, position + 1 - seq.num_computed)
            blocks = self.blocks.take_unsent(seq)
            batch.block_slots += [seq.slot] * len(blocks)
            batch.block_ids += blocks
        self.stats.count("steps_ahead")
        return self._plan(_Step(budget=0, decodes=batch, decoding=keep))

    def on_step_output(self, output: StepOutput) -> list[TokenEvent]:
        """Advance every sequence of the oldest plan in flight; returns the tokens to stream."""
        if not self.in_flight or self.in_flight[0].plan.step_id != output.step_id:
            raise RuntimeError(f"step result {output.step_id} does not match the plan in flight")
        oldest = self.in_flight[0]
        plan, decoding, steady = oldest.plan, oldest.decoding, oldest.covered
        if len(output.decode_tokens) != len(decoding):
            raise RuntimeError(
                f"step result {output.step_id} has {len(output.decode_tokens)} decode tokens, "
                f"its plan {len(decoding)} decodes"
            )
        self.in_flight.popleft()
        events: list[TokenEvent] = []
        served: dict[str, list[int]] = {}  # tenant -> [prompt tokens, generated tokens] this step
        if plan.chunks:
            steady = self._apply_chunks(plan, output, events, served) and steady
        if decoding:
            self._apply_decodes(decoding, output.decode_tokens, events, served)
        for tenant, (prompt, generated) in served.items():  # service counted once per tenant per step
            self.policy.on_served(tenant, prompt, generated)
            self.stats.served(tenant, prompt, generated)
        self._steady = steady
        self.stats.count("generated_tokens", len(events))
        self.generated_tokens += len(events)
        return events

    def _apply_decodes(
        self, seqs: list[Sequence], tokens: list[int], events: list[TokenEvent], served: dict[str, list[int]]
    ) -> None:
        """The decodes' sampled tokens, in one tight loop (plain decodes: no prompt, no grammar, and
        their phase is decode already)."""
        eos = self.eos_token_ids
        ended: list[Sequence] = []
        skipped = False
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.state is not _RUNNING:
                skipped = True  # cancelled while the step ran
                continue
            history = seq.tokens
            seq.num_computed = len(history)
            history.append(token)
            if token in eos or len(history) - len(seq.prompt_ids) >= seq.max_tokens:
                ended.append(seq)
        if skipped:
            pairs = [(s, t) for s, t in zip(seqs, tokens, strict=True) if s.state is _RUNNING]
            seqs, tokens = [s for s, _ in pairs], [t for _, t in pairs]
        events.extend(map(TokenEvent, seqs, tokens))
        for tenant, n in Counter(map(_tenant_of, seqs)).items():
            served.setdefault(tenant, [0, 0])[1] += n
        ended.sort(key=_slot_of)  # the same order whichever order the decodes ran in
        for seq in ended:
            if len(seq.tokens) - seq.num_prompt >= seq.max_tokens:
                self._finish(seq, Finish.LENGTH)
            elif not seq.ignore_eos:
                self._finish(seq, Finish.EOS)

    def _apply_chunks(
        self, plan: StepPlan, output: StepOutput, events: list[TokenEvent], served: dict[str, list[int]]
    ) -> bool:
        """The chunks' progress and sampled tokens. True if every chunk sampled and none has a grammar
        (each of their requests now decodes plainly)."""
        sampled = dict(output.tokens)
        at = now()  # one clock reading for the step's phase changes
        plain = True
        for chunk in plan.chunks:
            seq = self.requests.get(chunk.request_id)
            if seq is None or seq.state is not RequestState.RUNNING:
                continue  # cancelled or preempted while the step ran
            plain = plain and chunk.sample and seq.grammar is None
            seq.num_computed = chunk.start_position + len(chunk.token_ids)
            prompt_done = max(0, min(seq.num_computed, seq.num_prompt) - max(chunk.start_position, seq.prompt_served))
            seq.prompt_served += prompt_done
            generated = 1 if chunk.sample else 0
            account = served.setdefault(seq.tenant, [0, 0])
            account[0] += prompt_done
            account[1] += generated
            if chunk.sample:
                token = sampled[chunk.request_id]
                seq.tokens.append(token)
                events.append(TokenEvent(seq, token))
                is_eos = token in self.eos_token_ids
                # Structured output: the grammar follows generated tokens only (an ignored EOS is not one).
                if seq.grammar is not None and not (is_eos and seq.ignore_eos) and not seq.grammar.accept(token):
                    self._finish(seq, Finish.ERROR)
                elif len(seq.tokens) - seq.num_prompt >= seq.max_tokens:
                    self._finish(seq, Finish.LENGTH)
                elif (is_eos and not seq.ignore_eos) or (seq.grammar is not None and seq.grammar.done):
                    self._finish(seq, Finish.EOS)  # a finished grammar allows only EOS: end without sampling it
            if not seq.finished and seq.phases.current is not Phase.DECODE:  # decoding stays decoding while it runs
                seq.update_phase(at)
        return plain

    # -- swaps --------------------------------------------------------------------------------------

    def attach_host_pool(self, num_host_blocks: int) -> None:
        """A swap daemon with this many host blocks is attached: preemption may swap. (The daemon
        accepts a new attachment only once the copies of its previous stream have ended, so the
        device blocks quarantined when that stream broke are safe to reuse now.)"""
        self.swaps.attach(num_host_blocks)
        self.swaps.release_quarantine()

    def expire_quarantine(self, now: float | None = None) -> bool:
        """The daemon did not re-attach within QUARANTINE_S of its stream breaking: the blocks under its
        last copies are free again (swap_manager.QUARANTINE_S says why that is safe); True if any were."""
        if not self.swaps.quarantine_expired(now):
            return False
        log.warning("quarantine_expired", blocks=len(self.swaps.quarantined))
        self.swaps.release_quarantine()
        self._recount_queued()
        return True

    def take_swap_orders(self) -> list[SwapOrder]:
        """The copies decided since the last call, now in flight (the engine sends them)."""
        return self.swaps.take_orders()

    def on_swap_done(
        self, swap_id: int, ok: bool, *, bytes_moved: int = 0, copy_calls: int = 0, copy_s: float = 0.0
    ) -> None:
        """A copy ended (ok or failed): apply it to its owner; unknown ids are ignored."""
        order = self.swaps.complete(swap_id)
        if order is None:
            return
        self.stats.count(f"swap_{order.direction.value}_bytes", bytes_moved)
        if order.direction is Direction.PULL:  # between daemons: not a device copy
            self.stats.count("migration_pull_s", copy_s)
        else:
            self.stats.count("copy_calls", copy_calls)
            self.stats.count("swap_copy_s", copy_s)
        self._copy_ended(order, ok)
        owner = order.owner
        if isinstance(owner, KeptKV):
            self._recount_queued()  # a turn waiting for this KV may hold some of it now
        elif self.requests.get(owner.request_id) is owner and owner.state is not _RUNNING:
            self._count_queued(owner)

    def _copy_ended(self, order: SwapOrder, ok: bool) -> None:
        if isinstance(order.owner, KeptKV):
            self.conversations.spill_done(order, ok)
        else:
            self.swaps.request_copy_done(order, ok)

    def on_swap_daemon_lost(self) -> None:
        """Copies in flight and KV on the host are gone: those requests recompute from tokens."""
        for order in self.swaps.detach():
            # The daemon may still be running this copy (only its stream broke): its device blocks
            # stay out of use until a new attachment proves it has finished (or the pool is replaced).
            self.swaps.quarantine(order)
            self._copy_ended(order, ok=False)
        for seq in self.requests.values():
            if seq.state is RequestState.SWAPPED:
                self.swaps.fall_back_to_recompute(seq)
            seq.host_table, seq.host_tokens = [], 0
        self.conversations.forget_host_copies(self.swaps)
        self._recount_queued()
        self.stats.count("swap_daemon_lost")

    def _reclaim_host(self, spare: Owner) -> bool:
        """Host room for `spare`'s copy: idle conversations' host copies go first (least recently used),
        then the host copies of requests whose KV is on the device (they only save copying later)."""
        if self.conversations.evict_host_copy(self.swaps, spare):
            return True
        on_device = (RequestState.RUNNING, RequestState.WAITING)
        mirrors = [s for s in self.requests.values() if s.host_table and s.state in on_device and s is not spare]
        for seq in mirrors:
            self.swaps.drop_host_copy(seq)
        self.stats.count("host_copies_dropped", len(mirrors))
        return bool(mirrors)

    # -- the executor -------------------------------------------------------------------------------

    def on_executor_lost(self) -> None:
        """The executor was lost, and the device KV with it: requests whose KV was on the device
        recompute from tokens, and conversations keep only what the host holds."""
        self.in_flight.clear()
        self._steady = False
        for seq in list(self.running):
            self.stats.count("recomputed_tokens", seq.num_computed)
            self._preempt(seq, count=False)
        for seq in self.waiting:
            if seq.state is RequestState.WAITING and seq.block_table:  # swapped back in, or reusing kept KV
                self.stats.count("recomputed_tokens", seq.num_computed)
                self._release(seq)
                seq.num_computed = 0
        self.conversations.forget_device_copies(self.swaps)
        self._recount_queued()
        self._releases = []  # the new executor knows no request: nothing to release

    # -- freeing ------------------------------------------------------------------------------------

    def _preempt(self, seq: Sequence, count: bool = True) -> None:
        """Swap the KV out if possible, else drop it (recompute); either way requeue the request."""
        if count:
            seq.preemptions += 1
            self.stats.count("preemptions")
        if seq.state is RequestState.RUNNING:
            self.running.remove(seq)
            self.waiting.append(seq)
        if seq.executor_known:
            self._forget(seq)
        if count and self.swaps.swap_out(seq):
            self.stats.count("preemptions_swap")
            log.debug("preempted_swap", request_id=seq.request_id, computed=seq.num_computed)
        else:
            if count:
                self.stats.count("preemptions_recompute")
                self.stats.count("recomputed_tokens", seq.num_computed)
            log.debug("preempted_recompute", request_id=seq.request_id, computed=seq.num_computed)
            self._release(seq)
            seq.num_computed = 0
            seq.move_to(RequestState.WAITING)
        self._count_queued(seq)

    def _release(self, seq: Sequence) -> None:
        """Free what seq owns, now or (under a copy) once the copy lands."""
        if seq.state in (RequestState.SWAPPING_IN, RequestState.MIGRATING):
            # Both tables are under the copy: it frees them once it lands.
            seq.block_table, seq.host_table, seq.host_tokens = [], [], 0
            seq.unsent_blocks = 0
            return
        # (While swapping out, the tables hold only blocks outside the copy; the copy's own are
        # freed when it lands.)
        self.swaps.drop_host_copy(seq)
        self.blocks.release(seq)
        if seq.executor_known:
            self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        """The executor drops seq with the next plan (releases apply first, so its slot is free for that
        plan's new requests)."""
        self._releases.append(seq.request_id)
        seq.executor_known = False
        heapq.heappush(self._free_slots, seq.slot)

    def _finish(self, seq: Sequence, reason: Finish) -> None:
        if seq.conversation is not None:
            self.conversations.finish_turn(seq, reason, self.swaps)  # may keep its KV for the next turn
        self._release(seq)
        if seq.state is RequestState.RUNNING:
            self.running.remove(seq)
        else:
            self._unqueue(seq)
        seq.move_to(RequestState.FINISHED)
        seq.finish = reason
        del self.requests[seq.request_id]
        self.stats.request_ended(seq.tenant)
        self.stats.count(f"finished_{reason.value}")

    # -- the queue's block needs ------------------------------------------------------------------

    def _queued_need(self, seq: Sequence) -> int:
        return max(0, self.blocks.blocks_for(len(seq.tokens)) - len(seq.block_table))

    def _count_queued(self, seq: Sequence) -> None:
        """seq joined the queue, or its KV changed while queued: count what it needs now."""
        need = self._queued_need(seq)
        self.queued_blocks += need - seq.queued_blocks
        seq.queued_blocks = need

    def _unqueue(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        self.queued_blocks -= seq.queued_blocks
        seq.queued_blocks = 0

    def _recount_queued(self) -> None:
        """Count every queued request's need again (a copy, a conversation's KV or a lost pool changed it)."""
        total = 0
        for seq in self.waiting:
            seq.queued_blocks = need = self._queued_need(seq)
            total += need
        self.queued_blocks = total

    # -- views --------------------------------------------------------------------------------------

    def gauges(self) -> dict[str, float]:
        """What the pools and queues hold right now."""
        gauges: dict[str, float] = {
            "device_blocks_free": self.blocks.num_free,
            "device_blocks_total": self.blocks.num_blocks,
            "device_blocks_quarantined": len(self.swaps.quarantined),
            "swaps_in_flight": self.swaps.num_in_flight,
            "running": len(self.running),
            "waiting": len(self.waiting),
            **self.conversations.gauges(self.swaps),
        }
        if self.swaps.host is not None:
            gauges["host_blocks_free"] = self.swaps.host.num_free
            gauges["host_blocks_total"] = self.swaps.host.num_blocks
        return gauges
