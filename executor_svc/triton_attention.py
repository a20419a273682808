"""Triton kernels that read and write the block-major KV pool in place (the `--attention triton` backend).

The pool is [blocks, layers, 2, block_size, kv_heads, head_dim]; one layer's K (or V) is the strided
view [blocks, block_size, kv_heads, head_dim], whose block stride spans all layers. The kernels take
that view's base pointer and strides and follow each sequence's block table token by token, so no
padded copy of a request's KV is ever made:

- `store_kv`: the step's new K and V rows into their slots (slot = block * block_size + offset), one
  launch per layer for K and V together.
- `decode_attention`: one query row per sequence, split along the context (flash-decoding) so that a
  small batch still fills the GPU: grid (sequences, kv heads, splits); all query heads of a GQA group
  share one read of the group's KV. With more than one split, a second kernel merges the partial
  softmaxes.
- `prefill_attention`: chunked prefill over a cached prefix, causal, flash-attention style: grid
  (query tiles, query heads); a tile's keys come from the pool (the chunk's own K/V were stored first).

Written for NVIDIA GPUs; on a CPU they run under Triton's interpreter (`TRITON_INTERPRET=1`), which is
how the test suite checks them against SDPA on machines without a GPU. fp32 inputs use IEEE fp32
products (no TF32), so fp32 stays token-identical to `generate()`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(1, n)))


def _ieee(dtype: torch.dtype) -> bool:
    """fp32 products in full IEEE precision (Triton's default for fp32 is TF32)."""
    return dtype == torch.float32


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# -- store the step's new K/V --------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache,
    v_cache,
    slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_P: tl.constexpr,
    DIM_P: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots + t).to(tl.int64)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_P)
    d = tl.arange(0, DIM_P)
    mask = (h[:, None] < KV_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = block * stride_cb + offset * stride_ct + h[:, None] * stride_ch + d[None, :]
    tl.store(k_cache + dst, k, mask=mask)
    tl.store(v_cache + dst, v, mask=mask)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """key/value [T, kv_heads, head_dim]; k_cache/v_cache [blocks, block_size, kv_heads, head_dim] views."""
    num_tokens, kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
    _check_cache(k_cache, v_cache)
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slots,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        KV_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        HEADS_P=_pow2(kv_heads),
        DIM_P=_pow2(head_dim),
    )


# -- decode: one query row per sequence ------------------------------------------------------------


# The block tables' row stride is their width, which changes from step to step: left unspecialised, or
# Triton would compile a variant for a width of 1, a multiple of 16 and the rest (0.1-0.3 s each, seen
# inside a measured batch on an H200). The executor compiles the remaining variants at start-up
# (ModelRunner._compile_kernels).
@triton.jit(do_not_specialize=["stride_tab"])
def _decode_kernel(
    q_ptr,
    k_cache,
    v_cache,
    rows,
    ctx_lens,
    tables,
    out_ptr,
    part_acc,
    part_m,
    part_l,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_tab,
    stride_cb,
    stride_ct,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(rows + seq).to(tl.int64)
    ctx = tl.load(ctx_lens + seq)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, DIM_P)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    # This split's share of the context, in whole BLOCK_N tiles.
    per_split = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    stop = tl.minimum(start + per_split, ctx)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
    table = tables + seq.to(tl.int64) * stride_tab
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < stop
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = block * stride_cb + (n % BLOCK_SIZE) * stride_ct + kvh * stride_ch
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        part = (seq * NUM_HEADS + heads) * SPLITS + split  # [GROUP_P]
        tl.store(part_m + part, m_i, mask=g_mask)
        tl.store(part_l + part, l_i, mask=g_mask)
        tl.store(part_acc + part[:, None] * DIM_P + d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _merge_splits_kernel(
    rows,
    out_ptr,
    part_acc,
    part_m,
    part_l,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    DIM_P: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(rows + seq).to(tl.int64)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, DIM_P)
    base = (seq * NUM_HEADS + h) * SPLITS
    m = tl.load(part_m + base + s)
    lsum = tl.load(part_l + base + s)
    acc = tl.load(part_acc + (base + s)[:, None] * DIM_P + d[None, :])
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


MAX_SPLITS = 16


def decode_splits(batch: int, kv_heads: int, max_ctx: int, num_sms: int, block_n: int) -> int:
    """Context splits per sequence: enough programs to fill the GPU twice over, none with no work."""
    want = triton.cdiv(2 * num_sms, max(1, batch * kv_heads))
    useful = triton.cdiv(max(1, max_ctx), block_n)
    return min(MAX_SPLITS, _pow2(min(want, useful)))


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    ctx_lens: torch.Tensor,
    tables: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    splits: int = 1,
    block_n: int = 64,
) -> None:
    """Writes out[rows[i]] = attention of query[rows[i]] over sequence i's first ctx_lens[i] tokens.

    query/out [T, heads, head_dim]; tables [batch, width] block ids (rows padded past the context are
    never read). `splits` must be a power of two (`decode_splits`); fixed per batch size, so the launch
    can be captured in a CUDA graph.
    """
    batch = rows.shape[0]
    if batch == 0:
        return
    _, num_heads, head_dim = query.shape
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    dim_p = _pow2(head_dim, 16)
    query = _last_dim_contiguous(query)
    _check_cache(k_cache, v_cache)
    if splits > 1:
        part_acc = torch.empty(batch * num_heads * splits * dim_p, dtype=torch.float32, device=query.device)
        part_m = torch.empty(batch * num_heads * splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    _decode_kernel[(batch, kv_heads, splits)](
        query,
        k_cache,
        v_cache,
        rows,
        ctx_lens,
        tables,
        out,
        part_acc,
        part_m,
        part_l,
        scale,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        DIM_P=dim_p,
        GROUP=group,
        GROUP_P=_pow2(group, 16),
        NUM_HEADS=num_heads,
        SPLITS=splits,
        BLOCK_N=block_n,
        IEEE=_ieee(query.dtype),
    )
    if splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            rows,
            out,
            part_acc,
            part_m,
            part_l,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            DIM_P=dim_p,
            NUM_HEADS=num_heads,
            SPLITS=splits,
        )


# -- prefill: chunks over a cached prefix ---------------------------------------------------------


@triton.jit(do_not_specialize=["stride_tab"])
def _prefill_kernel(
    q_ptr,
    k_cache,
    v_cache,
    tile_seg,
    tile_m0,
    q_starts,
    q_lens,
    ctx_lens,
    tables,
    out_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_tab,
    stride_cb,
    stride_ct,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    seg = tl.load(tile_seg + tile)
    m0 = tl.load(tile_m0 + tile)
    q_start = tl.load(q_starts + seg).to(tl.int64)
    q_len = tl.load(q_lens + seg)
    ctx = tl.load(ctx_lens + seg)
    m = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DIM_P)
    m_mask = m < q_len
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    pos = ctx - q_len + m  # absolute position of each query row
    last = tl.minimum(ctx - q_len + m0 + BLOCK_M, ctx)  # keys this tile can see: [0, last)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P], tl.float32)
    table = tables + seg.to(tl.int64) * stride_tab
    for n0 in range(0, last, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < last
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = block * stride_cb + (n % BLOCK_SIZE) * stride_ct + kvh * stride_ch
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * scale
        s = tl.where(n_mask[None, :] & (n[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tile_seg: torch.Tensor,
    tile_m0: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    ctx_lens: torch.Tensor,
    tables: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    block_m: int,
    block_n: int = 64,
) -> None:
    """Causal attention of each segment's query rows over its whole context (cached prefix + chunk).

    Segment i: rows q_starts[i] .. + q_lens[i] of query/out, at positions ctx_lens[i] - q_lens[i] ..;
    tiles (tile_seg, tile_m0) of `block_m` rows cover every segment (`prefill_tiles`)."""
    num_tiles = tile_seg.shape[0]
    if num_tiles == 0:
        return
    _, num_heads, head_dim = query.shape
    kv_heads = k_cache.shape[2]
    query = _last_dim_contiguous(query)
    _check_cache(k_cache, v_cache)
    _prefill_kernel[(num_tiles, num_heads)](
        query,
        k_cache,
        v_cache,
        tile_seg,
        tile_m0,
        q_starts,
        q_lens,
        ctx_lens,
        tables,
        out,
        scale,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        DIM_P=_pow2(head_dim, 16),
        GROUP=num_heads // kv_heads,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=_ieee(query.dtype),
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(f"K/V cache views must share strides with a contiguous last dim, got {k_cache.stride()}")
