"""The branch-and-rethink judge: strict parsing of both turns (no server), the two-turn protocol against a
fake client, and one judgement on the real stack whose second turn reuses the first turn's KV and
matches generate() on the whole conversation."""

from __future__ import annotations

import json
import pathlib
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fastswitch.client import Completion, TokenChunk
from fastswitch.judge import (
    DIMENSIONS,
    STOP_MARKER,
    JudgePair,
    analysis_prompt,
    analysis_regex,
    judge,
    parse_dimensions,
    parse_verdict,
    verdict_prompt,
    verdict_regex,
)

PAIRS = pathlib.Path(__file__).resolve().parent.parent / "examples" / "judge_pairs.json"

# -- turn 2: the verdict -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Response 1 computes 17 x 4 correctly.\n\\boxed{1}", 1),
        ("\\boxed{2}", 2),
        ("The verdict is \\boxed{ 2 }.", 2),
        ("\\boxed{\t1\n}", 1),
        ("\\boxed {2}", 2),
        ("$\\boxed{1}$", 1),
    ],
)
def test_exactly_one_boxed_1_or_2_is_a_verdict(text: str, value: int) -> None:
    verdict = parse_verdict(text)
    assert verdict.value == value
    assert verdict.malformed is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no \\boxed{} verdict"),
        ("Response 2 is better.", "no \\boxed{} verdict"),
        ("The answer is boxed{2}", "no \\boxed{} verdict"),  # no backslash: not the format
        ("\\boxed{1} or \\boxed{2}", "2 conflicting boxed answers (\\boxed{1}, \\boxed{2})"),
        ("First \\boxed{2}, on reflection \\boxed{1}, no: \\boxed{2}", "3 conflicting boxed answers"),
        # Strict reading: the same answer twice is still not exactly one answer (the issue: never guess).
        ("\\boxed{2}\nSo the verdict is \\boxed{2}", "2 identical boxed answers (\\boxed{2}, \\boxed{2})"),
        ("\\boxed{2} ... \\boxed{ 2 }", "2 identical boxed answers"),
        ("\\boxed{3}", "\\boxed{3} is not 1 or 2"),
        ("\\boxed{}", "\\boxed{} is not 1 or 2"),
        ("\\boxed{Response 2}", "\\boxed{Response 2} is not 1 or 2"),
        ("\\boxed{1.5}", "is not 1 or 2"),
        ("\\boxed{12}", "\\boxed{12} is not 1 or 2"),
        ("\\boxed{\\text{2}}", "\\boxed has no {...} value"),
        ("The verdict is \\boxed{2", "\\boxed has no {...} value"),  # cut off by max_tokens
        ("\\boxed", "\\boxed has no {...} value"),
    ],
)
def test_anything_but_exactly_one_boxed_1_or_2_is_malformed_with_the_reason(text: str, reason: str) -> None:
    verdict = parse_verdict(text)
    assert verdict.value is None
    assert verdict.malformed is not None and reason in verdict.malformed


# -- turn 1: the chosen dimensions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "chosen"),
    [
        (
            "Dimensions: Computational Precision\nResponse 1: right.\nResponse 2: wrong sum.",
            ("Computational Precision",),
        ),
        ("dimensions: safety awareness, INFORMATION ACCURACY", ("Safety Awareness", "Information Accuracy")),
        ("**Dimensions:** Logical Reasoning; Communication Clarity.", ("Logical Reasoning", "Communication Clarity")),
        (
            "Chosen dimensions: Logical Reasoning and Response Completeness",
            ("Logical Reasoning", "Response Completeness"),
        ),
        ("Dimensions: Instruction   Adherence", ("Instruction Adherence",)),
        ("Dimensions: Safety Awareness (the advice is dangerous)", ("Safety Awareness",)),
        (
            "Dimensions:\n- Implementation Capability\n- Logical Reasoning\n\nResponse 1: ...",
            ("Implementation Capability", "Logical Reasoning"),
        ),
        (
            "Dimensions:\n\n1. Information Accuracy: Sydney is wrong\n2. Communication Clarity\nResponse 1: ...",
            ("Information Accuracy", "Communication Clarity"),
        ),
        ("Some preamble.\nDimension: Information Accuracy", ("Information Accuracy",)),
        ("Dimensions: Safety Awareness, safety awareness", ("Safety Awareness",)),  # said twice counts once
    ],
)
def test_chosen_dimensions_are_matched_case_insensitively_against_the_eight(text: str, chosen: tuple[str, ...]) -> None:
    choice = parse_dimensions(text)
    assert choice.chosen == chosen
    assert choice.unknown == ()
    assert choice.problem is None


def test_only_the_first_dimensions_line_counts() -> None:
    choice = parse_dimensions("Dimensions: Logical Reasoning\nLater: Dimensions: Safety Awareness")
    assert choice.chosen == ("Logical Reasoning",)


@pytest.mark.parametrize(
    ("text", "problem", "chosen", "unknown"),
    [
        ("Response 1 is right. Response 2 is wrong.", "no 'Dimensions:' line", (), ()),
        ("The dimensions that matter are:\n- Logical Reasoning", "no 'Dimensions:' line", (), ()),
        ("Dimensions:", "no dimension chosen", (), ()),
        ("Dimensions: \nResponse 1: fine", "no dimension chosen", (), ()),
        ("Dimensions: Accuracy", "unknown dimension(s): 'Accuracy'; no dimension chosen", (), ("Accuracy",)),
        (
            "Dimensions: Safety Awareness, Politeness",
            "unknown dimension(s): 'Politeness'",
            ("Safety Awareness",),
            ("Politeness",),
        ),
        ("Dimensions: " + ", ".join(DIMENSIONS), "8 dimensions chosen, at most 3 allowed", DIMENSIONS, ()),
        (
            "Dimensions: " + ", ".join(DIMENSIONS[:4]),
            "4 dimensions chosen, at most 3 allowed",
            DIMENSIONS[:4],
            (),
        ),
        ("Dimensions: <chosen dimension names>", "unknown dimension(s): '<chosen dimension names>'", (), None),
        ("Dimensions: Safety", "unknown dimension(s): 'Safety'", (), ("Safety",)),  # a prefix is not a name
        ("Dimensions: Safety Awarenesses", "unknown", (), ("Safety Awarenesses",)),
    ],
)
def test_dimension_problems_are_reported_not_repaired(
    text: str, problem: str, chosen: tuple[str, ...], unknown: tuple[str, ...] | None
) -> None:
    choice = parse_dimensions(text)
    assert choice.problem is not None and problem in choice.problem
    assert choice.chosen == chosen
    if unknown is not None:
        assert choice.unknown == unknown


def test_a_long_unknown_dimension_is_shortened_in_the_problem() -> None:
    choice = parse_dimensions("Dimensions: " + "1. 2. 3. 4. 5. 6. 7. 8. 9. 10. 11. 12. 13. 14. 15. 16.")
    assert choice.problem is not None and "..." in choice.problem and len(choice.problem) < 100


# -- prompts and the shipped pairs -----------------------------------------------------------------------


def _pairs() -> list[JudgePair]:
    return [JudgePair.from_dict(d) for d in json.loads(PAIRS.read_text())]


def test_shipped_pairs_have_ground_truth_on_both_sides_and_cover_distinct_dimensions() -> None:
    pairs = _pairs()
    assert 6 <= len(pairs) <= 8
    assert {p.better for p in pairs} == {1, 2}
    assert len({p.name for p in pairs}) == len(pairs)
    assert {p.about for p in pairs} <= set(DIMENSIONS)
    assert len({p.about for p in pairs}) == len(pairs)


def test_a_pair_without_a_valid_ground_truth_is_rejected() -> None:
    with pytest.raises(ValueError, match="better must be 1 or 2"):
        JudgePair.from_dict({"question": "q", "response_1": "a", "response_2": "b", "better": 3})


def test_prompts_name_every_dimension_the_stop_marker_and_the_verdict_format() -> None:
    pair = _pairs()[0]
    first = analysis_prompt(pair)
    assert all(d in first for d in DIMENSIONS)
    assert pair.question in first and pair.response_1 in first and pair.response_2 in first
    assert STOP_MARKER in first and "Dimensions:" in first
    assert "\\boxed{N}" in verdict_prompt() and "the dimensions you chose" in verdict_prompt()
    assert "Safety Awareness" in verdict_prompt(("Safety Awareness",))


# -- the constraints (structured output) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("Dimensions: Safety Awareness\nResponse 1: fine.", True),
        ("Dimensions: Logical Reasoning, Information Accuracy, Communication Clarity\n", True),
        ("Dimensions: Logical Reasoning, Information Accuracy, Communication Clarity, Safety Awareness\n", False),
        ("Dimensions: Logic\n", False),
        ("Dimensions: \n", False),
        ("Response 1: fine.\nDimensions: Safety Awareness\n", False),
    ],
)
def test_turn_one_must_open_with_one_to_three_known_dimensions(text: str, ok: bool) -> None:
    assert (re.fullmatch(analysis_regex(), text) is not None) == ok
    if ok:
        assert parse_dimensions(text).problem is None


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("Response 1 is right.\n\\boxed{1}", True),
        ("\\boxed{2}", True),
        ("x" * 55 + "\\boxed{2}", True),
        ("x" * 56 + "\\boxed{2}", False),  # over the 64-token budget's analysis length
        ("\\boxed{1} \\boxed{2}", False),
        ("\\boxed{3}", False),
        ("Response 1 is right.", False),
        ("caf\u00e9 \\boxed{1}", False),  # ASCII only: one token can never hold less than one character
    ],
)
def test_turn_two_is_short_ascii_analysis_then_exactly_one_box(text: str, ok: bool) -> None:
    assert (re.fullmatch(verdict_regex(64), text) is not None) == ok
    if ok:
        assert parse_verdict(text).value in (1, 2)


def test_a_verdict_budget_too_small_for_the_box_is_refused() -> None:
    assert re.fullmatch(verdict_regex(9), "\\boxed{1}")
    with pytest.raises(ValueError, match="at least 9 tokens"):
        verdict_regex(8)


# -- the protocol, against a fake client --------------------------------------------------------------


class _FakeConversation:
    def __init__(self, client: _FakeClient, defaults: dict[str, Any]) -> None:
        self.client = client
        self.defaults = defaults
        self.turns: list[Completion] = []

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[TokenChunk]:
        self.client.sent.append((prompt, {**self.defaults, **kwargs}))
        text = self.client.replies[len(self.turns)]
        if isinstance(text, Exception):
            raise text
        reused = len(self.turns) * 100
        chunk = TokenChunk("r", text, [7, 8], "stop", 0, prompt_tokens=10 + reused, reused_prefix_tokens=reused)
        completion = Completion("r", "")
        completion.add(chunk)
        yield chunk
        self.turns.append(completion)

    def send(self, prompt: str, **kwargs: Any) -> Completion:
        for _ in self.stream(prompt, **kwargs):
            pass
        return self.turns[-1]

    def __enter__(self) -> _FakeConversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.ended += 1


class _FakeClient:
    def __init__(self, *replies: str | Exception) -> None:
        self.replies = replies
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.opened: list[dict[str, Any]] = []
        self.ended = 0

    def conversation(self, **kwargs: Any) -> _FakeConversation:
        self.opened.append(kwargs)
        return _FakeConversation(self, {k: v for k, v in kwargs.items() if k not in ("tenant", "system_prompt")})


def test_judge_runs_both_turns_in_one_conversation_and_ends_it() -> None:
    client = _FakeClient("Dimensions: Computational Precision\nResponse 2 adds wrongly.", "Checked. \\boxed{1}")
    result = judge(client, _pairs()[0], analysis_tokens=50, verdict_tokens=20)  # type: ignore[arg-type]
    assert len(client.opened) == 1 and client.ended == 1
    (first, first_opts), (second, second_opts) = client.sent
    assert first_opts["stop"] == [STOP_MARKER] and first_opts["max_tokens"] == 50
    assert first_opts["temperature"] == 0.0 and second_opts["temperature"] == 0.0
    assert second_opts["max_tokens"] == 20 and "stop" not in second_opts
    assert first_opts["regex"] == analysis_regex() and second_opts["regex"] == verdict_regex(20)
    assert "Computational Precision" in second
    assert (result.verdict, result.malformed, result.label) == (1, None, "1")
    assert result.dimensions.chosen == ("Computational Precision",)
    assert result.reused_prefix_tokens == 100
    assert [m["role"] for m in result.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert result.messages[1]["content"] == first and result.messages[3]["content"] == second


def test_judge_reports_a_malformed_verdict_instead_of_guessing() -> None:
    client = _FakeClient("Response 1 is fine.", "Response 1 is better, so \\boxed{1} or maybe \\boxed{2}.")
    result = judge(client, _pairs()[0], constrained=False)  # type: ignore[arg-type]
    assert all("regex" not in opts for _, opts in client.sent)
    assert result.verdict is None and result.label == "malformed"
    assert result.malformed is not None and "conflicting" in result.malformed
    assert result.dimensions.problem is not None
    assert "the dimensions you chose" in client.sent[1][0]


def test_judge_ends_the_conversation_when_a_turn_fails() -> None:
    client = _FakeClient("Dimensions: Logical Reasoning", RuntimeError("server went away"))
    with pytest.raises(RuntimeError):
        judge(client, _pairs()[0])  # type: ignore[arg-type]
    assert client.ended == 1


# -- on the real stack -------------------------------------------------------------------------------


def _history_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:  # noqa: ANN001
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.model
def test_judge_turn_two_reuses_turn_one_kv_is_well_formed_and_matches_generate(stack, tokenizer, reference) -> None:
    from test_structured_output import check_constrained

    from fastswitch.client import Client
    from scheduler_svc.grammar import ConstraintKind, Grammars, OutputConstraint

    pair = _pairs()[0]
    with Client(stack.addr) as client:
        result = judge(client, pair, analysis_tokens=64, verdict_tokens=24, tenant="judge")
        deadline = time.monotonic() + 10
        while (stats := client.stats())["live_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
    turn1_prompt = _history_ids(tokenizer, result.messages[:2])
    turn2_prompt = _history_ids(tokenizer, result.messages[:4])
    assert result.analysis.prompt_tokens == len(turn1_prompt)
    assert result.rethink.prompt_tokens == len(turn2_prompt)
    assert result.reused_prefix_tokens >= len(turn1_prompt), result.reused_prefix_tokens
    # Turn 2 is what generate() produces on the whole conversation under the same grammar.
    grammars = Grammars(tokenizer, tokenizer.vocab_size, {tokenizer.eos_token_id})
    verdict = OutputConstraint(ConstraintKind.REGEX, verdict_regex(24))
    assert check_constrained(reference, grammars, verdict, turn2_prompt, result.rethink.token_ids, 24)
    # Constrained on the server, both turns are well formed whatever the model writes.
    assert result.verdict in (1, 2) and result.malformed is None, result.rethink.text
    assert result.dimensions.problem is None, result.analysis.text
    assert stats["kept_conversations"] == 0, "the judge must end its conversation and free its KV"
