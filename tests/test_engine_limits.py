"""The engine's bounded per-conversation state, without a model: histories expire with the TTL, at most
--max-conversations are kept (the least recently used idle one goes first), a conversation in use is
never dropped, and --max-waiting refuses with a retry hint."""

from __future__ import annotations

import time

import pytest

from fastswitch.v1 import executor_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine, GenerateInput
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish
from svc_common.errors import ResourceExhaustedError
from svc_common.plan import Sampling


class _Tokenizer:
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 50 + 1 for c in text]}

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(chr(i + 60) for i in ids)


def _engine(**settings: object) -> Engine:
    config = SchedulerConfig(**settings)  # type: ignore[arg-type]
    engine = Engine(config, tokenizer=_Tokenizer())
    engine.info = executor_pb2.ExecutorInfo(num_blocks=64, block_size=16, max_model_len=1024)
    engine.scheduler = Scheduler(config, num_blocks=64, block_size=16, eos_token_ids={0})
    engine._task = object()  # type: ignore[assignment]  # as if the step loop ran
    return engine


def _turn(engine: Engine, conversation: str, tenant: str = "t") -> str:
    seq = engine.submit(
        GenerateInput(prompt="hello", max_tokens=2, sampling=Sampling(), tenant=tenant, conversation_id=conversation)
    )
    return seq.request_id


def _finish(engine: Engine, request_id: str) -> None:
    live = engine.live[request_id]
    engine.scheduler.abort(request_id, Finish.LENGTH)  # type: ignore[union-attr]
    engine._end(live, Finish.LENGTH)


def test_an_idle_conversation_history_expires_with_the_ttl() -> None:
    engine = _engine(conversation_ttl_s=60)
    _finish(engine, _turn(engine, "c1"))
    assert engine.expire_conversations(time.monotonic() + 30) == 0
    assert engine.expire_conversations(time.monotonic() + 61) == 1
    assert not engine.conversations and engine.stats()["conversations_expired"] == 1


def test_a_conversation_with_a_live_turn_never_expires() -> None:
    engine = _engine(conversation_ttl_s=60)
    request_id = _turn(engine, "busy")
    assert engine.expire_conversations(time.monotonic() + 3600) == 0
    assert ("t", "busy") in engine.conversations
    _finish(engine, request_id)
    assert engine.conversations[("t", "busy")][-1]["role"] == "assistant"


def test_max_conversations_pushes_out_the_least_recently_used_idle_one() -> None:
    engine = _engine(max_conversations=2)
    for name in ("old", "newer"):
        _finish(engine, _turn(engine, name))
    _finish(engine, _turn(engine, "old"))  # used again: "newer" is now the least recently used
    _finish(engine, _turn(engine, "third"))
    assert set(engine.conversations) == {("t", "old"), ("t", "third")}
    assert engine.stats()["conversations_evicted"] == 1


def test_max_conversations_all_in_use_refuses_a_new_one() -> None:
    engine = _engine(max_conversations=1)
    _turn(engine, "busy")
    with pytest.raises(ResourceExhaustedError, match="max-conversations"):
        _turn(engine, "another")


def test_max_waiting_refuses_with_a_retry_hint_and_changes_nothing() -> None:
    engine = _engine(max_waiting=2)
    for _ in range(2):
        engine.submit(GenerateInput(prompt="hi", max_tokens=2, sampling=Sampling()))
    before = engine.stats()
    with pytest.raises(ResourceExhaustedError, match="queue is full") as err:
        engine.submit(GenerateInput(prompt="hi", max_tokens=2, sampling=Sampling()))
    assert err.value.retry_after_s == 1.0
    after = engine.stats()
    assert {k: v for k, v in after.items() if k != "uptime_s"} == {k: v for k, v in before.items() if k != "uptime_s"}
