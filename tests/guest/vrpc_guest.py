"""The VRPC guest client (`native/guest/prism-vrpc-guest.c`) for tests: build it static on the
host, run it, and read what it printed.

The same binary runs inside a QEMU guest (finding the ivshmem BAR in sysfs) and on the host
(`--mem /proc/<server pid>/fd/<n>`, the very memory QEMU maps), so the host tests exercise the
guest's code path without booting. Its data byte i is `pattern(i)`; sums are FNV-1a 64.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = REPO_ROOT / "native" / "guest" / "prism-vrpc-guest.c"
RING = REPO_ROOT / "native" / "vrpc_ring.c"
GUEST_CHUNK = 65536
GUEST_BYTES = 4 * GUEST_CHUNK + 1234  # (what the C client writes)
FNV_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MNT3ERR_ACCES = 13


def pattern(n: int) -> bytes:
    """The bytes the client writes: byte i is (i * 131 + (i >> 8) + 7) mod 256."""
    return bytes((i * 131 + (i >> 8) + 7) & 0xFF for i in range(n))


def fnv1a(data: bytes) -> str:
    h = FNV_BASIS
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _cannot_build(why: str) -> None:
    if os.environ.get("PRISM_REQUIRE_NATIVE") == "1":  # CI (.ci/run): a failure, not a skip
        raise AssertionError(f"{why} (scripts/setup.sh installs gcc and libc6-dev)")
    pytest.skip(why)


@functools.cache
def guest_client() -> Path:
    """The client, built `gcc -O2 -static` once per process (skips the test without gcc or a
    static libc, unless PRISM_REQUIRE_NATIVE=1 as in CI)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        _cannot_build("gcc is not installed: the guest client cannot be built")
    out = Path(tempfile.mkdtemp(prefix="prism-vrpc-guest-")) / "prism-vrpc-guest"
    argv = [gcc, "-O2", "-static", "-Wall", "-Werror", f"-I{REPO_ROOT / 'native'}"]
    proc = subprocess.run(
        [*argv, "-o", str(out), str(SOURCE), str(RING)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        if "cannot find -lc" in proc.stderr:
            _cannot_build("no static libc (libc6-dev): the guest client cannot be built")
        raise AssertionError(f"building the guest client failed:\n{proc.stderr}")
    return out


def read_all(nfs: Any, fh: Any) -> bytes:
    """A whole file through an NFS client (`prism.nfs.client.NfsClient`), READ after READ."""
    out = bytearray()
    while True:
        res = nfs.read(fh, len(out), 1 << 20)
        out += res.data
        if res.eof or not res.data:
            return bytes(out)


def results(output: str) -> dict[str, list[str]]:
    """The client's `R key=value [key=value...]` lines: every value of each key, in order."""
    found: dict[str, list[str]] = {}
    for line in output.splitlines():
        if line.startswith("R "):
            for word in line[2:].split(" "):
                key, _, value = word.partition("=")
                found.setdefault(key, []).append(value)
    return found
