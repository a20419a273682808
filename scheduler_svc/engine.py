"""The scheduler's async engine: drives the executor stream and feeds clients their tokens.

One step is in flight at a time: schedule -> send the plan -> await the result -> apply it ->
stream the new text. Client calls (submit, cancel) only touch the Scheduler between steps, on the
event loop, so no block can be reused while a step that writes it is running.

Faults: a *lost* executor (stream closed, UNAVAILABLE, or a step longer than `step_timeout_s`) has
every running request requeued to recompute from its tokens while the engine reconnects; requests
fail with UNAVAILABLE only if no step succeeds within `executor_timeout_s`. A *failing* executor
(the step answered INTERNAL) is retried once; a step that fails the same way twice fails the requests
in it with INTERNAL, and the executor serves the rest. Reconnects back off, so neither is a storm.
Conversation histories expire with `conversation_ttl_s` and are at most `max_conversations`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from fastswitch.v1 import executor_pb2, executor_pb2_grpc, swap_pb2, swap_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.detokenizer import Detokenizer
from scheduler_svc.scheduler import Scheduler, SwapOrder
from scheduler_svc.sequence import Finish, Sequence
from svc_common.errors import (
    REFUSED,
    AlreadyExists,
    InvalidArgument,
    NotFoundError,
    ResourceExhaustedError,
    ServingError,
    Unavailable,
)
from svc_common.plan import Sampling, StepOutput
from svc_common.server import link_channel

log = structlog.get_logger(__name__)

DESCRIBE_DEADLINE_S = 10.0
RECONNECT_BACKOFF_S = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0)  # after the 1st, 2nd, ... failure without a good step
FAILED_STEP = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)  # the executor ran the step and it failed


class StepFailed(ServingError):
    """The model step failed the same way twice: the requests in it end with this error."""


@dataclass(slots=True)
class Chunk:
    """What one streamed response carries."""

    token_ids: list[int]
    text: str
    produced_unix_ns: int
    finish: Finish | None = None
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


class _Live:
    """Per-request streaming state, kept beside the Sequence."""

    __slots__ = ("seq", "queue", "detok", "conversation", "started")

    def __init__(self, seq: Sequence, detok: Detokenizer, conversation: tuple[str, str] | None) -> None:
        self.seq = seq
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.detok = detok
        self.conversation = conversation
        self.started = time.monotonic()


class Engine:
    def __init__(
        self,
        config: SchedulerConfig,
        tokenizer: Any = None,
        on_attached: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self._on_attached = on_attached  # health: SERVING only while an executor is attached
        self.tokenizer = tokenizer
        self.info: executor_pb2.ExecutorInfo | None = None
        self.scheduler: Scheduler | None = None
        self.live: dict[str, _Live] = {}
        # (tenant, conversation id) -> chat messages so far, least recently used first
        self.conversations: OrderedDict[tuple[str, str], list[dict[str, str]]] = OrderedDict()
        self._conversation_used: dict[tuple[str, str], float] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        self._step_ids: list[str] = []  # the requests in the step in flight
        self._last_failure: tuple[str, frozenset[str]] | None = None
        self._failures_in_a_row = 0
        self._lost_since: float | None = None  # when steps stopped succeeding
        self._wake = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._swap_call: Any = None
        self._swap_task: asyncio.Task[None] | None = None
        self._swap_landed = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, tokenizer: Any = None) -> None:
        """Connect to the executor (waiting for it to be ready), then run the step loop."""
        if tokenizer is not None:
            self.tokenizer = tokenizer
        self._channel = link_channel(self.config.executor_addr, self.config.link_tls_ca)
        stub = executor_pb2_grpc.ExecutorStub(self._channel)
        self.info = await self._describe(stub, wait_s=self.config.executor_timeout_s)
        eos = self._eos_ids()
        policy = None
        if self.config.policy == "vtc":
            from scheduler_svc.vtc import VirtualTokenCounter

            policy = VirtualTokenCounter(
                self.config.vtc_prompt_price, self.config.vtc_gen_price, self.config.tenant_weights or None
            )
        self.scheduler = Scheduler(self.config, self.info.num_blocks, self.info.block_size, eos, policy)
        log.info(
            "executor_attached",
            executor=self.config.executor_addr,
            blocks=self.info.num_blocks,
            block_size=self.info.block_size,
            policy=self.config.policy,
        )
        self._task = asyncio.create_task(self._run(stub), name="step-loop")
        self._housekeeping = asyncio.create_task(self._sweep(), name="housekeeping")
        await self._attached(True)
        if self.config.swapd_addr and self.config.preemption != "recompute":
            self._swap_task = asyncio.create_task(self._swap_client(), name="swap-client")

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._swap_task is not None:
            self._swap_task.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for live in list(self.live.values()):
            self._end(live, Finish.CANCELLED)
        if self._channel is not None:
            await self._channel.close()

    async def _attached(self, attached: bool) -> None:
        if self._on_attached is not None:
            await self._on_attached(attached)

    async def _describe(self, stub: executor_pb2_grpc.ExecutorStub, wait_s: float) -> executor_pb2.ExecutorInfo:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return await stub.Describe(executor_pb2.DescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
            except grpc.aio.AioRpcError as err:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"executor at {self.config.executor_addr} not ready after {wait_s:.0f}s: {err.details()}"
                    ) from err
                await asyncio.sleep(0.5)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # -- the swap daemon --------------------------------------------------------------------------

    async def _swap_client(self) -> None:
        """Keep one Swap stream to the daemon; apply completions as they arrive."""
        sched, info = self.scheduler, self.info
        assert sched is not None and info is not None
        channel = link_channel(self.config.swapd_addr, self.config.link_tls_ca)
        stub = swap_pb2_grpc.SwapDaemonStub(channel)
        try:
            while True:
                try:
                    daemon = await stub.Describe(swap_pb2.SwapDescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
                    call = stub.Swap()
                    attach = swap_pb2.Attach(
                        pool_handle=info.pool_handle,
                        num_device_blocks=info.num_blocks,
                        block_bytes=info.block_bytes,
                        num_layers=info.num_layers,
                    )
                    await call.write(swap_pb2.SwapCommand(attach=attach))
                    self._swap_call = call
                    sched.attach_host_pool(daemon.num_host_blocks)
                    log.info(
                        "swap_daemon_attached",
                        addr=self.config.swapd_addr,
                        host_blocks=daemon.num_host_blocks,
                    )
                    async for done in call:
                        self._on_swap_done(done)
                    raise grpc.aio.AioRpcError(
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.aio.Metadata(),
                        grpc.aio.Metadata(),
                        "swap stream ended",
                    )
                except grpc.aio.AioRpcError as err:
                    self._swap_call = None
                    if sched.host is not None:
                        log.warning("swap_daemon_lost", code=err.code().name, details=err.details())
                        sched.on_swap_daemon_lost()
                        self._swap_landed.set()
                        self._wake.set()
                    await asyncio.sleep(1.0)
        finally:
            await channel.close()

    async def _restart_swap_client(self) -> None:
        """A new executor has a new KV pool: the daemon must map that one, not the old one.

        Copies still in flight refer to the old pool, so their requests recompute.
        """
        if self._swap_task is None:
            return
        self._swap_task.cancel()
        try:
            await self._swap_task
        except asyncio.CancelledError:
            pass
        self._swap_call = None
        if self.scheduler is not None and self.scheduler.host is not None:
            self.scheduler.on_swap_daemon_lost()
        self._swap_task = asyncio.create_task(self._swap_client(), name="swap-client")

    def _on_swap_done(self, done: swap_pb2.SwapDone) -> None:
        sched = self.scheduler
        assert sched is not None
        order = sched.swaps.get(done.swap_id)
        if order is not None:
            c = sched.stats.counters
            c["swap_out_bytes" if order.direction == "out" else "swap_in_bytes"] += done.bytes
            c["copy_calls"] += done.copy_calls
            c["swap_copy_s"] += done.duration_ns / 1e9
            if not done.ok:
                log.warning("swap_failed", swap_id=done.swap_id, error=done.error)
        sched.on_swap_done(done.swap_id, done.ok)
        self._swap_landed.set()
        self._wake.set()

    async def _send_swaps(self, orders: list[SwapOrder]) -> None:
        sched = self.scheduler
        assert sched is not None
        granularity = {
            "run": swap_pb2.COPY_GRANULARITY_RUN,
            "block_layer": swap_pb2.COPY_GRANULARITY_BLOCK_LAYER,
        }
        for order in orders:
            call = self._swap_call
            if call is None:
                sched.on_swap_done(order.swap_id, ok=False)  # no daemon: recompute instead
                continue
            command = swap_pb2.SwapCommand(
                swap_id=order.swap_id,
                direction=swap_pb2.SWAP_DIRECTION_OUT if order.direction == "out" else swap_pb2.SWAP_DIRECTION_IN,
                runs=[swap_pb2.BlockRun(device_start=d, host_start=h, num_blocks=n) for d, h, n in order.runs],
                granularity=granularity[order.granularity],
            )
            try:
                await call.write(command)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
                sched.on_swap_done(order.swap_id, ok=False)

    async def _wait_swaps(self, swap_ids: set[int]) -> None:
        """Synchronous swaps (vllm-like): the step waits until these copies land, the stall that mode pays."""
        sched = self.scheduler
        assert sched is not None
        start = time.perf_counter()
        while swap_ids & sched.swaps.keys():
            self._swap_landed.clear()
            await self._swap_landed.wait()
        sched.stats.counters["swap_stall_s"] += time.perf_counter() - start

    # -- the step loop ----------------------------------------------------------------------------

    async def _run(self, stub: executor_pb2_grpc.ExecutorStub) -> None:
        assert self.scheduler is not None
        while True:
            call = stub.Execute()
            try:
                await self._drive(call)
            except grpc.aio.AioRpcError as err:
                call.cancel()
                counters = self.scheduler.stats.counters
                self._failures_in_a_row += 1
                self._lost_since = self._lost_since or time.monotonic()
                if err.code() in FAILED_STEP:
                    counters["failed_steps"] += 1
                    self._on_failed_step(err.details() or err.code().name)
                    self._fail_if_lost_too_long()  # failures that never repeat exactly still end
                    await asyncio.sleep(self._backoff())
                    continue  # the executor is alive: its stream ended with the error, open a new one
                log.warning("executor_lost", code=err.code().name, details=err.details())
                self.scheduler.reset_executor_state()
                counters["executor_reconnects"] += 1
                await self._attached(False)
                await asyncio.sleep(self._backoff())
                await self._await_executor(stub)
                await self._attached(True)
                await self._restart_swap_client()

    def _backoff(self) -> float:
        return RECONNECT_BACKOFF_S[min(self._failures_in_a_row - 1, len(RECONNECT_BACKOFF_S) - 1)]

    def _on_failed_step(self, details: str) -> None:
        """The executor failed a step (it cleared its requests). Once: replay it, it may pass. The same
        failure on the same requests twice in a row: those requests fail; the others carry on."""
        sched = self.scheduler
        assert sched is not None
        in_step = frozenset(self._step_ids)
        again = self._last_failure is not None and self._last_failure[0] == details and in_step & self._last_failure[1]
        log.warning("step_failed", details=details, requests=len(in_step), again=bool(again))
        sched.reset_executor_state()
        if not again:
            self._last_failure = (details, in_step)
            return
        self._last_failure = None
        for request_id in sorted(in_step):
            live = self.live.get(request_id)
            if live is not None:
                self._fail(
                    live,
                    f"the model step failed twice with the same error, so this request was stopped: {details}",
                    StepFailed,
                )

    async def _sweep(self) -> None:
        """Housekeeping while idle: expire conversations (history and kept KV) past their TTL."""
        period = max(0.05, min(5.0, self.config.conversation_ttl_s / 4))
        while True:
            await asyncio.sleep(period)
            self.expire_conversations(time.monotonic())

    async def _await_executor(self, stub: executor_pb2_grpc.ExecutorStub) -> None:
        self._fail_if_lost_too_long()
        while True:
            try:
                info = await stub.Describe(executor_pb2.DescribeRequest(), timeout=DESCRIBE_DEADLINE_S)
                assert self.info is not None
                if (info.num_blocks, info.block_size) != (self.info.num_blocks, self.info.block_size):
                    log.error("executor_geometry_changed", old=self.info.num_blocks, new=info.num_blocks)
                self.info = info
                log.info("executor_reattached", pool=info.pool_handle)
                return
            except grpc.aio.AioRpcError:
                self._fail_if_lost_too_long()
                await asyncio.sleep(0.5)

    def _fail_if_lost_too_long(self) -> None:
        """Fail every live request once no step has succeeded for `executor_timeout_s`; requests that
        arrive later get their own `executor_timeout_s`."""
        now = time.monotonic()
        if self._lost_since is not None and now - self._lost_since > self.config.executor_timeout_s:
            self._lost_since = now
            for live in list(self.live.values()):
                self._fail(
                    live,
                    f"no executor has completed a step for {self.config.executor_timeout_s:g}s "
                    "(--executor-timeout); the request could not be completed",
                )

    async def _drive(self, call: Any) -> None:
        sched = self.scheduler
        assert sched is not None
        while True:
            # Cleared before scheduling, never after an await: a copy landing while the orders are
            # being sent must wake the next iteration, not be forgotten (that was a hang).
            self._wake.clear()
            plan = sched.schedule()
            orders = sched.take_swap_orders()
            if orders:
                await self._send_swaps(orders)
                if self.config.swaps_stall:
                    await self._wait_swaps({o.swap_id for o in orders})
            if plan is None:
                stalled = bool(sched.swaps)
                start = time.perf_counter()
                await self._wake.wait()
                if stalled:
                    sched.stats.counters["swap_stall_s"] += time.perf_counter() - start
                continue
            self._step_ids = [c.request_id for c in plan.chunks]
            await call.write(plan.to_proto())
            try:
                result = await asyncio.wait_for(call.read(), self.config.step_timeout_s)
            except asyncio.TimeoutError:  # a hung step: the executor counts as lost
                sched.stats.counters["step_timeouts"] += 1
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    f"a step took longer than --step-timeout {self.config.step_timeout_s:g}s",
                ) from None
            if result is grpc.aio.EOF:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "executor closed"
                )
            self._lost_since, self._failures_in_a_row, self._last_failure = None, 0, None
            now_ns = time.time_ns()
            output = StepOutput.from_proto(result)
            sched.stats.counters["forward_s"] += output.forward_ns / 1e9
            for event in sched.on_step_output(output):
                live = self.live.get(event.seq.request_id)
                if live is not None:
                    self._emit(live, event.token_id, now_ns)
                    # A step finishes only requests it produced a token for (length, EOS, stop string).
                    if live.seq.finished:
                        self._end(live, live.seq.finish or Finish.CANCELLED)

    def _emit(self, live: _Live, token_id: int, now_ns: int) -> None:
        text = live.detok.add(token_id)
        if live.detok.stopped and not live.seq.finished:
            assert self.scheduler is not None
            self.scheduler.finish(live.seq, Finish.STOP)
        live.queue.put_nowait(Chunk([token_id], text, now_ns))

    def _end(self, live: _Live, finish: Finish) -> None:
        self.live.pop(live.seq.request_id, None)
        tail = live.detok.flush() if finish is not Finish.CANCELLED else ""
        if live.conversation is not None and finish in (Finish.LENGTH, Finish.EOS, Finish.STOP):
            history = self.conversations.setdefault(live.conversation, [])
            history.append({"role": "assistant", "content": live.detok.text[: live.detok.sent] + tail})
            self._touch(live.conversation)
        live.queue.put_nowait(Chunk([], tail, time.time_ns(), finish))
        log.info(
            "request_finished",
            request_id=live.seq.request_id,
            tenant=live.seq.tenant,
            finish=finish.value,
            prompt_tokens=live.seq.num_prompt,
            output_tokens=len(live.seq.output_ids),
            preemptions=live.seq.preemptions,
            latency_s=round(time.monotonic() - live.started, 4),
        )

    def _fail(self, live: _Live, message: str, error: type[ServingError] = Unavailable) -> None:
        assert self.scheduler is not None
        self.scheduler.abort(live.seq.request_id, Finish.ERROR)
        self.live.pop(live.seq.request_id, None)
        live.queue.put_nowait(Chunk([], message, time.time_ns(), Finish.ERROR, error))
        log.warning("request_failed", request_id=live.seq.request_id, tenant=live.seq.tenant, reason=message)

    # -- client-facing operations -----------------------------------------------------------------

    def submit(self, req: GenerateInput) -> Sequence:
        """Validate and enqueue; raises a ServingError (mapped to a status) and changes no state."""
        sched, info = self.scheduler, self.info
        if sched is None or info is None or self._task is None:
            raise Unavailable("scheduler is not attached to an executor yet; retry shortly")
        if not req.prompt:
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
        if conversation is not None:
            self._make_room_for(conversation)
        messages = list(self.conversations.get(conversation, [])) if conversation else []
        if req.system_prompt and not messages:
            messages.append({"role": "system", "content": req.system_prompt})
        messages.append({"role": "user", "content": req.prompt})
        prompt_ids = self._tokenize(messages, req.chat)
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
        )
        if conversation is not None:
            self.conversations[conversation] = messages
            self._touch(conversation)
        self.live[request_id] = _Live(seq, Detokenizer(self.tokenizer, req.stop), conversation)
        sched.add(seq)
        self._wake.set()
        return seq

    def _tokenize(self, messages: list[dict[str, str]], chat: bool) -> list[int]:
        if chat:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
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
        self._wake.set()

    def set_priority(self, request_id: str, priority: int) -> None:
        live = self.live.get(request_id)
        if live is None:
            raise NotFoundError(f"no live request with id {request_id!r}")
        live.seq.priority = priority
        self._wake.set()

    def end_conversation(self, tenant: str, conversation_id: str) -> None:
        key = (tenant or "default", conversation_id)
        if self.scheduler is not None:
            self.scheduler.drop_conversation(key)
        self._conversation_used.pop(key, None)
        if self.conversations.pop(key, None) is None:
            raise NotFoundError(f"tenant {tenant or 'default'!r} has no conversation {conversation_id!r}")

    # -- bounded conversation state ---------------------------------------------------------------

    def _touch(self, key: tuple[str, str]) -> None:
        self.conversations.move_to_end(key)
        self._conversation_used[key] = time.monotonic()

    def _in_use(self) -> set[tuple[str, str]]:
        return {live.conversation for live in self.live.values() if live.conversation is not None}

    def _forget(self, key: tuple[str, str]) -> None:
        self.conversations.pop(key, None)
        self._conversation_used.pop(key, None)
        if self.scheduler is not None:
            self.scheduler.drop_conversation(key)

    def expire_conversations(self, now: float) -> int:
        """Forget conversations idle for longer than the TTL (history and kept KV); returns how many."""
        in_use, expired = self._in_use(), 0
        for key in list(self.conversations):  # least recently used first
            if now - self._conversation_used.get(key, now) <= self.config.conversation_ttl_s:
                break
            if key not in in_use:
                self._forget(key)
                expired += 1
        if self.scheduler is not None:
            self.scheduler.expire_kept(now)
            self.scheduler.stats.counters["conversations_expired"] += expired
        return expired

    def _make_room_for(self, key: tuple[str, str]) -> None:
        """A new conversation beyond --max-conversations pushes out the least recently used idle one."""
        self.expire_conversations(time.monotonic())
        if key in self.conversations or len(self.conversations) < self.config.max_conversations:
            return
        in_use = self._in_use()
        victim = next((k for k in self.conversations if k not in in_use), None)
        if victim is None:
            raise ResourceExhaustedError(
                f"{len(self.conversations)} conversations are live (--max-conversations): retry when one ends",
                retry_after_s=1.0,
            )
        self._forget(victim)
        if self.scheduler is not None:
            self.scheduler.stats.counters["conversations_evicted"] += 1

    def live_count(self, tenant: str) -> int:
        """Live requests of one tenant (per-key admission)."""
        return sum(1 for live in self.live.values() if live.seq.tenant == tenant)

    def owner_of(self, request_id: str) -> str | None:
        """The tenant of a live request; None when no such request is live."""
        live = self.live.get(request_id)
        return None if live is None else live.seq.tenant

    def tenant_counters(self, tenant: str) -> dict[str, float]:
        """The figures of one tenant alone: what a non-admin key may see."""
        lives = [live.seq for live in self.live.values() if live.seq.tenant == tenant]
        running = sum(1 for s in lives if s.status.value == "running")
        return {"live_requests": len(lives), "running": running, "waiting": len(lives) - running}

    def stats(self) -> dict[str, float]:
        sched = self.scheduler
        counters: dict[str, float] = {
            "preemptions": 0,
            "swap_out_bytes": 0,
            "swap_in_bytes": 0,
            "copy_calls": 0,
            "swap_stall_s": 0.0,
            "recomputed_tokens": 0,
            "reused_prefix_tokens": 0,
            "reused_from_host_tokens": 0,
            "recomputed_prefix_tokens": 0,
            "swap_out_bytes_saved": 0,
            "kept_kv_spilled": 0,
            "kept_kv_evicted": 0,
            "kept_kv_host_evicted": 0,
            "kept_kv_expired": 0,
            "swap_fallback_recompute": 0,
            "executor_reconnects": 0,
            "failed_steps": 0,
            "step_timeouts": 0,
            "conversations_expired": 0,
            "conversations_evicted": 0,
            "device_blocks_free": 0,
            "host_blocks_free": 0,
        }
        if sched is not None:
            counters.update({k: float(v) for k, v in sched.stats.counters.items()})
            block_bytes = self.info.block_bytes if self.info is not None else 0
            counters["kv_block_bytes"] = block_bytes
            # Blocks whose host copy was still valid at a swap-out: bytes that did not move.
            counters["swap_out_bytes_saved"] = sched.stats.counters["swap_out_blocks_saved"] * block_bytes
            counters["prompt_tokens"] = float(sum(t.prompt_tokens for t in sched.stats.tenants.values()))
            counters["device_blocks_free"] = sched.allocator.num_free
            counters["device_blocks_total"] = sched.allocator.num_blocks
            counters["swaps_in_flight"] = len(sched.swaps)
            counters["kept_conversations"] = len(sched.kept)
            counters["kept_kv_blocks"] = sum(len(k.blocks) for k in sched.kept.values())
            counters["kept_kv_host_blocks"] = sum(len(k.host_blocks) for k in sched.kept.values())
            if sched.host is not None:
                counters["host_blocks_free"] = sched.host.num_free
                counters["host_blocks_total"] = sched.host.num_blocks
            counters["running"] = len(sched.running)
            counters["waiting"] = len(sched.waiting)
        counters["live_requests"] = len(self.live)
        counters["conversations"] = len(self.conversations)
        counters["conversation_messages"] = sum(len(m) for m in self.conversations.values())
        counters.update({f"refused_{code}": float(n) for code, n in REFUSED.items()})
        counters["uptime_s"] = time.monotonic() - self._started
        return counters

    def tenant_stats(self) -> dict[str, tuple[float, int, int]]:
        """tenant -> (weighted service, prompt tokens, generated tokens)."""
        if self.scheduler is None:
            return {}
        prices = (self.config.vtc_prompt_price, self.config.vtc_gen_price)
        return {
            name: (t.weighted(*prices), t.prompt_tokens, t.generated_tokens)
            for name, t in self.scheduler.stats.tenants.items()
        }
