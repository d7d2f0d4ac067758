"""The store observer (`api.StoreObserver`, issue #12 item 5): inode and dirent changes are
reported after the nested transaction that made them commits, never for a failed one; a lost
batch says so; and write transactions of non-journal processes bracket the store epoch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prism.store import Store, txn
from prism.store.layers import view_of
from prism.store.records import Inode
from prism.store.tree import get_inode, put_inode
from prism.store.types import ROOT_INO, SetAttr


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def inode_written(self, ns: int, vol: int, ino: int, inode: bytes) -> None:
        self.events.append(("written", ns, vol, ino, Inode.unpack(inode).size))

    def inode_dropped(self, ns: int, vol: int, ino: int) -> None:
        self.events.append(("dropped", ns, vol, ino))

    def dirents_changed(self, ns: int, vol: int, dir_ino: int) -> None:
        self.events.append(("dirents", ns, vol, dir_ino))

    def batch_lost(self) -> None:
        self.events.append(("lost",))


@pytest.fixture
def server_store(tmp_path: Path) -> Iterator[tuple[Store, Recorder, Any]]:
    store = Store.open(tmp_path / "data", journal=True)
    rec = Recorder()
    try:
        info = store.create_namespace("vm")
        store.observer = rec
        yield store, rec, info
    finally:
        store.close()


def test_changes_are_reported_at_commit_and_failed_ones_never(
    server_store: tuple[Store, Recorder, Any],
) -> None:
    store, rec, info = server_store
    store.begin_batch()
    made = store.create(info.root, b"f", 0o644)
    kinds = [e[0] for e in rec.events]
    assert "written" in kinds and ("dirents", info.id, 0, ROOT_INO) in rec.events
    rec.events.clear()
    store.setattr(made.oid, SetAttr(size=42))
    assert ("written", info.id, 0, made.oid.ino, 42) in rec.events
    rec.events.clear()
    ctx = store.ctx
    with pytest.raises(RuntimeError), txn.write(ctx) as t:  # a change, then the operation fails
        view = view_of(ctx, t, info.id)
        node = get_inode(ctx, t, view, 0, made.oid.ino)
        assert node is not None
        node.size = 7
        put_inode(ctx, t, view, 0, made.oid.ino, node)
        assert rec.events == []  # not before the nested commit
        raise RuntimeError("the operation fails after writing")
    assert rec.events == []  # and never for a failed operation, not even later
    store.setattr(made.oid, SetAttr(mode=0o600))
    assert [e for e in rec.events if e[0] == "written"] == [
        ("written", info.id, 0, made.oid.ino, 42)
    ]
    assert store.getattr(made.oid).size == 42
    store.remove(info.root, b"f")
    assert ("dropped", info.id, 0, made.oid.ino) in rec.events
    rec.events.clear()
    store.abort()  # the batch is lost
    assert rec.events == [("lost",)]


def test_operator_writes_bracket_the_epoch_and_the_server_repairs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Store.open(data, journal=True) as server:  # the journal owner's batches never move it
        info = server.create_namespace("vm")
        assert server.epoch is not None
        start = server.epoch.stable()
        assert start is not None
        server.begin_batch()
        server.create(info.root, b"a", 0o644)
        server.commit()
        assert server.epoch.stable() == start
    with Store.open(data) as operator:  # a process without the journal
        epoch = operator.epoch
        assert epoch is not None
        start = epoch.stable()  # (opening may have written: each write moves it by one)
        assert start is not None
        txn.begin_write(operator.ctx)
        assert epoch.stable() is None  # a writer in progress: every table misses
        txn.aborted(operator.ctx, operator.ctx.writer)
        assert epoch.stable() == start + 1  # ended, and moved for good
        operator.set_namespace("vm", quota=1 << 30)
        assert epoch.stable() == start + 2
        txn.begin_write(operator.ctx)
        operator.ctx.epoch_begun = None  # as if it died before setting `ended`
        txn.aborted(operator.ctx, operator.ctx.writer)
        assert epoch.stable() is None
    # the server's next write transaction holds the writer lock, so no writer is in progress:
    # it repairs (here the one it makes as it opens)
    with Store.open(data, journal=True) as server:
        assert server.epoch is not None
        server.begin_batch()
        assert server.epoch.stable() == start + 3
        server.abort()
