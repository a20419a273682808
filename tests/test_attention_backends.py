"""The real default model through the executor's step, per attention backend: greedy tokens equal
`generate()` (fp32), with a chunked prefill over a cached prefix. On a CPU the Triton backend runs
under Triton's interpreter; on a GPU the same checks run compiled, plus CUDA graphs vs eager and bf16
agreement (gpu-marked)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must be chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from executor_svc.config import ExecutorConfig  # noqa: E402
from executor_svc.model_runner import ModelRunner  # noqa: E402
from svc_common.plan import NewRequest, Sampling, ScheduledChunk, StepPlan  # noqa: E402
from tests.conftest import PROMPTS  # noqa: E402

pytestmark = pytest.mark.model

BLOCKS_PER_REQUEST = 8


def greedy(runner: ModelRunner, prompts: list[list[int]], max_new: int, first_chunk: int = 3) -> list[list[int]]:
    """Drive the runner the way the scheduler does: prompt 0 prefilled in two chunks (the second over
    a cached prefix), the others whole, then batched decodes."""
    bs = runner.block_size
    assert all(len(p) + max_new <= BLOCKS_PER_REQUEST * bs for p in prompts)
    tables = {str(i): list(range(i * BLOCKS_PER_REQUEST, (i + 1) * BLOCKS_PER_REQUEST)) for i in range(len(prompts))}
    out: dict[str, list[int]] = {rid: [] for rid in tables}
    first = [
        ScheduledChunk(rid, prompts[int(rid)] if rid != "0" else prompts[0][:first_chunk], 0, tables[rid], rid != "0")
        for rid in tables
    ]
    steps = [
        StepPlan(0, [NewRequest(rid, Sampling()) for rid in tables], first),
        StepPlan(1, [], [ScheduledChunk("0", prompts[0][first_chunk:], first_chunk, [], True)]),
    ]
    for plan in steps:
        for rid, token in runner.step(plan).tokens:
            out[rid].append(token)
    step_id = 2
    while any(len(toks) < max_new for toks in out.values()):
        chunks = [
            ScheduledChunk(rid, [toks[-1]], len(prompts[int(rid)]) + len(toks) - 1, [], True)
            for rid, toks in out.items()
            if len(toks) < max_new
        ]
        for rid, token in runner.step(StepPlan(step_id, [], chunks)).tokens:
            out[rid].append(token)
        step_id += 1
    return [out[str(i)] for i in range(len(prompts))]


def _runner(**settings: object) -> ModelRunner:
    config = ExecutorConfig(device_blocks=64, threads=2, dtype="float32")
    for key, value in settings.items():
        setattr(config, key, value)
    return ModelRunner(config)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:  # noqa: ANN001
    return [tokenizer(p).input_ids for p in PROMPTS[:2]]


@pytest.fixture(scope="module")
def triton_runner(model_dir: str) -> Iterator[ModelRunner]:
    pytest.importorskip("triton")
    runner = _runner(attention="triton")
    yield runner
    runner.close()


@pytest.mark.slow
def test_triton_backend_is_token_identical_to_generate(triton_runner, reference, prompt_ids) -> None:  # noqa: ANN001
    got = greedy(triton_runner, prompt_ids, max_new=4)
    for ids, tokens in zip(prompt_ids, got, strict=True):
        assert reference.check(ids, tokens, 4) in ("match", "near-tie")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graphs_replay_gives_the_eager_tokens_in_fp32(triton_runner, reference, prompt_ids) -> None:  # noqa: ANN001
    graphed = _runner(attention="triton", cuda_graphs=True)
    try:
        assert graphed.graphs is not None and graphed.graphs.buckets
        eager = greedy(triton_runner, prompt_ids, max_new=24)
        assert greedy(graphed, prompt_ids, max_new=24) == eager
        for ids, tokens in zip(prompt_ids, eager, strict=True):
            assert reference.check(ids, tokens, 24) in ("match", "near-tie")
    finally:
        graphed.close()


BF16_NEAR_TIE = 0.5  # fp32 top-2 logit gap under which bf16 rounding may flip the choice


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_bf16_agrees_with_fp32_generate_until_a_late_near_tie(reference, tokenizer, attention: str) -> None:  # noqa: ANN001
    runner = _runner(attention=attention, dtype="bfloat16")
    try:
        prompts = [tokenizer(p).input_ids for p in PROMPTS[:6]]
        firsts = []
        for chunk in (prompts[:3], prompts[3:]):
            got = greedy(runner, chunk, max_new=32)
            for ids, tokens in zip(chunk, got, strict=True):
                want = reference.generate(ids, 32)
                i = next((k for k, (a, b) in enumerate(zip(tokens, want, strict=True)) if a != b), 32)
                firsts.append(i)
                if i < 32:
                    gap = reference.top2_gap(ids + want[:i])
                    assert gap < BF16_NEAR_TIE, f"bf16 diverged at token {i} where fp32 is sure (gap {gap:.3f})"
        assert sorted(firsts)[len(firsts) // 2] >= 8, f"bf16 diverges early: first differences at {firsts}"
    finally:
        runner.close()
