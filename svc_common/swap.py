"""The swap contract in domain terms, shared by the scheduler (which decides copies) and the swap daemon
(which makes them): a copy is a list of block runs, a direction and a granularity.

Plain dataclasses and enums mapping one-to-one onto swap.proto, converted here and nowhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fastswitch.v1 import swap_pb2


class Direction(enum.Enum):
    OUT = "out"  # device pool -> host pool
    IN = "in"  # host pool -> device pool

    def to_proto(self) -> swap_pb2.SwapDirection.ValueType:
        return swap_pb2.SWAP_DIRECTION_OUT if self is Direction.OUT else swap_pb2.SWAP_DIRECTION_IN

    @classmethod
    def from_proto(cls, value: int) -> Direction | None:
        """None for UNSPECIFIED or an unknown value."""
        return {swap_pb2.SWAP_DIRECTION_OUT: cls.OUT, swap_pb2.SWAP_DIRECTION_IN: cls.IN}.get(value)


class Granularity(enum.Enum):
    RUN = "run"  # one copy per block group (FastSwitch)
    BLOCK = "block"  # one copy per block
    BLOCK_LAYER = "block_layer"  # one copy per block per layer per K/V (vLLM's layout cost)

    def to_proto(self) -> swap_pb2.CopyGranularity.ValueType:
        return _GRANULARITY_TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> Granularity | None:
        """UNSPECIFIED means RUN (the default); None for an unknown value."""
        if value == swap_pb2.COPY_GRANULARITY_UNSPECIFIED:
            return cls.RUN
        return next((g for g, v in _GRANULARITY_TO_PROTO.items() if v == value), None)


_GRANULARITY_TO_PROTO = {
    Granularity.RUN: swap_pb2.COPY_GRANULARITY_RUN,
    Granularity.BLOCK: swap_pb2.COPY_GRANULARITY_BLOCK,
    Granularity.BLOCK_LAYER: swap_pb2.COPY_GRANULARITY_BLOCK_LAYER,
}


@dataclass(frozen=True, slots=True)
class BlockRun:
    """`num_blocks` consecutive blocks at `device_start` on the device and `host_start` on the host."""

    device_start: int
    host_start: int
    num_blocks: int

    def to_proto(self) -> swap_pb2.BlockRun:
        return swap_pb2.BlockRun(device_start=self.device_start, host_start=self.host_start, num_blocks=self.num_blocks)

    @classmethod
    def from_proto(cls, msg: swap_pb2.BlockRun) -> BlockRun:
        return cls(msg.device_start, msg.host_start, msg.num_blocks)
