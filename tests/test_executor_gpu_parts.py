"""What the GPU data plane needs that a CPU can check: shipped architectures and the bundled tokenizer,
pool sizing from free memory, the CUDA IPC handle with its offset, seeded sampling on the logits'
device. The gpu-marked tests run the CUDA side where a GPU is visible."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from executor_svc.kv_pool import encode_ipc_handle
from executor_svc.loader import blocks_for_memory, resolve_dtype
from executor_svc.sampler import sample
from svc_common import model_source
from svc_common.plan import Sampling
from swap_daemon.pools import parse_cuda_ipc_payload, parse_pool_handle

CUDA = torch.cuda.is_available()


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("FASTSWITCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _params_on_meta(model_dir: pathlib.Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "layers", "billions"),
    [("llama3-8b", 32, 7.38), ("qwen2.5-32b", 64, 31.71)],
)
def test_shipped_architectures_resolve_with_the_bundled_tokenizer(
    cache: pathlib.Path, name: str, layers: int, billions: float
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    resolved = model_source.resolve_model(name)
    assert resolved.is_relative_to(cache)
    tok = AutoTokenizer.from_pretrained(resolved)  # what the scheduler does with --model
    assert len(tok) == model_source.BUNDLED_VOCAB and tok.eos_token_id == 2
    assert tok.decode(tok("The capital of France is").input_ids) == "The capital of France is"
    config = AutoConfig.from_pretrained(resolved)
    assert config.num_hidden_layers == layers and config.num_key_value_heads == 8
    assert abs(_params_on_meta(resolved) / 1e9 - billions) < 0.05
    assert not model_source.has_weights(resolved)
    assert model_source.resolve_model(name) == resolved  # cached: the same directory again


def test_a_config_whose_vocabulary_the_bundled_tokenizer_cannot_cover_is_refused(
    cache: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        model_source.resolve_model(str(tmp_path / "m"))


def test_an_unknown_model_name_lists_the_shipped_ones(cache: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="llama3-8b"):
        model_source.resolve_model("no-such-model")


def test_pool_blocks_come_from_the_memory_left_under_the_utilization_cap() -> None:
    gib = 2**30
    # 80 GiB card, 20 GiB in use (weights, context), 2 GiB of activations, 90%: 50 GiB of 2 MiB blocks.
    assert blocks_for_memory(80 * gib, 60 * gib, 2 * gib, 0.9, 2 * 2**20) == 50 * 512
    assert blocks_for_memory(80 * gib, 10 * gib, 2 * gib, 0.9, 2 * 2**20) == 0  # over the cap already


def test_dtype_auto_means_float32_on_cpu_and_bfloat16_on_cuda() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_ipc_handle_carries_unsigned_bytes_and_the_offset_the_daemon_adds() -> None:
    signed = [-1, 0, 127, -128] + [5] * 60  # cuda-python hands the handle out as signed chars
    handle = encode_ipc_handle(signed, 4096)
    kind, payload = parse_pool_handle(handle)
    raw, offset = parse_cuda_ipc_payload(payload)
    assert kind == "cuda-ipc" and offset == 4096
    assert raw[:4] == bytes([255, 0, 127, 128]) and len(raw) == 64


def _probs(device: torch.device) -> torch.Tensor:
    return torch.log_softmax(torch.linspace(0, 3, 50, device=device), dim=0).repeat(3, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_seeded_sampling_reproduces_on_the_logits_device(device: str) -> None:
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA GPU")
    logits = _probs(torch.device(device))
    params = [Sampling(temperature=1.0, seed=7), Sampling(temperature=1.0, seed=7), Sampling(temperature=1.0, seed=8)]
    runs = [sample(logits, params, [10, 10, 10]) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] == runs[0][1]  # same seed, same position: same token, whatever the row
    draws = {tuple(sample(logits, [Sampling(temperature=1.0, seed=s)], [3])) for s in range(20)}
    assert len(draws) > 3  # different seeds draw differently


# -- CUDA only ------------------------------------------------------------------------------------

_POOL_EXPORTER = textwrap.dedent(
    """
    import sys, torch
    from executor_svc.kv_pool import KVPool, cuda_ipc_handle
    pool = KVPool(8, 2, 16, 2, 64, torch.float32, torch.device("cuda"))
    flat = pool.tensor.view(torch.uint8).view(9, -1)
    for b in range(9):
        flat[b] = b + 1
    # A torch tensor inside a larger allocation: the handle must carry its offset.
    big = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    inner = big[4096:]
    inner[: pool.block_bytes] = 200
    torch.cuda.synchronize()
    print(pool.handle, cuda_ipc_handle(inner), pool.block_bytes, flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_swap_daemon_reads_the_executor_pool_at_its_offset_through_cuda_ipc() -> None:
    pytest.importorskip("cuda")
    from swap_daemon.copier import AttachSpec, BlockRun, CudaCopyEngine, Direction, Granularity

    root = pathlib.Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", _POOL_EXPORTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))},
    )
    try:
        assert child.stdout is not None
        pool_handle, inner_handle, block = child.stdout.readline().split()
        block_bytes = int(block)
        assert pool_handle.endswith(":0"), "the pool is its own allocation"
        assert inner_handle.endswith(":4096")
        for handle, want in ((pool_handle, [1, 2, 3, 4]), (inner_handle, [200])):
            eng = CudaCopyEngine(num_host_blocks=4, workers=1)
            try:
                blocks = len(want)
                eng.attach(AttachSpec(handle, blocks, block_bytes, 2), owner="t")
                eng.swap(Direction.OUT, [BlockRun(0, 0, blocks)], Granularity.RUN)
                got = [int(eng.host_view[i].min()) for i in range(blocks)] + [
                    int(eng.host_view[i].max()) for i in range(blocks)
                ]
                assert got == want + want
                eng.detach("t")
            finally:
                eng.close()
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=60)
