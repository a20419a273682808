"""The scheduler's statistics: named counters, and the service each tenant received.

Every part of the scheduler counts here (`count`), and `fastswitch stats` reads it (`counters`,
`tenants`). Gauges (free blocks, queue lengths) are not stored: the parts that own them report them
when asked. One is kept here because it is shared by every node and must cost O(1) per arrival: the
live requests of each tenant (`live_tenants`, which fair-share policies weigh an arrival against).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

# Counters `fastswitch stats` always shows, 0 until something counts them (the command-line contract).
ALWAYS_SHOWN = tuple(
    "preemptions swap_out_bytes swap_in_bytes copy_calls swap_stall_s swap_fallback_recompute recomputed_tokens "
    "reused_prefix_tokens reused_from_host_tokens recomputed_prefix_tokens "
    "kept_kv_spilled kept_kv_evicted kept_kv_host_evicted kept_kv_expired "
    "executor_reconnects failed_steps step_timeouts conversations_expired conversations_evicted".split()
)


@dataclass(slots=True)
class TenantService:
    """Service a tenant received: prompt tokens computed and tokens generated (recomputation excluded)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0

    def weighted(self, prompt_price: float = 1.0, gen_price: float = 2.0) -> float:
        return prompt_price * self.prompt_tokens + gen_price * self.generated_tokens


class Stats:
    def __init__(self) -> None:
        self._counters: Counter[str] = Counter()
        self._tenants: dict[str, TenantService] = {}
        self._live: dict[str, int] = {}  # tenant -> its live requests (queued or running), only while > 0

    def count(self, name: str, amount: float = 1) -> None:
        self._counters[name] += amount

    def counter(self, name: str) -> float:
        return self._counters[name]

    def served(self, tenant: str, prompt_tokens: int, generated_tokens: int) -> None:
        account = self._tenants.setdefault(tenant, TenantService())
        account.prompt_tokens += prompt_tokens
        account.generated_tokens += generated_tokens

    def request_started(self, tenant: str) -> None:
        self._live[tenant] = self._live.get(tenant, 0) + 1

    def request_ended(self, tenant: str) -> None:
        left = self._live.get(tenant, 0) - 1
        if left > 0:
            self._live[tenant] = left
        else:
            self._live.pop(tenant, None)

    def live_tenants(self) -> list[str]:
        """The tenants with a live request."""
        return list(self._live)

    def counters(self) -> dict[str, float]:
        """Every counter, the contract's included (0 when never counted)."""
        out = dict.fromkeys(ALWAYS_SHOWN, 0.0)
        out.update({name: float(value) for name, value in self._counters.items()})
        return out

    def tenants(self) -> dict[str, TenantService]:
        """A copy of each tenant's service."""
        return {name: replace(account) for name, account in self._tenants.items()}
