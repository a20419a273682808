"""The modes a bench run compares, and how each one runs.

Six stack modes start their own stack (the `fastswitch up` code path) with the preset's settings and
one mechanism switched (`STACK_MODES`), then replay the workload against it (`replay.py`); the
`transformers-cb` peer runs `transformers`' own continuous batching in-process (`peer.py`) on the
same model, loaded the same way. `ModelOptions` carries what the user chose for the model
(`--model`, `--dtype`, `--load-format`, `--executors`) to both.
"""

from __future__ import annotations

import asyncio
import pathlib
from dataclasses import asdict, dataclass
from typing import Any

from fastswitch_bench.presets import Preset
from fastswitch_bench.replay import RequestRecord, replay
from fastswitch_bench.workload import Workload

# StackConfig overrides per mode; `fastswitch` is StackConfig's defaults (swap + groups + async + reuse).
STACK_MODES: dict[str, dict[str, Any]] = {
    "fastswitch": {},
    "no-groups": {"block_groups": False},
    "no-async": {"async_swaps": False},
    "no-reuse": {"kv_reuse": False},
    "vllm-like": {"preemption": "vllm-like"},  # per-block-per-layer sync copies, no reuse
    "recompute": {"preemption": "recompute"},
}
PEER_MODES = ("transformers-cb",)
ALL_MODES = (*STACK_MODES, *PEER_MODES)
BASELINE = "vllm-like"
PEER_NOTES = (
    "transformers-cb has no priorities and no conversations: turn k of every conversation runs as wave k "
    "(a closed batch on one continuous-batching manager), its history built from the peer's own outputs; "
    "arrival times and think times are not replayed, so its latencies are closed-batch latencies measured "
    "from each wave's submission."
)


def parse_modes(spec: str | None) -> list[str]:
    modes = [m.strip() for m in spec.split(",") if m.strip()] if spec else list(ALL_MODES)
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {', '.join(ALL_MODES)}")
    # stack modes first (in the contract's order), the in-process peer last, once the stacks are stopped
    return [m for m in ALL_MODES if m in modes]


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """The model knobs the user gave (None: not given, the stack's and the peer's own defaults apply).

    Only the knobs given reach the stack, so a stack that lacks a setting still runs without it."""

    model: str | None = None  # HF directory or GGUF file
    dtype: str | None = None  # auto | bfloat16 | float16 | float32
    load_format: str | None = None  # auto | dummy (random weights from the directory's config.json)
    executors: int | None = None
    settings: tuple[tuple[str, Any], ...] = ()  # any other stack setting (`--set NAME=VALUE`), stacks only

    def stack_settings(self) -> dict[str, Any]:
        knobs = {k: v for k, v in asdict(self).items() if v is not None and k != "settings"}
        return {**knobs, **dict(self.settings)}


NO_OPTIONS = ModelOptions()  # no knob given: every default applies


@dataclass(slots=True)
class ModeRun:
    """What running one mode produced: its requests, its wall time, the server's counter deltas."""

    records: list[RequestRecord]
    wall_s: float
    counters: dict[str, float]
    stalled: bool
    notes: str


def stack_config(mode: str, preset: Preset, workload: Workload, options: ModelOptions = NO_OPTIONS) -> Any:
    """The StackConfig of a stack mode: the preset's pool and batch, the workload's priority churn, the
    mode's switch and the user's model knobs. Raises ValueError for a knob this stack does not have."""
    from svc_common.stack import StackConfig, free_port_base

    try:
        return StackConfig.build(
            port=free_port_base(options.executors or 1),
            block_size=preset.block_size,
            device_blocks=preset.device_blocks,
            host_blocks=preset.host_blocks,
            max_running=preset.max_running,
            max_step_tokens=preset.max_step_tokens,
            policy=preset.policy,
            priority_updates=workload.spec.priority_updates,
            priority_update_prob=workload.spec.priority_update_prob,
            **STACK_MODES[mode],
            **options.stack_settings(),
        )
    except TypeError as err:  # a knob the stack's settings do not define
        raise ValueError(f"{err}: this version of the stack cannot take that bench option") from err


def run_stack_mode(
    mode: str,
    preset: Preset,
    workload: Workload,
    out: pathlib.Path,
    addr: str | None,
    progress: bool,
    stall_timeout_s: float = 60.0,
    options: ModelOptions = NO_OPTIONS,
) -> ModeRun:
    """Start the mode's stack (or use the one at addr), replay the workload against it, stop it."""
    if addr:
        r = asyncio.run(replay(addr, workload, mode, progress, stall_timeout_s))
        notes = f"replayed against a running stack at {addr}: its own settings apply, not this mode's"
    else:
        from svc_common.stack import Stack

        config = stack_config(mode, preset, workload, options)
        with Stack(config, log_dir=str(out / "logs" / mode)) as stack:
            r = asyncio.run(replay(stack.addr, workload, mode, progress, stall_timeout_s))
        sc = config.scheduler
        notes = (
            f"stack: preemption={sc.preemption}, block_groups={sc.block_groups}, "
            f"async_swaps={sc.async_swaps}, kv_reuse={sc.kv_reuse}, policy={sc.policy}"
        )
        notes += "".join(f", {k}={v}" for k, v in options.stack_settings().items())
    if r.stalled:
        notes += f"; STALLED: no token for {stall_timeout_s:.0f} s with requests in flight, replay cut short"
    return ModeRun(r.records, r.wall_s, r.counters, r.stalled, notes)


def run_peer_mode(
    model_dir: str,
    tokenizer: Any,
    preset: Preset,
    workload: Workload,
    progress: bool,
    options: ModelOptions = NO_OPTIONS,
) -> ModeRun:
    """Replay the workload as waves on `transformers`' continuous batching, the model loaded as the stack loads it."""
    from tqdm.auto import tqdm

    from fastswitch_bench.peer import load_model, run_transformers_cb_conversations

    model = load_model(model_dir, dtype=options.dtype, load_format=options.load_format)
    convs = workload.conversations
    bar = tqdm(total=workload.num_requests, desc="  transformers-cb", unit="req", leave=False, disable=not progress)
    result = run_transformers_cb_conversations(
        model_dir,
        tokenizer,
        [[(t.prompt, t.max_tokens) for t in c.turns] for c in convs],
        max_batch_tokens=preset.max_step_tokens,
        model=model,
        on_turn=lambda _: bar.update(1),
    )
    bar.close()
    records = [
        RequestRecord(
            conversation=convs[t.conversation].conversation_id,
            turn=t.turn,
            tenant=convs[t.conversation].tenant,
            priority=convs[t.conversation].priority,
            tokens=len(t.output),
            ttft_s=t.ttft_s,
            tbt_s=t.tbt_s,
            start_s=t.start_s,
            end_s=t.end_s,
            prompt_tokens=t.prompt_tokens,
        )
        for t in result.turns
    ]
    knobs = [f"{k}={v}" for k in ("model", "dtype", "load_format") if (v := getattr(options, k)) is not None]
    notes = PEER_NOTES + (f" Loaded with {', '.join(knobs)}." if knobs else "")
    return ModeRun(records, result.wall_s, {}, False, notes)
