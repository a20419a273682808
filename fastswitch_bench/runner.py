"""`fastswitch bench`: every mode replays the same multi-turn workload; tails, ratios, plots.

One run: draw (or load) a workload (`workload.py`) and save it as `workload.json`, then replay it once
per mode. Each stack mode starts its own stack (the `fastswitch up` code path) with that mode's
settings, or targets `--addr`, and replays the conversations open-loop: conversation arrivals at
their drawn times, each next turn after the previous answer plus its think time, every turn with
`conversation_id` + `chat` so the server keeps history and KV, `ignore_eos` with `max_tokens` = the
drawn answer length so every mode generates the same tokens. The `transformers-cb` peer runs
in-process after the stacks have stopped (no two modes share the CPU); it has no conversations and
no priorities, so it replays turn k of every conversation as wave k (`peer.py`).

Outputs under `--out`: results.json (`{"modes", "workload", "machine"}`), results.md, requests.json
(every request of every mode), ttft_cdf.png, tbt_cdf.png, throughput.png, logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import platform
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from fastswitch_bench.workload import SOURCES, Workload, WorkloadSpec, generate, hf_token_counter

# -- presets and modes --------------------------------------------------------------------------------


@dataclass(slots=True)
class Preset:
    """A workload spec plus the stack settings it runs under (the same for every stack mode)."""

    workload: WorkloadSpec
    device_blocks: int
    host_blocks: int
    max_running: int
    max_step_tokens: int
    block_size: int = 16
    policy: str = "priority"


PRESETS: dict[str, Preset] = {
    # Smoke test: 3 short conversations of 2-3 turns, ShareGPT's lengths scaled by 1/30.
    "tiny": Preset(
        WorkloadSpec(
            conversations=3,
            rate_per_s=4.0,
            min_turns=2,
            max_turns=3,
            mean_turns=2.5,
            scale=30.0,  # means of 5.4 and 11.3 tokens
            min_input_tokens=2,
            max_input_tokens=24,
            max_output_tokens=16,
            think_mean_s=0.1,
            tenants=2,
            priority_updates="random",
            priority_update_prob=0.05,
        ),
        device_blocks=48,
        host_blocks=256,
        max_running=8,
        max_step_tokens=256,
    ),
    # The issue's preset: all seven modes in under 5 minutes on 2 CPU cores. ShareGPT's lengths scaled by
    # 1/32 (means of 5.0 and 10.6 tokens); the pool (512 tokens) holds about a third of the
    # conversations' final contexts, so turns preempt each other and kept KV spills to the host.
    "small": Preset(
        WorkloadSpec(
            conversations=8,
            rate_per_s=3.0,
            min_turns=1,
            max_turns=12,
            scale=32.0,
            min_input_tokens=2,
            max_input_tokens=24,
            min_output_tokens=4,
            max_output_tokens=32,
            think_mean_s=0.25,
            tenants=4,
            priority_updates="random",
            priority_update_prob=0.02,
        ),
        device_blocks=32,
        host_blocks=1024,
        max_running=16,
        max_step_tokens=256,
    ),
    # Issue 4's comparison of KV reuse on and off (`--modes fastswitch,no-reuse`): long user turns
    # (ShareGPT's input mean halved) and short answers (its output mean / 16), so that later turns
    # carry a long history. The pool (2,048 tokens) holds about half of the conversations' final
    # contexts: idle conversations' KV spills to the host between turns.
    "reuse": Preset(
        WorkloadSpec(
            conversations=6,
            rate_per_s=0.5,
            max_turns=10,
            input_mean_tokens=80.0,
            output_mean_tokens=21.0,
            min_input_tokens=8,
            max_input_tokens=256,
            min_output_tokens=4,
            max_output_tokens=48,
            think_mean_s=1.0,
            tenants=3,
            priority_updates="random",
            priority_update_prob=0.02,
        ),
        device_blocks=128,
        host_blocks=1024,
        max_running=16,
        max_step_tokens=256,
    ),
    # For a GPU (not runnable on 2 CPU cores): ShareGPT's lengths unscaled, 200 conversations.
    "gpu": Preset(
        WorkloadSpec(
            conversations=200,
            rate_per_s=2.0,
            min_turns=1,
            max_turns=20,
            scale=1.0,
            min_input_tokens=4,
            max_input_tokens=1024,
            min_output_tokens=4,
            max_output_tokens=1024,
            think_mean_s=2.0,
            tenants=8,
            priority_updates="random",
            priority_update_prob=0.02,
        ),
        device_blocks=4096,
        host_blocks=65536,
        max_running=128,
        max_step_tokens=2048,
    ),
}

# StackConfig overrides per mode; `fastswitch` is StackConfig's defaults (swap + groups + async + reuse).
STACK_MODES: dict[str, dict[str, Any]] = {
    "fastswitch": {},
    "no-groups": {"block_groups": False},
    "no-async": {"async_swaps": False},
    "no-reuse": {"kv_reuse": False},
    "vllm-like": {"preemption": "vllm-like"},  # per-block-per-layer sync copies, no reuse
    "recompute": {"preemption": "recompute"},
}
PEER_MODES = ("transformers-cb",)
ALL_MODES = (*STACK_MODES, *PEER_MODES)
BASELINE = "vllm-like"

PERCENTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))
TAIL_PREFIXES = ("ttft", "tbt", "first_ttft", "later_ttft")
TAIL_KEYS = tuple(f"{prefix}_{name}" for prefix in TAIL_PREFIXES for name, _ in PERCENTILES)
RATIO_KEYS = (*TAIL_KEYS, "throughput_tok_s")
COUNTER_KEYS = (
    "preemptions",
    "swap_out_bytes",
    "swap_in_bytes",
    "copy_calls",
    "swap_stall_s",
    "recomputed_tokens",
    "reused_prefix_tokens",
    "swap_out_bytes_saved",
    "recomputed_prefix_tokens",
    "priority_changes",
)
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
PEER_NOTES = (
    "transformers-cb has no priorities and no conversations: turn k of every conversation runs as wave k "
    "(a closed batch on one continuous-batching manager), its history built from the peer's own outputs; "
    "arrival times and think times are not replayed, so its latencies are closed-batch latencies measured "
    "from each wave's submission."
)


# -- per-request records and their summary --------------------------------------------------------------


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
    error: str | None = None


def percentiles(values: list[float], prefix: str) -> dict[str, float]:
    """P50/P95/P99/P99.9 (linear interpolation); NaN when there are no values."""
    return {f"{prefix}_{name}": float(np.percentile(values, q)) if values else float("nan") for name, q in PERCENTILES}


def summarise(records: list[RequestRecord], wall_s: float, counters: dict[str, float]) -> dict[str, Any]:
    """A mode's figures from its requests, the replay's wall time and the server's counter deltas."""
    ok = [r for r in records if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    first = [r.ttft_s for r in ok if r.ttft_s is not None and r.turn == 1]
    later = [r.ttft_s for r in ok if r.ttft_s is not None and r.turn >= 2]
    tbt = [gap for r in ok for gap in r.tbt_s]
    tokens = sum(r.tokens for r in records)
    c = {key: float(counters.get(key, 0.0)) for key in COUNTER_KEYS}
    out: dict[str, Any] = {
        **percentiles(ttft, "ttft"),
        **percentiles(tbt, "tbt"),
        **percentiles(first, "first_ttft"),
        **percentiles(later, "later_ttft"),
        "throughput_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "generated_tokens": tokens,
        "requests": len(records),
        "failed_requests": len(records) - len(ok),
        "wall_s": wall_s,
        "preemptions": c["preemptions"],
        "swap_bytes": c["swap_out_bytes"] + c["swap_in_bytes"],
        "swap_out_bytes": c["swap_out_bytes"],
        "swap_in_bytes": c["swap_in_bytes"],
        "swap_out_bytes_saved": c["swap_out_bytes_saved"],
        "copy_calls": c["copy_calls"],
        "swap_stall_s": c["swap_stall_s"],
        "swap_stall_share": c["swap_stall_s"] / wall_s if wall_s > 0 else 0.0,
        "recomputed_tokens": c["recomputed_tokens"],
        "recomputed_prefix_tokens": c["recomputed_prefix_tokens"],
        "reused_prefix_tokens": c["reused_prefix_tokens"],
        "priority_changes": c["priority_changes"],
        "tenants": {},
    }
    for tenant in sorted({r.tenant for r in records}):
        mine = [r for r in ok if r.tenant == tenant]
        out["tenants"][tenant] = {
            "requests": len(mine),
            "generated_tokens": sum(r.tokens for r in mine),
            **percentiles([r.ttft_s for r in mine if r.ttft_s is not None], "ttft"),
        }
    return out


def add_ratios(modes: dict[str, dict[str, Any]], baseline: str = BASELINE) -> None:
    """`ratios_vs_vllm_like` in every mode: baseline / ours for latencies (> 1: ours is faster), ours /
    baseline for throughput (> 1: ours serves more). None where the baseline did not run or a figure is
    missing."""
    base = modes.get(baseline)
    for m in modes.values():
        ratios: dict[str, float | None] = {}
        for key in RATIO_KEYS:
            ours, theirs = m.get(key), base.get(key) if base else None
            if ours is None or theirs is None or _bad(ours) or _bad(theirs):
                ratios[key] = None
            elif key == "throughput_tok_s":
                ratios[key] = ours / theirs
            else:
                ratios[key] = theirs / ours
        m["ratios_vs_vllm_like"] = ratios


def _bad(x: float) -> bool:
    return not isinstance(x, int | float) or math.isnan(x) or x <= 0


# -- replaying against a stack --------------------------------------------------------------------------


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

    from fastswitch.client import AsyncClient, FastSwitchError

    nonce = uuid.uuid4().hex[:8]  # conversation ids unique per replay, even against a long-running stack
    records: list[RequestRecord] = []
    in_flight = 0
    last_progress = time.perf_counter()
    async with AsyncClient(addr) as client:
        await client.complete("Hello", max_tokens=2)  # warm-up: the first forward passes are slow
        before = await client.stats()
        bar = tqdm(total=workload.num_requests, desc=f"  {label}", unit="req", leave=False, disable=not progress)
        t0 = time.perf_counter()

        async def turn(conversation_id: str, conv: Any, k: int) -> RequestRecord:
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

        async def conversation(conv: Any) -> None:
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


def stack_config(mode: str, preset: Preset, workload: Workload) -> Any:
    from svc_common.stack import StackConfig, free_port_base

    return StackConfig.build(
        port=free_port_base(),
        block_size=preset.block_size,
        device_blocks=preset.device_blocks,
        host_blocks=preset.host_blocks,
        max_running=preset.max_running,
        max_step_tokens=preset.max_step_tokens,
        policy=preset.policy,
        priority_updates=workload.spec.priority_updates,
        priority_update_prob=workload.spec.priority_update_prob,
        **STACK_MODES[mode],
    )


def run_stack_mode(
    mode: str,
    preset: Preset,
    workload: Workload,
    out: pathlib.Path,
    addr: str | None,
    progress: bool,
    stall_timeout_s: float = 60.0,
) -> tuple[dict[str, Any], list[RequestRecord]]:
    if addr:
        r = asyncio.run(replay(addr, workload, mode, progress, stall_timeout_s))
        notes = f"replayed against a running stack at {addr}: its own settings apply, not this mode's"
    else:
        from svc_common.stack import Stack

        config = stack_config(mode, preset, workload)
        with Stack(config, log_dir=str(out / "logs" / mode)) as stack:
            r = asyncio.run(replay(stack.addr, workload, mode, progress, stall_timeout_s))
        sc = config.scheduler
        notes = (
            f"stack: preemption={sc.preemption}, block_groups={sc.block_groups}, "
            f"async_swaps={sc.async_swaps}, kv_reuse={sc.kv_reuse}, policy={sc.policy}"
        )
    result = summarise(r.records, r.wall_s, r.counters)
    result["unfinished_requests"] = workload.num_requests - (result["requests"] - result["failed_requests"])
    result["stalled"] = r.stalled
    if r.stalled:
        notes += f"; STALLED: no token for {stall_timeout_s:.0f} s with requests in flight, replay cut short"
    result["notes"] = notes
    result["server_stats"] = r.counters
    return result, r.records


def run_peer_mode(
    model_dir: str, tokenizer: Any, preset: Preset, workload: Workload, progress: bool
) -> tuple[dict[str, Any], list[RequestRecord]]:
    from tqdm.auto import tqdm

    from fastswitch_bench.peer import run_transformers_cb_conversations

    convs = workload.conversations
    bar = tqdm(total=workload.num_requests, desc="  transformers-cb", unit="req", leave=False, disable=not progress)
    result = run_transformers_cb_conversations(
        model_dir,
        tokenizer,
        [[(t.prompt, t.max_tokens) for t in c.turns] for c in convs],
        max_batch_tokens=preset.max_step_tokens,
        on_turn=lambda _: bar.update(1),
    )
    bar.close()
    records = [
        RequestRecord(
            conversation=convs[t.conversation].conversation_id,
            turn=t.turn,
            tenant=convs[t.conversation].tenant,
            priority=convs[t.conversation].priority,
            tokens=len(t.output),
            ttft_s=t.ttft_s,
            tbt_s=t.tbt_s,
            start_s=t.start_s,
            end_s=t.end_s,
            prompt_tokens=t.prompt_tokens,
        )
        for t in result.turns
    ]
    summary = summarise(records, result.wall_s, {})
    summary["unfinished_requests"] = 0
    summary["stalled"] = False
    summary["notes"] = PEER_NOTES
    summary["server_stats"] = {}
    return summary, records


# -- the run --------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": list(os.getloadavg()),
    }


def parse_modes(spec: str | None) -> list[str]:
    modes = [m.strip() for m in spec.split(",") if m.strip()] if spec else list(ALL_MODES)
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {', '.join(ALL_MODES)}")
    # stack modes first (in the contract's order), the in-process peer last, once the stacks are stopped
    return [m for m in ALL_MODES if m in modes]


def build_workload(preset: Preset, tokenizer: Any, tokenizer_name: str, **overrides: Any) -> Workload:
    spec = replace(preset.workload, **{k: v for k, v in overrides.items() if v is not None})
    return generate(spec, hf_token_counter(tokenizer), tokenizer_name)


def run(
    preset_name: str,
    modes: list[str] | None,
    out: pathlib.Path,
    addr: str | None = None,
    workload_path: str | None = None,
    progress: bool = True,
    stall_timeout_s: float = 60.0,
    device_blocks: int | None = None,
    host_blocks: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run `modes` (default: all) on one workload; write results.json/.md, requests.json and plots to out.

    `overrides` replace fields of the preset's WorkloadSpec (seed, conversations, rate_per_s, ...);
    `device_blocks` / `host_blocks` the preset's pool sizes."""
    modes = parse_modes(",".join(modes) if modes else None)
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    from transformers import AutoTokenizer

    from svc_common.model_source import resolve_model

    preset = PRESETS[preset_name]
    if device_blocks is not None:
        preset = replace(preset, device_blocks=device_blocks)
    if host_blocks is not None:
        preset = replace(preset, host_blocks=host_blocks)
    model_dir = str(resolve_model(None))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if workload_path:
        workload = Workload.load(workload_path)
    else:
        workload = build_workload(preset, tokenizer, pathlib.Path(model_dir).name, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    workload.save(out / "workload.json")
    results: dict[str, Any] = {
        "modes": {},
        "workload": {
            "preset": preset_name,
            "file": str(out / "workload.json"),
            "replayed_from": workload_path,
            "spec": asdict(workload.spec),
            "summary": workload.summary(),
            "stack": {k: v for k, v in asdict(preset).items() if k != "workload"},
            "sources": SOURCES,
            "notes": "stack modes: open-loop replay (Poisson arrivals, think time after each answer), "
            "chat conversations kept by the server, ignore_eos with max_tokens = the drawn answer length. "
            + PEER_NOTES,
        },
        "machine": machine(),
    }
    requests: dict[str, list[dict[str, Any]]] = {}
    summary = workload.summary()
    started = time.perf_counter()
    for mode in modes:
        print(
            f"[bench] {mode}: {summary['conversations']} conversations, {summary['requests']} requests, "
            f"{summary['total_output_tokens']} tokens",
            flush=True,
        )
        t = time.perf_counter()
        if mode in PEER_MODES:
            result, records = run_peer_mode(model_dir, tokenizer, preset, workload, progress)
        else:
            result, records = run_stack_mode(mode, preset, workload, out, addr, progress, stall_timeout_s)
        result["mode_total_s"] = time.perf_counter() - t  # start-up and shut-down included
        result["load_avg_1m"] = os.getloadavg()[0]  # others' work on the machine makes timings noisy
        results["modes"][mode] = result
        requests[mode] = [asdict(r) for r in records]
        print(
            f"[bench] {mode}: {result['throughput_tok_s']:.1f} tok/s, TTFT p99 {result['ttft_p99']:.2f} s, "
            f"TBT p99.9 {result['tbt_p999']:.3f} s, {result['preemptions']:.0f} preemptions "
            f"({result['mode_total_s']:.0f} s){' STALLED' if result['stalled'] else ''}",
            flush=True,
        )
    add_ratios(results["modes"])
    results["workload"]["bench_total_s"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    write_json(out / "requests.json", requests)
    (out / "results.md").write_text(markdown(results))
    plot(results, requests, out)
    return results


def _clean(x: Any) -> Any:
    """NaN/inf -> None, so the files are strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_json(path: pathlib.Path, data: Any) -> None:
    path.write_text(json.dumps(_clean(data), indent=1) + "\n")


# -- report ---------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _x(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(results: dict[str, Any]) -> str:
    """Three tables: latency tails and throughput, ratios vs vllm-like, context-switch cost."""
    modes = results["modes"]
    w = results["workload"]["summary"]
    lines = [
        f"Workload: {w['conversations']} conversations, {w['requests']} requests ({w['mean_turns']:.2f} turns "
        f"on average), {w['total_output_tokens']} generated tokens per mode.",
        "",
        "| mode | tok/s | TTFT p50 s | TTFT p95 s | TTFT p99 s | TTFT p99.9 s | later-turn TTFT p99 s | "
        "TBT p50 s | TBT p99 s | TBT p99.9 s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        lines.append(
            f"| {name} | {_f(m['throughput_tok_s'], '.1f')} | {_f(m['ttft_p50'])} | {_f(m['ttft_p95'])} | "
            f"{_f(m['ttft_p99'])} | {_f(m['ttft_p999'])} | {_f(m['later_ttft_p99'])} | {_f(m['tbt_p50'])} | "
            f"{_f(m['tbt_p99'])} | {_f(m['tbt_p999'])} | {_f(m['wall_s'], '.1f')} |"
        )
    lines += [
        "",
        f"Ratios vs {BASELINE} (latency: {BASELINE} / mode, throughput: mode / {BASELINE}; > 1 is better):",
        "",
        "| mode | throughput | TTFT p95 | TTFT p99 | TTFT p99.9 | later-turn TTFT p99 | TBT p99 | TBT p99.9 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        r = m["ratios_vs_vllm_like"]
        lines.append(
            f"| {name} | {_x(r['throughput_tok_s'])} | {_x(r['ttft_p95'])} | {_x(r['ttft_p99'])} | "
            f"{_x(r['ttft_p999'])} | {_x(r['later_ttft_p99'])} | {_x(r['tbt_p99'])} | {_x(r['tbt_p999'])} |"
        )
    lines += [
        "",
        "| mode | preemptions | swap out MB | swap in MB | copy calls | swap stall s | stall share | "
        "recomputed tokens | reused prefix tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        lines.append(
            f"| {name} | {m['preemptions']:.0f} | {m['swap_out_bytes'] / 1e6:.1f} | {m['swap_in_bytes'] / 1e6:.1f} | "
            f"{m['copy_calls']:.0f} | {m['swap_stall_s']:.2f} | {100 * m['swap_stall_share']:.1f}% | "
            f"{m['recomputed_tokens']:.0f} | {m['reused_prefix_tokens']:.0f} |"
        )
    for name, m in modes.items():
        if m.get("stalled") or m.get("failed_requests"):
            lines += [
                "",
                f"**{name}: {m.get('failed_requests', 0)} requests failed, {m.get('unfinished_requests', 0)} never "
                f"finished{' (the server stalled; replay cut short)' if m.get('stalled') else ''}: its figures "
                "cover only what completed.**",
            ]
    if any(m in modes for m in PEER_MODES):
        lines += ["", f"Note: {PEER_NOTES}"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], requests: dict[str, list[dict[str, Any]]], out: pathlib.Path) -> None:
    """ttft_cdf.png and tbt_cdf.png (one line per mode, log x) and throughput.png (bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("[bench] matplotlib is not installed: no plots (pip install matplotlib)")
        return
    modes = list(results["modes"])
    for metric, title in (("ttft", "time to first token"), ("tbt", "time between tokens")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for mode in modes:
            if metric == "ttft":
                values = [r["ttft_s"] for r in requests[mode] if r["ttft_s"] is not None and r["error"] is None]
            else:
                values = [g for r in requests[mode] if r["error"] is None for g in r["tbt_s"]]
            values = sorted(v for v in values if v > 0)
            if values:
                ys = np.arange(1, len(values) + 1) / len(values)
                ax.step(values, ys, where="post", label=mode, lw=2.2 if mode in ("fastswitch", BASELINE) else 1.2)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("seconds (log)")
        ax.set_ylabel("fraction of requests" if metric == "ttft" else "fraction of tokens")
        ax.set_title(f"CDF of {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{metric}_cdf.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    values = [results["modes"][m]["throughput_tok_s"] for m in modes]
    colors = ["#2b7bba" if m == "fastswitch" else "#e07b39" if m == BASELINE else "#999999" for m in modes]
    ax.bar(modes, values, color=colors)
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Throughput (same workload, every mode)")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    started = time.perf_counter()
    results = run(
        args.preset,
        args.modes.split(",") if args.modes else None,
        out,
        addr=args.addr,
        workload_path=args.workload,
        progress=not args.no_progress,
        stall_timeout_s=args.stall_timeout,
        device_blocks=args.device_blocks,
        host_blocks=args.host_blocks,
        seed=args.seed,
        conversations=args.conversations,
        rate_per_s=args.rate,
        priority_updates=args.priority_updates,
        priority_update_prob=args.priority_update_prob,
    )
    if args.json:
        write_json(pathlib.Path(args.json), results)
    print(markdown(results))
    print(
        f"results in {out}/ (results.json, results.md, requests.json, workload.json, ttft_cdf.png, tbt_cdf.png, "
        f"throughput.png); total {time.perf_counter() - started:.0f} s"
    )
    return 0
