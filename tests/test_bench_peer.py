"""The transformers continuous-batching peer: fixed-length greedy outputs that match plain generate()."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.model

TEXTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "The three most important things to know about photosynthesis are",
]
MAX_NEW = 8


@pytest.fixture(scope="module")
def setup():
    transformers = pytest.importorskip("transformers")
    from fastswitch_bench.peer import load_model
    from svc_common.model_source import resolve_model

    try:
        model_dir = resolve_model(None)
    except FileNotFoundError as exc:
        pytest.skip(f"default model unavailable: {exc}")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    return model_dir, prompts, load_model(model_dir)


def test_cb_matches_sequential_generate(setup):
    from fastswitch_bench.peer import run_sequential_generate, run_transformers_cb

    model_dir, prompts, model = setup
    cb = run_transformers_cb(model_dir, prompts, MAX_NEW, ignore_eos=True, model=model)
    seq = run_sequential_generate(model_dir, prompts, MAX_NEW, ignore_eos=True, model=model)

    for res in (cb, seq):
        assert [len(o) for o in res.outputs] == [MAX_NEW] * len(prompts)
        assert res.generated_tokens == MAX_NEW * len(prompts)
        assert res.wall_s > 0 and res.throughput_tok_s > 0
        assert len(res.ttft_s) == len(prompts) and all(t > 0 for t in res.ttft_s)
        assert len(res.tbt_s) == (MAX_NEW - 1) * len(prompts)
    # greedy continuous batching must reproduce greedy generate() token for token
    assert cb.outputs == seq.outputs


def test_cb_loads_model_itself_and_keeps_prompt_order(setup):
    from fastswitch_bench.peer import run_transformers_cb

    model_dir, prompts, _ = setup
    # reversed order, no warm-up, model loaded from the directory: outputs follow the prompts
    fwd = run_transformers_cb(model_dir, prompts, 4, warmup=False)
    rev = run_transformers_cb(model_dir, prompts[::-1], 4, warmup=False)
    assert rev.outputs == fwd.outputs[::-1]


def test_conversation_waves_replay_the_peers_own_history_and_match_generate(setup):
    from fastswitch_bench.peer import _chat_ids, run_sequential_generate, run_transformers_cb_conversations

    model_dir, _, model = setup
    tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(model_dir)
    conversations = [
        [("What is the capital of France?", 6), ("And of Italy?", 4)],
        [("Name a primary colour.", 5)],
    ]
    res = run_transformers_cb_conversations(model_dir, tok, conversations, model=model)
    assert [(t.conversation, t.turn) for t in res.turns] == [(0, 1), (1, 1), (0, 2)]  # wave by wave
    assert [len(t.output) for t in res.turns] == [6, 5, 4]  # exactly the asked lengths (EOS ignored)
    assert res.generated_tokens == 15 and res.wall_s > 0
    assert all(t.ttft_s is not None and len(t.tbt_s) == len(t.output) - 1 for t in res.turns)
    # turn 2's prompt is the chat template over turn 1, the peer's own answer, and the new question
    history = [
        {"role": "user", "content": conversations[0][0][0]},
        {"role": "assistant", "content": tok.decode(res.turns[0].output, skip_special_tokens=True)},
        {"role": "user", "content": conversations[0][1][0]},
    ]
    prompt = _chat_ids(tok, history)
    assert res.turns[2].prompt_tokens == len(prompt)
    reference = run_sequential_generate(model_dir, [prompt], 4, model=model, warmup=False)
    assert res.turns[2].output == reference.outputs[0]
