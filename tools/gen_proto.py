"""Generate the Python gRPC stubs (and typed .pyi stubs) from proto/ into fastswitch/v1/.

The one generation command: setup.py runs it at install time, `make proto` runs it by hand.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate(root: pathlib.Path = ROOT, out: pathlib.Path | None = None) -> list[pathlib.Path]:
    import grpc_tools
    from grpc_tools import protoc

    out = out or root
    protos = sorted((root / "proto").rglob("*.proto"))
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{root / 'proto'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return protos


if __name__ == "__main__":
    generate(out=pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else None)
