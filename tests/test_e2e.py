"""End to end through the real services, started the way `fastswitch up` starts them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from fastswitch import AsyncClient, Client, InvalidRequest, NotFound, ResourceExhausted
from fastswitch.v1 import api_pb2, api_pb2_grpc
from tests.conftest import PROMPTS, free_port_base, wait_idle

pytestmark = pytest.mark.model

MAX_NEW = 24


def _generate_all(addr: str, prompts: list[str], **kwargs: object) -> list[object]:
    async def run() -> list[object]:
        async with AsyncClient(addr) as client:
            return await asyncio.gather(*(client.complete(p, **kwargs) for p in prompts))

    return asyncio.run(run())


@pytest.mark.slow
def test_concurrent_greedy_outputs_match_transformers_generate(stack, tokenizer, reference) -> None:
    results = _generate_all(stack.addr, PROMPTS, max_tokens=MAX_NEW)
    verdicts = []
    for prompt, completion in zip(PROMPTS, results, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert completion.prompt_tokens == len(prompt_ids)
        verdicts.append(reference.check(prompt_ids, completion.token_ids, MAX_NEW))
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert verdicts.count("near-tie") <= 1, verdicts


def test_prompt_longer_than_one_prefill_chunk_matches_generate(stack, tokenizer, reference) -> None:
    text = " ".join(
        f"Paragraph {i}: the committee reviewed item {i} and recorded that it was approved." for i in range(40)
    )
    prompt = text + "\nSummary of the meeting:"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) > 2 * 256, "the prompt must span several prefill chunks"
    prompts = [prompt, PROMPTS[0], PROMPTS[1]]  # chunked prefill batched with decodes
    results = _generate_all(stack.addr, prompts, max_tokens=16)
    assert reference.check(prompt_ids, results[0].token_ids, 16) in ("match", "near-tie")
    short_ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert reference.check(short_ids, results[1].token_ids, 16) in ("match", "near-tie")


def test_chat_template_answer_is_paris(stack) -> None:
    with Client(stack.addr) as client:
        completion = client.complete("What is the capital of France?", chat=True, max_tokens=20)
    assert "Paris" in completion.text
    assert completion.finish_reason == "eos"


def test_stop_string_ends_the_stream_and_is_not_returned(stack) -> None:
    with Client(stack.addr) as client:
        full = client.complete(PROMPTS[1], max_tokens=30)
        assert "return" in full.text
        stopped = client.complete(PROMPTS[1], max_tokens=30, stop=["return"])
    assert stopped.finish_reason == "stop"
    assert "return" not in stopped.text
    assert full.text.startswith(stopped.text)


def test_seeded_sampling_is_reproducible(stack) -> None:
    with Client(stack.addr) as client:
        a = client.complete(PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7)
        b = client.complete(PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7)
        c = client.complete(PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"prompt": ""}, InvalidRequest, "prompt is empty"),
        ({"prompt": "hi", "max_tokens": 0}, InvalidRequest, "max_tokens must be > 0"),
        ({"prompt": "hi", "max_tokens": -3}, InvalidRequest, "max_tokens must be > 0"),
        ({"prompt": "hi", "temperature": -1.0}, InvalidRequest, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, InvalidRequest, "top_p"),
        ({"prompt": "hi", "top_k": -1}, InvalidRequest, "top_k"),
        ({"prompt": "hi", "max_tokens": 5000}, ResourceExhausted, "can never fit the KV pool"),
        ({"prompt": "hi", "max_tokens": 100_000}, InvalidRequest, "exceeds the model's context"),
    ],
)
def test_bad_input_gets_a_clear_status_and_changes_no_state(stack, kwargs, error, needle) -> None:
    with Client(stack.addr) as client:
        before = wait_idle(client)
        prompt = kwargs.pop("prompt")
        with pytest.raises(error, match=needle):
            client.complete(prompt, **kwargs)
        after = wait_idle(client)
        assert after["device_blocks_free"] == before["device_blocks_free"] == before["device_blocks_total"]
        assert client.complete("The capital of France is", max_tokens=3).finish_reason == "length"


def test_prompt_longer_than_the_pool_is_resource_exhausted(stack) -> None:
    with Client(stack.addr) as client:
        with pytest.raises(ResourceExhausted, match="--device-blocks"):
            client.complete("word " * 5000, max_tokens=1)


def test_cancel_of_unknown_request_is_not_found(stack) -> None:
    with Client(stack.addr) as client:
        with pytest.raises(NotFound, match="no live request"):
            client.cancel("no-such-request")
        with pytest.raises(NotFound):
            client.set_priority("no-such-request", 3)


def test_cancel_ends_a_running_request_and_frees_its_blocks(stack) -> None:
    with Client(stack.addr) as client:
        stream = client.generate(PROMPTS[0], max_tokens=200, ignore_eos=True, request_id="to-cancel")
        first = next(stream)
        assert first.request_id == "to-cancel"
        client.cancel("to-cancel")
        rest = list(stream)
        assert rest and rest[-1].finish_reason == "cancelled"
        stats = wait_idle(client)
        assert stats["device_blocks_free"] == stats["device_blocks_total"]


def test_client_disconnect_mid_stream_frees_blocks(stack) -> None:
    channel = grpc.insecure_channel(stack.addr)
    stub = api_pb2_grpc.FastSwitchStub(channel)
    call = stub.Generate(api_pb2.GenerateRequest(prompt=PROMPTS[3], max_tokens=400, ignore_eos=True), timeout=60)
    next(call)
    next(call)
    with Client(stack.addr) as client:
        assert client.stats()["device_blocks_free"] < client.stats()["device_blocks_total"]
        channel.close()  # the client goes away without cancelling
        stats = wait_idle(client)
    assert stats["live_requests"] == 0
    assert stats["device_blocks_free"] == stats["device_blocks_total"]


def test_stats_reports_the_contract_figures_and_they_follow_a_request(stack) -> None:
    with Client(stack.addr) as client:
        before = wait_idle(client)
        done = client.complete(PROMPTS[0], max_tokens=5, ignore_eos=True)
        after = wait_idle(client)
    for key in (
        "preemptions",
        "swap_out_bytes",
        "swap_in_bytes",
        "copy_calls",
        "swap_stall_s",
        "recomputed_tokens",
        "reused_prefix_tokens",
        "device_blocks_free",
        "host_blocks_free",
    ):
        assert isinstance(after[key], float), key
    assert after["generated_tokens"] - before["generated_tokens"] == len(done.token_ids) == 5
    assert after["prompt_tokens"] - before["prompt_tokens"] == done.prompt_tokens
    assert after["device_blocks_free"] == after["device_blocks_total"] == 256
    assert after["host_blocks_free"] == after["host_blocks_total"] == 256
    assert after["preemptions"] == before["preemptions"], "a roomy pool preempts nobody"


def test_the_last_chunk_says_where_the_requests_time_went(stack) -> None:
    with Client(stack.addr) as client:
        start = time.monotonic()
        chunks = list(client.generate(PROMPTS[1], max_tokens=6, ignore_eos=True))
        elapsed = time.monotonic() - start
    assert all(not c.phases for c in chunks[:-1])
    phases = chunks[-1].phases
    assert list(phases) == ["queued", "blocked", "swap_in", "prefill", "preempted", "decode"]
    assert phases["prefill"] > 0 and phases["decode"] > 0
    assert phases["blocked"] == phases["swap_in"] == phases["preempted"] == 0.0, "a roomy pool, alone"
    assert 0 < sum(phases.values()) <= elapsed


@pytest.mark.slow
def test_tiny_pool_preempts_and_outputs_still_match_generate(tiny_pool_stack, tokenizer, reference) -> None:
    prompts = PROMPTS[:8]
    results = _generate_all(tiny_pool_stack.addr, prompts, max_tokens=40, ignore_eos=True)
    with Client(tiny_pool_stack.addr) as client:
        stats = wait_idle(client)
    assert stats["preemptions"] >= 4, stats
    assert stats["device_blocks_free"] == stats["device_blocks_total"]
    verdicts = [
        reference.check(tokenizer(p, add_special_tokens=False)["input_ids"], r.token_ids, 40, ignore_eos=True)
        for p, r in zip(prompts, results, strict=True)
    ]
    assert verdicts.count("near-tie") <= 1, verdicts


def test_cli_generate_streams_only_the_completion(stack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastswitch.cli", "generate", "--addr", stack.addr, "--chat", "--max-tokens", "20",
         "What is the capital of France?"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "The capital of France is Paris."


def test_cli_stats_prints_one_json_object(stack) -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-m", "fastswitch.cli", "stats", "--addr", stack.addr],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "device_blocks_free" in json.loads(out.stdout)


def test_fastswitch_up_prints_ready_answers_and_stops_on_sigterm(model_dir) -> None:
    port = free_port_base()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastswitch.cli", "up", "--port", str(port), "--device-blocks", "64",
         "--host-blocks", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "ready" in line and f":{port}" in line, line
        with Client(f"127.0.0.1:{port}") as client:
            assert client.complete("The capital of France is", max_tokens=4).token_ids
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # a second signal (a supervisor, an impatient user) must not wedge it
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    children = subprocess.run(["pgrep", "-f", f"--port {port + 1}"], capture_output=True, text=True).stdout
    assert children.strip() == "", "executor still running after SIGTERM"
