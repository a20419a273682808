"""Driving a running stack with a workload: one `RequestRecord` per turn, timed as the client sees it.

The replay is open-loop: each conversation arrives at its drawn time and sends its next turn when
the previous answer has completed plus its think time. Every turn carries `conversation_id` and
`chat`, so the server keeps the history and its KV, and `ignore_eos` with `max_tokens` = the drawn
answer length, so every mode generates the same tokens. The client stamps each streamed token on
arrival (TTFT = first token - send, TBT = gap between tokens) and keeps the server's `phases` (seconds
per phase of the request's life) from its last chunk. A watchdog cuts the replay short when the
server stops producing tokens.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastswitch.client import AsyncClient, FastSwitchError
from fastswitch_bench.workload import Conversation, Workload

# Where a request's time went, as the scheduler accounts it (the names of `GenerateResponse.phases`).
PHASES = ("queued", "blocked", "swap_in", "prefill", "preempted", "decode")

# Gauges in GetStats: a before/after difference of these means nothing.
GAUGES = {
    "device_blocks_free",
    "device_blocks_total",
    "host_blocks_free",
    "host_blocks_total",
    "swaps_in_flight",
    "kept_conversations",
    "kept_kv_blocks",
    "running",
    "waiting",
    "live_requests",
    "uptime_s",
}


@dataclass(slots=True)
class RequestRecord:
    """One turn as the client saw it; times in seconds from the start of the replay."""

    conversation: str
    turn: int  # 1-based
    tenant: str
    priority: int  # initial priority
    tokens: int = 0
    ttft_s: float | None = None
    tbt_s: list[float] = field(default_factory=list)
    start_s: float = 0.0
    end_s: float = 0.0
    prompt_tokens: int = 0  # server-side, chat template over the whole conversation
    reused_prefix_tokens: int = 0
    phases: dict[str, float] | None = None  # seconds per PHASES name; None: the server did not report them
    error: str | None = None


def chunk_phases(chunk: Any) -> dict[str, float] | None:
    """The server's seconds per phase if this chunk carries them (the last one does), in PHASES order."""
    phases = getattr(chunk, "phases", None)
    if not phases:
        return None
    return {name: float(phases.get(name, 0.0)) for name in PHASES}


@dataclass(slots=True)
class Replay:
    records: list[RequestRecord]
    wall_s: float
    counters: dict[str, float]  # server counters: after minus before
    stalled: bool  # the server made no progress for stall_timeout_s with requests in flight: cut short


async def replay(
    addr: str, workload: Workload, label: str, progress: bool = True, stall_timeout_s: float = 60.0
) -> Replay:
    """Replay the workload open-loop against the stack at addr.

    A watchdog ends the replay when requests are in flight but no token has arrived for
    `stall_timeout_s`: the in-flight turns are recorded as failed, the rest are not sent.
    """
    from tqdm.auto import tqdm

    nonce = uuid.uuid4().hex[:8]  # conversation ids unique per replay, even against a long-running stack
    records: list[RequestRecord] = []
    in_flight = 0
    last_progress = time.perf_counter()
    async with AsyncClient(addr) as client:
        await client.complete("Hello", max_tokens=2)  # warm-up: the first forward passes are slow
        before = await client.stats()
        bar = tqdm(total=workload.num_requests, desc=f"  {label}", unit="req", leave=False, disable=not progress)
        t0 = time.perf_counter()

        async def turn(conversation_id: str, conv: Conversation, k: int) -> RequestRecord:
            nonlocal in_flight, last_progress
            t = conv.turns[k - 1]
            rec = RequestRecord(conv.conversation_id, k, conv.tenant, conv.priority)
            start = time.perf_counter()
            rec.start_s = start - t0
            last = None
            in_flight += 1
            try:
                async for chunk in client.generate(
                    t.prompt,
                    chat=True,
                    conversation_id=conversation_id,
                    tenant=conv.tenant,
                    priority=conv.priority,
                    max_tokens=t.max_tokens,
                    ignore_eos=True,
                ):
                    rec.prompt_tokens = chunk.prompt_tokens or rec.prompt_tokens
                    rec.reused_prefix_tokens = chunk.reused_prefix_tokens or rec.reused_prefix_tokens
                    rec.phases = chunk_phases(chunk) or rec.phases
                    if not chunk.token_ids:
                        continue
                    now = last_progress = time.perf_counter()
                    n = len(chunk.token_ids)
                    if last is None:
                        rec.ttft_s = now - start
                        rec.tbt_s.extend([0.0] * (n - 1))  # tokens that arrived with the first one
                    else:
                        rec.tbt_s.extend([(now - last) / n] * n)
                    last = now
                    rec.tokens += n
            except FastSwitchError as err:
                rec.error = str(err)
            except asyncio.CancelledError:
                rec.error = f"stalled: no token from the server for {stall_timeout_s:.0f} s"
                rec.end_s = time.perf_counter() - t0
                records.append(rec)
                raise
            finally:
                in_flight -= 1
                last_progress = time.perf_counter()
            rec.end_s = time.perf_counter() - t0
            return rec

        async def conversation(conv: Conversation) -> None:
            await asyncio.sleep(max(0.0, t0 + conv.arrival_s - time.perf_counter()))
            conversation_id = f"bench-{nonce}-{conv.conversation_id}"
            for k in range(1, len(conv.turns) + 1):
                if k > 1:
                    await asyncio.sleep(conv.turns[k - 1].think_s)
                rec = await turn(conversation_id, conv, k)
                records.append(rec)
                bar.update(1)
                if rec.error is not None:
                    bar.update(len(conv.turns) - k)
                    break
            try:
                await client.end_conversation(conversation_id, tenant=conv.tenant)
            except FastSwitchError:
                pass  # nothing kept (e.g. the last turn failed)

        tasks = [asyncio.create_task(conversation(c)) for c in workload.conversations]
        stalled = False

        async def watchdog() -> None:
            nonlocal stalled
            while True:
                await asyncio.sleep(1.0)
                if in_flight and time.perf_counter() - last_progress > stall_timeout_s:
                    stalled = True
                    for task in tasks:
                        task.cancel()
                    return

        watch = asyncio.create_task(watchdog())
        await asyncio.gather(*tasks, return_exceptions=True)
        watch.cancel()
        wall = time.perf_counter() - t0
        bar.close()
        after = await client.stats()
    deltas = {
        k: float(v) - float(before.get(k, 0.0))
        for k, v in after.items()
        if isinstance(v, int | float) and k not in GAUGES
    }
    records.sort(key=lambda r: (r.conversation, r.turn))
    return Replay(records, wall, deltas, stalled)
