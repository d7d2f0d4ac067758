"""Prism against an NFS client we did not write: libnfs's nfs-cp, nfs-ls and nfs-cat.

The URLs name the NFS and MOUNT ports (`nfsport=`, `mountport=`), so no portmapper is used.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prism.nfs.const import NfsStat3
from tests.server_helpers import PrismProcess

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nfs-cp", "nfs-ls", "nfs-cat")),
    reason="libnfs-utils (nfs-cp, nfs-ls, nfs-cat) is not installed",
)

MiB = 1 << 20
TOOL_TIMEOUT = 60
# nfs-ls -l style: mode, nlink, uid, gid, size, name
_LS_LINE = re.compile(r"^(?P<mode>[-dlpcbs][-rwxsStT]{9})\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(.+)$")


def tool(*argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(argv, capture_output=True, timeout=TOOL_TIMEOUT, check=False)
    if check:
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {proc.stderr!r}"
    return proc


def ls(server: PrismProcess, path: str, *flags: str) -> dict[str, tuple[str, int]]:
    """nfs-ls output as {name: (mode string, size)}."""
    out = tool("nfs-ls", *flags, server.url(path)).stdout.decode()
    entries = {}
    for line in out.splitlines():
        m = _LS_LINE.match(line)
        assert m, f"unexpected nfs-ls line {line!r}"
        entries[m.group(6)] = (m.group("mode"), int(m.group(5)))
    return entries


@pytest.fixture(scope="module")
def host_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return {
        "hello.txt": b"hello from the host\n" * 3,
        "empty": b"",
        "odd-size.bin": os.urandom(300_001),
        "random-5m.bin": os.urandom(5 * MiB),
    }


def test_nfs_cp_in_ls_cat_cp_out(
    prism_module_server: PrismProcess, host_files: dict[str, bytes], tmp_path: Path
) -> None:
    server = prism_module_server
    root = server.mount("/vm")
    with server.nfs_client() as nfs:
        assert nfs.mkdir(root, "ext").ok

    src = tmp_path / "src"
    src.mkdir()
    for name, data in host_files.items():
        (src / name).write_bytes(data)
        out = tool("nfs-cp", str(src / name), server.url(f"/vm/ext/{name}")).stdout
        assert f"copied {len(data)} bytes".encode() in out

    listing = ls(server, "/vm/ext")
    assert set(listing) == set(host_files)
    for name, data in host_files.items():
        mode, size = listing[name]
        assert mode.startswith("-")
        assert size == len(data), name
    recursive = ls(server, "/vm", "-R")
    assert recursive["ext"][0].startswith("d")
    for name, data in host_files.items():
        assert recursive[f"ext/{name}"][1] == len(data)

    for name, data in host_files.items():
        cat = tool("nfs-cat", server.url(f"/vm/ext/{name}")).stdout
        assert hashlib.sha256(cat).digest() == hashlib.sha256(data).digest(), name
        back = tmp_path / f"back-{name}"
        tool("nfs-cp", server.url(f"/vm/ext/{name}"), str(back))
        assert back.read_bytes() == data, name

    # What libnfs wrote is what our own client and the server's store see.
    with server.nfs_client() as nfs:
        ext = nfs.walk(root, "ext")
        big = nfs.walk(ext, "random-5m.bin")
        attrs = nfs.getattr(big).obj_attributes
        assert attrs.size == 5 * MiB
        assert nfs.read_all(big, chunk=MiB) == host_files["random-5m.bin"]


def test_libnfs_reads_what_our_client_wrote(
    prism_module_server: PrismProcess, tmp_path: Path
) -> None:
    server = prism_module_server
    root = server.mount("/vm")
    data = os.urandom(1_234_567)
    with server.nfs_client() as nfs:
        d = nfs.mkdir(root, "ours").obj
        f = nfs.create(d, "blob").obj
        nfs.write_all(f, data, chunk=MiB)
        assert nfs.symlink(d, "ln", b"blob").ok
    assert tool("nfs-cat", server.url("/vm/ours/blob")).stdout == data
    listing = ls(server, "/vm/ours")
    assert listing["blob"] == ("-rw-r--r--", len(data))
    assert listing["ln"][0].startswith("l")


def test_libnfs_sees_snapshots_read_only_and_bindings(
    prism_module_server: PrismProcess, tmp_path: Path
) -> None:
    server = prism_module_server
    local = tmp_path / "x.txt"
    local.write_bytes(b"snapshot me\n")
    tool("nfs-cp", str(local), server.url("/vm/snapme.txt"))
    server.cli("snapshot", "create", "vm", "ext-snap")
    server.cli("vm", "create", "elsewhere", "--client", "10.77.0.0/16")

    assert tool("nfs-cat", server.url("/vm@ext-snap/snapme.txt")).stdout == b"snapshot me\n"
    refused = tool("nfs-cp", str(local), server.url("/vm@ext-snap/new.txt"), check=False)
    assert refused.returncode != 0
    assert b"NFS3ERR_ROFS" in refused.stderr
    assert "new.txt" not in ls(server, "/vm@ext-snap")

    denied = tool("nfs-ls", server.url("/elsewhere"), check=False)
    assert denied.returncode != 0
    assert b"MNT3ERR_ACCES" in denied.stderr
    missing = tool("nfs-cat", server.url("/vm/no-such-file"), check=False)
    assert missing.returncode != 0
    assert NfsStat3.NFS3ERR_NOENT.name.encode() in missing.stderr
