"""Conversations: what the server keeps of each one between turns.

One `Conversation` per (tenant, conversation id) holds all of it: the chat messages the request front
builds the next prompt from, the tokens of the last finished turn, and that turn's KV (`KeptKV`), on
the device, on the host, or on both.

- **Reuse.** A new turn starts from the longest common token prefix of its prompt and the kept
  tokens: the KV is taken over from the device, or swapped in from the host. Only the rest is
  prefilled. A turn that arrives while the KV is being copied to the host waits for the copy.
- **Spill.** When the device pool runs short, kept KV goes before anyone is preempted. It is copied
  to the host ("spilled"), least recently used first, or dropped when the host has no room. A later
  spill moves only the blocks written since the last one.
- **Limits.** Idle conversations' host copies live within `conversation_host_blocks`. A conversation
  idle for longer than the TTL is forgotten, history and KV. At most `max_conversations` are kept,
  and the least recently used idle one makes room for a new one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sequence import Finish, RequestState, Sequence, now
from scheduler_svc.stats import Stats
from scheduler_svc.swap_manager import SwapManager, SwapOrder
from svc_common.errors import ResourceExhaustedError
from svc_common.swap import Direction

Key = tuple[str, str]  # (tenant, conversation id)
Message = dict[str, str]  # {"role": ..., "content": ...}, as chat templates take them


@dataclass(slots=True, eq=False)
class KeptKV:
    """A finished turn's KV, kept for the conversation's next turn, on one node (`swaps`: that node's
    swap manager, whose `blocks` is its device pool)."""

    key: Key
    swaps: SwapManager
    num_tokens: int  # the KV of the conversation's tokens[:num_tokens] is kept
    blocks: list[int]  # device blocks holding all of it (empty once spilled to the host)
    host_blocks: list[int]  # host blocks holding the KV of tokens[:host_tokens]
    host_tokens: int
    spill: SwapOrder | None = None  # the copy to the host in flight
    waiter: Sequence | None = None  # the next turn, waiting for that copy to land


@dataclass(slots=True, eq=False)
class Conversation:
    key: Key
    last_used: float
    messages: list[Message] = field(default_factory=list)  # the chat so far, the live turn's prompt included
    tokens: list[int] = field(default_factory=list)  # the last finished turn: its prompt and its answer
    kv: KeptKV | None = None  # that turn's KV, for the next turn
    live: set[str] = field(default_factory=set)  # ids of its turns in flight

    @property
    def idle(self) -> bool:
        """No turn in flight and no copy: it may be forgotten."""
        return not self.live and (self.kv is None or self.kv.spill is None)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ConversationCache:
    """Every conversation of the fleet, one record each; a record's kept KV lives on one node.

    Histories are the fleet's (a node that dies takes only KV with it); the methods that make room or
    forget copies take the node they act on (its `SwapManager`)."""

    def __init__(self, config: SchedulerConfig, stats: Stats) -> None:
        self.config = config
        self.stats = stats
        self._by_key: OrderedDict[Key, Conversation] = OrderedDict()  # least recently used first

    # -- histories (the request front) ------------------------------------------------------------

    def messages(self, key: Key) -> list[Message]:
        """The conversation's chat so far (a copy; empty for a new conversation)."""
        conv = self._by_key.get(key)
        return list(conv.messages) if conv is not None else []

    def record_answer(self, key: Key, text: str) -> None:
        """A turn finished: its answer joins the history (unless the conversation ended meanwhile)."""
        conv = self._by_key.get(key)
        if conv is not None:
            conv.messages.append({"role": "assistant", "content": text})

    def end(self, key: Key) -> bool:
        """Forget a conversation and free its KV; False if there is no such conversation."""
        conv = self._by_key.pop(key, None)
        if conv is None:
            return False
        self._drop_kv(conv)
        return True

    # -- turns (the scheduler) --------------------------------------------------------------------

    def start_turn(self, seq: Sequence, swaps: SwapManager, messages: list[Message] | None = None) -> None:
        """A turn arrives on the node of `swaps`: record its history and start it from the kept KV
        where it can (KV kept on another node is dropped: the turn recomputes it).

        Raises ResourceExhaustedError, changing nothing, if a new conversation finds no room."""
        assert seq.conversation is not None
        conv = self._by_key.get(seq.conversation)
        if conv is None:
            self._make_room_for_one()
            conv = self._by_key[seq.conversation] = Conversation(seq.conversation, now())
        if messages is not None:
            conv.messages = messages
        conv.live.add(seq.request_id)
        self._touch(conv)
        if conv.tokens:  # how much of the prompt is history (reused or not)
            seq.history_tokens = min(common_prefix(conv.tokens, seq.prompt_ids), seq.num_prompt - 1)
        if conv.kv is not None and conv.kv.swaps is not swaps:  # kept on another node: recompute here
            if conv.kv.spill is None:
                self._drop_kv(conv)
            self.stats.count("kept_kv_elsewhere")
            self._count_prefix(seq)
            return
        self._reuse(seq, conv)

    def node_of(self, key: Key) -> SwapManager | None:
        """The node (its swap manager) that keeps the conversation's KV, if any."""
        conv = self._by_key.get(key)
        return conv.kv.swaps if conv is not None and conv.kv is not None else None

    def finish_turn(self, seq: Sequence, reason: Finish, swaps: SwapManager) -> None:
        """A turn ended. A completed one becomes the conversation's last turn, and its KV is kept when
        it is on the device (the caller frees whatever seq still owns afterwards)."""
        assert seq.conversation is not None
        conv = self._by_key.get(seq.conversation)
        if conv is None or seq.request_id not in conv.live:
            return  # ended (or replaced) while the turn ran
        conv.live.discard(seq.request_id)
        self._touch(conv)
        if reason not in (Finish.LENGTH, Finish.EOS, Finish.STOP):
            return
        conv.tokens = seq.tokens
        self._drop_kv(conv)  # an earlier turn's KV (a concurrent turn's) is not this history's
        if seq.state is RequestState.RUNNING and self.config.reuse:
            self._keep(conv, seq, swaps)

    def _reuse(self, seq: Sequence, conv: Conversation) -> None:
        """Start seq from its conversation's kept KV: the longest common token prefix is not recomputed.

        KV on the device is taken over directly; KV on the host is swapped in first (the request is
        queued as swapped). If the kept KV is still being copied to the host, the request waits for it.
        """
        kv = conv.kv
        if kv is None or not self.config.reuse:
            self._count_prefix(seq)
            return
        if kv.spill is not None:
            if kv.waiter is None:
                kv.waiter = seq
                seq.move_to(RequestState.AWAITING_KV)
            else:  # another turn waits already: this one computes its history
                self._count_prefix(seq)
            return
        conv.kv = None
        blocks, swaps = kv.swaps.blocks, kv.swaps
        # At least the last prompt token is computed again: its logits give the first new token.
        reuse = min(common_prefix(conv.tokens, seq.prompt_ids), kv.num_tokens, seq.num_prompt - 1)
        on_host = min(kv.host_tokens, reuse)
        host_keep = blocks.blocks_for(on_host)
        swaps.free_host(kv.host_blocks[host_keep:])
        seq.host_table, seq.host_tokens = kv.host_blocks[:host_keep], on_host
        if kv.blocks:
            keep = blocks.blocks_for(reuse)
            blocks.free(kv.blocks[keep:])
            seq.block_table = kv.blocks[:keep]
        else:
            reuse = on_host  # only what the host holds
            if reuse:
                seq.move_to(RequestState.SWAPPED)
                self.stats.count("reused_from_host_tokens", reuse)
        seq.num_computed = reuse
        seq.reused_tokens = reuse
        seq.prompt_served = reuse  # reused KV is service the tenant already received
        self.stats.count("reused_prefix_tokens", reuse)
        self._count_prefix(seq)

    def _count_prefix(self, seq: Sequence) -> None:
        self.stats.count("recomputed_prefix_tokens", max(0, seq.history_tokens - seq.reused_tokens))

    def _keep(self, conv: Conversation, seq: Sequence, swaps: SwapManager) -> None:
        """Take over the finished turn's KV (and any host copy of it) for the next turn."""
        kv_blocks = swaps.blocks.blocks_for(seq.num_computed)
        swaps.blocks.free(seq.block_table[kv_blocks:])
        conv.kv = KeptKV(
            conv.key, swaps, seq.num_computed, seq.block_table[:kv_blocks], seq.host_table, seq.host_tokens
        )
        seq.block_table, seq.host_table, seq.host_tokens = [], [], 0
        self._enforce_host_budget(swaps)

    def _drop_kv(self, conv: Conversation) -> None:
        kv, conv.kv = conv.kv, None
        if kv is None:
            return
        kv.swaps.blocks.free(kv.blocks)  # blocks under a spill are freed when it lands
        kv.swaps.free_host(kv.host_blocks)
        kv.blocks, kv.host_blocks, kv.host_tokens = [], [], 0
        self._wake_waiter(kv)

    def _wake_waiter(self, kv: KeptKV) -> None:
        waiter, kv.waiter = kv.waiter, None
        if waiter is None or waiter.state is not RequestState.AWAITING_KV:
            return
        waiter.move_to(RequestState.WAITING)
        conv = self._by_key.get(kv.key)
        if conv is not None:
            self._reuse(waiter, conv)
        else:
            self._count_prefix(waiter)

    # -- making room ------------------------------------------------------------------------------

    def free_device_room(self, swaps: SwapManager) -> bool:
        """Make device room on the node of `swaps` from its least recently used kept KV: spill it to
        the host, or drop it."""
        kept = (c for c in self._by_key.values() if c.kv is not None and c.kv.blocks and c.kv.swaps is swaps)
        conv = next(kept, None)
        if conv is None or conv.kv is None:
            return False
        kv = conv.kv
        if self._spill(kv):
            return True
        swaps.blocks.free(kv.blocks)
        kv.blocks = []
        if not kv.host_tokens:
            conv.kv = None
        self.stats.count("kept_kv_evicted")
        return True

    def evict_host_copy(self, swaps: SwapManager, spare: object = None) -> bool:
        """Drop the least recently used idle conversation's host copy on the node of `swaps` (its device
        copy, if any, stays)."""
        for conv in self._by_key.values():
            kv = conv.kv
            if kv is not None and kv.swaps is swaps and kv.host_blocks and kv.spill is None and kv is not spare:
                swaps.free_host(kv.host_blocks)
                kv.host_blocks, kv.host_tokens = [], 0
                if not kv.blocks:
                    conv.kv = None
                self.stats.count("kept_kv_host_evicted")
                return True
        return False

    def _spill(self, kv: KeptKV) -> bool:
        """Start copying kept KV from the device to the host (only blocks the host lacks); False if
        it cannot (no daemon, no reuse, host budget or pool exhausted)."""
        swaps = kv.swaps
        if not swaps.enabled or not self.config.reuse:
            return False
        host = swaps.host
        budget = self.config.conversation_host_blocks or (host.num_blocks if host is not None else 0)
        new_blocks = len(kv.blocks) - min(kv.host_tokens, kv.num_tokens) // swaps.blocks.block_size
        while self._kept_host_blocks(swaps) + new_blocks > budget:
            if not self.evict_host_copy(swaps, spare=kv):
                return False
        plan = swaps.plan_copy_out(kv, kv.num_tokens, kv.host_tokens, kv.host_blocks)
        if plan is None:
            return False
        device_copy = kv.blocks[plan.start :]
        swaps.blocks.free(kv.blocks[: plan.start])
        kv.blocks = []
        kv.host_blocks = kv.host_blocks[: plan.start]
        kv.host_tokens = min(kv.host_tokens, plan.start * swaps.blocks.block_size)  # the part outside the copy
        self.stats.count("kept_kv_spilled")
        if device_copy:
            kv.spill = swaps.order(Direction.OUT, kv, device_copy, plan.host_blocks, kv.num_tokens)
        else:
            kv.host_tokens = kv.num_tokens
        return True

    def spill_done(self, order: SwapOrder, ok: bool) -> None:
        """A spill's copy ended: the host holds the KV now, or (failed) the kept KV is gone."""
        kv = order.owner
        assert isinstance(kv, KeptKV)
        kv.spill = None
        kv.swaps.blocks.free(order.device_blocks)
        conv = self._by_key.get(kv.key)
        current = conv is not None and conv.kv is kv
        if ok and current:
            kv.host_blocks = kv.host_blocks + order.host_blocks
            kv.host_tokens = order.tokens
            self._wake_waiter(kv)
            self._enforce_host_budget(kv.swaps)
            return
        kv.swaps.free_host(order.host_blocks)
        if conv is not None and current:
            self._drop_kv(conv)  # wakes the waiter: it recomputes

    def _kept_host_blocks(self, swaps: SwapManager) -> int:
        return sum(len(kv.host_blocks) for kv in self.kept(swaps))

    def _enforce_host_budget(self, swaps: SwapManager) -> None:
        budget = self.config.conversation_host_blocks
        while budget and self._kept_host_blocks(swaps) > budget and self.evict_host_copy(swaps):
            pass

    # -- forgetting -------------------------------------------------------------------------------

    def expire(self, at: float) -> None:
        """Forget conversations idle for longer than the TTL, history and KV."""
        ttl = self.config.conversation_ttl_s
        expired = []
        for conv in self._by_key.values():  # in last-use order: stop at the first one still fresh
            if at - conv.last_used <= ttl:
                break
            if conv.idle:
                expired.append(conv)
        for conv in expired:
            if conv.kv is not None:
                self.stats.count("kept_kv_expired")
            self.end(conv.key)
            self.stats.count("conversations_expired")

    def _make_room_for_one(self) -> None:
        if len(self._by_key) < self.config.max_conversations:
            return
        victim = next((c for c in self._by_key.values() if c.idle), None)
        if victim is None:
            raise ResourceExhaustedError(
                f"all {len(self._by_key)} conversations have a turn in flight: wait for one, end one "
                "(EndConversation), or start the scheduler with a larger --max-conversations"
            )
        self.end(victim.key)
        self.stats.count("conversations_evicted")

    def forget_host_copies(self, swaps: SwapManager) -> None:
        """The node's swap daemon is gone, and every host copy with it (its spills have failed already)."""
        for conv in self._by_key.values():
            kv = conv.kv
            if kv is not None and kv.swaps is swaps:
                kv.host_blocks, kv.host_tokens = [], 0
                if not kv.blocks:
                    conv.kv = None

    def forget_device_copies(self, swaps: SwapManager) -> None:
        """The node's executor is gone, and the device KV with it: keep only what the host holds."""
        for conv in self._by_key.values():
            kv = conv.kv
            if kv is None or kv.swaps is not swaps:
                continue
            swaps.blocks.free(kv.blocks)
            kv.blocks = []
            if not kv.host_tokens and kv.spill is None:
                self._drop_kv(conv)

    # -- views ------------------------------------------------------------------------------------

    def get(self, key: Key) -> Conversation | None:
        return self._by_key.get(key)

    def kept(self, swaps: SwapManager | None = None) -> list[KeptKV]:
        """Every conversation's kept KV (on the node of `swaps`, or anywhere), least recently used first."""
        return [c.kv for c in self._by_key.values() if c.kv is not None and (swaps is None or c.kv.swaps is swaps)]

    def gauges(self, swaps: SwapManager | None = None) -> dict[str, float]:
        """Histories fleet-wide; kept KV on the node of `swaps` (or everywhere)."""
        kept = self.kept(swaps)
        return {
            "conversations": len(self._by_key),
            "conversation_messages": sum(len(c.messages) for c in self._by_key.values()),
            "conversation_tokens": sum(len(c.tokens) for c in self._by_key.values()),
            "kept_conversations": len(kept),
            "kept_kv_blocks": sum(len(kv.blocks) for kv in kept),
            "kept_kv_host_blocks": sum(len(kv.host_blocks) for kv in kept),
        }

    def _touch(self, conv: Conversation) -> None:
        conv.last_used = now()
        self._by_key.move_to_end(conv.key)
