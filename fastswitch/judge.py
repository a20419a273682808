"""A branch-and-rethink judge on top of conversations ("Think Twice", arXiv 2510.23596).

Two turns of one chat conversation compare two responses to a question:

1. *Branch*: the model picks 1-3 of the eight quality `DIMENSIONS` that matter most here and analyses
   each response along them, ending at `STOP_MARKER` (sent as a stop string).
2. *Rethink*: in the same conversation (so the server reuses turn 1's KV and prefills only the new
   turn) it re-reads both responses along the chosen dimensions and answers `\\boxed{1}` or `\\boxed{2}`.

By default both turns are constrained on the server (structured output, `regex=`): turn 1 starts with
a `Dimensions:` line of one to three of the eight names (`analysis_regex`), and turn 2 is analysis text
followed by exactly one `\\boxed{1}` or `\\boxed{2}` (`verdict_regex`). The analysis is plain ASCII
without a backslash, at most `verdict_tokens - 9` characters, so the box always fits in the token
budget: every verdict is well formed whatever the model. `constrained=False` sends the prompts alone.

The parsers are strict and never guess. Turn 2 is well formed only when it holds exactly one
`\\boxed{...}` whose value is 1 or 2; whitespace inside the braces is allowed (`\\boxed{ 2 }`).
Anything else is malformed, with the reason: no box, two boxes that conflict, the same box twice
(a model that writes the answer twice, or echoes "\\boxed{1} or \\boxed{2}" from the prompt, has
not committed to one answer), or another value. Dimension problems (no `Dimensions:` line, none
chosen, more than three, unknown names) are reported beside the verdict. They do not make it
malformed: the protocol's output is the verdict.

`parse_dimensions` and `parse_verdict` need no server. `judge()` needs only an object with the
`Client.conversation()` interface.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastswitch.client import Client, Completion

DIMENSIONS = (
    "Information Accuracy",
    "Computational Precision",
    "Logical Reasoning",
    "Implementation Capability",
    "Safety Awareness",
    "Response Completeness",
    "Instruction Adherence",
    "Communication Clarity",
)
MIN_DIMENSIONS, MAX_DIMENSIONS = 1, 3
STOP_MARKER = "[END OF ANALYSIS]"
SYSTEM_PROMPT = "You are a strict and careful judge of answer quality."


@dataclass(slots=True, frozen=True)
class JudgePair:
    """A question, two responses to it and, when known, which response is better (the ground truth)."""

    question: str
    response_1: str
    response_2: str
    better: int | None = None
    name: str = ""
    about: str = ""  # the dimension the pair was written to exercise (documentation only)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgePair:
        better = d.get("better")
        if better not in (1, 2, None):
            raise ValueError(f"pair {d.get('name', '?')!r}: better must be 1 or 2, got {better!r}")
        return cls(d["question"], d["response_1"], d["response_2"], better, d.get("name", ""), d.get("about", ""))


# -- prompts -------------------------------------------------------------------------------------------


def analysis_prompt(pair: JudgePair) -> str:
    """Turn 1 (branch): choose the dimensions that matter and analyse each response along them."""
    return (
        "Compare two responses to a question.\n\n"
        f"Question: {pair.question}\n\n"
        f"Response 1: {pair.response_1}\n\n"
        f"Response 2: {pair.response_2}\n\n"
        f"The quality dimensions are: {', '.join(DIMENSIONS)}.\n\n"
        f"Choose the {MIN_DIMENSIONS} to {MAX_DIMENSIONS} dimensions that matter most for judging these "
        "responses. Then analyse each response along them. Use this format:\n"
        "Dimensions: <chosen dimension names, separated by commas>\n"
        "Response 1: <analysis>\n"
        "Response 2: <analysis>\n"
        f"{STOP_MARKER}"
    )


def verdict_prompt(dimensions: tuple[str, ...] = ()) -> str:
    """Turn 2 (rethink): a focused re-read along the chosen dimensions, then one boxed verdict."""
    focus = ", ".join(dimensions) if dimensions else "the dimensions you chose"
    return (
        f"Now re-read both responses carefully, focusing on {focus}. Check each claim and step for errors. "
        "Then decide which response is better. End with your verdict written once as \\boxed{N}, "
        "where N is 1 or 2."
    )


# -- constraints (structured output) -----------------------------------------------------------------------

VERDICT_BOX_CHARS = len("\\boxed{1}")


def analysis_regex() -> str:
    """Turn 1: a `Dimensions:` line naming one to three of the eight dimensions, then free text."""
    name = "(?:" + "|".join(DIMENSIONS) + ")"  # letters and spaces only: nothing to escape
    return rf"Dimensions: {name}(?:, {name}){{{MIN_DIMENSIONS - 1},{MAX_DIMENSIONS - 1}}}\n[\s\S]*"


def verdict_regex(max_tokens: int) -> str:
    """Turn 2: analysis text, then exactly one `\\boxed{1}` or `\\boxed{2}`, within `max_tokens` tokens.

    The analysis is printable ASCII and newlines without a backslash (so no second box), at most
    `max_tokens - 9` characters. A token holds at least one character, so the box is always reached.
    """
    chars = max_tokens - VERDICT_BOX_CHARS
    if chars < 0:
        raise ValueError(f"a constrained verdict needs at least {VERDICT_BOX_CHARS} tokens, got {max_tokens}")
    return rf"[ -\[\]-~\n]{{0,{chars}}}\\boxed\{{[12]\}}"


# -- parsers ---------------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class DimensionChoice:
    """The dimensions named on turn 1's `Dimensions:` line; `problem` is None when the choice is valid."""

    chosen: tuple[str, ...]
    unknown: tuple[str, ...] = ()
    problem: str | None = None


_CANONICAL = {name.lower(): name for name in DIMENSIONS}
_LABEL = re.compile(r"^[\s>#*_\-\d.)]*(?:\w+\s+)?dimensions?[\s*_]*:(.*)$", re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.*)$")
_SEPARATORS = re.compile(r"\s*(?:[,;/|&]|\band\b)\s*", re.IGNORECASE)
_DECORATION = "*_`'\"“”.:- \t"


def _canonical(item: str) -> str | None:
    """The dimension an item names: exactly, or followed by an explanation ("Safety Awareness (...)")."""
    key = " ".join(item.lower().split())
    if key in _CANONICAL:
        return _CANONICAL[key]
    for lowered, name in _CANONICAL.items():
        if key.startswith(lowered) and key[len(lowered)] in " (-:\u2013\u2014":
            return name
    return None


def parse_dimensions(text: str) -> DimensionChoice:
    """The dimensions on the first `Dimensions:` line of turn 1 (or the list items right below it).

    Names match the eight `DIMENSIONS` case-insensitively; a name said twice counts once.
    """
    lines = text.splitlines()
    found = next(((i, m) for i, line in enumerate(lines) if (m := _LABEL.match(line))), None)
    if found is None:
        return DimensionChoice((), (), "turn 1 has no 'Dimensions:' line")
    at, m = found
    items = _SEPARATORS.split(m.group(1)) if m.group(1).strip(_DECORATION) else []
    if not items:  # "Dimensions:" alone, then a bulleted or numbered list
        for below in lines[at + 1 :]:
            item = _LIST_ITEM.match(below)
            if item is None:
                if items or below.strip():
                    break
                continue  # blank lines before the first item
            items += _SEPARATORS.split(item.group(1))
    chosen: list[str] = []
    unknown: list[str] = []
    for raw in items:
        item = _LIST_ITEM.sub(r"\1", raw).strip(_DECORATION)
        if not item:
            continue
        name = _canonical(item)
        if name is None:
            unknown.append(item)
        elif name not in chosen:
            chosen.append(name)
    problems = []
    if unknown:
        shown = (u if len(u) <= 40 else u[:37] + "..." for u in unknown)
        problems.append("unknown dimension(s): " + ", ".join(repr(u) for u in shown))
    if len(chosen) < MIN_DIMENSIONS:
        problems.append("no dimension chosen")
    elif len(chosen) > MAX_DIMENSIONS:
        problems.append(f"{len(chosen)} dimensions chosen, at most {MAX_DIMENSIONS} allowed")
    return DimensionChoice(tuple(chosen), tuple(unknown), "; ".join(problems) or None)


@dataclass(slots=True, frozen=True)
class Verdict:
    """1 or 2, or None with the reason the answer is malformed."""

    value: int | None
    malformed: str | None = None


_BOXED = re.compile(r"\\boxed\s*(?:\{([^{}]*)\})?")


def parse_verdict(text: str) -> Verdict:
    """Exactly one `\\boxed{1}` or `\\boxed{2}` (inner whitespace allowed), else malformed."""
    values = [m.group(1) for m in _BOXED.finditer(text)]  # None: "\\boxed" without braces
    if not values:
        return Verdict(None, "no \\boxed{} verdict")
    shown = [f"\\boxed{{{v}}}" if v is not None else "\\boxed" for v in values]
    if len(values) > 1:
        kind = "identical" if len({v.strip() if v else v for v in values}) == 1 else "conflicting"
        return Verdict(None, f"{len(values)} {kind} boxed answers ({', '.join(shown)}); exactly one is required")
    value = values[0]
    if value is None:
        return Verdict(None, "\\boxed has no {...} value")
    if value.strip() not in ("1", "2"):
        return Verdict(None, f"{shown[0]} is not 1 or 2")
    return Verdict(int(value.strip()))


# -- the two-turn protocol -----------------------------------------------------------------------------


@dataclass(slots=True)
class JudgeResult:
    """Both turns of one judgement, what was parsed from them, and how long they took."""

    verdict: int | None
    malformed: str | None
    dimensions: DimensionChoice
    analysis: Completion  # turn 1
    rethink: Completion  # turn 2
    messages: list[dict[str, str]] = field(default_factory=list)  # the whole conversation, as sent
    analysis_s: float = 0.0
    rethink_s: float = 0.0
    rethink_ttft_s: float = 0.0

    @property
    def label(self) -> str:
        return "malformed" if self.verdict is None else str(self.verdict)

    @property
    def reused_prefix_tokens(self) -> int:
        """Prompt tokens of turn 2 whose KV the server reused from turn 1 rather than recomputed."""
        return self.rethink.reused_prefix_tokens


def judge(
    client: Client,
    pair: JudgePair,
    *,
    analysis_tokens: int = 160,
    verdict_tokens: int = 64,
    temperature: float = 0.0,
    tenant: str = "",
    system_prompt: str = SYSTEM_PROMPT,
    constrained: bool = True,
    **sampling: Any,
) -> JudgeResult:
    """Run both turns in one conversation, which is ended (its server KV freed) however this returns.

    `constrained` (default) has the server enforce both turns' formats (`analysis_regex`,
    `verdict_regex`); the parsers stay strict either way.
    """
    first = analysis_prompt(pair)
    first_format = {"regex": analysis_regex()} if constrained else {}
    second_format = {"regex": verdict_regex(verdict_tokens)} if constrained else {}
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    with client.conversation(tenant=tenant, system_prompt=system_prompt, temperature=temperature, **sampling) as conv:
        start = time.perf_counter()
        analysis = conv.send(first, max_tokens=analysis_tokens, stop=[STOP_MARKER], **first_format)
        analysis_s = time.perf_counter() - start
        dimensions = parse_dimensions(analysis.text)
        second = verdict_prompt(dimensions.chosen)
        start = time.perf_counter()
        ttft = 0.0
        for chunk in conv.stream(second, max_tokens=verdict_tokens, **second_format):
            if not ttft and chunk.token_ids:
                ttft = time.perf_counter() - start
        rethink = conv.turns[-1]
        rethink_s = time.perf_counter() - start
    verdict = parse_verdict(rethink.text)
    messages += [
        {"role": "user", "content": first},
        {"role": "assistant", "content": analysis.text},
        {"role": "user", "content": second},
        {"role": "assistant", "content": rethink.text},
    ]
    return JudgeResult(
        verdict.value, verdict.malformed, dimensions, analysis, rethink, messages, analysis_s, rethink_s, ttft
    )
