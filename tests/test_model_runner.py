"""The executor's step on a tiny random-weight model (`--load-format dummy`): the paged step's logits
equal a plain full-sequence forward, whichever attention backend, eager or on the padded static
buffers the CUDA-graph path uses."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():  # Triton's kernels run under its interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from executor_svc.config import ExecutorConfig  # noqa: E402
from executor_svc.model_runner import ModelRunner  # noqa: E402
from executor_svc.step_meta import ChunkSpec  # noqa: E402
from svc_common.plan import DecodeBatch, NewRequest, Sampling, ScheduledChunk, StepPlan  # noqa: E402

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 96,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
BLOCK = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("tiny")
    (root / "config.json").write_text(json.dumps(TINY))
    old = os.environ.get("FASTSWITCH_CACHE")
    os.environ["FASTSWITCH_CACHE"] = str(root / "cache")
    yield str(root)
    if old is None:
        os.environ.pop("FASTSWITCH_CACHE")
    else:
        os.environ["FASTSWITCH_CACHE"] = old


def make_runner(model: str, **overrides: object) -> ModelRunner:
    """fp32 (the comparisons are tight), on the GPU where there is one (device auto)."""
    config = ExecutorConfig(
        model=model, load_format="dummy", device_blocks=64, block_size=BLOCK, threads=2, dtype="float32"
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return ModelRunner(config)


@pytest.fixture(scope="module")
def sdpa_runner(tiny_dir: str) -> Iterator[ModelRunner]:
    runner = make_runner(tiny_dir)
    yield runner
    runner.close()


# Three requests: a whole prompt, a prompt in two chunks (the second over a cached prefix), and a
# one-token prompt; then decode steps for all three (teacher-forced tokens).
SEQS = {
    "a": list(range(300, 309)),
    "b": list(range(500, 513)),
    "c": [777],
}
TABLES = {"a": [3, 10, 11, 12, 13, 14], "b": [20, 21, 22, 23, 24, 25, 26], "c": [40, 41, 42]}
DECODED = {"a": [5, 6, 7], "b": [8, 9, 10], "c": [11, 12, 13]}


def scenario_steps() -> list[list[tuple[str, ChunkSpec]]]:
    steps = [
        [
            ("a", ChunkSpec(SEQS["a"], 0, TABLES["a"], True)),
            ("b", ChunkSpec(SEQS["b"][:5], 0, TABLES["b"], False)),
            ("c", ChunkSpec(SEQS["c"], 0, TABLES["c"], True)),
        ],
        [("b", ChunkSpec(SEQS["b"][5:], 5, TABLES["b"], True))],
    ]
    for i in range(3):
        steps.append(
            [(name, ChunkSpec([DECODED[name][i]], len(SEQS[name]) + i, TABLES[name], True)) for name in ("a", "b", "c")]
        )
    return steps


def run_scenario(runner: ModelRunner, decode_via=None) -> dict[str, list[torch.Tensor]]:  # noqa: ANN001
    """Logits of every sampled chunk, per request; `decode_via` runs the decode-only steps."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in SEQS}
    for step in scenario_steps():
        specs = [spec for _, spec in step]
        forward = decode_via if decode_via is not None and all(s.is_decode for s in specs) else runner.forward
        logits = forward(specs)
        sampled = [name for name, spec in step if spec.sample]
        for name, row in zip(sampled, logits, strict=True):
            got[name].append(row.float().clone())
    return got


def reference_logits(runner: ModelRunner) -> dict[str, list[torch.Tensor]]:
    """The same model's own forward over each whole sequence (transformers' SDPA attention)."""
    model = runner.model
    model.set_attn_implementation("sdpa")
    try:
        want = {}
        for name, prompt in SEQS.items():
            ids = prompt + DECODED[name]
            with torch.inference_mode():
                logits = model(torch.tensor([ids], device=runner.device)).logits[0].float()
            want[name] = [logits[len(prompt) - 1 + i] for i in range(len(DECODED[name]) + 1)]
        return want
    finally:
        from executor_svc import paged_attention

        model.set_attn_implementation(paged_attention.ATTN_IMPLEMENTATION)


def assert_same(got: dict[str, list[torch.Tensor]], want: dict[str, list[torch.Tensor]], atol: float) -> None:
    for name in SEQS:
        assert len(got[name]) == len(want[name]), name
        for i, (g, w) in enumerate(zip(got[name], want[name], strict=True)):
            torch.testing.assert_close(g, w, atol=atol, rtol=0, msg=f"request {name}, sampled chunk {i}")


def test_paged_step_logits_equal_a_full_sequence_forward(sdpa_runner: ModelRunner) -> None:
    assert_same(run_scenario(sdpa_runner), reference_logits(sdpa_runner), atol=1e-4)


def test_dummy_weights_are_seeded_so_two_executors_agree(tiny_dir: str, sdpa_runner: ModelRunner) -> None:
    other = make_runner(tiny_dir)
    try:
        mine = sdpa_runner.model.state_dict()
        for (name, a), b in zip(mine.items(), other.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        assert mine["model.layers.0.mlp.up_proj.weight"].std() > 0.01  # random, not zeros
    finally:
        other.close()


def test_padded_static_decode_path_matches_the_eager_step(sdpa_runner: ModelRunner) -> None:
    from executor_svc.cuda_graphs import DecodeGraphs

    graphs = DecodeGraphs(sdpa_runner, capture=False, buckets=(1, 2, 4), table_width=8)
    assert graphs.bucket_for(3) == 4 and graphs.bucket_for(5) is None
    too_long = ChunkSpec([1], 8 * BLOCK, list(range(9)), True)  # needs a 9th block: past the static width
    assert graphs.run([too_long]) is None and graphs.run([ChunkSpec([1, 2], 0, [0], True)]) is None
    assert_same(run_scenario(sdpa_runner, decode_via=graphs.run), run_scenario(sdpa_runner), atol=1e-5)
    # Padded rows wrote only into the scratch block: the real blocks of an idle request are untouched.
    assert sdpa_runner.pool.tensor[50:60].abs().sum() == 0


@pytest.mark.slow
def test_triton_backend_matches_sdpa_eager_and_padded(tiny_dir: str, sdpa_runner: ModelRunner) -> None:
    pytest.importorskip("triton")

    runner = make_runner(tiny_dir, attention="triton")
    try:
        runner._compile_kernels()  # (on a GPU at start-up: every variant, over free blocks of the pool)
        assert_eager_and_padded_match_the_reference(runner, sdpa_runner)
    finally:
        runner.close()


def assert_eager_and_padded_match_the_reference(runner: ModelRunner, sdpa_runner: ModelRunner) -> None:
    """runner's step, eager and on the padded static buffers the CUDA-graph path replays, against the
    model's own full-sequence forward."""
    from executor_svc.cuda_graphs import DecodeGraphs

    want = reference_logits(sdpa_runner)
    assert_same(run_scenario(runner), want, atol=1e-4)
    graphs = DecodeGraphs(runner, capture=False, buckets=(4,), table_width=8)
    assert_same(run_scenario(runner, decode_via=graphs.run), want, atol=1e-4)


def test_pool_has_a_scratch_block_past_the_ones_the_scheduler_owns(sdpa_runner: ModelRunner) -> None:
    pool = sdpa_runner.pool
    assert pool.num_blocks == 64 and pool.scratch_block == 64
    assert pool.tensor.shape[0] == 65
    assert pool.handle.startswith("cuda-ipc:" if sdpa_runner.is_cuda else "shm:")


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_can_be_asked_for(tiny_dir: str) -> None:
    runner = make_runner(tiny_dir, dtype="auto", device="cpu")
    try:
        assert runner.dtype == torch.float32 and runner.pool.tensor.dtype == torch.float32
    finally:
        runner.close()
    runner = make_runner(tiny_dir, dtype="bfloat16")
    try:
        assert runner.pool.tensor.dtype == torch.bfloat16
        assert next(runner.model.parameters()).dtype == torch.bfloat16
        logits = runner.forward([ChunkSpec(SEQS["a"], 0, TABLES["a"], True)])
        assert torch.isfinite(logits.float()).all()
    finally:
        runner.close()


def test_a_config_only_directory_needs_dummy_weights(tiny_dir: str) -> None:
    with pytest.raises(FileNotFoundError, match="--load-format dummy"):
        make_runner(tiny_dir, load_format="auto")


def test_device_blocks_zero_on_cpu_gives_the_fixed_cpu_pool(tiny_dir: str) -> None:
    from executor_svc.config import CPU_DEFAULT_BLOCKS

    runner = make_runner(tiny_dir, device_blocks=0, device="cpu")
    try:
        assert runner.pool.num_blocks == CPU_DEFAULT_BLOCKS
    finally:
        runner.close()


def test_cuda_graphs_are_refused_without_triton_or_without_cuda(tiny_dir: str) -> None:
    with pytest.raises(ValueError, match="--attention triton"):
        ExecutorConfig(cuda_graphs=True).validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            make_runner(tiny_dir, attention="triton", cuda_graphs=True, device="cpu")


def test_cpu_linear_layers_are_packed_and_agree_with_dense_ones(tiny_dir: str, sdpa_runner: ModelRunner) -> None:
    from executor_svc.cpu_linear import PackedLinear, onednn_available

    if not onednn_available():
        pytest.skip("this torch has no oneDNN")
    if sdpa_runner.is_cuda:
        pytest.skip("oneDNN packing is for CPU runners (this machine's runners use its GPU)")
    model = sdpa_runner.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert sdpa_runner.packed_linears == len(packed) == 2 * 7 + 1  # q k v o gate up down per layer, the LM head
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    # The tied LM head still shares the input embedding; the other dense weights are freed.
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.model.layers[0].mlp.up_proj.weight.is_meta
    dense = make_runner(tiny_dir, cpu_linear="dense")
    try:
        assert dense.packed_linears == 0
        assert_same(run_scenario(sdpa_runner), run_scenario(dense), atol=1e-4)
    finally:
        dense.close()


def _greedy_run(
    runner: ModelRunner, prefix: str, first_block: int, packed: bool, previous: bool = False
) -> dict[str, list[int]]:
    """Prefill three prompts, then four greedy decodes each (every sampled token fed back), the decodes
    as chunks or packed in a DecodeBatch; a request gets a new block only when a decode crosses into it.
    With `previous`, the packed decodes after the first are planned ahead: they name no tokens and the
    executor feeds what each slot sampled in the step before."""
    names = list(SEQS)
    rids = {n: prefix + n for n in names}
    free = iter(range(first_block, first_block + 16))
    tables = {n: [next(free) for _ in range(-(-len(SEQS[n]) // BLOCK))] for n in names}
    new = [NewRequest(rids[n], Sampling(), slot=i) for i, n in enumerate(names)]
    prefill = [ScheduledChunk(rids[n], SEQS[n], 0, list(tables[n]), True) for n in names]
    out = runner.step(StepPlan(0, new, prefill))
    tokens = {n: [t] for n, (_, t) in zip(names, out.tokens, strict=True)}
    for step in range(1, 5):
        positions = {n: len(SEQS[n]) + step - 1 for n in names}
        grow = {n: [next(free)] if positions[n] == len(tables[n]) * BLOCK else [] for n in names}
        for n in names:
            tables[n] += grow[n]
        if packed:
            ahead = previous and step > 1
            batch = DecodeBatch(
                slots=[0, 1, 2],
                token_ids=[] if ahead else [tokens[n][-1] for n in names],
                positions=[positions[n] for n in names],
                block_slots=[i for i, n in enumerate(names) for _ in grow[n]],
                block_ids=[b for n in names for b in grow[n]],
                previous_tokens=ahead,
            )
            out = runner.step(StepPlan(step, decodes=batch))
            assert not out.tokens
            sampled = out.decode_tokens
        else:
            chunks = [ScheduledChunk(rids[n], [tokens[n][-1]], positions[n], grow[n], True) for n in names]
            sampled = [t for _, t in runner.step(StepPlan(step, [], chunks)).tokens]
        for n, t in zip(names, sampled, strict=True):
            tokens[n].append(t)
    assert sum(len(t) for t in tables.values()) > sum(-(-len(SEQS[n]) // BLOCK) for n in names)  # some grew
    runner.step(StepPlan(5, released_request_ids=list(rids.values())))
    assert not runner.requests and not runner.slots
    return tokens


def test_packed_decodes_give_the_tokens_of_the_same_decodes_as_chunks(sdpa_runner: ModelRunner) -> None:
    as_chunks = _greedy_run(sdpa_runner, "chunk-", first_block=0, packed=False)
    packed = _greedy_run(sdpa_runner, "packed-", first_block=20, packed=True)
    assert packed == as_chunks and all(len(t) == 5 for t in packed.values())
    ahead = _greedy_run(sdpa_runner, "ahead-", first_block=40, packed=True, previous=True)
    assert ahead == as_chunks


def test_a_step_planned_ahead_for_a_slot_that_never_sampled_is_refused(sdpa_runner: ModelRunner) -> None:
    sdpa_runner.step(StepPlan(0, [NewRequest("fresh", Sampling(), slot=9)]))
    try:
        with pytest.raises(ValueError, match="sampled none"):
            sdpa_runner.step(StepPlan(1, decodes=DecodeBatch([9], [], [0], [9], [60], previous_tokens=True)))
        assert sdpa_runner.slots[9].block_table == [], "a refused plan grants no block"
    finally:
        sdpa_runner.step(StepPlan(2, released_request_ids=["fresh"]))


def test_fused_ops_give_the_logits_of_the_models_own_code(tiny_dir: str, sdpa_runner: ModelRunner) -> None:
    """`--fused-ops on` (merged QKV and gate/up, Triton RMSNorm, rotary, SiLU x up; interpreted here),
    eager and on the padded static buffers the CUDA-graph path replays."""
    pytest.importorskip("triton")

    assert sdpa_runner.fused is False and sdpa_runner.fused_counts == {}
    runner = make_runner(tiny_dir, fused_ops="on")
    try:
        counts = runner.fused_counts
        assert (counts["qkv"], counts["gate_up"], counts["rms_norm"]) == (2, 2, 5), counts
        assert_eager_and_padded_match_the_reference(runner, sdpa_runner)
    finally:
        runner.close()


def test_fused_ops_auto_keeps_fp32_and_cpus_on_the_models_own_code(tiny_dir: str) -> None:
    with pytest.raises(ValueError, match="fused ops must be one of"):
        ExecutorConfig(fused_ops="yes").validate()
    runner = make_runner(tiny_dir, fused_ops="auto", dtype="bfloat16")
    try:
        assert runner.fused is torch.cuda.is_available() and (runner.fused_counts != {}) is runner.fused
    finally:
        runner.close()
