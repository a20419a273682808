"""One node against two on the same workload, one run: the stack's `fastswitch` mode replayed with
`--executors 1` and `--executors 2`, each executor on `--threads` torch threads (and, for the honest
comparison on a small machine, one node given both nodes' threads).

    python -m fastswitch_bench.nodes --preset small --out docs/results/nodes
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from typing import Any

from fastswitch_bench.modes import ModelOptions, run_stack_mode
from fastswitch_bench.report import summarise_mode
from fastswitch_bench.runner import machine, prepare

KEYS = ("throughput_tok_s", "wall_s", "ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99", "failed_requests")


def run(preset: str, threads: int, out: pathlib.Path, seed: int | None = None) -> dict[str, Any]:
    bench = prepare(preset, ["fastswitch"], seed=seed)
    setups = {
        f"1 node x {threads} thread(s)": ModelOptions(executors=1, settings=(("threads", threads),)),
        f"2 nodes x {threads} thread(s)": ModelOptions(executors=2, settings=(("threads", threads),)),
        f"1 node x {2 * threads} thread(s)": ModelOptions(executors=1, settings=(("threads", 2 * threads),)),
    }
    results: dict[str, Any] = {"preset": preset, "machine": machine(), "requests": bench.workload.num_requests}
    runs: dict[str, Any] = {}
    for name, options in setups.items():
        start = time.perf_counter()
        logs = pathlib.Path(tempfile.mkdtemp(prefix="fastswitch-nodes-"))  # the stack's logs, not the results
        mode = run_stack_mode("fastswitch", bench.preset, bench.workload, logs, None, False, options=options)
        summary = summarise_mode(mode, bench.workload.num_requests)
        runs[name] = {k: summary.get(k) for k in KEYS} | {"elapsed_s": time.perf_counter() - start}
        print(name, json.dumps(runs[name]), flush=True)
    results["runs"] = runs
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"# 1 vs 2 nodes, preset `{preset}` ({bench.workload.num_requests} requests, one workload)",
        "",
        f"`python -m fastswitch_bench.nodes --preset {preset} --threads {threads}`; "
        f"machine: {results['machine']['cpu_count']} CPUs, load at start {results['machine']['load_avg_at_start']}.",
        "",
        "| setup | tok/s | wall s | TTFT p50 s | TTFT p99 s | TBT p50 s | TBT p99 s | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per executor")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default="bench-results/nodes")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(args.preset, args.threads, pathlib.Path(args.out), args.seed)


if __name__ == "__main__":
    main()
