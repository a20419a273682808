"""`python -m executor_svc.bench_step`: the executor's step against the hardware floors, in one run.

- Decode at batch B and context C (every sequence at position C): the floor is the bytes a step must
  read (the weights once, and each sequence's KV) over the memory bandwidth measured in the same run
  with a large device-to-device copy.
- Prefill of P tokens (one chunk from position 0): the floor is its FLOPs (2 x parameters x tokens,
  plus causal attention) over the matrix-product peak measured in the same run in the model's dtype.

A step here is `ModelRunner.forward` plus reading the greedy ids back to the host (the step's one
synchronisation), the median of `--repeats` after warm-up. Runs anywhere; `make gpu-check` runs it on
the GPU with the Llama-3-8B shape and `--load-format dummy`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from executor_svc.config import ExecutorConfig
from executor_svc.model_runner import ModelRunner
from executor_svc.step_meta import ChunkSpec


@dataclass(slots=True)
class Row:
    what: str
    tokens: int
    ms: float
    floor_ms: float
    floor: str

    @property
    def ratio(self) -> float:
        return self.ms / self.floor_ms if self.floor_ms > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of a large device copy, counting the read and the write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms / 1000)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n matrix product in `dtype`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median_ms(lambda: a @ b, device, repeats)
    return 2 * n**3 / (ms / 1000)


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter, except an untied input embedding (only
    B of its rows are gathered)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters in the per-token matrix products (the input embedding is a lookup)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    return total if tied else total - embed.numel()


def run(args: argparse.Namespace) -> dict:
    batches = [int(b) for b in args.batches.split(",") if b]
    bs = args.block_size
    per_seq = (args.context + bs) // bs + 1
    blocks = max(max(batches) * per_seq, (args.prefill + bs - 1) // bs) + 1
    config = ExecutorConfig(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        attention=args.attention,
        cuda_graphs=args.cuda_graphs,
        fused_ops=args.fused_ops,
        cpu_linear=args.cpu_linear,
        block_size=bs,
        device_blocks=blocks,
    )
    runner = ModelRunner(config)
    device, dtype = runner.device, runner.dtype
    try:
        bandwidth = copy_bandwidth(device, args.copy_mib * 2**20, args.repeats)
        peak = matmul_peak(device, dtype, args.matmul_n, args.repeats)
        weights = weight_bytes_read(runner.model)
        kv_token = runner.pool.block_bytes // bs
        tc = runner.model.config.get_text_config()
        rows: list[Row] = []

        def step(specs: list[ChunkSpec]) -> None:
            runner.forward(specs).argmax(dim=-1).tolist()

        for batch in batches:
            specs = [
                ChunkSpec([1], args.context - 1, list(range(i * per_seq, (i + 1) * per_seq)), True)
                for i in range(batch)
            ]
            ms = median_ms(lambda s=specs: step(s), device, args.repeats)
            floor = (weights + batch * args.context * kv_token) / bandwidth * 1000
            rows.append(Row(f"decode batch {batch}, context {args.context}", batch, ms, floor, "memory"))
        prefill = [ChunkSpec([1] * args.prefill, 0, list(range((args.prefill + bs - 1) // bs)), True)]
        p = args.prefill
        attn_flops = 2 * 2 * tc.num_hidden_layers * tc.num_attention_heads * runner.head_dim * p * p / 2
        flops = 2 * matmul_params(runner.model) * p + attn_flops
        ms = median_ms(lambda: step(prefill), device, max(1, args.repeats // 2))
        rows.append(Row(f"prefill {p} tokens", p, ms, flops / peak * 1000, "compute"))
        if args.profile:
            batch = batches[len(batches) // 2]
            specs = [
                ChunkSpec([1], args.context - 1, list(range(i * per_seq, (i + 1) * per_seq)), True)
                for i in range(batch)
            ]
            profile = where_the_time_goes(lambda: step(specs), device, f"decode batch {batch}")
    finally:
        runner.close()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": str(runner.model_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": args.attention,
        "cuda_graphs": args.cuda_graphs,
        "fused_ops": runner.fused_counts or "off",
        "load_format": args.load_format,
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "matmul_peak_tflops": peak / 1e12,
        "weight_bytes_read": weights,
        "kv_bytes_per_token": kv_token,
        "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
        "profile": profile if args.profile else "",
    }


def where_the_time_goes(fn: Callable[[], object], device: torch.device, what: str, top: int = 15) -> str:
    """The operators that took the device's (or, on a CPU, the host's) time over three steps, the
    largest first: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{what}, 3 steps:\n" + prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


def table(result: dict) -> str:
    lines = [
        f"device {result['device']}, {result['dtype']}, attention {result['attention']}, "
        f"CUDA graphs {'on' if result['cuda_graphs'] else 'off'}, fused ops {result['fused_ops']}; "
        "measured in this run: copy "
        f"{result['copy_bandwidth_gbps']:.1f} GB/s, matmul {result['matmul_peak_tflops']:.2f} TFLOP/s",
        "",
        "| step | ms | floor ms | x floor | floor is | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rate = r["tokens"] / (r["ms"] / 1000)
        lines.append(
            f"| {r['what']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | {r['ratio']:.1f}x | {r['floor']} | {rate:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m executor_svc.bench_step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="as `fastswitch up --model` (e.g. llama3-8b)")
    parser.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "triton"))
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--fused-ops", default="auto", choices=("auto", "on", "off"), help="as the executor's flag")
    parser.add_argument("--cpu-linear", default="onednn", choices=("onednn", "dense"), help="as the executor's flag")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth copy")
    parser.add_argument("--matmul-n", type=int, default=8192, help="size of the peak matrix product")
    parser.add_argument("--profile", action="store_true", help="print where a decode step's time goes (torch profiler)")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    print(table(result))
    if result["profile"]:
        print(result["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
