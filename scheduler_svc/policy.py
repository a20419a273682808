"""Scheduling policies: the order in which requests deserve to run.

The scheduler walks live requests in `order()`; a request that cannot get room may preempt running
requests ranked below it, the lowest-ranked first. So a policy is one ranking plus two hooks that
let fair-share policies count service; a new policy is one class here.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Protocol

from scheduler_svc.sequence import Sequence
from scheduler_svc.vtc import VirtualTokenCounter

if TYPE_CHECKING:
    from scheduler_svc.config import SchedulerConfig


class Policy(Protocol):
    name: str

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        """Sequences in the order they should be served (first = most deserving)."""
        ...

    def on_arrival(self, seq: Sequence, live_tenants: Collection[str]) -> None:
        """A new request arrived (`live_tenants`: the tenants with a request already queued or running)."""
        ...

    def on_served(self, tenant: str, prompt_tokens: int, generated_tokens: int) -> None:
        """A step computed `prompt_tokens` prompt tokens and produced `generated_tokens` for the tenant's
        requests (the scheduler sums each tenant's service over a step and calls this once)."""
        ...


class FCFS:
    """First come, first served; a preempted request keeps its place (its arrival time)."""

    name = "fcfs"

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=lambda s: s.arrival)

    def on_arrival(self, seq: Sequence, live_tenants: Collection[str]) -> None:
        pass

    def on_served(self, tenant: str, prompt_tokens: int, generated_tokens: int) -> None:
        pass


class StrictPriority(FCFS):
    """Higher priority first, FCFS within a priority. Priorities may change at run time."""

    name = "priority"

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=lambda s: (-s.priority, s.arrival))


def make_policy(config: SchedulerConfig) -> Policy:
    """The policy `config.policy` names, built with its options from the config (the one place)."""
    if config.policy == "fcfs":
        return FCFS()
    if config.policy == "priority":
        return StrictPriority()
    if config.policy == "vtc":
        return VirtualTokenCounter(config.vtc_prompt_price, config.vtc_gen_price, config.tenant_weights or None)
    raise ValueError(f"unknown policy {config.policy!r}: choose fcfs, priority or vtc")


class PriorityUpdates:
    """Run-time priority changes as in the FastSwitch paper's evaluation.

    Every iteration, each live request's priority changes with probability `prob`: "random" draws a
    new level uniformly, "markov" moves one level up or down (staying within [0, levels)).
    """

    def __init__(self, pattern: str, prob: float, levels: int, seed: int = 0) -> None:
        self.pattern = pattern
        self.prob = prob
        self.levels = levels
        self.rng = random.Random(seed)

    def apply(self, seqs: Iterable[Sequence]) -> int:
        """Update priorities in place; returns how many changed."""
        if self.pattern == "none" or self.prob <= 0.0:
            return 0
        changed = 0
        for seq in seqs:
            if self.rng.random() >= self.prob:
                continue
            if self.pattern == "random":
                new = self.rng.randrange(self.levels)
            else:
                new = min(self.levels - 1, max(0, seq.priority + self.rng.choice((-1, 1))))
            changed += new != seq.priority
            seq.priority = new
        return changed
