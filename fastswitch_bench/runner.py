"""`fastswitch bench`: every mode replays the same multi-turn workload; tails, ratios, plots.

One run: draw (or load) a workload (`workload.py`) under a preset (`presets.py`) and save it as
`workload.json`, then run it once per mode (`modes.py`): each stack mode starts its own stack and
replays the workload open-loop against it (`replay.py`); the `transformers-cb` peer runs in-process
after the stacks have stopped, so no two modes share the CPU (`peer.py`). Each mode's requests are
summarised and compared with vllm-like (`report.py`) and drawn (`plots.py`).

Outputs under `--out`: results.json (`{"modes", "workload", "machine"}`), results.md, requests.json
(every request of every mode), ttft_cdf.png, tbt_cdf.png, throughput.png, tail_phases.png, logs/.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from fastswitch_bench.modes import (
    PEER_MODES,
    PEER_NOTES,
    ModelOptions,
    parse_modes,
    run_peer_mode,
    run_stack_mode,
    stack_config,
)
from fastswitch_bench.plots import plot
from fastswitch_bench.presets import PRESETS, Preset
from fastswitch_bench.report import add_ratios, markdown, summarise_mode, write_json
from fastswitch_bench.workload import SOURCES, Workload, generate, hf_token_counter

# Files that make a directory's tokenizer; a config-only directory (for --load-format dummy) has none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": list(os.getloadavg()),
    }


def load_tokenizer(model_dir: pathlib.Path) -> tuple[Any, str]:
    """The model's tokenizer and its name; a directory without one borrows the default model's."""
    from transformers import AutoTokenizer

    from svc_common.model_source import resolve_model

    source = model_dir if any((model_dir / f).is_file() for f in TOKENIZER_FILES) else resolve_model(None)
    return AutoTokenizer.from_pretrained(source), source.name


def build_workload(preset: Preset, tokenizer: Any, tokenizer_name: str, **overrides: Any) -> Workload:
    spec = replace(preset.workload, **{k: v for k, v in overrides.items() if v is not None})
    return generate(spec, hf_token_counter(tokenizer), tokenizer_name)


@dataclass(slots=True)
class Bench:
    """A checked run, ready to go: every input validated, the workload drawn or loaded."""

    preset_name: str
    preset: Preset
    modes: list[str]
    addr: str | None  # a running stack to replay against instead of starting one per mode
    workload: Workload
    workload_path: str | None
    model_dir: pathlib.Path | None  # None: neither given nor needed (a saved workload against stacks only)
    tokenizer: Any  # None when the model directory is
    options: ModelOptions


def prepare(
    preset_name: str,
    modes: list[str] | None,
    addr: str | None = None,
    workload_path: str | None = None,
    device_blocks: int | None = None,
    host_blocks: int | None = None,
    options: ModelOptions | None = None,
    **overrides: Any,
) -> Bench:
    """Check the inputs and draw (or load) the workload; a bad input raises ValueError / FileNotFoundError
    here, before any stack starts.

    `overrides` replace fields of the preset's WorkloadSpec (seed, conversations, rate_per_s, ...);
    `device_blocks` / `host_blocks` the preset's pool sizes; `options` the model knobs given."""
    modes = parse_modes(",".join(modes) if modes else None)
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {', '.join(PRESETS)}")
    from svc_common.model_source import resolve_model

    options = options or ModelOptions()
    preset = PRESETS[preset_name]
    if device_blocks is not None:
        preset = replace(preset, device_blocks=device_blocks)
    if host_blocks is not None:
        preset = replace(preset, host_blocks=host_blocks)
    # The tokenizer draws the workload and the peer chats with it; the stacks resolve `--model` themselves.
    needs_tokenizer = not workload_path or any(m in PEER_MODES for m in modes)
    model_dir = resolve_model(options.model) if options.model or needs_tokenizer else None
    tokenizer, tokenizer_name = load_tokenizer(model_dir) if model_dir and needs_tokenizer else (None, "")
    if workload_path:
        workload = Workload.load(workload_path)
    else:
        workload = build_workload(preset, tokenizer, tokenizer_name, **overrides)
    stack_modes = [m for m in modes if m not in PEER_MODES]
    if stack_modes and not addr:
        stack_config(stack_modes[0], preset, workload, options)  # a knob the stack lacks fails now
    return Bench(preset_name, preset, modes, addr, workload, workload_path, model_dir, tokenizer, options)


def run(
    preset_name: str,
    modes: list[str] | None,
    out: pathlib.Path,
    addr: str | None = None,
    workload_path: str | None = None,
    progress: bool = True,
    stall_timeout_s: float = 60.0,
    **settings: Any,
) -> dict[str, Any]:
    """Run `modes` (default: all) on one workload; write results.json/.md, requests.json and plots to out.
    `settings` are `prepare`'s."""
    bench = prepare(preset_name, modes, addr, workload_path, **settings)
    return execute(bench, out, progress, stall_timeout_s)


def execute(bench: Bench, out: pathlib.Path, progress: bool = True, stall_timeout_s: float = 60.0) -> dict[str, Any]:
    """Run every mode of a prepared bench, one after the other, and write the outputs."""
    workload, preset, options = bench.workload, bench.preset, bench.options
    out.mkdir(parents=True, exist_ok=True)
    workload.save(out / "workload.json")
    results: dict[str, Any] = {
        "modes": {},
        "workload": {
            "preset": bench.preset_name,
            "file": str(out / "workload.json"),
            "replayed_from": bench.workload_path,
            "spec": asdict(workload.spec),
            "summary": workload.summary(),
            "stack": {k: v for k, v in asdict(preset).items() if k != "workload"},
            "model": {"dir": str(bench.model_dir) if bench.model_dir else None, **options.stack_settings()},
            "sources": SOURCES,
            "notes": "stack modes: open-loop replay (Poisson arrivals, think time after each answer), "
            "chat conversations kept by the server, ignore_eos with max_tokens = the drawn answer length. "
            + PEER_NOTES,
        },
        "machine": machine(),
    }
    requests: dict[str, list[dict[str, Any]]] = {}
    summary = workload.summary()
    started = time.perf_counter()
    for mode in bench.modes:
        print(
            f"[bench] {mode}: {summary['conversations']} conversations, {summary['requests']} requests, "
            f"{summary['total_output_tokens']} tokens",
            flush=True,
        )
        t = time.perf_counter()
        if mode in PEER_MODES:
            mode_run = run_peer_mode(str(bench.model_dir), bench.tokenizer, preset, workload, progress, options)
        else:
            mode_run = run_stack_mode(mode, preset, workload, out, bench.addr, progress, stall_timeout_s, options)
        result = summarise_mode(mode_run, workload.num_requests)
        result["mode_total_s"] = time.perf_counter() - t  # start-up and shut-down included
        result["load_avg_1m"] = os.getloadavg()[0]  # others' work on the machine makes timings noisy
        results["modes"][mode] = result
        requests[mode] = [asdict(r) for r in mode_run.records]
        print(
            f"[bench] {mode}: {result['throughput_tok_s']:.1f} tok/s, TTFT p99 {result['ttft_p99']:.2f} s, "
            f"TBT p99.9 {result['tbt_p999']:.3f} s, {result['preemptions']:.0f} preemptions "
            f"({result['mode_total_s']:.0f} s){' STALLED' if result['stalled'] else ''}",
            flush=True,
        )
    add_ratios(results["modes"])
    results["workload"]["bench_total_s"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    write_json(out / "requests.json", requests)
    (out / "results.md").write_text(markdown(results))
    plot(results, requests, out)
    return results


def main(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    started = time.perf_counter()
    try:
        from svc_common.stack import StackConfig

        settings = tuple(StackConfig.parse_setting(item) for item in args.set)
        bench = prepare(
            args.preset,
            args.modes.split(",") if args.modes else None,
            addr=args.addr,
            workload_path=args.workload,
            device_blocks=args.device_blocks,
            host_blocks=args.host_blocks,
            options=ModelOptions(args.model, args.dtype, args.load_format, args.executors, settings),
            seed=args.seed,
            conversations=args.conversations,
            rate_per_s=args.rate,
            priority_updates=args.priority_updates,
            priority_update_prob=args.priority_update_prob,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"fastswitch bench: error: {err}", file=sys.stderr)
        return 2
    results = execute(bench, out, progress=not args.no_progress, stall_timeout_s=args.stall_timeout)
    if args.json:
        write_json(pathlib.Path(args.json), results)
    print(markdown(results))
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"results in {out}/ ({', '.join(files)}); total {time.perf_counter() - started:.0f} s")
    return 0
