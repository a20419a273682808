"""The request front's admission, without a model: --max-waiting refuses with a retry hint and changes
nothing; a tenant's live requests, a request's owner and a tenant's own figures (what the auth rules use).
Conversation TTL and --max-conversations are the conversation cache's (tests/test_conversation_cache.py)."""

from __future__ import annotations

import asyncio

import pytest

from fastswitch.v1 import executor_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import Engine, GenerateInput
from svc_common.errors import InvalidArgument, ResourceExhaustedError
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
    engine.links[0].info = executor_pb2.ExecutorInfo(num_blocks=64, block_size=16, max_model_len=1024)
    node = engine.fleet.nodes[0]
    engine.fleet.attach(node, 64, 16)  # as if the node's link had attached it
    engine.fleet.node_up(node)
    return engine


def _submit(engine: Engine, tenant: str = "t", prompt: str = "hi", max_tokens: int = 2) -> str:
    return engine.submit(
        GenerateInput(prompt=prompt, max_tokens=max_tokens, sampling=Sampling(), tenant=tenant)
    ).request_id


def _state(engine: Engine) -> dict[str, float]:
    return {k: v for k, v in engine.stats().items() if k != "uptime_s"}


def test_max_waiting_refuses_with_a_retry_hint_and_changes_nothing() -> None:
    engine = _engine(max_waiting=2)
    for _ in range(2):
        _submit(engine)
    before = _state(engine)
    with pytest.raises(ResourceExhaustedError, match="queue is full") as err:
        _submit(engine)
    assert err.value.retry_after_s == 1.0
    assert _state(engine) == before


def test_a_prompt_beyond_the_context_is_refused_before_anything_is_allocated() -> None:
    engine = _engine()
    before = _state(engine)
    with pytest.raises(InvalidArgument, match="exceeds the model's context of 1024"):
        _submit(engine, prompt="x" * 1000, max_tokens=100)
    assert _state(engine) == before and not engine.live


def test_live_count_owner_and_tenant_counters_see_one_tenant_only() -> None:
    engine = _engine()
    a1, _, b1 = _submit(engine, "a"), _submit(engine, "a"), _submit(engine, "b")
    assert (engine.live_count("a"), engine.live_count("b"), engine.live_count("c")) == (2, 1, 0)
    assert (engine.owner_of(a1), engine.owner_of(b1), engine.owner_of("nope")) == ("a", "b", None)
    assert engine.tenant_counters("a") == {"live_requests": 2, "running": 0, "waiting": 2}
    engine.cancel(a1)
    assert engine.owner_of(a1) is None and engine.tenant_counters("a")["live_requests"] == 1


def test_an_idle_conversation_expires_with_no_request_to_wake_the_step_loop() -> None:
    from test_executor_faults import _Stub

    async def scenario() -> None:
        engine = Engine(SchedulerConfig(conversation_ttl_s=0.3), tokenizer=_Tokenizer())
        engine.links[0]._stub = _Stub(lambda plan, n: None)  # type: ignore[assignment]
        await engine.start()
        try:
            seq = engine.submit(
                GenerateInput(prompt="hello", max_tokens=2, sampling=Sampling(), tenant="t", conversation_id="c")
            )
            async for _ in engine.stream(seq):
                pass
            assert engine.stats()["conversations"] == 1
            await asyncio.sleep(1.0)  # idle: only the sweep wakes the loop, which expires the conversation
            assert engine.stats()["conversations"] == 0 and engine.stats()["conversations_expired"] == 1
        finally:
            await engine.stop()

    asyncio.run(scenario())
