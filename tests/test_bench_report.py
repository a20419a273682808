"""The bench's report: percentile maths, the per-mode summary, ratios vs vllm-like, the JSON schema, the
tail requests and the phase their time went to, results.md, and the plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from fastswitch_bench.modes import ALL_MODES
from fastswitch_bench.plots import plot
from fastswitch_bench.presets import PRESETS
from fastswitch_bench.replay import PHASES, RequestRecord
from fastswitch_bench.report import RATIO_KEYS, add_ratios, markdown, percentiles, summarise, tail, went_to, write_json
from fastswitch_bench.workload import generate

CONTRACT_KEYS = {
    "ttft_p50", "ttft_p95", "ttft_p99", "ttft_p999", "tbt_p50", "tbt_p95", "tbt_p99", "tbt_p999",
    "throughput_tok_s", "preemptions", "swap_bytes", "copy_calls", "swap_stall_s",
}  # fmt: skip
REPORTED_KEYS = CONTRACT_KEYS | {
    "generated_tokens", "wall_s", "swap_out_bytes", "swap_in_bytes", "swap_stall_share", "recomputed_tokens",
    "reused_prefix_tokens", "later_ttft_p50", "later_ttft_p99", "later_ttft_p999", "first_ttft_p50",
    "first_ttft_p99", "ratios_vs_vllm_like", "tails",
}  # fmt: skip


def phases(**seconds: float) -> dict[str, float]:
    return {p: seconds.get(p, 0.0) for p in PHASES}


def test_percentiles_interpolate_linearly_and_are_nan_when_empty() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    p = percentiles(values, "x")
    assert p["x_p50"] == pytest.approx(50.5)
    assert p["x_p99"] == pytest.approx(99.01)
    assert p["x_p999"] == pytest.approx(99.901)
    assert all(math.isnan(v) for v in percentiles([], "y").values())


def _records(with_phases: bool = False) -> list[RequestRecord]:
    records = [
        RequestRecord("c0", 1, "t0", 1, tokens=3, ttft_s=1.0, tbt_s=[0.1, 0.2]),
        RequestRecord("c0", 2, "t0", 1, tokens=3, ttft_s=2.0, tbt_s=[0.1, 0.3]),
        RequestRecord("c1", 1, "t1", 0, tokens=2, ttft_s=4.0, tbt_s=[0.5]),
        RequestRecord("c1", 2, "t1", 0, error="boom"),
    ]
    if with_phases:
        records[0].phases = phases(queued=0.2, prefill=0.7, decode=0.3)
        records[1].phases = phases(queued=0.1, prefill=0.3, swap_in=1.5, decode=0.4)
        records[2].phases = phases(queued=3.5, prefill=0.4, preempted=0.4, decode=0.5)
    return records


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


# -- the tails explained --------------------------------------------------------------------------------


def test_the_p99_ttft_request_is_the_one_at_or_just_above_the_percentile() -> None:
    records = [RequestRecord(f"c{i}", 1, "t", 0, ttft_s=float(i)) for i in range(1, 201)]  # 1..200 s
    t = tail(records, "ttft", 99.0)  # P99 = 198.01 s: the request with 199 s holds it
    assert (t["conversation"], t["seconds"]) == ("c199", 199.0)
    assert tail([], "ttft", 99.0) is None


def test_the_p999_tbt_tail_is_the_request_holding_that_gap() -> None:
    records = [RequestRecord(f"c{i}", 1, "t", 0, ttft_s=0.1, tbt_s=[0.01] * 100) for i in range(5)]
    records[3].tbt_s[60] = 2.0  # one long gap among 500: P99.9 (about 1.0 s) lies between it and the rest
    records[3].phases = phases(preempted=1.8, decode=3.0)
    t = tail(records, "tbt", 99.9)
    assert (t["conversation"], t["seconds"], t["went_to"]) == ("c3", 2.0, "preempted")


def test_a_ttft_goes_to_its_largest_phase_before_decoding() -> None:
    assert went_to("ttft", 5.0, phases(queued=1.0, blocked=0.5, prefill=0.2, decode=9.0)) == "queued"
    assert went_to("ttft", 5.0, phases(queued=1.0, swap_in=3.0, decode=9.0)) == "swap_in"
    assert went_to("ttft", 5.0, None) is None  # the server reported no phases
    assert went_to("ttft", 5.0, phases()) is None


def test_a_gap_goes_to_an_interruption_covering_half_of_it_else_to_slow_decode_steps() -> None:
    assert went_to("tbt", 1.0, phases(preempted=0.9, swap_in=0.3, decode=4.0)) == "preempted"
    assert went_to("tbt", 1.0, phases(blocked=0.6, decode=4.0)) == "blocked"
    assert went_to("tbt", 1.0, phases(preempted=0.2, queued=3.0, decode=4.0)) == "decode"


def test_summary_names_the_tail_requests_and_where_their_time_went() -> None:
    s = summarise(_records(with_phases=True), 4.0, {})
    ttft, tbt = s["tails"]["ttft_p99"], s["tails"]["tbt_p999"]
    assert (ttft["conversation"], ttft["turn"], ttft["seconds"], ttft["went_to"]) == ("c1", 1, 4.0, "queued")
    assert (tbt["conversation"], tbt["turn"], tbt["seconds"]) == ("c1", 1, 0.5)
    assert tbt["went_to"] == "preempted"  # 0.4 s preempted covers at least half the 0.5 s gap
    assert ttft["phases"] == _records(with_phases=True)[2].phases


# -- results.json and results.md ------------------------------------------------------------------------


def _results(with_phases: bool = False) -> dict:
    workload = generate(PRESETS["tiny"].workload)
    modes = {m: summarise(_records(with_phases), 3.0, {"preemptions": 1}) for m in ALL_MODES}
    modes["recompute"] = summarise([], 1.0, {})  # no requests at all: NaN tails
    modes["transformers-cb"] = summarise(_records(), 3.0, {})  # the peer never has phases
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
    assert saved["modes"]["recompute"]["tails"] == {"ttft_p99": None, "tbt_p999": None}


def test_markdown_has_a_row_per_mode_in_each_of_its_three_tables() -> None:
    results = _results()
    text = markdown(results)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 * (1 + len(ALL_MODES))  # header + one row per mode, three tables
    assert sum(line.startswith("| fastswitch |") for line in rows) == 3
    assert "| recompute | - |" in text  # no data: a dash, not "nan"
    assert "transformers-cb has no priorities" in text


def test_markdown_says_when_the_server_reported_no_phases() -> None:
    text = markdown(_results())
    assert "No per-request phases from the server in fastswitch, no-groups" in text
    assert "transformers-cb, " not in text.split("No per-request phases")[1]  # the peer has none by nature


def test_markdown_names_the_phase_each_tail_went_to() -> None:
    text = markdown(_results(with_phases=True))
    tails = [line for line in text.splitlines() if line.startswith("| fastswitch | T")]
    assert tails == [
        "| fastswitch | TTFT p99 | c1 turn 1 | 4.000 | 3.50 | 0.00 | 0.00 | 0.40 | 0.40 | 0.50 | **queued** |",
        "| fastswitch | TBT p99.9 | c1 turn 1 | 0.500 | 3.50 | 0.00 | 0.00 | 0.40 | 0.40 | 0.50 | **preempted** |",
    ]
    assert "| transformers-cb | TTFT" not in text
    assert "No per-request phases from the server in recompute" in text  # it ran no requests


# -- plots ----------------------------------------------------------------------------------------------


def test_plots_are_written_with_the_tail_phases_when_there_are_phases(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    requests = {m: [asdict(r) for r in _records()] for m in ALL_MODES}
    plot(_results(with_phases=True), requests, tmp_path)
    for name in ("ttft_cdf.png", "tbt_cdf.png", "throughput.png", "tail_phases.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    (tmp_path / "none").mkdir()
    plot(_results(), requests, tmp_path / "none")
    assert not (tmp_path / "none" / "tail_phases.png").exists()
