"""What the HTTP front costs: one workload replayed through the gRPC SDK and through the OpenAI API.

    python -m fastswitch_bench.http_overhead [--preset small] [--rounds 4] [--out docs/results/http]

One stack (the `fastswitch up --http-port` code path, the preset's settings) serves both paths, so
both meet the same scheduler, executor and machine. The paths alternate in ABBA order, round after
round (gRPC, HTTP, HTTP, gRPC, ...), after one unmeasured warm-up replay, so that a change in the
machine's load during the run falls on both. Each replay is the bench's open-loop multi-turn replay
(Poisson arrivals, think time, server-kept conversations, `ignore_eos` with the drawn answer
lengths, tenants, priorities); the HTTP path sends each turn with the official `openai` client
(streaming chat completions, `conversation_id`, `user`, `priority`), the gRPC path with the SDK's
AsyncClient. Client-side TTFT is the time to the first token's text.

The scheduler's own TTFT histogram is scraped before and after every replay: its mean over the
replay's requests, subtracted from the client's mean over the same requests, is the time the
transport adds (gRPC alone, or HTTP + the front + gRPC), free of queueing noise, which both share.

Writes results.json, results.md and ttft_cdf.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from fastswitch_bench.presets import PRESETS
from fastswitch_bench.replay import RequestRecord
from fastswitch_bench.report import summarise
from fastswitch_bench.runner import build_workload, machine
from fastswitch_bench.workload import Workload

PATHS = ("grpc", "http")
TTFT = "fastswitch_time_to_first_token_seconds"
HTTP_TTFT = "fastswitch_http_time_to_first_token_seconds"


@dataclass(slots=True)
class Replay:
    path: str
    round: int
    records: list[RequestRecord]
    wall_s: float
    server_ttft_sum_s: float  # the scheduler's TTFT histogram over this replay's requests
    server_ttft_count: int
    front_ttft_sum_s: float  # the HTTP front's (HTTP path only)
    front_ttft_count: int


def _histogram_sums(text: str, name: str, tenants: set[str] | None) -> tuple[float, int]:
    total, count = 0.0, 0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if tenants is not None and s.labels.get("tenant") not in tenants:
                continue
            if s.name == f"{name}_sum":
                total += s.value
            elif s.name == f"{name}_count":
                count += int(s.value)
    return total, count


def _delta(after: str, before: str, name: str, tenants: set[str] | None) -> tuple[float, int]:
    (total, count), (total0, count0) = _histogram_sums(after, name, tenants), _histogram_sums(before, name, tenants)
    return total - total0, count - count0


async def _scrape(grpc_client: Any, http_url: str) -> str:
    import urllib.request

    def front() -> str:
        with urllib.request.urlopen(f"{http_url}/metrics", timeout=30) as resp:
            return resp.read().decode()

    return await asyncio.to_thread(front)


async def replay(path: str, round_no: int, addr: str, http_url: str, model: str, workload: Workload) -> Replay:
    """Replay the workload open-loop through one path."""
    import openai

    from fastswitch.client import AsyncClient

    nonce = uuid.uuid4().hex[:8]
    tenants = {c.tenant for c in workload.conversations}
    records: list[RequestRecord] = []
    async with (
        AsyncClient(addr) as client,
        openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0, timeout=600) as api,
    ):
        # Each turn yields (new tokens, whether text came with them): TTFT and TBT are timed on text.
        async def grpc_turn(conversation_id: str, conv: Any, t: Any) -> AsyncIterator[tuple[int, bool]]:
            async for chunk in client.generate(
                t.prompt, chat=True, conversation_id=conversation_id, tenant=conv.tenant, priority=conv.priority,
                max_tokens=t.max_tokens, ignore_eos=True,
            ):  # fmt: skip
                yield len(chunk.token_ids), bool(chunk.text)

        async def http_turn(conversation_id: str, conv: Any, t: Any) -> AsyncIterator[tuple[int, bool]]:
            stream = await api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": t.prompt}], max_tokens=t.max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True}, user=conv.tenant,
                extra_body={"conversation_id": conversation_id, "priority": -conv.priority, "ignore_eos": True},
            )  # fmt: skip
            counted = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    counted += 1
                    yield 1, True
                elif chunk.usage is not None:  # the last chunk: tokens whose text came with a later one
                    yield chunk.usage.completion_tokens - counted, False

        async def end(conversation_id: str, tenant: str) -> None:
            if path == "grpc":
                await client.end_conversation(conversation_id, tenant=tenant)
            else:
                await api.delete(f"/conversations/{conversation_id}?user={tenant}", cast_to=object)

        send: Callable[..., AsyncIterator[tuple[int, bool]]] = grpc_turn if path == "grpc" else http_turn
        before = await _scrape(client, http_url)
        t0 = time.perf_counter()

        async def conversation(conv: Any) -> None:
            await asyncio.sleep(max(0.0, t0 + conv.arrival_s - time.perf_counter()))
            conversation_id = f"ovh-{nonce}-{conv.conversation_id}"
            for k, t in enumerate(conv.turns, start=1):
                if k > 1:
                    await asyncio.sleep(t.think_s)
                rec = RequestRecord(conv.conversation_id, k, conv.tenant, conv.priority)
                start = time.perf_counter()
                rec.start_s, last = start - t0, None
                try:
                    async for n, text in send(conversation_id, conv, t):
                        now = time.perf_counter()
                        rec.tokens += n
                        if not text:
                            continue
                        if last is None:
                            rec.ttft_s = now - start
                        else:
                            rec.tbt_s.append(now - last)
                        last = now
                except Exception as err:  # noqa: BLE001 - recorded; the replay goes on
                    rec.error = f"{type(err).__name__}: {err}"
                rec.end_s = time.perf_counter() - t0
                records.append(rec)
                if rec.error:
                    break
            try:
                await end(conversation_id, conv.tenant)
            except Exception:  # noqa: BLE001 - nothing kept
                pass

        await asyncio.gather(*(conversation(c) for c in workload.conversations))
        wall = time.perf_counter() - t0
        after = await _scrape(client, http_url)
    s_sum, s_count = _delta(after, before, TTFT, tenants)
    f_sum, f_count = _delta(after, before, HTTP_TTFT, None)
    records.sort(key=lambda r: (r.conversation, r.turn))
    return Replay(path, round_no, records, wall, s_sum, s_count, f_sum, f_count)


def summary(replays: list[Replay]) -> dict[str, Any]:
    """One path's figures over all its rounds (TTFT/TBT pooled; throughput = tokens / replay time)."""
    records = [r for rep in replays for r in rep.records]
    wall = sum(rep.wall_s for rep in replays)
    out = summarise(records, wall, {})
    ttft = [r.ttft_s for r in records if r.ttft_s is not None]
    server_count = sum(rep.server_ttft_count for rep in replays)
    out["client_ttft_mean"] = float(np.mean(ttft)) if ttft else float("nan")
    out["server_ttft_mean"] = sum(rep.server_ttft_sum_s for rep in replays) / max(server_count, 1)
    out["server_ttft_count"] = server_count
    out["transport_added_ttft_mean"] = out["client_ttft_mean"] - out["server_ttft_mean"]
    front_count = sum(rep.front_ttft_count for rep in replays)
    if front_count:
        out["front_ttft_mean"] = sum(rep.front_ttft_sum_s for rep in replays) / front_count
    out["rounds"] = [
        {
            "round": rep.round,
            "ttft_p50": float(np.percentile([r.ttft_s for r in rep.records if r.ttft_s is not None], 50)),
            "throughput_tok_s": sum(r.tokens for r in rep.records) / rep.wall_s,
            "wall_s": rep.wall_s,
        }
        for rep in replays
    ]
    return out


def run(
    preset_name: str, rounds: int, out: pathlib.Path, http_port: int = 0, seed: int | None = None
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from svc_common.model_source import model_name, resolve_model
    from svc_common.stack import Stack, StackConfig, free_port_base

    preset = PRESETS[preset_name]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    workload = build_workload(preset, tokenizer, model_name(None), **({"seed": seed} if seed is not None else {}))
    out.mkdir(parents=True, exist_ok=True)
    workload.save(out / "workload.json")
    if not http_port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            http_port = s.getsockname()[1]
    config = StackConfig.build(
        port=free_port_base(), http_port=http_port, block_size=preset.block_size,
        device_blocks=preset.device_blocks, host_blocks=preset.host_blocks, max_running=preset.max_running,
        max_step_tokens=preset.max_step_tokens, policy=preset.policy,
        priority_updates=workload.spec.priority_updates, priority_update_prob=workload.spec.priority_update_prob,
    )  # fmt: skip
    order = [p for r in range(rounds) for p in (PATHS if r % 2 == 0 else PATHS[::-1])]  # ABBA...
    replays: list[Replay] = []
    with Stack(config, log_dir=str(out / "logs")) as stack:
        assert stack.http_url is not None
        model = model_name(None)

        async def warm_up() -> None:
            from fastswitch.client import AsyncClient

            async with AsyncClient(stack.addr) as client:
                await client.complete("Hello", max_tokens=4)

        asyncio.run(warm_up())
        # One replay that is not measured: the first batches of each shape are slow on a fresh executor.
        asyncio.run(replay("grpc", 0, stack.addr, stack.http_url, model, workload))
        for i, path in enumerate(order):
            rep = asyncio.run(replay(path, i // 2 + 1, stack.addr, stack.http_url, model, workload))
            failed = sum(1 for r in rep.records if r.error)
            print(
                f"[http-overhead] round {rep.round} {path}: {len(rep.records)} requests ({failed} failed), "
                f"{rep.wall_s:.1f} s, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            replays.append(rep)
    paths = {p: summary([r for r in replays if r.path == p]) for p in PATHS}
    g, h = paths["grpc"], paths["http"]
    results = {
        "paths": paths,
        "overhead": {
            "ttft_p50_ratio": h["ttft_p50"] / g["ttft_p50"],
            "ttft_p50_added_pct": 100 * (h["ttft_p50"] / g["ttft_p50"] - 1),
            "throughput_ratio": h["throughput_tok_s"] / g["throughput_tok_s"],
            "transport_added_ttft_mean_ms": {p: 1000 * paths[p]["transport_added_ttft_mean"] for p in PATHS},
            "front_added_ttft_mean_ms": 1000 * (h["transport_added_ttft_mean"] - g["transport_added_ttft_mean"]),
            "generated_tokens": {p: paths[p]["generated_tokens"] for p in PATHS},
        },
        "workload": {"preset": preset_name, "rounds": rounds, "order": order, "summary": workload.summary()},
        "machine": machine(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(replays, out / "ttft_cdf.png")
    (out / "requests.json").write_text(
        json.dumps({f"{r.path}-{r.round}": [asdict(x) for x in r.records] for r in replays}, indent=1) + "\n"
    )
    return results


def markdown(results: dict[str, Any]) -> str:
    p, o = results["paths"], results["overhead"]
    rows = [
        ("requests (all rounds)", "requests", "{:.0f}"),
        ("failed", "failed_requests", "{:.0f}"),
        ("generated tokens", "generated_tokens", "{:.0f}"),
        ("TTFT P50 (s)", "ttft_p50", "{:.3f}"),
        ("TTFT P95 (s)", "ttft_p95", "{:.3f}"),
        ("TTFT P99 (s)", "ttft_p99", "{:.3f}"),
        ("TBT P50 (s)", "tbt_p50", "{:.4f}"),
        ("TBT P99 (s)", "tbt_p99", "{:.4f}"),
        ("throughput (tok/s)", "throughput_tok_s", "{:.1f}"),
        ("client TTFT mean (s)", "client_ttft_mean", "{:.4f}"),
        ("scheduler TTFT mean, same requests (s)", "server_ttft_mean", "{:.4f}"),
        ("added by the transport, mean (ms)", "transport_added_ttft_mean", "{:.2f}"),
    ]
    lines = ["| | gRPC (SDK) | HTTP (openai client) |", "|---|---:|---:|"]
    for label, key, fmt in rows:
        scale = 1000 if key == "transport_added_ttft_mean" else 1
        lines.append(f"| {label} | {fmt.format(p['grpc'][key] * scale)} | {fmt.format(p['http'][key] * scale)} |")
    per_round = ["| round | path | TTFT P50 (s) | throughput (tok/s) | wall (s) |", "|---:|---|---:|---:|---:|"]
    for path in PATHS:
        for r in p[path]["rounds"]:
            per_round.append(
                f"| {r['round']} | {path} | {r['ttft_p50']:.3f} | {r['throughput_tok_s']:.1f} | {r['wall_s']:.1f} |"
            )
    return "\n".join(
        [
            f"# HTTP front vs gRPC: {results['workload']['preset']} preset, {results['workload']['rounds']} rounds",
            "",
            *lines,
            "",
            f"- P50 TTFT: HTTP / gRPC = {o['ttft_p50_ratio']:.3f} ({o['ttft_p50_added_pct']:+.1f}%)",
            f"- throughput: HTTP / gRPC = {o['throughput_ratio']:.3f}",
            f"- the front's own added TTFT (HTTP transport minus gRPC transport, means): "
            f"{o['front_added_ttft_mean_ms']:.2f} ms",
            "",
            *per_round,
            "",
        ]
    )


def plot(replays: list[Replay], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in (("grpc", "tab:blue"), ("http", "tab:orange")):
        ttft = sorted(r.ttft_s for rep in replays if rep.path == name for r in rep.records if r.ttft_s is not None)
        ax.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=f"{name} ({len(ttft)} requests)", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s), client side")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT through the gRPC SDK and through the HTTP front")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastswitch_bench.http_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--rounds", type=int, default=4, help="replays per path, alternating ABBA")
    parser.add_argument("--seed", type=int, default=None, help="workload seed (default: the preset's)")
    parser.add_argument("--http-port", type=int, default=0, help="the front's port (default: a free one)")
    parser.add_argument("--out", default="bench-results/http", help="results directory")
    args = parser.parse_args(argv)
    results = run(args.preset, args.rounds, pathlib.Path(args.out), args.http_port, args.seed)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
