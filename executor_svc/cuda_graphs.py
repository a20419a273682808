"""Decode steps replayed from CUDA graphs, one per batch-size bucket (`--cuda-graphs`; run on an H200, 2026-11-26).

A decode step launches a few hundred small kernels; replayed from a graph each costs about 1 us
instead of about 7 us (measured on an H100, DESIGN.md). Each bucket owns a static metadata buffer in
the packed layout of step_meta.py, padded to the bucket's batch and to the model's longest block table;
its graph was captured reading that buffer. A step copies its packed metadata into the buffer (one
host-to-device copy) and replays; padded rows write to the pool's scratch block and are not sampled.

With `capture=False` the same buffers run the forward eagerly: that is how the padding and the
layout are tested on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
import torch

from executor_svc.paged_attention import StepAttention
from executor_svc.step_meta import ChunkSpec, HostMeta, build_host_meta

if TYPE_CHECKING:
    from executor_svc.model_runner import ModelRunner

log = structlog.get_logger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass(slots=True)
class _Bucket:
    batch: int
    layout: HostMeta
    packed: torch.Tensor
    attn: StepAttention
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(
        self, runner: ModelRunner, capture: bool, buckets: tuple[int, ...] = BUCKETS, table_width: int | None = None
    ) -> None:
        from executor_svc.model_runner import DECODE_BLOCK_N
        from executor_svc.triton_attention import decode_splits

        self.runner = runner
        self.capture = capture
        bs = runner.block_size
        self.table_width = table_width or min((runner.max_model_len + bs - 1) // bs, runner.pool.num_blocks)
        self.buckets: dict[int, _Bucket] = {}
        pool_handle = torch.cuda.graph_pool_handle() if capture else None
        for batch in sorted(buckets, reverse=True):  # largest first: the smaller ones reuse its memory
            layout = self._pack([], batch)
            packed = torch.from_numpy(layout.array).to(runner.device)
            splits = 1
            if runner.attention == "triton":
                splits = decode_splits(batch, runner.num_kv_heads, runner.max_model_len, runner.num_sms, DECODE_BLOCK_N)
            attn = StepAttention(runner.pool, layout.views(packed), runner.attention, splits)
            bucket = _Bucket(batch, layout, packed, attn)
            if capture:
                self._capture(bucket, pool_handle)
            self.buckets[batch] = bucket
        log.info("decode_graphs", captured=capture, buckets=sorted(self.buckets), table_width=self.table_width)

    def _pack(self, chunks: list[ChunkSpec], batch: int) -> HostMeta:
        r = self.runner
        return build_host_meta(
            chunks, r.block_size, pad_decodes_to=batch, table_width=self.table_width, scratch_block=r.pool.scratch_block
        )

    def _capture(self, bucket: _Bucket, pool_handle: object) -> None:
        runner = self.runner
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                runner.run_model(bucket.attn, 0)
        torch.cuda.current_stream(runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool_handle):
            bucket.logits = runner.run_model(bucket.attn, 0)
        bucket.graph = graph

    def bucket_for(self, batch: int) -> int | None:
        return min((b for b in self.buckets if b >= batch), default=None)

    def run(self, chunks: list[ChunkSpec]) -> torch.Tensor | None:
        """Logits of the sampled chunks, or None when the step is not a decode step that fits a bucket
        (or a context outgrows the static block tables)."""
        if not chunks or not all(c.is_decode for c in chunks):
            return None
        batch = self.bucket_for(len(chunks))
        bs = self.runner.block_size
        if batch is None or any(c.start_position // bs >= self.table_width for c in chunks):
            return None
        bucket = self.buckets[batch]
        host = self._pack(chunks, batch)
        if host.fields != bucket.layout.fields:
            raise RuntimeError("decode step layout differs from its graph's static buffer")
        source = torch.from_numpy(host.array)
        if self.runner.is_cuda:
            source = source.pin_memory()
        bucket.packed.copy_(source, non_blocking=True)
        if bucket.graph is not None:
            bucket.graph.replay()
            logits = bucket.logits
        else:
            logits = self.runner.run_model(bucket.attn, 0)
        assert logits is not None
        rows = [i for i, c in enumerate(chunks) if c.sample]
        return logits[rows] if len(rows) != batch else logits
