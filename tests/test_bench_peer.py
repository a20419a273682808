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
    from fastswitch.bench.peer import load_model
    from fastswitch.common.model_source import resolve_model

    try:
        model_dir = resolve_model(None)
    except FileNotFoundError as exc:
        pytest.skip(f"default model unavailable: {exc}")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    return model_dir, prompts, load_model(model_dir)


def test_cb_matches_sequential_generate(setup):
    from fastswitch.bench.peer import run_sequential_generate, run_transformers_cb

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
    from fastswitch.bench.peer import run_transformers_cb

    model_dir, prompts, _ = setup
    # reversed order, no warm-up, model loaded from the directory: outputs follow the prompts
    fwd = run_transformers_cb(model_dir, prompts, 4, warmup=False)
    rev = run_transformers_cb(model_dir, prompts[::-1], 4, warmup=False)
    assert rev.outputs == fwd.outputs[::-1]
