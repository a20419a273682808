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
    PULL = "pull"  # another daemon's host pool -> this host pool (a request migrating here): a `Pull` command

    def to_proto(self) -> swap_pb2.SwapDirection.ValueType:
        """The wire direction of a device copy (a pull has none: it is sent as `Pull`)."""
        if self is Direction.PULL:
            raise ValueError("a pull is sent as SwapCommand.pull, not as a direction")
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


@dataclass(frozen=True, slots=True)
class HostRange:
    """`num_blocks` consecutive blocks of one daemon's host pool, from `start`."""

    start: int
    num_blocks: int

    def to_proto(self) -> swap_pb2.HostRange:
        return swap_pb2.HostRange(start=self.start, num_blocks=self.num_blocks)

    @classmethod
    def from_proto(cls, msg: swap_pb2.HostRange) -> HostRange:
        return cls(msg.start, msg.num_blocks)


def host_ranges(blocks: list[int]) -> list[HostRange]:
    """Coalesce host blocks, in order, into consecutive runs (one range per run)."""
    ranges: list[HostRange] = []
    for b in blocks:
        last = ranges[-1] if ranges else None
        if last is not None and last.start + last.num_blocks == b:
            ranges[-1] = HostRange(last.start, last.num_blocks + 1)
        else:
            ranges.append(HostRange(b, 1))
    return ranges


@dataclass(frozen=True, slots=True)
class Pull:
    """Copy `source` blocks of the daemon at `source_addr` into `dest` blocks of this daemon's host pool,
    in order (a request's KV migrating between nodes through the host tier)."""

    source_addr: str
    source: list[HostRange]
    dest: list[HostRange]

    def to_proto(self) -> swap_pb2.Pull:
        return swap_pb2.Pull(
            source_addr=self.source_addr,
            ranges=[r.to_proto() for r in self.source],
            dest=[r.to_proto() for r in self.dest],
        )

    @classmethod
    def from_proto(cls, msg: swap_pb2.Pull) -> Pull:
        return cls(
            msg.source_addr, [HostRange.from_proto(r) for r in msg.ranges], [HostRange.from_proto(r) for r in msg.dest]
        )
