"""The request front: what the client API calls (submit, stream, cancel, set_priority, end_conversation,
stats), in front of the fleet of executor nodes and the links that drive them.

`submit()` validates a request, builds its prompt (a conversation's history from the fleet's
conversation cache, plus the new turn) and queues it on the node the fleet places it on; each node's
step loop hands back its step's tokens, which are detokenised here and streamed to the client. A
request's last chunk carries its finish reason and the seconds it spent in each phase.

Admission happens here, before anything is allocated: a full queue (`max_waiting`) is
RESOURCE_EXHAUSTED with a retry hint, a prompt plus max_tokens beyond the model's context is
INVALID_ARGUMENT. Who may do what (keys, priority caps, ownership) is svc_common/auth.py's, applied by
the gRPC servicer with the helpers below (`live_count`, `owner_of`, `tenant_counters`). Requests a
node's link gives up on end with the link's error (INTERNAL for a step that failed twice, UNAVAILABLE for a
node gone too long).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from fastswitch.v1 import executor_pb2
from scheduler_svc.config import NodeAddress, SchedulerConfig
from scheduler_svc.detokenizer import Detokenizer
from scheduler_svc.executor_link import ExecutorLink
from scheduler_svc.fleet import Fleet, Node
from scheduler_svc.grammar import Grammars, OutputConstraint
from scheduler_svc.metrics import Metrics
from scheduler_svc.scheduler import TokenEvent
from scheduler_svc.sequence import Finish, RequestState, Sequence
from svc_common.errors import (
    REFUSED,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFoundError,
    ResourceExhaustedError,
    ServingError,
    Unavailable,
)
from svc_common.plan import Sampling, StepPlan

log = structlog.get_logger(__name__)

COMPLETED = (Finish.LENGTH, Finish.EOS, Finish.STOP)
MAX_NODES = 256  # nodes one scheduler takes (registration beyond is refused)


@dataclass(slots=True)
class Chunk:
    """What one streamed response carries."""

    token_ids: list[int]
    text: str
    produced_unix_ns: int
    finish: Finish | None = None
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase, on the last chunk
    error: type[ServingError] = Unavailable  # raised to the client when finish is ERROR


@dataclass(slots=True)
class GenerateInput:
    prompt: str
    max_tokens: int
    sampling: Sampling
    chat: bool = False
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    tenant: str = "default"
    priority: int = 0
    conversation_id: str = ""
    system_prompt: str = ""
    request_id: str = ""
    constraint: OutputConstraint | None = None  # structured output
    messages: list[dict[str, str]] = field(default_factory=list)  # a whole chat instead of prompt/system_prompt


class _Live:
    """Per-request streaming state, kept beside the Sequence."""

    __slots__ = ("seq", "queue", "detok", "started")

    def __init__(self, seq: Sequence, detok: Detokenizer) -> None:
        self.seq = seq
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.detok = detok
        self.started = time.monotonic()


class Engine:
    def __init__(
        self,
        config: SchedulerConfig,
        tokenizer: Any = None,
        on_attached: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        """`on_attached(bool)`: whether an executor is attached now (the host's health)."""
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.fleet = Fleet(config)
        self.live: dict[str, _Live] = {}
        self._on_fleet_health = on_attached
        self.links = [self._link(n) for n in self.fleet.nodes]
        self._started_links = False
        self._sweeper: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._grammars: Grammars | None = None  # built on the first constrained request
        self._grammars_lock = threading.Lock()
        self.metrics = Metrics(self, config.metrics_tenants)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, tokenizer: Any = None) -> None:
        """Start every node's link, and wait until all nodes are up (or, after `executor_timeout_s`,
        at least one: the others join when they answer)."""
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self.fleet.eos_token_ids.update(self._eos_ids())
        self.metrics.bind_loop(asyncio.get_running_loop())
        for link in self.links:
            link.start()
        self._started_links = True
        deadline = time.monotonic() + self.config.executor_timeout_s
        while len(self.fleet.up_nodes()) < len(self.links):
            if time.monotonic() > deadline:
                if self.fleet.up_nodes():
                    break
                raise Unavailable(
                    f"no executor node ready after {self.config.executor_timeout_s:.0f}s: "
                    + ", ".join(str(n.address) for n in self.fleet.nodes)
                )
            await asyncio.sleep(0.05)
        log.info("fleet_ready", nodes=len(self.fleet.up_nodes()), of=len(self.links), policy=self.config.policy)
        self._sweeper = asyncio.create_task(self._sweep(), name="conversation-sweep")

    def _link(self, node: Node) -> ExecutorLink:
        return ExecutorLink(
            self.config,
            self.fleet,
            node,
            self._on_tokens,
            on_fail=self._fail_requests,
            on_plan=self._on_plan,
            on_attached=self._node_attached,
        )

    def register_node(self, address: NodeAddress) -> tuple[int, bool]:
        """A node registers itself: it joins the fleet and its link starts (a node already in the fleet,
        by its executor address, keeps its place). Returns (its index, whether it was added)."""
        if not self.config.accept_nodes:
            raise FailedPrecondition("this scheduler does not accept nodes: start it with --accept-nodes")
        for node in self.fleet.nodes:
            if node.address.executor == address.executor:
                if node.address.swapd != address.swapd:
                    raise FailedPrecondition(
                        f"node {address.executor} is in the fleet with swap daemon {node.address.swapd or 'none'!r}, "
                        f"not {address.swapd or 'none'!r}: restart the scheduler to change a node's daemon"
                    )
                return node.index, False
        if len(self.fleet.nodes) >= MAX_NODES:
            raise ResourceExhaustedError(f"the fleet has {MAX_NODES} nodes already, the most one scheduler drives")
        node = self.fleet.add_node(address)
        link = self._link(node)
        self.links.append(link)
        if self._started_links:
            link.start()
        return node.index, True

    def _eos_ids(self) -> set[int]:
        return {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()

    async def _node_attached(self, attached: bool) -> None:
        """A node's executor came or went: the service is healthy while any node is up."""
        if self._on_fleet_health is not None:
            await self._on_fleet_health(bool(self.fleet.up_nodes()))

    async def _sweep(self) -> None:
        """While idle the step loop never schedules, so nothing expires conversations: wake it now and
        then (the conversation cache expires them when the loop schedules)."""
        period = max(0.05, min(5.0, self.config.conversation_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            self.fleet.wake()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for link in self.links:
            await link.stop()
        for live in list(self.live.values()):
            self._end(live, Finish.CANCELLED)

    @property
    def ready(self) -> bool:
        return bool(self.fleet.up_nodes())

    # -- tokens from the step loop ----------------------------------------------------------------

    def _on_tokens(self, node: Node, events: list[TokenEvent], produced_ns: int) -> None:
        for event in events:
            live = self.live.get(event.seq.request_id)
            if live is None:
                continue
            self._emit(live, event.token_id, produced_ns)
            # A step finishes only requests it produced a token for (length, EOS, stop string).
            if live.seq.finish is Finish.ERROR and live.seq.grammar is not None:
                self._fail(live, ServingError(live.seq.grammar.error or "the output left the request's grammar"))
            elif live.seq.finished:
                self._end(live, live.seq.finish or Finish.CANCELLED)

    def _on_plan(self, plan: StepPlan) -> None:
        self.metrics.on_scheduled([r.request_id for r in plan.new_requests], self.live)

    def _emit(self, live: _Live, token_id: int, produced_ns: int) -> None:
        self.metrics.on_token(live.seq.request_id, live.seq.tenant, live.started)
        text = live.detok.add(token_id)
        if live.detok.stopped and not live.seq.finished:
            self.fleet.finish(live.seq, Finish.STOP)
        live.queue.put_nowait(Chunk([token_id], text, produced_ns))

    def _end(self, live: _Live, finish: Finish) -> None:
        seq = live.seq
        self.live.pop(seq.request_id, None)
        tail = live.detok.flush() if finish is not Finish.CANCELLED else ""
        if seq.conversation is not None and finish in COMPLETED:
            self.fleet.conversations.record_answer(seq.conversation, live.detok.text[: live.detok.sent] + tail)
        phases = seq.phases.seconds()
        live.queue.put_nowait(Chunk([], tail, time.time_ns(), finish, phases))
        self.metrics.on_finish(seq.request_id, seq.tenant, finish.value, live.started)
        log.info(
            "request_finished",
            request_id=seq.request_id,
            tenant=seq.tenant,
            finish=finish.value,
            prompt_tokens=seq.num_prompt,
            output_tokens=len(seq.output_ids),
            preemptions=seq.preemptions,
            latency_s=round(time.monotonic() - live.started, 4),
            **{f"{name}_s": round(seconds, 4) for name, seconds in phases.items()},
        )

    def _fail(self, live: _Live, error: ServingError) -> None:
        """End one request with an error the client sees (the others carry on)."""
        self.fleet.abort(live.seq.request_id, Finish.ERROR)  # no-op if it has finished already
        self.live.pop(live.seq.request_id, None)
        live.queue.put_nowait(Chunk([], str(error), time.time_ns(), Finish.ERROR, error=type(error)))
        self.metrics.on_finish(live.seq.request_id, live.seq.tenant, Finish.ERROR.value, live.started)
        log.warning("request_failed", request_id=live.seq.request_id, tenant=live.seq.tenant, reason=str(error))

    def _fail_requests(self, request_ids: list[str] | None, error: ServingError) -> None:
        """A node's link gave up on these requests (None: every live one)."""
        ids = list(self.live) if request_ids is None else request_ids
        for request_id in ids:
            live = self.live.get(request_id)
            if live is not None:
                self._fail(live, error)

    # -- structured output ------------------------------------------------------------------------

    @property
    def info(self) -> executor_pb2.ExecutorInfo | None:
        """An attached node's executor info (every node serves the same model), or None before any attach."""
        return next((link.info for link in self.links if link.info is not None), None)

    def grammars(self) -> Grammars:
        """The grammar compiler for the executors' vocabulary (built once, on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                info = self.info
                if info is None:
                    raise Unavailable("scheduler is not attached to an executor yet; retry shortly")
                self._grammars = Grammars(self.tokenizer, info.vocab_size, self._eos_ids())
            return self._grammars

    async def compile_constraint(self, constraint: OutputConstraint | None) -> None:
        """Compile (and cache) a request's constraint in a worker thread, so that a large schema does
        not stall the step loop; InvalidArgument with the grammar engine's message if it does not compile."""
        if constraint is not None:
            await asyncio.to_thread(lambda: self.grammars().compile(constraint))

    # -- client-facing operations -----------------------------------------------------------------

    def submit(self, req: GenerateInput) -> Sequence:
        """Validate and enqueue; raises a ServingError (mapped to a status) and changes no state."""
        nodes = self.fleet.up_nodes()
        if not nodes:
            raise Unavailable("no executor node is up (starting, or every node lost); retry shortly")
        if not req.prompt and not req.messages:
            raise InvalidArgument("prompt is empty: send at least one character of text")
        if req.max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be > 0, got {req.max_tokens}")
        try:
            req.sampling.validate()
        except ValueError as err:
            raise InvalidArgument(str(err)) from err
        if any(not s for s in req.stop):
            raise InvalidArgument("stop strings must be non-empty")
        tenant = req.tenant or "default"
        waiting = sum(len(n.scheduler.waiting) for n in self.fleet.nodes if n.scheduler is not None)
        if waiting >= self.config.max_waiting:
            raise ResourceExhaustedError(
                f"the queue is full ({waiting} requests waiting across the nodes, --max-waiting "
                f"{self.config.max_waiting}): retry in a second",
                retry_after_s=1.0,
            )
        request_id = req.request_id or uuid.uuid4().hex
        if request_id in self.live:
            raise AlreadyExists(f"request id {request_id!r} is already live; use a unique id")
        conversation = (tenant, req.conversation_id) if req.conversation_id else None
        messages = self.fleet.conversations.messages(conversation) if conversation else []
        if req.messages:
            messages += chat_messages(req)
        else:
            if req.system_prompt and not messages:
                messages.append({"role": "system", "content": req.system_prompt})
            messages.append({"role": "user", "content": req.prompt})
        prompt_ids = self._tokenize(messages, req.chat or bool(req.messages))
        if not prompt_ids:
            raise InvalidArgument("prompt tokenises to nothing")
        total = len(prompt_ids) + req.max_tokens
        max_model_len = max(link.info.max_model_len for link in self.links if link.info is not None)
        if total > max_model_len:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {total} exceeds the "
                f"model's context of {max_model_len} tokens: shorten the prompt or lower max_tokens"
            )
        capacity = self.fleet.kv_capacity_tokens()
        if total > capacity:
            raise ResourceExhaustedError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {total} tokens can never "
                f"fit the KV pool ({capacity} tokens): lower max_tokens or start with more --device-blocks"
            )
        grammar = self.grammars().start(req.constraint) if req.constraint is not None else None
        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=req.sampling,
            max_tokens=req.max_tokens,
            stop=req.stop,
            ignore_eos=req.ignore_eos,
            tenant=tenant,
            priority=req.priority,
            conversation=conversation,
            grammar=grammar,
        )
        self.fleet.add(seq, messages if conversation else None)  # the last check: room for a new conversation
        self.live[request_id] = _Live(seq, Detokenizer(self.tokenizer, req.stop))
        return seq

    def _tokenize(self, messages: list[dict[str, str]], chat: bool) -> list[int]:
        if chat:
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as err:  # noqa: BLE001 - a template's own check (e.g. roles must alternate)
                raise InvalidArgument(f"the model's chat template rejects these messages: {err}") from err
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = "".join(m["content"] for m in messages if m["role"] != "system")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def stream(self, seq: Sequence) -> AsyncIterator[Chunk]:
        """Chunks for one request until it finishes; cancelling the iterator cancels the request."""
        live = self.live.get(seq.request_id)
        if live is None:
            raise NotFoundError(f"request {seq.request_id} is not live")
        done = False
        try:
            while True:
                chunk = await live.queue.get()
                if chunk.finish is Finish.ERROR:
                    done = True
                    raise chunk.error(chunk.text)
                yield chunk
                if chunk.finish is not None:
                    done = True
                    return
        finally:
            if not done:
                self.cancel(seq.request_id, missing_ok=True)

    def cancel(self, request_id: str, missing_ok: bool = False) -> None:
        live = self.live.get(request_id)
        if live is None or self.fleet.abort(request_id) is None:
            if missing_ok:
                return
            raise NotFoundError(f"no live request with id {request_id!r} (finished, cancelled or never sent)")
        self._end(live, Finish.CANCELLED)

    def set_priority(self, request_id: str, priority: int) -> None:
        live = self.live.get(request_id)
        if live is None:
            raise NotFoundError(f"no live request with id {request_id!r}")
        live.seq.priority = priority
        self.fleet.wake(request_id)

    def end_conversation(self, tenant: str, conversation_id: str) -> None:
        tenant = tenant or "default"
        if not self.fleet.conversations.end((tenant, conversation_id)):
            raise NotFoundError(f"tenant {tenant!r} has no conversation {conversation_id!r}")
        self.fleet.wake()

    def live_count(self, tenant: str) -> int:
        """Live requests of one tenant (a key's max-requests)."""
        return sum(1 for live in self.live.values() if live.seq.tenant == tenant)

    def owner_of(self, request_id: str) -> str | None:
        """The tenant of a live request; None when no such request is live."""
        live = self.live.get(request_id)
        return None if live is None else live.seq.tenant

    def tenant_counters(self, tenant: str) -> dict[str, float]:
        """One tenant's own figures: what a key that is not an admin's may see."""
        seqs = [live.seq for live in self.live.values() if live.seq.tenant == tenant]
        running = sum(1 for seq in seqs if seq.state is RequestState.RUNNING)
        return {"live_requests": len(seqs), "running": running, "waiting": len(seqs) - running}

    def stats(self) -> dict[str, float]:
        counters: dict[str, float] = {"swap_out_bytes_saved": 0, "device_blocks_free": 0, "host_blocks_free": 0}
        stats = self.fleet.stats
        counters.update(stats.counters())
        counters.update(self.fleet.gauges())
        block_bytes = next((link.info.block_bytes for link in self.links if link.info is not None), 0)
        counters["kv_block_bytes"] = block_bytes
        # Blocks whose host copy was still valid at a swap-out: bytes that did not move.
        counters["swap_out_bytes_saved"] = stats.counter("swap_out_blocks_saved") * block_bytes
        counters["prompt_tokens"] = float(sum(t.prompt_tokens for t in stats.tenants().values()))
        counters["live_requests"] = len(self.live)
        counters.update({f"refused_{code}": float(n) for code, n in REFUSED.items()})
        if self._grammars is not None:  # structured output: masks filled on the step loop, and their cost
            counters["grammar_fills"] = self._grammars.fills
            counters["grammar_fill_s"] = self._grammars.fill_s
        counters["uptime_s"] = time.monotonic() - self._started
        return counters

    def tenant_stats(self) -> dict[str, tuple[float, int, int]]:
        """tenant -> (weighted service, prompt tokens, generated tokens)."""
        prices = (self.config.vtc_prompt_price, self.config.vtc_gen_price)
        return {
            name: (t.weighted(*prices), t.prompt_tokens, t.generated_tokens)
            for name, t in self.fleet.stats.tenants().items()
        }

    def executors(self) -> list[dict[str, object]]:
        """One entry per node (`stats`' `executors`)."""
        return [node.view() for node in self.fleet.nodes]


CHAT_ROLES = ("system", "user", "assistant")


def chat_messages(req: GenerateInput) -> list[dict[str, str]]:
    """A request's own chat messages, checked; they replace prompt and system_prompt."""
    if req.prompt or req.system_prompt:
        raise InvalidArgument("send either messages or prompt (and system_prompt), not both")
    for i, m in enumerate(req.messages):
        if m.get("role") not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
    return [{"role": m["role"], "content": m.get("content", "")} for m in req.messages]
