"""Structured output on the real model: outputs valid against held-out JSON schemas and regexes while
a small KV pool forces preemption and swaps, greedy constrained outputs equal to transformers'
generate() with the same grammar, a grammar that allows everything changing nothing, bad grammars
rejected before anything runs, and the CLI flags."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import NEAR_TIE_LOGIT_GAP, PROMPTS, Reference, running_stack

from fastswitch.client import Client, Completion, InvalidRequest

pytestmark = pytest.mark.model

# Held out: written for these tests only; bounded, so that greedy output completes within MAX_TOKENS.
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        },
        "required": ["city", "country", "population"],
    },
    {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "maybe"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["answer", "confidence"],
    },
    {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 3, "maxItems": 3},
]
REGEXES = [r"\d{3}-\d{4}", r"(red|green|blue)( (red|green|blue)){2}", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}"]
QUESTIONS = [
    "Describe the largest city of Japan as JSON.",
    "Is the sea salty? Answer as JSON.",
    "Name three fruits as a JSON list.",
    "Make up a phone number.",
    "Name three colours.",
    "Make up a person's first and last name.",
]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def pressed_stack(model_dir: str) -> Iterator[Any]:
    """12 device blocks (192 tokens) and the priority policy: a long high-priority prompt arriving while
    constrained requests run must preempt them, and their KV is swapped out (64 host blocks)."""
    with running_stack(device_blocks=12, host_blocks=64, max_step_tokens=64, policy="priority") as stack:
        yield stack


@pytest.fixture(scope="module")
def grammars(tokenizer):  # noqa: ANN001, ANN201
    from scheduler_svc.grammar import Grammars

    return Grammars(tokenizer, tokenizer.vocab_size, {tokenizer.eos_token_id})


def chat_ids(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# About 150 tokens: with 12 blocks of 16, admitting it at a higher priority preempts whatever runs.
BALLAST = " ".join(f"Item {i} of the inventory is a box of assorted parts." for i in range(10))


def concurrently(
    addr: str, jobs: list[tuple[str, dict[str, Any]]], ballast_after_first_tokens: int = 0
) -> list[Completion]:
    """Run the jobs at once. With `ballast_after_first_tokens` = k: once k of them have produced a token
    (so they hold KV), a long high-priority prompt arrives and preempts them."""
    results: list[Completion | BaseException | None] = [None] * len(jobs)
    started = threading.Semaphore(0)

    def one(i: int, prompt: str, kwargs: dict[str, Any]) -> None:
        try:
            completion = Completion("", "")
            with Client(addr) as client:
                for chunk in client.generate(prompt, **kwargs):
                    if not completion.token_ids and chunk.token_ids:
                        started.release()
                    completion.add(chunk)
            results[i] = completion
        except BaseException as err:  # noqa: BLE001 - re-raised below
            results[i] = err

    threads = [threading.Thread(target=one, args=(i, p, k)) for i, (p, k) in enumerate(jobs)]
    for t in threads:
        t.start()
    if ballast_after_first_tokens:
        for _ in range(ballast_after_first_tokens):
            assert started.acquire(timeout=300), "the constrained requests produced no token"
        with Client(addr) as client:
            client.complete(BALLAST, max_tokens=8, priority=5, ignore_eos=True)
    for t in threads:
        t.join(timeout=600)
    for r in results:
        if not isinstance(r, Completion):
            raise AssertionError(f"a request failed: {r!r}")
    return results  # type: ignore[return-value]


def check_constrained(
    reference: Reference, grammars: Any, constraint: Any, prompt_ids: list[int], got: list[int], max_new_tokens: int
) -> str:
    """Greedy generate() with xgrammar's logits processor on the same grammar is the ground truth: 'match',
    or 'near-tie' when the first difference is a near-tie among the tokens the grammar allows there."""
    import torch
    from xgrammar.contrib.hf import LogitsProcessor

    compiled = grammars.compile(constraint)
    out = reference.model.generate(  # type: ignore[attr-defined]
        torch.tensor([prompt_ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=[LogitsProcessor(compiled)],
        pad_token_id=reference.tokenizer.eos_token_id,  # type: ignore[attr-defined]
    )
    want = out[0, len(prompt_ids) :].tolist()
    eos = reference.tokenizer.eos_token_id  # type: ignore[attr-defined]
    if want and want[-1] == eos and got == want[:-1]:
        return "match"  # the server ends where the grammar allows only EOS, without sampling it
    if got == want:
        return "match"
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    state = grammars.start(constraint)
    for token in want[:i]:
        assert state.accept(token)
    with torch.inference_mode():
        logits = reference.model(torch.tensor([prompt_ids + want[:i]])).logits[0, -1]  # type: ignore[operator]
    from executor_svc.token_mask import apply_token_bitmask

    apply_token_bitmask(logits, state.mask)
    top = torch.topk(logits.float(), 2).values
    gap = float(top[0] - top[1])
    assert gap < NEAR_TIE_LOGIT_GAP, f"differs from constrained generate() at token {i} (gap {gap:.4f}):\n{got}\n{want}"
    return "near-tie"


@pytest.mark.slow
def test_outputs_are_valid_against_held_out_schemas_and_regexes_under_preemption_and_swap(
    pressed_stack,
    tokenizer,
    reference,
    grammars,  # noqa: ANN001
) -> None:
    import jsonschema

    from scheduler_svc.grammar import ConstraintKind, OutputConstraint

    constraints = [{"json_schema": s} for s in SCHEMAS] + [{"regex": r} for r in REGEXES]
    with Client(pressed_stack.addr) as client:
        before = client.stats()
    jobs = [(q, {"chat": True, "max_tokens": MAX_TOKENS, **c}) for q, c in zip(QUESTIONS, constraints, strict=True)]
    results = concurrently(pressed_stack.addr, jobs, ballast_after_first_tokens=2)
    with Client(pressed_stack.addr) as client:
        after = client.stats()
    # Only the constrained requests (priority 0) can have been preempted: the ballast outranks them.
    assert after["preemptions"] > before["preemptions"], "the ballast was meant to preempt constrained requests"
    assert after["swap_out_bytes"] > before["swap_out_bytes"], "preempted KV was meant to be swapped out"
    for schema, r in zip(SCHEMAS, results[: len(SCHEMAS)], strict=True):
        assert r.finish_reason == "eos", (r.finish_reason, r.text)
        jsonschema.validate(json.loads(r.text), schema)
    for pattern, r in zip(REGEXES, results[len(SCHEMAS) :], strict=True):
        assert r.finish_reason == "eos" and re.fullmatch(pattern, r.text), (pattern, r.text)
    # Token for token what transformers generates under the same grammar, preemption and swaps notwithstanding.
    for (question, kwargs), r in zip(jobs, results, strict=True):
        kind = "json_schema" if "json_schema" in kwargs else "regex"
        spec = json.dumps(kwargs[kind]) if kind == "json_schema" else kwargs[kind]
        constraint = OutputConstraint(ConstraintKind(kind), spec)
        prompt_ids = chat_ids(tokenizer, question)
        assert check_constrained(reference, grammars, constraint, prompt_ids, r.token_ids, MAX_TOKENS)


def test_a_grammar_that_allows_everything_changes_no_greedy_output(pressed_stack, tokenizer, reference) -> None:  # noqa: ANN001
    prompts = PROMPTS[:4]
    plain = concurrently(pressed_stack.addr, [(p, {"max_tokens": 24}) for p in prompts])
    free = concurrently(pressed_stack.addr, [(p, {"max_tokens": 24, "regex": r"[\s\S]*"}) for p in prompts])
    for prompt, a, b in zip(prompts, plain, free, strict=True):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert reference.check(ids, b.token_ids, 24) in ("match", "near-tie")


def test_a_grammar_that_does_not_compile_is_rejected_before_anything_runs(pressed_stack) -> None:  # noqa: ANN001
    with Client(pressed_stack.addr) as client:
        before = client.stats()
        for bad, message in [
            ({"json_schema": '{"type": "objec"}'}, 'Unsupported type "objec"'),
            ({"regex": "(ab"}, "parenthesis is not closed"),
            ({"grammar": "root ::= nothing"}, 'Rule "nothing" is not defined'),
            ({"choice": []}, "at least one option"),
        ]:
            with pytest.raises(InvalidRequest, match=re.escape(message)) as err:
                client.complete("Hello", max_tokens=4, **bad)
            assert "INVALID_ARGUMENT" in str(err.value)
        after = client.stats()
    for key in ("live_requests", "waiting", "running", "device_blocks_free", "generated_tokens", "steps"):
        assert after.get(key, 0) == before.get(key, 0), key


def test_cli_generate_constrains_the_output_with_each_flag(pressed_stack, tmp_path, capsys) -> None:  # noqa: ANN001
    from fastswitch.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    grammar = tmp_path / "grammar.ebnf"
    grammar.write_text('root ::= "The answer is " ("yes" | "no") "."')
    base = ["generate", "--addr", pressed_stack.addr, "--chat", "--max-tokens", "32"]
    cases = [
        (["--choice", "yes,no"], lambda out: out in ("yes", "no")),
        (["--regex", r"\d{2}"], lambda out: re.fullmatch(r"\d{2}", out)),
        (["--json-schema", str(schema)], lambda out: isinstance(json.loads(out)["ok"], bool)),
        (["--grammar", str(grammar)], lambda out: out in ("The answer is yes.", "The answer is no.")),
    ]
    for flags, valid in cases:
        assert main([*base, *flags, "Is water wet?"]) == 0
        out = capsys.readouterr().out.rstrip("\n")
        assert valid(out), (flags, out)
    with pytest.raises(SystemExit, match="cannot read --json-schema"):
        main([*base, "--json-schema", str(tmp_path / "missing.json"), "x"])
