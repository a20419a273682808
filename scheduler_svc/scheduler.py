"""The scheduler: decides, every step, which tokens run and which KV blocks they use.

Read `schedule()` top to bottom: running requests first (in policy order), each gets the tokens it
needs this step and the blocks to hold them, preempting the policy's victim when blocks run out;
then waiting requests are admitted while the step's token budget, the batch cap and free blocks
allow. `on_step_output()` applies the executor's sampled tokens. Every block a request owns is
allocated here and freed here (`_release`), and nowhere else.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import structlog

from fastswitch.common.plan import NewRequest, ScheduledChunk, StepOutput, StepPlan
from scheduler_svc.block_manager import BlockAllocator
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.policy import Policy, make_policy
from scheduler_svc.sequence import Finish, Sequence, Status

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class TokenEvent:
    """A token the executor sampled for a live sequence (the engine detokenises and streams it)."""

    seq: Sequence
    token_id: int


@dataclass(slots=True)
class Stats:
    counters: Counter[str] = field(default_factory=Counter)


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

    # -- requests in and out ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str, reason: Finish = Finish.CANCELLED) -> Sequence | None:
        """End a live request now; returns it, or None if it is not live."""
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return None
        self._finish(seq, reason)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._releases)

    # -- one step ---------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to do."""
        budget = self.config.max_step_tokens
        chunks: list[ScheduledChunk] = []
        new_requests: list[NewRequest] = []
        scheduled: list[Sequence] = []

        running = self.policy.order(self.running)
        while running and budget > 0:
            seq = running.pop(0)
            n = min(seq.num_pending, budget)
            while not self._reserve(seq, n):
                candidates = [s for s in running if s is not seq]
                if not candidates:
                    self._preempt(seq)
                    break
                victim = self.policy.victim(candidates)
                running.remove(victim)
                self._preempt(victim)
            else:
                scheduled.append(seq)
                budget -= n
                chunks.append(self._chunk(seq, n, new_requests))

        for seq in self.policy.order(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_running:
                break
            n = min(seq.num_pending, budget)
            if not self._reserve(seq, n):
                break  # strict order: a later, smaller request does not overtake
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= n
            chunks.append(self._chunk(seq, n, new_requests))

        if not chunks and not self._releases:
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
        self._releases = []
        for seq in list(self.running):
            self._preempt(seq, count=False)
            seq.executor_known = False

    # -- blocks -----------------------------------------------------------------------------------

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Make sure seq owns blocks for its first num_computed + n tokens."""
        needed = -(-(seq.num_computed + n) // self.block_size) - len(seq.block_table)
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
        if start == 0 and n == len(seq.tokens) and seq.preemptions == 0:
            self.stats.counters["prompt_tokens"] += seq.num_prompt
        return ScheduledChunk(
            request_id=seq.request_id,
            token_ids=seq.tokens[start : start + n],
            start_position=start,
            new_block_ids=new_blocks,
            sample=start + n == len(seq.tokens),
        )

    def _release(self, seq: Sequence) -> None:
        if seq.block_table:
            self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.unsent_blocks = 0
        if seq.executor_known:
            self._releases.append(seq.request_id)
            seq.executor_known = False

    def _preempt(self, seq: Sequence, count: bool = True) -> None:
        """Recompute preemption: drop the KV, requeue; the tokens are kept and recomputed later."""
        if count:
            seq.preemptions += 1
            self.stats.counters["preemptions"] += 1
            self.stats.counters["recomputed_tokens"] += seq.num_computed
        log.debug("preempted", request_id=seq.request_id, computed=seq.num_computed)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.append(seq)

    def _finish(self, seq: Sequence, reason: Finish) -> None:
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish = reason
        self.requests.pop(seq.request_id, None)
        self.stats.counters[f"finished_{reason.value}"] += 1
