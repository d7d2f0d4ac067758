"""Shares through an NFS client while `prism serve` runs: `prism share SRC:/path DST:/path
[--rw]` makes a live view of one VM's subtree appear inside another, and `prism unshare`
removes it, both without a remount.

Checked through NFS: the share's tree is the source's, read-only unless --rw, live in both
directions, with uid/gid permissions still enforced; '..' of the share root is the
destination's mount-point parent; RENAME across the share's edge is XDEV; the mount point
cannot be removed; fileids inside the share are distinct from the destination's own; and
after unshare the path is gone and handles into the share are STALE. The command line's
bad inputs each exit non-zero with one line and change nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prism import cli
from prism.nfs.client import NfsClient
from prism.nfs.const import NfsStat3
from prism.nfs.wire import NfsFh3, Sattr3
from prism.store.types import FileType
from tests.op_helpers import (
    PrismServe,
    nfs_get,
    nfs_mkdirs,
    nfs_put,
    nfs_tree,
    prism,
    prism_json,
    run_prism,
)

OWNER, STRANGER = 1000, 2000
PUB = {
    "a.txt": b"alpha\n",
    "sub/b.txt": b"beta\n" * 1000,
}


class Mounts:
    """NFS clients of the server's VMs, from loopback, by (export, uid)."""

    def __init__(self, server: PrismServe) -> None:
        self.server = server
        self.open: dict[tuple[str, int], tuple[NfsClient, NfsFh3]] = {}

    def __call__(self, vm: str, uid: int = 0) -> tuple[NfsClient, NfsFh3]:
        if (vm, uid) not in self.open:
            self.open[(vm, uid)] = self.server.mount("/" + vm, uid=uid, gid=uid)
        return self.open[(vm, uid)]

    def close(self) -> None:
        for c, _ in self.open.values():
            c.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServe]:
    data = tmp_path_factory.mktemp("share") / "data"
    for vm in ("src", "dst", "other"):
        prism(data, "vm", "create", vm)
    with PrismServe(data) as srv:
        yield srv


@pytest.fixture
def mounts(server: PrismServe) -> Iterator[Mounts]:
    m = Mounts(server)
    try:
        yield m
    finally:
        m.close()


def fill_source(c: NfsClient, root: NfsFh3, top: str) -> None:
    """`top` in the source VM: PUB's files, plus `secret` (mode 0600, uid/gid 1000)."""
    nfs_mkdirs(c, root, top + "/sub")
    for path, content in PUB.items():
        nfs_put(c, root, f"{top}/{path}", content)
    secret = nfs_put(c, root, f"{top}/secret", b"owner only\n")
    assert c.setattr(secret, Sattr3(mode=0o600, uid=OWNER, gid=OWNER)).ok
    assert c.setattr(c.walk(root, top), Sattr3(mode=0o777)).ok  # anyone may create here


def attrs(c: NfsClient, fh: NfsFh3) -> Any:
    res = c.getattr(fh)
    assert res.ok and res.obj_attributes is not None, res.status
    return res.obj_attributes


def fileids(c: NfsClient, root: NfsFh3) -> set[int]:
    """Every fileid reachable below `root` (itself included), via READDIRPLUS."""
    out = {attrs(c, root).fileid}
    stack = [root]
    while stack:
        for e in c.listdir(stack.pop()):
            if e.name in (b".", b".."):
                continue
            out.add(e.fileid)
            assert e.name_attributes is not None and e.name_handle is not None
            assert e.name_attributes.fileid == e.fileid
            if e.name_attributes.type == FileType.DIR:
                stack.append(e.name_handle)
    return out


def vm_state(data: Path) -> Any:
    """`prism vm show --json` of the share tests' VMs, run in this process (fast)."""
    out = {}
    for vm in ("src", "dst", "other"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert cli.main(["vm", "show", vm, "--data", str(data), "--json"]) == 0
        out[vm] = json.loads(buf.getvalue())
    return out


def shares(data: Path, vm: str) -> list[dict[str, Any]]:
    return list(prism_json(data, "vm", "show", vm)["shares"])


def test_read_only_share_is_live_and_keeps_permissions(server: PrismServe, mounts: Mounts) -> None:
    data = server.data
    s, sroot = mounts("src")
    d, droot = mounts("dst")
    fill_source(s, sroot, "pub")
    mnt = nfs_mkdirs(d, droot, "mnt")
    nfs_put(d, droot, "mnt/own.txt", b"dst's own\n")
    own_ids = fileids(d, droot)

    out = prism(data, "share", "src:/pub", "dst:/mnt/pub")
    assert out.strip() == "shared src:/pub into dst:/mnt/pub (read-only, live)"
    assert shares(data, "dst") == [{"path": "/mnt/pub", "source": "src:/pub", "rw": False}]
    assert shares(data, "src") == []

    # the mount point appeared under the mounted client, with the source's tree
    pub = d.walk(droot, "mnt/pub")
    expected = {"sub": "<dir>", "a.txt": PUB["a.txt"], "sub/b.txt": PUB["sub/b.txt"]}
    want = {**expected, "secret": b"owner only\n"}
    assert nfs_tree(d, pub) == want  # root may read everything
    assert attrs(d, pub).type == FileType.DIR
    assert b"pub" in {e.name for e in d.listdir(mnt)}

    # READDIRPLUS of the share: the source's entries, with handles that work
    listed = {e.name: e for e in d.listdir(pub)}
    assert set(listed) == {b".", b"..", b"a.txt", b"sub", b"secret"}
    a = listed[b"a.txt"]
    assert a.name_handle is not None and d.read_all(a.name_handle) == PUB["a.txt"]
    sub = listed[b"sub"].name_handle
    assert sub is not None and nfs_get(d, sub, "b.txt") == PUB["sub/b.txt"]

    # read-only by default: every change through the share is ROFS
    a_fh = d.walk(pub, "a.txt")
    assert d.write(a_fh, 0, b"X").status == NfsStat3.NFS3ERR_ROFS
    assert d.setattr(a_fh, Sattr3(size=0)).status == NfsStat3.NFS3ERR_ROFS
    assert d.create(pub, "new").status == NfsStat3.NFS3ERR_ROFS
    assert d.mkdir(pub, "d").status == NfsStat3.NFS3ERR_ROFS
    assert d.remove(pub, "a.txt").status == NfsStat3.NFS3ERR_ROFS
    assert d.rename(pub, "a.txt", pub, "c.txt").status == NfsStat3.NFS3ERR_ROFS
    assert d.rename(pub, "a.txt", mnt, "stolen").status in (
        NfsStat3.NFS3ERR_ROFS,
        NfsStat3.NFS3ERR_XDEV,
    )
    assert nfs_tree(s, s.walk(sroot, "pub")) == want  # the source is untouched

    # live: a change made in src shows through dst at once
    nfs_put(s, sroot, "pub/a.txt", b"alpha, changed in src\n")
    nfs_put(s, sroot, "pub/sub/added", b"new in src\n")
    assert d.read_all(a_fh) == b"alpha, changed in src\n"
    assert nfs_get(d, pub, "sub/added") == b"new in src\n"
    assert s.remove(s.walk(sroot, "pub/sub"), "added").ok
    assert d.lookup(sub, "added").status == NfsStat3.NFS3ERR_NOENT

    # uid/gid permissions are enforced through the share
    stranger, stranger_root = mounts("dst", STRANGER)
    owner, owner_root = mounts("dst", OWNER)
    secret_as_stranger = stranger.walk(stranger_root, "mnt/pub/secret")
    assert stranger.read(secret_as_stranger, 0, 100).status == NfsStat3.NFS3ERR_ACCES
    assert nfs_get(stranger, stranger_root, "mnt/pub/a.txt") == b"alpha, changed in src\n"
    assert nfs_get(owner, owner_root, "mnt/pub/secret") == b"owner only\n"

    # '..' of the share root is the destination's mount-point parent, not the source's
    dotdot = d.lookup(pub, "..")
    assert dotdot.ok and dotdot.object is not None
    assert dotdot.object == mnt
    assert attrs(d, dotdot.object).fileid == attrs(d, mnt).fileid
    assert attrs(d, dotdot.object).fileid != attrs(s, sroot).fileid
    assert d.lookup(sub, "..").object == pub  # inside the share, '..' stays in it

    # the mount point cannot be removed (nor replaced) from the destination
    assert not d.rmdir(mnt, "pub").ok
    assert not d.remove(mnt, "pub").ok
    assert not d.rename(mnt, "own.txt", mnt, "pub").ok
    assert not d.rename(mnt, "pub", mnt, "moved").ok
    assert nfs_get(d, pub, "a.txt") == b"alpha, changed in src\n"

    # fileids inside the share are distinct from dst's own (both VMs number from 1)
    share_ids = fileids(d, pub)
    assert len(share_ids) == 5  # pub, a.txt, sub, sub/b.txt, secret
    assert share_ids.isdisjoint(own_ids), share_ids & own_ids
    assert fileids(d, droot) == own_ids | share_ids

    # unshare: the path disappears and old handles into the share go STALE
    out = prism(data, "unshare", "dst:/mnt/pub")
    assert out.strip() == "removed the share at dst:/mnt/pub"
    assert shares(data, "dst") == []
    assert d.lookup(mnt, "pub").status == NfsStat3.NFS3ERR_NOENT
    assert {e.name for e in d.listdir(mnt)} == {b".", b"..", b"own.txt"}
    for fh in (pub, a_fh, sub):
        assert d.getattr(fh).status == NfsStat3.NFS3ERR_STALE
    assert d.read(a_fh, 0, 10).status == NfsStat3.NFS3ERR_STALE
    assert stranger.getattr(secret_as_stranger).status == NfsStat3.NFS3ERR_STALE
    assert nfs_get(s, sroot, "pub/a.txt") == b"alpha, changed in src\n"  # source unchanged
    assert prism_json(data, "fsck")["clean"] is True


def test_rw_share_into_an_empty_directory(server: PrismServe, mounts: Mounts) -> None:
    data = server.data
    s, sroot = mounts("src")
    d, droot = mounts("dst")
    fill_source(s, sroot, "rwpub")
    empty = nfs_mkdirs(d, droot, "data/rw")
    nfs_mkdirs(d, droot, "data/full/x")
    nfs_put(d, droot, "data/local.txt", b"dst local\n")
    dst_data = d.walk(droot, "data")

    # a non-empty existing directory is refused with one line, and nothing changes
    before = (prism_json(data, "vm", "show", "dst"), nfs_tree(d, droot))
    proc = run_prism(data, "share", "src:/rwpub", "dst:/data/full", "--rw")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "not an empty directory" in proc.stderr
    assert (prism_json(data, "vm", "show", "dst"), nfs_tree(d, droot)) == before

    out = prism(data, "share", "src:/rwpub", "dst:/data/rw", "--rw")
    assert out.strip() == "shared src:/rwpub into dst:/data/rw (read-write, live)"
    assert shares(data, "dst") == [{"path": "/data/rw", "source": "src:/rwpub", "rw": True}]
    assert d.getattr(empty).status == NfsStat3.NFS3ERR_STALE  # the empty dir was replaced
    rw = d.walk(droot, "data/rw")
    assert nfs_tree(d, rw) == {
        "sub": "<dir>",
        "a.txt": PUB["a.txt"],
        "sub/b.txt": PUB["sub/b.txt"],
        "secret": b"owner only\n",
    }

    # writes through dst show in src at once, and the other way round
    src_before = int(prism_json(data, "vm", "show", "src")["logical_bytes"])
    dst_before = int(prism_json(data, "vm", "show", "dst")["logical_bytes"])
    nfs_put(d, rw, "from-dst", b"written through the share\n" * 10)
    assert nfs_get(s, sroot, "rwpub/from-dst") == b"written through the share\n" * 10
    nfs_put(s, sroot, "rwpub/a.txt", b"rewritten in src\n")
    assert nfs_get(d, rw, "a.txt") == b"rewritten in src\n"
    assert d.mkdir(rw, "made-in-dst", Sattr3(mode=0o755)).ok
    assert s.lookup(s.walk(sroot, "rwpub"), "made-in-dst").ok
    assert s.remove(s.walk(sroot, "rwpub"), "from-dst").ok
    assert d.lookup(rw, "from-dst").status == NfsStat3.NFS3ERR_NOENT
    # the bytes belong to the source VM, not the destination
    src_after = int(prism_json(data, "vm", "show", "src")["logical_bytes"])
    dst_after = int(prism_json(data, "vm", "show", "dst")["logical_bytes"])
    assert dst_after == dst_before
    assert src_after == src_before - len(PUB["a.txt"]) + len(b"rewritten in src\n")

    # permissions still hold in a rw share
    stranger, stranger_root = mounts("dst", STRANGER)
    owner, owner_root = mounts("dst", OWNER)
    secret_s = stranger.walk(stranger_root, "data/rw/secret")
    assert stranger.read(secret_s, 0, 100).status == NfsStat3.NFS3ERR_ACCES
    assert stranger.write(secret_s, 0, b"X").status == NfsStat3.NFS3ERR_ACCES
    secret_o = owner.walk(owner_root, "data/rw/secret")
    assert owner.write(secret_o, 0, b"OWNER").ok
    assert nfs_get(s, sroot, "rwpub/secret") == b"OWNER only\n"
    assert stranger.create(stranger.walk(stranger_root, "data/rw/sub"), "x").status in (
        NfsStat3.NFS3ERR_ACCES,
        NfsStat3.NFS3ERR_PERM,
    )  # sub is root's 0755

    # RENAME (and LINK) across the share's edge is XDEV, both ways; inside it is fine
    a_fh = d.walk(rw, "a.txt")
    assert d.rename(rw, "a.txt", dst_data, "taken").status == NfsStat3.NFS3ERR_XDEV
    assert d.rename(dst_data, "local.txt", rw, "given").status == NfsStat3.NFS3ERR_XDEV
    assert d.link(a_fh, dst_data, "hard").status == NfsStat3.NFS3ERR_XDEV
    assert d.rename(rw, "a.txt", d.walk(rw, "sub"), "a.txt").ok
    assert nfs_get(s, sroot, "rwpub/sub/a.txt") == b"rewritten in src\n"
    # the mount point is still not removable, even read-write
    assert not d.rmdir(dst_data, "rw").ok
    assert d.lookup(dst_data, "rw").ok

    assert d.lookup(rw, "..").object == dst_data
    prism(data, "unshare", "dst:/data/rw")
    assert d.lookup(dst_data, "rw").status == NfsStat3.NFS3ERR_NOENT
    assert d.getattr(a_fh).status == NfsStat3.NFS3ERR_STALE
    assert d.write(a_fh, 0, b"late").status == NfsStat3.NFS3ERR_STALE
    assert nfs_get(s, sroot, "rwpub/sub/a.txt") == b"rewritten in src\n"
    # the mount point can be used again as an ordinary directory
    assert d.mkdir(dst_data, "rw", Sattr3(mode=0o755)).ok
    assert prism_json(data, "fsck")["clean"] is True


def test_old_handles_stay_stale_when_the_share_slot_is_reused(
    server: PrismServe, mounts: Mounts
) -> None:
    """A handle into a removed share must not come back to life, naming another VM's
    object, when a later share is given the same volumes."""
    data = server.data
    for vm in ("ra", "rb", "rdst"):  # fresh VMs: the same steps give the same inodes
        prism(data, "vm", "create", vm)
    a, aroot = mounts("ra")
    b, broot = mounts("rb")
    d, droot = mounts("rdst")
    nfs_mkdirs(a, aroot, "dir")
    nfs_put(a, aroot, "dir/file", b"from ra\n")
    nfs_mkdirs(b, broot, "dir")
    nfs_put(b, broot, "dir/file", b"from rb\n")
    prism(data, "share", "ra:/dir", "rdst:/one")
    old = d.walk(droot, "one/file")
    old_id = attrs(d, old).fileid
    assert d.read_all(old) == b"from ra\n"
    prism(data, "unshare", "rdst:/one")
    assert d.getattr(old).status == NfsStat3.NFS3ERR_STALE
    prism(data, "share", "rb:/dir", "rdst:/two")
    new = d.walk(droot, "two/file")
    assert d.read_all(new) == b"from rb\n"
    assert attrs(d, new).fileid != old_id  # a fresh slot: the old identity stays dead
    assert d.getattr(old).status == NfsStat3.NFS3ERR_STALE
    assert d.read(old, 0, 100).status == NfsStat3.NFS3ERR_STALE


# -- bad input ----------------------------------------------------------------------------

BAD_SHARES = [
    # (case id, argv, text the one line must contain)
    ("unknown-src-vm", ["share", "nope:/pub", "dst:/x"], "no VM named 'nope'"),
    ("unknown-dst-vm", ["share", "src:/", "nope:/x"], "no VM named 'nope'"),
    (
        "missing-source-path",
        ["share", "src:/no/such", "dst:/x"],
        "src:/no/such does not exist; share a",
    ),
    ("missing-dest-parent", ["share", "src:/", "dst:/no/such/x"], "parent directory exists in dst"),
    ("relative-source", ["share", "src:pub", "dst:/x"], "use VM:/path"),
    ("relative-dest", ["share", "src:/", "dst:x"], "use VM:/path"),
    ("dotdot-source", ["share", "src:/a/../..", "dst:/x"], "drop the '..'"),
    ("dotdot-dest", ["share", "src:/", "dst:/../x"], "drop the '..'"),
    ("dotdot-inner", ["share", "src:/a/..", "dst:/x"], "drop the '..'"),
    ("into-itself", ["share", "src:/", "src:/x"], "cannot share into itself"),
    ("dest-root", ["share", "src:/", "dst:/"], "cannot be '/'"),
    ("source-is-file", ["share", "src:/file", "dst:/x"], "is not a directory"),
    ("snapshot-source", ["share", "src@s:/", "dst:/x"], "use VM:/path"),
    ("unknown-share", ["unshare", "dst:/nothing"], "see `prism vm show dst`"),
    ("unshare-relative", ["unshare", "dst:x"], "use VM:/path"),
    ("unshare-unknown-vm", ["unshare", "nope:/x"], "no VM named 'nope'"),
]


@pytest.mark.parametrize(
    ("argv", "hint"), [c[1:] for c in BAD_SHARES], ids=[c[0] for c in BAD_SHARES]
)
def test_bad_share_input_is_refused_with_one_line(
    server: PrismServe, mounts: Mounts, argv: list[str], hint: str
) -> None:
    data = server.data
    s, sroot = mounts("src")
    if s.lookup(sroot, "file").status == NfsStat3.NFS3ERR_NOENT:
        nfs_put(s, sroot, "file", b"a file\n")
    before = vm_state(data)
    proc = run_prism(data, *argv)
    assert proc.returncode != 0 and proc.stdout == ""
    err = proc.stderr
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert err.startswith("prism: error: ") and hint in err, err
    assert vm_state(data) == before
