"""The scheduler's statistics: counters that the contract always shows, and per-tenant service."""

from __future__ import annotations

from scheduler_svc.stats import ALWAYS_SHOWN, Stats, TenantService


def test_contract_counters_show_as_zero_until_counted_and_others_once_counted() -> None:
    stats = Stats()
    assert stats.counters() == dict.fromkeys(ALWAYS_SHOWN, 0.0)
    stats.count("preemptions")
    stats.count("preemptions")
    stats.count("swap_stall_s", 0.25)
    stats.count("steps", 3)
    counters = stats.counters()
    assert counters["preemptions"] == 2 and counters["swap_stall_s"] == 0.25 and counters["steps"] == 3
    assert stats.counter("steps") == 3 and stats.counter("never_counted") == 0


def test_tenant_service_adds_up_per_tenant_and_is_handed_out_as_a_copy() -> None:
    stats = Stats()
    stats.served("a", prompt_tokens=10, generated_tokens=1)
    stats.served("a", prompt_tokens=0, generated_tokens=2)
    stats.served("b", prompt_tokens=4, generated_tokens=0)
    tenants = stats.tenants()
    assert tenants == {"a": TenantService(10, 3), "b": TenantService(4, 0)}
    tenants["a"].generated_tokens = 99
    assert stats.tenants()["a"].generated_tokens == 3
    assert TenantService(10, 3).weighted(prompt_price=1.0, gen_price=2.0) == 16.0
