"""Generates the gRPC stubs from proto/ whenever the package is built or installed (editable too)."""

import pathlib
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


class BuildWithStubs(build_py):
    def run(self) -> None:
        sys.path.insert(0, str(ROOT / "tools"))
        from gen_proto import generate

        generate(ROOT)
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
