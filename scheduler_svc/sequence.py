"""A request as the scheduler sees it: tokens, progress, the blocks it owns, and its state.

`RequestState` is a small state machine. `Sequence.move_to()` is the only way to change a request's
state, and it raises `IllegalTransition` on a move the scheduler must never make. Every move, and
every step that computes tokens, also updates the request's phase clock. So a finished request can
say where its time went: `queued`, `blocked` (waiting for blocks), `swap_in`, `prefill`,
`preempted`, `decode`. Those phases explain a latency tail.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from svc_common.plan import Sampling

clock = time.monotonic  # the phase clock's time source (tests replace it)
if TYPE_CHECKING:
    from scheduler_svc.grammar import GrammarState


def now() -> float:
    return clock()


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued; its KV is recomputed, or already back on the device
    RUNNING = "running"
    SWAPPING_OUT = "swapping_out"  # KV being copied to the host; device blocks not reusable yet
    SWAPPED = "swapped"  # KV on the host; queued
    SWAPPING_IN = "swapping_in"  # KV being copied back; not schedulable until it lands
    AWAITING_KV = "awaiting_kv"  # a conversation's next turn, queued until the kept KV's copy to the host lands
    MIGRATING = "migrating"  # moved here from another node; its KV is being pulled into this node's host pool
    FINISHED = "finished"

    @property
    def schedulable(self) -> bool:
        """Whether a step may give it tokens or start its swap-in (no copy is in flight for it)."""
        return self in (RequestState.WAITING, RequestState.RUNNING, RequestState.SWAPPED)


_S = RequestState
LEGAL_MOVES: dict[RequestState, frozenset[RequestState]] = {
    # WAITING -> WAITING: a request whose KV was back on the device drops it (preempted, executor lost).
    _S.WAITING: frozenset({_S.RUNNING, _S.WAITING, _S.SWAPPING_OUT, _S.SWAPPED, _S.AWAITING_KV, _S.FINISHED}),
    _S.RUNNING: frozenset({_S.WAITING, _S.SWAPPING_OUT, _S.SWAPPED, _S.FINISHED}),
    _S.SWAPPING_OUT: frozenset({_S.SWAPPED, _S.WAITING, _S.FINISHED}),
    _S.SWAPPED: frozenset({_S.SWAPPING_IN, _S.WAITING, _S.MIGRATING, _S.FINISHED}),
    _S.SWAPPING_IN: frozenset({_S.WAITING, _S.FINISHED}),
    _S.AWAITING_KV: frozenset({_S.WAITING, _S.FINISHED}),
    _S.MIGRATING: frozenset({_S.SWAPPED, _S.WAITING, _S.FINISHED}),
    _S.FINISHED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """The scheduler tried a state change the request's state machine does not allow (a bug)."""


class Finish(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


class Phase(enum.Enum):
    """Where a request's time goes, from arrival to finish; the names are on the wire and in the bench."""

    QUEUED = "queued"  # waiting for its turn (policy order, batch cap, step budget)
    BLOCKED = "blocked"  # its turn came but no device blocks were free
    SWAP_IN = "swap_in"  # waiting for its KV to come back from the host (or to arrive from another node)
    PREFILL = "prefill"  # computing its prompt (or recomputing its history after a preemption)
    PREEMPTED = "preempted"  # off the device after a preemption
    DECODE = "decode"  # generating, one token per step


@dataclass(slots=True)
class PhaseClock:
    """Seconds spent in each phase: exactly one phase runs from arrival until the clock stops."""

    current: Phase | None
    since: float
    totals: dict[Phase, float] = field(default_factory=lambda: dict.fromkeys(Phase, 0.0))

    def enter(self, phase: Phase | None, at: float) -> None:
        """Switch to `phase` at time `at` (None stops the clock)."""
        if phase is self.current:
            return
        if self.current is not None:
            self.totals[self.current] += at - self.since
        self.current, self.since = phase, at

    def seconds(self, at: float | None = None) -> dict[str, float]:
        """Seconds per phase name, the running phase counted up to `at` (default: now)."""
        totals = dict(self.totals)
        if self.current is not None:
            totals[self.current] += (now() if at is None else at) - self.since
        return {phase.value: seconds for phase, seconds in totals.items()}


@dataclass(slots=True, eq=False)
class Sequence:
    """One generation request.

    `tokens` is the prompt followed by everything generated so far; KV exists in the pool for the
    first `num_computed` of them. Whatever remains (`tokens[num_computed:]`) is what the next step
    must compute: the prompt (or the part after a chunk) for a prefill, the last sampled token for a
    decode, the whole history after a recompute preemption.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    tenant: str = "default"
    priority: int = 0
    arrival: float = field(default_factory=now)
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    state: RequestState = RequestState.WAITING  # change it with move_to()
    finish: Finish | None = None
    block_table: list[int] = field(default_factory=list)
    # A host copy of the KV of tokens[:host_tokens]: the only copy while swapped out; kept beside the
    # device copy after a swap-in (with KV reuse on) so that the next swap-out moves only newer blocks.
    host_table: list[int] = field(default_factory=list)
    host_tokens: int = 0
    unsent_blocks: int = 0  # trailing blocks of block_table the executor has not been told about
    executor_known: bool = False
    slot: int = 0  # names it in the plan's DecodeBatch while executor_known
    queued_blocks: int = 0  # device blocks it still needed when its node last counted its queue (while queued)
    preemptions: int = 0
    conversation: tuple[str, str] | None = None  # (tenant, conversation id)
    reused_tokens: int = 0  # prompt tokens whose KV came from the conversation's earlier turns
    history_tokens: int = 0  # prompt tokens that repeat the conversation's previous turn (reused or not)
    prompt_served: int = 0  # prompt tokens counted as service once (recomputation is not service)
    blocked: bool = False  # its turn came in a step's walk, but no device blocks were free (cleared once they are)
    moved_at: float = float("-inf")  # when the fleet last moved it to another node
    phases: PhaseClock = field(init=False)
    grammar: GrammarState | None = None  # structured output: follows the generated tokens, not the KV

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)
        self.phases = PhaseClock(Phase.QUEUED, self.arrival)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def num_pending(self) -> int:
        """Tokens whose KV the next steps must compute."""
        return len(self.tokens) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def move_to(self, state: RequestState, at: float | None = None) -> None:
        """Change state; raises IllegalTransition if the state machine forbids the move."""
        if state not in LEGAL_MOVES[self.state]:
            raise IllegalTransition(f"request {self.request_id}: {self.state.value} -> {state.value} is not allowed")
        self.state = state
        self.blocked = False
        self.update_phase(at)

    def set_blocked(self, blocked: bool, at: float | None = None) -> None:
        self.blocked = blocked
        self.update_phase(at)

    def update_phase(self, at: float | None = None) -> None:
        """Bring the phase clock in line with the state and progress (after a move or a step)."""
        self.phases.enter(self.phase(), now() if at is None else at)

    def phase(self) -> Phase | None:
        """The phase the request is in now (None once finished)."""
        state = self.state
        if state is RequestState.FINISHED:
            return None
        if state in (RequestState.SWAPPING_IN, RequestState.AWAITING_KV, RequestState.MIGRATING):
            return Phase.SWAP_IN
        if self.blocked:
            return Phase.BLOCKED
        if state is RequestState.RUNNING:
            return Phase.PREFILL if self.num_pending > 1 or len(self.tokens) == self.num_prompt else Phase.DECODE
        return Phase.PREEMPTED if self.preemptions else Phase.QUEUED
