"""Fused decoder operators for half-precision steps on a GPU (`--fused-ops`).

Measured on an H200 with the Llama-3-8B shape (docs/gpu-data-plane.md): once CUDA graphs take the
launch cost away, a decode step at batch 8 still spends about a third of its GPU time outside the
matrix products, in some 600 small element-wise kernels of 2-3 µs each: RMSNorm as eight kernels
(cast, square, mean, add, rsqrt, multiply, cast, weight), rotary as five per tensor (multiply,
negate, concatenate, multiply, add), SiLU and the gate multiply as two, and seven matrix products per
layer of which the K and V projections are too narrow to stream the weights at full bandwidth.

This module rewrites a loaded `transformers` model of the Llama family in place:

- the Q, K and V projections become one matrix product (`_FusedQKV`; `k_proj` and `v_proj` hand out
  its slices), and the gate and up projections another (`mlp.gate_up`);
- RMSNorm, rotary (Q and K in one launch) and SiLU x up are one Triton kernel each.

Each kernel rounds where the `transformers` code it replaces rounds (to the activations' dtype after
each operation), so its output equals that code's except for the order of a mean's additions; the
merged matrix products may round differently from the separate ones. It is therefore used for
half-precision dtypes on CUDA only (`--fused-ops auto`), and fp32, where the project promises token
identity with `generate()`, keeps the model's own code. On a CPU the kernels run under Triton's
interpreter, which is how tests/test_fused_ops.py checks them against the code they replace.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import nn

# Architectures whose attention calls q_proj, k_proj, v_proj on one input in that order, applies
# `apply_rotary_pos_emb` from its own module, and whose MLP is down(act(gate(x)) * up(x)).
FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")

_scope = threading.local()  # the rotary kernel applies only inside `active()` (the runner's forward)


# -- kernels ----------------------------------------------------------------------------------------


@triton.jit
def _round(x, DT: tl.constexpr):
    """fp32 `x` rounded to DT (to nearest, ties to even), as fp32: where `transformers` rounds. bf16 is
    rounded on the bits, because Triton's CPU interpreter truncates a cast to bf16 (a GPU rounds)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n
    y = _round(x * tl.rsqrt(var + eps), x_ptr.dtype.element_ty)  # HF: .to(input_dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = _round(w * y, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, with the mean in fp32 (LlamaRMSNorm)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, rows.stride(0), out.stride(0), n, eps, BLOCK=triton.next_power_of_2(n)
        )
    return out.view(*x.shape[:-1], n)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inner, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inner + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = _round(gate / (1.0 + tl.exp(-gate)), dt)  # HF: silu, rounded
    tl.store(out_ptr + row * stride_o + cols, _round(act * up, dt).to(dt), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up = [..., gate | up] (halves of the last dimension)."""
    inner = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * inner)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], inner), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inner))
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(inner, block))](
            rows, out, rows.stride(0), out.stride(0), inner, BLOCK=block
        )
    return out.view(*gate_up.shape[:-1], inner)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    ko_ptr,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sqo_b,
    sqo_h,
    sqo_t,
    sko_b,
    sko_h,
    sko_t,
    sc_b,
    sc_t,
    Q_HEADS: tl.constexpr,
    HALF_DIM: tl.constexpr,
    HALF_P: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    d = tl.arange(0, HALF_P)
    mask = d < HALF_DIM
    c = cos_ptr + b * sc_b + t * sc_t
    s = sin_ptr + b * sc_b + t * sc_t
    cos1 = tl.load(c + d, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(c + HALF_DIM + d, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(s + d, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(s + HALF_DIM + d, mask=mask, other=0.0).to(tl.float32)
    if h < Q_HEADS:
        src = q_ptr + b * sq_b + h * sq_h + t * sq_t
        dst = qo_ptr + b * sqo_b + h * sqo_h + t * sqo_t
    else:
        src = k_ptr + b * sk_b + (h - Q_HEADS) * sk_h + t * sk_t
        dst = ko_ptr + b * sko_b + (h - Q_HEADS) * sko_h + t * sko_t
    dt = qo_ptr.dtype.element_ty
    x1 = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF_DIM + d, mask=mask, other=0.0).to(tl.float32)
    # HF: (x * cos) + (rotate_half(x) * sin), each product and the sum rounded to the dtype
    lo = _round(_round(x1 * cos1, dt) + _round(-x2 * sin1, dt), dt)
    hi = _round(_round(x2 * cos2, dt) + _round(x1 * sin2, dt), dt)
    tl.store(dst + d, lo.to(dt), mask=mask)
    tl.store(dst + HALF_DIM + d, hi.to(dt), mask=mask)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, T, D] and k [B, Hk, T, D] with cos/sin [B, T, D], one launch."""
    batch, q_heads, tokens, dim = q.shape
    cos, sin = cos.expand(batch, tokens, dim), sin.expand(batch, tokens, dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # same layout as the inputs
    if tokens:
        _rotary_kernel[(tokens, q_heads + k.shape[1], batch)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), cos.stride(1),
            Q_HEADS=q_heads, HALF_DIM=dim // 2, HALF_P=triton.next_power_of_2(dim // 2),
        )  # fmt: skip
    return q_out, k_out


# -- the model rewrite ----------------------------------------------------------------------------


class active:
    """Inside this block (a forward of a fused model) the patched `apply_rotary_pos_emb` runs the
    kernel; outside it, e.g. for a reference model in the same process, the original runs."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.before = getattr(_scope, "on", False)
        _scope.on = self.on

    def __exit__(self, *exc: object) -> None:
        _scope.on = self.before


def _merged_linear(parts: list[nn.Linear]) -> nn.Linear:
    first = parts[0]
    bias = first.bias is not None
    merged = nn.Linear(
        first.in_features, sum(p.out_features for p in parts), bias=bias, device=first.weight.device,
        dtype=first.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        merged.weight.copy_(torch.cat([p.weight for p in parts]))
        if bias:
            merged.bias.copy_(torch.cat([p.bias for p in parts]))
    return merged


class _FusedQKV(nn.Module):
    """Stands as q_proj: one product for Q, K and V; keeps K and V for k_proj and v_proj."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
        super().__init__()
        self.qkv = _merged_linear([q, k, v])
        self.sizes = [q.out_features, k.out_features, v.out_features]
        self.kept: tuple[torch.Tensor, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        self.kept = (x, k, v)
        return q

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.kept is None or self.kept[0] is not x:
            raise RuntimeError("fused QKV: k_proj/v_proj called without q_proj on the same input first")
        out = self.kept[index]
        if index == 2:
            self.kept = None
        return out


class _Slice(nn.Module):
    """Stands as k_proj (index 1) or v_proj (index 2) of a fused attention."""

    def __init__(self, fused: _FusedQKV, index: int) -> None:
        super().__init__()
        self.fused = [fused]  # a list: not a second registration of the same submodule
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].take(x, self.index)


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_up(x)))


def _fused_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, self.weight, self.variance_epsilon)


def _rotary_entry(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        unsqueeze = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
        if getattr(_scope, "on", False) and unsqueeze == 1 and q.dim() == 4 and cos.dim() == 3:
            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.fs_original = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _family(module: nn.Module, suffix: str) -> bool:
    return type(module).__name__ in {f"{f}{suffix}" for f in FAMILIES}


def fuse_model(model: nn.Module) -> dict[str, int]:
    """Rewrite `model` in place (see the module's docstring); returns what was fused, by kind."""
    counts = {"qkv": 0, "gate_up": 0, "rms_norm": 0, "rotary_modules": 0}
    for module in list(model.modules()):
        if _family(module, "Attention") and all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj")):
            fused = _FusedQKV(module.q_proj, module.k_proj, module.v_proj)
            module.q_proj, module.k_proj, module.v_proj = fused, _Slice(fused, 1), _Slice(fused, 2)
            counts["qkv"] += 1
            home = sys.modules[type(module).__module__]
            current = getattr(home, "apply_rotary_pos_emb", None)
            if current is not None and not hasattr(current, "fs_original"):
                home.apply_rotary_pos_emb = _rotary_entry(current)
                counts["rotary_modules"] += 1
        elif _family(module, "MLP") and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            module.gate_up = _merged_linear([module.gate_proj, module.up_proj])
            del module.gate_proj, module.up_proj
            module.forward = types.MethodType(_fused_mlp_forward, module)
            counts["gate_up"] += 1
        elif _family(module, "RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_norm_forward, module)
            counts["rms_norm"] += 1
    return counts
