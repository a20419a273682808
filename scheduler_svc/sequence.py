"""A request as the scheduler sees it: tokens, progress, and the blocks it owns."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from svc_common.plan import Sampling

if TYPE_CHECKING:
    from scheduler_svc.grammar import GrammarState


class Status(enum.Enum):
    WAITING = "waiting"  # queued; KV (if any) must be recomputed
    RUNNING = "running"
    SWAPPING_OUT = "swapping_out"  # KV being copied to the host; device blocks not reusable yet
    SWAPPED = "swapped"  # KV on the host; queued
    SWAPPING_IN = "swapping_in"  # KV being copied back; not schedulable until it lands
    AWAITING_KV = "awaiting_kv"  # a conversation's next turn, queued until the kept KV's copy to the host lands
    FINISHED = "finished"


class Finish(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


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
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish: Finish | None = None
    block_table: list[int] = field(default_factory=list)
    # A host copy of the KV of tokens[:host_tokens]: the only copy while swapped out; kept beside the
    # device copy after a swap-in (with KV reuse on) so that the next swap-out moves only newer blocks.
    host_table: list[int] = field(default_factory=list)
    host_tokens: int = 0
    unsent_blocks: int = 0  # trailing blocks of block_table the executor has not been told about
    executor_known: bool = False
    preemptions: int = 0
    conversation: tuple[str, str] | None = None  # (tenant, conversation id)
    reused_tokens: int = 0  # prompt tokens whose KV came from the conversation's earlier turns
    history_tokens: int = 0  # prompt tokens that repeat the conversation's previous turn (reused or not)
    prompt_served: int = 0  # prompt tokens counted as service once (recomputation is not service)
    grammar: GrammarState | None = None  # structured output: follows the generated tokens, not the KV

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)

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
        return self.status is Status.FINISHED
