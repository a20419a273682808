"""The fleet: one scheduler driving many executor nodes.

A node is one executor and the swap daemon beside it (they share the device pool, so they live on one
host). Each node has its own `Scheduler`: its device allocator, its host allocator, its copies in
flight, its running and waiting requests. What must hold across the fleet is shared by all of them
and built here once: the policy (VTC counters, priorities), the priority-update driver, the
statistics and the conversations (histories, and which node keeps each one's KV).

Decisions across nodes are made here, in plain code without gRPC:

- **Placement** (`add`): a conversation's next turn goes to the node that keeps its KV (device or
  host); anything else to the node with the most free capacity.
- **Balance** (`balance`): after a node's step, requests it passed over (no room, no batch place)
  move to a node that idles, or to one running a request ranked below them, where they preempt it. So
  no node idles while another queues, and a higher-ranked request never waits behind lower-ranked
  ones elsewhere. A request that holds no KV on its node moves at no cost; one that does migrates
  (migration.py): its KV goes through the host tier to the target, or it recomputes there
  (`--migration`).
- **Node loss** (`node_lost`): the node's requests, whose KV went with it, recompute on the others
  (their tokens are here); its conversations keep their histories and recompute on their next turn. A
  node that comes back, or a new one, takes work again (`node_up`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from scheduler_svc.config import NodeAddress, SchedulerConfig
from scheduler_svc.conversations import ConversationCache, Message
from scheduler_svc.migration import Moved, migrate
from scheduler_svc.policy import PriorityUpdates, make_policy
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish, Sequence, now
from scheduler_svc.stats import Stats

log = structlog.get_logger(__name__)

MOVE_COOLDOWN_S = 1.0  # a request moved between nodes stays put this long (no ping-pong)
BALANCE_SCAN = 8  # passed-over requests looked at per node and pass: the best-ranked ones


class NodeState(enum.Enum):
    CONNECTING = "connecting"  # never reached yet
    UP = "up"
    DOWN = "down"  # lost: its requests moved to other nodes; reconnecting


@dataclass(slots=True, eq=False)
class Node:
    """One executor node as the fleet sees it; its link (executor_link.py) drives it."""

    index: int
    address: NodeAddress
    state: NodeState = NodeState.CONNECTING
    scheduler: Scheduler | None = None  # from the first attachment on (it needs the pool's geometry)
    pid: int = 0
    steps: int = 0
    wake: Callable[[], None] = field(default=lambda: None)  # the link's: look for work again

    @property
    def up(self) -> bool:
        return self.state is NodeState.UP and self.scheduler is not None

    def view(self) -> dict[str, object]:
        """The node's entry in `stats`' `executors`."""
        sched = self.scheduler
        host = sched.swaps.host if sched is not None else None
        return {
            "addr": self.address.executor,
            "swapd_addr": self.address.swapd,
            "pid": self.pid,
            "state": self.state.value,
            "running": len(sched.running) if sched else 0,
            "waiting": len(sched.waiting) if sched else 0,
            "device_blocks_free": sched.blocks.num_free if sched else 0,
            "device_blocks_total": sched.blocks.num_blocks if sched else 0,
            "host_blocks_free": host.num_free if host else 0,
            "host_blocks_total": host.num_blocks if host else 0,
            "generated_tokens": sched.generated_tokens if sched else 0,
            "steps": self.steps,
            "kept_conversations": len(sched.conversations.kept(sched.swaps)) if sched else 0,
        }


class Fleet:
    def __init__(self, config: SchedulerConfig, addresses: list[NodeAddress] | None = None) -> None:
        self.config = config
        self.stats = Stats()
        self.policy = make_policy(config)
        self.priority_updates = PriorityUpdates(
            config.priority_updates, config.priority_update_prob, config.priority_levels, config.seed
        )
        self.conversations = ConversationCache(config, self.stats)
        self.nodes = [Node(i, a) for i, a in enumerate(addresses if addresses is not None else config.nodes)]
        self.eos_token_ids: set[int] = set()

    # -- nodes ------------------------------------------------------------------------------------

    def attach(self, node: Node, num_blocks: int, block_size: int) -> Scheduler:
        """The node's executor is reached: give it a scheduler over its pool (a new one when the pool's
        geometry changed and the node holds nothing) and take it into service."""
        sched = node.scheduler
        geometry = (num_blocks, block_size)
        if sched is None or ((sched.blocks.num_blocks, sched.blocks.block_size) != geometry and not sched.requests):
            sched = Scheduler(
                self.config,
                num_blocks,
                block_size,
                self.eos_token_ids,
                self.policy,
                stats=self.stats,
                conversations=self.conversations,
                priority_updates=self.priority_updates,
            )
            if node.scheduler is not None:
                sched.generated_tokens = node.scheduler.generated_tokens
            node.scheduler = sched
        elif (sched.blocks.num_blocks, sched.blocks.block_size) != geometry:
            log.error("executor_geometry_changed", node=node.index, old=sched.blocks.num_blocks, new=num_blocks)
        return sched

    def node_up(self, node: Node) -> None:
        """The node serves again (or for the first time): it takes new and waiting work."""
        node.state = NodeState.UP
        log.info("node_up", node=node.index, executor=node.address.executor)
        self.balance()

    def node_lost(self, node: Node) -> int:
        """The node is gone, and the KV on it (the caller has told its scheduler): move its requests
        to the nodes that are up, where they recompute. Returns how many moved."""
        node.state = NodeState.DOWN
        self.stats.count("nodes_lost")
        sched = node.scheduler
        if sched is None:
            return 0
        moved = 0
        for seq in list(sched.waiting):
            target = self.place(seq, exclude=node)
            if target is not None and sched.movable(seq):  # else it waits for a node (this one, back, or another)
                self._move(seq, node, target)
                moved += 1
        log.warning("node_lost", node=node.index, moved=moved, stranded=len(sched.requests))
        self.stats.count("requests_moved_from_lost_nodes", moved)
        return moved

    def add_node(self, address: NodeAddress) -> Node:
        """A node joins the fleet (it registered itself); its link brings it up."""
        node = Node(len(self.nodes), address)
        self.nodes.append(node)
        log.info("node_added", node=node.index, executor=address.executor, swapd=address.swapd)
        return node

    def up_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.up]

    def kv_capacity_tokens(self) -> int:
        """The most tokens one request can hold: the largest device pool among the nodes up."""
        pools = [n.scheduler.blocks for n in self.up_nodes() if n.scheduler is not None]
        return max((p.num_blocks * p.block_size for p in pools), default=0)

    def node_of(self, seq: Sequence) -> Node | None:
        """The node holding a live request."""
        for node in self.nodes:
            if node.scheduler is not None and node.scheduler.requests.get(seq.request_id) is seq:
                return node
        return None

    # -- requests ---------------------------------------------------------------------------------

    def fits(self, node: Node, num_tokens: int) -> bool:
        sched = node.scheduler
        return sched is not None and num_tokens <= sched.blocks.num_blocks * sched.blocks.block_size

    def place(self, seq: Sequence, exclude: Node | None = None) -> Node | None:
        """Where a request should run: its conversation's KV node, else the node with the most free
        capacity (among the nodes that are up and whose pool can hold it)."""
        total = seq.num_prompt + seq.max_tokens
        candidates = [n for n in self.up_nodes() if n is not exclude and self.fits(n, total)]
        if not candidates:
            return None
        if seq.conversation is not None:
            swaps = self.conversations.node_of(seq.conversation)
            home = next((n for n in candidates if n.scheduler is not None and n.scheduler.swaps is swaps), None)
            if home is not None:
                return home
        return max(candidates, key=self._headroom)

    def _headroom(self, node: Node) -> tuple[bool, int, int]:
        """Free capacity: a free batch place first, then device blocks beyond what its queue needs."""
        sched = node.scheduler
        assert sched is not None
        places = self.config.max_running - len(sched.running) - len(sched.waiting)
        if places <= 0:  # a full node: the shortest queue
            return False, -len(sched.waiting), -node.index
        return True, sched.blocks.num_free - sched.queued_blocks, -node.index  # (a running total: O(1) a node)

    def add(self, seq: Sequence, messages: list[Message] | None = None) -> Node:
        """Queue a new request on the node `place` picks; raises Unavailable-like errors via the caller
        when no node is up (the caller checks first)."""
        node = self.place(seq)
        if node is None:
            raise LookupError("no executor node is up that can hold this request")
        assert node.scheduler is not None
        node.scheduler.add(seq, messages)
        node.wake()
        return node

    def find(self, request_id: str) -> tuple[Node, Sequence] | None:
        for node in self.nodes:
            if node.scheduler is not None and (seq := node.scheduler.requests.get(request_id)) is not None:
                return node, seq
        return None

    def abort(self, request_id: str, reason: Finish = Finish.CANCELLED) -> Sequence | None:
        found = self.find(request_id)
        if found is None:
            return None
        node, _ = found
        assert node.scheduler is not None
        seq = node.scheduler.abort(request_id, reason)
        node.wake()
        return seq

    def finish(self, seq: Sequence, reason: Finish) -> None:
        node = self.node_of(seq)
        if node is not None and node.scheduler is not None:
            node.scheduler.finish(seq, reason)
            node.wake()

    def wake(self, request_id: str | None = None) -> None:
        """Wake the node of a request (or every node)."""
        found = self.find(request_id) if request_id is not None else None
        for node in [found[0]] if found else self.nodes:
            node.wake()

    # -- balance ----------------------------------------------------------------------------------

    def balance(self) -> int:
        """Move requests that their node passed over to nodes where they can run now; returns how many."""
        moved = 0
        used: set[int] = set()  # targets that took a request by rank this pass (their lowest is stale)
        for donor in self.up_nodes():
            sched = donor.scheduler
            assert sched is not None
            if not sched.passed_over:
                continue
            at = now()
            for seq in sched.passed_over[:BALANCE_SCAN]:
                if sched.requests.get(seq.request_id) is not seq or at - seq.moved_at < MOVE_COOLDOWN_S:
                    continue
                target = self._target(seq, donor, used)
                if target is None:
                    break  # the best-ranked ones find no place: nor will those below them
                if sched.movable(seq):
                    self._move(seq, donor, target)
                elif self._migrate(seq, donor, target) is not Moved.MOVED:
                    continue  # it stays (or its KV is on its way to the host, to move from there)
                seq.moved_at = at
                moved += 1
            sched.passed_over = [s for s in sched.passed_over if sched.requests.get(s.request_id) is s]
        if moved:
            self.stats.count("requests_rebalanced", moved)
        return moved

    def _target(self, seq: Sequence, donor: Node, used: set[int]) -> Node | None:
        """A node where seq can run now: one that idles with room for it, else (when its node is short of
        room, not of step budget: then it outranks everyone running there) one running a request ranked
        below it, which it will preempt there."""
        total = seq.num_prompt + seq.max_tokens
        others = [n for n in self.up_nodes() if n is not donor and self.fits(n, total)]
        idle = []
        for node in others:
            sched = node.scheduler
            assert sched is not None
            if len(sched.running) + len(sched.waiting) >= self.config.max_running:
                continue  # no free batch place (the queue is short here: this sum is cheap)
            needed = sched.blocks.blocks_for(len(seq.tokens) + 1) + sched.queued_blocks
            if sched.blocks.num_free >= needed:
                idle.append(node)
        if idle:
            return max(idle, key=lambda n: n.scheduler.blocks.num_free if n.scheduler else 0)
        if donor.scheduler is None or not donor.scheduler.short_of_room:
            return None  # it runs here once the steps ahead of it are done: preempting elsewhere would churn
        for node in others:
            sched = node.scheduler
            assert sched is not None
            low = sched.lowest_running
            if node.index in used or low is None or sched.requests.get(low.request_id) is not low:
                continue
            if self.policy.order([low, seq])[0] is seq:
                used.add(node.index)
                return node
        return None

    def _migrate(self, seq: Sequence, source: Node, target: Node) -> Moved:
        moved = migrate(seq, source, target, self.config.migration, self.stats)
        if moved is not Moved.NO:
            source.wake()  # a copy to send
            target.wake()
        return moved

    def _move(self, seq: Sequence, source: Node, target: Node) -> None:
        assert source.scheduler is not None and target.scheduler is not None
        source.scheduler.detach(seq)
        target.scheduler.adopt(seq)
        self.stats.count("requests_moved")
        log.debug("request_moved", request_id=seq.request_id, source=source.index, target=target.index)
        target.wake()

    # -- views ------------------------------------------------------------------------------------

    def gauges(self) -> dict[str, float]:
        """The pools and queues of every node that has a scheduler, summed; histories once."""
        totals: dict[str, float] = dict.fromkeys(
            ("device_blocks_free", "device_blocks_total", "device_blocks_quarantined", "swaps_in_flight"), 0
        )
        totals.update(running=0, waiting=0)
        for node in self.nodes:
            sched = node.scheduler
            if sched is None or node.state is NodeState.DOWN:
                continue
            totals["device_blocks_free"] += sched.blocks.num_free
            totals["device_blocks_total"] += sched.blocks.num_blocks
            totals["device_blocks_quarantined"] += len(sched.swaps.quarantined)
            totals["swaps_in_flight"] += sched.swaps.num_in_flight
            if sched.swaps.host is not None:
                totals["host_blocks_free"] = totals.get("host_blocks_free", 0) + sched.swaps.host.num_free
                totals["host_blocks_total"] = totals.get("host_blocks_total", 0) + sched.swaps.host.num_blocks
        for node in self.nodes:  # requests stranded on a lost node are still queued
            if node.scheduler is not None:
                totals["running"] += len(node.scheduler.running)
                totals["waiting"] += len(node.scheduler.waiting)
        totals.update(self.conversations.gauges())
        totals["executors_up"] = len(self.up_nodes())
        totals["executors_total"] = len(self.nodes)
        return totals
