"""The benchmark workload: seeded and reproducible, ShareGPT-shaped, real text, within the preset's bounds."""

from __future__ import annotations

import re
import statistics
from dataclasses import replace

import pytest

from fastswitch_bench.presets import PRESETS
from fastswitch_bench.workload import (
    CONTEXT_MARGIN_PER_TURN,
    SHAREGPT_MEAN_TURNS,
    Workload,
    cut_text,
    generate,
    geometric_pmf,
    load_corpus,
    word_count,
)

SMALL = PRESETS["small"].workload


def test_same_seed_gives_a_byte_identical_file(tmp_path) -> None:
    generate(SMALL).save(tmp_path / "a.json")
    generate(SMALL).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_a_different_seed_gives_a_different_workload() -> None:
    a, b = generate(SMALL), generate(replace(SMALL, seed=1))
    assert a.to_dict()["conversations"] != b.to_dict()["conversations"]


def test_saved_workload_loads_back_identical(tmp_path) -> None:
    w = generate(SMALL)
    w.save(tmp_path / "w.json")
    assert Workload.load(tmp_path / "w.json").to_dict() == w.to_dict()


def test_truncated_geometric_has_the_asked_mean_and_falls_off() -> None:
    probs = geometric_pmf(1, 12, SHAREGPT_MEAN_TURNS)
    assert sum(probs) == pytest.approx(1.0)
    assert sum((k + 1) * p for k, p in enumerate(probs)) == pytest.approx(SHAREGPT_MEAN_TURNS, abs=1e-6)
    assert all(a > b for a, b in zip(probs, probs[1:], strict=False))  # geometric: each count rarer than the last


def test_mean_turns_is_sharegpt_multi_round_on_a_big_sample() -> None:
    w = generate(replace(SMALL, conversations=3000, rate_per_s=10.0))
    counts = [len(c.turns) for c in w.conversations]
    assert statistics.mean(counts) == pytest.approx(5.5, abs=0.05)
    assert min(counts) == 1 and max(counts) == SMALL.max_turns
    # and every preset that runs conversations of the paper's shape has its mean too
    assert generate(SMALL).summary()["mean_turns"] == pytest.approx(5.5, abs=0.5)


def test_lengths_stay_within_the_preset_bounds_and_keep_the_scaled_means() -> None:
    spec = replace(SMALL, conversations=1000, rate_per_s=10.0)
    w = generate(spec)
    turns = [t for c in w.conversations for t in c.turns]
    assert all(spec.min_output_tokens <= t.max_tokens <= spec.max_output_tokens for t in turns)
    assert all(1 <= t.prompt_tokens <= spec.max_input_tokens for t in turns)
    # ShareGPT's means (161 in, 338 out) divided by the scale; clipping trims the tails a little
    assert statistics.mean(t.max_tokens for t in turns) == pytest.approx(338 / spec.scale, rel=0.1)
    assert statistics.mean(t.prompt_tokens for t in turns) == pytest.approx(161 / spec.scale, rel=0.15)


def test_user_turns_are_real_text_cut_from_the_corpus() -> None:
    corpus = load_corpus()
    vocabulary = {re.sub(r"\W", "", word).lower() for line in corpus for word in line.split()}
    text = " ".join(corpus + corpus)  # a turn may run past the last line into the first
    w = generate(SMALL)
    for conv in w.conversations:
        for t in conv.turns:
            assert t.prompt in text
            words = [re.sub(r"\W", "", word).lower() for word in t.prompt.split()]
            assert words and all(word in vocabulary for word in words)
    assert sum(any(c.isalpha() for c in line) for line in corpus) == len(corpus)
    assert len(vocabulary) > 500


def test_cut_text_fits_the_token_budget_with_any_tokenizer() -> None:
    corpus = load_corpus()
    for n in (1, 3, 17, 200):
        text, tokens = cut_text(corpus, 5, n, word_count)
        assert tokens == n == word_count(text)
    chars = len  # a "tokenizer" with one token per character: cut at the last whole word that fits
    text, tokens = cut_text(corpus, 0, 30, chars)
    assert tokens == len(text) <= 30 and corpus[0].startswith(text)


def test_arrivals_are_poisson_and_think_times_exponential() -> None:
    spec = replace(SMALL, conversations=3000, rate_per_s=2.0, think_mean_s=0.5)
    w = generate(spec)
    arrivals = [c.arrival_s for c in w.conversations]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / spec.rate_per_s, rel=0.08)
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.1)  # exponential: sd = mean
    thinks = [t.think_s for c in w.conversations for t in c.turns[1:]]
    assert all(c.turns[0].think_s == 0.0 for c in w.conversations)
    assert statistics.mean(thinks) == pytest.approx(spec.think_mean_s, rel=0.08)


def test_tenants_priorities_and_churn_are_recorded() -> None:
    w = generate(replace(SMALL, conversations=200, tenants=3, priority_levels=4))
    assert {c.tenant for c in w.conversations} == {"tenant-0", "tenant-1", "tenant-2"}
    assert {c.priority for c in w.conversations} == {0, 1, 2, 3}
    assert w.to_dict()["spec"]["priority_updates"] == SMALL.priority_updates
    assert w.to_dict()["spec"]["priority_update_prob"] == SMALL.priority_update_prob


def test_changing_one_aspect_leaves_the_others_alone() -> None:
    a, b = generate(SMALL), generate(replace(SMALL, think_mean_s=3.0, rate_per_s=0.1))
    for ca, cb in zip(a.conversations, b.conversations, strict=True):
        assert [(t.prompt, t.max_tokens) for t in ca.turns] == [(t.prompt, t.max_tokens) for t in cb.turns]
        assert (ca.tenant, ca.priority) == (cb.tenant, cb.priority)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mean_turns": 9.0}, "truncated geometric"),
        ({"conversations": 0}, "conversations"),
        ({"rate_per_s": 0.0}, "rate"),
        ({"priority_updates": "chaos"}, "priority updates"),
        ({"priority_update_prob": 1.5}, "probability"),
    ],
)
def test_bad_specs_are_rejected_with_a_clear_message(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        generate(replace(SMALL, **change))


def test_a_file_of_another_format_is_rejected(tmp_path) -> None:
    (tmp_path / "w.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="fastswitch-workload"):
        Workload.load(tmp_path / "w.json")


def test_small_preset_pool_cannot_hold_the_live_conversations() -> None:
    """Preemption and swapping must happen: the conversations' final contexts far exceed the device pool."""
    preset = PRESETS["small"]
    w = generate(preset.workload)
    per_turn_overhead = 5  # chat template tokens around each message
    contexts = [
        30 + sum(t.prompt_tokens + t.max_tokens + 2 * per_turn_overhead for t in c.turns) for c in w.conversations
    ]
    assert sum(contexts) > 2.5 * preset.device_blocks * preset.block_size
    assert max(contexts) < preset.device_blocks * preset.block_size  # but each one fits on its own


@pytest.mark.model
def test_prompt_lengths_are_exact_with_the_models_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    from fastswitch_bench.workload import hf_token_counter
    from svc_common.model_source import resolve_model

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model(None))
    count = hf_token_counter(tok)
    w = generate(SMALL, count, "smollm2")
    for t in (t for c in w.conversations for t in c.turns):
        assert t.prompt_tokens == count(t.prompt) <= SMALL.max_input_tokens
    drawn = generate(SMALL)  # the same draws, cut by words: the model's cut is at most one word shorter
    assert w.summary()["total_output_tokens"] == drawn.summary()["total_output_tokens"]


def test_a_context_bound_ends_conversations_before_the_turn_that_would_overflow_it() -> None:
    """The gpu preset's histories outgrew the 8,192-token context: turns were refused, and the
    conversations' later turns never sent. With the bound, each conversation stops before that turn;
    the other conversations draw what they drew without it."""
    spec = PRESETS["gpu"].workload
    bounded = generate(replace(spec, conversations=40))
    free = generate(replace(spec, conversations=40, max_context_tokens=0))
    dropped = 0
    for b, f in zip(bounded.conversations, free.conversations, strict=True):
        assert b.turns == f.turns[: len(b.turns)] and b.turns, b.conversation_id
        history = sum(CONTEXT_MARGIN_PER_TURN + t.prompt_tokens + t.max_tokens for t in b.turns)
        assert history <= spec.max_context_tokens or len(b.turns) == 1
        dropped += len(f.turns) - len(b.turns)
    assert dropped > 0, "the unbounded draw should overflow the context somewhere"
