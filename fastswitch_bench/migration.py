"""The cost of moving a conversation to another node: its KV through the host tier against recomputing it.

One scenario, for each history length, on a two-node stack (one request at a time per node, the
default model): a conversation's first turn leaves its KV on node A; A then runs a long request and
node B a short one; the conversation's second turn arrives at A, its home, and waits. When B idles,
the fleet moves the turn to B: with `--migration host` its KV goes A device -> A host -> pulled into
B's host -> B device; with `--migration recompute` it is dropped and B prefills the whole history.
Both modes run the same scenario on stacks that differ only in that setting.

Reported per history length and mode: the turn's TTFT and its phases (`swap_in` covers the pull and the
copy onto B's device; `prefill` the recomputation), the bytes each copy moved and the pull's time.

    python -m fastswitch_bench.migration --history 256 1024 2048 --out docs/results/migration
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import tempfile
import time
from typing import Any

from fastswitch import AsyncClient, Client
from fastswitch.client import Completion

SENTENCE = "The river winds past old mills, stone bridges and quiet orchards before it reaches the sea. "
COUNTERS = (
    "swap_pull_bytes",
    "migration_pull_s",
    "swap_out_bytes",
    "swap_in_bytes",
    "migrations_staged",
    "migrations_host",
    "migrations_landed",
    "migrations_recompute",
    "migration_recomputed_tokens",
)
STACK = dict(executors=2, max_running=1, threads=1, device_blocks=640, host_blocks=640, max_step_tokens=256)


async def _until_running(client: AsyncClient, node: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await client.stats())["executors"][node]["running"] == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node} never ran a request")
        await asyncio.sleep(0.02)


async def _idle(client: AsyncClient, timeout_s: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await client.stats()
        if not stats["running"] and not stats["waiting"] and not stats["swaps_in_flight"]:
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError("the stack did not go idle")
        await asyncio.sleep(0.05)


async def scenario(addr: str, history: int, tag: str) -> dict[str, Any]:
    """One conversation moved from its busy home to the idle node; its second turn's costs."""
    conv = f"{tag}-{history}"
    async with AsyncClient(addr, timeout=600) as client:
        first = await client.complete(
            SENTENCE * max(1, history // 18) + "Summarise this in one line.",
            chat=True, max_tokens=4, conversation_id=conv, tenant="bench",
        )  # fmt: skip
        nodes = (await client.stats())["executors"]
        home = max(range(len(nodes)), key=lambda i: nodes[i]["kept_conversations"])
        other = 1 - home
        before = await client.stats()
        short = asyncio.create_task(client.complete("Count to ten.", max_tokens=8, ignore_eos=True))
        await _until_running(client, other)  # the node without the kept KV has more room
        long = asyncio.create_task(client.complete("Tell a long story.", max_tokens=400, ignore_eos=True))
        await _until_running(client, home)
        sent = time.perf_counter()
        ttft = None
        answer = Completion(request_id="", text="")
        async for chunk in client.generate(
            "And in one word?", chat=True, max_tokens=4, conversation_id=conv, tenant="bench"
        ):
            if ttft is None and chunk.token_ids:
                ttft = time.perf_counter() - sent
            answer.add(chunk)
        total = time.perf_counter() - sent
        long_still_running = not long.done()
        long.cancel()  # (it only kept the turn's home busy)
        await asyncio.gather(short, long, return_exceptions=True)
        after = await _idle(client)
        await client.end_conversation(conv, tenant="bench")
    return {
        "history_tokens": first.prompt_tokens + len(first.token_ids),
        "turn_prompt_tokens": answer.prompt_tokens,
        "reused_prefix_tokens": answer.reused_prefix_tokens,
        "ttft_s": ttft,
        "latency_s": total,
        "moved_before_home_was_free": long_still_running,
        "phases": answer.phases,
        **{k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS},
    }


def run(histories: list[int], out: pathlib.Path, repeats: int) -> dict[str, Any]:
    from fastswitch_bench.runner import machine
    from svc_common.stack import Stack, StackConfig, free_port_base

    results: dict[str, Any] = {"machine": machine(), "stack": STACK, "runs": []}
    for mode in ("host", "recompute"):
        config = StackConfig.build(port=free_port_base(2), migration=mode, dtype="float32", **STACK)  # type: ignore[arg-type]
        stack = Stack(config, log_dir=tempfile.mkdtemp(prefix=f"fastswitch-migration-{mode}-"))  # not the results
        stack.start(timeout_s=600)
        try:
            with Client(stack.addr) as client:
                client.complete("Hello.", max_tokens=2)  # warm both the model and the links
            for history in histories:
                for r in range(repeats):
                    row = {"mode": mode, "repeat": r, **asyncio.run(scenario(stack.addr, history, f"{mode}{r}"))}
                    print(json.dumps(row), flush=True)
                    results["runs"].append(row)
        finally:
            stack.stop()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report(results))
    return results


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def report(results: dict[str, Any]) -> str:
    rows = results["runs"]
    lines = [
        "# Moving a conversation to another node: KV through the host tier vs recompute",
        "",
        "`python -m fastswitch_bench.migration` (two nodes, one request at a time each, SmolLM2-135M fp32 on CPU, "
        f"{results['machine']['cpu_count']} CPUs, load at start {results['machine']['load_avg_at_start']}); "
        "medians over repeats. TTFT counts from the turn's arrival at its busy home, so it includes waiting for "
        "the other node to finish its short request (the same in both modes).",
        "",
        "| history tokens | mode | TTFT s | swap_in phase s | prefill phase s | pulled MiB | pull s | "
        "staged out MiB | swapped in MiB | recomputed tokens | TTFT recompute / host |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for history in sorted({r["history_tokens"] for r in rows}):
        ttft = {}
        for mode in ("host", "recompute"):
            runs = [r for r in rows if r["history_tokens"] == history and r["mode"] == mode]
            if not runs:
                continue
            ttft[mode] = _median([r["ttft_s"] for r in runs])

            def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
                return _median([float(r[key]) for r in runs])

            swap_in = _median([r["phases"].get("swap_in", 0.0) for r in runs])
            prefill = _median([r["phases"].get("prefill", 0.0) for r in runs])
            ratio = f"{ttft['recompute'] / ttft['host']:.2f}x" if mode == "recompute" and "host" in ttft else ""
            lines.append(
                f"| {history} | {mode} | {ttft[mode]:.3f} | {swap_in:.3f} | {prefill:.3f} | "
                f"{med('swap_pull_bytes') / 2**20:.1f} | {med('migration_pull_s'):.3f} | "
                f"{med('swap_out_bytes') / 2**20:.1f} | {med('swap_in_bytes') / 2**20:.1f} | "
                f"{med('migration_recomputed_tokens'):.0f} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, nargs="+", default=[256, 1024, 2048], help="first-turn prompt tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-results/migration")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(report(run(args.history, pathlib.Path(args.out), args.repeats)))


if __name__ == "__main__":
    main()
