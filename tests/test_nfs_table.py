"""The procedure table drives the NFS program, and each procedure's failure body is built
once, from what the call gathered: tested in-process against a real store on disk, through
the real RPC dispatcher (record in, record out), with the NFS test client."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.nfs import wire as T
from prism.nfs.client import NfsClient, auth_sys
from prism.nfs.const import NFS_PROGRAM, NFS_V3, CreateMode, Ftype3, Nfs3Proc, NfsStat3
from prism.nfs.service import NfsService
from prism.store import Store
from prism.store.executor import StoreExecutor
from rpc.message import AcceptedReply, AcceptStat, decode_reply, encode_call
from rpc.server import TRANSPORT_TCP, RpcDispatcher

OK = NfsStat3.NFS3_OK
REPO = Path(__file__).resolve().parent.parent


class InProcess:
    """An `RpcCaller` that hands each call record to a dispatcher, as a transport does."""

    def __init__(
        self,
        dispatcher: RpcDispatcher,
        peer: tuple[str, int],
        program: tuple[int, int] = (NFS_PROGRAM, NFS_V3),
    ) -> None:
        self.dispatcher = dispatcher
        self.peer = peer
        self.program = program
        self.xid = 0
        self.cred = auth_sys(uid=0, gid=0).to_opaque()

    def call(self, proc: int, args: bytes) -> bytes:
        self.xid += 1
        record = encode_call(self.xid, *self.program, proc, args, self.cred)
        reply, _ = asyncio.run(self.dispatcher.handle(record, self.peer, TRANSPORT_TCP))
        assert reply is not None
        decoded = decode_reply(reply)
        assert isinstance(decoded, AcceptedReply) and decoded.stat == AcceptStat.SUCCESS
        return decoded.body


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[NfsService, NfsClient, T.NfsFh3]]:
    store = Store.open(tmp_path / "data", journal=True)
    try:
        info = store.create_namespace("vm", clients=("127.0.0.1",))
        service = NfsService(StoreExecutor(store))
        dispatcher = RpcDispatcher()
        dispatcher.add_program(service.program())
        client = NfsClient(rpc=InProcess(dispatcher, ("127.0.0.1", 700)))
        yield service, client, service.fh(info.root)
    finally:
        store.close()


def test_wire_layer_imports_no_store_types() -> None:
    code = (
        "import sys, prism.nfs.wire, prism.nfs.client; "
        "print(sorted(m for m in sys.modules if m.startswith('prism.store')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_program_is_the_table(world: tuple[NfsService, NfsClient, T.NfsFh3]) -> None:
    """Every row becomes its procedure: handler, name, DRC idempotence, and whether it may
    be answered without waiting (only what never needs durability)."""
    service, _, _ = world
    table = service.program().versions[NFS_V3]
    assert set(T.NFS3_PROCS) == set(Nfs3Proc)
    for proc, row in T.NFS3_PROCS.items():
        procedure = table[proc]
        assert procedure.name == proc.name and callable(getattr(service, row.handler))
        assert procedure.idempotent == row.idempotent
        assert (procedure.immediate is None) == (row.durability is not T.Durability.NONE)
        assert row.writes <= (row.durability is not T.Durability.NONE)
    # The flags that matter: retransmitted changes go through the DRC; reads never wait.
    assert not table[Nfs3Proc.REMOVE].idempotent and table[Nfs3Proc.WRITE].idempotent
    assert table[Nfs3Proc.GETATTR].immediate is not None
    assert table[Nfs3Proc.COMMIT].immediate is None


def test_failure_bodies(world: tuple[NfsService, NfsClient, T.NfsFh3]) -> None:
    """Each procedure's failure carries what its resfail arm allows, gathered by the call:
    wcc_data (before and after) of what it changes, post_op_attr of what it names."""
    _, c, root = world
    made = c.create(root, "f")
    assert made.status == OK and made.obj is not None
    f = made.obj
    assert c.mkdir(root, "d").status == OK

    exists = c.create(root, "f", mode=CreateMode.GUARDED)
    assert exists.status == NfsStat3.NFS3ERR_EXIST
    assert exists.dir_wcc.before is not None and exists.dir_wcc.after is not None

    for res in (c.remove(root, "nope"), c.rmdir(root, "nope")):
        assert res.status == NfsStat3.NFS3ERR_NOENT
        assert res.dir_wcc.before is not None and res.dir_wcc.after is not None

    renamed = c.rename(root, "nope", root, "x")
    assert renamed.status == NfsStat3.NFS3ERR_NOENT
    assert renamed.fromdir_wcc.before is not None and renamed.todir_wcc.after is not None

    lookup = c.lookup(root, "nope")
    assert lookup.status == NfsStat3.NFS3ERR_NOENT and lookup.dir_attributes is not None
    assert lookup.dir_attributes.type == Ftype3.DIR

    read = c.read(root, 0, 10)
    assert read.status == NfsStat3.NFS3ERR_ISDIR and read.file_attributes is not None

    write = c.write(root, 0, b"x")
    assert write.status == NfsStat3.NFS3ERR_ISDIR
    assert write.file_wcc.before is not None and write.file_wcc.after is not None

    badtype = c.mknod(root, "n", Ftype3.DIR)
    assert badtype.status == NfsStat3.NFS3ERR_BADTYPE and badtype.dir_wcc.before is not None

    link = c.link(f, root, "f")
    assert link.status == NfsStat3.NFS3ERR_EXIST
    assert link.file_attributes is not None and link.linkdir_wcc.before is not None

    guard = c.setattr(f, T.Sattr3(mode=0o600), guard=T.NfsTime3(1, 2))
    assert guard.status == NfsStat3.NFS3ERR_NOT_SYNC
    assert guard.obj_wcc.before is not None and guard.obj_wcc.after is not None

    readlink = c.readlink(f)
    assert readlink.status == NfsStat3.NFS3ERR_INVAL and readlink.symlink_attributes is not None


def test_unusable_handles_and_readdir_checks_get_the_status_alone(
    world: tuple[NfsService, NfsClient, T.NfsFh3],
) -> None:
    """A handle that cannot be used tells nothing of any object, not even of the other,
    usable handle of the same call; READDIR's argument checks answer the status alone."""
    _, c, root = world
    f = c.create(root, "f").obj
    assert f is not None
    bogus = T.NfsFh3(b"\x01" * 32)
    assert c.getattr(bogus).status == NfsStat3.NFS3ERR_BADHANDLE
    link = c.link(f, bogus, "g")
    assert link.status == NfsStat3.NFS3ERR_BADHANDLE
    assert link.file_attributes is None and link.linkdir_wcc == T.WCC_EMPTY
    renamed = c.rename(root, "f", bogus, "g")
    assert renamed.status == NfsStat3.NFS3ERR_BADHANDLE
    assert renamed.fromdir_wcc == T.WCC_EMPTY and renamed.todir_wcc == T.WCC_EMPTY

    notdir = c.call(Nfs3Proc.READDIR, T.ReaddirArgs(f, 0, bytes(8), 4096))
    assert notdir == T.ReaddirRes(NfsStat3.NFS3ERR_NOTDIR)
    cookie = c.call(Nfs3Proc.READDIR, T.ReaddirArgs(root, 2**64 - 1, bytes(8), 4096))
    assert cookie == T.ReaddirRes(NfsStat3.NFS3ERR_BAD_COOKIE)


def test_create_of_an_existing_name_is_rofs_wherever_the_directory_is_read_only(
    world: tuple[NfsService, NfsClient, T.NfsFh3],
) -> None:
    """CREATE of an existing name changes nothing, yet on a read-only directory it is
    NFS3ERR_ROFS like every other modifying procedure: in a snapshot, and in a read-only
    share inside a writable VM (whose handles name the writable VM)."""
    service, c, root = world
    store = service.store
    src = store.create_namespace("src")
    pub = store.mkdir(src.root, b"pub", 0o777)
    store.create(pub.oid, b"there", 0o644)
    store.share("src", "/pub", "vm", "/pub")
    shared = c.lookup(root, "pub")
    assert shared.status == OK and shared.object is not None
    assert c.create(root, "f").status == OK
    store.snapshot("vm", "s1")
    snap_root = service.fh(store.namespace("vm@s1").root)
    for directory in (shared.object, snap_root):
        name = "there" if directory == shared.object else "f"
        for mode in (CreateMode.UNCHECKED, CreateMode.EXCLUSIVE):
            res = c.create(directory, name, mode=mode)
            assert res.status == NfsStat3.NFS3ERR_ROFS, (directory, mode, res.status)
            assert res.dir_wcc.before is not None and res.dir_wcc.after is not None
        assert c.create(directory, "new").status == NfsStat3.NFS3ERR_ROFS
