"""Unit tests of the store API (`prism.store.api`): objects, namespaces, dedup, batches."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import time
from pathlib import Path

import pytest

from prism.errors import (
    CrossDevice,
    Exists,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSync,
    PermissionDenied,
    QuotaExceeded,
    ReadOnly,
    Stale,
    StoreError,
)
from prism.store import (
    CHUNK_SIZE,
    CloneSource,
    Cred,
    FileType,
    ObjectId,
    SetAttr,
    Store,
    Usage,
    txn,
)
from prism.store.gc import gc
from prism.store.types import (
    ACCESS_DELETE,
    ACCESS_EXECUTE,
    ACCESS_EXTEND,
    ACCESS_LOOKUP,
    ACCESS_MODIFY,
    ACCESS_READ,
    NOW,
)

ALICE = Cred(1000, 1000)
BOB = Cred(1001, 1001)
CAROL = Cred(1002, 2000, (1000,))  # in alice's group
ALL_ACCESS = (
    ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE | ACCESS_EXECUTE
)


try:
    from prism.store import check
except ImportError:  # the checker is being written alongside; run without it meanwhile
    check = None  # type: ignore[assignment]


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "data")
    yield s
    s.close()
    if check is not None:  # every test must leave a store that fsck finds clean
        with Store.open(tmp_path / "data") as again:
            assert check.fsck(again).errors == []


def new_vm(store: Store, name: str = "vm", **kw) -> ObjectId:
    return store.root(store.create_namespace(name, **kw).id)


def pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def read_all(store: Store, oid: ObjectId) -> bytes:
    size = store.getattr(oid).size
    data, eof = store.read(oid, 0, size + 10)
    assert eof
    return data


def resolve(store: Store, root: ObjectId, path: str) -> ObjectId:
    return store.resolve(root.ns, path).oid


def listdir(store: Store, d: ObjectId) -> list[bytes]:
    names: list[bytes] = []
    cookie = 0
    while True:
        entries, eof = store.readdir(d, cookie, limit=50)
        names += [e.name for e in entries]
        if entries:
            cookie = entries[-1].cookie
        if eof:
            return sorted(names)


def write_file(store: Store, d: ObjectId, name: bytes, data: bytes) -> ObjectId:
    oid = store.create(d, name).oid
    store.write(oid, 0, data)
    return oid


# --- data: offsets, chunks, holes, truncate -------------------------------------------------


def test_write_read_odd_offsets_across_chunks(store: Store) -> None:
    root = new_vm(store)
    f = store.create(root, b"f").oid
    model = bytearray()
    rng = random.Random(7)
    for offset, size in [
        (0, 1),
        (CHUNK_SIZE - 3, 7),
        (2 * CHUNK_SIZE - 1, CHUNK_SIZE + 2),
        (5, 3 * CHUNK_SIZE + 11),
        (4 * CHUNK_SIZE + 17, 1),
        (CHUNK_SIZE, CHUNK_SIZE),
    ]:
        data = rng.randbytes(size)
        end = offset + size
        if len(model) < end:
            model.extend(bytes(end - len(model)))
        model[offset:end] = data
        attr = store.write(f, offset, data)
        assert attr.size == len(model)
    assert read_all(store, f) == bytes(model)
    for _ in range(50):
        offset = rng.randrange(0, len(model) + 10)
        count = rng.randrange(0, 2 * CHUNK_SIZE + 5)
        data, eof = store.read(f, offset, count)
        assert data == bytes(model[offset : offset + count])
        assert eof == (offset + count >= len(model))


def test_sparse_file_and_holes(store: Store) -> None:
    root = new_vm(store)
    f = store.create(root, b"sparse").oid
    far = 10 * CHUNK_SIZE + 123
    store.write(f, far, b"tail")
    assert store.getattr(f).size == far + 4
    data, eof = store.read(f, 0, far + 4)
    assert data == bytes(far) + b"tail" and eof
    # A zero write into existing data must read back as zeros (zeros become holes).
    store.write(f, 0, b"x" * CHUNK_SIZE)
    store.write(f, 0, bytes(CHUNK_SIZE))
    assert store.read(f, 0, CHUNK_SIZE)[0] == bytes(CHUNK_SIZE)
    stats = store.stats()
    assert stats.stored_bytes == 123 + 4  # only the (partial) tail chunk holds bytes


def test_zero_length_write_does_not_extend(store: Store) -> None:
    root = new_vm(store)
    f = write_file(store, root, b"f", b"abc")
    assert store.write(f, 1000, b"").size == 3
    assert store.getattr(f).size == 3


def test_truncate_down_and_up_never_resurrects_bytes(store: Store) -> None:
    root = new_vm(store)
    f = store.create(root, b"f").oid
    data = pattern(3 * CHUNK_SIZE + 500)
    store.write(f, 0, data)
    for shrink in (2 * CHUNK_SIZE + 100, CHUNK_SIZE, 77, 0):
        store.setattr(f, SetAttr(size=shrink))
        assert read_all(store, f) == data[:shrink]
        store.setattr(f, SetAttr(size=len(data)))
        assert read_all(store, f) == data[:shrink] + bytes(len(data) - shrink)
        store.write(f, 0, data)
    # Shrink then extend by writing beyond the old end of the cut chunk.
    store.setattr(f, SetAttr(size=10))
    store.write(f, CHUNK_SIZE - 1, b"Z")
    assert read_all(store, f) == data[:10] + bytes(CHUNK_SIZE - 11) + b"Z"


def test_truncate_in_clone_does_not_affect_source(store: Store) -> None:
    root = new_vm(store, "src")
    data = pattern(3 * CHUNK_SIZE)
    f = write_file(store, root, b"f", data)
    clone = store.root(store.clone("dst", [CloneSource("src")]).id)
    g = store.lookup(clone, b"f").oid
    store.setattr(g, SetAttr(size=100))
    store.setattr(g, SetAttr(size=len(data)))
    assert read_all(store, g) == data[:100] + bytes(len(data) - 100)
    assert read_all(store, f) == data


def _metadata_records(store: Store) -> int:
    db = store.ctx.db
    with txn.read(store.ctx) as t:
        return sum(sum(1 for _ in t.cursor(db=d)) for d in (db.inodes, db.dirents, db.cmap))


def test_removing_a_frozen_file_costs_the_same_whatever_its_size(store: Store) -> None:
    root = new_vm(store, "vm")
    sizes = {b"small": CHUNK_SIZE, b"large": 40 * CHUNK_SIZE + 5}
    for seed, (name, size) in enumerate(sizes.items()):
        write_file(store, root, name, pattern(size, seed=seed))
    store.snapshot("vm", "s")  # both files now live in a frozen layer
    store.setattr(root, SetAttr(mode=0o755))  # (the root's copy-up is not the remove's)
    written = {}
    for name in sizes:
        before = _metadata_records(store)
        store.remove(root, name)
        written[name] = _metadata_records(store) - before
    assert written[b"large"] == written[b"small"] == 2  # whiteouts: the entry, the inode
    snap = store.root(store.namespace("vm@s").id)
    assert read_all(store, store.lookup(snap, b"large").oid) == pattern(sizes[b"large"], seed=1)
    # a file rewritten in part after the freeze: the top's own chunk-map records go with it
    f = write_file(store, root, b"f", pattern(8 * CHUNK_SIZE, seed=7))
    store.snapshot("vm", "t")
    store.write(f, 3 * CHUNK_SIZE, b"new bytes")
    store.remove(root, b"f")
    assert listdir(store, root) == []
    assert store.usage("vm").logical_bytes == 0
    # once no snapshot keeps them, gc folds the layers and frees every chunk
    store.remove_snapshot("vm", "s")
    store.remove_snapshot("vm", "t")
    if check is not None:
        gc(store)
        assert store.stats().stored_bytes == 0
        assert check.fsck(store).errors == []
        with txn.read(store.ctx) as t:
            assert sum(1 for _ in t.cursor(db=store.ctx.db.cmap)) == 0


# --- directories ----------------------------------------------------------------------------


def test_mkdir_rmdir_notempty(store: Store) -> None:
    root = new_vm(store)
    assert store.getattr(root).nlink == 2
    d = store.mkdir(root, b"d").oid
    assert store.getattr(root).nlink == 3
    assert store.getattr(d).nlink == 2
    store.mkdir(d, b"sub")
    assert store.getattr(d).nlink == 3
    with pytest.raises(Exists):
        store.mkdir(root, b"d")
    with pytest.raises(NotEmpty):
        store.rmdir(root, b"d")
    store.create(root, b"plain")
    with pytest.raises(NotADirectory):
        store.rmdir(root, b"plain")
    with pytest.raises(IsADirectory):
        store.remove(root, b"d")
    store.rmdir(d, b"sub")
    store.rmdir(root, b"d")
    store.remove(root, b"plain")
    assert store.getattr(root).nlink == 2
    with pytest.raises(Stale):
        store.getattr(d)
    with pytest.raises(NotFound):
        store.lookup(root, b"d")
    assert store.lookup(root, b".").oid == root
    assert store.lookup(root, b"..").oid == root


def test_lookup_dotdot(store: Store) -> None:
    root = new_vm(store)
    a = store.mkdir(root, b"a").oid
    b = store.mkdir(a, b"b").oid
    assert store.lookup(b, b"..").oid == a
    assert store.lookup(a, b"..").oid == root
    c = store.mkdir(root, b"c").oid
    store.rename(a, b"b", c, b"b2")
    assert store.lookup(b, b"..").oid == c


def test_rename_files_and_dirs(store: Store) -> None:
    root = new_vm(store)
    a = store.mkdir(root, b"a").oid
    b = store.mkdir(root, b"b").oid
    f = write_file(store, a, b"f", b"data")
    store.rename(a, b"f", b, b"g")
    assert store.lookup(b, b"g").oid == f
    assert read_all(store, f) == b"data"
    with pytest.raises(NotFound):
        store.lookup(a, b"f")
    # directory across directories: parents' nlink follow
    d = store.mkdir(a, b"d").oid
    store.mkdir(d, b"inner")
    assert (store.getattr(a).nlink, store.getattr(b).nlink) == (3, 2)
    store.rename(a, b"d", b, b"d")
    assert (store.getattr(a).nlink, store.getattr(b).nlink) == (2, 3)
    assert store.getattr(d).nlink == 3
    assert store.lookup(store.lookup(d, b"inner").oid, b"..").oid == d
    assert store.lookup(d, b"..").oid == b
    # same-directory rename of a directory keeps nlink
    store.rename(b, b"d", b, b"d2")
    assert store.getattr(b).nlink == 3
    assert listdir(store, b) == [b"d2", b"g"]


def test_rename_replaces_target(store: Store) -> None:
    root = new_vm(store)
    f = write_file(store, root, b"f", b"new")
    old = write_file(store, root, b"old", b"old")
    store.rename(root, b"f", root, b"old")
    assert store.lookup(root, b"old").oid == f
    assert read_all(store, f) == b"new"
    with pytest.raises(Stale):
        store.getattr(old)
    # replacing a file whose other link survives only drops its nlink
    keep = write_file(store, root, b"keep", b"k")
    store.link(keep, root, b"alias")
    store.rename(root, b"old", root, b"alias")
    assert store.getattr(keep).nlink == 1
    assert read_all(store, keep) == b"k"
    # a directory replaces an empty directory, not a non-empty one or a file
    d1 = store.mkdir(root, b"d1").oid
    store.mkdir(root, b"d2")
    store.mkdir(root, b"d3")
    store.create(store.lookup(root, b"d3").oid, b"x")
    with pytest.raises(NotEmpty):
        store.rename(root, b"d1", root, b"d3")
    with pytest.raises(NotADirectory):
        store.rename(root, b"d1", root, b"keep")
    with pytest.raises(IsADirectory):
        store.rename(root, b"keep", root, b"d2")
    nlink = store.getattr(root).nlink
    store.rename(root, b"d1", root, b"d2")
    assert store.getattr(root).nlink == nlink - 1
    assert store.lookup(root, b"d2").oid == d1
    # across directories, replacing an empty directory
    other = store.mkdir(root, b"other").oid
    store.mkdir(other, b"d2")
    before = store.getattr(root).nlink
    store.rename(root, b"d2", other, b"d2")
    assert store.getattr(other).nlink == 3
    assert store.getattr(root).nlink == before - 1


def test_rename_into_own_subtree_fails(store: Store) -> None:
    root = new_vm(store)
    a = store.mkdir(root, b"a").oid
    b = store.mkdir(a, b"b").oid
    c = store.mkdir(b, b"c").oid
    with pytest.raises(InvalidArgument):
        store.rename(root, b"a", c, b"a")
    with pytest.raises(InvalidArgument):
        store.rename(root, b"a", a, b"x")
    assert store.lookup(root, b"a").oid == a
    assert listdir(store, c) == []


def test_rename_between_hard_links_is_noop(store: Store) -> None:
    root = new_vm(store)
    f = write_file(store, root, b"f", b"x")
    store.link(f, root, b"g")
    store.rename(root, b"f", root, b"g")
    assert listdir(store, root) == [b"f", b"g"]
    assert store.getattr(f).nlink == 2


def test_rename_across_namespaces_refused(store: Store) -> None:
    a = new_vm(store, "a")
    b = new_vm(store, "b")
    store.create(a, b"f")
    with pytest.raises(CrossDevice):
        store.rename(a, b"f", b, b"f")


def test_link_and_nlink(store: Store) -> None:
    root = new_vm(store)
    d = store.mkdir(root, b"d").oid
    f = write_file(store, root, b"f", b"shared")
    assert store.link(f, d, b"g").nlink == 2
    assert store.lookup(d, b"g").oid == f
    store.write(store.lookup(d, b"g").oid, 0, b"SH")
    assert read_all(store, f) == b"SHared"
    with pytest.raises(Exists):
        store.link(f, d, b"g")
    with pytest.raises(IsADirectory):
        store.link(d, root, b"dlink")
    store.remove(root, b"f")
    assert store.getattr(f).nlink == 1
    assert read_all(store, f) == b"SHared"
    store.remove(d, b"g")
    with pytest.raises(Stale):
        store.getattr(f)
    assert store.stats().stored_bytes == 0


def test_symlink_readlink(store: Store) -> None:
    root = new_vm(store)
    attr = store.symlink(root, b"l", b"../some/where")
    assert attr.type == FileType.LNK and attr.size == len(b"../some/where")
    assert store.readlink(attr.oid) == b"../some/where"
    assert store.lookup(root, b"l").type == FileType.LNK
    with pytest.raises(InvalidArgument):
        store.readlink(root)
    with pytest.raises(InvalidArgument):
        store.symlink(root, b"empty", b"")
    with pytest.raises(Exists):
        store.symlink(root, b"l", b"x")


def test_mknod(store: Store) -> None:
    root = new_vm(store)
    store.setattr(root, SetAttr(mode=0o777))
    fifo = store.mknod(root, b"fifo", FileType.FIFO, 0o644, ALICE)
    assert fifo.type == FileType.FIFO and fifo.uid == ALICE.uid
    chr_ = store.mknod(root, b"null", FileType.CHR, 0o666, Cred(), rdev=(1, 3))
    assert chr_.type == FileType.CHR and chr_.rdev == (1, 3)
    assert store.getattr(chr_.oid).rdev == (1, 3)
    with pytest.raises(NotPermitted):
        store.mknod(root, b"evil", FileType.CHR, 0o666, ALICE, rdev=(1, 1))
    with pytest.raises(NotPermitted):
        store.mknod(root, b"evil", FileType.BLK, 0o666, ALICE, rdev=(8, 0))
    with pytest.raises(InvalidArgument):
        store.mknod(root, b"reg", FileType.REG, 0o644)
    with pytest.raises(NotFound):
        store.lookup(root, b"evil")
    store.remove(root, b"fifo")
    with pytest.raises(Stale):
        store.getattr(fifo.oid)


def test_remove_then_stale(store: Store) -> None:
    root = new_vm(store)
    f = write_file(store, root, b"f", b"data")
    store.remove(root, b"f")
    for call in (
        lambda: store.getattr(f),
        lambda: store.read(f, 0, 10),
        lambda: store.write(f, 0, b"x"),
        lambda: store.setattr(f, SetAttr(mode=0o600)),
    ):
        with pytest.raises(Stale):
            call()
    # the name can be reused; the new object is a different one
    g = store.create(root, b"f").oid
    assert g != f


@pytest.mark.parametrize(
    ("name", "error"),
    [
        (b"", InvalidName),
        (b".", InvalidName),
        (b"..", InvalidName),
        (b"a/b", InvalidName),
        (b"a\0b", InvalidName),
        (b"x" * 256, NameTooLong),
    ],
)
def test_bad_names(store: Store, name: bytes, error: type[StoreError]) -> None:
    root = new_vm(store)
    f = store.create(root, b"ok").oid
    for call in (
        lambda: store.create(root, name),
        lambda: store.mkdir(root, name),
        lambda: store.symlink(root, name, b"t"),
        lambda: store.mknod(root, name, FileType.FIFO, 0o644),
        lambda: store.link(f, root, name),
    ):
        with pytest.raises(error):
            call()
    if name not in (b".", b".."):
        with pytest.raises(error):
            store.lookup(root, name)
    # remove/rename refuse them too ('.' and '..' with EINVAL or ENOTEMPTY as POSIX does)
    for call in (
        lambda: store.remove(root, name),
        lambda: store.rmdir(root, name),
        lambda: store.rename(root, b"ok", root, name),
        lambda: store.rename(root, name, root, b"x"),
    ):
        with pytest.raises(StoreError) as info:
            call()
        assert info.value.errno in (errno.EINVAL, errno.ENAMETOOLONG, errno.ENOTEMPTY)
    assert listdir(store, root) == [b"ok"]
    assert store.create(root, b"x" * 255).oid


# --- permissions ----------------------------------------------------------------------------


def test_directory_permissions(store: Store) -> None:
    root = new_vm(store)
    store.setattr(root, SetAttr(mode=0o755))
    d = store.mkdir(root, b"d", 0o750, sattr=SetAttr(uid=ALICE.uid, gid=ALICE.gid)).oid
    f = store.create(d, b"f", 0o644, ALICE).oid
    assert store.getattr(f).uid == ALICE.uid
    # group member may look up and list, not create or remove
    assert store.lookup(d, b"f", CAROL).oid == f
    assert [e.name for e in store.readdir(d, cred=CAROL)[0]] == [b"f"]
    with pytest.raises(PermissionDenied):
        store.create(d, b"g", 0o644, CAROL)
    with pytest.raises(PermissionDenied):
        store.remove(d, b"f", CAROL)
    # others may not even search
    with pytest.raises(PermissionDenied):
        store.lookup(d, b"f", BOB)
    with pytest.raises(PermissionDenied):
        store.readdir(d, cred=BOB)
    with pytest.raises(PermissionDenied):
        store.mkdir(root, b"bobdir", 0o755, BOB)
    with pytest.raises(PermissionDenied):
        store.rename(d, b"f", root, b"f", CAROL)
    # owner can; root can anything
    store.create(d, b"g", 0o644, ALICE)
    store.remove(d, b"g", ALICE)
    store.create(d, b"h", 0o644, Cred())
    # execute-only directory: lookup yes, listing no
    store.setattr(d, SetAttr(mode=0o711), ALICE)
    assert store.lookup(d, b"f", BOB).oid == f
    with pytest.raises(PermissionDenied):
        store.readdir(d, cred=BOB)


def test_sticky_directory(store: Store) -> None:
    root = new_vm(store)
    tmp = store.mkdir(root, b"tmp", 0o1777).oid
    fa = store.create(tmp, b"a", 0o644, ALICE).oid
    store.create(tmp, b"b", 0o644, BOB)
    with pytest.raises(PermissionDenied):
        store.remove(tmp, b"a", BOB)
    with pytest.raises(PermissionDenied):
        store.rename(tmp, b"a", tmp, b"stolen", BOB)
    with pytest.raises(PermissionDenied):
        store.rename(tmp, b"b", tmp, b"a", BOB)  # replacing alice's file
    assert store.lookup(tmp, b"a").oid == fa
    store.remove(tmp, b"b", BOB)
    store.remove(tmp, b"a", ALICE)


def test_file_data_permissions_and_owner_override(store: Store) -> None:
    root = new_vm(store)
    store.setattr(root, SetAttr(mode=0o777))
    f = store.create(root, b"f", 0o000, ALICE).oid
    store.write(f, 0, b"secret", ALICE)  # owner override (as knfsd) despite mode 000
    assert store.read(f, 0, 10, ALICE)[0] == b"secret"
    with pytest.raises(PermissionDenied):
        store.read(f, 0, 10, BOB)
    with pytest.raises(PermissionDenied):
        store.write(f, 0, b"x", BOB)
    store.setattr(f, SetAttr(mode=0o640), ALICE)
    assert store.read(f, 0, 10, CAROL)[0] == b"secret"
    with pytest.raises(PermissionDenied):
        store.write(f, 0, b"x", CAROL)
    with pytest.raises(PermissionDenied):
        store.setattr(f, SetAttr(size=0), CAROL)
    assert store.read(f, 0, 10, Cred())[0] == b"secret"
    assert read_all(store, f) == b"secret"


def test_chmod_chown_rules(store: Store) -> None:
    root = new_vm(store)
    store.setattr(root, SetAttr(mode=0o777))
    f = store.create(root, b"f", 0o644, ALICE).oid
    with pytest.raises(NotPermitted):
        store.setattr(f, SetAttr(mode=0o777), BOB)
    with pytest.raises(NotPermitted):
        store.setattr(f, SetAttr(uid=BOB.uid), ALICE)
    with pytest.raises(NotPermitted):
        store.setattr(f, SetAttr(uid=BOB.uid), BOB)
    with pytest.raises(NotPermitted):
        store.setattr(f, SetAttr(gid=BOB.gid), ALICE)  # not one of alice's groups
    with pytest.raises(NotPermitted):
        store.setattr(f, SetAttr(mtime_ns=12345), BOB)
    store.setattr(f, SetAttr(mode=0o600), ALICE)
    store.setattr(f, SetAttr(uid=BOB.uid, gid=BOB.gid), Cred())
    attr = store.getattr(f)
    assert (attr.mode, attr.uid, attr.gid) == (0o600, BOB.uid, BOB.gid)
    attr = store.setattr(f, SetAttr(atime_ns=5, mtime_ns=7), BOB)
    assert (attr.atime_ns, attr.mtime_ns) == (5, 7)
    assert store.setattr(f, SetAttr(mtime_ns=NOW), BOB).mtime_ns > 7


def test_access_bits(store: Store) -> None:
    root = new_vm(store)
    store.setattr(root, SetAttr(mode=0o777))
    f = store.create(root, b"f", 0o640, ALICE).oid
    d = store.mkdir(root, b"d", 0o750, sattr=SetAttr(uid=ALICE.uid, gid=ALICE.gid)).oid
    assert store.access(f, ALICE, ALL_ACCESS) == ACCESS_READ | ACCESS_MODIFY | ACCESS_EXTEND
    assert store.access(f, CAROL, ALL_ACCESS) == ACCESS_READ
    assert store.access(f, BOB, ALL_ACCESS) == 0
    assert store.access(f, ALICE, ACCESS_READ) == ACCESS_READ
    assert store.access(d, ALICE, ALL_ACCESS) == (
        ACCESS_READ | ACCESS_LOOKUP | ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
    )
    assert store.access(d, CAROL, ALL_ACCESS) == ACCESS_READ | ACCESS_LOOKUP
    assert store.access(d, BOB, ALL_ACCESS) == 0
    # root: everything but execute on a file without x bits
    assert store.access(f, Cred(), ALL_ACCESS) & ACCESS_EXECUTE == 0
    store.setattr(f, SetAttr(mode=0o750))
    assert store.access(f, Cred(), ALL_ACCESS) & ACCESS_EXECUTE
    assert store.access(f, CAROL, ALL_ACCESS) == ACCESS_READ | ACCESS_EXECUTE
    # a snapshot grants nothing that changes
    store.snapshot("vm", "s")
    snap = store.namespace("vm@s")
    sf = store.resolve(snap.id, "/f").oid
    assert store.access(sf, ALICE, ALL_ACCESS) & (ACCESS_MODIFY | ACCESS_EXTEND) == 0


# --- create modes and setattr guard ---------------------------------------------------------


def test_exclusive_create(store: Store) -> None:
    root = new_vm(store)
    v1, v2 = b"verifier", b"VERIFIER"
    f = store.create(root, b"f", exclusive=v1).oid
    store.write(f, 0, b"data")
    assert store.create(root, b"f", exclusive=v1).oid == f  # a retransmitted CREATE
    with pytest.raises(Exists):
        store.create(root, b"f", exclusive=v2)
    store.close()
    reopened = Store.open(store.path)
    try:
        assert reopened.create(root, b"f", exclusive=v1).oid == f
        with pytest.raises(Exists):
            reopened.create(root, b"f", exclusive=v2)
    finally:
        reopened.close()


def test_guarded_and_unchecked_create(store: Store) -> None:
    root = new_vm(store)
    f = write_file(store, root, b"f", b"content")
    with pytest.raises(Exists):
        store.create(root, b"f", guarded=True)
    assert store.create(root, b"f").oid == f  # unchecked: the existing file
    assert read_all(store, f) == b"content"
    assert store.create(root, b"f", sattr=SetAttr(size=0)).oid == f
    assert store.getattr(f).size == 0
    store.mkdir(root, b"d")
    with pytest.raises(IsADirectory):
        store.create(root, b"d")
    with pytest.raises(Exists):
        store.create(root, b"d", guarded=True)


def test_create_applies_sattr_and_mode(store: Store) -> None:
    root = new_vm(store)
    store.setattr(root, SetAttr(mode=0o777))
    attr = store.create(root, b"f", 0o640, ALICE)
    assert (attr.mode, attr.uid, attr.gid, attr.nlink, attr.size) == (0o640, 1000, 1000, 1, 0)
    attr = store.create(root, b"g", 0o600, sattr=SetAttr(mode=0o604, uid=5, gid=6))
    assert (attr.mode, attr.uid, attr.gid) == (0o604, 5, 6)


def test_setattr_guard(store: Store) -> None:
    root = new_vm(store)
    f = store.create(root, b"f").oid
    ctime = store.getattr(f).ctime_ns
    time.sleep(0.001)
    attr = store.setattr(f, SetAttr(mode=0o600), guard_ctime_ns=ctime)
    assert attr.mode == 0o600 and attr.ctime_ns != ctime
    with pytest.raises(NotSync):
        store.setattr(f, SetAttr(mode=0o644), guard_ctime_ns=ctime)
    assert store.getattr(f).mode == 0o600


def test_setattr_size_rules(store: Store) -> None:
    root = new_vm(store)
    d = store.mkdir(root, b"d").oid
    with pytest.raises(IsADirectory):
        store.setattr(d, SetAttr(size=0))
    link = store.symlink(root, b"l", b"t").oid
    with pytest.raises(InvalidArgument):
        store.setattr(link, SetAttr(size=0))


# --- readdir --------------------------------------------------------------------------------


def test_readdir_pages_with_concurrent_changes(store: Store) -> None:
    root = new_vm(store)
    d = store.mkdir(root, b"big").oid
    store.begin_batch()
    for i in range(3000):
        store.create(d, b"file-%05d" % i)
    store.commit()
    rng = random.Random(3)
    present = {b"file-%05d" % i for i in range(3000)}
    seen: list[bytes] = []
    removed: set[bytes] = set()
    added = 0
    cookie = 0
    while True:
        entries, eof = store.readdir(d, cookie, limit=100)
        assert len(entries) <= 100
        seen += [e.name for e in entries]
        if entries:
            cookie = entries[-1].cookie
        if eof:
            break
        # change the directory between pages
        for name in rng.sample(sorted(present), 5):
            store.remove(d, name)
            present.discard(name)
            removed.add(name)
        for _ in range(5):
            name = b"new-%05d" % added
            added += 1
            store.create(d, name)
            present.add(name)
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    original = {b"file-%05d" % i for i in range(3000)}
    # every original entry that was never removed was seen exactly once
    assert original - removed <= set(seen)
    # nothing that never existed was returned
    assert set(seen) <= original | {b"new-%05d" % i for i in range(added)}


def test_readdir_cookies_survive_reopen(store: Store, tmp_path: Path) -> None:
    root = new_vm(store)
    store.begin_batch()
    for i in range(250):
        store.create(root, b"f%d" % i)
    store.commit()
    first, eof = store.readdir(root, 0, limit=100)
    assert not eof
    cookie = first[-1].cookie
    rest_before, _ = store.readdir(root, cookie, limit=1000)
    store.close()
    with Store.open(tmp_path / "data") as again:
        rest_after, eof = again.readdir(root, cookie, limit=1000)
        assert eof
        assert [e.name for e in rest_after] == [e.name for e in rest_before]
        assert {e.name for e in first} | {e.name for e in rest_after} == {
            b"f%d" % i for i in range(250)
        }
        # an unknown cookie resumes at the next position, it is not an error
        entries, _ = again.readdir(root, cookie + 1, limit=1000)
        assert [e.name for e in entries] == [e.name for e in rest_after]


def test_readdir_across_layers(store: Store) -> None:
    root = new_vm(store, "src")
    for i in range(20):
        store.create(root, b"s%02d" % i)
    clone = store.root(store.clone("dst", [CloneSource("src")]).id)
    for i in range(0, 20, 2):
        store.remove(clone, b"s%02d" % i)
    for i in range(5):
        store.create(clone, b"c%02d" % i)
    store.create(root, b"late")
    want = sorted([b"s%02d" % i for i in range(1, 20, 2)] + [b"c%02d" % i for i in range(5)])
    assert listdir(store, clone) == want
    assert listdir(store, root) == sorted([b"s%02d" % i for i in range(20)] + [b"late"])


@pytest.mark.slow
def test_huge_directory_lookups_stay_fast(store: Store) -> None:
    root = new_vm(store)
    d = store.mkdir(root, b"huge").oid
    n = 100_000
    store.begin_batch()
    for i in range(n):
        store.create(d, b"entry-%06d" % i)
        if i % 20000 == 19999:
            store.commit()
            store.begin_batch()
    store.commit()
    rng = random.Random(1)
    names = [b"entry-%06d" % rng.randrange(n) for _ in range(500)]
    start = time.perf_counter()
    for name in names:
        store.lookup(d, name)
    per_lookup = (time.perf_counter() - start) / len(names)
    assert per_lookup < 1e-3, f"lookup took {per_lookup * 1e6:.0f} us"
    with pytest.raises(NotFound):
        store.lookup(d, b"entry-x")
    entries, eof = store.readdir(d, 0, limit=100)
    assert len(entries) == 100 and not eof


# --- namespaces -----------------------------------------------------------------------------


def test_snapshot_is_read_only_and_frozen(store: Store) -> None:
    root = new_vm(store)
    f = write_file(store, root, b"f", b"before")
    snap = store.snapshot("vm", "s1")
    assert snap.readonly and snap.kind == "snapshot" and snap.name == "vm@s1"
    sroot = snap.root
    sf = store.lookup(sroot, b"f").oid
    store.write(f, 0, b"AFTER!")
    store.create(root, b"new")
    assert read_all(store, sf) == b"before"
    assert listdir(store, sroot) == [b"f"]
    for call in (
        lambda: store.write(sf, 0, b"x"),
        lambda: store.create(sroot, b"x"),
        lambda: store.mkdir(sroot, b"x"),
        lambda: store.remove(sroot, b"f"),
        lambda: store.setattr(sf, SetAttr(mode=0o600)),
        lambda: store.rename(sroot, b"f", sroot, b"g"),
        lambda: store.link(sf, sroot, b"g"),
        lambda: store.symlink(sroot, b"l", b"t"),
    ):
        with pytest.raises(ReadOnly):
            call()
    assert [s.name for s in store.list_snapshots("vm")] == ["vm@s1"]
    with pytest.raises(Exists):
        store.snapshot("vm", "s1")


def test_rollback(store: Store) -> None:
    root = new_vm(store)
    f = write_file(store, root, b"f", b"v1")
    store.snapshot("vm", "s1")
    store.write(f, 0, b"v2")
    store.create(root, b"extra")
    store.remove(root, b"f")
    store.rollback("vm", "s1")
    assert listdir(store, root) == [b"f"]
    assert read_all(store, f) == b"v1"  # the same ObjectId works again
    # the VM stays writable and the snapshot stays put
    store.write(f, 0, b"v3")
    g = store.create(root, b"g").oid
    assert g != f
    assert read_all(store, store.resolve(store.namespace("vm@s1").id, "/f").oid) == b"v1"
    store.rollback("vm", "s1")
    assert read_all(store, f) == b"v1"
    assert store.usage("vm").logical_bytes == 2


def test_clone_independence_both_ways(store: Store) -> None:
    root = new_vm(store, "src")
    data = pattern(2 * CHUNK_SIZE + 10)
    f = write_file(store, root, b"f", data)
    d = store.mkdir(root, b"d").oid
    store.create(d, b"inner")
    info = store.clone("dst", [CloneSource("src")])
    croot = info.root
    cf = store.lookup(croot, b"f").oid
    assert read_all(store, cf) == data
    assert cf.ns == info.id and cf != f
    store.write(f, 5, b"SOURCE")
    store.write(cf, CHUNK_SIZE, b"CLONE")
    store.create(root, b"only-src")
    store.create(croot, b"only-dst")
    store.remove(store.lookup(croot, b"d").oid, b"inner")
    src_want = bytearray(data)
    src_want[5:11] = b"SOURCE"
    dst_want = bytearray(data)
    dst_want[CHUNK_SIZE : CHUNK_SIZE + 5] = b"CLONE"
    assert read_all(store, f) == bytes(src_want)
    assert read_all(store, cf) == bytes(dst_want)
    assert listdir(store, root) == [b"d", b"f", b"only-src"]
    assert listdir(store, croot) == [b"d", b"f", b"only-dst"]
    assert listdir(store, d) == [b"inner"]
    # new objects in source and clone do not collide
    assert store.lookup(root, b"only-src").oid.ino != 0


def test_clone_of_clone_and_of_snapshot(store: Store) -> None:
    root = new_vm(store, "a")
    f = write_file(store, root, b"f", b"a1")
    store.snapshot("a", "s")
    store.write(f, 0, b"a2")
    b = store.clone("b", [CloneSource("a")]).root
    c = store.clone("c", [CloneSource("b")]).root
    s = store.clone("fromsnap", [CloneSource("a", snapshot="s")]).root
    store.write(store.lookup(b, b"f").oid, 0, b"b3")
    store.write(store.lookup(c, b"f").oid, 0, b"c4")
    # objects created in a clone of a snapshot get fresh identities
    g = write_file(store, s, b"g", b"new")
    assert g != store.lookup(s, b"f").oid
    for r, want in ((root, b"a2"), (b, b"b3"), (c, b"c4"), (s, b"a1")):
        assert read_all(store, store.lookup(r, b"f").oid) == want
    assert read_all(store, g) == b"new"
    assert listdir(store, s) == [b"f", b"g"]
    assert listdir(store, root) == [b"f"]


def test_composition_from_several_namespaces(store: Store) -> None:
    base = new_vm(store, "base")
    etc = store.mkdir(base, b"etc").oid
    write_file(store, etc, b"hosts", b"127.0.0.1 localhost\n")
    data = new_vm(store, "data")
    srv = store.mkdir(data, b"srv").oid
    www = store.mkdir(srv, b"www").oid
    write_file(store, www, b"index.html", b"<html>")
    tools = new_vm(store, "tools")
    write_file(store, tools, b"tool", b"#!/bin/sh\n")
    store.mkdir(base, b"opt")
    info = store.clone(
        "web",
        [
            CloneSource("base"),
            CloneSource("data", path="/srv/www", dest="/var-www"),
            CloneSource("tools", path="/tool", dest="/opt/tool"),
        ],
    )
    web = info.root
    assert listdir(store, web) == [b"etc", b"opt", b"var-www"]
    hosts = resolve(store, web, "/etc/hosts")
    index = resolve(store, web, "/var-www/index.html")
    tool = resolve(store, web, "/opt/tool")
    assert read_all(store, index) == b"<html>"
    assert read_all(store, tool) == b"#!/bin/sh\n"
    assert read_all(store, hosts) == b"127.0.0.1 localhost\n"
    vw = resolve(store, web, "/var-www")
    assert store.lookup(vw, b"..").oid == web
    assert store.getattr(web).nlink == 5  # '.', '..' and etc, opt, var-www
    # writes in the composition stay there, and later source writes don't leak in
    store.write(index, 0, b"<HTML>")
    store.write(store.resolve(store.namespace("data").id, "/srv/www/index.html").oid, 1, b"X")
    assert read_all(store, index) == b"<HTML>"
    assert read_all(store, resolve(store, data, "/srv/www/index.html")) == b"<Xtml>"
    new = write_file(store, vw, b"new.html", b"fresh")
    assert new.ns == info.id
    assert listdir(store, resolve(store, data, "/srv/www")) == [b"index.html"]
    assert listdir(store, vw) == [b"index.html", b"new.html"]
    # clone of the composed VM, and a subtree of it composed elsewhere
    web2 = store.clone("web2", [CloneSource("web")]).root
    assert read_all(store, resolve(store, web2, "/var-www/new.html")) == b"fresh"
    store.write(resolve(store, web2, "/var-www/new.html"), 0, b"FRESH")
    assert read_all(store, new) == b"fresh"
    part = store.clone("part", [CloneSource("web", path="/var-www", dest="/site")]).root
    assert listdir(store, resolve(store, part, "/site")) == [b"index.html", b"new.html"]
    assert read_all(store, resolve(store, part, "/site/index.html")) == b"<HTML>"
    store.write(resolve(store, part, "/site/index.html"), 0, b"P")
    assert read_all(store, index) == b"<HTML>"
    assert read_all(store, resolve(store, web2, "/var-www/index.html")) == b"<HTML>"
    # and a subtree of that composed into an existing VM (into=True)
    store.clone("base", [CloneSource("part", path="/site", dest="/opt/site")], into=True)
    assert listdir(store, resolve(store, base, "/opt/site")) == [b"index.html", b"new.html"]
    assert read_all(store, resolve(store, base, "/opt/site/index.html")) == b"PHTML>"
    # operations inside composed volumes
    sub = store.mkdir(vw, b"sub").oid
    store.rename(vw, b"new.html", sub, b"moved.html")
    assert read_all(store, resolve(store, web, "/var-www/sub/moved.html")) == b"fresh"
    store.rename(web, b"etc", sub, b"etc")
    assert store.lookup(resolve(store, web, "/var-www/sub/etc"), b"..").oid == sub
    assert store.usage("web").files == len(walk(store, web))


def walk(store: Store, root: ObjectId) -> set[ObjectId]:
    seen = {root}
    stack = [root]
    while stack:
        d = stack.pop()
        entries, _ = store.readdir(d, 0, limit=1_000_000)
        for e in entries:
            if e.oid not in seen:
                seen.add(e.oid)
                if e.type == FileType.DIR:
                    stack.append(e.oid)
    return seen


def test_clone_to_root_overlays(store: Store) -> None:
    a = new_vm(store, "a")
    write_file(store, a, b"from-a", b"A")
    write_file(store, a, b"both", b"A")
    b = new_vm(store, "b")
    write_file(store, b, b"from-b", b"B")
    write_file(store, b, b"both", b"B")
    c = store.clone("c", [CloneSource("a"), CloneSource("b")]).root
    assert listdir(store, c) == [b"both", b"from-a", b"from-b"]
    assert read_all(store, store.lookup(c, b"both").oid) == b"B"


def test_two_grafts_of_one_source_are_independent_copies(store: Store) -> None:
    src = new_vm(store, "src")
    etc = store.mkdir(src, b"etc").oid
    write_file(store, etc, b"hosts", b"original")
    info = store.clone(
        "web",
        [
            CloneSource("src", path="/etc", dest="/etc1"),
            CloneSource("src", path="/etc", dest="/etc2"),
        ],
    )
    web = info.root
    one, two = resolve(store, web, "/etc1/hosts"), resolve(store, web, "/etc2/hosts")
    assert one != two
    store.write(one, 0, b"CHANGED!")
    assert read_all(store, two) == b"original"
    assert store.lookup(resolve(store, web, "/etc2"), b"..").oid == web
    # grafting the same source again, over a graft of it, into the same VM
    store.clone("web", [CloneSource("src", path="/etc", dest="/etc1")], into=True, replace=True)
    store.clone("web", [CloneSource("src", path="/", dest="/etc2")], into=True, replace=True)
    assert read_all(store, resolve(store, web, "/etc1/hosts")) == b"original"
    assert read_all(store, resolve(store, web, "/etc2/etc/hosts")) == b"original"
    assert store.usage("web").files == len(walk(store, web))


def test_graft_over_existing_entries_releases_them(store: Store) -> None:
    src = new_vm(store, "src")
    write_file(store, src, b"small", b"s")
    dst = new_vm(store, "dst")
    d = store.mkdir(dst, b"d").oid
    inner = write_file(store, d, b"inner", b"linked from outside")
    store.link(inner, dst, b"outside")
    write_file(store, dst, b"big", pattern(3 * CHUNK_SIZE, seed=5))
    assert store.stats().stored_bytes == 1 + 19 + 3 * CHUNK_SIZE
    # a directory replaced by a graft: its contents go, links from outside it drop
    store.clone("dst", [CloneSource("src", path="/small", dest="/d")], into=True, replace=True)
    assert store.getattr(inner).nlink == 1
    assert read_all(store, store.lookup(dst, b"outside").oid) == b"linked from outside"
    # a file replaced by a graft: its chunks are released
    store.clone("dst", [CloneSource("src", path="/small", dest="/big")], into=True, replace=True)
    assert store.stats().stored_bytes == 1 + 19
    assert listdir(store, dst) == [b"big", b"d", b"outside"]
    assert store.getattr(dst).nlink == 2
    store.remove(dst, b"outside")
    with pytest.raises(Stale):
        store.getattr(inner)


def test_graft_cutting_a_hard_link_group_counts_visible_links(store: Store) -> None:
    src = new_vm(store, "src")
    x = store.mkdir(src, b"x").oid
    f = write_file(store, x, b"f", b"data")
    store.link(f, src, b"outside")
    info = store.clone("dst", [CloneSource("src", path="/x", dest="/x")])
    assert store.resolve(info.id, "/x/f").nlink == 1
    # three links, two of them inside the graft (one of those made last, outside it)
    g = write_file(store, x, b"g", b"gg")
    store.link(g, store.mkdir(x, b"y").oid, b"g2")
    store.link(g, src, b"g-outside")  # g's holder is now outside /x
    for how in (
        [CloneSource("src", path="/x", dest="/x")],
        [CloneSource("src", path="/x", dest="/")],
        [CloneSource("src", path="/x/g", dest="/g")],
    ):
        store.clone("dst2", how)
        top = "/x" if how[0].target == "/x" else ""
        got = store.resolve(store.namespace("dst2").id, f"{top}/g")
        assert got.nlink == (1 if how[0].path == "/x/g" else 2)
        if how[0].path == "/x":
            assert store.resolve(store.namespace("dst2").id, f"{top}/y/g2").oid == got.oid
        assert store.getattr(g).nlink == 3  # the source keeps its own count
        dst2 = store.namespace("dst2")
        assert store.usage("dst2").files == len(walk(store, dst2.root))
        # removing every copied link frees the object; the source's stays
        store.remove(store.resolve(dst2.id, top or "/").oid, b"g")
        if how[0].path == "/x":
            store.remove(store.resolve(dst2.id, f"{top}/y").oid, b"g2")
        with pytest.raises(Stale):
            store.getattr(got.oid)
        assert read_all(store, g) == b"gg"
        store.remove_namespace("dst2")


def test_hard_link_index_follows_links_through_grafts_of_grafts(store: Store) -> None:
    """The index a graft writes is right for the next graft: a link group cut twice, a
    link renamed across the cut, and the last link left names its directory as holder."""
    src = new_vm(store, "src")
    a = store.mkdir(src, b"a").oid
    b = store.mkdir(a, b"b").oid
    f = write_file(store, b, b"f", b"ff")
    for d, name in ((a, b"f1"), (b, b"f2"), (src, b"f3")):
        store.link(f, d, name)
    assert store.getattr(f).nlink == 4
    one = store.clone("one", [CloneSource("src", path="/a", dest="/a")])
    assert store.resolve(one.id, "/a/b/f").nlink == 3
    # in the copy, move one link out of /a/b and graft /a/b of the copy
    store.rename(resolve(store, one.root, "/a/b"), b"f2", one.root, b"moved")
    two = store.clone("two", [CloneSource("one", path="/a/b", dest="/")])
    assert store.resolve(two.id, "/f").nlink == 1
    three = store.clone("three", [CloneSource("one", path="/a", dest="/")])
    assert store.resolve(three.id, "/f1").nlink == 2
    # removing links down to one: the last one's directory is its holder, and a graft
    # of that directory alone copies it with one link
    store.remove(resolve(store, one.root, "/a"), b"f1")
    store.remove(one.root, b"moved")
    assert store.resolve(one.id, "/a/b/f").nlink == 1
    store.link(resolve(store, one.root, "/a/b/f"), one.root, b"again")
    four = store.clone("four", [CloneSource("one", path="/a/b", dest="/b")])
    assert store.resolve(four.id, "/b/f").nlink == 1
    five = store.clone("five", [CloneSource("one")])  # a whole clone keeps every link
    assert store.resolve(five.id, "/again").nlink == 2


def test_hard_links_published_from_a_staged_import_stay_indexed(store: Store) -> None:
    vm = new_vm(store, "vm")
    staged, token, fd = store.begin_staging("vm")
    f = write_file(store, staged, b"f", b"top")
    store.link(f, store.mkdir(staged, b"sub").oid, b"g")
    store.publish_staging(token, "/")  # into the existing root: its entries move
    os.close(fd)
    assert store.getattr(f).nlink == 2
    if check is not None:  # the index names the directory the link moved to
        assert check.fsck(store).errors == []
    got = store.clone("c", [CloneSource("vm", path="/sub", dest="/sub")])
    assert store.resolve(got.id, "/sub/g").nlink == 1
    store.remove(resolve(store, vm, "/sub"), b"g")
    assert store.getattr(f).nlink == 1
    whole = store.clone("d", [CloneSource("vm", path="/", dest="/all")])
    assert store.resolve(whole.id, "/all/f").nlink == 1
    if check is not None:
        assert check.fsck(store).errors == []


def test_a_graft_from_a_vm_older_than_the_link_index_keeps_source_nlink(store: Store) -> None:
    """A lineage begun before the hard-link index (its layers lack the flag) keeps the
    old behaviour, and a VM composed from it does not trust the index either (fsck)."""
    from prism.store import layers, txn

    src = new_vm(store, "old")
    f = write_file(store, store.mkdir(src, b"x").oid, b"f", b"data")
    store.link(f, src, b"outside")
    with txn.write(store.ctx) as t:  # as a store written before the index looks
        for layer, rec in layers.all_layers(store.ctx, t).items():
            rec.pop(layers.LINKS_COMPLETE, None)
            layers.put_layer(store.ctx, t, layer, rec)
    dst = new_vm(store, "new")
    store.clone("new", [CloneSource("old", path="/x", dest="/x")], into=True)
    assert store.resolve(store.namespace("new").id, "/x/f").nlink == 2  # as before
    write_file(store, dst, b"mine", b"m")
    if check is not None:
        assert check.fsck(store).errors == []


def _tree_usage(store: Store, root: ObjectId) -> tuple[int, int]:
    """(bytes, objects) of a VM's tree, counted through the public calls."""
    objects = walk(store, root)
    return sum(
        a.size for a in map(store.getattr, objects) if a.type in (FileType.REG, FileType.LNK)
    ), len(objects)


def _usage_known(store: Store, name: str) -> bool:
    """Whether `name`'s usage record is valid: read as it is, with no walk."""
    from prism.store import records, txn

    with txn.read(store.ctx) as t:
        raw = t.get(records.U32.pack(store.namespace(name).id), db=store.ctx.db.usage)
    return raw is not None and bool(records.USAGE_VAL.unpack(raw)[2])


def test_composed_usage_is_exact_at_once(store: Store) -> None:
    """A graft adds what it places from the grafted directories' recursive statistics
    (and the hard-linked objects it copies), so the composed VM's usage record is valid and
    exact at once: df, usage() and stats read it with no walk (the tree and the imports
    staged in it count), and every change after that keeps it exact."""
    src = new_vm(store, "src")
    d = store.mkdir(src, b"d").oid
    f = write_file(store, d, b"f", pattern(3 * CHUNK_SIZE + 7))
    store.link(f, d, b"f2")  # hard links count once
    store.link(f, src, b"f-outside")  # a link the grafts below do not copy
    store.symlink(d, b"l", b"../somewhere")
    write_file(store, store.mkdir(d, b"e").oid, b"h", b"hello")
    dst = new_vm(store, "dst", quota=1 << 30)
    write_file(store, dst, b"old", b"x" * 1000)
    # an import staged in the VM: its objects count before they are published
    staged, token, fd = store.begin_staging("dst")
    write_file(store, staged, b"imported", b"y" * 300)
    compositions = [
        ("new", [CloneSource("src", path="/d", dest="/d")], False),
        ("root", [CloneSource("src"), CloneSource("src", path="/d", dest="/")], False),
        ("dst", [CloneSource("src", path="/d", dest="/d")], True),
        ("dst", [CloneSource("src", path="/d/e", dest="/d")], True),  # replaces the first
        ("dst", [CloneSource("src", path="/d", dest="/")], True),
    ]
    for name, sources, into in compositions:
        info = store.clone(name, sources, into=into, replace=into)
        assert _usage_known(store, name), name
        nbytes, objects = _tree_usage(store, info.root)
        if name == "dst":
            nbytes, objects = nbytes + 300, objects + 2  # the staged directory and file
        fs = store.fsstat(info.id)  # what df shows at once, before any other call
        if info.quota is not None:
            assert fs.total_bytes - fs.free_bytes == nbytes, name
        assert fs.total_files - fs.free_files == objects, name
        assert store.usage(name) == Usage(nbytes, objects), name
        # measured once, then kept current by the changes that follow
        grown = write_file(store, info.root, b"grown", b"g" * 77)
        store.write(grown, 77, b"h" * 23)
        assert store.usage(name) == Usage(nbytes + 100, objects + 1), name
        store.remove(info.root, b"grown")
        assert store.usage(name) == Usage(nbytes, objects), name
    store.publish_staging(token, "/imported-here")
    os.close(fd)
    assert store.usage("dst") == Usage(*_tree_usage(store, dst))
    # the published import counts in its new place: a graft of it is exact at once
    store.clone("again", [CloneSource("dst", path="/imported-here", dest="/i")])
    assert _usage_known(store, "again")
    assert store.usage("again") == Usage(*_tree_usage(store, store.namespace("again").root))
    if check is not None:
        assert check.fsck(store).errors == []


def _records_touched(store: Store, monkeypatch: pytest.MonkeyPatch, op) -> int:
    """How many records `op` reads, writes and steps over, counted at the sealed
    transaction wrapper that every store transaction goes through."""
    from prism.store import sealed

    seen = [0]

    def counting(method):
        def wrapper(*args, **kwargs):
            seen[0] += 1
            return method(*args, **kwargs)

        return wrapper

    def stepping(method):
        def wrapper(*args, **kwargs):
            for item in method(*args, **kwargs):
                seen[0] += 1
                yield item

        return wrapper

    with monkeypatch.context() as m:
        for name in ("get", "put", "delete"):
            m.setattr(sealed.SealedTxn, name, counting(getattr(sealed.SealedTxn, name)))
        m.setattr(sealed.SealedCursor, "__iter__", stepping(sealed.SealedCursor.__iter__))
        op()
    return seen[0]


def test_graft_work_does_not_grow_with_the_files_grafted(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subtree graft and a whole clone read and write as many records for a subtree of
    100 files as for one of 5,000 (hard links, imports and depth being equal), and so do
    the composed VM's usage, stats, df and a graft under a quota right after: its usage is
    exact at once, from the grafted directory's recursive statistics, with no walk."""
    counts = []
    for n, files in enumerate((100, 5000)):
        root = new_vm(store, f"src{n}")
        store.begin_batch()
        d = store.mkdir(store.mkdir(root, b"a").oid, b"b").oid
        sub = store.mkdir(d, b"sub").oid
        for k in range(files):
            write_file(store, sub if k % 2 else d, b"f%d" % k, b"x" * (k % 7))
        f = resolve(store, root, "/a/b/f0")
        store.link(f, sub, b"hard")
        store.link(f, root, b"outside")  # a link group the graft cuts
        store.commit()
        # an earlier graft out of it: an import the next graft reaches
        store.clone(
            f"src{n}", [CloneSource(f"src{n}", path="/a/b/sub", dest="/a/b/again")], into=True
        )
    for n in range(2):
        vm = f"src{n}"
        counts.append(
            (
                _records_touched(
                    store,
                    monkeypatch,
                    lambda vm=vm: (
                        store.clone(f"g-{vm}", [CloneSource(vm, path="/a/b", dest="/b")]),
                        store.usage(f"g-{vm}"),
                        store.fsstat(store.namespace(f"g-{vm}").id),
                        store.clone(  # checked against its quota at once
                            f"q-{vm}", [CloneSource(vm, path="/a/b", dest="/b")], quota=1 << 30
                        ),
                    ),
                ),
                _records_touched(
                    store, monkeypatch, lambda vm=vm: store.clone(f"w-{vm}", [CloneSource(vm)])
                ),
            )
        )
        assert store.resolve(store.namespace(f"g-{vm}").id, "/b/f0").nlink == 2
        for g in (f"g-{vm}", f"q-{vm}"):
            usage = Usage(*_tree_usage(store, store.namespace(g).root))
            assert store.usage(g) == usage
            fs = store.fsstat(store.namespace(g).id)
            assert fs.total_files - fs.free_files == usage.files
    assert counts[0] == counts[1]


def _volumes(store: Store, vm: str) -> int:
    """How many volumes `vm`'s top layer has imported."""
    from prism.store import layers, txn

    with txn.read(store.ctx) as t:
        top = layers.view_by_name(store.ctx, t, vm).top
        return len(layers.load_layer(store.ctx, t, top)["vols"])


def test_repeated_composes_keep_the_volume_count_bounded(store: Store) -> None:
    a, b = new_vm(store, "a"), new_vm(store, "b")
    for vm, root in (("a", a), ("b", b)):
        write_file(store, store.mkdir(root, b"x").oid, b"f", f"from {vm}".encode())
    rounds = 40  # importing every source volume would need 2**20 volumes by round 20
    for n in range(rounds):
        to, frm = ("a", "b") if n % 2 else ("b", "a")
        store.clone(to, [CloneSource(frm, path="/x", dest=f"/x{n % 3}")], into=True, replace=True)
        store.write(store.resolve(store.namespace(to).id, f"/x{n % 3}/f").oid, 0, b"F")
    for vm in ("a", "b"):
        assert _volumes(store, vm) <= rounds
    for vm, root in (("a", a), ("b", b)):
        assert read_all(store, resolve(store, root, "/x/f")) == f"from {vm}".encode()
        for k in range(3):
            assert read_all(store, resolve(store, root, f"/x{k}/f")).startswith(b"F")
        assert _usage_known(store, vm)  # every compose counted what it placed
        assert store.usage(vm) == Usage(*_tree_usage(store, root))


def test_graft_imports_what_its_subtree_reaches_after_moves(store: Store) -> None:
    """A graft imports the volumes of earlier grafts found above or below it, and those
    whose objects a rename or link carried elsewhere: the copy reads like its source."""
    lib = new_vm(store, "lib")
    for name in (b"one", b"two", b"three"):
        write_file(store, store.mkdir(lib, name).oid, b"f", name)
    vm = new_vm(store, "vm")
    store.mkdir(vm, b"x")
    store.mkdir(vm, b"y")
    for k, name in enumerate(("one", "two", "three")):
        store.clone("vm", [CloneSource("lib", path=f"/{name}", dest=f"/m{k}")], into=True)
    store.clone("vm", [CloneSource("lib", path="/one", dest="/x/deep")], into=True)
    base = _volumes(store, "vm")
    # /m0 reaches volume 0 and its own import's volume: not its siblings', nor /x's
    store.clone("before", [CloneSource("vm", path="/m0", dest="/got")])
    assert _volumes(store, "before") == 2
    # Objects of /m1's import leave it: a file renamed and a directory of it linked
    # through; /m2's file gains a link in /y.
    store.rename(resolve(store, vm, "/m1"), b"f", resolve(store, vm, "/x"), b"moved")
    sub = store.mkdir(resolve(store, vm, "/m2"), b"sub").oid
    store.rename(resolve(store, vm, "/m2"), b"f", sub, b"f")
    store.rename(resolve(store, vm, "/m2"), b"sub", resolve(store, vm, "/y"), b"sub")
    store.link(resolve(store, vm, "/x/deep/f"), resolve(store, vm, "/y"), b"ln")
    expect = {
        "/x": {"moved": b"two", "deep/f": b"one"},
        "/y": {"sub/f": b"three", "ln": b"one"},
        "/m0": {"f": b"one"},
    }
    for n, (path, files) in enumerate(expect.items()):
        info = store.clone(f"c{n}", [CloneSource("vm", path=path, dest="/got")])
        for rel, data in files.items():
            assert read_all(store, store.resolve(info.id, f"/got/{rel}").oid) == data
        if path == "/m0":  # and now the three imports that escaped their roots
            assert _volumes(store, f"c{n}") == 5
    assert _volumes(store, "vm") == base


def test_failed_clone_changes_nothing(store: Store) -> None:
    root = new_vm(store, "a")
    write_file(store, root, b"f", b"x")
    before = store.list_namespaces()
    with pytest.raises(NotFound):  # a fresh composition whose destination parent is missing
        store.clone("c", [CloneSource("a", path="/f", dest="/no/such/dir")])
    with pytest.raises(NotFound):
        store.clone("c", [CloneSource("a", path="/missing", dest="/x")])
    with pytest.raises(NotFound):
        store.clone("c", [CloneSource("a"), CloneSource("a", path="/f", dest="/no/such/dir")])
    with pytest.raises(NotFound):
        store.clone("c", [CloneSource("nosuchvm")])
    with pytest.raises(NotFound):
        store.namespace("c")
    assert store.list_namespaces() == before
    # the store still works normally: a later clone, snapshot and new VM are all sound
    store.snapshot("a", "s")
    c = store.clone("c", [CloneSource("a")]).root
    assert listdir(store, c) == [b"f"]
    d = new_vm(store, "d")
    assert listdir(store, d) == []
    store.create(c, b"g")
    assert listdir(store, root) == [b"f"]


def test_remove_namespace_makes_objects_stale(store: Store) -> None:
    root = new_vm(store, "a")
    f = write_file(store, root, b"f", b"x")
    snap = store.snapshot("a", "s")
    sf = store.lookup(snap.root, b"f").oid
    clone = store.clone("b", [CloneSource("a")]).root
    store.remove_namespace("a")
    for oid in (root, f, sf):
        with pytest.raises(Stale):
            store.getattr(oid)
    with pytest.raises(NotFound):
        store.namespace("a@s")
    # the clone is unaffected
    assert read_all(store, store.lookup(clone, b"f").oid) == b"x"
    # a new VM of the same name does not resurrect old handles
    new_vm(store, "a")
    with pytest.raises(Stale):
        store.getattr(f)


def test_object_ids_are_namespaced(store: Store) -> None:
    a = new_vm(store, "a")
    b = new_vm(store, "b")
    fa = write_file(store, a, b"f", b"from a")
    fb = write_file(store, b, b"f", b"from b")
    foreign = ObjectId(b.ns, fa.vol, fa.ino)
    with contextlib.suppress(Stale):  # Stale, or another object: never a's file
        assert foreign == fb or read_all(store, foreign) != b"from a"
    with pytest.raises(Stale):
        store.getattr(ObjectId(9999, 0, 1))
    with pytest.raises(Stale):
        store.getattr(ObjectId(a.ns, 0, 123456))


def test_object_ids_survive_rename_and_reopen(store: Store, tmp_path: Path) -> None:
    root = new_vm(store)
    d = store.mkdir(root, b"d").oid
    f = write_file(store, d, b"f", b"content")
    store.rename(d, b"f", root, b"g")
    store.rename(root, b"d", root, b"e")
    store.close()
    with Store.open(tmp_path / "data") as again:
        assert again.lookup(root, b"g").oid == f
        assert again.lookup(root, b"e").oid == d
        assert read_all(again, f) == b"content"
        assert again.namespace("vm").root == root


def test_quota(store: Store) -> None:
    root = new_vm(store, quota=10_000)
    f = store.create(root, b"f").oid
    store.write(f, 0, b"x" * 6000)
    before = store.stats()
    with pytest.raises(QuotaExceeded):
        store.write(f, 6000, b"y" * 5000)
    with pytest.raises(QuotaExceeded):
        store.setattr(f, SetAttr(size=20_000))
    assert store.getattr(f).size == 6000
    assert read_all(store, f) == b"x" * 6000
    assert store.stats() == before
    store.write(f, 0, b"z" * 6000)  # overwriting does not grow
    store.set_namespace("vm", quota=20_000)
    store.write(f, 6000, b"y" * 5000)
    assert store.getattr(f).size == 11_000
    assert store.usage("vm").logical_bytes == 11_000
    store.set_namespace("vm", quota=None)
    store.setattr(f, SetAttr(size=50_000))
    fs = store.fsstat(root.ns)
    assert fs.total_bytes > 0


def test_usage_and_stats(store: Store) -> None:
    root = new_vm(store, "a")
    assert store.usage("a").files == 1
    d = store.mkdir(root, b"d").oid
    f = write_file(store, d, b"f", b"x" * 1000)
    store.link(f, root, b"hard")
    store.symlink(root, b"l", b"target")
    usage = store.usage("a")
    assert usage.files == 4
    assert usage.logical_bytes == 1000 + len(b"target")  # a symlink's target is data too
    store.remove(root, b"hard")
    store.setattr(f, SetAttr(size=300))
    assert store.usage("a") == type(usage)(306, 4)
    clone = store.clone("b", [CloneSource("a")])
    assert store.usage("b") == store.usage("a")
    store.snapshot("a", "s")
    stats = store.stats()
    assert stats.logical_bytes == 612  # VMs only, not snapshots
    assert stats.stored_bytes == 300 and stats.chunk_count == 1
    assert clone.root.ns == clone.id


def test_a_write_adds_each_chunk_counter_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that rewrites chunks (a 4 KiB append into a file's last chunk, a write over
    several chunks, one over a deduplicated chunk) writes each meta counter at most once,
    and the counters stay exact."""
    from prism.store import sealed
    from prism.store.schema import REFERENCED

    root = new_vm(store, "a")
    f = write_file(store, root, b"f", pattern(CHUNK_SIZE + 100))
    shared = pattern(2 * CHUNK_SIZE, seed=3)
    write_file(store, root, b"g", shared)
    meta = store.ctx.db.meta
    writes: list[bytes] = []

    def recording(self: sealed.SealedTxn, key: bytes, value: bytes, *, db: object) -> bool:
        if db is meta:
            writes.append(bytes(key))
        return put(self, key, value, db=db)

    put = sealed.SealedTxn.put
    size = CHUNK_SIZE + 100
    steps = [
        (size, b"a" * 4096),  # grows the last chunk: bytes change, the chunk count not
        (0, pattern(3 * CHUNK_SIZE, seed=5)),  # three chunks rewritten, one added
        (0, shared),  # now the same chunks as g's: two references, no new bytes
    ]
    for offset, data in steps:
        writes.clear()
        with monkeypatch.context() as m:
            m.setattr(sealed.SealedTxn, "put", recording)
            store.write(f, offset, data)
        counters = [k for k in writes if k in (b"stored_bytes", b"chunk_count", REFERENCED)]
        assert len(counters) == len(set(counters)), (offset, counters)
    content = read_all(store, f)
    stats = store.stats()
    chunks = {content[i : i + CHUNK_SIZE] for i in range(0, len(content), CHUNK_SIZE)}
    chunks |= {shared[:CHUNK_SIZE], shared[CHUNK_SIZE:]}
    assert stats.chunk_count == len(chunks)
    assert stats.stored_bytes == sum(map(len, chunks))
    assert stats.referenced_bytes == len(content) + len(shared)
    if check is not None:
        assert check.fsck(store).errors == []


def test_dedup_across_namespaces(store: Store) -> None:
    data = pattern(1 << 20, seed=9)
    a = new_vm(store, "a")
    b = new_vm(store, "b")
    write_file(store, a, b"img", data)
    assert store.stats().stored_bytes == len(data)
    fb = store.create(b, b"copy").oid
    for off in range(0, len(data), 64 * 1024):  # written independently, in other pieces
        store.write(fb, off, data[off : off + 64 * 1024])
    stats = store.stats()
    assert stats.stored_bytes == len(data)
    assert stats.chunk_count == len(data) // CHUNK_SIZE
    assert stats.logical_bytes == 2 * len(data)
    assert stats.dedup_ratio == pytest.approx(2.0)
    assert read_all(store, fb) == data


def test_copy_on_write_small_write_into_shared_file(store: Store) -> None:
    root = new_vm(store, "src")
    data = pattern(16 << 20, seed=2)
    big = store.create(root, b"big").oid
    store.begin_batch()
    for off in range(0, len(data), 1 << 20):
        store.write(big, off, data[off : off + (1 << 20)])
    store.commit()
    clone = store.clone("dst", [CloneSource("src")]).root
    before = store.stats().stored_bytes
    cbig = store.lookup(clone, b"big").oid
    offset = 5 * CHUNK_SIZE + 1000
    store.write(cbig, offset, b"w" * 4096)
    assert store.stats().stored_bytes - before <= CHUNK_SIZE
    got, _ = store.read(cbig, offset - 10, 4116)
    assert got == data[offset - 10 : offset] + b"w" * 4096 + data[offset + 4096 : offset + 4106]
    assert store.read(big, offset, 4096)[0] == data[offset : offset + 4096]


# --- batches --------------------------------------------------------------------------------


def test_batch_commit_and_abort(store: Store, tmp_path: Path) -> None:
    root = new_vm(store)
    store.begin_batch()
    assert store.in_batch
    f = write_file(store, root, b"committed", b"yes")
    assert read_all(store, f) == b"yes"  # reads see the batch
    store.commit()
    assert not store.in_batch
    store.begin_batch()
    g = write_file(store, root, b"aborted", b"no")
    store.write(f, 0, b"NO!")
    store.mkdir(root, b"dir")
    store.abort()
    assert listdir(store, root) == [b"committed"]
    assert read_all(store, f) == b"yes"
    with pytest.raises(Stale):
        store.getattr(g)
    store.close()
    with Store.open(tmp_path / "data") as again:
        assert listdir(again, root) == [b"committed"]
        assert read_all(again, f) == b"yes"
        stats = again.stats()
        assert stats.stored_bytes == 3 and stats.chunk_count == 1


def test_failing_op_in_batch_keeps_the_others(store: Store) -> None:
    root = new_vm(store, quota=100)
    store.begin_batch()
    f = write_file(store, root, b"a", b"1234")
    with pytest.raises(Exists):
        store.create(root, b"a", guarded=True)
    with pytest.raises(QuotaExceeded):
        store.write(f, 0, b"x" * 1000)
    with pytest.raises(NotFound):
        store.clone("c", [CloneSource("vm", path="/nope", dest="/x")])
    with pytest.raises(NotFound):
        store.remove(root, b"missing")
    store.mkdir(root, b"d")
    store.commit()
    assert listdir(store, root) == [b"a", b"d"]
    assert read_all(store, f) == b"1234"
    assert store.getattr(root).nlink == 3
    assert store.usage("vm").logical_bytes == 4


def test_snapshot_and_clone_inside_aborted_batch(store: Store) -> None:
    root = new_vm(store, "a")
    write_file(store, root, b"f", b"x")
    store.begin_batch()
    store.snapshot("a", "s")
    store.create(root, b"in-batch")
    b = store.clone("b", [CloneSource("a")]).root
    assert listdir(store, b) == [b"f", b"in-batch"]
    store.abort()
    with pytest.raises(NotFound):
        store.namespace("b")
    # layer ids reused after the abort must not be confused with the aborted ones
    z = new_vm(store, "z")
    assert listdir(store, z) == []
    assert listdir(store, root) == [b"f"]
    store.snapshot("a", "s")
    b = store.clone("b", [CloneSource("a", snapshot="s")]).root
    assert listdir(store, b) == [b"f"]
    store.create(b, b"g")
    assert listdir(store, root) == [b"f"]


def test_store_files_layout(store: Store, tmp_path: Path) -> None:
    root = new_vm(store)
    write_file(store, root, b"f", b"content")
    assert (tmp_path / "data" / "meta" / "data.mdb").exists()
    assert any(name.endswith(".seg") for name in os.listdir(tmp_path / "data" / "segments"))
    assert len(store.secret) == 32
    with pytest.raises(NotFound):
        Store.open(tmp_path / "absent", create=False)


def _forget_figures(store: Store) -> None:
    """Make the store look as one written before directories had recursive statistics:
    no directory record has figures."""
    from prism.store import txn
    from prism.store.records import Inode

    with txn.write(store.ctx) as t:
        for key, raw in list(t.cursor(db=store.ctx.db.inodes)):
            if raw and raw[0] == FileType.DIR:
                node = Inode.unpack(raw)
                node.target = b""
                t.put(key, node.pack(), db=store.ctx.db.inodes)


def test_stores_without_figures_keep_working_and_build_them_lazily(store: Store) -> None:
    """A directory written before recursive statistics has none (unknown, and so is every
    directory above one): usage stays exact, a graft of such a subtree leaves the composed
    VM's usage to be measured once, and that measurement builds the VM's figures, so a graft
    out of it is exact at once."""
    src = new_vm(store, "src")
    d = store.mkdir(store.mkdir(src, b"a").oid, b"d").oid
    write_file(store, d, b"f", b"x" * 1000)
    _forget_figures(store)
    write_file(store, store.mkdir(d, b"new").oid, b"g", b"y" * 10)  # known below unknown
    store.rename(d, b"f", src, b"f")  # out of an unknown chain
    assert _usage_known(store, "src")
    assert store.usage("src") == Usage(*_tree_usage(store, src))
    store.clone("old", [CloneSource("src", path="/a", dest="/a")])
    assert not _usage_known(store, "old")  # the subtree had no figures: measured once
    old = store.namespace("old").root
    assert store.usage("old") == Usage(*_tree_usage(store, old))
    store.clone("new", [CloneSource("old", path="/a", dest="/b")])
    assert _usage_known(store, "new")  # built by that measurement
    assert store.usage("new") == Usage(*_tree_usage(store, store.namespace("new").root))
    if check is not None:
        assert check.fsck(store).errors == []


def test_changes_do_not_walk_the_directories_above(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extending write, a create, a remove and a rename across directories touch as many
    records at depth 20 as at depth 1 (their statistics wait for the batch's durable point
    and commit, `quota`); the commit walks each dirty chain once."""
    counts = []
    for depth in (1, 20):
        d = new_vm(store, f"deep{depth}")
        for k in range(depth - 1):
            d = store.mkdir(d, b"d%d" % k).oid
        a, b = store.mkdir(d, b"a").oid, store.mkdir(d, b"b").oid
        f = write_file(store, a, b"log", b"x")
        store.begin_batch()
        counts.append(
            [
                _records_touched(store, monkeypatch, op)
                for op in (
                    lambda f=f, depth=depth: store.write(f, 1, bytes([depth]) * 4096),
                    lambda a=a: store.create(a, b"new"),
                    lambda a=a, b=b: store.rename(a, b"new", b, b"new"),
                    lambda b=b: store.remove(b, b"new"),
                )
            ]
        )
        store.commit()
        usage = Usage(*_tree_usage(store, store.namespace(f"deep{depth}").root))
        store.clone(f"copy{depth}", [CloneSource(f"deep{depth}", path="/", dest="/x")])
        assert store.usage(f"copy{depth}") == Usage(usage.logical_bytes, usage.files + 1)
    # (a write's new chunk is looked up by its hash, and a miss also opens the records on
    # either side of where it would be, one or two: that varies by one; a walk up the 19
    # directories more would add at least 38)
    assert all(abs(deep - shallow) <= 1 for shallow, deep in zip(*counts, strict=True)), counts
