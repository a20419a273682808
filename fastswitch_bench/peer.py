"""The peer baseline: transformers' own continuous batching (`model.generate_batch`) on our model and prompts.

`run_transformers_cb` runs every prompt through `generate_batch` (greedy, fixed output length when
`ignore_eos`) and times the call; `run_sequential_generate` runs plain `model.generate()` one prompt at
a time, as the no-batching floor. Both return a `PeerResult` with the generated ids in prompt order.
`run_transformers_cb_conversations` replays the benchmark's multi-turn workload: transformers has no
conversations and no priorities, so turn k of every conversation runs as wave k (one closed batch on
one persistent manager), each prompt the chat template over that conversation's history, with the
assistant turns being the peer's own earlier outputs.

Notes on the transformers API (5.x), found by reading `transformers.generation.continuous_batching`:

* EOS: the manager takes `eos_token_id` from the GenerationConfig, then from the model config; a
  negative id means "no EOS". So `eos_token_id=-1` makes every request run to `max_new_tokens`
  without masking any token (unlike `min_new_tokens`, which bans EOS and can change the argmax).
  `model.generate()` accepts -1 the same way (with a warning, silenced here).
* Cache sizing: with no `ContinuousBatchingConfig`, the paged KV cache is sized from memory, which on
  CPU means 60 % of RAM (gigabytes) with `max_batch_tokens=8192`; allocating it takes seconds and slows
  every step. We size the cache to the workload instead (`workload_cb_config`), which is what a fair
  comparison with a serving stack that sizes its own cache needs. Pass `cb_config` to override.
* Warm-up: a first `generate_batch` call with `persistent_manager=True` builds and warms the manager
  (cache allocation, first forward passes); the timed call reuses it, so `wall_s` excludes setup.
* Timestamps: with `record_timestamps=True`, `GenerationOutput.timestamps` holds a `perf_counter()`
  stamp per generated token and `created_time` the stamp at submission.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

NO_EOS = -1  # a negative EOS id disables EOS in both generate_batch and generate


@dataclass(slots=True)
class PeerTurn:
    """One request of a conversation replay: turn `turn` (1-based) of conversation `conversation`."""

    conversation: int
    turn: int
    prompt_tokens: int
    output: list[int]
    ttft_s: float | None  # wave submission -> first token
    tbt_s: list[float]
    start_s: float  # wave submission, from the start of the replay
    end_s: float  # last token


@dataclass(slots=True)
class PeerConversationResult:
    turns: list[PeerTurn]  # in wave order, conversation order within a wave
    wall_s: float  # first submission -> last token of the last wave (excludes load and warm-up)
    generated_tokens: int
    throughput_tok_s: float


@dataclass(slots=True)
class PeerResult:
    outputs: list[list[int]]  # generated token ids per prompt, in prompt order
    wall_s: float  # wall time of the generation call(s), excluding model load and warm-up
    generated_tokens: int
    throughput_tok_s: float
    ttft_s: list[float] = field(default_factory=list)  # per request, submission -> first token
    tbt_s: list[float] = field(default_factory=list)  # all inter-token gaps


def _setup_torch() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings (e.g. about the negative EOS id, or the persistent CB manager)."""
    old = hf_logging.get_verbosity()
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    old_cb = cb_logger.level
    hf_logging.set_verbosity_error()
    cb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        cb_logger.setLevel(old_cb)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peer_dtype(dtype: str | None) -> torch.dtype:
    """The torch dtype for a `--dtype` value. The peer runs on the CPU, where `auto` (or none given)
    means fp32, as it does for the executor."""
    if dtype in (None, "auto"):
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model_dir: str | os.PathLike, dtype: str | None = None, load_format: str | None = None
) -> torch.nn.Module:
    """The model as the executor loads it: `dtype` as `--dtype`; `load_format="dummy"` builds random
    weights (seeded) from the directory's config.json instead of reading weights, as `--load-format dummy`."""
    _setup_torch()
    if load_format not in (None, "auto", "dummy"):
        raise ValueError(f"unknown load format {load_format!r}; choose from auto, dummy")
    with _quiet_transformers():
        if load_format == "dummy":
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(os.fspath(model_dir))
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config, dtype=peer_dtype(dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(os.fspath(model_dir), dtype=peer_dtype(dtype))
    model.eval()
    return model


def _generation_config(max_new_tokens: int, ignore_eos: bool, model: torch.nn.Module) -> GenerationConfig:
    eos = NO_EOS if ignore_eos else model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)


# transformers 5.24 names the tokens per cache page `page_size`; earlier 5.x (5.17) named it `block_size`.
_PAGE = "page_size" if "page_size" in {f.name for f in fields(ContinuousBatchingConfig)} else "block_size"


def workload_cb_config(prompts: list[list[int]], max_new_tokens: int, page_size: int = 256) -> ContinuousBatchingConfig:
    """A paged cache just big enough for every request at once, and a token budget that prefills all
    prompts in one step (instead of the memory-derived defaults, which are huge on CPU)."""
    num_blocks = sum(math.ceil((len(p) + max_new_tokens) / page_size) for p in prompts) + 1
    max_batch_tokens = max(page_size, sum(len(p) for p in prompts))
    return ContinuousBatchingConfig(
        **{_PAGE: page_size},
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=len(prompts),
    )


def _result(outputs: list[list[int]], wall_s: float, ttft: list[float], tbt: list[float]) -> PeerResult:
    n = sum(len(o) for o in outputs)
    return PeerResult(
        outputs=outputs,
        wall_s=wall_s,
        generated_tokens=n,
        throughput_tok_s=n / wall_s if wall_s > 0 else 0.0,
        ttft_s=ttft,
        tbt_s=tbt,
    )


def run_transformers_cb(
    model_dir: str | os.PathLike,
    prompts: list[list[int]],
    max_new_tokens: int,
    ignore_eos: bool = True,
    warmup: bool = True,
    cb_config: ContinuousBatchingConfig | None = None,
    model: torch.nn.Module | None = None,
) -> PeerResult:
    """Run all `prompts` through `model.generate_batch` (greedy) and time the call.

    With `warmup`, a first call on the same prompts (2 new tokens) builds and warms a persistent
    manager that the timed call reuses. `cb_config` defaults to `workload_cb_config(...)`; `model`
    lets a caller reuse a loaded model (otherwise it is loaded from `model_dir`).
    """
    if not prompts:
        return _result([], 0.0, [], [])
    if model is None:
        model = load_model(model_dir)
    else:
        _setup_torch()

    def config() -> ContinuousBatchingConfig:
        # the manager writes inferred values back into its config: give each manager a fresh one
        if cb_config is not None:
            return cb_config
        return workload_cb_config(prompts, max_new_tokens)

    gen_config = _generation_config(max_new_tokens, ignore_eos, model)
    with _quiet_transformers():
        if warmup:
            model.generate_batch(
                prompts,
                generation_config=gen_config,
                continuous_batching_config=config(),
                persistent_manager=True,
                max_new_tokens=min(2, max_new_tokens),
            )
        start = time.perf_counter()
        try:
            results = model.generate_batch(
                prompts,
                generation_config=gen_config,
                continuous_batching_config=config(),
                record_timestamps=True,
                max_new_tokens=max_new_tokens,
            )
        finally:
            model.destroy_cached_continuous_batching_manager()
        wall_s = time.perf_counter() - start

    # generate_batch returns the requests in submission (= prompt) order
    ordered = list(results.values())
    if len(ordered) != len(prompts) or any(r.error is not None for r in ordered):
        errors = [r.error for r in ordered if r.error is not None]
        raise RuntimeError(f"generate_batch returned {len(ordered)}/{len(prompts)} results; errors: {errors}")
    outputs = [list(r.generated_tokens) for r in ordered]
    ttft: list[float] = []
    tbt: list[float] = []
    for r in ordered:
        stamps = r.timestamps or []
        if stamps:
            ttft.append(stamps[0] - r.created_time)
            tbt.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return _result(outputs, wall_s, ttft, tbt)


class _TimingStreamer(BaseStreamer):
    """Records a perf_counter() stamp for every token `generate()` emits (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_sequential_generate(
    model_dir: str | os.PathLike,
    prompts: list[list[int]],
    max_new_tokens: int,
    ignore_eos: bool = True,
    warmup: bool = True,
    model: torch.nn.Module | None = None,
) -> PeerResult:
    """Plain greedy `model.generate()`, one prompt at a time; TTFT is measured from each call's start."""
    if model is None:
        model = load_model(model_dir)
    else:
        _setup_torch()
    gen_config = _generation_config(max_new_tokens, ignore_eos, model)

    def generate(prompt: list[int], streamer: BaseStreamer | None, n: int) -> list[int]:
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=gen_config,
                max_new_tokens=n,
                streamer=streamer,
            )
        return out[0, len(prompt) :].tolist()

    outputs: list[list[int]] = []
    ttft: list[float] = []
    tbt: list[float] = []
    with _quiet_transformers():
        if warmup and prompts:
            generate(prompts[0], None, min(2, max_new_tokens))
        start = time.perf_counter()
        for prompt in prompts:
            streamer = _TimingStreamer()
            t0 = time.perf_counter()
            outputs.append(generate(prompt, streamer, max_new_tokens))
            if streamer.stamps:
                ttft.append(streamer.stamps[0] - t0)
                tbt.extend(b - a for a, b in zip(streamer.stamps, streamer.stamps[1:], strict=False))
        wall_s = time.perf_counter() - start
    return _result(outputs, wall_s, ttft, tbt)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def run_transformers_cb_conversations(
    model_dir: str | os.PathLike,
    tokenizer: Any,
    conversations: list[list[tuple[str, int]]],
    max_batch_tokens: int = 512,
    page_size: int = 64,
    model: torch.nn.Module | None = None,
    on_turn: Callable[[PeerTurn], None] | None = None,
) -> PeerConversationResult:
    """Replay conversations (each a list of (user text, answer tokens)) as waves: turn k of all at once.

    Answers are greedy with EOS ignored, exactly `answer tokens` long; the decoded answer (special
    tokens skipped, as the FastSwitch server stores it) becomes the assistant's turn in the history of
    the next wave. One manager serves all waves, its paged cache sized for every conversation's final
    context at once; transformers' own prefix sharing stays at its default (on).
    """
    if model is None:
        model = load_model(model_dir)
    else:
        _setup_torch()
    gen_config = _generation_config(max(n for conv in conversations for _, n in conv), True, model)
    # Upper bound of each conversation's final context: template overhead, every user turn, and every
    # answer (re-tokenised decoded text can run a little longer than the ids it came from).
    bounds = [
        64 + sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + int(1.25 * n) + 16 for text, n in conv)
        for conv in conversations
    ]
    cb_config = ContinuousBatchingConfig(
        **{_PAGE: page_size},
        num_blocks=sum(math.ceil(b / page_size) for b in bounds) + 2,
        max_batch_tokens=max(max_batch_tokens, page_size),
        max_requests_per_batch=len(conversations),
    )
    histories: list[list[dict[str, str]]] = [[] for _ in conversations]
    turns: list[PeerTurn] = []
    with (
        _quiet_transformers(),
        model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=5
        ) as manager,
    ):
        # warm-up: the first forward passes are slow
        manager.add_request([0, 1, 2, 3], request_id="warmup", max_new_tokens=2, eos_token_id=NO_EOS)
        _collect(manager, {"warmup"})
        start = time.perf_counter()
        for k in range(max(len(c) for c in conversations)):
            wave = [i for i, conv in enumerate(conversations) if len(conv) > k]
            prompts = {}
            for i in wave:
                histories[i].append({"role": "user", "content": conversations[i][k][0]})
                prompts[i] = _chat_ids(tokenizer, histories[i])
            submitted = time.perf_counter()
            for i in wave:
                manager.add_request(
                    prompts[i],
                    request_id=f"c{i}-t{k}",
                    max_new_tokens=conversations[i][k][1],
                    record_timestamps=True,
                    eos_token_id=NO_EOS,
                )
            results = _collect(manager, {f"c{i}-t{k}" for i in wave})
            for i in wave:
                r = results[f"c{i}-t{k}"]
                stamps = r.timestamps or []
                output = list(r.generated_tokens)
                answer = tokenizer.decode(output, skip_special_tokens=True)
                histories[i].append({"role": "assistant", "content": answer})
                turn = PeerTurn(
                    conversation=i,
                    turn=k + 1,
                    prompt_tokens=len(prompts[i]),
                    output=output,
                    ttft_s=stamps[0] - submitted if stamps else None,
                    tbt_s=[b - a for a, b in zip(stamps, stamps[1:], strict=False)],
                    start_s=submitted - start,
                    end_s=(stamps[-1] if stamps else time.perf_counter()) - start,
                )
                turns.append(turn)
                if on_turn is not None:
                    on_turn(turn)
        wall_s = time.perf_counter() - start
    n = sum(len(t.output) for t in turns)
    return PeerConversationResult(turns, wall_s, n, n / wall_s if wall_s > 0 else 0.0)


def _collect(manager: Any, request_ids: set[str], timeout_s: float = 600.0) -> dict[str, Any]:
    """Wait for every request in `request_ids` to finish; raise on an error or a dead manager."""
    results: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < len(request_ids):
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped unexpectedly")
            if time.monotonic() > deadline:
                raise TimeoutError(f"generate_batch peer: {len(request_ids) - len(results)} requests still running")
            continue
        if result.request_id in request_ids and result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"transformers request {result.request_id} failed: {result.error}")
            results[result.request_id] = result
    return results
