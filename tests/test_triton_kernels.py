"""The Triton paged-attention kernels against SDPA over the same KV, gathered the plain way.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before the kernels
are defined); with one, the same tests run compiled on CUDA, plus bf16 (gpu-marked)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from executor_svc import triton_attention as kernels  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


class PagedKV:
    """A block-major pool (two layers; tests use layer 1) and sequences written through `store_kv`."""

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.pool = torch.zeros(num_blocks, 2, 2, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
        self.k, self.v = self.pool[:, 1, 0], self.pool[:, 1, 1]
        self.free = list(torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist())
        self.tables: list[list[int]] = []

    def add_sequence(self, length: int, gen: torch.Generator) -> int:
        blocks = [self.free.pop() for _ in range((length + self.block_size - 1) // self.block_size)]
        self.tables.append(blocks)
        kv_heads, head_dim = self.k.shape[2:]
        k = torch.randn(length, kv_heads, head_dim, generator=gen).to(DEVICE, self.pool.dtype)
        v = torch.randn(length, kv_heads, head_dim, generator=gen).to(DEVICE, self.pool.dtype)
        pos = torch.arange(length)
        slots = torch.tensor(blocks)[pos // self.block_size] * self.block_size + pos % self.block_size
        kernels.store_kv(k, v, self.k, self.v, slots.to(DEVICE, torch.int32))
        return len(self.tables) - 1

    def gathered(self, seq: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[kv_heads, length, head_dim] K and V of one sequence: the reference's view."""
        idx = torch.tensor(self.tables[seq], device=DEVICE)
        kv_heads, head_dim = self.k.shape[2:]
        k = self.k[idx].reshape(-1, kv_heads, head_dim)[:length].transpose(0, 1)
        v = self.v[idx].reshape(-1, kv_heads, head_dim)[:length].transpose(0, 1)
        return k, v

    def table_tensor(self, seqs: list[int]) -> torch.Tensor:
        width = max(len(self.tables[s]) for s in seqs)
        rows = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def _tol(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2e-2


def test_store_kv_writes_each_token_into_its_slot_of_one_layer_only() -> None:
    kv = PagedKV(num_blocks=8, block_size=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    seq = kv.add_sequence(7, gen)
    k, v = kv.gathered(seq, 7)
    assert k.abs().sum() > 0 and v.abs().sum() > 0
    untouched = kv.pool[:, 0].clone()
    assert untouched.abs().sum() == 0, "store_kv wrote into another layer"
    # Token 5 lives in the sequence's second block at offset 1.
    block = kv.tables[seq][1]
    torch.testing.assert_close(kv.k[block, 1], k[:, 5])
    # Slots past the sequence stay zero.
    assert kv.k[kv.tables[seq][1], 3].abs().sum() == 0


@pytest.mark.parametrize(
    ("block_size", "kv_heads", "group", "head_dim", "splits"),
    [(16, 2, 3, 64, 1), (4, 1, 4, 48, 2), (32, 3, 1, 32, 4), (16, 2, 2, 64, 8)],
)
def test_decode_kernel_matches_sdpa_over_the_gathered_context(
    block_size: int, kv_heads: int, group: int, head_dim: int, splits: int
) -> None:
    dtype = torch.float32
    gen = torch.Generator().manual_seed(block_size + splits)
    lengths = [1, 37, 130, 5]
    num_blocks = sum((n + block_size - 1) // block_size for n in lengths) + 4
    kv = PagedKV(num_blocks=num_blocks, block_size=block_size, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    seqs = [kv.add_sequence(n, gen) for n in lengths]
    heads = kv_heads * group
    # Packed query rows: decode rows sit among other rows (as in a mixed step).
    q = torch.randn(9, heads, head_dim, generator=gen).to(DEVICE, dtype)
    rows = torch.tensor([7, 0, 3, 8], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    kernels.decode_attention(
        q,
        kv.k,
        kv.v,
        rows,
        torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
        kv.table_tensor(seqs),
        out,
        scale,
        splits=splits,
        block_n=16,
    )
    for i, seq in enumerate(seqs):
        k, v = kv.gathered(seq, lengths[i])
        row = int(rows[i])
        want = F.scaled_dot_product_attention(q[row].unsqueeze(1), k, v, scale=scale, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[row], want, atol=_tol(dtype), rtol=_tol(dtype))
    others = [r for r in range(9) if r not in rows.tolist()]
    assert torch.isnan(out[others]).all(), "decode wrote rows it does not own"


@pytest.mark.parametrize(("block_size", "group", "head_dim"), [(16, 3, 64), (8, 1, 48)])
def test_prefill_kernel_matches_causal_sdpa_with_a_cached_prefix(block_size: int, group: int, head_dim: int) -> None:
    dtype = torch.float32
    gen = torch.Generator().manual_seed(block_size)
    kv_heads = 2
    kv = PagedKV(num_blocks=48, block_size=block_size, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    # (context, chunk): a whole prompt, a chunk over a cached prefix, one spanning two query tiles.
    segments = [(20, 20), (50, 13), (150, 70)]
    seqs = [kv.add_sequence(ctx, gen) for ctx, _ in segments]
    heads = kv_heads * group
    total = sum(q for _, q in segments)
    q = torch.randn(total, heads, head_dim, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    starts = [0, 20, 33]
    tiles = [(s, m0) for s, (_, q_len) in enumerate(segments) for m0 in range(0, q_len, 32)]
    scale = head_dim**-0.5

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=DEVICE)

    kernels.prefill_attention(
        q,
        kv.k,
        kv.v,
        ints([t[0] for t in tiles]),
        ints([t[1] for t in tiles]),
        ints(starts),
        ints([n for _, n in segments]),
        ints([c for c, _ in segments]),
        kv.table_tensor(seqs),
        out,
        scale,
        block_m=32,
        block_n=16,
    )
    for i, (ctx, q_len) in enumerate(segments):
        k, v = kv.gathered(seqs[i], ctx)
        mask = torch.arange(ctx, device=DEVICE)[None, :] <= torch.arange(ctx - q_len, ctx, device=DEVICE)[:, None]
        qs = q[starts[i] : starts[i] + q_len].transpose(0, 1)
        want = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(out[starts[i] : starts[i] + q_len], want, atol=_tol(dtype), rtol=_tol(dtype))


def test_decode_splits_fill_the_gpu_without_empty_splits() -> None:
    assert kernels.decode_splits(batch=1, kv_heads=8, max_ctx=1024, num_sms=132, block_n=64) == 16
    assert kernels.decode_splits(batch=32, kv_heads=8, max_ctx=1024, num_sms=132, block_n=64) == 2
    assert kernels.decode_splits(batch=1, kv_heads=8, max_ctx=100, num_sms=132, block_n=64) == 2
    assert kernels.decode_splits(batch=64, kv_heads=8, max_ctx=4096, num_sms=132, block_n=64) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("splits", [1, 4])
def test_bf16_kernels_match_sdpa_on_cuda(splits: int) -> None:
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    kv = PagedKV(num_blocks=600, block_size=16, kv_heads=8, head_dim=128, dtype=dtype)
    lengths = [1024, 700, 33, 1]
    seqs = [kv.add_sequence(n, gen) for n in lengths]
    q = torch.randn(4, 32, 128, generator=gen).to(DEVICE, dtype)
    out = torch.empty_like(q)
    rows = torch.arange(4, dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    kernels.decode_attention(q, kv.k, kv.v, rows, ctx, kv.table_tensor(seqs), out, 128**-0.5, splits=splits)
    for i, seq in enumerate(seqs):
        k, v = kv.gathered(seq, lengths[i])
        want = F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, scale=128**-0.5, enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[i], want, atol=_tol(dtype), rtol=_tol(dtype))
