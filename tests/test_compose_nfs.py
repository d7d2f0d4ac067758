"""Composition through a running server: build base, web and db VMs, compose web2 from parts
of them with `prism-clone` while `prism serve` runs, and check through an NFS client that
web2 has the expected tree and that a write in any of the four VMs stays in that VM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.nfs.client import NfsClient
from prism.nfs.const import NfsStat3
from prism.nfs.wire import NfsFh3
from tests.op_helpers import (
    PrismServe,
    nfs_get,
    nfs_mkdirs,
    nfs_put,
    nfs_tree,
    ok,
    prism,
    prism_json,
    run_clone,
)

BIG = os.urandom(300_000)  # spans three 128 KiB chunks

BASE = {
    "etc/hostname": b"base\n",
    "etc/nginx/nginx.conf": b"# base's nginx, hidden in web2\n",
    "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
    "bin/tool": BIG,
    "srv/readme": b"base srv\n",
}
WEB = {
    "etc/nginx/nginx.conf": b"worker_processes 4;\n",
    "etc/nginx/sites/default": b"server { listen 80; }\n",
    "var/www/index.html": b"<h1>web</h1>\n",
}
DB = {
    "srv/data/table.db": b"rows" * 1000,
    "srv/data/wal/000001": b"wal",
    "etc/db.conf": b"db only\n",
}


class Vms:
    """One NFS client per VM export, all from loopback (the VMs' only client)."""

    def __init__(self, server: PrismServe) -> None:
        self.server = server
        self.mounts: dict[str, tuple[NfsClient, NfsFh3]] = {}

    def __getitem__(self, vm: str) -> tuple[NfsClient, NfsFh3]:
        if vm not in self.mounts:
            self.mounts[vm] = self.server.mount("/" + vm)
        return self.mounts[vm]

    def put(self, vm: str, path: str, data: bytes) -> None:
        c, root = self[vm]
        nfs_mkdirs(c, root, path.rpartition("/")[0])
        nfs_put(c, root, path, data)

    def get(self, vm: str, path: str) -> bytes:
        c, root = self[vm]
        return nfs_get(c, root, path)

    def tree(self, vm: str) -> dict[str, object]:
        c, root = self[vm]
        return nfs_tree(c, root)

    def close(self) -> None:
        for c, _ in self.mounts.values():
            c.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Vms]]:
    data = tmp_path / "data"
    for vm in ("base", "web", "db"):
        prism(data, "vm", "create", vm)
    with PrismServe(data) as server:
        vms = Vms(server)
        try:
            for vm, files in (("base", BASE), ("web", WEB), ("db", DB)):
                for path, content in files.items():
                    vms.put(vm, path, content)
            yield data, vms
        finally:
            vms.close()


def expected_web2() -> dict[str, object]:
    """base, then web:/etc/nginx over base's /etc/nginx, then db:/srv/data at /data."""
    files = {p: c for p, c in BASE.items() if not p.startswith("etc/nginx/")}
    files |= {p: c for p, c in WEB.items() if p.startswith("etc/nginx/")}
    files |= {"data/" + p.removeprefix("srv/data/"): c for p, c in DB.items() if "data/" in p}
    tree: dict[str, object] = dict(files)
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            tree["/".join(parts[:i])] = "<dir>"
    return tree


def test_compose_from_three_vms_while_serving(served: tuple[Path, Vms]) -> None:
    data, vms = served
    before = {vm: vms.tree(vm) for vm in ("base", "web", "db")}
    out = ok(run_clone(data, "web2", "base", "web:/etc/nginx", "db:/srv/data=/data"))
    assert out.splitlines()[1:] == [
        "  base:/ -> /",
        "  web:/etc/nginx -> /etc/nginx",
        "  db:/srv/data -> /data",
    ]
    assert vms.tree("web2") == expected_web2()
    assert {vm: vms.tree(vm) for vm in ("base", "web", "db")} == before
    # df in web2 counts the composed tree at once: its objects, the root included
    c, root = vms["web2"]
    fs = c.fsstat(root)
    assert fs.tfiles - fs.ffiles == len(expected_web2()) + 1

    # A write in any of the four VMs stays in that VM: the same paths everywhere else
    # keep what they had.
    writes = {
        "web2": ["etc/nginx/nginx.conf", "data/table.db", "etc/hostname"],
        "web": ["etc/nginx/nginx.conf", "etc/nginx/sites/default"],
        "db": ["srv/data/table.db", "srv/data/wal/000001"],
        "base": ["etc/hostname", "bin/tool", "etc/nginx/nginx.conf"],
    }
    for vm, paths in writes.items():
        for path in paths:
            snapshot = {other: vms.tree(other) for other in writes if other != vm}
            vms.put(vm, path, f"written in {vm}".encode())
            vms.put(vm, path + ".new", b"new in " + vm.encode())
            assert vms.get(vm, path) == f"written in {vm}".encode()
            assert {other: vms.tree(other) for other in writes if other != vm} == snapshot, (
                f"a write to {vm}:{path} leaked"
            )
    # and removals stay too
    c, root = vms["web2"]
    assert c.remove(c.walk(root, "data"), "table.db").ok
    assert vms.get("db", "srv/data/table.db") == b"written in db"
    assert c.lookup(c.walk(root, "data"), "table.db").status == NfsStat3.NFS3ERR_NOENT

    # --into adds to web2 while it is mounted: visible from its root without a remount
    web_tree = vms.tree("web")
    out = ok(run_clone(data, "web2", "web:/var/www=/srv/www", "--into"))
    assert out.splitlines()[0].startswith("added to VM web2 (export /web2)")
    assert vms.get("web2", "srv/www/index.html") == WEB["var/www/index.html"]
    assert vms.get("web2", "srv/readme") == BASE["srv/readme"]  # base's /srv kept
    vms.put("web2", "srv/www/index.html", b"web2's own page")
    assert vms.tree("web") == web_tree
    assert prism_json(data, "fsck")["clean"] is True
