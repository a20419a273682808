"""The OpenAI-compatible HTTP API end to end, with the official `openai` client, on the real model.

One stack for the module, started the way `fastswitch up --http-port` starts it. It runs the
priority policy with one running request at a time, so queueing, preemption and priorities can be
seen from outside.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from fastswitch import AsyncClient, Client, InvalidRequest
from tests.conftest import free_port, start_stack

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def http_stack(model_dir: str) -> Iterator[Any]:
    yield from start_stack(device_blocks=64, host_blocks=64, policy="priority", max_running=1, http_port=free_port())


@pytest.fixture(scope="module")
def api(http_stack: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_stack.http_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_client(http_stack: Any) -> Iterator[Client]:
    with Client(http_stack.addr) as client:
        yield client


def _state(stats: dict[str, Any]) -> dict[str, Any]:
    """What bad input must leave as it was (time passes; `refused_<code>` counts the refusals)."""
    return {k: v for k, v in stats.items() if k != "uptime_s" and not k.startswith("refused_")}


def _wait_idle(client: Client, timeout_s: float = 15.0) -> dict[str, Any]:
    """Stats once no request is live and nothing moves (a cancelled request's release step has run)."""
    deadline = time.monotonic() + timeout_s
    previous: dict[str, Any] = {}
    while True:
        stats = client.stats()
        if stats["live_requests"] == 0 and stats["running"] == 0 and _state(stats) == _state(previous):
            return stats
        assert time.monotonic() < deadline, f"the scheduler did not go idle within {timeout_s} s: {stats}"
        previous = stats
        time.sleep(0.2)


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_chat_over_http_is_the_grpc_paths_answer(api, grpc_client, stream: bool) -> None:
    want = grpc_client.complete(QUESTION, chat=True, max_tokens=12)
    messages = [{"role": "user", "content": QUESTION}]
    if stream:
        chunks = list(
            api.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        text, usage = reply.choices[0].message.content, reply.usage
    assert text == want.text and "Paris" in text
    assert (usage.prompt_tokens, usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_completion_over_http_matches_grpc_and_generate(
    api, grpc_client, tokenizer, reference, stream: bool
) -> None:
    prompt = "The theory of relativity states that"
    want = grpc_client.complete(prompt, max_tokens=16, ignore_eos=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert reference.check(prompt_ids, want.token_ids, 16, ignore_eos=True) in ("match", "near-tie")
    reply = api.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=stream, extra_body={"ignore_eos": True}
    )
    if stream:
        chunks = list(reply)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
    assert text == want.text and finish == "length"


def test_a_conversation_continued_over_http_reuses_its_kv_and_answers_as_grpc_does(api, grpc_client) -> None:
    turns = ["Name a city in France.", "What river runs through it?"]
    with grpc_client.conversation(tenant="carol", max_tokens=12) as conv:
        want = [conv.send(turn) for turn in turns]
    replies = []
    for turn in turns:  # each request carries only the new message: the server keeps the history
        replies.append(
            api.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": turn}], max_tokens=12, temperature=0,
                user="alice", extra_body={"conversation_id": "trip"},
            )
        )  # fmt: skip
    assert [r.choices[0].message.content for r in replies] == [w.text for w in want]
    assert replies[0].usage.prompt_tokens_details.cached_tokens == 0
    cached = replies[1].usage.prompt_tokens_details.cached_tokens
    assert cached == want[1].reused_prefix_tokens > 0
    assert replies[1].usage.prompt_tokens == want[1].prompt_tokens > cached
    assert api.delete("/conversations/trip?user=alice", cast_to=object)["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        api.delete("/conversations/trip?user=alice", cast_to=object)


async def _finish_order(send: Any) -> list[str]:
    """A long low-priority request starts alone; a short high-priority one arrives while it runs.
    Returns the names in the order they finished."""
    order: list[str] = []
    started = asyncio.Event()

    async def run(name: str, high: bool) -> None:
        async for _ in send(high):
            started.set()
        order.append(name)

    low = asyncio.create_task(run("low", high=False))
    await asyncio.wait_for(started.wait(), 60)
    await run("high", high=True)
    await low
    return order


def test_priorities_over_http_reorder_service_as_over_grpc(http_stack) -> None:
    def tokens(high: bool) -> int:
        return 4 if high else 48

    async def over_grpc() -> list[str]:
        async with AsyncClient(http_stack.addr) as client:

            def send(high: bool) -> Any:
                return client.generate("Count to fifty:", max_tokens=tokens(high), ignore_eos=True,
                                       priority=5 if high else -5)  # fmt: skip

            return await _finish_order(send)

    async def over_http() -> list[str]:
        async with openai.AsyncOpenAI(base_url=http_stack.http_url + "/v1", api_key="unused") as api:

            async def send(high: bool) -> Any:
                stream = await api.completions.create(
                    model=MODEL, prompt="Count to fifty:", max_tokens=tokens(high), temperature=0, stream=True,
                    extra_body={"ignore_eos": True, "priority": -5 if high else 5},  # vLLM's: lower is earlier
                )  # fmt: skip
                async for chunk in stream:
                    yield chunk

            return await _finish_order(send)

    grpc_order = asyncio.run(over_grpc())
    assert grpc_order == ["high", "low"], "the high-priority request must preempt the running one"
    assert asyncio.run(over_http()) == grpc_order


def test_a_client_leaving_mid_stream_frees_its_blocks(api, grpc_client) -> None:
    before = _wait_idle(grpc_client)
    stream = api.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=400, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert grpc_client.stats()["device_blocks_free"] < before["device_blocks_free"]
    stream.close()
    after = _wait_idle(grpc_client)
    assert after["device_blocks_free"] == before["device_blocks_free"]
    assert after["finished_cancelled"] == before.get("finished_cancelled", 0) + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 400


def test_a_client_leaving_while_queued_cancels_its_request(http_stack, grpc_client) -> None:
    before = _wait_idle(grpc_client)
    impatient = openai.OpenAI(base_url=http_stack.http_url + "/v1", api_key="unused", max_retries=0, timeout=1.0)
    blocker = grpc_client.generate("Count to fifty:", max_tokens=200, ignore_eos=True)
    next(blocker)  # running: the one running slot is taken
    try:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=MODEL, prompt="Hello", max_tokens=8, stream=True)
        deadline = time.monotonic() + 10
        while grpc_client.stats()["live_requests"] > 1:
            assert time.monotonic() < deadline, "the queued request outlived its client"
            time.sleep(0.05)
        stats = grpc_client.stats()
        assert stats["finished_cancelled"] == before.get("finished_cancelled", 0) + 1
    finally:
        blocker.close()
    assert _wait_idle(grpc_client)["device_blocks_free"] == before["device_blocks_free"]


def _post_raw(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bad_requests_get_openai_errors_and_change_no_state(http_stack, api, grpc_client) -> None:
    before = _state(_wait_idle(grpc_client))
    status, body = _post_raw(http_stack.http_url + "/v1/chat/completions", b'{"model": "x", "messages": [}')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=MODEL, prompt="hi", max_tokens=-5)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 9000}], max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="chat template|role"):
        api.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "hi"}], max_tokens=8)
    assert _state(grpc_client.stats()) == before


def test_grpc_takes_a_whole_chat_as_messages_and_describes_the_model(grpc_client) -> None:
    system = "Answer in one word."
    by_prompt = grpc_client.complete(QUESTION, chat=True, system_prompt=system, max_tokens=8)
    by_messages = grpc_client.complete(
        "", messages=[{"role": "system", "content": system}, {"role": "user", "content": QUESTION}], max_tokens=8
    )
    assert by_messages.token_ids == by_prompt.token_ids and by_messages.prompt_tokens == by_prompt.prompt_tokens
    with pytest.raises(InvalidRequest, match="role must be one of"):
        grpc_client.complete("", messages=[{"role": "tool", "content": "x"}], max_tokens=4)
    with pytest.raises(InvalidRequest, match="either messages or prompt"):
        grpc_client.complete("hi", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    info = grpc_client.describe_model()
    assert (info.model, info.kv_capacity_tokens, info.policy) == (MODEL, 64 * 16, "priority")
    assert info.max_model_len > 1000
