"""A whole stack on a config-only model directory (`--load-format dummy`): the scheduler tokenises
with the bundled tokenizer the directory borrows, the executor builds random weights from config.json."""

from __future__ import annotations

import json
import pathlib

import pytest

from fastswitch.client import Client
from tests.conftest import running_stack

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.mark.slow
def test_a_stack_serves_a_config_only_model_with_dummy_weights(tmp_path: pathlib.Path) -> None:
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    settings = dict(model=str(model), load_format="dummy", device_blocks=32, host_blocks=0, dtype="auto")
    with running_stack(**settings, extra_env={"FASTSWITCH_CACHE": str(tmp_path / "cache")}) as stack:
        with Client(stack.addr) as client:
            done = client.complete("The capital of France is", max_tokens=5, ignore_eos=True)
            stats = client.stats()
    assert done.finish_reason == "length" and len(done.token_ids) == 5
    assert done.prompt_tokens == 5  # the bundled SmolLM2 tokenizer's count for this prompt
    assert stats["device_blocks_free"] == 32
