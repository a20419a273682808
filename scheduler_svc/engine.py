"""The request front: what the client API calls (submit, stream, cancel, set_priority, end_conversation,
stats), in front of the scheduler and the executor link that drives it.

`submit()` validates a request, builds its prompt (a conversation's history from the scheduler's
conversation cache, plus the new turn) and queues it; the executor link's step loop hands back each
step's tokens, which are detokenised here and streamed to the client. A request's last chunk
carries its finish reason and the seconds it spent in each phase.

Admission happens here, before anything is allocated: a full queue (`max_waiting`) is
RESOURCE_EXHAUSTED with a retry hint, a prompt plus max_tokens beyond the model's context is
INVALID_ARGUMENT. Who may do what (keys, priority caps, ownership) is svc_common/auth.py's, applied by
the gRPC servicer with the helpers below (`live_count`, `owner_of`, `tenant_counters`). Requests the
link gives up on end with the link's error (INTERNAL for a step that failed twice, UNAVAILABLE for an
executor gone too long).
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

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.detokenizer import Detokenizer
from scheduler_svc.executor_link import ExecutorLink
from scheduler_svc.grammar import Grammars, OutputConstraint
from scheduler_svc.metrics import Metrics
from scheduler_svc.scheduler import Scheduler, TokenEvent
from scheduler_svc.sequence import Finish, RequestState, Sequence
from svc_common.errors import (
    REFUSED,
    AlreadyExists,
    InvalidArgument,
    NotFoundError,
    ResourceExhaustedError,
    ServingError,
    Unavailable,
)
from svc_common.plan import Sampling, StepPlan

log = structlog.get_logger(__name__)

COMPLETED = (Finish.LENGTH, Finish.EOS, Finish.STOP)


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
        self.scheduler: Scheduler | None = None
        self.live: dict[str, _Live] = {}
        self.link = ExecutorLink(
            config,
            on_tokens=self._on_tokens,
            on_fail=self._fail_requests,
            on_plan=self._on_plan,
            on_attached=on_attached,
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._grammars: Grammars | None = None  # built on the first constrained request
        self._grammars_lock = threading.Lock()
        self.metrics = Metrics(self, config.metrics_tenants)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, tokenizer: Any = None) -> None:
        """Connect to the executor (waiting for it to be ready), then run the step loop."""
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self.metrics.bind_loop(asyncio.get_running_loop())
        info = await self.link.connect()
        self.scheduler = Scheduler(self.config, info.num_blocks, info.block_size, self._eos_ids())
        log.info(
            "executor_attached",
            executor=self.config.executor_addr,
            blocks=info.num_blocks,
            block_size=info.block_size,
            policy=self.config.policy,
        )
        self.link.run(self.scheduler)
        self._sweeper = asyncio.create_task(self._sweep(), name="conversation-sweep")

    def _eos_ids(self) -> set[int]:
        return {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()

    async def _sweep(self) -> None:
        """While idle the step loop never schedules, so nothing expires conversations: wake it now and
        then (the conversation cache expires them when the loop schedules)."""
        period = max(0.05, min(5.0, self.config.conversation_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            self.link.wake()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.link.stop()
        for live in list(self.live.values()):
            self._end(live, Finish.CANCELLED)

    # -- tokens from the step loop ----------------------------------------------------------------

    def _on_tokens(self, events: list[TokenEvent], produced_ns: int) -> None:
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
            assert self.scheduler is not None
            self.scheduler.finish(live.seq, Finish.STOP)
        live.queue.put_nowait(Chunk([token_id], text, produced_ns))

    def _end(self, live: _Live, finish: Finish) -> None:
        seq = live.seq
        self.live.pop(seq.request_id, None)
        tail = live.detok.flush() if finish is not Finish.CANCELLED else ""
        if seq.conversation is not None and finish in COMPLETED and self.scheduler is not None:
            self.scheduler.conversations.record_answer(seq.conversation, live.detok.text[: live.detok.sent] + tail)
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
        if self.scheduler is not None:
            self.scheduler.abort(live.seq.request_id, Finish.ERROR)  # no-op if it has finished already
        self.live.pop(live.seq.request_id, None)
        live.queue.put_nowait(Chunk([], str(error), time.time_ns(), Finish.ERROR, error=type(error)))
        self.metrics.on_finish(live.seq.request_id, live.seq.tenant, Finish.ERROR.value, live.started)
        log.warning("request_failed", request_id=live.seq.request_id, tenant=live.seq.tenant, reason=str(error))

    def _fail_requests(self, request_ids: list[str] | None, error: ServingError) -> None:
        """The link gave up on these requests (None: every live one)."""
        ids = list(self.live) if request_ids is None else request_ids
        for request_id in ids:
            live = self.live.get(request_id)
            if live is not None:
                self._fail(live, error)

    # -- structured output ------------------------------------------------------------------------

    def grammars(self) -> Grammars:
        """The grammar compiler for the executor's vocabulary (built once, on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.link.info is None:
                    raise Unavailable("scheduler is not attached to an executor yet; retry shortly")
                self._grammars = Grammars(self.tokenizer, self.link.info.vocab_size, self._eos_ids())
            return self._grammars

    async def compile_constraint(self, constraint: OutputConstraint | None) -> None:
        """Compile (and cache) a request's constraint in a worker thread, so that a large schema does
        not stall the step loop; InvalidArgument with the grammar engine's message if it does not compile."""
        if constraint is not None:
            await asyncio.to_thread(lambda: self.grammars().compile(constraint))

    # -- client-facing operations -----------------------------------------------------------------

    def submit(self, req: GenerateInput) -> Sequence:
        """Validate and enqueue; raises a ServingError (mapped to a status) and changes no state."""
        sched, info = self.scheduler, self.link.info
        if sched is None or info is None or not self.link.running:
            raise Unavailable("scheduler is not attached to an executor yet; retry shortly")
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
        if len(sched.waiting) >= self.config.max_waiting:
            raise ResourceExhaustedError(
                f"the queue is full ({len(sched.waiting)} requests waiting, --max-waiting "
                f"{self.config.max_waiting}): retry in a second",
                retry_after_s=1.0,
            )
        request_id = req.request_id or uuid.uuid4().hex
        if request_id in self.live:
            raise AlreadyExists(f"request id {request_id!r} is already live; use a unique id")
        conversation = (tenant, req.conversation_id) if req.conversation_id else None
        messages = sched.conversations.messages(conversation) if conversation else []
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
        if total > info.max_model_len:
            raise InvalidArgument(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) = {total} exceeds the "
                f"model's context of {info.max_model_len} tokens: shorten the prompt or lower max_tokens"
            )
        capacity = info.num_blocks * info.block_size
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
        sched.add(seq, messages if conversation else None)  # the last check: room for a new conversation
        self.live[request_id] = _Live(seq, Detokenizer(self.tokenizer, req.stop))
        self.link.wake()
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
        if live is None or self.scheduler is None or self.scheduler.abort(request_id) is None:
            if missing_ok:
                return
            raise NotFoundError(f"no live request with id {request_id!r} (finished, cancelled or never sent)")
        self._end(live, Finish.CANCELLED)
        self.link.wake()

    def set_priority(self, request_id: str, priority: int) -> None:
        live = self.live.get(request_id)
        if live is None:
            raise NotFoundError(f"no live request with id {request_id!r}")
        live.seq.priority = priority
        self.link.wake()

    def end_conversation(self, tenant: str, conversation_id: str) -> None:
        tenant = tenant or "default"
        if self.scheduler is None or not self.scheduler.conversations.end((tenant, conversation_id)):
            raise NotFoundError(f"tenant {tenant!r} has no conversation {conversation_id!r}")
        self.link.wake()

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
        sched, info = self.scheduler, self.link.info
        if sched is not None:
            counters.update(sched.stats.counters())
            counters.update(sched.gauges())
            block_bytes = info.block_bytes if info is not None else 0
            counters["kv_block_bytes"] = block_bytes
            # Blocks whose host copy was still valid at a swap-out: bytes that did not move.
            counters["swap_out_bytes_saved"] = sched.stats.counter("swap_out_blocks_saved") * block_bytes
            counters["prompt_tokens"] = float(sum(t.prompt_tokens for t in sched.stats.tenants().values()))
        counters["live_requests"] = len(self.live)
        counters.update({f"refused_{code}": float(n) for code, n in REFUSED.items()})
        if self._grammars is not None:  # structured output: masks filled on the step loop, and their cost
            counters["grammar_fills"] = self._grammars.fills
            counters["grammar_fill_s"] = self._grammars.fill_s
        counters["uptime_s"] = time.monotonic() - self._started
        return counters

    def tenant_stats(self) -> dict[str, tuple[float, int, int]]:
        """tenant -> (weighted service, prompt tokens, generated tokens)."""
        if self.scheduler is None:
            return {}
        prices = (self.config.vtc_prompt_price, self.config.vtc_gen_price)
        return {
            name: (t.weighted(*prices), t.prompt_tokens, t.generated_tokens)
            for name, t in self.scheduler.stats.tenants().items()
        }


CHAT_ROLES = ("system", "user", "assistant")


def chat_messages(req: GenerateInput) -> list[dict[str, str]]:
    """A request's own chat messages, checked; they replace prompt and system_prompt."""
    if req.prompt or req.system_prompt:
        raise InvalidArgument("send either messages or prompt (and system_prompt), not both")
    for i, m in enumerate(req.messages):
        if m.get("role") not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
    return [{"role": m["role"], "content": m.get("content", "")} for m in req.messages]
