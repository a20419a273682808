"""The bench's presets: a workload spec plus the stack settings it runs under.

`tiny` is the smoke test, `small` the issue's every-mode comparison on 2 CPU cores, `reuse` the
KV-reuse comparison (long histories), `gpu` full ShareGPT lengths for a GPU. docs/bench-method.md
gives each preset's numbers and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastswitch_bench.workload import WorkloadSpec


@dataclass(slots=True)
class Preset:
    """A workload spec plus the stack settings it runs under (the same for every stack mode)."""

    workload: WorkloadSpec
    device_blocks: int
    host_blocks: int
    max_running: int
    max_step_tokens: int
    block_size: int = 16
    policy: str = "priority"


PRESETS: dict[str, Preset] = {
    # Smoke test: 3 short conversations of 2-3 turns, ShareGPT's lengths scaled by 1/30.
    "tiny": Preset(
        WorkloadSpec(
            conversations=3,
            rate_per_s=4.0,
            min_turns=2,
            max_turns=3,
            mean_turns=2.5,
            scale=30.0,  # means of 5.4 and 11.3 tokens
            min_input_tokens=2,
            max_input_tokens=24,
            max_output_tokens=16,
            think_mean_s=0.1,
            tenants=2,
            priority_updates="random",
            priority_update_prob=0.05,
        ),
        device_blocks=48,
        host_blocks=256,
        max_running=8,
        max_step_tokens=256,
    ),
    # The preset: all seven modes in under 5 minutes on 2 CPU cores. ShareGPT's lengths scaled by
    # 1/32 (means of 5.0 and 10.6 tokens); the pool (512 tokens) holds about a third of the
    # conversations' final contexts, so turns preempt each other and kept KV spills to the host.
    "small": Preset(
        WorkloadSpec(
            conversations=8,
            rate_per_s=3.0,
            min_turns=1,
            max_turns=12,
            scale=32.0,
            min_input_tokens=2,
            max_input_tokens=24,
            min_output_tokens=4,
            max_output_tokens=32,
            think_mean_s=0.25,
            tenants=4,
            priority_updates="random",
            priority_update_prob=0.02,
        ),
        device_blocks=32,
        host_blocks=1024,
        max_running=16,
        max_step_tokens=256,
    ),
    # Issue 4's comparison of KV reuse on and off (`--modes fastswitch,no-reuse`): long user turns
    # (ShareGPT's input mean halved) and short answers (its output mean / 16), so that later turns
    # carry a long history. The pool (2,048 tokens) holds about half of the conversations' final
    # contexts: idle conversations' KV spills to the host between turns.
    "reuse": Preset(
        WorkloadSpec(
            conversations=6,
            rate_per_s=0.5,
            max_turns=10,
            input_mean_tokens=80.0,
            output_mean_tokens=21.0,
            min_input_tokens=8,
            max_input_tokens=256,
            min_output_tokens=4,
            max_output_tokens=48,
            think_mean_s=1.0,
            tenants=3,
            priority_updates="random",
            priority_update_prob=0.02,
        ),
        device_blocks=128,
        host_blocks=1024,
        max_running=16,
        max_step_tokens=256,
    ),
    # For a GPU (not runnable on 2 CPU cores): ShareGPT's lengths unscaled, 200 conversations.
    "gpu": Preset(
        WorkloadSpec(
            conversations=200,
            rate_per_s=2.0,
            min_turns=1,
            max_turns=20,
            scale=1.0,
            min_input_tokens=4,
            max_input_tokens=1024,
            min_output_tokens=4,
            max_output_tokens=1024,
            think_mean_s=2.0,
            tenants=8,
            priority_updates="random",
            priority_update_prob=0.02,
            max_context_tokens=8192,  # the shipped llama3-8b's context (a longer history was refused)
        ),
        device_blocks=4096,
        # 24,576 host blocks: 48 GiB pinned with an 8B shape's 2 MiB blocks (the lent machine has 128 GiB;
        # 65,536 asked for all of it), 6x the device pool.
        host_blocks=24576,
        max_running=128,
        max_step_tokens=2048,
    ),
}
