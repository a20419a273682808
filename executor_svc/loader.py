"""Building the model and sizing the KV pool: `--dtype`, `--load-format`, `--gpu-memory-utilization`."""

from __future__ import annotations

import pathlib

import structlog
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from svc_common.model_source import has_weights

log = structlog.get_logger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROFILE_TOKENS = 4096  # the largest step the activation profile covers (capped by the model's length)
MIN_AUTO_BLOCKS = 16


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on a CPU (exact, and bf16 matmuls are slow there), bfloat16 on a GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: expected auto, {', '.join(DTYPES)}") from None


def load_model(model_dir: pathlib.Path, dtype: torch.dtype, device: torch.device, load_format: str) -> torch.nn.Module:
    """The model in eval mode on `device`. `dummy` builds it from config.json with seeded random
    weights (vLLM's convention), created on the device directly: timing without the weights."""
    if load_format == "dummy":
        config = AutoConfig.from_pretrained(model_dir)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()
    if load_format != "auto":
        raise ValueError(f"unknown load format {load_format!r}: expected auto or dummy")
    if not has_weights(model_dir):
        raise FileNotFoundError(
            f"{model_dir} holds no weights (config only): pass --load-format dummy for random weights"
        )
    kwargs = {"device_map": str(device)} if device.type == "cuda" else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).to(device).eval()


def blocks_for_memory(
    total_bytes: int, free_bytes: int, activation_bytes: int, utilization: float, block_bytes: int
) -> int:
    """Blocks that fit in `utilization` of the GPU once what is in use now (weights, other processes)
    and the activations of the largest step are set aside."""
    used = total_bytes - free_bytes
    budget = utilization * total_bytes - used - activation_bytes
    return max(0, int(budget // block_bytes))


def auto_device_blocks(
    device: torch.device, block_bytes: int, utilization: float, activation_bytes: int, cpu_default: int
) -> int:
    """The pool size for `--device-blocks 0`: from free GPU memory on CUDA, `cpu_default` on a CPU."""
    if device.type != "cuda":
        return cpu_default
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    blocks = blocks_for_memory(total, free, activation_bytes, utilization, block_bytes)
    log.info(
        "kv_pool_sized",
        total_gib=round(total / 2**30, 2),
        free_gib=round(free / 2**30, 2),
        activation_gib=round(activation_bytes / 2**30, 3),
        utilization=utilization,
        blocks=blocks,
        pool_gib=round(blocks * block_bytes / 2**30, 2),
    )
    if blocks < MIN_AUTO_BLOCKS:
        raise MemoryError(
            f"only {blocks} KV blocks of {block_bytes} bytes fit in {utilization:.0%} of the GPU's "
            f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free after loading the model): raise "
            "--gpu-memory-utilization, free the GPU, or pass --device-blocks N"
        )
    return blocks
