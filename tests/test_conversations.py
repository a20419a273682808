"""Conversations through the real services: each turn's greedy output equals generate() on the whole
conversation so far, later turns reuse the earlier turns' KV, and tenants never share a conversation."""

from __future__ import annotations

import pytest

from fastswitch import Client, NotFound
from tests.conftest import wait_idle

pytestmark = pytest.mark.model

TURNS = ["Name a famous city in France.", "What river runs through it?", "Say that again in one word."]
MAX_NEW = 16


def _history_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:  # noqa: ANN001
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_each_turn_matches_generate_on_the_whole_conversation_and_reuses_earlier_kv(
    stack, tokenizer, reference
) -> None:
    messages: list[dict[str, str]] = []
    with Client(stack.addr) as client:
        before = client.stats()["reused_prefix_tokens"]
        for k, user in enumerate(TURNS):
            messages.append({"role": "user", "content": user})
            answer = client.complete(user, chat=True, max_tokens=MAX_NEW, conversation_id="trip", tenant="alice")
            prompt_ids = _history_ids(tokenizer, messages)
            assert answer.prompt_tokens == len(prompt_ids)
            assert reference.check(prompt_ids, answer.token_ids, MAX_NEW) in ("match", "near-tie")
            if k == 0:
                assert answer.reused_prefix_tokens == 0
            else:
                # Everything up to the previous answer is reused (re-tokenised history may differ at its end).
                assert answer.reused_prefix_tokens >= len(_history_ids(tokenizer, messages[:-2])), answer
            messages.append({"role": "assistant", "content": answer.text})
        stats = wait_idle(client)
        assert stats["reused_prefix_tokens"] - before > 0
        assert stats["kept_conversations"] >= 1
        client.end_conversation("trip", tenant="alice")
        stats = wait_idle(client)
        assert stats["kept_conversations"] == 0
        assert stats["device_blocks_free"] == stats["device_blocks_total"]
        with pytest.raises(NotFound):
            client.end_conversation("trip", tenant="alice")


def test_a_tenant_cannot_continue_another_tenants_conversation(stack, tokenizer) -> None:
    with Client(stack.addr) as client:
        client.complete("My secret word is pineapple.", chat=True, max_tokens=8, conversation_id="c1", tenant="alice")
        intruder = client.complete(
            "What is my secret word?", chat=True, max_tokens=8, conversation_id="c1", tenant="bob"
        )
        fresh = client.complete("What is my secret word?", chat=True, max_tokens=8, tenant="bob")
        assert intruder.reused_prefix_tokens == 0
        assert intruder.prompt_tokens == fresh.prompt_tokens, "bob's turn must not contain alice's history"
        assert intruder.token_ids == fresh.token_ids
        with pytest.raises(NotFound):
            client.end_conversation("c1", tenant="carol")
        client.end_conversation("c1", tenant="alice")
        client.end_conversation("c1", tenant="bob")


def test_after_eviction_the_next_turn_recomputes_and_still_matches_generate(
    tiny_pool_stack, tokenizer, reference
) -> None:
    messages = [{"role": "user", "content": TURNS[0]}]
    with Client(tiny_pool_stack.addr) as client:
        first = client.complete(TURNS[0], chat=True, max_tokens=MAX_NEW, conversation_id="evicted")
        messages.append({"role": "assistant", "content": first.text})
        assert wait_idle(client)["kept_conversations"] == 1
        # Other traffic needs the whole pool: the kept KV is evicted rather than anyone preempted.
        client.complete("Count from one to twenty:", max_tokens=150, ignore_eos=True)
        stats = wait_idle(client)
        assert stats["kept_conversations"] == 0 and stats["kept_kv_evicted"] >= 1
        messages.append({"role": "user", "content": TURNS[1]})
        second = client.complete(TURNS[1], chat=True, max_tokens=MAX_NEW, conversation_id="evicted")
        assert second.reused_prefix_tokens == 0
        assert reference.check(_history_ids(tokenizer, messages), second.token_ids, MAX_NEW) in ("match", "near-tie")
        client.end_conversation("evicted")


def test_sdk_conversation_sends_turns_and_frees_the_kept_kv_on_exit(stack, tokenizer, reference) -> None:
    with Client(stack.addr) as client:
        with client.conversation(tenant="dora", max_tokens=MAX_NEW) as conv:
            first = conv.send(TURNS[0])
            chunks = list(conv.stream(TURNS[1]))
            second = conv.turns[-1]
            assert "".join(c.text for c in chunks) == second.text
            assert second.reused_prefix_tokens > 0
            messages = [
                {"role": "user", "content": TURNS[0]},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": TURNS[1]},
            ]
            assert reference.check(_history_ids(tokenizer, messages), second.token_ids, MAX_NEW) in (
                "match",
                "near-tie",
            )
            assert wait_idle(client)["kept_conversations"] >= 1
        stats = wait_idle(client)
    assert stats["kept_conversations"] == 0
    assert stats["device_blocks_free"] == stats["device_blocks_total"]


@pytest.mark.slow
def test_kv_spilled_to_the_host_is_reused_and_a_later_spill_moves_only_new_blocks(
    spill_stack, tokenizer, reference
) -> None:
    """Each turn's KV leaves the device for the host while other traffic runs; the next turn swaps it
    back in. The second spill copies only the blocks written since the first (byte count exact)."""
    block = 16
    crowd = "Count from one to twenty:"  # 150 tokens: needs 10 of the 12 device blocks
    messages: list[dict[str, str]] = []
    with Client(spill_stack.addr) as client:
        stats = wait_idle(client)
        block_bytes = stats["kv_block_bytes"]
        on_host = 0  # tokens of this conversation whose KV the host holds validly
        for k, user in enumerate(TURNS):
            messages.append({"role": "user", "content": user})
            before = wait_idle(client)
            answer = client.complete(user, chat=True, max_tokens=MAX_NEW, conversation_id="spill")
            after = wait_idle(client)
            prompt_ids = _history_ids(tokenizer, messages)
            assert reference.check(prompt_ids, answer.token_ids, MAX_NEW) in ("match", "near-tie")
            if k > 0:
                assert answer.reused_prefix_tokens >= len(_history_ids(tokenizer, messages[:-2])), answer
                assert after["reused_from_host_tokens"] - before["reused_from_host_tokens"] == (
                    answer.reused_prefix_tokens
                ), "the earlier turns' KV came back from the host"
                on_host = answer.reused_prefix_tokens  # the host copy is valid for what was reused
            messages.append({"role": "assistant", "content": answer.text})
            with_kv = answer.prompt_tokens + len(answer.token_ids) - 1  # the last sampled token has no KV yet

            client.complete(crowd, max_tokens=150, ignore_eos=True)  # the kept KV must leave the device
            spilled = wait_idle(client)
            assert spilled["kept_kv_spilled"] - after["kept_kv_spilled"] == 1
            assert spilled["kept_conversations"] == 1 and spilled["kept_kv_blocks"] == 0
            moved = -(-with_kv // block) - on_host // block
            assert spilled["swap_out_bytes"] - after["swap_out_bytes"] == moved * block_bytes
            assert spilled["swap_out_bytes_saved"] - after["swap_out_bytes_saved"] == on_host // block * block_bytes
            if k > 0:
                assert on_host // block > 0, "a later spill must find earlier blocks already on the host"
        client.end_conversation("spill")
        stats = wait_idle(client)
        assert stats["kept_conversations"] == 0
        assert stats["host_blocks_free"] == stats["host_blocks_total"]
        assert stats["device_blocks_free"] == stats["device_blocks_total"]
