"""One scheduler, several executor nodes, on the real default model: requests spread over the nodes
and stay token-identical to `generate()`; a conversation stays on its node and reuses its KV; a node
killed with SIGKILL mid-run costs recomputation, never a request; a node that comes back takes work."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from fastswitch import AsyncClient, Client
from tests.conftest import PROMPTS, running_stack, start_stack, wait_idle

pytestmark = [pytest.mark.model, pytest.mark.slow]

NODE = dict(threads=1, device_blocks=96, host_blocks=96, max_step_tokens=128)


@pytest.fixture(scope="module")
def three_nodes(model_dir: str) -> Iterator[object]:
    yield from start_stack(executors=3, **NODE)


def _complete_all(addr: str, prompts: list[str], **kwargs: object) -> list[object]:
    async def run() -> list[object]:
        async with AsyncClient(addr) as client:
            return await asyncio.gather(*(client.complete(p, **kwargs) for p in prompts))

    return asyncio.run(run())


def _nodes(client: Client) -> list[dict[str, object]]:
    return client.stats()["executors"]


def _wait_up(client: Client, count: int, timeout_s: float = 120.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = _nodes(client)
        if sum(n["state"] == "up" for n in nodes) == count:
            return nodes
        if time.monotonic() > deadline:
            raise AssertionError(f"not {count} nodes up after {timeout_s:.0f}s: {[n['state'] for n in nodes]}")
        time.sleep(0.2)


def _check_all(tokenizer, reference, prompts: list[str], results: list[object], max_new: int) -> None:  # noqa: ANN001
    """Every output is generate()'s (ignoring EOS, as the requests do)."""
    verdicts = []
    for prompt, completion in zip(prompts, results, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        verdicts.append(reference.check(ids, completion.token_ids, max_new, ignore_eos=True))  # type: ignore[attr-defined]
    assert verdicts.count("near-tie") <= 1, verdicts


def test_stats_lists_every_node_with_its_process_and_pools(three_nodes) -> None:
    with Client(three_nodes.addr) as client:
        _wait_up(client, 3)
        deadline = time.monotonic() + 60
        # A node serves as soon as its executor is attached; its swap daemon's stream attaches right after.
        while not all((nodes := _nodes(client))[i]["host_blocks_total"] for i in range(3)):
            assert time.monotonic() < deadline, f"a swap daemon never attached: {nodes}"
            time.sleep(0.1)
    pids = {p.pid for name, p in three_nodes.named.items() if name.startswith("executor")}
    assert {n["pid"] for n in nodes} == pids
    assert [n["addr"] for n in nodes] == [f"127.0.0.1:{three_nodes.config.node_ports(i)[0]}" for i in range(3)]
    assert all(n["device_blocks_total"] == 96 and n["host_blocks_total"] == 96 for n in nodes)


def test_requests_spread_over_three_nodes_stay_token_identical(three_nodes, tokenizer, reference) -> None:
    with Client(three_nodes.addr) as client:
        before = [n["generated_tokens"] for n in _wait_up(client, 3)]
        results = _complete_all(three_nodes.addr, PROMPTS[:9], max_tokens=16, ignore_eos=True)
        after = [n["generated_tokens"] for n in _nodes(client)]
    _check_all(tokenizer, reference, PROMPTS[:9], results, 16)
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 9 * 16
    assert all(s >= 16 for s in served), f"every node serves part of the load: {served}"


def test_a_conversation_stays_on_its_node_and_reuses_its_kv(three_nodes) -> None:
    with Client(three_nodes.addr) as client, client.conversation(tenant="alice", max_tokens=12) as conv:
        first = conv.send("Name a city in France.")
        home = [i for i, n in enumerate(_nodes(client)) if n["kept_conversations"]]
        assert len(home) == 1, "one node keeps the conversation's KV"
        before = _nodes(client)[home[0]]["generated_tokens"]
        _complete_all(three_nodes.addr, PROMPTS[:4], max_tokens=8)  # other traffic in between
        second = conv.send("What river runs through it?")
        after = _nodes(client)
        assert after[home[0]]["kept_conversations"] == 1
        assert after[home[0]]["generated_tokens"] - before >= len(second.token_ids)
    assert first.text and second.reused_prefix_tokens > 0


def test_a_node_killed_mid_run_costs_recomputation_never_a_request(three_nodes, tokenizer, reference) -> None:
    """SIGKILL of node 1's executor and swap daemon while every node decodes: its requests recompute on
    the other two, and every output is still token-identical."""
    prompts = PROMPTS[:9]
    max_new = 24

    with Client(three_nodes.addr) as client:
        served = _nodes(client)[1]["generated_tokens"]

    async def run() -> list[object]:
        async with AsyncClient(three_nodes.addr) as client:
            tasks = [asyncio.create_task(client.complete(p, max_tokens=max_new, ignore_eos=True)) for p in prompts]
            with Client(three_nodes.addr) as sync:
                # Earlier tests served on this stack: wait for node 1 to decode these requests.
                deadline = time.monotonic() + 120
                while (node := _nodes(sync)[1])["running"] == 0 or node["generated_tokens"] < served + 2:
                    assert time.monotonic() < deadline, "node 1 never ran anything"
                    await asyncio.sleep(0.05)
            for name in ("executor-1", "swapd-1"):
                os.kill(three_nodes.named[name].pid, signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    _check_all(tokenizer, reference, prompts, results, max_new)
    with Client(three_nodes.addr) as client:
        stats = wait_idle(client)
        nodes = stats["executors"]
    assert nodes[1]["state"] == "down" and [n["state"] for n in (nodes[0], nodes[2])] == ["up", "up"]
    assert stats["nodes_lost"] == 1 and stats["requests_moved_from_lost_nodes"] >= 1
    assert stats["recomputed_tokens"] > 0


def test_a_node_that_comes_back_takes_work_again(model_dir, tokenizer, reference) -> None:
    for stack in start_stack(executors=2, **NODE):
        with Client(stack.addr) as client:
            _wait_up(client, 2)
            command = stack.commands()["executor-1"]
            stack.named["executor-1"].kill()
            stack.named["executor-1"].wait()
            deadline = time.monotonic() + 60
            while _nodes(client)[1]["state"] != "down":  # idle, it notices its stream ending
                assert time.monotonic() < deadline, "the scheduler did not notice the lost node"
                time.sleep(0.1)
            assert _complete_all(stack.addr, PROMPTS[:1], max_tokens=2)[0].text, "one node serves meanwhile"
            log = open(os.path.join(stack.log_dir, "executor-1.restarted.log"), "wb")  # noqa: SIM115
            stack.procs.append(subprocess.Popen(command, stdout=log, stderr=log))
            before = _wait_up(client, 2)[1]["generated_tokens"]
            results = _complete_all(stack.addr, PROMPTS[:6], max_tokens=12, ignore_eos=True)
            after = _nodes(client)[1]
        _check_all(tokenizer, reference, PROMPTS[:6], results, 12)
        assert after["generated_tokens"] > before, "the returned node serves again"
        assert after["pid"] == stack.procs[-1].pid


def _history_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:  # noqa: ANN001
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


async def _until(addr: str, node: int, what: str, timeout_s: float = 120.0) -> None:
    """Wait until `node` runs a request (what="running")."""
    deadline = time.monotonic() + timeout_s
    with Client(addr) as sync:
        while _nodes(sync)[node][what] == 0:
            assert time.monotonic() < deadline, f"node {node} never had a {what} request"
            await asyncio.sleep(0.05)


def test_a_turn_whose_home_is_busy_migrates_its_kv_to_the_idle_node(model_dir, tokenizer, reference) -> None:
    """One request at a time per node. A conversation's next turn arrives while its home runs a long
    request and the other node a short one: once the other node idles, the turn's KV goes there through
    the host tier (home device -> home host -> pulled into the other's host -> its device), and the turn
    finishes there, token-identical, long before its home is free."""
    turns = ["Name a famous city in France.", "What river runs through it?"]
    with running_stack(executors=2, max_running=1, **NODE) as stack:
        with Client(stack.addr) as client:
            _wait_up(client, 2)
            first = client.complete(turns[0], chat=True, max_tokens=12, conversation_id="trip", tenant="alice")
            home = [i for i, n in enumerate(_nodes(client)) if n["kept_conversations"]]
            assert len(home) == 1
        other = 1 - home[0]

        async def run() -> tuple[object, object, object, bool]:
            async with AsyncClient(stack.addr) as c:
                short = asyncio.create_task(c.complete(PROMPTS[0], max_tokens=16, ignore_eos=True))
                await _until(stack.addr, other, "running")  # the node without the kept KV has more room
                long = asyncio.create_task(c.complete(PROMPTS[1], max_tokens=120, ignore_eos=True))
                await _until(stack.addr, home[0], "running")
                second = await c.complete(turns[1], chat=True, max_tokens=12, conversation_id="trip", tenant="alice")
                long_running = not long.done()
                return second, await short, await long, long_running

        second, _, _, long_running = asyncio.run(run())
        messages = [
            {"role": "user", "content": turns[0]},
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": turns[1]},
        ]
        assert reference.check(_history_ids(tokenizer, messages), second.token_ids, 12) in ("match", "near-tie")
        assert long_running, "the turn did not wait for its home"
        with Client(stack.addr) as client:
            stats = wait_idle(client)
            nodes = stats["executors"]
            metrics = client.metrics()
        assert re.search(r'^fastswitch_migrations_total\{mode="host"\} 1(\.0)?$', metrics, re.M), "the metric"
        assert stats["migrations_staged"] == 1 and stats["migrations_host"] == 1 and stats["migrations_landed"] == 1
        assert stats["swap_pull_bytes"] > 0 and stats.get("migration_recomputed_tokens", 0) == 0
        assert second.reused_prefix_tokens > 0
        assert nodes[other]["kept_conversations"] == 1 and nodes[home[0]]["kept_conversations"] == 0
        assert nodes[home[0]]["host_blocks_free"] == nodes[home[0]]["host_blocks_total"], "the lent blocks are freed"


def test_a_node_that_registers_itself_serves_and_a_restarted_scheduler_learns_it_back(
    model_dir, tokenizer, reference, tmp_path
) -> None:
    """The scheduler lists no node (--accept-nodes); the executor joins it (--register-with, advertising
    itself and its swap daemon) and serves token-identically; a new scheduler process on the same port gets
    the node back from the executor's next registration."""
    from svc_common.stack import free_port_base

    port = free_port_base(1)
    addr = f"127.0.0.1:{port}"
    node = f"127.0.0.1:{port + 1},127.0.0.1:{port + 2}"
    py = [sys.executable, "-m"]
    commands = {
        "swapd": [*py, "swap_daemon", "--port", str(port + 2), "--host-blocks", "96"],
        "executor": [*py, "executor_svc", "--port", str(port + 1), "--device-blocks", "96", "--threads", "1",
                     "--dtype", "float32", "--register-with", addr, "--advertise", node],
        "scheduler": [*py, "scheduler_svc", "--port", str(port), "--accept-nodes"],
    }  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str) -> None:
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115
        procs[name] = subprocess.Popen(commands[name], stdout=log, stderr=log)

    def serve_once() -> None:
        with Client(addr) as client:
            nodes = _wait_up(client, 1, timeout_s=240)
            assert (nodes[0]["addr"], nodes[0]["swapd_addr"]) == tuple(node.split(","))
            result = client.complete(PROMPTS[0], max_tokens=8, ignore_eos=True)
        ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
        assert reference.check(ids, result.token_ids, 8, ignore_eos=True) in ("match", "near-tie")

    try:
        for name in commands:
            start(name)
        serve_once()
        procs["scheduler"].kill()
        procs["scheduler"].wait()
        start("scheduler")  # it knows no node until the executor registers again (every 10 s)
        serve_once()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
