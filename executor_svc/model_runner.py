"""Runs one StepPlan: packs the chunks into one forward pass over the paged KV pool, samples.

All requests' tokens of a step (prefill chunks and single-token decodes) are packed into one
sequence of length T; RoPE positions come from `position_ids`, and paged attention keeps the
requests apart. Only the last row of each sampled chunk goes through the LM head.

The step is a fixed pipeline: the plan's metadata is packed on the host and copied to the device
once (step_meta.py); the forward runs eagerly, or, for a decode-only step with `--cuda-graphs`, is
replayed from the CUDA graph of its batch-size bucket (cuda_graphs.py), on the same metadata layout;
the only host synchronisation is reading the sampled ids back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from executor_svc import paged_attention
from executor_svc.config import CPU_DEFAULT_BLOCKS, ExecutorConfig
from executor_svc.cpu_linear import pack_linears
from executor_svc.kv_pool import KVPool, block_bytes
from executor_svc.loader import (
    PROFILE_TOKENS,
    auto_device_blocks,
    load_model,
    pick_device,
    resolve_dtype,
)
from executor_svc.paged_attention import StepAttention
from executor_svc.sampler import sample
from executor_svc.step_meta import ChunkSpec, build_host_meta
from svc_common.model_source import resolve_model
from svc_common.plan import Sampling, StepOutput, StepPlan

log = structlog.get_logger(__name__)

__all__ = ["ModelRunner", "pick_device"]

DECODE_BLOCK_N = 64  # context tokens per tile of the Triton decode kernel


@dataclass(slots=True)
class _RequestState:
    sampling: Sampling
    block_table: list[int]
    slot: int = 0  # its name in the plans' DecodeBatch
    last_token: int = -1  # what it sampled in the last step that sampled it (-1: none yet)


class ModelRunner:
    def __init__(self, config: ExecutorConfig) -> None:
        config.validate()
        self.config = config
        self.device = pick_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.resolved_threads)
            if config.cuda_graphs:
                raise ValueError("--cuda-graphs needs a CUDA device")
        self.dtype = resolve_dtype(config.dtype, self.device)
        # --fused-ops auto: half precision on CUDA (fp32 keeps the model's own code: token identity)
        half = self.dtype in (torch.bfloat16, torch.float16)
        self.fused = config.fused_ops == "on" or (config.fused_ops == "auto" and self.is_cuda and half)
        if self.device.type == "cpu" and (config.attention == "triton" or self.fused):
            # Triton compiles for GPUs only; on a CPU its interpreter runs the kernels (slowly: tests).
            # It must be chosen before triton is first imported.
            if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
                raise RuntimeError(
                    "Triton on a CPU (--attention triton, --fused-ops on) needs TRITON_INTERPRET=1 set before "
                    "triton is imported"
                )
            os.environ["TRITON_INTERPRET"] = "1"
            log.warning("triton_interpreter", reason="Triton kernels on a CPU run in Triton's interpreter (slow)")
        self.model_dir = resolve_model(config.model)
        self.model = load_model(self.model_dir, self.dtype, self.device, config.load_format)
        self.model.set_attn_implementation(paged_attention.ATTN_IMPLEMENTATION)
        self.fused_counts: dict[str, int] = {}
        self._fused_scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        if self.fused:
            from executor_svc import fused_ops

            self.fused_counts = fused_ops.fuse_model(self.model)
            self._fused_scope = fused_ops.active
        self.packed_linears = 0
        if self.device.type == "cpu" and config.cpu_linear == "onednn":
            self.packed_linears = pack_linears(self.model)
        text_config = self.model.config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.vocab_size = text_config.vocab_size
        self.max_model_len = getattr(text_config, "max_position_embeddings", 4096)
        self.block_size = config.block_size
        self.attention = config.attention
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.is_cuda else 1
        self.requests: dict[str, _RequestState] = {}
        self.slots: dict[int, _RequestState] = {}  # the same requests, by slot
        bytes_per_block = block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)
        num_blocks = config.device_blocks
        if num_blocks == 0:
            activation = self._profile_activation_bytes() if self.is_cuda else 0
            num_blocks = auto_device_blocks(
                self.device, bytes_per_block, config.gpu_memory_utilization, activation, CPU_DEFAULT_BLOCKS
            )
        self.pool = self._make_pool(num_blocks)
        if self.is_cuda and (self.attention == "triton" or self.fused):
            self._compile_kernels()
        self.graphs = None
        if config.cuda_graphs:
            from executor_svc.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, capture=True)
        log.info(
            "model_loaded",
            model=str(self.model_dir),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            load_format=config.load_format,
            attention=self.attention,
            cuda_graphs=self.graphs is not None,
            fused_ops=self.fused_counts or "off",
            packed_linears=self.packed_linears,
            layers=self.num_layers,
            kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            blocks=num_blocks,
            block_bytes=self.pool.block_bytes,
        )

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def _make_pool(self, num_blocks: int) -> KVPool:
        return KVPool(
            num_blocks, self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )

    def close(self) -> None:
        self.graphs = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None  # type: ignore[assignment]

    # -- one step ---------------------------------------------------------------------------------

    def forget_all(self) -> None:
        """A new scheduler stream: it knows no request yet."""
        self.requests.clear()
        self.slots.clear()

    def step(self, plan: StepPlan) -> StepOutput:
        for rid in plan.released_request_ids:
            gone = self.requests.pop(rid, None)
            if gone is not None and self.slots.get(gone.slot) is gone:
                del self.slots[gone.slot]
        for new in plan.new_requests:
            self.requests[new.request_id] = self.slots[new.slot] = _RequestState(new.sampling, [], new.slot)
        for chunk in plan.chunks:
            state = self.requests.get(chunk.request_id)
            if state is None:
                raise ValueError(f"plan step {plan.step_id} names unknown request {chunk.request_id}")
            state.block_table.extend(chunk.new_block_ids)
        decodes = plan.decodes
        try:
            decoding = [self.slots[slot] for slot in decodes.slots]
            growing = [self.slots[slot] for slot in decodes.block_slots]
        except KeyError as err:
            raise ValueError(f"plan step {plan.step_id} names unknown slot {err.args[0]}") from None
        inputs = decodes.token_ids
        if decodes.previous_tokens:  # planned while the last step ran: feed what that step sampled
            inputs = [state.last_token for state in decoding]
            if -1 in inputs:
                raise ValueError(f"plan step {plan.step_id} feeds previous tokens to a slot that has sampled none")
        for state, block in zip(growing, decodes.block_ids, strict=True):
            state.block_table.append(block)
        if not plan.chunks and not decoding:
            return StepOutput(plan.step_id, [])

        bs = self.block_size
        for c in plan.chunks:
            need = (c.start_position + len(c.token_ids) + bs - 1) // bs
            have = len(self.requests[c.request_id].block_table)
            if need > have:
                raise ValueError(
                    f"plan step {plan.step_id}: request {c.request_id} needs {need} blocks for "
                    f"{c.start_position + len(c.token_ids)} tokens, its block table has {have}"
                )
        for state, position in zip(decoding, decodes.positions, strict=True):
            if position >= len(state.block_table) * bs:
                raise ValueError(
                    f"plan step {plan.step_id}: the decode in slot {state.slot} at position {position} has "
                    f"{len(state.block_table)} blocks"
                )
        t0 = time.perf_counter_ns()
        specs = [
            ChunkSpec(c.token_ids, c.start_position, self.requests[c.request_id].block_table, c.sample)
            for c in plan.chunks
        ]
        specs += [
            ChunkSpec([token], position, state.block_table, True)
            for state, token, position in zip(decoding, inputs, decodes.positions, strict=True)
        ]
        logits = self.forward(specs)
        t1 = time.perf_counter_ns()
        sampled = [c for c in plan.chunks if c.sample]
        tokens = (
            sample(
                logits.float(),
                [self.requests[c.request_id].sampling for c in sampled] + [state.sampling for state in decoding],
                [c.start_position + len(c.token_ids) for c in sampled] + [p + 1 for p in decodes.positions],
                [c.token_bitmask for c in sampled] + [b""] * len(decoding),
            )
            if sampled or decoding
            else []
        )
        t2 = time.perf_counter_ns()
        for c, token in zip(sampled, tokens[: len(sampled)], strict=True):
            self.requests[c.request_id].last_token = token
        for state, token in zip(decoding, tokens[len(sampled) :], strict=True):
            state.last_token = token
        return StepOutput(
            plan.step_id,
            [(c.request_id, tok) for c, tok in zip(sampled, tokens[: len(sampled)], strict=True)],
            forward_ns=t1 - t0,
            sample_ns=t2 - t1,
            decode_tokens=tokens[len(sampled) :],
        )

    def forward(self, chunks: list[ChunkSpec]) -> torch.Tensor:
        """Logits [sampled chunks, vocab] of one step (a graph replay where one fits)."""
        if self.graphs is not None:
            logits = self.graphs.run(chunks)
            if logits is not None:
                return logits
        host = build_host_meta(chunks, self.block_size, scratch_block=self.pool.scratch_block)
        meta = host.to_device(self.device)
        splits = 1
        if self.attention == "triton" and meta.decode is not None:
            from executor_svc.triton_attention import decode_splits

            d = meta.decode
            splits = decode_splits(d.count, self.num_kv_heads, d.max_ctx, self.num_sms, DECODE_BLOCK_N)
        keep = meta.sample_rows if meta.sample_rows.numel() else torch.zeros(1, dtype=torch.int32, device=self.device)
        return self.run_model(StepAttention(self.pool, meta, self.attention, splits), keep)

    def run_model(self, attn: StepAttention, logits_to_keep: torch.Tensor | int) -> torch.Tensor:
        """The model's own forward over the step (eager, or while a CUDA graph captures it)."""
        attn.meta.derived.clear()  # built from this step's metadata by the first layer
        with torch.inference_mode(), self._fused_scope():
            return self.model(
                input_ids=attn.meta.input_ids,
                position_ids=attn.meta.positions,
                use_cache=False,
                logits_to_keep=logits_to_keep,
                fs_step=attn,
            ).logits[0]

    def _compile_kernels(self) -> None:
        """Compile every Triton variant a step can launch before the first request, not inside it: a
        prefill over a cached prefix, and an eager decode for each split count (the kernels' one
        compile-time parameter that varies), which also compiles the fused operators' kernels. On an
        H200, py-spy found 0.6 s of a measured 2.0 s batch (32 x 128) in these launches on their first
        use. Runs over free blocks of the pool (no request holds any yet); the logits are discarded."""
        from executor_svc.triton_attention import MAX_SPLITS

        start = time.perf_counter()
        bs = self.block_size
        table = list(range(min(2, self.pool.num_blocks)))
        prefix = ChunkSpec([0] * bs, bs, table, True) if len(table) == 2 else ChunkSpec([0], 0, table, True)
        decode = ChunkSpec([0], len(table) * bs - 1, table, True)
        runs = [([prefix], 1)] + [([decode], 2**i) for i in range(MAX_SPLITS.bit_length())]
        for specs, splits in runs:
            meta = build_host_meta(specs, bs, scratch_block=self.pool.scratch_block).to_device(self.device)
            self.run_model(StepAttention(self.pool, meta, self.attention, splits), meta.sample_rows)
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        log.info("kernels_compiled", variants=len(runs), seconds=round(time.perf_counter() - start, 2))

    def _profile_activation_bytes(self) -> int:
        """Peak memory of the largest step, a prefill of PROFILE_TOKENS tokens, over a scratch pool."""
        tokens = min(PROFILE_TOKENS, self.max_model_len)
        blocks = (tokens + self.block_size - 1) // self.block_size
        pool = self._make_pool(blocks)
        try:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            spec = ChunkSpec([0] * tokens, 0, list(range(blocks)), True)
            meta = build_host_meta([spec], self.block_size, scratch_block=pool.scratch_block).to_device(self.device)
            self.run_model(StepAttention(pool, meta, self.attention), meta.sample_rows)
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - before
        finally:
            pool.close()
        log.info("activation_profile", tokens=tokens, peak_mib=round(peak / 2**20, 1))
        return int(peak * 1.2)  # headroom: fragmentation, sampling, CUDA graphs' pool
