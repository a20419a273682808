"""Preemption through the real services: a device pool so small that every request is preempted
several times, with priorities flipping during the run, in each preemption mode."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from fastswitch import AsyncClient, Client, NotFound
from fastswitch.v1 import api_pb2, api_pb2_grpc
from tests.conftest import PROMPTS, running_stack, start_stack, wait_idle

pytestmark = pytest.mark.model

N_PROMPTS = 6
MAX_NEW = 40
TINY = dict(device_blocks=6, host_blocks=64, max_step_tokens=64, policy="priority",
            priority_updates="random", priority_update_prob=0.3)  # fmt: skip


def assert_match_generate(reference, tokenizer, prompts: list[str], results: list[object]) -> None:  # noqa: ANN001
    """Greedy outputs equal generate()'s; at most one first difference, and only at a near-tie."""
    verdicts = [
        reference.check(tokenizer(p, add_special_tokens=False)["input_ids"], r.token_ids, MAX_NEW, ignore_eos=True)
        for p, r in zip(prompts, results, strict=True)
    ]
    assert verdicts.count("near-tie") <= 1, verdicts


async def _run_with_priority_flips(addr: str, prompts: list[str], seed: int) -> list[object]:
    rng = random.Random(seed)
    async with AsyncClient(addr) as client:
        ids = [f"flip-{seed}-{i}" for i in range(len(prompts))]
        tasks = [
            asyncio.create_task(client.complete(p, max_tokens=MAX_NEW, ignore_eos=True, request_id=rid))
            for p, rid in zip(prompts, ids, strict=True)
        ]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.2)
            rid = rng.choice(ids)
            try:
                await client.set_priority(rid, rng.randrange(4))
            except NotFound:
                pass  # already finished
        return [t.result() for t in tasks]


@pytest.fixture(scope="module", params=["swap", "recompute", "vllm-like"])
def mode_stack(request, model_dir):  # noqa: ANN001, ANN201
    yield from start_stack(preemption=request.param, **TINY)


@pytest.mark.slow
def test_outputs_match_generate_under_heavy_preemption_and_priority_flips(mode_stack, tokenizer, reference) -> None:
    prompts = PROMPTS[:N_PROMPTS]
    results = asyncio.run(_run_with_priority_flips(mode_stack.addr, prompts, seed=1))
    with Client(mode_stack.addr) as client:
        stats = wait_idle(client)
    mode = mode_stack.config.scheduler.preemption
    assert stats["preemptions"] >= 2 * N_PROMPTS, stats
    assert stats["priority_changes"] > 0
    if mode == "recompute":
        assert stats["swap_out_bytes"] == 0 and stats["recomputed_tokens"] > 0
    else:
        assert stats["swap_out_bytes"] > 0 and stats["swap_in_bytes"] > 0, stats
        blocks_moved = (stats["swap_out_bytes"] + stats["swap_in_bytes"]) / mode_stack_block_bytes(stats)
        if mode == "vllm-like":
            assert stats["copy_calls"] >= blocks_moved * 30 * 2, "vllm-like copies per block per layer per K/V"
        else:
            assert stats["copy_calls"] <= blocks_moved, "block groups: at most one copy per block"
    assert stats["device_blocks_free"] == stats["device_blocks_total"]
    if mode == "recompute":
        assert "host_blocks_total" not in stats, "recompute mode starts no swap daemon"
    else:
        assert stats["host_blocks_free"] == stats["host_blocks_total"] == TINY["host_blocks"]
    # Where the time went: every request was preempted at least once on average, and waited off the
    # device; swapped ones waited for their KV to come back.
    assert sum(r.phases["preempted"] for r in results) > 0, [r.phases for r in results]
    if mode != "recompute":
        assert sum(r.phases["swap_in"] for r in results) > 0, [r.phases for r in results]
    assert_match_generate(reference, tokenizer, prompts, results)


def mode_stack_block_bytes(stats: dict[str, float]) -> float:
    # SmolLM2-135M: 30 layers x K/V x 16 tokens x 3 KV heads x 64 dims x fp32
    return 30 * 2 * 16 * 3 * 64 * 4


@pytest.mark.slow
def test_killing_the_swap_daemon_mid_run_falls_back_to_recompute_and_completes(model_dir, tokenizer, reference) -> None:
    with running_stack(preemption="swap", **TINY) as stack:
        prompts = PROMPTS[:N_PROMPTS]

        async def run() -> list[object]:
            async with AsyncClient(stack.addr) as client:
                tasks = [asyncio.create_task(client.complete(p, max_tokens=MAX_NEW, ignore_eos=True)) for p in prompts]
                # Kill it while a copy is in flight where possible (the quarantine path below).
                deadline = time.monotonic() + 5
                while not (stats := await client.stats())["swap_out_bytes"] or (
                    not stats["swaps_in_flight"] and time.monotonic() < deadline
                ):
                    await asyncio.sleep(0.01)
                swapd = next(p for p in stack.procs if "swap_daemon" in " ".join(map(str, p.args)))
                swapd.kill()
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        with Client(stack.addr) as client:
            stats = wait_idle(client)
        assert stats["swap_daemon_lost"] >= 1, stats
        assert_match_generate(reference, tokenizer, prompts, results)
        # Device blocks under a copy the daemon may still have been running when its stream broke stay
        # quarantined (the daemon could write them yet) for up to QUARANTINE_S; nothing else is missing.
        # (Without that bound, a request needing the blocks held there waited for ever: a CI hang.)
        quarantined = stats["device_blocks_quarantined"]
        assert stats["device_blocks_free"] + quarantined == stats["device_blocks_total"], stats
        # The daemon's restart (what `up` and a container runtime do) re-attaches it, which proves it
        # writes no old copy: any blocks still quarantined come back and both pools are exactly full.
        deadline = time.monotonic() + 60
        while not stack.supervise():
            assert time.monotonic() < deadline, "the swap daemon was not restarted"
            time.sleep(0.1)
        with Client(stack.addr) as client:
            while (stats := client.stats()).get("host_blocks_total") is None or stats["device_blocks_quarantined"]:
                assert time.monotonic() < deadline, f"the restarted daemon did not attach: {stats}"
                time.sleep(0.1)
        assert stats["device_blocks_free"] == stats["device_blocks_total"]
        assert stats["host_blocks_free"] == stats["host_blocks_total"] == TINY["host_blocks"]


@pytest.mark.slow
def test_stress_with_priorities_cancels_and_disconnects_leaves_pools_exactly_full(model_dir) -> None:
    with running_stack(preemption="swap", **TINY) as stack:
        rng = random.Random(7)

        async def run() -> None:
            async with AsyncClient(stack.addr) as client:

                async def one(i: int) -> None:
                    prompt = PROMPTS[i % len(PROMPTS)]
                    kind = rng.choice(["complete", "cancel", "disconnect"])
                    rid = f"stress-{i}"
                    gen = client.generate(
                        prompt,
                        max_tokens=rng.randint(4, 20),
                        ignore_eos=True,
                        priority=rng.randrange(4),
                        request_id=rid,
                    )
                    if kind == "complete":
                        async for _ in gen:
                            pass
                        return
                    async for _ in gen:
                        break  # got a first token
                    if kind == "cancel":
                        try:
                            await client.cancel(rid)
                        except NotFound:
                            pass
                    await gen.aclose()  # disconnect: the server must notice and free everything

                await asyncio.gather(*(one(i) for i in range(16)))

        asyncio.run(run())
        # A raw client that vanishes mid-stream, too.
        channel = grpc.insecure_channel(stack.addr)
        call = api_pb2_grpc.FastSwitchStub(channel).Generate(
            api_pb2.GenerateRequest(prompt=PROMPTS[0], max_tokens=30, ignore_eos=True), timeout=60
        )
        next(call)
        channel.close()
        with Client(stack.addr) as client:
            stats = wait_idle(client)
        assert stats["preemptions"] > 0
        assert stats["live_requests"] == 0
        assert stats["device_blocks_free"] == stats["device_blocks_total"]
        assert stats["host_blocks_free"] == stats["host_blocks_total"]


@pytest.mark.slow
def test_an_executor_that_dies_mid_run_is_replaced_and_every_request_completes_correctly(
    model_dir, tokenizer, reference
) -> None:
    import subprocess

    with running_stack(preemption="swap", **TINY) as stack:
        prompts = PROMPTS[:N_PROMPTS]

        async def run() -> list[object]:
            async with AsyncClient(stack.addr) as client:
                tasks = [asyncio.create_task(client.complete(p, max_tokens=MAX_NEW, ignore_eos=True)) for p in prompts]
                while (await client.stats()).get("generated_tokens", 0) < 10:
                    await asyncio.sleep(0.05)
                index = next(i for i, p in enumerate(stack.procs) if "executor_svc" in " ".join(map(str, p.args)))
                old = stack.procs[index]
                old.kill()
                old.wait()
                # A supervisor (docker, systemd) would restart it; so does this test.
                stack.procs[index] = subprocess.Popen(old.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        with Client(stack.addr) as client:
            stats = wait_idle(client)
        assert stats["executor_reconnects"] >= 1, stats
        assert stats["device_blocks_free"] == stats["device_blocks_total"]
        assert_match_generate(reference, tokenizer, prompts, results)
