"""The fused decoder operators (`--fused-ops`) against the `transformers` code they replace.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); with one, the same tests run compiled on CUDA."""

from __future__ import annotations

import copy
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from executor_svc import fused_ops  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.bfloat16, torch.float32]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same_up_to_rounding(out: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16: equal but for a few elements one rounding step apart (a mean's order of additions, exp's
    last bit); fp32 (not used by `--fused-ops auto`): close."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.dtype == torch.bfloat16:
        same = (out == ref).float().mean().item()
        assert same >= 0.97, f"only {same:.3%} of the elements are equal"
    tol = 1e-2 if ref.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_llama_rms_norm(dtype: torch.dtype) -> None:
    norm = modeling_llama.LlamaRMSNorm(96, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=_gen(1)))
    x = (3 * torch.randn(2, 7, 96, generator=_gen(2))).to(DEVICE, dtype)
    with torch.no_grad():
        _assert_same_up_to_rounding(fused_ops.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_act_of_gate_times_up(dtype: torch.dtype) -> None:
    gate_up = (4 * torch.randn(5, 2 * 80, generator=_gen(3))).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    _assert_same_up_to_rounding(fused_ops.silu_mul(gate_up), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_of_q_and_k_in_one_launch_is_apply_rotary_pos_emb(dtype: torch.dtype) -> None:
    """Same layouts as the attention's (a [B, T, H, D] projection viewed as [B, H, T, D]); each product
    and sum rounds where HF's does, so bf16 is bit for bit the same."""
    tokens, dim = 6, 32
    q = torch.randn(1, tokens, 4, dim, generator=_gen(4)).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(1, tokens, 2, dim, generator=_gen(5)).to(DEVICE, dtype).transpose(1, 2)
    angles = torch.rand(1, tokens, dim // 2, generator=_gen(6)) * 6
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    q_out, k_out = fused_ops.rotary(q, k, cos, sin)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
    if dtype == torch.bfloat16:
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    else:
        torch.testing.assert_close(q_out, q_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)


TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@pytest.mark.parametrize(
    ("model_class", "config"),
    [(LlamaForCausalLM, LlamaConfig(**TINY)), (Qwen2ForCausalLM, Qwen2Config(**TINY))],  # Qwen2: QKV biases
    ids=["llama", "qwen2"],
)
def test_a_fused_model_gives_the_logits_of_the_model_it_was_made_from(model_class, config) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    reference = model_class(config).to(DEVICE, torch.float32).eval()
    fused = copy.deepcopy(reference)
    counts = fused_ops.fuse_model(fused)
    layers = config.num_hidden_layers
    assert counts["qkv"] == counts["gate_up"] == layers and counts["rms_norm"] == 2 * layers + 1
    assert not any(hasattr(layer.mlp, "gate_proj") for layer in fused.model.layers), "the separate weights are gone"
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=_gen(7)).to(DEVICE)
    with torch.no_grad():
        ref = reference(input_ids=ids).logits
        with fused_ops.active():
            out = fused(input_ids=ids).logits
        outside = fused(input_ids=ids).logits  # outside the scope: the model's own rotary
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outside, ref, rtol=1e-4, atol=1e-4)


def test_projections_called_out_of_order_fail_loudly() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).to(DEVICE).eval()
    fused_ops.fuse_model(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 3, TINY["hidden_size"], device=DEVICE)
    with pytest.raises(RuntimeError, match="without q_proj"):
        attn.k_proj(x)
    attn.q_proj(x)
    with pytest.raises(RuntimeError, match="without q_proj"):
        attn.v_proj(torch.randn_like(x))  # another input than the one q_proj saw
