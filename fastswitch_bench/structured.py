"""Structured output's cost: tokens/s of constrained vs unconstrained requests, side by side, one stack.

    python -m fastswitch_bench.structured                      # batch 1 and 16, 3 rounds, docs/results/structured
    python -m fastswitch_bench.structured --batches 1,4 --rounds 1 --out bench-results/structured

Every mode sends the same prompts as a closed batch (B requests at once, B = each of --batches), greedy,
`ignore_eos`, `max_tokens` N, and waits for all of them: tokens/s = B * N / wall time. The constrained
modes use grammars that cannot complete within N tokens (and so never allow EOS), so every mode
generates exactly the same number of tokens and only the constraint differs:

- `none`: unconstrained;
- `json`: a JSON schema (an array of at least 64 objects with string and integer fields);
- `regex`: letters, spaces and punctuation (`[A-Za-z][A-Za-z ,.;:]*`: EOS is allowed anywhere after the
  first letter; an EOS sampled under `ignore_eos` is ignored, as without a grammar);
- `allow-all`: a regex that allows any text (the floor: masks are filled and sent, rarely applied);
- `regex-counted`: at least 200 words (`([A-Za-z]+[ ,.;:]){200,}`): a counted repetition of a group with
  a repetition inside, xgrammar's slow case (about 10 ms a mask), to show what such a grammar costs.

Modes are interleaved round by round (none, json, regex, allow-all, none, ...) so that drifts in the
machine's load hit all of them alike; the median round is reported. On a shared machine wall time is
noisy, so each run also reports what it cost: CPU seconds of the stack's processes (tokens per CPU
second), and per step the model's forward time, the sampling time (where the executor applies the
masks) and the scheduler's time filling masks (`forward_s`, `sample_s`, `grammar_fill_s` in `stats`).
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
    "regex": {"regex": r"[A-Za-z][A-Za-z ,.;:]*"},
    "allow-all": {"regex": r"[\s\S]*"},
    # xgrammar 0.2.8's slow case: a repeated group with repetitions inside costs about 10 ms a mask (vs 10-70 us).
    "regex-counted": {"regex": r"([A-Za-z]+[ ,.;:]){200,}"},
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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc; 0 where unreadable)."""
    total = 0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


COUNTERS = ("grammar_fill_s", "grammar_fills", "steps", "forward_s", "sample_s")


def run(addr: str, batches: list[int], rounds: int, max_tokens: int, pids: list[int]) -> dict[str, Any]:
    asyncio.run(one_batch(addr, 2, 4, MODES["json"]))  # warm up: the model, the grammar compiler, the caches
    results: dict[str, Any] = {}
    for batch in batches:
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for r in range(rounds):
            for mode, constraint in MODES.items():
                before, cpu_before = stats(addr), cpu_seconds(pids)
                wall, tokens = asyncio.run(one_batch(addr, batch, max_tokens, constraint))
                after, cpu = stats(addr), cpu_seconds(pids) - cpu_before
                delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
                run_ = {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "cpu_s": cpu, **delta}
                runs[mode].append(run_)
                print(
                    f"batch {batch:>2} round {r + 1}/{rounds} {mode:>9}: {tokens / wall:7.1f} tok/s, "
                    f"{tokens / cpu if cpu else 0:7.1f} tok/CPU-s, step {1e3 * wall / max(1, delta['steps']):6.1f} ms "
                    f"(forward {1e3 * delta['forward_s'] / max(1, delta['steps']):6.1f}, "
                    f"sample {1e3 * delta['sample_s'] / max(1, delta['steps']):5.2f})",
                    flush=True,
                )
        summary = {}
        for mode, rs in runs.items():
            steps = max(1.0, sum(x["steps"] for x in rs))
            fills = sum(x["grammar_fills"] for x in rs)
            cpu = sum(x["cpu_s"] for x in rs)
            summary[mode] = {
                "tok_s": statistics.median(x["tok_s"] for x in rs),
                "tok_s_runs": [x["tok_s"] for x in rs],
                "tok_per_cpu_s": statistics.median(x["tokens"] / x["cpu_s"] for x in rs) if cpu else None,
                "runs": rs,
                "step_ms": 1e3 * sum(x["wall_s"] for x in rs) / steps,
                "forward_ms_per_step": 1e3 * sum(x["forward_s"] for x in rs) / steps,
                "sample_ms_per_step": 1e3 * sum(x["sample_s"] for x in rs) / steps,
                "fill_ms_per_step": 1e3 * sum(x["grammar_fill_s"] for x in rs) / steps,
                "fill_us_per_mask": 1e6 * sum(x["grammar_fill_s"] for x in rs) / fills if fills else 0.0,
            }
        base = summary["none"]
        for m in summary.values():
            m["vs_none"] = m["tok_s"] / base["tok_s"]
            m["cpu_vs_none"] = m["tok_per_cpu_s"] / base["tok_per_cpu_s"] if base["tok_per_cpu_s"] else None
            # What structured output adds to a step, in the executor (masking) and the scheduler (filling).
            m["added_ms_per_step"] = m["sample_ms_per_step"] - base["sample_ms_per_step"] + m["fill_ms_per_step"]
            m["added_share_of_forward"] = m["added_ms_per_step"] / base["forward_ms_per_step"]
        results[str(batch)] = summary
    return results


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(data: dict[str, Any]) -> str:
    lines = [
        "# Structured output: tokens/s, constrained vs unconstrained",
        "",
        f"`python -m fastswitch_bench.structured` on {data['machine']['cpu_count']} CPU cores "
        f"({data['machine']['processor']}), {data['max_tokens']} tokens per request, {data['rounds']} interleaved "
        f"rounds; load average {data['load_avg_1m']:.1f} at the start and {data['load_avg_1m_end']:.1f} at the end "
        "(a shared machine: wall-clock rates are noisy; CPU time and the per-step costs much less so).",
        "",
        "| batch | mode | tok/s (median) | vs none | runs (tok/s) | tok per CPU-s (median) | vs none | step ms | "
        "forward ms/step | sample ms/step | mask fill us/mask | added ms/step | added / forward |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch, modes in data["batches"].items():
        for mode, m in modes.items():
            runs = ", ".join(f"{x:.1f}" for x in m["tok_s_runs"])
            constrained = mode != "none"
            lines.append(
                f"| {batch} | {mode} | {m['tok_s']:.1f} | {m['vs_none']:.3f} | {runs} | "
                f"{_f(m['tok_per_cpu_s'], '.1f')} | {_f(m['cpu_vs_none'], '.3f')} | {m['step_ms']:.1f} | "
                f"{m['forward_ms_per_step']:.1f} | {m['sample_ms_per_step']:.2f} | "
                f"{_f(m['fill_us_per_mask'] if constrained else None, '.1f')} | "
                f"{_f(m['added_ms_per_step'] if constrained else None, '.2f')} | "
                f"{_f(100 * m['added_share_of_forward'] if constrained else None, '.2f')}{'%' if constrained else ''} |"
            )
    lines += [
        "",
        "added ms/step = sampling time above `none`'s (the executor masking logits) + mask filling (the "
        "scheduler); added / forward = that over `none`'s forward time per step.",
    ]
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
        results = run(args.addr, batches, args.rounds, args.max_tokens, pids=[])  # CPU time unknown
    else:
        from svc_common.stack import Stack, StackConfig, free_port_base

        config = StackConfig.build(port=free_port_base(), model=args.model, device_blocks=256, host_blocks=0)
        with Stack(config, log_dir=tempfile.mkdtemp(prefix="fastswitch-structured-")) as stack:
            results = run(stack.addr, batches, args.rounds, args.max_tokens, pids=[p.pid for p in stack.procs])
    data = {
        "batches": results,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "modes": MODES,
        "load_avg_1m": load,
        "load_avg_1m_end": os.getloadavg()[0],
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
