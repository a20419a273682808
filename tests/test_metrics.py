"""The scheduler's Prometheus metrics: bounded labels, a scrape from another thread, and, on a real
bench run, histograms that agree with what the bench's own client measured."""

from __future__ import annotations

import asyncio
import math
import threading
import urllib.request
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scheduler_svc.metrics import OTHER, Metrics, TenantLabels

# -- without a model ------------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self) -> None:
        self.counters: dict[str, float] = {
            "preemptions_swap": 3,
            "preemptions_recompute": 1,
            "swap_out_bytes": 4096,
            "device_blocks_total": 64,
            "device_blocks_free": 60,
            "running": 2,
        }
        self.tenants: dict[str, tuple[float, int, int]] = {}
        self.read_in: list[int] = []

    def stats(self) -> dict[str, float]:
        self.read_in.append(threading.get_ident())
        return dict(self.counters)

    def tenant_stats(self) -> dict[str, tuple[float, int, int]]:
        return dict(self.tenants)


def families(metrics: Metrics) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    """The sample `name` (or `name_total`) with exactly these labels."""
    return next(
        s.value for f in fams.values() for s in f.samples if s.name in (name, f"{name}_total") and s.labels == labels
    )


def test_tenant_labels_stay_bounded_and_never_change() -> None:
    labels = TenantLabels(2)
    assert [labels.label(t) for t in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    assert labels.label("d") == OTHER
    fresh = TenantLabels(2)
    assert fresh.label("x", admit=False) == OTHER  # a rejected request takes no slot
    assert fresh.label("x") == "x"


def test_engine_statistics_become_counters_and_gauges_at_scrape_time() -> None:
    engine = FakeEngine()
    metrics = Metrics(engine, max_tenants=1)
    fams = families(metrics)
    assert value(fams, "fastswitch_preemptions", mode="swap") == 3
    assert value(fams, "fastswitch_preemptions", mode="recompute") == 1
    assert value(fams, "fastswitch_swap_bytes", direction="out") == 4096
    assert value(fams, "fastswitch_kv_blocks_used", pool="device") == 4
    assert value(fams, "fastswitch_requests_running") == 2
    engine.counters["preemptions_swap"] = 5  # read again at the next scrape: one source of truth
    assert value(families(metrics), "fastswitch_preemptions", mode="swap") == 5


def test_per_tenant_service_sums_the_tenants_beyond_the_limit_as_other() -> None:
    engine = FakeEngine()
    metrics = Metrics(engine, max_tenants=1)
    metrics.on_token("r1", "alice", arrival=0.0)  # alice is served first: she gets the one label
    engine.tenants = {"alice": (10.0, 4, 3), "bob": (5.0, 3, 1), "carol": (7.0, 5, 1)}
    fams = families(metrics)
    assert value(fams, "fastswitch_tenant_service", tenant="alice") == 10.0
    assert value(fams, "fastswitch_tenant_service", tenant=OTHER) == 12.0
    assert value(fams, "fastswitch_tenant_generated_tokens", tenant=OTHER) == 2
    assert {s.labels["tenant"] for s in fams["fastswitch_tenant_service"].samples} == {"alice", OTHER}


def test_call_sites_observe_ttft_then_tbt_and_count_outcomes() -> None:
    metrics = Metrics(FakeEngine())
    metrics.on_scheduled(["r"], {"r": type("Live", (), {"started": 0.0})()})
    metrics.on_token("r", "t", arrival=0.0)
    metrics.on_token("r", "t", arrival=0.0)
    metrics.on_token("r", "t", arrival=0.0)
    metrics.on_finish("r", "t", "length", arrival=0.0)
    metrics.on_rejected("t")
    fams = families(metrics)
    assert value(fams, "fastswitch_time_to_first_token_seconds_count", tenant="t") == 1
    assert value(fams, "fastswitch_time_between_tokens_seconds_count") == 2
    assert value(fams, "fastswitch_request_queue_seconds_count") == 1
    assert value(fams, "fastswitch_requests", outcome="length", tenant="t") == 1
    assert value(fams, "fastswitch_requests", outcome="rejected", tenant="t") == 1
    metrics.on_token("r2", "t", arrival=0.0)  # a new request: its first token is a TTFT again
    assert value(families(metrics), "fastswitch_time_to_first_token_seconds_count", tenant="t") == 2


def test_a_scrape_from_another_thread_reads_the_engine_on_its_event_loop() -> None:
    engine = FakeEngine()
    metrics = Metrics(engine)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    try:
        metrics.bind_loop(loop)
        engine.read_in.clear()  # (registering the collector read it once, where the engine was made)
        metrics.exposition()  # from this (the test's) thread, as prometheus_client's HTTP server does
    finally:
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
        loop.close()
    assert engine.read_in == [loop_thread.ident]


# -- a bench run on the real model ------------------------------------------------------------------------


def histogram(fams: dict[str, Any], name: str, tenants: set[str]) -> list[tuple[float, float]]:
    """Cumulative (le, count) over the given tenants."""
    buckets: dict[float, float] = {}
    for s in fams[name].samples:
        if s.name == f"{name}_bucket" and s.labels.get("tenant") in tenants:
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    return sorted(buckets.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Prometheus' histogram_quantile (linear within the bucket); returns (estimate, bucket low, bucket high)."""
    total = buckets[-1][1]
    rank = q * total
    low, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return low, low, le
            return low + (le - low) * (rank - below) / max(cumulative - below, 1e-12), low, le
        low, below = le, cumulative
    raise AssertionError("empty histogram")


def diff(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    old = dict(before)
    return [(le, count - old.get(le, 0.0)) for le, count in after]


def scrape(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return {f.name: f for f in text_string_to_metric_families(resp.read().decode())}


@pytest.mark.model
@pytest.mark.slow
def test_metrics_histograms_agree_with_the_bench_on_the_same_run(model_dir, tokenizer) -> None:
    from fastswitch_bench.presets import PRESETS
    from fastswitch_bench.replay import replay
    from fastswitch_bench.runner import build_workload
    from tests.conftest import free_port, running_stack

    preset = PRESETS["tiny"]
    workload = build_workload(preset, tokenizer, "SmolLM2-135M-Instruct")
    tenants = {c.tenant for c in workload.conversations}
    assert "default" not in tenants  # the bench's warm-up request is the default tenant's: left out below
    settings = dict(
        device_blocks=preset.device_blocks, host_blocks=preset.host_blocks, max_running=preset.max_running,
        policy=preset.policy, http_port=free_port(), metrics_port=free_port(),
    )  # fmt: skip
    with running_stack(**settings) as stack:
        metrics_url = f"{stack.http_url}/metrics"
        before = scrape(metrics_url)
        run = asyncio.run(replay(stack.addr, workload, "fastswitch", progress=False))
        after = scrape(metrics_url)
        direct = scrape(f"http://127.0.0.1:{settings['metrics_port']}/metrics")  # --metrics-port

    ttfts = [r.ttft_s for r in run.records if r.ttft_s is not None]
    assert len(ttfts) == workload.num_requests and not any(r.error for r in run.records)
    name = "fastswitch_time_to_first_token_seconds"
    buckets = diff(histogram(after, name, tenants), histogram(before, name, tenants))
    assert buckets[-1][1] == len(ttfts), "one TTFT observation per bench request"
    for q in (0.5, 0.9):
        estimate, low, high = histogram_quantile(q, buckets)
        exact = float(np.percentile(ttfts, q * 100))
        width = high - low
        assert abs(estimate - exact) <= width, (
            f"P{q * 100:.0f} TTFT: histogram {estimate:.3f} s (bucket {low}-{high}) vs bench {exact:.3f} s"
        )
    finished = sum(
        s.value
        for s in after["fastswitch_requests"].samples
        if s.labels.get("tenant") in tenants and s.labels["outcome"] == "length"
    )
    assert finished == workload.num_requests  # ignore_eos: every turn ends at its max_tokens
    tbt = [g for r in run.records for g in r.tbt_s]
    tbt_count = value(after, "fastswitch_time_between_tokens_seconds_count") - value(
        before, "fastswitch_time_between_tokens_seconds_count"
    )
    assert tbt_count - len(tbt) in (0, 1)  # the warm-up request's second token, if it had one
    assert {n for n in after if not n.startswith("fastswitch_http_")} == set(direct)


def test_the_grafana_dashboard_queries_only_metrics_that_exist() -> None:
    import json
    import pathlib
    import re

    from openai_svc.app import HttpMetrics

    exposed = set(families(Metrics(FakeEngine())))
    exposed |= {f.name for f in text_string_to_metric_families(generate_latest(HttpMetrics().registry).decode())}
    dashboard = json.loads((pathlib.Path(__file__).parent.parent / "deploy/grafana/fastswitch.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|total)$", "", m) for e in exprs for m in re.findall(r"fastswitch_\w+", e)}
    assert used and not used - exposed, f"the dashboard queries metrics nobody exports: {sorted(used - exposed)}"
