"""The benchmark harness: percentile maths, the per-mode summary, ratios vs vllm-like, the JSON schema,
the Markdown report, each mode's stack settings, and a smoke run of the tiny preset."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from fastswitch_bench.modes import ALL_MODES, parse_modes, stack_config
from fastswitch_bench.plots import plot
from fastswitch_bench.presets import PRESETS
from fastswitch_bench.replay import RequestRecord
from fastswitch_bench.report import RATIO_KEYS, add_ratios, markdown, percentiles, summarise, write_json
from fastswitch_bench.runner import run
from fastswitch_bench.workload import generate

CONTRACT_KEYS = {
    "ttft_p50", "ttft_p95", "ttft_p99", "ttft_p999", "tbt_p50", "tbt_p95", "tbt_p99", "tbt_p999",
    "throughput_tok_s", "preemptions", "swap_bytes", "copy_calls", "swap_stall_s",
}  # fmt: skip
REPORTED_KEYS = CONTRACT_KEYS | {
    "generated_tokens", "wall_s", "swap_out_bytes", "swap_in_bytes", "swap_stall_share", "recomputed_tokens",
    "reused_prefix_tokens", "later_ttft_p50", "later_ttft_p99", "later_ttft_p999", "first_ttft_p50",
    "first_ttft_p99", "ratios_vs_vllm_like",
}  # fmt: skip


def test_percentiles_interpolate_linearly_and_are_nan_when_empty() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    p = percentiles(values, "x")
    assert p["x_p50"] == pytest.approx(50.5)
    assert p["x_p99"] == pytest.approx(99.01)
    assert p["x_p999"] == pytest.approx(99.901)
    assert all(math.isnan(v) for v in percentiles([], "y").values())


def test_unknown_modes_are_rejected_with_the_valid_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown modes.*fastswitch"):
        run("tiny", ["warp-speed"], tmp_path)


def test_no_modes_means_all_of_them_with_the_peer_last() -> None:
    assert parse_modes(None) == list(ALL_MODES)
    assert ALL_MODES == ("fastswitch", "no-groups", "no-async", "no-reuse", "vllm-like", "recompute", "transformers-cb")
    assert parse_modes("transformers-cb,vllm-like, fastswitch") == ["fastswitch", "vllm-like", "transformers-cb"]


def _records() -> list[RequestRecord]:
    return [
        RequestRecord("c0", 1, "t0", 1, tokens=3, ttft_s=1.0, tbt_s=[0.1, 0.2]),
        RequestRecord("c0", 2, "t0", 1, tokens=3, ttft_s=2.0, tbt_s=[0.1, 0.3]),
        RequestRecord("c1", 1, "t1", 0, tokens=2, ttft_s=4.0, tbt_s=[0.5]),
        RequestRecord("c1", 2, "t1", 0, error="boom"),
    ]


def test_summary_splits_first_and_later_turns_and_reads_missing_counters_as_zero() -> None:
    counters = {"preemptions": 3, "swap_out_bytes": 100, "swap_in_bytes": 50, "swap_stall_s": 1.0, "copy_calls": 7}
    s = summarise(_records(), wall_s=4.0, counters=counters)
    assert s["first_ttft_p50"] == pytest.approx(2.5)  # turns 1: 1.0 and 4.0
    assert s["later_ttft_p50"] == pytest.approx(2.0)  # turn 2 of c0 (c1's failed)
    assert s["ttft_p50"] == pytest.approx(2.0)
    assert s["tbt_p50"] == pytest.approx(0.2)
    assert s["generated_tokens"] == 8 and s["throughput_tok_s"] == pytest.approx(2.0)
    assert s["failed_requests"] == 1 and s["requests"] == 4
    assert s["swap_bytes"] == 150 and s["swap_stall_share"] == pytest.approx(0.25)
    assert s["reused_prefix_tokens"] == 0 and s["swap_out_bytes_saved"] == 0  # not reported by this server
    assert set(s["tenants"]) == {"t0", "t1"} and s["tenants"]["t0"]["generated_tokens"] == 6


def test_ratios_vs_vllm_like_point_the_same_way_for_latency_and_throughput() -> None:
    ours = summarise(_records(), 2.0, {})
    theirs = summarise(_records(), 4.0, {})
    theirs.update(ttft_p99=2 * ours["ttft_p99"], tbt_p999=ours["tbt_p999"] / 2)
    modes = {"fastswitch": ours, "vllm-like": theirs}
    add_ratios(modes)
    r = ours["ratios_vs_vllm_like"]
    assert set(r) == set(RATIO_KEYS)
    assert r["ttft_p99"] == pytest.approx(2.0)  # twice as fast: 2x better
    assert r["tbt_p999"] == pytest.approx(0.5)  # twice as slow
    assert r["throughput_tok_s"] == pytest.approx(2.0)  # half the wall time for the same tokens
    assert all(v == pytest.approx(1.0) for v in theirs["ratios_vs_vllm_like"].values() if v is not None)


def test_ratios_are_null_but_present_without_the_baseline() -> None:
    modes = {"fastswitch": summarise(_records(), 2.0, {})}
    add_ratios(modes)
    assert set(modes["fastswitch"]["ratios_vs_vllm_like"]) == set(RATIO_KEYS)
    assert all(v is None for v in modes["fastswitch"]["ratios_vs_vllm_like"].values())


def _results() -> dict:
    workload = generate(PRESETS["tiny"].workload)
    modes = {m: summarise(_records(), 3.0, {"preemptions": 1}) for m in ALL_MODES}
    modes["recompute"] = summarise([], 1.0, {})  # no requests at all: NaN tails
    add_ratios(modes)
    return {"modes": modes, "workload": {"summary": workload.summary()}, "machine": {"cpu_count": 2}}


def test_results_json_is_strict_json_with_stable_keys(tmp_path) -> None:
    results = _results()
    write_json(tmp_path / "r.json", results)

    def no_nan(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    saved = json.loads((tmp_path / "r.json").read_text(), parse_constant=no_nan)
    assert set(saved) == {"modes", "workload", "machine"}
    for mode in ALL_MODES:
        assert REPORTED_KEYS <= set(saved["modes"][mode]), mode
        assert set(saved["modes"][mode]["ratios_vs_vllm_like"]) == set(RATIO_KEYS)
    assert saved["modes"]["recompute"]["ttft_p99"] is None


def test_markdown_has_a_row_per_mode_in_each_of_its_three_tables() -> None:
    results = _results()
    text = markdown(results)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 * (1 + len(ALL_MODES))  # header + one row per mode, three tables
    assert sum(line.startswith("| fastswitch |") for line in rows) == 3
    assert "| recompute | - |" in text  # no data: a dash, not "nan"
    assert "transformers-cb has no priorities" in text


def test_plots_are_written(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    results = _results()
    requests = {m: [asdict(r) for r in _records()] for m in ALL_MODES}
    plot(results, requests, tmp_path)
    for name in ("ttft_cdf.png", "tbt_cdf.png", "throughput.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_each_stack_mode_switches_exactly_its_own_mechanism() -> None:
    preset = PRESETS["small"]
    workload = generate(preset.workload)

    def flags(mode: str) -> tuple:
        c = stack_config(mode, preset, workload).scheduler
        return c.preemption, c.block_groups, c.async_swaps, c.kv_reuse

    assert flags("fastswitch") == ("swap", True, True, True)
    assert flags("no-groups") == ("swap", False, True, True)
    assert flags("no-async") == ("swap", True, False, True)
    assert flags("no-reuse") == ("swap", True, True, False)
    assert flags("vllm-like")[0] == "vllm-like"
    assert flags("recompute")[0] == "recompute"
    c = stack_config("fastswitch", preset, workload)
    assert (c.scheduler.policy, c.scheduler.priority_updates, c.scheduler.priority_update_prob) == (
        "priority",
        preset.workload.priority_updates,
        preset.workload.priority_update_prob,
    )
    assert c.executor.device_blocks == preset.device_blocks


def test_small_preset_pool_cannot_hold_the_live_conversations() -> None:
    """Preemption and swapping must happen: the conversations' final contexts far exceed the device pool."""
    preset = PRESETS["small"]
    w = generate(preset.workload)
    per_turn_overhead = 5  # chat template tokens around each message
    contexts = [
        30 + sum(t.prompt_tokens + t.max_tokens + 2 * per_turn_overhead for t in c.turns) for c in w.conversations
    ]
    assert sum(contexts) > 2.5 * preset.device_blocks * preset.block_size
    assert max(contexts) < preset.device_blocks * preset.block_size  # but each one fits on its own


@pytest.mark.model
def test_tiny_preset_runs_two_modes_and_writes_every_output(tmp_path) -> None:
    results = run("tiny", ["fastswitch", "vllm-like"], tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) == {"modes", "workload", "machine"}
    expected_tokens = saved["workload"]["summary"]["total_output_tokens"]
    for mode in ("fastswitch", "vllm-like"):
        m = saved["modes"][mode]
        assert REPORTED_KEYS <= set(m), mode
        assert m["failed_requests"] == 0, mode
        assert m["generated_tokens"] == expected_tokens, mode  # ignore_eos: every mode, the same tokens
        assert m["throughput_tok_s"] > 0 and m["later_ttft_p50"] is not None
    assert saved["modes"]["vllm-like"]["ratios_vs_vllm_like"]["ttft_p99"] == pytest.approx(1.0)
    assert saved["modes"]["fastswitch"]["ratios_vs_vllm_like"]["ttft_p99"] > 0
    assert saved["modes"]["fastswitch"]["reused_prefix_tokens"] > 0  # later turns reuse their conversation's KV
    assert saved["modes"]["vllm-like"]["reused_prefix_tokens"] == 0
    requests = json.loads((tmp_path / "requests.json").read_text())
    assert len(requests["fastswitch"]) == saved["workload"]["summary"]["requests"]
    assert "| fastswitch |" in (tmp_path / "results.md").read_text()
    for name in ("ttft_cdf.png", "tbt_cdf.png", "throughput.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert markdown(results) == (tmp_path / "results.md").read_text()
    # the saved workload replays exactly (the next run's workload.json is the same file)
    from fastswitch_bench.workload import Workload

    assert Workload.load(tmp_path / "workload.json").num_requests == saved["workload"]["summary"]["requests"]
