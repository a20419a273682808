"""Migration: a queued request leaves its node with its KV.

The fleet's balance moves a request its node passed over to a node where it can run now. One that
holds no KV moves at no cost. One that holds KV on its node (a conversation's next turn that reuses
its kept KV, a request swapped out by a preemption) moves here, in the scheduler's `--migration` mode:

- `host` (the default): through the host tier, as Llumnix moves a request's KV between instances, but
  between host pools rather than device pools, so that neither GPU stops for it. KV on the node's
  device is first copied to its host pool (an ordinary swap-out; the request moves once it lands).
  The target node's swap daemon then pulls those host blocks from the node's daemon (a `Pull`: one
  `ReadHostBlocks` stream between the two daemons) while the request waits there as `migrating`;
  once they land it swaps in like any swapped request. The KV crosses the network once; no step of
  either node waits for it, and a pull that fails leaves the request to recompute on the target.
  Without that path (a node without a swap daemon, pools of different block sizes) the request
  recomputes on the target instead.
- `recompute`: the KV is dropped and the request recomputes it on the target (the baseline the
  bench compares with).
- `off`: it stays on its node until that node can run it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import structlog

from scheduler_svc.sequence import RequestState, Sequence
from scheduler_svc.stats import Stats

if TYPE_CHECKING:
    from scheduler_svc.fleet import Node

log = structlog.get_logger(__name__)


class Moved(enum.Enum):
    """What a migration attempt did."""

    MOVED = "moved"  # the request is on the target now (pulling its KV, or recomputing it there)
    STAGED = "staged"  # its device KV is being copied to its node's host pool: it can move once that lands
    NO = "no"  # it stays where it is, as it was


def migrate(seq: Sequence, source: Node, target: Node, mode: str, stats: Stats) -> Moved:
    """Move queued `seq`, which holds KV on `source`, to `target`, by `mode` (module docstring)."""
    src, dst = source.scheduler, target.scheduler
    assert src is not None and dst is not None
    if mode == "off" or seq.state not in (RequestState.WAITING, RequestState.SWAPPED):
        return Moved.NO
    if mode == "recompute" or not _host_path(source, target):
        if mode == "host":
            stats.count("migrations_without_host_path")
        tokens = seq.num_computed
        src.forget_kv(seq)
        src.detach(seq)
        dst.adopt(seq)
        stats.count("migrations_recompute")
        stats.count("migration_recomputed_tokens", tokens)
        log.info("request_migrated", request_id=seq.request_id, source=source.index, target=target.index,
                 mode="recompute", tokens=tokens)  # fmt: skip
        return Moved.MOVED
    if seq.state is RequestState.WAITING:  # its KV is on the source's device: to the host first
        return Moved.STAGED if src.stage_for_migration(seq) else Moved.NO
    dest = dst.host_room(len(seq.host_table), seq)
    if dest is None:
        return Moved.NO
    tokens = seq.host_tokens
    loan = src.hand_over(seq)
    dst.receive(seq, dest, loan, source.address.swapd, tokens)
    stats.count("migrations_host")
    stats.count("migrated_tokens", tokens)
    log.info("request_migrated", request_id=seq.request_id, source=source.index, target=target.index,
             mode="host", tokens=tokens, blocks=len(loan.blocks))  # fmt: skip
    return Moved.MOVED


def _host_path(source: Node, target: Node) -> bool:
    """Whether KV can go from source's host pool to target's: both daemons attached, one block size."""
    src, dst = source.scheduler, target.scheduler
    assert src is not None and dst is not None
    return (
        src.swaps.host is not None
        and dst.swaps.enabled
        and bool(source.address.swapd)
        and src.blocks.block_size == dst.blocks.block_size
    )
