"""A step's metadata packed on the host: what each field says, and the padded (CUDA-graph) layout."""

from __future__ import annotations

import pytest
import torch

from executor_svc.step_meta import ALIGN, PREFILL_BLOCK_M, ChunkSpec, build_host_meta


def _mixed_step() -> list[ChunkSpec]:
    return [
        ChunkSpec([11, 12, 13], 0, [5, 9], sample=True),  # a whole 3-token prompt, block size 2
        ChunkSpec([21], 6, [1, 2, 3, 4], sample=True),  # a decode at position 6 (7th token)
        ChunkSpec(list(range(100, 100 + PREFILL_BLOCK_M + 1)), 4, list(range(40, 80)), sample=False),
    ]


def test_mixed_step_packs_tokens_slots_and_both_kinds_of_sequence() -> None:
    host = build_host_meta(_mixed_step(), block_size=2)
    meta = host.to_device(torch.device("cpu"))
    n = 3 + 1 + PREFILL_BLOCK_M + 1
    assert meta.num_tokens == n and meta.input_ids.shape == (1, n)
    assert meta.input_ids[0, :4].tolist() == [11, 12, 13, 21]
    assert meta.positions[0, :5].tolist() == [0, 1, 2, 6, 4]
    # Position p of a request goes to block table[p // 2], offset p % 2.
    assert meta.slots[:5].tolist() == [5 * 2 + 0, 5 * 2 + 1, 9 * 2 + 0, 4 * 2 + 0, 42 * 2 + 0]
    assert meta.slot_blocks[:5].tolist() == [5, 5, 9, 4, 42]
    assert meta.slot_offsets[:5].tolist() == [0, 1, 0, 0, 0]
    assert meta.sample_rows.tolist() == [2, 3]
    assert meta.decode is not None and meta.decode.count == 1
    assert meta.decode.rows.tolist() == [3] and meta.decode.ctx_lens.tolist() == [7]
    assert meta.decode.tables.tolist() == [[1, 2, 3, 4]]
    assert meta.prefill is not None
    assert meta.prefill.segments == [(0, 3, 3), (4, PREFILL_BLOCK_M + 1, PREFILL_BLOCK_M + 5)]
    # The long chunk needs two query tiles; the prompt one.
    assert meta.prefill.tile_seg.tolist() == [0, 1, 1]
    assert meta.prefill.tile_m0.tolist() == [0, 0, PREFILL_BLOCK_M]
    assert meta.prefill.tables.shape == (2, (PREFILL_BLOCK_M + 5 + 1) // 2)
    assert host.array.dtype.name == "int32" and host.array.ndim == 1


def test_padded_decode_layout_is_fixed_and_pads_into_the_scratch_block() -> None:
    chunks = [ChunkSpec([7], 3, [4, 6], True), ChunkSpec([8], 0, [2], True)]
    a = build_host_meta(chunks, block_size=2, pad_decodes_to=4, table_width=5, scratch_block=99)
    b = build_host_meta(chunks[:1], block_size=2, pad_decodes_to=4, table_width=5, scratch_block=99)
    assert a.fields == b.fields and a.array.shape == b.array.shape
    meta = a.to_device(torch.device("cpu"))
    assert meta.input_ids[0].tolist() == [7, 8, 0, 0]
    assert meta.slots.tolist() == [6 * 2 + 1, 2 * 2 + 0, 99 * 2, 99 * 2]
    assert meta.decode is not None and meta.decode.count == 4
    assert meta.decode.ctx_lens.tolist() == [4, 1, 1, 1]
    assert meta.decode.tables.tolist() == [[4, 6, 99, 99, 99], [2, 99, 99, 99, 99]] + [[99] * 5] * 2
    assert meta.sample_rows.tolist() == [0, 1, 2, 3]
    assert meta.prefill is None


def test_copy_into_a_static_buffer_reuses_its_memory() -> None:
    chunks = [ChunkSpec([7], 3, [4, 6], True)]
    host = build_host_meta(chunks, block_size=2, pad_decodes_to=2, table_width=3, scratch_block=9)
    static = torch.zeros(host.array.shape[0], dtype=torch.int32)
    meta = host.to_device(torch.device("cpu"), out=static)
    assert meta.input_ids.data_ptr() == static.data_ptr()
    assert meta.slots.tolist() == [13, 18]
    with pytest.raises(ValueError, match="static metadata buffer"):
        host.to_device(torch.device("cpu"), out=torch.zeros(3, dtype=torch.int32))


def test_a_block_table_too_short_for_the_context_is_refused() -> None:
    with pytest.raises(ValueError, match="need 3 blocks"):
        build_host_meta([ChunkSpec([1, 2], 3, [0, 1], True)], block_size=2)


def test_padding_refuses_prefills_and_too_many_decodes() -> None:
    with pytest.raises(ValueError, match="up to 1 decodes"):
        build_host_meta([ChunkSpec([1], 0, [0], True)] * 2, block_size=2, pad_decodes_to=1, table_width=2)
    with pytest.raises(ValueError, match="up to 4 decodes"):
        build_host_meta([ChunkSpec([1, 2], 0, [0], True)], block_size=2, pad_decodes_to=4, table_width=2)


@pytest.mark.parametrize("prompt_len", [2, 3, 5, 70])
def test_every_field_starts_16_bytes_aligned_whatever_the_sizes(prompt_len: int) -> None:
    """Triton compiles a kernel variant per pointer alignment it sees: the views handed to kernels are
    always 16-byte aligned, so no step compiles one while serving."""
    prompt = ChunkSpec(list(range(prompt_len)), 0, list(range(40)), True)
    specs = [prompt, ChunkSpec([7], 9, [40, 41, 42, 43, 44], True)]
    host = build_host_meta(specs, block_size=2)
    meta = host.to_device(torch.device("cpu"))
    assert all(offset % ALIGN == 0 for offset, _ in host.fields.values())
    for t in (meta.decode.rows, meta.decode.ctx_lens, meta.decode.tables, meta.prefill.tables, meta.prefill.tile_seg):
        assert t.data_ptr() % 16 == 0
