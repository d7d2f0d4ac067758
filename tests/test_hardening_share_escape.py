"""Issue #10 item 5: a share's view never leads above the share's root.

`prism share src:/pub dst:/mnt [--rw]`, then a dst client keeps handles of `/mnt/work` (a
directory) and `/mnt/file` while src moves them to `/private`. dst must reach nothing of
src outside the share through them: no LOOKUP of '..' from the moved directory into src's
`/private`, so no reading or overwriting src's private files and no creating files in
src's root (and with a read-only share, no reading the rest of src). Every handle of an
object that is no longer below the share's root is STALE for every procedure, '..' never
names anything of src outside the share, and the share root's '..' is dst's directory
holding the mount point. The same holds for an object the source only ever had outside the
share except for a hard link it then removed. An object moved back into the share is
reachable again: the rule is where an object is, not what it once was. MNT of a path
climbing out of the share with '..' lands in dst.

In the store: a grafted (composed) subtree of the source moved out, a file whose shared
hard link src replaces by a rename, and a file record from before holders were recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from prism.errors import Stale
from prism.nfs.client import MountClient, NfsClient
from prism.nfs.const import NfsStat3
from prism.nfs.wire import NfsFh3, Sattr3
from prism.store import CloneSource, ObjectId, Store
from prism.store import records as R
from prism.store.schema import DB_NAMES
from prism.store.sealed import open_value, seal
from tests.op_helpers import PrismServe, nfs_get, nfs_mkdirs, nfs_put, nfs_tree, prism, prism_json

PRIVATE = b"src's private data\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServe]:
    data = tmp_path_factory.mktemp("share-escape") / "data"
    for vm in ("src-rw", "dst-rw", "src-ro", "dst-ro"):
        prism(data, "vm", "create", vm)
    with PrismServe(data) as srv:
        yield srv


def stale_everywhere(c: NfsClient, fh: NfsFh3, *, is_dir: bool) -> dict[str, NfsStat3]:
    """The status of every procedure on `fh` that did not come back STALE (FSSTAT, PATHCONF
    and COMMIT say nothing about the object and are left out)."""
    denied = (NfsStat3.NFS3ERR_STALE,)
    calls: dict[str, Any] = {
        "getattr": lambda: c.getattr(fh),
        "setattr": lambda: c.setattr(fh, Sattr3(mode=0o777)),
        "access": lambda: c.access(fh),
    }
    if is_dir:
        calls |= {
            "lookup ..": lambda: c.lookup(fh, ".."),
            "lookup .": lambda: c.lookup(fh, "."),
            "lookup inner": lambda: c.lookup(fh, "inner.txt"),
            "readdir": lambda: c.readdir(fh),
            "readdirplus": lambda: c.readdirplus(fh),
            "create": lambda: c.create(fh, "planted"),
            "mkdir": lambda: c.mkdir(fh, "planted-dir"),
            "symlink": lambda: c.symlink(fh, "planted-link", "/"),
            "remove": lambda: c.remove(fh, "inner.txt"),
            "rename": lambda: c.rename(fh, "inner.txt", fh, "renamed.txt"),
        }
    else:
        calls |= {
            "read": lambda: c.read(fh, 0, 100),
            "write": lambda: c.write(fh, 0, b"OVERWRITTEN"),
        }
    out = {}
    for name, call in calls.items():
        status = call().status
        if status not in denied:
            out[name] = status
    return out


@pytest.mark.parametrize("rw", [True, False], ids=["rw", "ro"])
def test_objects_moved_out_of_a_share_are_unreachable(server: PrismServe, rw: bool) -> None:
    tag = "rw" if rw else "ro"
    src, dst = f"src-{tag}", f"dst-{tag}"
    s, sroot = server.mount("/" + src)
    d, droot = server.mount("/" + dst)
    with s, d:
        nfs_mkdirs(s, sroot, "pub/work/deeper")
        nfs_mkdirs(s, sroot, "private")
        nfs_put(s, sroot, "pub/work/inner.txt", b"work\n")
        nfs_put(s, sroot, "pub/file", b"file\n")
        nfs_put(s, sroot, "private/secret", PRIVATE)
        nfs_put(s, sroot, "private/linked", PRIVATE)
        assert s.link(s.walk(sroot, "private/linked"), s.walk(sroot, "pub"), "link").ok
        prism(server.data, "share", f"{src}:/pub", f"{dst}:/mnt", *(["--rw"] if rw else []))

        mnt = d.walk(droot, "mnt")
        work = d.walk(mnt, "work")
        deeper = d.walk(mnt, "work/deeper")
        file = d.walk(mnt, "file")
        link = d.walk(mnt, "link")
        assert d.read_all(link) == PRIVATE  # src shared it on purpose, by a hard link
        assert d.lookup(deeper, "..").object == work
        # the share root's '..' is dst's directory that holds the mount point
        assert d.lookup(mnt, "..").object == droot
        dotdot = [e for e in d.listdir(mnt) if e.name == b".."]
        assert dotdot and dotdot[0].fileid == d.getattr(droot).obj_attributes.fileid
        with MountClient("127.0.0.1", server.mount_port) as m:  # a mount path with '..'
            assert m.mnt(f"/{dst}/mnt/..")[0] == droot
            assert m.mnt(f"/{dst}/mnt/work/../..")[0] == droot

        # src moves things out of the shared directory, and drops its shared link
        spub, sprivate = s.walk(sroot, "pub"), s.walk(sroot, "private")
        assert s.rename(spub, "work", sprivate, "work").ok
        assert s.rename(spub, "file", sprivate, "file").ok
        assert s.remove(spub, "link").ok

        for name, fh, is_dir in (
            ("work", work, True),
            ("work/deeper", deeper, True),
            ("file", file, False),
            ("link", link, False),
        ):
            assert stale_everywhere(d, fh, is_dir=is_dir) == {}, name

        # nothing of src leaked or changed: its private tree is as src left it
        assert nfs_tree(s, sprivate) == {
            "secret": PRIVATE,
            "linked": PRIVATE,
            "work": "<dir>",
            "work/deeper": "<dir>",
            "work/inner.txt": b"work\n",
            "file": b"file\n",
        }
        assert {e.name for e in s.listdir(sroot)} == {b".", b"..", b"pub", b"private"}
        # what is still shared works, and dst's own tree is intact
        assert d.getattr(mnt).ok and nfs_tree(d, mnt) == {}
        assert d.lookup(mnt, "..").object == droot

        # moved back in: reachable again through the very same handles
        assert s.rename(sprivate, "work", spub, "work").ok
        assert nfs_get(d, work, "inner.txt") == b"work\n"
        assert d.lookup(deeper, "..").object == work
        assert prism_json(server.data, "fsck")["clean"] is True


# -- the same rule in the store, for the paths the NFS test does not take ------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "data") as s:
        yield s


def at(s: Store, ns: str, path: str) -> ObjectId:
    return s.resolve(s.namespace(ns).id, path).oid


def test_grafted_subtree_moved_out_of_a_share(store: Store) -> None:
    """A source composed of another VM's subtree (its own volume 1) that moves it out."""
    s = store
    base = s.create_namespace("base").root
    s.mkdir(s.mkdir(base, b"tree").oid, b"inner")
    s.create_namespace("src")
    s.mkdir(s.namespace("src").root, b"pub")
    s.mkdir(s.namespace("src").root, b"private")
    s.clone("src", [CloneSource("base", path="/tree", dest="/pub/tree")], into=True)
    s.create_namespace("dst")
    s.share("src", "/pub", "dst", "/mnt", rw=True)
    inner = at(s, "dst", "/mnt/tree/inner")
    assert inner.vol > 0x8000 + 0  # a share volume of the grafted one
    assert s.lookup(inner, b"..").oid == at(s, "dst", "/mnt/tree")
    s.rename(at(s, "src", "/pub"), b"tree", at(s, "src", "/private"), b"tree")
    for call in (lambda: s.getattr(inner), lambda: s.lookup(inner, b"..")):
        with pytest.raises(Stale):
            call()
    with pytest.raises(Stale):
        s.mkdir(inner, b"planted")
    # '..' through a mount path stays inside dst as well
    assert s.resolve(s.namespace("dst").id, "/mnt/..").oid == s.namespace("dst").root


def test_file_replaced_by_a_rename_loses_the_share(store: Store) -> None:
    """A private file hard-linked into the share is shared; once src renames another file
    over that link, the file lives only in /private and dst's handle is STALE."""
    s = store
    s.create_namespace("src")
    root = s.namespace("src").root
    pub, private = s.mkdir(root, b"pub").oid, s.mkdir(root, b"private").oid
    f = s.create(private, b"f").oid
    s.write(f, 0, PRIVATE)
    s.link(f, pub, b"shared-f")
    other = s.create(private, b"other").oid
    s.create_namespace("dst")
    s.share("src", "/pub", "dst", "/mnt")
    seen = at(s, "dst", "/mnt/shared-f")
    assert s.read(seen, 0, 100)[0] == PRIVATE
    s.rename(private, b"other", pub, b"shared-f")
    with pytest.raises(Stale):
        s.read(seen, 0, 100)
    assert s.read(at(s, "dst", "/mnt/shared-f"), 0, 10)[0] == b""  # `other`, now shared
    assert s.read(f, 0, 100)[0] == PRIVATE and other != f


def test_files_from_before_holders_were_recorded(tmp_path: Path) -> None:
    """A file record written by an older Prism has no holder (parent fields 0): it stays
    visible through a share, and is judged by its holder once src renames it."""
    data = tmp_path / "data"
    with Store.open(data) as s:
        root = s.create_namespace("src").root
        pub, private = s.mkdir(root, b"pub").oid, s.mkdir(root, b"private").oid
        f = s.create(pub, b"old").oid
        s.write(f, 0, PRIVATE)
    env = lmdb.open(str(data / "meta"), max_dbs=16)
    with env.begin(write=True) as t:  # as an older Prism wrote it
        ns, inodes = env.open_db(b"ns", txn=t), env.open_db(b"inodes", txn=t)
        ns_key, ns_index = R.U32.pack(root.ns), DB_NAMES.index("ns")
        top = json.loads(open_value(ns_index, ns_key, t.get(ns_key, db=ns)))["top"]
        key, index = R.inode_key(top, 0, f.ino), DB_NAMES.index("inodes")
        node = R.Inode.unpack(open_value(index, key, t.get(key, db=inodes)))
        node.parent_vol, node.parent_ino = 0, R.HOLDER_UNRECORDED
        t.put(key, seal(index, key, node.pack()), db=inodes)
    env.close()
    with Store.open(data) as s:
        s.create_namespace("dst")
        s.share("src", "/pub", "dst", "/mnt")
        seen = at(s, "dst", "/mnt/old")
        assert s.read(seen, 0, 100)[0] == PRIVATE
        s.rename(pub, b"old", private, b"old")
        with pytest.raises(Stale):
            s.read(seen, 0, 100)
