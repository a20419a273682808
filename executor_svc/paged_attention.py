"""Paged attention, plugged into transformers through its AttentionInterface.

The model's own attention modules compute q/k/v and RoPE; this function, registered under
`ATTN_IMPLEMENTATION`, writes the step's new K/V into the KV pool at the slots the scheduler chose and
attends over each request's blocks. Per-step metadata arrives as the `fs_step` keyword that the model
forward passes down to every attention call (see model_runner.py). No model code is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from executor_svc.kv_pool import KVPool

ATTN_IMPLEMENTATION = "fastswitch_paged"


@dataclass(slots=True)
class PrefillSegment:
    """A prefill chunk: `q_len` packed query rows from `q_start`, attending to `ctx_len` cached tokens."""

    q_start: int
    q_len: int
    start_position: int
    ctx_len: int
    block_ids: torch.Tensor  # [blocks covering ctx_len]
    mask: torch.Tensor | None  # [q_len, ctx_len] bool (None when start_position == 0: plain causal)


@dataclass(slots=True)
class StepAttention:
    """Everything attention needs for one step, built once and shared by all layers."""

    pool: KVPool
    write_blocks: torch.Tensor  # [T] block id of each packed token
    write_offsets: torch.Tensor  # [T] offset inside that block
    prefills: list[PrefillSegment]
    decode_rows: torch.Tensor | None  # [Bd] packed rows of single-token decodes
    decode_tables: torch.Tensor | None  # [Bd, max_blocks] padded block tables
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, max_blocks*block_size] bool, True = attend


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
    step = fs_step
    k_cache, v_cache = step.pool.layer(module.layer_idx)
    # query [1, H, T, D]; key/value [1, KVH, T, D] for the packed tokens of this step.
    q = query[0]
    k_new = key[0].transpose(0, 1)
    v_new = value[0].transpose(0, 1)
    k_cache[step.write_blocks, step.write_offsets] = k_new
    v_cache[step.write_blocks, step.write_offsets] = v_new

    num_heads, num_tokens, head_dim = q.shape
    kv_heads = k_new.shape[1]
    out = q.new_empty(num_tokens, num_heads, head_dim)
    for seg in step.prefills:
        qs = q[:, seg.q_start : seg.q_start + seg.q_len]
        if seg.mask is None:
            ks = key[0, :, seg.q_start : seg.q_start + seg.q_len]
            vs = value[0, :, seg.q_start : seg.q_start + seg.q_len]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            ks = k_cache[seg.block_ids].reshape(-1, kv_heads, head_dim)[: seg.ctx_len].transpose(0, 1)
            vs = v_cache[seg.block_ids].reshape(-1, kv_heads, head_dim)[: seg.ctx_len].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask, scale=scaling, enable_gqa=True)
        out[seg.q_start : seg.q_start + seg.q_len] = o.transpose(0, 1)
    if step.decode_rows is not None:
        assert step.decode_tables is not None
        batch = step.decode_rows.shape[0]
        qd = q[:, step.decode_rows].transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
        kd = k_cache[step.decode_tables].reshape(batch, -1, kv_heads, head_dim).transpose(1, 2)
        vd = v_cache[step.decode_tables].reshape(batch, -1, kv_heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=step.decode_mask, scale=scaling, enable_gqa=True)
        out[step.decode_rows] = o[:, :, 0]
    return out.unsqueeze(0), None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
