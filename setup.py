"""Build hook: compile the VRPC ring (`vrpc._native`) with cffi; everything else is pyproject.toml.

If the C build fails (no compiler, no Python headers), installation warns and goes on: VRPC
then uses the pure-Python ring (`vrpc.native.BACKEND == "python"`). With
`PRISM_REQUIRE_NATIVE=1` (set by `.ci/run`) a failed build fails the installation instead.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

_BUILD_ERRORS = (CCompilerError, CompileError, ExecError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed native build into a warning unless it is required."""

    def run(self) -> None:
        try:
            super().run()
        except _BUILD_ERRORS as exc:
            self._fallback(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except _BUILD_ERRORS as exc:
            self._fallback(exc)

    @staticmethod
    def _fallback(exc: BaseException) -> None:
        if os.environ.get("PRISM_REQUIRE_NATIVE") == "1":
            raise exc
        print(
            f"WARNING: building the native VRPC ring failed ({exc}); VRPC will use the slow "
            "pure-Python backend. Install gcc and python3-dev (or your Python's headers) and "
            "reinstall, or set PRISM_REQUIRE_NATIVE=1 to make this an error.",
            file=sys.stderr,
        )


setup(cffi_modules=["vrpc/_build.py:ffibuilder"], cmdclass={"build_ext": OptionalBuildExt})
