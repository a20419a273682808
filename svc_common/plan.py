"""The per-step plan: the scheduler's decision, the executor's work order.

Plain dataclasses mapping one-to-one onto `StepPlan` / `StepResult` in executor.proto, converted
here and nowhere else. A request new to the executor arrives whole (`NewRequest` plus its whole block
table); a known one as a diff (only the blocks appended since the last plan). A known request's plain
decode (one token, sampled, no grammar) travels packed in the plan's `DecodeBatch`, named by the small
integer slot its `NewRequest` gave it, and its token comes back in `StepOutput.decode_tokens`: a step
of hundreds of decodes is a few packed arrays, not a message per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastswitch.v1 import common_pb2, executor_pb2


@dataclass(slots=True, frozen=True)
class Sampling:
    """Sampling parameters; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        if not self.temperature >= 0.0 or self.temperature > 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 or 1 disables it), got {self.top_p}")

    def to_proto(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if self.seed is not None:
            msg.seed = self.seed
        return msg

    @classmethod
    def from_proto(cls, msg: common_pb2.SamplingParams) -> Sampling:
        return cls(
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p if msg.top_p > 0 else 1.0,
            seed=msg.seed if msg.HasField("seed") else None,
        )


@dataclass(slots=True)
class NewRequest:
    request_id: str
    sampling: Sampling
    slot: int = 0  # names the request in DecodeBatch until it is released


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens of one request to run this step, starting at `start_position`."""

    request_id: str
    token_ids: list[int]
    start_position: int
    new_block_ids: list[int]
    sample: bool
    token_bitmask: bytes = b""  # structured output: tokens the grammar allows next, as bits (empty: all)


@dataclass(slots=True)
class DecodeBatch:
    """Plain decodes of requests the executor knows, in parallel arrays: decode i feeds `token_ids[i]`
    at `positions[i]` to the request in slot `slots[i]` and samples. `block_ids[j]` joins the end of the
    block table of the request in slot `block_slots[j]`."""

    slots: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    block_slots: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    # token_ids is empty: each decode feeds the token its slot sampled in the previous step (a plan
    # made while that step ran; the executor knows those tokens, the scheduler not yet).
    previous_tokens: bool = False

    def __len__(self) -> int:
        return len(self.slots)

    def chunks(self, request_ids: Mapping[int, str]) -> list[ScheduledChunk]:
        """The same work as one chunk per decode (`request_ids`: the request in each slot)."""
        new_blocks: dict[int, list[int]] = {}
        for slot, block in zip(self.block_slots, self.block_ids, strict=True):
            new_blocks.setdefault(slot, []).append(block)
        return [
            ScheduledChunk(request_ids[slot], [token], position, new_blocks.get(slot, []), True)
            for slot, token, position in zip(self.slots, self.token_ids, self.positions, strict=True)
        ]


@dataclass(slots=True)
class StepPlan:
    step_id: int
    new_requests: list[NewRequest] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    released_request_ids: list[str] = field(default_factory=list)
    decodes: DecodeBatch = field(default_factory=DecodeBatch)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks) + len(self.decodes)

    def to_proto(self) -> executor_pb2.StepPlan:
        d = self.decodes
        return executor_pb2.StepPlan(
            step_id=self.step_id,
            new_requests=[
                executor_pb2.NewRequest(request_id=r.request_id, sampling=r.sampling.to_proto(), slot=r.slot)
                for r in self.new_requests
            ],
            chunks=[
                executor_pb2.ScheduledChunk(
                    request_id=c.request_id,
                    token_ids=c.token_ids,
                    start_position=c.start_position,
                    new_block_ids=c.new_block_ids,
                    sample=c.sample,
                    token_bitmask=c.token_bitmask,
                )
                for c in self.chunks
            ],
            released_request_ids=self.released_request_ids,
            decodes=executor_pb2.DecodeBatch(
                slots=d.slots,
                token_ids=d.token_ids,
                positions=d.positions,
                block_slots=d.block_slots,
                block_ids=d.block_ids,
                previous_tokens=d.previous_tokens,
            )
            if d.slots
            else None,
        )

    @classmethod
    def from_proto(cls, msg: executor_pb2.StepPlan) -> StepPlan:
        d = msg.decodes
        return cls(
            step_id=msg.step_id,
            new_requests=[NewRequest(r.request_id, Sampling.from_proto(r.sampling), r.slot) for r in msg.new_requests],
            chunks=[
                ScheduledChunk(
                    c.request_id, list(c.token_ids), c.start_position, list(c.new_block_ids), c.sample, c.token_bitmask
                )
                for c in msg.chunks
            ],
            released_request_ids=list(msg.released_request_ids),
            decodes=DecodeBatch(
                list(d.slots),
                list(d.token_ids),
                list(d.positions),
                list(d.block_slots),
                list(d.block_ids),
                d.previous_tokens,
            ),
        )


@dataclass(slots=True)
class StepOutput:
    """One sampled token per chunk with sample=True, in plan order; one per decode of the plan's
    DecodeBatch, in its order."""

    step_id: int
    tokens: list[tuple[str, int]]
    forward_ns: int = 0
    sample_ns: int = 0
    decode_tokens: list[int] = field(default_factory=list)

    def to_proto(self) -> executor_pb2.StepResult:
        return executor_pb2.StepResult(
            step_id=self.step_id,
            tokens=[executor_pb2.SampledToken(request_id=r, token_id=t) for r, t in self.tokens],
            forward_ns=self.forward_ns,
            sample_ns=self.sample_ns,
            decode_token_ids=self.decode_tokens,
        )

    @classmethod
    def from_proto(cls, msg: executor_pb2.StepResult) -> StepOutput:
        return cls(
            step_id=msg.step_id,
            tokens=[(t.request_id, t.token_id) for t in msg.tokens],
            forward_ns=msg.forward_ns,
            sample_ns=msg.sample_ns,
            decode_tokens=list(msg.decode_token_ids),
        )
