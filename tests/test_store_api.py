"""The store's contract (`prism.store.api`): every operation answers what an NFS reply needs
from its own transaction (attributes before and after, wcc data), and a failing operation
carries the attributes it read on its error, unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.errors import Exists, NotEmpty, NotFound, PermissionDenied, ReadOnly
from prism.store import Cred, FileType, ObjectId, SetAttr, Store, check
from prism.store.api import Wcc

ALICE = Cred(1000, 1000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "data")
    yield s
    s.close()
    with Store.open(tmp_path / "data") as again:
        assert check.fsck(again).errors == []


def vm(store: Store) -> ObjectId:
    return store.root(store.create_namespace("vm").id)


def changed(store: Store, wcc: Wcc, before: object) -> None:
    """`wcc` is the object's state before the change and now."""
    assert wcc.before == before
    assert wcc.after == store.getattr(wcc.after.oid)


def test_changes_answer_attributes_before_and_after(store: Store) -> None:
    root = vm(store)
    before = store.getattr(root)
    made = store.create_wcc(root, b"f", 0o644)
    changed(store, made.dir, before)
    assert made.attr == store.getattr(made.attr.oid)
    assert made.dir.after.mtime_ns >= before.mtime_ns

    f = made.attr
    wrote = store.write_wcc(f.oid, 0, b"hello")
    changed(store, wrote, f)
    assert (wrote.before.size, wrote.after.size) == (0, 5)
    truncated = store.setattr_wcc(f.oid, SetAttr(size=2))
    changed(store, truncated, wrote.after)

    d = store.mkdir_wcc(root, b"d", 0o755)
    assert (d.dir.before.nlink, d.dir.after.nlink) == (2, 3)
    moved = store.rename_wcc(root, b"f", d.attr.oid, b"g")
    changed(store, moved.src, d.dir.after)
    changed(store, moved.dst, d.attr)
    same = store.rename_wcc(d.attr.oid, b"g", d.attr.oid, b"h")  # one directory: one state
    assert same.src.after == same.dst.after == store.getattr(d.attr.oid)

    linked = store.link_wcc(f.oid, root, b"again")
    assert linked.attr.nlink == 2 and linked.attr == store.getattr(f.oid)
    changed(store, linked.dir, moved.src.after)
    removed = store.remove_wcc(root, b"again")
    changed(store, removed, linked.dir.after)
    store.remove(d.attr.oid, b"h")
    gone = store.rmdir_wcc(root, b"d")
    assert (gone.before.nlink, gone.after.nlink) == (3, 2)

    link = store.symlink_wcc(root, b"l", b"target")
    assert store.readlink_attr(link.attr.oid).target == b"target"
    assert store.readlink_attr(link.attr.oid).attr == link.attr
    node = store.mknod_wcc(root, b"p", FileType.FIFO, 0o600)
    changed(store, node.dir, link.dir.after)


def test_reads_answer_the_attributes_they_read(store: Store) -> None:
    root = vm(store)
    f = store.create(root, b"f", 0o644)
    store.write(f.oid, 0, b"data")
    got = store.read_attr(f.oid, 0, 100)
    assert (got.data, got.eof, got.attr) == (b"data", True, store.getattr(f.oid))
    found = store.lookup_in(root, b"f")
    assert (found.attr, found.dir) == (store.getattr(f.oid), store.getattr(root))
    access = store.access_attr(f.oid, ALICE, 0x3F)
    assert access.attr == store.getattr(f.oid) and access.granted == store.access(
        f.oid, ALICE, 0x3F
    )
    listing = store.readdir_raw(root, parent=True)
    assert listing.eof and [e[1] for e in listing.entries] == [b"f"]
    assert listing.dir == listing.parent == store.getattr(root)  # the root's '..' is itself


def test_a_failing_change_carries_the_attributes_it_read(store: Store) -> None:
    """A failure changes nothing: what it read is what the reply's wcc says, before and
    after, without asking the store again."""
    root = vm(store)
    d = store.mkdir(root, b"d", 0o755)
    store.create(d.oid, b"x", 0o644)
    f = store.create(root, b"f", 0o600)
    cases = [
        (NotFound, lambda: store.remove_wcc(root, b"missing"), root),
        (NotEmpty, lambda: store.rmdir_wcc(root, b"d"), root),
        (Exists, lambda: store.mkdir_wcc(root, b"d"), root),
        (Exists, lambda: store.create_wcc(root, b"f", guarded=True), root),
        (NotFound, lambda: store.rename_wcc(root, b"missing", d.oid, b"y"), d.oid),
        (NotFound, lambda: store.lookup_in(root, b"missing"), root),
        (PermissionDenied, lambda: store.write_wcc(f.oid, 0, b"x", Cred(7, 7)), f.oid),
        (PermissionDenied, lambda: store.read_attr(f.oid, 0, 1, Cred(7, 7)), f.oid),
        (Exists, lambda: store.link_wcc(f.oid, root, b"d"), f.oid),
    ]
    for error, call, oid in cases:
        before = store.getattr(oid)
        with pytest.raises(error) as caught:
            call()
        assert caught.value.attrs[oid] == before == store.getattr(oid), error
    with pytest.raises(NotFound) as caught:  # both directories of a rename
        store.rename_wcc(root, b"missing", d.oid, b"y")
    assert caught.value.attrs == {root: store.getattr(root), d.oid: store.getattr(d.oid)}


def test_a_read_only_namespace_refuses_every_change_with_its_attributes(store: Store) -> None:
    root = vm(store)
    f = store.create(root, b"f", 0o644)
    snap = store.root(store.snapshot("vm", "s").id)
    sf = store.lookup(snap, b"f")
    for call, oid in [
        (lambda: store.create_wcc(snap, b"f"), snap),  # even of a name that exists
        (lambda: store.create_wcc(snap, b"new"), snap),
        (lambda: store.setattr_wcc(sf.oid, SetAttr(mode=0o600)), sf.oid),
        (lambda: store.write_wcc(sf.oid, 0, b"x"), sf.oid),
        (lambda: store.remove_wcc(snap, b"f"), snap),
    ]:
        with pytest.raises(ReadOnly) as caught:
            call()
        assert caught.value.attrs[oid] == store.getattr(oid)
    assert store.getattr(f.oid).size == 0


def test_the_reads_of_one_operation_share_a_snapshot(tmp_path: Path) -> None:
    """Inside `reading()` (an NFS call: its handle's export, then the object) every read
    sees the one snapshot it began with, as one transaction would; a change another
    process commits meanwhile shows from the next operation on."""
    from tests.server_helpers import new_data_dir, prism_cli

    data = new_data_dir(tmp_path / "data")
    with Store.open(data, journal=True) as store:
        info = store.namespace("vm")
        with store.reading():
            before = store.export_of(info.id)
            prism_cli(data, "vm", "set", "vm", "--read-only")  # an operator, meanwhile
            assert store.export_of(info.id) == before
            assert store.getattr(info.root).oid == info.root
        assert store.export_of(info.id).read_only and not before.read_only
        with store.reading():  # a batch's reads see the batch, not a snapshot
            store.begin_batch()
            made = store.create(info.root, b"f", 0o644)
            assert store.getattr(made.oid).type == FileType.REG
            store.commit()
