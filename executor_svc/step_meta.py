"""One step's metadata, prepared on the host as one packed int32 array and copied to the device once.

Everything the forward pass needs besides the weights and the KV pool: token ids, positions, the slot
each new K/V row goes to, the rows to sample, and per sequence its context length and block table.
Sequences of one new token (decodes) and longer chunks (prefills) are described separately, because
attention treats them differently.

The eager step copies the array into a fresh device tensor; a CUDA-graph step copies it into the
static buffer its graph was captured on (`pad_decodes_to`/`table_width` give that buffer's fixed
layout: padded rows write their K/V into a scratch slot and attend to it alone). Both read the same
views, so both run the same attention code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

PREFILL_BLOCK_M = 64  # query rows per prefill tile of the Triton kernel
# Each field starts at a multiple of 4 int32s: a kernel's pointer arguments are then always 16-byte
# aligned. Triton compiles one variant per alignment it sees (0.1-0.3 s each); with fields packed end
# to end, the views' alignment changed with every step's sizes, and steps compiled new variants
# while serving.
ALIGN = 4


@dataclass(slots=True, frozen=True)
class ChunkSpec:
    """What the metadata needs of one scheduled chunk."""

    token_ids: Sequence[int]
    start_position: int
    block_table: Sequence[int]
    sample: bool

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1


@dataclass(slots=True)
class DecodeBatch:
    """Single-token sequences: query row, context length (new token included), block table."""

    count: int
    max_ctx: int
    rows: torch.Tensor  # [count]
    ctx_lens: torch.Tensor  # [count]
    tables: torch.Tensor  # [count, width]


@dataclass(slots=True)
class PrefillBatch:
    """Chunks of several tokens, each attending causally to its cached prefix and itself."""

    segments: list[tuple[int, int, int]]  # host copy: (q_start, q_len, ctx_len)
    q_starts: torch.Tensor  # [S]
    q_lens: torch.Tensor  # [S]
    ctx_lens: torch.Tensor  # [S]
    tables: torch.Tensor  # [S, width]
    tile_seg: torch.Tensor  # [tiles] segment of each PREFILL_BLOCK_M-row tile
    tile_m0: torch.Tensor  # [tiles] first row of the tile inside its segment


@dataclass(slots=True)
class StepMeta:
    num_tokens: int
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    slots: torch.Tensor  # [T] block * block_size + offset
    slot_blocks: torch.Tensor  # [T]
    slot_offsets: torch.Tensor  # [T]
    sample_rows: torch.Tensor  # [R]
    decode: DecodeBatch | None
    prefill: PrefillBatch | None
    derived: dict[str, object] = field(default_factory=dict)  # per-step tensors a backend builds once


@dataclass(slots=True)
class HostMeta:
    """The packed array and where each field sits in it."""

    array: np.ndarray  # int32
    fields: dict[str, tuple[int, tuple[int, ...]]]
    num_tokens: int
    decode_max_ctx: int
    decode_count: int
    segments: list[tuple[int, int, int]]

    def to_device(self, device: torch.device, out: torch.Tensor | None = None) -> StepMeta:
        """One host-to-device copy (into `out` when given: a static buffer of the same layout)."""
        host = torch.from_numpy(self.array)
        if device.type == "cuda":
            host = host.pin_memory()
        if out is None:
            packed = host.to(device, non_blocking=True)
        else:
            if out.shape != host.shape:
                raise ValueError(f"static metadata buffer holds {out.shape[0]} ints, the step needs {host.shape[0]}")
            packed = out.copy_(host, non_blocking=True)
        return self.views(packed)

    def views(self, packed: torch.Tensor) -> StepMeta:
        def view(name: str) -> torch.Tensor:
            offset, shape = self.fields[name]
            return packed[offset : offset + int(np.prod(shape))].view(shape)

        decode = None
        if "decode_rows" in self.fields:
            decode = DecodeBatch(
                self.decode_count, self.decode_max_ctx, view("decode_rows"), view("decode_ctx"), view("decode_tables")
            )
        prefill = None
        if "prefill_q_starts" in self.fields:
            prefill = PrefillBatch(
                self.segments,
                view("prefill_q_starts"),
                view("prefill_q_lens"),
                view("prefill_ctx"),
                view("prefill_tables"),
                view("tile_seg"),
                view("tile_m0"),
            )
        return StepMeta(
            self.num_tokens,
            view("input_ids").view(1, -1),
            view("positions").view(1, -1),
            view("slots"),
            view("slot_blocks"),
            view("slot_offsets"),
            view("sample_rows"),
            decode,
            prefill,
        )


def _table(tables: list[Sequence[int]], width: int, pad: int) -> np.ndarray:
    out = np.full((len(tables), width), pad, dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


def build_host_meta(
    chunks: Sequence[ChunkSpec],
    block_size: int,
    *,
    pad_decodes_to: int | None = None,
    table_width: int | None = None,
    scratch_block: int = 0,
) -> HostMeta:
    """Pack a step. With `pad_decodes_to` (every chunk a decode), rows past the real ones are padding:
    token 0 at position 0, its K/V written to `scratch_block`, attending to that slot alone."""
    bs = block_size
    ids: list[int] = []
    positions: list[np.ndarray] = []
    slots: list[np.ndarray] = []
    sample_rows: list[int] = []
    dec_rows: list[int] = []
    dec_ctx: list[int] = []
    dec_tables: list[Sequence[int]] = []
    pre: list[tuple[int, int, int]] = []
    pre_tables: list[Sequence[int]] = []
    for chunk in chunks:
        start, n = chunk.start_position, len(chunk.token_ids)
        ctx = start + n
        need = (ctx + bs - 1) // bs
        if need > len(chunk.block_table):
            raise ValueError(f"{ctx} tokens need {need} blocks, the block table has {len(chunk.block_table)}")
        table = np.asarray(chunk.block_table[:need], dtype=np.int64)
        row = len(ids)
        ids.extend(chunk.token_ids)
        pos = np.arange(start, ctx, dtype=np.int64)
        positions.append(pos)
        slots.append(table[pos // bs] * bs + pos % bs)
        if chunk.sample:
            sample_rows.append(row + n - 1)
        if chunk.is_decode:
            dec_rows.append(row)
            dec_ctx.append(ctx)
            dec_tables.append(chunk.block_table[:need])
        else:
            pre.append((row, n, ctx))
            pre_tables.append(chunk.block_table[:need])
    decode_count = len(dec_rows)
    if pad_decodes_to is not None:
        if pre or decode_count > pad_decodes_to:
            raise ValueError(f"a padded step holds up to {pad_decodes_to} decodes and nothing else")
        for _ in range(pad_decodes_to - decode_count):
            dec_rows.append(len(ids))
            ids.append(0)
            positions.append(np.zeros(1, dtype=np.int64))
            slots.append(np.array([scratch_block * bs], dtype=np.int64))
            dec_ctx.append(1)
            dec_tables.append([scratch_block])
        sample_rows = list(range(len(ids)))
    decode_count = len(dec_rows)
    parts: list[tuple[str, np.ndarray]] = []
    all_slots = np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64)
    parts += [
        ("input_ids", np.asarray(ids, dtype=np.int32)),
        ("positions", np.concatenate(positions).astype(np.int32) if positions else np.zeros(0, np.int32)),
        ("slots", all_slots.astype(np.int32)),
        ("slot_blocks", (all_slots // bs).astype(np.int32)),
        ("slot_offsets", (all_slots % bs).astype(np.int32)),
        ("sample_rows", np.asarray(sample_rows, dtype=np.int32)),
    ]
    if dec_rows:
        width = table_width or max(len(t) for t in dec_tables)
        if any(len(t) > width for t in dec_tables):
            raise ValueError(f"a block table is longer than the static width {width}")
        parts += [
            ("decode_rows", np.asarray(dec_rows, dtype=np.int32)),
            ("decode_ctx", np.asarray(dec_ctx, dtype=np.int32)),
            ("decode_tables", _table(dec_tables, width, scratch_block)),
        ]
    if pre:
        width = max(len(t) for t in pre_tables)
        tiles = [(s, m0) for s, (_, q_len, _) in enumerate(pre) for m0 in range(0, q_len, PREFILL_BLOCK_M)]
        parts += [
            ("prefill_q_starts", np.asarray([p[0] for p in pre], dtype=np.int32)),
            ("prefill_q_lens", np.asarray([p[1] for p in pre], dtype=np.int32)),
            ("prefill_ctx", np.asarray([p[2] for p in pre], dtype=np.int32)),
            ("prefill_tables", _table(pre_tables, width, scratch_block)),
            ("tile_seg", np.asarray([t[0] for t in tiles], dtype=np.int32)),
            ("tile_m0", np.asarray([t[1] for t in tiles], dtype=np.int32)),
        ]
    fields: dict[str, tuple[int, tuple[int, ...]]] = {}
    offset = 0
    flat = []
    for name, arr in parts:
        fields[name] = (offset, arr.shape)
        pad = -arr.size % ALIGN
        flat.append(arr.reshape(-1).astype(np.int32, copy=False))
        if pad:
            flat.append(np.zeros(pad, np.int32))
        offset += arr.size + pad
    array = np.concatenate(flat) if flat else np.zeros(0, np.int32)
    return HostMeta(
        array,
        fields,
        len(ids),
        max(dec_ctx) if dec_ctx else 0,
        decode_count,
        pre,
    )
