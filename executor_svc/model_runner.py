"""Runs one StepPlan: packs the chunks into one forward pass over the paged KV pool, samples.

All requests' tokens of a step (prefill chunks and single-token decodes) are packed into one
sequence of length T; RoPE positions come from `position_ids`, and paged attention keeps the
requests apart. Only the last row of each sampled chunk goes through the LM head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from executor_svc import paged_attention
from executor_svc.config import ExecutorConfig
from executor_svc.kv_pool import KVPool
from executor_svc.paged_attention import PrefillSegment, StepAttention
from executor_svc.sampler import sample
from svc_common.model_source import resolve_model
from svc_common.plan import Sampling, StepOutput, StepPlan

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _RequestState:
    sampling: Sampling
    block_table: list[int]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    def __init__(self, config: ExecutorConfig) -> None:
        config.validate()
        self.config = config
        self.device = pick_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.resolved_threads)
        self.model_dir = resolve_model(config.model)
        hf_config = AutoConfig.from_pretrained(self.model_dir)
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
        self.model.set_attn_implementation(paged_attention.ATTN_IMPLEMENTATION)
        text_config = hf_config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.vocab_size = text_config.vocab_size
        self.max_model_len = getattr(text_config, "max_position_embeddings", 4096)
        self.dtype = dtype
        self.block_size = config.block_size
        self.pool = KVPool(
            config.device_blocks,
            self.num_layers,
            config.block_size,
            self.num_kv_heads,
            self.head_dim,
            dtype,
            self.device,
        )
        self.requests: dict[str, _RequestState] = {}
        log.info(
            "model_loaded",
            model=str(self.model_dir),
            device=str(self.device),
            layers=self.num_layers,
            kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            blocks=config.device_blocks,
            block_bytes=self.pool.block_bytes,
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None  # type: ignore[assignment]

    # -- one step ---------------------------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepOutput:
        for rid in plan.released_request_ids:
            self.requests.pop(rid, None)
        for new in plan.new_requests:
            self.requests[new.request_id] = _RequestState(new.sampling, [])
        for chunk in plan.chunks:
            state = self.requests.get(chunk.request_id)
            if state is None:
                raise ValueError(f"plan step {plan.step_id} names unknown request {chunk.request_id}")
            state.block_table.extend(chunk.new_block_ids)
        if not plan.chunks:
            return StepOutput(plan.step_id, [])

        t0 = time.perf_counter_ns()
        input_ids, positions, attn, sample_rows = self._prepare(plan)
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=sample_rows if sample_rows.numel() else torch.tensor([0], device=self.device),
                fs_step=attn,
            ).logits[0]
        t1 = time.perf_counter_ns()
        sampled = [c for c in plan.chunks if c.sample]
        tokens = (
            sample(
                logits.float(),
                [self.requests[c.request_id].sampling for c in sampled],
                [c.start_position + len(c.token_ids) for c in sampled],
                [c.token_bitmask for c in sampled],
            )
            if sampled
            else []
        )
        t2 = time.perf_counter_ns()
        return StepOutput(
            plan.step_id,
            [(c.request_id, tok) for c, tok in zip(sampled, tokens, strict=True)],
            forward_ns=t1 - t0,
            sample_ns=t2 - t1,
        )

    def _prepare(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, StepAttention, torch.Tensor]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        write_blocks: list[int] = []
        write_offsets: list[int] = []
        sample_rows: list[int] = []
        prefills: list[PrefillSegment] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        for chunk in plan.chunks:
            table = self.requests[chunk.request_id].block_table
            start, n = chunk.start_position, len(chunk.token_ids)
            ctx = start + n
            if (ctx + bs - 1) // bs > len(table):
                raise ValueError(
                    f"request {chunk.request_id}: {ctx} tokens need {(ctx + bs - 1) // bs} blocks, "
                    f"block table has {len(table)}"
                )
            row = len(ids)
            ids.extend(chunk.token_ids)
            pos.extend(range(start, ctx))
            for p in range(start, ctx):
                write_blocks.append(table[p // bs])
                write_offsets.append(p % bs)
            if chunk.sample:
                sample_rows.append(row + n - 1)
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_tables.append(table[: (ctx + bs - 1) // bs])
                decode_lens.append(ctx)
            else:
                mask = None
                if start > 0:
                    q_pos = torch.arange(start, ctx).unsqueeze(1)
                    mask = torch.arange(ctx).unsqueeze(0) <= q_pos
                    mask = mask.to(self.device)
                prefills.append(
                    PrefillSegment(
                        q_start=row,
                        q_len=n,
                        start_position=start,
                        ctx_len=ctx,
                        block_ids=torch.tensor(table[: (ctx + bs - 1) // bs], device=self.device),
                        mask=mask,
                    )
                )
        dev = self.device
        attn = StepAttention(
            pool=self.pool,
            write_blocks=torch.tensor(write_blocks, device=dev),
            write_offsets=torch.tensor(write_offsets, device=dev),
            prefills=prefills,
            decode_rows=None,
            decode_tables=None,
            decode_mask=None,
        )
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            padded = [t + [t[-1]] * (width - len(t)) for t in decode_tables]
            attn.decode_rows = torch.tensor(decode_rows, device=dev)
            attn.decode_tables = torch.tensor(padded, device=dev)
            lens = torch.tensor(decode_lens, device=dev)
            attn.decode_mask = (torch.arange(width * bs, device=dev).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
        return (
            torch.tensor([ids], device=dev),
            torch.tensor([pos], device=dev),
            attn,
            torch.tensor(sample_rows, device=dev, dtype=torch.long),
        )
