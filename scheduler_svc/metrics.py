"""Prometheus metrics of the scheduler, where the facts are.

Latencies are observed as they happen, at three narrow call sites in the engine: a step was planned
(queue time of the requests it starts), a token was emitted (time to first token, time between
tokens), a request finished (end-to-end latency, outcome). Everything else (running and waiting
requests, KV blocks in use, preemptions, swap bytes, copy calls, stall seconds, reused and recomputed
prefix tokens, per-tenant service) is read from the engine's own statistics at scrape time, so there
is one source of truth for each figure and no second counter that can drift from `fastswitch stats`.

Tenant labels are bounded: the first `max_tenants` tenants served get a label of their own, every
later one is counted under `other`. A tenant never changes label, so every series only grows.

Served in the text exposition format by the `GetMetrics` RPC (the HTTP front's `/metrics` relays it)
and, with `--metrics-port`, by prometheus_client's own HTTP server for gRPC-only deployments.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

OTHER = "other"
SNAPSHOT_TIMEOUT_S = 5.0

# Seconds. TTFT and queue time span a GPU's milliseconds to a loaded CPU's tens of seconds.
TTFT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
)  # fmt: skip
TBT_BUCKETS = (
    0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _Stats(Protocol):
    """What the collector reads from the engine at scrape time."""

    def stats(self) -> dict[str, float]: ...
    def tenant_stats(self) -> dict[str, tuple[float, int, int]]: ...


class TenantLabels:
    """The bounded label set: the first `limit` tenants keep their own label, the rest are `other`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._named: set[str] = set()

    def label(self, tenant: str, admit: bool = True) -> str:
        """The tenant's label; `admit=False` looks up without taking a free slot (rejected requests)."""
        if tenant in self._named:
            return tenant
        if admit and len(self._named) < self.limit and tenant != OTHER:
            self._named.add(tenant)
            return tenant
        return OTHER


# (metric name without `_total`, help, stats key, label values) for counters read at scrape time.
_COUNTERS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("fastswitch_preemptions", "Requests preempted, by what happened to their KV", "preemptions_swap",
     {"mode": "swap"}),
    ("fastswitch_preemptions", "", "preemptions_recompute", {"mode": "recompute"}),
    ("fastswitch_swap_bytes", "KV bytes copied between the device and the host pool", "swap_out_bytes",
     {"direction": "out"}),
    ("fastswitch_swap_bytes", "", "swap_in_bytes", {"direction": "in"}),
    ("fastswitch_swap_saved_bytes", "KV bytes not copied out because the host copy was still valid",
     "swap_out_bytes_saved", {}),
    ("fastswitch_swap_copy_calls", "Copy calls the swap daemons made", "copy_calls", {}),
    ("fastswitch_swap_stall_seconds", "Seconds the step loop waited for swaps to land", "swap_stall_s", {}),
    ("fastswitch_swap_fallback_recompute", "Swaps given up for recomputation (no host room, no daemon, failure)",
     "swap_fallback_recompute", {}),
    ("fastswitch_prefix_tokens", "Conversation history tokens whose KV was reused or computed again",
     "reused_prefix_tokens", {"kind": "reused"}),
    ("fastswitch_prefix_tokens", "", "recomputed_prefix_tokens", {"kind": "recomputed"}),
    ("fastswitch_recomputed_tokens", "Tokens computed again after a preemption dropped their KV",
     "recomputed_tokens", {}),
    ("fastswitch_generated_tokens", "Tokens generated", "generated_tokens", {}),
    ("fastswitch_prompt_tokens", "Prompt tokens computed (recomputation excluded)", "prompt_tokens", {}),
    ("fastswitch_steps", "Steps sent to the executor", "steps", {}),
    ("fastswitch_forward_seconds", "Seconds the executor spent in forward passes", "forward_s", {}),
    ("fastswitch_priority_changes", "Run-time priority changes by the priority-update driver",
     "priority_changes", {}),
    ("fastswitch_executor_reconnects", "Times the executor stream was lost and re-established",
     "executor_reconnects", {}),
    ("fastswitch_failed_steps", "Steps the executor answered with an error (each is replayed once)",
     "failed_steps", {}),
    ("fastswitch_step_timeouts", "Steps that took longer than --step-timeout (the executor counted as lost)",
     "step_timeouts", {}),
    ("fastswitch_migrations", "Queued requests moved to another node with their KV, by how",
     "migrations_host", {"mode": "host"}),
    ("fastswitch_migrations", "", "migrations_recompute", {"mode": "recompute"}),
    ("fastswitch_migrations_failed", "Migrations whose pull failed (the request recomputed on the target)",
     "migrations_failed", {}),
    ("fastswitch_migration_bytes", "KV bytes pulled between nodes' host pools", "swap_pull_bytes", {}),
    ("fastswitch_requests_rebalanced", "Queued requests moved to a node that could run them now",
     "requests_rebalanced", {}),
)  # fmt: skip

# (metric name, help, {label value: stats key}) for gauges read at scrape time.
_GAUGES: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("fastswitch_requests_running", "Requests in the running batch", "", {"": "running"}),
    ("fastswitch_requests_waiting", "Requests queued (new, preempted or swapped out)", "", {"": "waiting"}),
    ("fastswitch_swaps_in_flight", "Copies sent to a swap daemon that have not landed", "", {"": "swaps_in_flight"}),
    ("fastswitch_kept_conversations", "Conversations whose KV is kept between turns", "",
     {"": "kept_conversations"}),
    ("fastswitch_kv_blocks_capacity", "KV blocks in each pool", "pool",
     {"device": "device_blocks_total", "host": "host_blocks_total"}),
    ("fastswitch_kv_kept_blocks", "KV blocks held by idle conversations between turns", "pool",
     {"device": "kept_kv_blocks", "host": "kept_kv_host_blocks"}),
)  # fmt: skip


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's statistics at scrape time."""

    def __init__(self, snapshot: Callable[[], tuple[dict[str, float], dict[str, tuple[float, int, int]]]]) -> None:
        self._snapshot = snapshot
        self.tenants: TenantLabels | None = None

    def collect(self) -> Iterator[Metric]:
        stats, tenants = self._snapshot()
        counters: dict[str, CounterMetricFamily] = {}
        for name, help_text, key, labels in _COUNTERS:
            family = counters.get(name)
            if family is None:
                family = counters[name] = CounterMetricFamily(name, help_text, labels=list(labels))
            family.add_metric(list(labels.values()), stats.get(key, 0.0))
        yield from counters.values()
        for name, help_text, label, keys in _GAUGES:
            gauge = GaugeMetricFamily(name, help_text, labels=[label] if label else [])
            for value, key in keys.items():
                gauge.add_metric([value] if label else [], stats.get(key, 0.0))
            yield gauge
        used = GaugeMetricFamily("fastswitch_kv_blocks_used", "KV blocks in use in each pool", labels=["pool"])
        for pool in ("device", "host"):
            used.add_metric([pool], stats.get(f"{pool}_blocks_total", 0.0) - stats.get(f"{pool}_blocks_free", 0.0))
        yield used
        yield from self._tenant_families(tenants)

    def _tenant_families(self, tenants: Mapping[str, tuple[float, int, int]]) -> Iterator[Metric]:
        labels = self.tenants or TenantLabels(0)
        sums: dict[str, list[float]] = {}
        for tenant, (service, prompt, generated) in sorted(tenants.items()):
            row = sums.setdefault(labels.label(tenant), [0.0, 0.0, 0.0])
            row[0] += service
            row[1] += prompt
            row[2] += generated
        families = (
            CounterMetricFamily(
                "fastswitch_tenant_service", "Weighted service a tenant received (VTC units)", labels=["tenant"]
            ),
            CounterMetricFamily(
                "fastswitch_tenant_prompt_tokens", "Prompt tokens computed for a tenant", labels=["tenant"]
            ),
            CounterMetricFamily(
                "fastswitch_tenant_generated_tokens", "Tokens generated for a tenant", labels=["tenant"]
            ),
        )
        for tenant, row in sorted(sums.items()):
            for family, value in zip(families, row, strict=True):
                family.add_metric([tenant], value)
        yield from families


class Metrics:
    """The scheduler's metrics registry and the engine's call sites (`on_scheduled`, `on_token`, `on_finish`)."""

    def __init__(self, engine: _Stats, max_tenants: int = 16) -> None:
        disable_created_metrics()  # no `_created` series beside every counter and histogram
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenants = TenantLabels(max_tenants)
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ttft = Histogram(
            "fastswitch_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token",
            ["tenant"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tbt = Histogram(
            "fastswitch_time_between_tokens_seconds",
            "Seconds between consecutive tokens of a request",
            buckets=TBT_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "fastswitch_request_latency_seconds",
            "Seconds from a request's arrival to its end (any outcome)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "fastswitch_request_queue_seconds",
            "Seconds from a request's arrival to the first step that computes it",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "fastswitch_requests",
            "Requests by outcome: length, eos, stop, cancelled, error, or rejected (refused at submission)",
            ["outcome", "tenant"],
            registry=self.registry,
        )
        collector = _EngineCollector(self._snapshot)
        collector.tenants = self.tenants
        self.registry.register(collector)
        self._last_token: dict[str, float] = {}  # request id -> monotonic time of its latest token
        self._scheduled: set[str] = set()  # request ids whose queue time is recorded

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that owns the engine: a scrape from another thread reads the engine there."""
        self._loop = loop

    # -- the engine's call sites (on the event loop) --------------------------------------------------

    def on_scheduled(self, request_ids: list[str], arrivals: Mapping[str, Any]) -> None:
        """A step starts computing these requests (new to the executor); `arrivals` maps id -> _Live."""
        now = time.monotonic()
        for request_id in request_ids:
            live = arrivals.get(request_id)
            if live is not None and request_id not in self._scheduled:
                self._scheduled.add(request_id)
                self.queue.observe(now - live.started)

    def on_token(self, request_id: str, tenant: str, arrival: float) -> None:
        now = time.monotonic()
        last = self._last_token.get(request_id)
        if last is None:
            self.ttft.labels(self.tenants.label(tenant)).observe(now - arrival)
        else:
            self.tbt.observe(now - last)
        self._last_token[request_id] = now

    def on_finish(self, request_id: str, tenant: str, outcome: str, arrival: float) -> None:
        self._last_token.pop(request_id, None)
        self._scheduled.discard(request_id)
        self.latency.observe(time.monotonic() - arrival)
        self.requests.labels(outcome, self.tenants.label(tenant)).inc()

    def on_rejected(self, tenant: str) -> None:
        self.requests.labels("rejected", self.tenants.label(tenant or "default", admit=False)).inc()

    # -- exposition -------------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text exposition format (0.0.4) of every metric."""
        return generate_latest(self.registry)

    def _snapshot(self) -> tuple[dict[str, float], dict[str, tuple[float, int, int]]]:
        """The engine's statistics, read on its event loop (a scrape may come from the HTTP server's thread)."""
        loop = self._loop
        if loop is None or not loop.is_running() or _on_loop(loop):
            return self._engine.stats(), self._engine.tenant_stats()

        async def read() -> tuple[dict[str, float], dict[str, tuple[float, int, int]]]:
            return self._engine.stats(), self._engine.tenant_stats()

        return asyncio.run_coroutine_threadsafe(read(), loop).result(SNAPSHOT_TIMEOUT_S)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop runs in this thread
        return False
