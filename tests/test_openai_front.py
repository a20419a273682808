"""The HTTP front alone, over a scripted scheduler (no model): the OpenAI wire format, the errors, and
that a client going away cancels the generation. The `openai` client is the caller."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from fastswitch.client import InvalidRequest, ModelInfo, NotFound, ResourceExhausted, ServiceUnavailable, TokenChunk
from openai_svc.app import create_app
from openai_svc.config import HttpConfig
from openai_svc.protocol import ChatCompletionRequest, CompletionRequest, UnsupportedFeature

MODEL = "tiny-model"
WORDS = ["Hello", ",", " world", "!"]


class ScriptedScheduler:
    """Stands in for the SDK's AsyncClient: answers WORDS, one token each, and records what it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.ended: list[tuple[str, str]] = []
        self.token_delay_s = 0.0
        self.queue_delay_s = 0.0

    async def describe_model(self) -> ModelInfo:
        return ModelInfo(MODEL, 2048, 4096, "priority")

    async def serving(self) -> bool:
        return True

    async def metrics(self) -> str:
        return "# TYPE fastswitch_steps_total counter\nfastswitch_steps_total 7.0\n"

    async def end_conversation(self, conversation_id: str, tenant: str = "") -> None:
        if conversation_id == "unknown":
            raise NotFound(f"tenant {tenant!r} has no conversation 'unknown' [NOT_FOUND]", grpc.StatusCode.NOT_FOUND)
        self.ended.append((tenant, conversation_id))

    async def generate(self, prompt: str, **kwargs: Any) -> AsyncIterator[TokenChunk]:
        self.calls.append((prompt, kwargs))
        rid = kwargs["request_id"]
        text = prompt or " ".join(m["content"] for m in kwargs.get("messages", []))
        if "refuse" in text:
            raise InvalidRequest(
                f"prompt (9000 tokens) + max_tokens ({kwargs['max_tokens']}) exceeds the model's context "
                "[INVALID_ARGUMENT]",
                grpc.StatusCode.INVALID_ARGUMENT,
            )
        if "too big" in text:
            raise ResourceExhausted("never fits the KV pool [RESOURCE_EXHAUSTED]", grpc.StatusCode.RESOURCE_EXHAUSTED)
        if "queue full" in text:
            full = ResourceExhausted(
                "the waiting queue is full [RESOURCE_EXHAUSTED]", grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            full.retry_after_s = 1.5
            raise full
        done = False
        try:
            await asyncio.sleep(self.queue_delay_s)
            words = WORDS[: kwargs["max_tokens"]]
            for i, word in enumerate(words):
                if "cut short" in text and i == 2:
                    return  # the stream ends without a finish reason
                if "fail midway" in text and i == 2:
                    raise ServiceUnavailable("executor unavailable [UNAVAILABLE]", grpc.StatusCode.UNAVAILABLE)
                last = i == len(words) - 1
                finish = ("length" if len(words) < len(WORDS) else "eos") if last else None
                yield TokenChunk(rid, word, [100 + i], finish, time.time_ns(), 3 if i == 0 else 0, 2 if i == 0 else 0)
                await asyncio.sleep(self.token_delay_s)
            done = True
        finally:
            (self.finished if done else self.cancelled).append(rid)

    async def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def front() -> Iterator[tuple[str, ScriptedScheduler]]:
    scheduler = ScriptedScheduler()
    port = _free_port()
    config = HttpConfig(port=port, bind="127.0.0.1", default_max_tokens=16)
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, client=scheduler), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the HTTP front did not start within 30 s"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", scheduler
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(front: tuple[str, ScriptedScheduler]) -> openai.OpenAI:
    return openai.OpenAI(base_url=front[0] + "/v1", api_key="unused", max_retries=0)


def _post(url: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=data, headers={"content-type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- request models ---------------------------------------------------------------------------------------


def test_priority_follows_vllm_lower_is_earlier_and_maps_onto_larger_runs_first() -> None:
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], priority=-3)
    assert body.sampling_kwargs(16)["priority"] == 3
    assert (
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], priority=2).sampling_kwargs(16)["priority"]
        == -2
    )


def test_openai_defaults_apply_when_fields_are_absent() -> None:
    kwargs = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).sampling_kwargs(default_max_tokens=33)
    assert (kwargs["max_tokens"], kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (33, 1.0, 1.0, 0)
    assert kwargs["seed"] is None and kwargs["stop"] == [] and kwargs["conversation_id"] == ""
    assert CompletionRequest(prompt="x").sampling_kwargs(default_max_tokens=33)["max_tokens"] == 16  # OpenAI's


def test_max_completion_tokens_wins_over_max_tokens_and_stop_may_be_one_string() -> None:
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], max_tokens=50, max_completion_tokens=7, stop="\n", top_k=-1
    )
    kwargs = body.sampling_kwargs(16)
    assert (kwargs["max_tokens"], kwargs["stop"], kwargs["top_k"]) == (7, ["\n"], 0)


def test_content_parts_are_joined_and_developer_is_the_system_role() -> None:
    body = ChatCompletionRequest(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ]
    )
    assert [m.as_dict() for m in body.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
     ({"presence_penalty": 0.5}, "presence_penalty")],
)  # fmt: skip
def test_known_features_we_do_not_serve_are_refused_not_ignored(extra: dict[str, Any], param: str) -> None:
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **extra)
    with pytest.raises(UnsupportedFeature) as err:
        body.check_supported()
    assert err.value.param == param
    ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=False, store=True).check_supported()


# -- over HTTP ------------------------------------------------------------------------------------------


def test_chat_completion_has_openai_shape_usage_and_our_request_id(client: openai.OpenAI, front) -> None:
    _, scheduler = front
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        max_tokens=4,
        user="alice",
        extra_body={"priority": -2, "conversation_id": "c1"},
    )
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Hello, world!"
    assert reply.choices[0].finish_reason == "stop"  # EOS
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (3, 4, 7)
    assert reply.usage.prompt_tokens_details.cached_tokens == 2
    prompt, kwargs = scheduler.calls[-1]
    assert reply.id == f"chatcmpl-{kwargs['request_id']}" and raw.headers["x-request-id"] == kwargs["request_id"]
    assert prompt == "" and kwargs["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert (kwargs["tenant"], kwargs["priority"], kwargs["conversation_id"]) == ("alice", 2, "c1")


def test_completion_stops_at_max_tokens_with_finish_reason_length(client: openai.OpenAI, front) -> None:
    reply = client.completions.create(model=MODEL, prompt="Say hello", max_tokens=2, temperature=0, seed=5)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "Hello," and reply.choices[0].finish_reason == "length"
    prompt, kwargs = front[1].calls[-1]
    assert prompt == "Say hello" and (kwargs["temperature"], kwargs["seed"]) == (0.0, 5)


def test_streamed_chat_is_role_then_deltas_then_finish_then_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Q"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world!"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streamed_completion_without_usage_option_sends_no_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="P", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hello, world"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_models_lists_and_retrieves_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-7")


def test_malformed_json_is_a_400_in_openai_error_shape(front) -> None:
    status, body = _post(front[0] + "/v1/chat/completions", b'{"model": "tiny-model", "messages": [')
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_json"
    assert "not valid JSON" in body["error"]["message"]


def test_unknown_model_is_a_404_model_not_found(client: openai.OpenAI, front) -> None:
    calls = len(front[1].calls)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-7", messages=[{"role": "user", "content": "Q"}])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert len(front[1].calls) == calls, "a refused request must not reach the scheduler"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "Q"}], "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "Q"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "tool", "content": "Q"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "Q"}], "n": 3}, "n"),
        ({"messages": [{"role": "user", "content": "Q"}], "response_format": {"type": "json_object"}},
         "response_format"),
    ],
)  # fmt: skip
def test_bad_fields_are_400s_naming_the_field_and_reach_no_scheduler(front, body: dict[str, Any], param: str) -> None:
    calls = len(front[1].calls)
    status, reply = _post(front[0] + "/v1/chat/completions", json.dumps({"model": MODEL, **body}).encode())
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"
    assert len(front[1].calls) == calls


def test_scheduler_refusals_keep_their_meaning_as_http_statuses(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "refuse this"}])
    message = err.value.body["message"]
    assert "exceeds the model's context" in message and "default is 16" in message  # no max_tokens was sent
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="refuse this", max_tokens=8)
    assert "default is" not in err.value.body["message"]
    with pytest.raises(openai.RateLimitError) as limited:
        client.completions.create(model=MODEL, prompt="too big", max_tokens=4)
    assert "retry-after" not in limited.value.response.headers  # no hint: retrying will not help
    with pytest.raises(openai.RateLimitError) as limited:
        client.completions.create(model=MODEL, prompt="queue full", max_tokens=4)
    assert limited.value.response.headers["retry-after"] == "2"  # the scheduler's 1.5 s hint, whole seconds up
    # Streaming too: a refusal before the first token is an HTTP error, not a 200 stream that fails.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "refuse"}], max_tokens=4, stream=True
        )


def test_an_error_after_the_first_token_ends_the_stream_with_an_error_event(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="fail midway", max_tokens=4, stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="executor unavailable"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["Hello", ","]


def test_a_client_leaving_mid_stream_cancels_the_generation(client: openai.OpenAI, front) -> None:
    _, scheduler = front
    scheduler.token_delay_s = 30.0  # a long gap (e.g. preempted): nothing is written that could notice the loss
    try:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Q"}], max_tokens=4, stream=True
        )
        next(iter(stream))
        rid = scheduler.calls[-1][1]["request_id"]
        stream.close()
        _wait_for(lambda: rid in scheduler.cancelled)
    finally:
        scheduler.token_delay_s = 0.0
    assert rid not in scheduler.finished


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_before_the_first_token_cancels_the_queued_generation(front, stream: bool) -> None:
    url, scheduler = front
    scheduler.queue_delay_s = 30.0  # waiting in the queue: nothing is written to the client meanwhile
    try:
        impatient = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=MODEL, prompt="P", max_tokens=4, stream=stream)
        rid = scheduler.calls[-1][1]["request_id"]
        _wait_for(lambda: rid in scheduler.cancelled)
    finally:
        scheduler.queue_delay_s = 0.0


def test_deleting_a_conversation_ends_it_for_the_tenant(client: openai.OpenAI, front) -> None:
    reply = client.delete("/conversations/trip?user=bob", cast_to=object)
    assert reply == {"id": "trip", "object": "conversation.deleted", "deleted": True}
    assert front[1].ended[-1] == ("bob", "trip")
    with pytest.raises(openai.NotFoundError):
        client.delete("/conversations/unknown", cast_to=object)


def test_metrics_are_the_schedulers_then_the_fronts_in_one_parseable_exposition(client: openai.OpenAI, front) -> None:
    client.completions.create(model=MODEL, prompt="P", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-7", prompt="P", max_tokens=2)
    with urllib.request.urlopen(front[0] + "/metrics", timeout=10) as resp:
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["fastswitch_steps"].samples[0].value == 7.0  # relayed from the scheduler
    assert families["fastswitch_http_scheduler_up"].samples[0].value == 1.0
    ok = [
        s
        for s in families["fastswitch_http_requests"].samples
        if s.labels == {"route": "/v1/completions", "status": "200"}
    ]
    assert ok and ok[0].value >= 1
    assert any(s.labels.get("status") == "404" for s in families["fastswitch_http_requests"].samples)


def test_health_is_ok_while_the_scheduler_serves(front) -> None:
    with urllib.request.urlopen(front[0] + "/health", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}


def test_a_stream_cut_without_a_finish_reason_is_an_error_never_a_completion(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError, match="without a finish reason"):
        client.completions.create(model=MODEL, prompt="cut short", max_tokens=4)
    texts = []
    with pytest.raises(openai.APIError, match="without a finish reason"):
        for chunk in client.completions.create(model=MODEL, prompt="cut short", max_tokens=4, stream=True):
            texts.append(chunk.choices[0].text)
    assert texts == ["Hello", ","]
