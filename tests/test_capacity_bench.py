"""The scheduler-capacity bench runs end to end on a small fleet (so it cannot rot unnoticed)."""

from __future__ import annotations

from fastswitch_bench import capacity


def test_capacity_bench_times_full_decode_steps_on_every_fake_node() -> None:
    result = capacity.run(nodes=3, running=8, warmup=2, steps=4, prompt_len=16)
    assert result.node_steps == 3 * 4
    assert result.tokens == 3 * 4 * 8  # every node full: one token per running request per timed step
    assert 0 < result.scheduler_s <= result.wall_s
