"""Scheduling policies: which waiting request runs next, and which running one to preempt.

A policy is two small functions over Sequences; the scheduler calls nothing else, so a new policy
(priority, fair share) is one class here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from scheduler_svc.sequence import Sequence


class Policy(Protocol):
    name: str

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        """Sequences in the order they should be served (first = most deserving)."""
        ...

    def victim(self, running: list[Sequence]) -> Sequence:
        """The running sequence to preempt when room is needed."""
        ...


class FCFS:
    """First come, first served; the latest arrival is preempted first (vLLM's default)."""

    name = "fcfs"

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=lambda s: s.arrival)

    def victim(self, running: list[Sequence]) -> Sequence:
        return max(running, key=lambda s: s.arrival)


class StrictPriority:
    """Higher priority first, FCFS within a priority; the lowest-priority, latest arrival is preempted."""

    name = "priority"

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=lambda s: (-s.priority, s.arrival))

    def victim(self, running: list[Sequence]) -> Sequence:
        return min(running, key=lambda s: (s.priority, -s.arrival))


def make_policy(name: str) -> Policy:
    if name == "fcfs":
        return FCFS()
    if name == "priority":
        return StrictPriority()
    raise ValueError(f"policy {name!r} is not available yet (choose fcfs or priority)")
