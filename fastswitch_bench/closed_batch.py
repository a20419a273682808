"""`python -m fastswitch_bench.closed_batch`: one closed batch through the stack and through
`transformers`' own continuous batching (`generate_batch`), same model, same prompts, one run.

N prompts are sent at once, each generating M tokens (greedy, EOS ignored); the figure is generated
tokens per second of wall time, from the first request sent to the last token received (the stack) or
around the timed `generate_batch` call (the peer, after a warm-up call). The stack runs as `fastswitch
up` would, with `--set NAME=VALUE` settings (e.g. attention=triton, cuda_graphs=true). Issue 11's
closed batch: `--model llama3-8b --load-format dummy --prompts 32 --new-tokens 128` on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fastswitch import AsyncClient
from fastswitch_bench.workload import load_corpus


def prompts_of(count: int) -> list[str]:
    lines = load_corpus()
    return [f"{lines[i % len(lines)]} (#{i})" for i in range(count)]


STEP_STATS = ("steps", "forward_s", "sample_s")


async def _stack_batch(addr: str, prompts: list[str], new_tokens: int) -> tuple[float, list[int], list[int], dict]:
    async with AsyncClient(addr, timeout=1800) as client:
        await client.complete(prompts[0], max_tokens=2, ignore_eos=True)  # warm-up (first-step costs)
        before = await client.stats()
        start = time.perf_counter()
        done = await asyncio.gather(*(client.complete(p, max_tokens=new_tokens, ignore_eos=True) for p in prompts))
        wall = time.perf_counter() - start
        after = await client.stats()
    steps = {k: after.get(k, 0) - before.get(k, 0) for k in STEP_STATS}
    return wall, [len(c.token_ids) for c in done], [c.prompt_tokens for c in done], steps


def run_stack(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    from svc_common.stack import Stack, StackConfig, free_port_base

    settings: dict[str, Any] = {"model": args.model, "load_format": args.load_format, "dtype": args.dtype}
    settings.update(host_blocks=0, max_waiting=max(64, len(prompts)))
    for item in args.set:
        name, _, value = item.partition("=")
        settings[name.replace("-", "_")] = {"true": True, "false": False}.get(value.lower(), value)
    config = StackConfig.build(port=free_port_base(), **settings)
    stack = Stack(config, log_dir=tempfile.mkdtemp(prefix="fastswitch-closed-"))
    stack.start(timeout_s=900)
    try:
        wall, generated, prompt_tokens, steps = asyncio.run(_stack_batch(stack.addr, prompts, args.new_tokens))
    finally:
        stack.stop()
    return {
        "settings": {k: v for k, v in settings.items() if k != "model"},
        "wall_s": wall,
        "generated_tokens": sum(generated),
        "prompt_tokens": prompt_tokens,
        "tokens_per_s": sum(generated) / wall,
        # Where a step's wall time goes: the executor's forward and sampling, and the rest (the
        # scheduler, the gRPC hop, streaming: what overlapping steps would hide).
        "steps": steps["steps"],
        "ms_per_step": 1000 * wall / max(1, steps["steps"]),
        "forward_ms_per_step": 1000 * steps["forward_s"] / max(1, steps["steps"]),
        "sample_ms_per_step": 1000 * steps["sample_s"] / max(1, steps["steps"]),
    }


def run_peer(args: argparse.Namespace, prompt_ids: list[list[int]]) -> dict[str, Any]:
    from executor_svc.loader import load_model, pick_device, resolve_dtype
    from fastswitch_bench import peer

    # The model as the executor builds it (same device, dtype and seeded dummy weights).
    device = pick_device("auto")
    model = load_model(Path(args.model_dir), resolve_dtype(args.dtype, device), device, args.load_format)
    result = peer.run_transformers_cb(args.model_dir, prompt_ids, args.new_tokens, model=model)
    return {
        "wall_s": result.wall_s,
        "generated_tokens": result.generated_tokens,
        "tokens_per_s": result.throughput_tok_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="as `fastswitch up --model` (e.g. llama3-8b)")
    parser.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a stack setting (repeatable)")
    parser.add_argument("--skip-peer", action="store_true", help="the stack only")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from svc_common.model_source import resolve_model

    args.model_dir = str(resolve_model(args.model))
    prompts = prompts_of(args.prompts)
    ours = run_stack(args, prompts)
    out: dict[str, Any] = {"prompts": args.prompts, "new_tokens": args.new_tokens, "fastswitch": ours}
    print(
        f"fastswitch: {ours['generated_tokens']} tokens in {ours['wall_s']:.2f} s = {ours['tokens_per_s']:,.0f} tok/s "
        f"(prompts of {min(ours['prompt_tokens'])}-{max(ours['prompt_tokens'])} tokens); {ours['steps']:.0f} steps of "
        f"{ours['ms_per_step']:.2f} ms: forward {ours['forward_ms_per_step']:.2f}, sampling "
        f"{ours['sample_ms_per_step']:.2f}, the rest outside the executor's step",
        flush=True,
    )
    if not args.skip_peer:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        try:
            peer = run_peer(args, ids)
            out["transformers_cb"] = peer
            out["ratio"] = ours["tokens_per_s"] / peer["tokens_per_s"]
            print(
                f"transformers generate_batch: {peer['generated_tokens']} tokens in {peer['wall_s']:.2f} s = "
                f"{peer['tokens_per_s']:,.0f} tok/s; fastswitch / peer = {out['ratio']:.2f}x",
                flush=True,
            )
        except Exception as err:  # noqa: BLE001 - the peer's failure is a result to report, not a crash
            out["transformers_cb"] = {"error": f"{type(err).__name__}: {err}"}
            print(f"transformers generate_batch failed: {type(err).__name__}: {err}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
