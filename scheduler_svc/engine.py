"""The scheduler's async engine: drives the executor stream and feeds clients their tokens.

One step is in flight at a time: schedule -> send the plan -> await the result -> apply it ->
stream the new text. Client calls (submit, cancel) only touch the Scheduler between steps, on the
event loop, so no block can be reused while a step that writes it is running. If the executor stream
breaks, every running request is requeued to recompute from its tokens and the engine reconnects;
requests fail with UNAVAILABLE only if no executor comes back within `executor_timeout_s`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
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
    Unavailable,
)
from svc_common.plan import Sampling, StepOutput
from svc_common.server import link_channel

log = structlog.get_logger(__name__)

DESCRIBE_DEADLINE_S = 10.0


@dataclass(slots=True)
class Chunk:
    """What one streamed response carries."""

    token_ids: list[int]
    text: str
    produced_unix_ns: int
    finish: Finish | None = None


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
        # (tenant, conversation id) -> chat messages so far
        self.conversations: dict[tuple[str, str], list[dict[str, str]]] = {}
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
        await self._attached(True)
        if self.config.swapd_addr and self.config.preemption != "recompute":
            self._swap_task = asyncio.create_task(self._swap_client(), name="swap-client")

    async def stop(self) -> None:
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
        lost_since: float | None = None
        while True:
            call = stub.Execute()
            try:
                lost_since = None
                await self._drive(call)
            except grpc.aio.AioRpcError as err:
                call.cancel()
                lost_since = lost_since or time.monotonic()
                log.warning("executor_lost", code=err.code().name, details=err.details())
                self.scheduler.reset_executor_state()
                self.scheduler.stats.counters["executor_reconnects"] += 1
                await self._attached(False)
                await self._await_executor(stub, lost_since)
                await self._attached(True)
                await self._restart_swap_client()

    async def _await_executor(self, stub: executor_pb2_grpc.ExecutorStub, lost_since: float) -> None:
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
                if time.monotonic() - lost_since > self.config.executor_timeout_s:
                    for live in list(self.live.values()):
                        self._fail(live, "executor unavailable; the request could not be completed")
                await asyncio.sleep(0.5)

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
            await call.write(plan.to_proto())
            result = await call.read()
            if result is grpc.aio.EOF:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "executor closed"
                )
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

    def _fail(self, live: _Live, message: str) -> None:
        assert self.scheduler is not None
        self.scheduler.abort(live.seq.request_id, Finish.ERROR)
        self.live.pop(live.seq.request_id, None)
        live.queue.put_nowait(Chunk([], message, time.time_ns(), Finish.ERROR))

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
                    raise Unavailable(chunk.text)
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
        if self.conversations.pop(key, None) is None:
            raise NotFoundError(f"tenant {tenant or 'default'!r} has no conversation {conversation_id!r}")

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
