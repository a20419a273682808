"""The per-step plan: the scheduler's decision, the executor's work order.

Plain dataclasses mapping one-to-one onto `StepPlan` / `StepResult` in executor.proto, converted
here and nowhere else. A request new to the executor arrives whole (`NewRequest` plus its whole block
table); a known one as a diff (only the blocks appended since the last plan).
"""

from __future__ import annotations

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
class StepPlan:
    step_id: int
    new_requests: list[NewRequest] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    released_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    def to_proto(self) -> executor_pb2.StepPlan:
        return executor_pb2.StepPlan(
            step_id=self.step_id,
            new_requests=[
                executor_pb2.NewRequest(request_id=r.request_id, sampling=r.sampling.to_proto())
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
        )

    @classmethod
    def from_proto(cls, msg: executor_pb2.StepPlan) -> StepPlan:
        return cls(
            step_id=msg.step_id,
            new_requests=[NewRequest(r.request_id, Sampling.from_proto(r.sampling)) for r in msg.new_requests],
            chunks=[
                ScheduledChunk(
                    c.request_id, list(c.token_ids), c.start_position, list(c.new_block_ids), c.sample, c.token_bitmask
                )
                for c in msg.chunks
            ],
            released_request_ids=list(msg.released_request_ids),
        )


@dataclass(slots=True)
class StepOutput:
    """One sampled token per chunk with sample=True, in plan order."""

    step_id: int
    tokens: list[tuple[str, int]]
    forward_ns: int = 0
    sample_ns: int = 0

    def to_proto(self) -> executor_pb2.StepResult:
        return executor_pb2.StepResult(
            step_id=self.step_id,
            tokens=[executor_pb2.SampledToken(request_id=r, token_id=t) for r, t in self.tokens],
            forward_ns=self.forward_ns,
            sample_ns=self.sample_ns,
        )

    @classmethod
    def from_proto(cls, msg: executor_pb2.StepResult) -> StepOutput:
        return cls(
            step_id=msg.step_id,
            tokens=[(t.request_id, t.token_id) for t in msg.tokens],
            forward_ns=msg.forward_ns,
            sample_ns=msg.sample_ns,
        )
