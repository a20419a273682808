"""The bench's modes: which exist and in what order, what each stack mode switches, and the model knobs
(`--model`, `--dtype`, `--load-format`, `--executors`) reaching the stack and the transformers peer."""

from __future__ import annotations

import pathlib

import pytest
import torch

from executor_svc.config import ExecutorConfig
from fastswitch_bench.modes import ALL_MODES, ModelOptions, parse_modes, stack_config
from fastswitch_bench.presets import PRESETS
from fastswitch_bench.workload import generate
from svc_common.settings import field_names

SMALL = PRESETS["small"]


def test_no_modes_means_all_of_them_with_the_peer_last() -> None:
    assert parse_modes(None) == list(ALL_MODES)
    assert ALL_MODES == ("fastswitch", "no-groups", "no-async", "no-reuse", "vllm-like", "recompute", "transformers-cb")
    assert parse_modes("transformers-cb,vllm-like, fastswitch") == ["fastswitch", "vllm-like", "transformers-cb"]
    with pytest.raises(ValueError, match="unknown modes.*fastswitch"):
        parse_modes("fastswitch,warp-speed")


def test_each_stack_mode_switches_exactly_its_own_mechanism() -> None:
    workload = generate(SMALL.workload)

    def flags(mode: str) -> tuple:
        c = stack_config(mode, SMALL, workload).scheduler
        return c.preemption, c.block_groups, c.async_swaps, c.kv_reuse

    assert flags("fastswitch") == ("swap", True, True, True)
    assert flags("no-groups") == ("swap", False, True, True)
    assert flags("no-async") == ("swap", True, False, True)
    assert flags("no-reuse") == ("swap", True, True, False)
    assert flags("vllm-like")[0] == "vllm-like"
    assert flags("recompute")[0] == "recompute"
    c = stack_config("fastswitch", SMALL, workload)
    assert (c.scheduler.policy, c.scheduler.priority_updates, c.scheduler.priority_update_prob) == (
        "priority",
        SMALL.workload.priority_updates,
        SMALL.workload.priority_update_prob,
    )
    assert c.executor.device_blocks == SMALL.device_blocks


def test_model_and_executors_reach_every_service_of_the_stack_only_when_given() -> None:
    workload = generate(SMALL.workload)
    given = stack_config("vllm-like", SMALL, workload, ModelOptions(model="/models/llama", executors=1))
    assert (given.scheduler.model, given.executor.model, given.executors) == ("/models/llama", "/models/llama", 1)
    assert given.scheduler.preemption == "vllm-like"  # the knobs add to the mode's own settings
    default = stack_config("fastswitch", SMALL, workload, ModelOptions())
    assert default.executor.model == ExecutorConfig().model  # not given: the stack's own default
    assert ModelOptions(dtype="float32").stack_settings() == {"dtype": "float32"}


def test_dtype_and_load_format_reach_the_executor_or_are_refused_before_any_stack_starts() -> None:
    workload = generate(SMALL.workload)
    options = ModelOptions(dtype="float16", load_format="dummy")
    if {"dtype", "load_format"} <= field_names(ExecutorConfig):
        c = stack_config("fastswitch", SMALL, workload, options)
        assert (c.executor.dtype, c.executor.load_format) == ("float16", "dummy")
    else:  # a stack from before the executor had these settings
        with pytest.raises(ValueError, match="dtype.*cannot take that bench option"):
            stack_config("fastswitch", SMALL, workload, options)


def test_any_stack_setting_passes_through_typed_and_a_bad_one_is_refused_up_front() -> None:
    from svc_common.stack import StackConfig

    settings = tuple(
        StackConfig.parse_setting(item) for item in ("attention=triton", "--cuda-graphs=on", "max_running=7")
    )
    assert settings == (("attention", "triton"), ("cuda_graphs", True), ("max_running", 7))
    c = stack_config("fastswitch", SMALL, generate(SMALL.workload), ModelOptions(settings=settings[:1]))
    assert c.executor.attention == "triton"
    assert ModelOptions(dtype="float32", settings=settings[1:2]).stack_settings() == {
        "dtype": "float32",
        "cuda_graphs": True,
    }
    for bad, message in (
        ("attention=flash", "expected one of sdpa, triton"),
        ("max_running=many", "expected an int"),
        ("no_such_knob=1", "no such setting"),
        ("attention", "expected NAME=VALUE"),
    ):
        with pytest.raises(ValueError, match=message):
            StackConfig.parse_setting(bad)


def test_the_gpu_preset_host_pool_fits_the_lent_machine_with_8b_blocks() -> None:
    gib = PRESETS["gpu"].host_blocks * 2 * 1024**2 / 1024**3  # 2 MiB blocks of the llama3-8b shape
    assert 32 <= gib <= 64


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory) -> str:
    """A model directory with only a config.json (a tiny Llama over SmolLM2's vocabulary), for dummy weights."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ).save_pretrained(path)
    return str(path)


def test_the_peer_builds_seeded_dummy_weights_from_config_json_in_the_asked_dtype(config_only_model) -> None:
    from fastswitch_bench.peer import load_model

    a = load_model(config_only_model, dtype="bfloat16", load_format="dummy")
    b = load_model(config_only_model, dtype="bfloat16", load_format="dummy")
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))  # same every run
    assert next(load_model(config_only_model, load_format="dummy").parameters()).dtype == torch.float32  # CPU auto
    with pytest.raises(OSError):
        load_model(config_only_model)  # without dummy, it reads weights, and this directory has none


@pytest.mark.model  # the default model's tokenizer (a config-only directory borrows it)
def test_the_peer_mode_loads_the_model_with_the_given_knobs(config_only_model, monkeypatch) -> None:
    from fastswitch_bench import peer
    from fastswitch_bench.modes import run_peer_mode
    from fastswitch_bench.runner import load_tokenizer

    loaded = []
    real_load = peer.load_model

    def spy(model_dir, **knobs):  # noqa: ANN001, ANN003, ANN202
        model = real_load(model_dir, **knobs)
        loaded.append((model_dir, knobs, next(model.parameters()).dtype))
        return model

    monkeypatch.setattr(peer, "load_model", spy)
    tokenizer, _ = load_tokenizer(pathlib.Path(config_only_model))
    workload = generate(PRESETS["tiny"].workload)
    options = ModelOptions(model=config_only_model, dtype="bfloat16", load_format="dummy")
    run = run_peer_mode(config_only_model, tokenizer, PRESETS["tiny"], workload, False, options)
    assert loaded == [(config_only_model, {"dtype": "bfloat16", "load_format": "dummy"}, torch.bfloat16)]
    assert sum(r.tokens for r in run.records) == workload.summary()["total_output_tokens"]
    assert "dtype=bfloat16" in run.notes and "load_format=dummy" in run.notes
