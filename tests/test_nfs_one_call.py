"""One procedure, one store call: each NFS procedure asks the store once (after the handle's
admission check) and builds its reply, wcc data included, from that call's answer; a
failure's wcc data comes from the attributes the failed call carries. In-process, against a
real store on disk, through the real RPC dispatcher, with the NFS test client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prism.nfs import wire as T
from prism.nfs.client import MountClient, NfsClient
from prism.nfs.const import CreateMode, Ftype3, MountStat3, NfsStat3
from prism.nfs.service import NfsService
from prism.store import Store
from prism.store.executor import StoreExecutor
from rpc.server import RpcDispatcher
from tests.test_nfs_table import InProcess

OK = NfsStat3.NFS3_OK
ADMISSION = {"export_of"}
"""The handle check every call makes first (a cached read of the VM's export options)."""
BOOKKEEPING = {
    "in_batch",
    "try_begin_batch",
    "make_durable",
    "commit",
    "journal",
    "segments",
    "reading",
}
"""The executor's own transaction management."""


class Counting:
    """A real store that notes the name of each operation asked of it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if name in BOOKKEEPING or not callable(value):
            return value

        def counted(*args: Any, **kw: Any) -> Any:
            self.asked.append(name)
            return value(*args, **kw)

        return counted


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Counting, NfsClient, T.NfsFh3]]:
    store = Store.open(tmp_path / "data", journal=True)
    try:
        info = store.create_namespace("vm", clients=("127.0.0.1",))
        counting = Counting(store)
        service = NfsService(StoreExecutor(counting))  # type: ignore[arg-type]
        dispatcher = RpcDispatcher()
        dispatcher.add_program(service.program())
        client = NfsClient(rpc=InProcess(dispatcher, ("127.0.0.1", 700)))
        yield counting, client, service.fh(info.root)
    finally:
        store.close()


def asks(counting: Counting, call: Callable[[], Any]) -> tuple[Any, list[str]]:
    counting.asked.clear()
    result = call()
    return result, [name for name in counting.asked if name not in ADMISSION]


def test_each_procedure_asks_the_store_once(
    world: tuple[Counting, NfsClient, T.NfsFh3],
) -> None:
    counting, c, root = world
    f = c.create(root, "f").obj
    d = c.mkdir(root, "d").obj
    assert f is not None and d is not None
    assert c.write(f, 0, b"hello").status == OK
    assert c.symlink(root, "l", "f").status == OK
    link = c.lookup(root, "l").object
    calls: dict[str, Callable[[], Any]] = {
        "GETATTR": lambda: c.getattr(f),
        "SETATTR": lambda: c.setattr(f, T.Sattr3(mode=0o600)),
        "LOOKUP": lambda: c.lookup(root, "f"),
        "ACCESS": lambda: c.access(f, 0x3F),
        "READLINK": lambda: c.readlink(link),
        "READ": lambda: c.read(f, 0, 5),
        "WRITE": lambda: c.write(f, 5, b" world"),
        "CREATE": lambda: c.create(root, "g"),
        "MKDIR": lambda: c.mkdir(root, "e"),
        "SYMLINK": lambda: c.symlink(root, "m", "g"),
        "MKNOD": lambda: c.mknod(root, "p", Ftype3.FIFO),
        "REMOVE": lambda: c.remove(root, "m"),
        "RMDIR": lambda: c.rmdir(root, "e"),
        "RENAME": lambda: c.rename(root, "g", d, "h"),
        "LINK": lambda: c.link(f, root, "f2"),
        "READDIR": lambda: c.readdir(root),
        "READDIRPLUS": lambda: c.readdirplus(root),
        "FSSTAT": lambda: c.fsstat(root),
        "FSINFO": lambda: c.fsinfo(root),
        "PATHCONF": lambda: c.pathconf(root),
        "COMMIT": lambda: c.commit(f),
    }
    for proc, call in calls.items():
        result, asked = asks(counting, call)
        assert result.status == OK, (proc, result.status)
        assert len(asked) == 1, (proc, asked)


def test_a_failure_answers_from_the_failed_call(
    world: tuple[Counting, NfsClient, T.NfsFh3],
) -> None:
    """No second call for the failure body: the failed call's attributes are its wcc data,
    the same before and after (a failure changes nothing)."""
    counting, c, root = world
    assert c.create(root, "f").status == OK
    for proc, call in {
        "REMOVE": lambda: c.remove(root, "missing"),
        "RMDIR": lambda: c.rmdir(root, "missing"),
        "RENAME": lambda: c.rename(root, "missing", root, "x"),
        "MKDIR": lambda: c.mkdir(root, "f"),
        "CREATE": lambda: c.create(root, "f", mode=CreateMode.GUARDED),
    }.items():
        result, asked = asks(counting, call)
        assert result.status != OK and len(asked) == 1, (proc, asked)
        wcc = result.todir_wcc if proc == "RENAME" else result.dir_wcc
        assert wcc.before is not None and wcc.after is not None, proc
        now = c.getattr(root).obj_attributes
        assert wcc.after.mtime == wcc.before.mtime == now.mtime, proc


def test_mnt_asks_the_store_once(tmp_path: Path) -> None:
    """MNT finds the VM and the path in one store call, whatever the answer; a caller the
    VM does not admit learns nothing about its paths (ACCES, not NOENT)."""
    store = Store.open(tmp_path / "data", journal=True)
    try:
        info = store.create_namespace("vm", clients=("127.0.0.1",))
        store.mkdir(info.root, b"d")
        store.create(info.root, b"f")
        counting = Counting(store)
        service = NfsService(StoreExecutor(counting))  # type: ignore[arg-type]
        dispatcher = RpcDispatcher()
        dispatcher.add_program(service.mount_program())
        for peer, path, status in (
            ("127.0.0.1", "/vm", MountStat3.MNT3_OK),
            ("127.0.0.1", "/vm/d", MountStat3.MNT3_OK),
            ("127.0.0.1", "/vm/f", MountStat3.MNT3ERR_NOTDIR),
            ("127.0.0.1", "/vm/missing", MountStat3.MNT3ERR_NOENT),
            ("127.0.0.2", "/vm/missing", MountStat3.MNT3ERR_ACCES),
            ("127.0.0.1", "/nosuchvm", MountStat3.MNT3ERR_NOENT),
        ):
            rpc = InProcess(dispatcher, (peer, 700), (MountClient.PROGRAM, MountClient.VERSION))
            mount = MountClient(rpc=rpc)
            result, asked = asks(counting, lambda m=mount, p=path: m.mnt_raw(p))
            assert result.status == status, (peer, path, result.status)
            assert len(asked) == 1, (path, asked)
    finally:
        store.close()
