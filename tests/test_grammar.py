"""The scheduler's half of structured output, without a model: compiling constraints (errors carry
xgrammar's message), the masks a request's grammar state fills, and the grammar state following
generated tokens through preemption, swaps and recomputation (a fake executor honours the masks)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_scheduler import BLOCK, FakeExecutor, FakeSwapDaemon, assert_ownership

from fastswitch.client import InvalidRequest, build_request
from fastswitch.v1 import api_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.grammar import ConstraintKind, Grammars, OutputConstraint
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish, Sequence
from svc_common.errors import InvalidArgument
from svc_common.plan import Sampling, StepOutput, StepPlan

VOCAB = 49152


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:  # noqa: ANN001
    return Grammars(tokenizer, VOCAB, {tokenizer.eos_token_id})


def allowed(mask: bytes) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[:VOCAB])


def regex(spec: str) -> OutputConstraint:
    return OutputConstraint(ConstraintKind.REGEX, spec)


# -- constraints from the API --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"json_schema": {"type": "integer"}}, OutputConstraint(ConstraintKind.JSON_SCHEMA, '{"type": "integer"}')),
        ({"json_object": True}, OutputConstraint(ConstraintKind.JSON_OBJECT)),
        ({"regex": "a+"}, OutputConstraint(ConstraintKind.REGEX, "a+")),
        ({"choice": ["yes", "no"]}, OutputConstraint(ConstraintKind.CHOICE, choices=("yes", "no"))),
        ({"grammar": 'root ::= "x"'}, OutputConstraint(ConstraintKind.GRAMMAR, 'root ::= "x"')),
        ({}, None),
    ],
)
def test_each_sdk_keyword_becomes_one_constraint_on_the_server(kwargs: dict, expected: OutputConstraint) -> None:
    msg = api_pb2.GenerateRequest.FromString(build_request("p", **kwargs).SerializeToString())
    assert OutputConstraint.from_proto(msg) == expected


def test_the_sdk_refuses_two_constraints_at_once() -> None:
    with pytest.raises(InvalidRequest, match="at most one"):
        build_request("p", regex="a", choice=["a"])


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (OutputConstraint(ConstraintKind.JSON_SCHEMA, '{"type": "objec"}'), 'Unsupported type "objec"'),
        (OutputConstraint(ConstraintKind.JSON_SCHEMA, "{not json"), "Failed to parse JSON"),
        (regex("(ab"), "The parenthesis is not closed"),
        (OutputConstraint(ConstraintKind.GRAMMAR, "root ::= missing"), 'Rule "missing" is not defined'),
        (OutputConstraint(ConstraintKind.CHOICE, choices=()), "at least one option"),
        (OutputConstraint(ConstraintKind.CHOICE, choices=("a", "")), "must be non-empty"),
    ],
)
def test_a_constraint_that_does_not_compile_is_invalid_with_the_engines_message(
    grammars: Grammars, constraint: OutputConstraint, message: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        grammars.compile(constraint)
    assert message in str(err.value) and not str(err.value).startswith("[")  # no C++ log prefix


# -- masks --------------------------------------------------------------------------------------------


def test_a_choice_allows_only_prefixes_of_its_options_and_ends_when_one_is_complete(tokenizer, grammars) -> None:  # noqa: ANN001
    state = grammars.start(OutputConstraint(ConstraintKind.CHOICE, choices=("yes", "no", 'say "hi"\n')))
    texts = {tokenizer.decode([int(t)]) for t in allowed(state.mask)}
    assert texts and all(any(o.startswith(t) for o in ("yes", "no", 'say "hi"\n')) for t in texts)
    assert "yes" in texts and "y" in texts
    assert not state.done
    (token,) = tokenizer.encode("yes", add_special_tokens=False)
    assert state.accept(token) and state.done  # nothing but EOS could follow


def test_eos_is_allowed_only_where_the_grammar_may_end(tokenizer, grammars) -> None:  # noqa: ANN001
    eos = tokenizer.eos_token_id
    state = grammars.start(regex(r"\d+"))
    assert eos not in allowed(state.mask)
    assert state.accept(tokenizer.encode("7", add_special_tokens=False)[0])
    assert eos in allowed(state.mask) and not state.done  # more digits or the end


def test_control_tokens_are_never_allowed_even_where_any_text_is(tokenizer, grammars) -> None:  # noqa: ANN001
    state = grammars.start(regex(r"[\s\S]*"))
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} - {tokenizer.eos_token_id}
    ok = set(allowed(state.mask).tolist())
    assert specials and not specials & ok
    assert len(ok) > VOCAB - 200


def test_a_token_outside_the_grammar_is_refused_with_a_reason(tokenizer, grammars) -> None:  # noqa: ANN001
    state = grammars.start(regex("ab"))
    assert not state.accept(tokenizer.encode("z", add_special_tokens=False)[0])
    assert state.error is not None and "grammar mask" in state.error


# -- the scheduler, with a fake executor that honours the masks ---------------------------------------


class MaskedExecutor(FakeExecutor):
    """FakeExecutor whose sampled token is a function of the context read back from the KV pool,
    drawn among the tokens the chunk's bitmask allows (all of them without one)."""

    def run(self, plan: StepPlan) -> StepOutput:
        out = super().run(plan)
        masks = {c.request_id: c.token_bitmask for c in plan.chunks if c.sample}
        tokens = []
        for rid, h in out.tokens:
            ok = allowed(masks[rid]) if masks[rid] else np.arange(100, 200)
            tokens.append((rid, int(ok[(h * 7919) % len(ok)])))
        free = np.arange(100, 200)  # decodes have no grammar
        decode_tokens = [int(free[(h * 7919) % len(free)]) for h in out.decode_tokens]
        return StepOutput(out.step_id, tokens, decode_tokens=decode_tokens)


def scheduler(num_blocks: int, host_blocks: int = 0, eos: int = 2) -> Scheduler:
    config = SchedulerConfig(max_step_tokens=16, max_running=4)
    sched = Scheduler(config, num_blocks=num_blocks, block_size=BLOCK, eos_token_ids={eos})
    if host_blocks:
        sched.attach_host_pool(host_blocks)
    return sched


SCHEMA = {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4}


def constrained(grammars: Grammars, rid: str, constraint: OutputConstraint, max_tokens: int = 40) -> Sequence:
    return Sequence(rid, list(range(10, 16)), Sampling(), max_tokens, grammar=grammars.start(constraint))


def run(sched: Scheduler, ex: MaskedExecutor, daemon: FakeSwapDaemon | None = None) -> None:
    for _ in range(5000):
        plan = sched.schedule()
        if daemon is not None:
            daemon.tick()
        if plan is not None:
            sched.on_step_output(ex.run(plan))
        assert_ownership(sched)
        if plan is None and not sched.swaps.num_in_flight and not (daemon and daemon.pending) and not sched.has_work():
            return
    raise AssertionError("no progress")


def test_a_grammar_that_allows_only_eos_ends_the_request_without_sampling_it(tokenizer, grammars) -> None:  # noqa: ANN001
    sched, ex = scheduler(64), MaskedExecutor()
    s = constrained(grammars, "a", OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA)))
    sched.add(s)
    run(sched, ex)
    text = tokenizer.decode(s.output_ids)
    assert s.finish is Finish.EOS and tokenizer.eos_token_id not in s.output_ids
    assert isinstance(json.loads(text), list) and 2 <= len(json.loads(text)) <= 4
    assert sched.blocks.num_free == 64


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_preempted_constrained_requests_match_an_unpreempted_run_token_for_token(
    tokenizer,  # noqa: ANN001
    grammars: Grammars,
    preemption: str,
) -> None:
    """The grammar state follows generated tokens: a recompute re-runs KV, never the matcher (feeding
    tokens twice would be refused, or change the masks and so the tokens)."""
    constraints = [
        OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA)),
        regex(r"[a-z]{8,20}( [a-z]{4,12}){3}"),
        OutputConstraint(ConstraintKind.CHOICE, choices=("alpha beta gamma delta", "epsilon")),
        regex(r"(\d\d-){6}\d\d"),
    ]
    alone = []
    for i, c in enumerate(constraints):
        sched = scheduler(64)
        s = constrained(grammars, f"r{i}", c)
        sched.add(s)
        run(sched, MaskedExecutor())
        alone.append(s.output_ids)
    sched = scheduler(7, host_blocks=32 if preemption == "swap" else 0)
    ex = MaskedExecutor()
    daemon = FakeSwapDaemon(sched, delay=2, executor=ex) if preemption == "swap" else None
    crowd = [constrained(grammars, f"r{i}", c) for i, c in enumerate(constraints)]
    for s in crowd:
        sched.add(s)
    run(sched, ex, daemon)
    assert sched.stats.counters()["preemptions"] > 0
    if preemption == "swap":
        assert daemon is not None and daemon.copies["out"] > 0
    else:
        assert sched.stats.counters()["recomputed_tokens"] > 0
    assert [s.output_ids for s in crowd] == alone
    assert all(s.finish is Finish.EOS for s in crowd)
    texts = [tokenizer.decode(s.output_ids) for s in crowd]
    assert re.fullmatch(r"[a-z]{8,20}( [a-z]{4,12}){3}", texts[1]) and re.fullmatch(r"(\d\d-){6}\d\d", texts[3])
    assert texts[2] in ("alpha beta gamma delta", "epsilon")


def test_an_executor_that_ignores_the_mask_fails_the_request_not_the_scheduler(tokenizer, grammars) -> None:  # noqa: ANN001
    sched = scheduler(64)
    s = constrained(grammars, "a", regex("ab"))
    sched.add(s)
    plan = sched.schedule()
    assert plan is not None and plan.chunks[0].token_bitmask == s.grammar.mask  # type: ignore[union-attr]
    sched.on_step_output(StepOutput(plan.step_id, [("a", tokenizer.encode("z", add_special_tokens=False)[0])]))
    assert s.finish is Finish.ERROR and sched.blocks.num_free == 64
