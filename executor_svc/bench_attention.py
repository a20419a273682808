"""`python -m executor_svc.bench_attention`: attention candidates on this machine, side by side in one run.

One layer's attention for the default model's shape (9 query / 3 KV heads, head dim 64, 16-token
blocks in a block-major pool), in two steps: a decode batch and a prefill chunk over a cached prefix.
Candidates, interleaved round by round so machine load hits them alike:
- `sdpa backend`: the executor's `--attention sdpa` path as it runs (KV write, gather of each
  sequence's blocks into a padded tensor, masked SDPA);
- `flex eager`: FlexAttention with a block mask, over KV already gathered (so a lower bound on a flex
  backend: its paged form needs the same gather or a mask over the whole pool);
- `flex compiled`: the same through `torch.compile` (first call's compile time reported apart).
The Triton kernels are not timed here: on a CPU they only run under Triton's interpreter.
Writes a markdown table (`--doc`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from executor_svc.kv_pool import KVPool
from executor_svc.paged_attention import StepAttention, paged_attention
from executor_svc.step_meta import ChunkSpec, build_host_meta

H, KVH, D, BS, LAYERS = 9, 3, 64, 16, 30


class _Layer(torch.nn.Module):
    layer_idx = 0


def _scenario(kind: str, batch: int, ctx: int, chunk: int) -> list[ChunkSpec]:
    per = (ctx + BS - 1) // BS + 1
    if kind == "decode":
        return [ChunkSpec([1], ctx - 1 - 7 * i, list(range(i * per, (i + 1) * per)), True) for i in range(batch)]
    return [ChunkSpec([1] * chunk, ctx - chunk, list(range(per)), True)]


def _flex(compiled: bool) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def candidates(kind: str, batch: int, ctx: int, chunk: int, compile_flex: bool) -> dict[str, Callable[[], object]]:
    specs = _scenario(kind, batch, ctx, chunk)
    blocks = sum(len(s.block_table) for s in specs) + 1
    pool = KVPool(blocks, 1, BS, KVH, D, torch.float32, torch.device("cpu"))
    pool.tensor.normal_()
    meta = build_host_meta(specs, BS).to_device(torch.device("cpu"))
    step = StepAttention(pool, meta, "sdpa")
    t = meta.num_tokens
    q, k, v = torch.randn(1, H, t, D), torch.randn(1, KVH, t, D), torch.randn(1, KVH, t, D)
    layer = _Layer()

    def sdpa_backend() -> object:
        meta.derived.clear()
        return paged_attention(layer, q, k, v, None, D**-0.5, fs_step=step)

    from torch.nn.attention.flex_attention import create_block_mask

    if kind == "decode":
        lens = torch.tensor([s.start_position + 1 for s in specs])
        width = max(lens.tolist())
        kg = torch.randn(batch, KVH, width, D)
        vg = torch.randn(batch, KVH, width, D)
        qg = torch.randn(batch, H, 1, D)
        mask = create_block_mask(lambda b, h, qi, kv: kv < lens[b], batch, None, 1, width, device="cpu")
    else:
        kg, vg = torch.randn(1, KVH, ctx, D), torch.randn(1, KVH, ctx, D)
        qg = torch.randn(1, H, chunk, D)
        off = ctx - chunk
        mask = create_block_mask(lambda b, h, qi, kv: kv <= qi + off, 1, None, chunk, ctx, device="cpu")
    out = {"sdpa backend": sdpa_backend}
    flex = _flex(False)
    out["flex eager"] = lambda: flex(qg, kg, vg, block_mask=mask, enable_gqa=True)
    if compile_flex:
        flexc = _flex(True)
        out["flex compiled"] = lambda: flexc(qg, kg, vg, block_mask=mask, enable_gqa=True)
    return out


def run(rounds: int, compile_flex: bool, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for kind, batch, ctx, chunk in (("decode", 8, 512, 1), ("prefill", 1, 512, 128)):
        fns = candidates(kind, batch, ctx, chunk, compile_flex)
        compile_s = {}
        for name, fn in fns.items():  # warm-up (and compile)
            start = time.perf_counter()
            fn()
            compile_s[name] = time.perf_counter() - start
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        label = f"decode, batch {batch}, context {ctx}" if kind == "decode" else f"prefill {chunk} over {ctx}"
        for name in fns:
            rows.append(
                {
                    "step": label,
                    "candidate": name,
                    "median_ms": 1000 * statistics.median(times[name]),
                    "min_ms": 1000 * min(times[name]),
                    "first_call_s": compile_s[name],
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| step | candidate | median ms | best ms | first call s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['candidate']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['first_call_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m executor_svc.bench_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(flex_attention)")
    parser.add_argument("--doc", default="", help="write the table into this markdown file")
    args = parser.parse_args(argv)
    rows = run(args.rounds, not args.no_compile, args.threads)
    text = table(rows)
    print(text)
    if args.doc:
        load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
        shown = " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.doc).write_text(
            f"# Attention candidates on this CPU\n\nMeasured by `python -m executor_svc.bench_attention "
            f"{shown}` on {platform.processor() or platform.machine()}, {args.threads} threads, "
            f"torch {torch.__version__}, load average {load} at the end (the machine is shared: read the "
            f"ratios, not the absolute times). One layer of the default model's attention; fp32.\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
