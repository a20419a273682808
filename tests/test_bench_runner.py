"""The benchmark harness: percentile maths, the JSON schema, and a smoke run of the tiny preset."""

from __future__ import annotations

import json
import math

import pytest

from fastswitch.bench.runner import markdown, percentiles, run

CONTRACT_KEYS = {
    "ttft_p50", "ttft_p95", "ttft_p99", "ttft_p999", "tbt_p50", "tbt_p95", "tbt_p99", "tbt_p999",
    "throughput_tok_s", "preemptions", "swap_bytes", "copy_calls", "swap_stall_s",
}  # fmt: skip


def test_percentiles_interpolate_linearly_and_are_nan_when_empty() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    p = percentiles(values, "x")
    assert p["x_p50"] == pytest.approx(50.5)
    assert p["x_p99"] == pytest.approx(99.01)
    assert p["x_p999"] == pytest.approx(99.901)
    assert all(math.isnan(v) for v in percentiles([], "y").values())


def test_unknown_modes_are_rejected_with_the_valid_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown modes"):
        run("tiny", ["warp-speed"], tmp_path)


@pytest.mark.model
def test_tiny_preset_runs_both_sides_and_writes_json_markdown_and_plot(tmp_path) -> None:
    results = run("tiny", ["fastswitch", "transformers-cb"], tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"modes", "workload", "machine"}
    for mode in ("fastswitch", "transformers-cb"):
        assert CONTRACT_KEYS <= set(saved["modes"][mode]), mode
        assert saved["modes"][mode]["throughput_tok_s"] > 0
        assert saved["modes"][mode]["generated_tokens"] == 4 * 8
    assert "| fastswitch |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert markdown(results).count("\n") == 4
