"""Virtual Token Counter: fair share of service between tenants (Sheng et al., OSDI 2024).

Why: under FCFS a tenant that sends more requests gets more of the GPU, and everyone else waits
behind its backlog. VTC keeps one counter per tenant of the service it has received (weighted
prompt and generated tokens) and always serves the tenant with the least counter first, so two
backlogged tenants' service never drifts apart by more than a bounded amount, whatever their
request rates. A tenant that was idle is lifted to the least counter of the active tenants when it
comes back, so idleness banks no credit it could later spend to starve the others.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable

from scheduler_svc.sequence import RequestState, Sequence


def check_prices(prompt_price: float, gen_price: float, weights: dict[str, float]) -> None:
    """Raise ValueError unless every price and weight is a finite number > 0."""
    if not (prompt_price > 0 and math.isfinite(prompt_price)):
        raise ValueError(f"VTC prompt price must be a finite number > 0, got {prompt_price!r}")
    if not (gen_price > 0 and math.isfinite(gen_price)):
        raise ValueError(f"VTC generation price must be a finite number > 0, got {gen_price!r}")
    for tenant, weight in weights.items():
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight of tenant {tenant!r} must be a finite number > 0, got {weight!r}")


class VirtualTokenCounter:
    """The VTC policy: least-served tenant first, FCFS within a tenant.

    Counters only move after a step (`on_served`), so a plain sort by counter would hand one whole
    step to whichever tenant is behind, and flip the next step (preempting the other's requests each
    time). `order()` therefore replays the paper's admission loop on projected counters: take the
    tenant with the least projected counter, rank its oldest request, charge the projection what
    that request's next chunk will cost, repeat. Tenants interleave within a step, and the most
    deserving request still comes first.

    A request that is not running is ranked by its tenant's counter *after* paying its next chunk
    (the paper charges the prompt at admission), a running one by the counter before. When the batch
    is full that is the difference between admitting a request only if its tenant is still behind
    once it is served, and preempting on every small lead change: without it two backlogged tenants
    swap places every step and each swap throws away a request's KV. It widens the gap at most by
    one chunk's cost, well inside the fairness bound.
    """

    name = "vtc"

    def __init__(
        self, prompt_price: float = 1.0, gen_price: float = 2.0, weights: dict[str, float] | None = None
    ) -> None:
        check_prices(prompt_price, gen_price, weights or {})
        self.prompt_price = float(prompt_price)
        self.gen_price = float(gen_price)
        self.weights: dict[str, float] = dict(weights or {})
        # tenant -> virtual counter, in weighted-token units: (prompt_price*prompt + gen_price*generated) / weight.
        # (The raw tokens behind it are the scheduler's statistics: `scheduler_svc.stats`.)
        self._counters: dict[str, float] = {}

    # -- Policy protocol --------------------------------------------------------------------------

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        queues: dict[str, list[Sequence]] = {}
        for s in seqs:
            queues.setdefault(s.tenant, []).append(s)
        heap: list[tuple[float, float, str, int, float]] = []
        for tenant, queue in queues.items():
            queue.sort(key=lambda s: s.arrival)
            heap.append(self._entry(tenant, queue, 0, self.service(tenant)))
        heapq.heapify(heap)
        ranked: list[Sequence] = []
        while heap:
            _, _, tenant, i, projected = heapq.heappop(heap)
            queue = queues[tenant]
            ranked.append(queue[i])
            if i + 1 < len(queue):
                projected += self._next_cost(queue[i])
                heapq.heappush(heap, self._entry(tenant, queue, i + 1, projected))
        return ranked

    def on_arrival(self, seq: Sequence, live_tenants: Collection[str]) -> None:
        if seq.tenant in live_tenants:
            return  # still backlogged: its counter is already in the race
        active = [self.service(t) for t in live_tenants]
        floor = min(active) if active else 0.0
        if seq.tenant not in self._counters:
            self._counters[seq.tenant] = floor
        elif active:
            self._counters[seq.tenant] = max(self._counters[seq.tenant], floor)

    def on_served(self, tenant: str, prompt_tokens: int, generated_tokens: int) -> None:
        cost = self.prompt_price * prompt_tokens + self.gen_price * generated_tokens
        self._counters[tenant] = self.service(tenant) + cost / self.weight(tenant)

    # -- stats ------------------------------------------------------------------------------------

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def service(self, tenant: str) -> float:
        """The tenant's virtual counter in weighted-token units (0 for a tenant never seen)."""
        return self._counters.get(tenant, 0.0)

    def tenant_service(self) -> dict[str, float]:
        return dict(self._counters)

    def _entry(
        self, tenant: str, queue: list[Sequence], i: int, projected: float
    ) -> tuple[float, float, str, int, float]:
        """Heap entry ranking queue[i]: a request not yet running pays its next chunk up front."""
        seq = queue[i]
        key = projected if seq.state is RequestState.RUNNING else projected + self._next_cost(seq)
        return (key, seq.arrival, tenant, i, projected)

    def _next_cost(self, seq: Sequence) -> float:
        """What serving seq's next chunk adds to its tenant's counter, at most (for the projection).

        Prompt tokens already counted once (before a recompute preemption) are not service again.
        """
        unserved_prompt = max(0, seq.num_prompt - seq.prompt_served)
        return (self.prompt_price * unserved_prompt + self.gen_price) / self.weight(seq.tenant)
