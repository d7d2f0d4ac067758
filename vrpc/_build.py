"""cffi build script for `vrpc._native` (out-of-line API mode).

`setup.py` names it in `cffi_modules`, so `pip install .` and `pip install -e .` compile it;
`python3 vrpc/_build.py` builds it in place for development. `native/vrpc.h` is the single
source of the ABI: the text between its CDEF-BEGIN and CDEF-END markers goes to `cdef()`
unchanged, and the C sources are compiled against the same header, so cffi checks at build time
that every declared struct field sits where the C compiler puts it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent.parent / "native"
SOURCES = ("vrpc_ring.c", "vrpc_meta.c", "vrpc_fast.c", "vrpc_abi.c")
BEGIN, END = "/* CDEF-BEGIN */", "/* CDEF-END */"


def cdef_text(header: Path = NATIVE / "vrpc.h") -> str:
    """The declarations between the CDEF markers of `header`."""
    text = header.read_text()
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:stop]


def builder(native_dir: str) -> FFI:
    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        "vrpc._native",
        '#include "vrpc.h"',
        sources=[os.path.join(native_dir, name) for name in SOURCES],
        include_dirs=[native_dir],
        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Werror"],
    )
    return ffi


def ffibuilder() -> FFI:
    """The builder `setup.py` names in `cffi_modules` (cffi calls it; importing stays cheap)."""
    # setuptools refuses absolute source paths; it runs this from the project root.
    return builder(os.path.relpath(NATIVE))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        built = builder(str(NATIVE)).compile(tmpdir=tmp)
        target = Path(__file__).resolve().parent / Path(built).name
        shutil.copy(built, target)
    print(target)
