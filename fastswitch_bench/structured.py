"""Structured output's cost: tokens/s of constrained vs unconstrained requests, side by side, one stack.

    python -m fastswitch_bench.structured                      # batch 1 and 16, 3 rounds, docs/results/structured
    python -m fastswitch_bench.structured --batches 1,4 --rounds 1 --out bench-results/structured

Every mode sends the same prompts as a closed batch (B requests at once, B = each of --batches), greedy,
`ignore_eos`, `max_tokens` N, and waits for all of them: tokens/s = B * N / wall time. The constrained
modes use grammars that cannot complete within N tokens (and so never allow EOS), so every mode
generates exactly the same number of tokens and only the constraint differs:

- `none`: unconstrained;
- `json`: a JSON schema (an array of at least 64 objects with string and integer fields);
- `regex`: words and punctuation, at least 200 of them;
- `allow-all`: a regex that allows any text (the floor: masks are filled and sent, rarely applied).

Modes are interleaved round by round (none, json, regex, allow-all, none, ...) so that drifts in the
machine's load hit all of them alike; the median round is reported. The scheduler's statistics add
how long filling the masks took (`grammar_fill_s`) against the model's forward time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
from typing import Any

MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "json": {
        "json_schema": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "city", "age"],
            },
        }
    },
    "regex": {"regex": r"([A-Za-z]+[ ,.;:]){200,}"},
    "allow-all": {"regex": r"[\s\S]*"},
}
PROMPTS = [
    "List some people you know with their city and age.",
    "Write a short story about a lighthouse keeper.",
    "Describe the water cycle for a child.",
    "Give three tips for learning a new language.",
    "What makes a good cup of coffee?",
    "Explain how a bicycle stays upright.",
    "Describe your ideal weekend.",
    "Write a poem about autumn leaves.",
    "How do bees make honey?",
    "Summarise the plot of a famous novel.",
    "What should a traveller pack for a week in the mountains?",
    "Explain what a database index is.",
    "Describe a busy market in the morning.",
    "Why is the sky blue?",
    "Give advice to someone starting their first job.",
    "Describe the sound of rain on a tin roof.",
]


async def one_batch(addr: str, batch: int, max_tokens: int, constraint: dict[str, Any]) -> tuple[float, int]:
    """(wall seconds, tokens generated) for `batch` requests sent at once."""
    from fastswitch.client import AsyncClient

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    async with AsyncClient(addr) as client:
        start = time.perf_counter()
        done = await asyncio.gather(
            *(client.complete(p, chat=True, max_tokens=max_tokens, ignore_eos=True, **constraint) for p in prompts)
        )
        wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done)
    if any(c.finish_reason != "length" for c in done):
        raise RuntimeError(f"a request ended early ({[c.finish_reason for c in done]}): the timing would be unfair")
    return wall, tokens


def stats(addr: str) -> dict[str, float]:
    from fastswitch.client import Client

    with Client(addr) as client:
        return {k: float(v) for k, v in client.stats().items() if isinstance(v, int | float)}


def run(addr: str, batches: list[int], rounds: int, max_tokens: int) -> dict[str, Any]:
    asyncio.run(one_batch(addr, 2, 4, MODES["json"]))  # warm up: the model, the grammar compiler, the caches
    results: dict[str, Any] = {}
    for batch in batches:
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for r in range(rounds):
            for mode, constraint in MODES.items():
                before = stats(addr)
                wall, tokens = asyncio.run(one_batch(addr, batch, max_tokens, constraint))
                after = stats(addr)
                delta = {
                    k: after.get(k, 0.0) - before.get(k, 0.0)
                    for k in ("grammar_fill_s", "grammar_fills", "steps", "forward_s")
                }
                runs[mode].append({"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, **delta})
                print(f"batch {batch:>2} round {r + 1}/{rounds} {mode:>9}: {tokens / wall:7.1f} tok/s", flush=True)
        summary = {}
        for mode, rs in runs.items():
            median = statistics.median(x["tok_s"] for x in rs)
            fills = sum(x["grammar_fills"] for x in rs)
            summary[mode] = {
                "tok_s": median,
                "tok_s_runs": [x["tok_s"] for x in rs],
                "fill_us_per_mask": 1e6 * sum(x["grammar_fill_s"] for x in rs) / fills if fills else 0.0,
                "fill_share_of_forward": sum(x["grammar_fill_s"] for x in rs)
                / max(1e-9, sum(x["forward_s"] for x in rs)),
                "step_ms": 1e3 * sum(x["wall_s"] for x in rs) / max(1.0, sum(x["steps"] for x in rs)),
            }
        base = summary["none"]["tok_s"]
        for mode in summary:
            summary[mode]["vs_none"] = summary[mode]["tok_s"] / base
        results[str(batch)] = summary
    return results


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Structured output: tokens/s, constrained vs unconstrained",
        "",
        f"`python -m fastswitch_bench.structured` on {data['machine']['cpu_count']} CPU cores "
        f"({data['machine']['processor']}), {data['max_tokens']} tokens per request, median of "
        f"{data['rounds']} interleaved rounds; load average at the start {data['load_avg_1m']:.1f} "
        "(the machine is shared: timings are noisy).",
        "",
        "| batch | mode | tok/s (median) | vs none | runs (tok/s) | mask fill, us/mask | fill / forward time |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, modes in data["batches"].items():
        for mode, m in modes.items():
            runs = ", ".join(f"{x:.1f}" for x in m["tok_s_runs"])
            fill = f"{m['fill_us_per_mask']:.0f}" if mode != "none" else "-"
            share = f"{100 * m['fill_share_of_forward']:.2f}%" if mode != "none" else "-"
            lines.append(f"| {batch} | {mode} | {m['tok_s']:.1f} | {m['vs_none']:.3f} | {runs} | {fill} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default=None, help="a running stack; without it a local one is started")
    parser.add_argument("--model", default="", help="model of the local stack (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per batch size")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--out", default="docs/results/structured", help="results.json and results.md go here")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    load = os.getloadavg()[0]
    if args.addr:
        results = run(args.addr, batches, args.rounds, args.max_tokens)
    else:
        from svc_common.stack import Stack, StackConfig, free_port_base

        config = StackConfig.build(port=free_port_base(), model=args.model, device_blocks=256, host_blocks=0)
        with Stack(config, log_dir=tempfile.mkdtemp(prefix="fastswitch-structured-")) as stack:
            results = run(stack.addr, batches, args.rounds, args.max_tokens)
    data = {
        "batches": results,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "modes": MODES,
        "load_avg_1m": load,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "results.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
