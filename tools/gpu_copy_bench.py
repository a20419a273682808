"""CUDA copy bandwidth of the swap daemon's engine: block groups and per-block-per-layer copies against
a pinned torch copy of the same bytes, both directions (`make gpu-check` runs it; needs a GPU).

The device pool is exported by a child process (CUDA IPC cannot be opened by its exporter), laid out
like the executor's: `--blocks` blocks of `--block-mib` MiB (2 MiB = Llama-3-8B, bf16, 16 tokens).
Prints a markdown table; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GROUPS = (1, 2, 4, 8, 16, 32, 64)

_EXPORTER = """
import sys, torch
sys.path.insert(0, {root!r})
from executor_svc.kv_pool import cuda_ipc_handle
pool = torch.ones({nbytes}, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print(cuda_ipc_handle(pool), flush=True)
sys.stdin.readline()
"""


def _best(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(blocks: int, block_bytes: int, layers: int, repeats: int) -> dict:
    import torch

    from swap_daemon.copier import AttachSpec, BlockRun, CudaCopyEngine, Direction, Granularity

    total = blocks * block_bytes
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)

    def pinned(out: bool) -> None:
        (host.copy_(dev, non_blocking=True) if out else dev.copy_(host, non_blocking=True))
        torch.cuda.synchronize()

    baseline = {d: total / _best(lambda o=(d == "out"): pinned(o), repeats) / 1e9 for d in ("out", "in")}
    child = subprocess.Popen(
        [sys.executable, "-c", _EXPORTER.format(root=str(ROOT), nbytes=total)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rows = []
    try:
        assert child.stdout is not None
        handle = child.stdout.readline().strip()
        if not handle.startswith("cuda-ipc:"):
            raise RuntimeError(f"the pool exporter gave no CUDA IPC handle: {handle!r}")
        engine = CudaCopyEngine(num_host_blocks=blocks, workers=2)
        try:
            engine.attach(AttachSpec(handle, blocks, block_bytes, layers), owner="bench")
            cases = [(f"groups of {g}", Granularity.RUN, g) for g in GROUPS]
            cases.append(("per block, per layer, K/V", Granularity.BLOCK_LAYER, 1))
            rng = np.random.default_rng(0)
            for name, granularity, g in cases:
                order = rng.permutation(blocks // g)
                runs = [BlockRun(i * g, int(order[i]) * g, g) for i in range(blocks // g)]
                row = {"copies": name, "bytes_per_copy": g * block_bytes}
                for d, direction in (("out", Direction.OUT), ("in", Direction.IN)):
                    result = engine.swap(direction, runs, granularity)
                    row["copy_calls"] = result.copy_calls
                    seconds = _best(lambda r=runs, dd=direction, gg=granularity: engine.swap(dd, r, gg), repeats)
                    row[f"{d}_gbps"] = total / seconds / 1e9
                    row[f"{d}_pct"] = 100 * row[f"{d}_gbps"] / baseline[d]
                if granularity is Granularity.BLOCK_LAYER:
                    row["bytes_per_copy"] = block_bytes // (2 * layers)
                rows.append(row)
            engine.detach("bench")
        finally:
            engine.close()
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=60)
    return {"blocks": blocks, "block_bytes": block_bytes, "layers": layers, "pinned_gbps": baseline, "rows": rows}


def table(result: dict) -> str:
    b = result["pinned_gbps"]
    lines = [
        f"{result['blocks']} blocks of {result['block_bytes'] / 2**20:.2f} MiB; pinned torch copy of the same bytes: "
        f"{b['out']:.1f} GB/s device->host, {b['in']:.1f} GB/s host->device",
        "",
        "| copies | copy calls | bytes per copy | out GB/s | % pinned | in GB/s | % pinned |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['copies']} | {r['copy_calls']} | {r['bytes_per_copy'] / 1024:.0f} KiB | {r['out_gbps']:.1f} | "
            f"{r['out_pct']:.0f}% | {r['in_gbps']:.1f} | {r['in_pct']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--block-mib", type=float, default=2.0)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = run(args.blocks, int(args.block_mib * 2**20), args.layers, args.repeats)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
