"""Load on loopback: 500 concurrent streaming requests from several tenants, bounded in count and time.

Every one completes or is refused with RESOURCE_EXHAUSTED (a tight --max-waiting), none hangs, and no
device or host block is left allocated afterwards.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fastswitch import AsyncClient, Client, ResourceExhausted
from tests.conftest import running_stack

pytestmark = [pytest.mark.model, pytest.mark.slow]

REQUESTS = 500
TENANTS = ("a", "b", "c", "d", "e")
BOUND_S = 90.0


def wait_idle(addr: str, timeout_s: float = 30.0) -> dict[str, float]:
    with Client(addr) as client:
        deadline = time.monotonic() + timeout_s
        while (stats := client.stats())["live_requests"] or stats["swaps_in_flight"]:
            assert time.monotonic() < deadline, f"still busy after {timeout_s} s: {stats}"
            time.sleep(0.05)
        return stats


async def storm(addr: str, n: int) -> list[object]:
    """n concurrent streams; each result is a Completion or the error it raised."""
    async with AsyncClient(addr, timeout=BOUND_S) as client:

        async def one(i: int) -> object:
            try:
                return await client.complete(
                    f"Request {i}: the colour of the sky is", max_tokens=2, tenant=TENANTS[i % len(TENANTS)]
                )
            except Exception as err:  # noqa: BLE001 - the test classifies every outcome
                return err

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), BOUND_S + 10)


def test_500_concurrent_streams_complete_or_are_refused_and_leak_nothing(model_dir) -> None:
    with running_stack(device_blocks=48, host_blocks=48, max_waiting=32, policy="vtc", max_step_tokens=128) as stack:
        start = time.monotonic()
        results = asyncio.run(storm(stack.addr, REQUESTS))
        elapsed = time.monotonic() - start
        done, refused, other = [], [], []
        for r in results:
            if isinstance(r, ResourceExhausted):
                refused.append(r)
            elif getattr(r, "finish_reason", None) in ("length", "eos", "stop"):
                done.append(r)
            else:
                other.append(r)
        assert not other, f"{len(other)} requests neither completed nor were refused, e.g. {other[:3]}"
        assert done and refused, (len(done), len(refused))
        assert elapsed < BOUND_S
        stats = wait_idle(stack.addr)
        assert stats["device_blocks_free"] == stats["device_blocks_total"]
        assert stats["host_blocks_free"] == stats["host_blocks_total"]
        assert stats["refused_resource_exhausted"] >= len(refused)
        assert all(p.poll() is None for p in stack.procs)
