"""Incremental detokenisation: streamed pieces add up to the full decode; stop strings never leak."""

from __future__ import annotations

import pytest

from scheduler_svc.detokenizer import Detokenizer

TEXTS = [
    "The capital of France is Paris.",
    "Unicode: café, naïve, 東京, emoji 🎉🚀 and done.",
    "def f(x):\n    return x * 2  # doubled\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_concatenate_to_the_full_decode(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(tokenizer) -> None:
    text = "one two three four five"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer, stop=("three f",))
    out = ""
    for t in ids:
        out += detok.add(t)
        if detok.stopped:
            break
    out += detok.flush()
    assert detok.stopped
    assert out == "one two "


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer) -> None:
    ids = tokenizer("alpha beta", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer, stop=("betamax",))
    out = "".join(detok.add(t) for t in ids) + detok.flush()
    assert out == "alpha beta" and not detok.stopped
