"""`fastswitch bench`: the serving stack against baselines on the same model, prompts and machine.

Every mode replays the same prompts in one run. Stack modes start the stack (the same code path as
`fastswitch up`) with that mode's settings, submit every request at once (a closed batch, as
`generate_batch` gets it), and time each token as it streams back. The `transformers-cb` peer runs
`generate_batch` in-process after the stack has stopped, so no two modes share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Real text, so the model behaves as it would on user traffic.
PROMPT_TEXTS = [
    "Explain why the sky is blue in simple terms.",
    "Write a short story about a robot who learns to paint.",
    "What are the main differences between Python lists and tuples?",
    "Summarise the causes of the French Revolution.",
    "Give me three tips for writing clean code.",
    "Describe the water cycle to a ten-year-old.",
    "How does a hash table work?",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "List the planets of the solar system in order from the sun.",
    "Explain recursion with an example in Python.",
    "Why do cats purr?",
    "What is a prime number? Give examples.",
    "Describe how a bill becomes a law.",
    "Write a polite email asking for a meeting next week.",
    "What are the benefits of regular exercise?",
]


@dataclass(slots=True)
class Preset:
    prompts: int
    max_tokens: int
    device_blocks: int
    max_running: int
    policy: str = "fcfs"
    priority_updates: str = "none"
    priority_update_prob: float = 0.0


PRESETS = {
    "tiny": Preset(prompts=4, max_tokens=8, device_blocks=128, max_running=16),
    "small": Preset(prompts=16, max_tokens=64, device_blocks=512, max_running=32),
    "gpu": Preset(prompts=64, max_tokens=256, device_blocks=8192, max_running=64),
    # A pool too small for the batch, with the paper's random priority churn: preemption all the time.
    "churn": Preset(
        prompts=16,
        max_tokens=64,
        device_blocks=40,
        max_running=16,
        policy="priority",
        priority_updates="random",
        priority_update_prob=0.05,
    ),
}

STACK_MODES = {
    "fastswitch": {"preemption": "swap"},
    "vllm-like": {"preemption": "vllm-like"},
    "recompute": {"preemption": "recompute"},
}
PEER_MODES = {"transformers-cb"}
ALL_MODES = ("fastswitch", "vllm-like", "recompute", "no-groups", "no-async", "no-reuse", "transformers-cb")


def percentiles(values: list[float], prefix: str) -> dict[str, float]:
    """P50/P95/P99/P99.9 (linear interpolation); NaN when there are no values."""
    out = {}
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("p999", 99.9)):
        out[f"{prefix}_{name}"] = float(np.percentile(values, q)) if values else float("nan")
    return out


def build_prompts(tokenizer: Any, n: int) -> list[str]:
    """n chat prompts (the chat template applied), cycling through the built-in texts."""
    texts = [PROMPT_TEXTS[i % len(PROMPT_TEXTS)] for i in range(n)]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]


async def _replay(addr: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from fastswitch.client import AsyncClient

    ttft: list[float] = []
    tbt: list[float] = []
    tokens = 0
    async with AsyncClient(addr) as client:
        await client.complete(prompts[0], max_tokens=2)  # warm-up
        before = await client.stats()
        bar = tqdm(total=len(prompts), desc="  requests", leave=False)

        async def one(prompt: str) -> None:
            nonlocal tokens
            start = time.perf_counter()
            last = None
            async for chunk in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True):
                if not chunk.token_ids:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttft.append(now - start)
                else:
                    tbt.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
                last = now
                tokens += len(chunk.token_ids)
            bar.update(1)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
        bar.close()
        after = await client.stats()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if isinstance(after.get(k), float)}
    return {
        **percentiles(ttft, "ttft"),
        **percentiles(tbt, "tbt"),
        "throughput_tok_s": tokens / wall,
        "generated_tokens": tokens,
        "wall_s": wall,
        "preemptions": delta.get("preemptions", 0),
        "swap_bytes": delta.get("swap_out_bytes", 0) + delta.get("swap_in_bytes", 0),
        "copy_calls": delta.get("copy_calls", 0),
        "swap_stall_s": delta.get("swap_stall_s", 0),
        "swap_stall_share": delta.get("swap_stall_s", 0) / wall,
        "recomputed_tokens": delta.get("recomputed_tokens", 0),
    }


def _run_stack_mode(mode: str, preset: Preset, prompts: list[str], addr: str | None, out: pathlib.Path) -> dict:
    if addr:
        return asyncio.run(_replay(addr, prompts, preset.max_tokens))
    from fastswitch.stack import Stack, StackConfig

    settings = STACK_MODES[mode]
    port = 51000 + os.getpid() % 1000 * 3
    config = StackConfig(
        port=port,
        device_blocks=preset.device_blocks,
        host_blocks=preset.device_blocks,
        max_running=preset.max_running,
        max_step_tokens=max(256, preset.max_running),
        preemption=settings["preemption"],
        policy=preset.policy,
        priority_updates=preset.priority_updates,
        priority_update_prob=preset.priority_update_prob,
    )
    with Stack(config, log_dir=str(out / "logs" / mode)) as stack:
        return asyncio.run(_replay(stack.addr, prompts, preset.max_tokens))


def _run_peer(tokenizer: Any, model_dir: str, prompts: list[str], preset: Preset) -> dict:
    from fastswitch.bench.peer import run_transformers_cb

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    result = run_transformers_cb(model_dir, ids, preset.max_tokens, ignore_eos=True)
    return {
        **percentiles(result.ttft_s, "ttft"),
        **percentiles(result.tbt_s, "tbt"),
        "throughput_tok_s": result.throughput_tok_s,
        "generated_tokens": result.generated_tokens,
        "wall_s": result.wall_s,
        "preemptions": 0,
        "swap_bytes": 0,
        "copy_calls": 0,
        "swap_stall_s": 0.0,
        "swap_stall_share": 0.0,
        "recomputed_tokens": 0,
    }


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def markdown(results: dict[str, Any]) -> str:
    modes = results["modes"]
    base = next((b for b in ("transformers-cb", "vllm-like") if b in modes), None)
    lines = [
        f"| mode | throughput tok/s | vs {base or '-'} | TTFT p50 s | TTFT p99 s | TBT p50 s | TBT p99 s | "
        "preemptions | swap MB | copy calls | swap stall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        ratio = f"{m['throughput_tok_s'] / modes[base]['throughput_tok_s']:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {m['throughput_tok_s']:.1f} | {ratio} | {m['ttft_p50']:.3f} | {m['ttft_p99']:.3f} | "
            f"{m['tbt_p50']:.3f} | {m['tbt_p99']:.3f} | {m['preemptions']:.0f} | {m['swap_bytes'] / 1e6:.1f} | "
            f"{m['copy_calls']:.0f} | {m['swap_stall_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = results["modes"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(modes)
    ax.bar(
        names,
        [modes[n]["throughput_tok_s"] for n in names],
        color=["#2b7bba", "#999999", "#e07b39"][: len(names)],
    )
    ax.set_ylabel("tokens / s")
    w = results["workload"]
    ax.set_title(f"Throughput: {w['prompts']} prompts x {w['max_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(preset_name: str, modes: list[str], out: pathlib.Path, addr: str | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from fastswitch.common.model_source import resolve_model

    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {', '.join(ALL_MODES)}")
    pending = [m for m in modes if m not in STACK_MODES and m not in PEER_MODES]
    if pending:
        raise ValueError(
            f"modes {pending} are not available in this version; available: fastswitch, recompute, transformers-cb"
        )
    preset = PRESETS[preset_name]
    model_dir = str(resolve_model(None))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = build_prompts(tokenizer, preset.prompts)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "modes": {},
        "workload": {
            "preset": preset_name,
            **asdict(preset),
            "prompt_tokens": [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts],
            "arrivals": "closed batch: every request submitted at t=0",
        },
        "machine": machine(),
    }
    for mode in modes:
        print(f"[bench] {mode}: {preset.prompts} prompts x {preset.max_tokens} tokens", flush=True)
        if mode in PEER_MODES:
            results["modes"][mode] = _run_peer(tokenizer, model_dir, prompts, preset)
        else:
            results["modes"][mode] = _run_stack_mode(mode, preset, prompts, addr, out)
        print(f"[bench] {mode}: {results['modes'][mode]['throughput_tok_s']:.1f} tok/s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "throughput.png")
    return results


def main(args: argparse.Namespace) -> int:
    modes = args.modes.split(",") if args.modes else ["fastswitch", "transformers-cb"]
    out = pathlib.Path(args.out)
    results = run(args.preset, modes, out, addr=args.addr)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"results in {out}/ (results.json, results.md, throughput.png)")
    return 0
