"""Issue #10 item 9: every file and directory of a store is private to the server's user.

`DATA/meta/data.mdb` holds the file-handle MAC key; readable by others, any local user could
forge handles. A store made by `prism vm create` and written by `prism serve` (journal and a
segment exist) has only 0700 directories and 0600 files, whatever the umask, and another
local user (nobody) cannot read the key. A store made before the rule (0755/0644) is
tightened the next time any command opens it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.op_helpers import PrismServe, nfs_put, prism

NOBODY = 65534


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory any user may traverse, so only the store's own modes protect it."""
    d = Path(tempfile.mkdtemp(prefix="prism-private-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def modes(data: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(data.stat().st_mode)}
    for path in data.rglob("*"):
        out[str(path.relative_to(data))] = stat.S_IMODE(path.lstat().st_mode)
    return out


def assert_private(data: Path) -> None:
    found = modes(data)
    for name in ("meta", "meta/data.mdb", "meta/lock.mdb", "meta/journal", "segments"):
        assert name in found, f"{name} missing from {sorted(found)}"
    assert any(n.endswith(".seg") for n in found), sorted(found)
    wrong = {n: oct(m) for n, m in found.items() if m != (0o700 if (data / n).is_dir() else 0o600)}
    assert not wrong, f"not private: {wrong}"


def nobody_reads(path: Path) -> bool:
    proc = subprocess.run(
        ["head", "-c", "1", str(path)],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def test_new_store_is_private_whatever_the_umask(world_dir: Path) -> None:
    data = world_dir / "data"
    old = os.umask(0o022)
    try:
        prism(data, "vm", "create", "vm")
        with PrismServe(data) as srv:
            c, root = srv.mount("/vm")
            with c:
                nfs_put(c, root, "f", b"content that lands in a segment")
    finally:
        os.umask(old)
    assert_private(data)
    assert not nobody_reads(data / "meta" / "data.mdb")


def test_existing_store_is_tightened_on_open(world_dir: Path) -> None:
    data = world_dir / "data"
    prism(data, "vm", "create", "vm")
    with PrismServe(data) as srv:
        c, root = srv.mount("/vm")
        with c:
            nfs_put(c, root, "f", b"x" * 5000)
    for path in [data, *data.rglob("*")]:  # as an older Prism left it
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert nobody_reads(data / "meta" / "data.mdb")  # the hole this closes
    prism(data, "vm", "list")
    assert_private(data)
    assert not nobody_reads(data / "meta" / "data.mdb")


def test_symlinked_data_and_segment_directories_are_tightened(world_dir: Path) -> None:
    real = world_dir / "real"
    prism(real, "vm", "create", "vm")
    (real / "segments").rename(world_dir / "segments-disk")
    (real / "segments").symlink_to(world_dir / "segments-disk")
    (world_dir / "link").symlink_to(real)
    for path in (real, real / "meta", world_dir / "segments-disk"):
        path.chmod(0o755)
    prism(world_dir / "link", "vm", "list")
    for path in (real, real / "meta", world_dir / "segments-disk"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
