"""The conversation cache: one record per conversation holds its history, its last turn's tokens and
their kept KV. Histories expire and are bounded like the KV; sizes show in the gauges."""

from __future__ import annotations

import pytest

from scheduler_svc.sequence import Finish, Sequence
from svc_common.errors import ResourceExhaustedError
from tests.conftest import FakeClock
from tests.test_scheduler import (
    FakeExecutor,
    assert_ownership,
    expected_output,
    finish,
    make_conversing,
    run_to_completion,
    step,
    turn,
)

KEY = ("ten", "c")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_one_record_holds_the_history_the_last_turn_and_its_kv() -> None:
    sched, ex = make_conversing(num_blocks=32, host_blocks=0), FakeExecutor()
    t1 = turn("t1", list(range(10, 20)), max_tokens=3)
    sched.add(t1, [user("hi")])
    run_to_completion(sched, ex)
    sched.conversations.record_answer(KEY, "hello")  # what the request front does with the text
    conv = sched.conversations.get(KEY)
    assert conv is not None
    assert conv.messages == [user("hi"), answer("hello")]
    assert conv.tokens == t1.tokens and conv.kv is not None and conv.kv.num_tokens == 12
    assert sched.conversations.messages(KEY) == conv.messages
    sched.conversations.messages(KEY).append(user("not stored"))  # a copy: the front cannot change it
    assert len(conv.messages) == 2
    gauges = sched.gauges()
    assert (gauges["conversations"], gauges["conversation_messages"], gauges["conversation_tokens"]) == (1, 2, 13)
    assert (gauges["kept_conversations"], gauges["kept_kv_blocks"]) == (1, 3)


def test_a_cancelled_turn_leaves_the_last_finished_turn_and_keeps_no_kv() -> None:
    sched, ex = make_conversing(num_blocks=32, host_blocks=0), FakeExecutor()
    t1 = turn("t1", list(range(10, 20)), max_tokens=3)
    finish(sched, ex, None, t1)
    t2 = turn("t2", t1.tokens + [5, 6], max_tokens=20)
    sched.add(t2)
    step(sched, ex, None)
    assert t2.reused_tokens == 12
    sched.abort("t2")
    conv = sched.conversations.get(KEY)
    assert conv is not None and conv.tokens == t1.tokens and conv.kv is None and not conv.live
    assert sched.blocks.num_free == 32


def test_ending_a_conversation_during_a_turn_keeps_nothing_when_the_turn_finishes() -> None:
    sched, ex = make_conversing(num_blocks=32, host_blocks=0), FakeExecutor()
    t1 = turn("t1", list(range(10, 20)), max_tokens=4)
    sched.add(t1, [user("hi")])
    step(sched, ex, None)
    assert sched.conversations.end(KEY)
    run_to_completion(sched, ex)
    assert t1.finish is Finish.LENGTH
    sched.conversations.record_answer(KEY, "late")
    assert sched.conversations.get(KEY) is None, "a finished turn does not bring an ended conversation back"
    assert sched.blocks.num_free == 32


def test_the_least_recently_used_idle_conversation_makes_room_for_a_new_one() -> None:
    sched, ex = make_conversing(num_blocks=32, host_blocks=0, max_conversations=2), FakeExecutor()
    finish(sched, ex, None, turn("a1", [1, 2, 3], conv="a"), turn("b1", [4, 5, 6], conv="b"))
    finish(sched, ex, None, turn("a2", [1, 2, 3, 7], conv="a"))  # "a" is now the most recently used
    finish(sched, ex, None, turn("c1", [8, 9], conv="c"))
    assert sched.conversations.get(("ten", "b")) is None and sched.conversations.get(("ten", "a")) is not None
    assert sched.stats.counter("conversations_evicted") == 1
    assert sched.gauges()["conversations"] == 2
    assert_ownership(sched)
    assert sched.blocks.num_free == 32 - sum(len(kv.blocks) for kv in sched.conversations.kept())


def test_when_every_conversation_is_busy_a_new_one_is_refused_and_nothing_changes() -> None:
    sched = make_conversing(num_blocks=32, host_blocks=0, max_conversations=2)
    busy = [turn("a1", [1, 2, 3], conv="a"), turn("b1", [4, 5, 6], conv="b")]
    for s in busy:
        sched.add(s)
    refused = turn("c1", [7, 8], conv="c")
    with pytest.raises(ResourceExhaustedError, match="max-conversations"):
        sched.add(refused, [user("hello")])
    assert "c1" not in sched.requests and refused not in sched.waiting
    assert sched.conversations.get(("ten", "c")) is None and sched.gauges()["conversations"] == 2
    another_turn = turn("a2", [1, 2, 3, 4], conv="a")  # an existing conversation needs no room
    sched.add(another_turn)
    assert "a2" in sched.requests


def test_a_conversation_with_a_turn_in_flight_never_expires(clock: FakeClock) -> None:
    sched, ex = make_conversing(num_blocks=32, host_blocks=0), FakeExecutor()
    long_turn = turn("t1", [1, 2, 3], max_tokens=6)
    sched.add(long_turn)
    step(sched, ex, None)
    clock.now += sched.config.conversation_ttl_s * 3
    step(sched, ex, None)
    assert sched.conversations.get(KEY) is not None
    run_to_completion(sched, ex)
    assert long_turn.finish is Finish.LENGTH and sched.conversations.get(KEY) is not None
    assert sched.stats.counter("conversations_expired") == 0


def test_a_turn_reuses_only_what_matches_the_kept_tokens() -> None:
    sched, ex = make_conversing(num_blocks=32, host_blocks=0), FakeExecutor()
    t1 = turn("t1", list(range(10, 22)), max_tokens=4)  # 15 tokens with KV
    finish(sched, ex, None, t1)
    edited = Sequence("t2", t1.tokens[:6] + [1, 2, 3, 4, 5, 6, 7, 8], t1.sampling, 2, tenant="ten", conversation=KEY)
    finish(sched, ex, None, edited)
    assert edited.reused_tokens == 6 and edited.history_tokens == 6
    assert edited.output_ids == expected_output(edited.prompt_ids, 2)
    assert sched.stats.counter("recomputed_prefix_tokens") == 0
