"""Paged attention, plugged into transformers through its AttentionInterface.

The model's own attention modules compute q/k/v and RoPE; this function, registered under
`ATTN_IMPLEMENTATION`, writes the step's new K/V into the KV pool at the slots the scheduler chose and
attends over each request's blocks. Per-step metadata arrives as the `fs_step` keyword that the model
forward passes down to every attention call (see model_runner.py). No model code is copied.

Two backends (`--attention`):
- `sdpa` (default): torch only, runs anywhere. Decodes gather their blocks into a padded tensor and
  run SDPA with a mask; prefill chunks with a cached prefix gather that prefix. Proven token-identical
  to `generate()` on CPU, and the fastest path on CPU (docs/attention-cpu.md).
- `triton`: kernels that read and write the pool in place (triton_attention.py): no gathered copy of
  any KV, one store launch per layer. For NVIDIA GPUs; on a CPU only under `TRITON_INTERPRET=1`
  (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from executor_svc.kv_pool import KVPool
from executor_svc.step_meta import PREFILL_BLOCK_M, StepMeta

ATTN_IMPLEMENTATION = "fastswitch_paged"
BACKENDS = ("sdpa", "triton")


@dataclass(slots=True)
class StepAttention:
    """Everything attention needs for one step, shared by all layers."""

    pool: KVPool
    meta: StepMeta
    backend: str = "sdpa"
    decode_splits: int = 1  # triton: context splits per decode sequence


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    fs_step: StepAttention | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    if fs_step is None:
        raise RuntimeError("paged attention called without step metadata (fs_step)")
    k_cache, v_cache = fs_step.pool.layer(module.layer_idx)
    # query [1, H, T, D]; key/value [1, KVH, T, D] for the packed tokens of this step.
    head_dim = query.shape[-1]
    scale = scaling if scaling is not None else head_dim**-0.5
    if fs_step.backend == "triton":
        out = _triton(fs_step, query, key, value, k_cache, v_cache, scale)
    else:
        out = _sdpa(fs_step.meta, query, key, value, k_cache, v_cache, scale)
    return out.unsqueeze(0), None


def _triton(
    step: StepAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    from executor_svc import triton_attention as kernels

    meta = step.meta
    q = query[0].transpose(0, 1)  # [T, H, D]
    kernels.store_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, meta.slots)
    out = q.new_empty(q.shape)
    if meta.decode is not None:
        d = meta.decode
        kernels.decode_attention(
            q, k_cache, v_cache, d.rows, d.ctx_lens, d.tables, out, scale, splits=step.decode_splits
        )
    if meta.prefill is not None:
        p = meta.prefill
        kernels.prefill_attention(
            q,
            k_cache,
            v_cache,
            p.tile_seg,
            p.tile_m0,
            p.q_starts,
            p.q_lens,
            p.ctx_lens,
            p.tables,
            out,
            scale,
            block_m=PREFILL_BLOCK_M,
        )
    return out


def _sdpa(
    meta: StepMeta,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    q = query[0]  # [H, T, D]
    k_new = key[0].transpose(0, 1)
    v_new = value[0].transpose(0, 1)
    k_cache[meta.slot_blocks, meta.slot_offsets] = k_new
    v_cache[meta.slot_blocks, meta.slot_offsets] = v_new

    num_heads, num_tokens, head_dim = q.shape
    kv_heads = k_new.shape[1]
    block_size = k_cache.shape[1]
    out = q.new_empty(num_tokens, num_heads, head_dim)
    if meta.prefill is not None:
        for i, (q_start, q_len, ctx) in enumerate(meta.prefill.segments):
            qs = q[:, q_start : q_start + q_len]
            if ctx == q_len:  # no cached prefix: plain causal attention over the chunk itself
                ks = key[0, :, q_start : q_start + q_len]
                vs = value[0, :, q_start : q_start + q_len]
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            else:
                blocks = meta.prefill.tables[i, : (ctx + block_size - 1) // block_size]
                ks = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:ctx].transpose(0, 1)
                vs = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:ctx].transpose(0, 1)
                mask = _derived(meta, f"prefill_mask_{i}", lambda c=ctx, n=q_len: _chunk_mask(c, n, q.device))
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
            out[q_start : q_start + q_len] = o.transpose(0, 1)
    if meta.decode is not None:
        d = meta.decode
        qd = q[:, d.rows].transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
        kd = k_cache[d.tables].reshape(d.count, -1, kv_heads, head_dim).transpose(1, 2)
        vd = v_cache[d.tables].reshape(d.count, -1, kv_heads, head_dim).transpose(1, 2)
        width = d.tables.shape[1] * block_size
        mask = _derived(
            meta,
            "decode_mask",
            lambda: (torch.arange(width, device=q.device).unsqueeze(0) < d.ctx_lens.unsqueeze(1))[:, None, None, :],
        )
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        out[d.rows] = o[:, :, 0]
    return out


def _chunk_mask(ctx: int, q_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, ctx] True where a chunk's query (at positions ctx - q_len ..) may attend."""
    q_pos = torch.arange(ctx - q_len, ctx, device=device).unsqueeze(1)
    return torch.arange(ctx, device=device).unsqueeze(0) <= q_pos


def _derived(meta: StepMeta, name: str, build: object) -> torch.Tensor:
    """A tensor built once per step (on the first layer) and reused by the others."""
    cached = meta.derived.get(name)
    if cached is None:
        cached = build()  # type: ignore[operator]
        meta.derived[name] = cached
    return cached  # type: ignore[return-value]


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
