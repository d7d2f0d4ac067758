"""MOUNT and all 22 NFSv3 procedures against a real `prism serve`, over TCP, UDP and VRPC
(shared memory: each client is a channel of its own, bound to the VM it uses).

One server process serves the whole module; each test works in its own directory (or VM),
named after the test and transport, so the tests do not see each other's files.
"""

from __future__ import annotations

import collections
import itertools
import os
import random
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nfs.const import (
    ACCESS3_ALL,
    ACCESS3_DELETE,
    ACCESS3_EXECUTE,
    ACCESS3_EXTEND,
    ACCESS3_LOOKUP,
    ACCESS3_MODIFY,
    ACCESS3_READ,
    FSF3_CANSETTIME,
    FSF3_HOMOGENEOUS,
    FSF3_LINK,
    FSF3_SYMLINK,
    MOUNT_PROGRAM,
    MOUNT_V3,
    NFS_PROGRAM,
    NFS_V3,
    CreateMode,
    MountStat3,
    Nfs3Proc,
    NfsStat3,
    StableHow,
)
from prism.nfs.wire import (
    SATTR_EMPTY,
    CreateArgs,
    DirOpArgs3,
    Fattr3,
    NfsFh3,
    NfsTime3,
    RemoveArgs,
    Sattr3,
    SpecData3,
    WccData,
    decode_result,
    encode_args,
)
from prism.store.types import FileType
from rpc.client import GarbageArgsError, ProcUnavailable, ProgMismatch, RpcClient, raise_for_reply
from rpc.message import decode_reply, peek_xid
from rpc.record import frame
from tests.server_helpers import HOST, PrismProcess, dump_host
from vrpc.client import AttachRefused, ServerGone

MiB = 1 << 20
TRANSPORTS = ["tcp", "udp", "vrpc"]
UDP_IO = 32 * 1024
"""What a datagram carries comfortably; tests over UDP keep single I/Os within this."""
ZERO_VERF = bytes(8)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def srv(prism_module_server: PrismProcess) -> PrismProcess:
    assert prism_module_server.running, (
        "the module's server died:\n" + (prism_module_server.stderr()[-3000:])
    )
    return prism_module_server


@pytest.fixture
def nfs(srv: PrismProcess, transport: str) -> Iterator[NfsClient]:
    with srv.nfs_client(transport) as client:
        yield client


@pytest.fixture
def root_fh(srv: PrismProcess, transport: str) -> NfsFh3:
    return srv.mount("/vm", transport)


_TAGS = itertools.count(1)


@pytest.fixture
def tag(request: pytest.FixtureRequest, transport: str) -> str:
    """A short name unique to this test (and parameters), usable as a VM name."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.originalname.removeprefix("test_").lower())
    return f"{name[:32].strip('-')}-{next(_TAGS)}-{transport}"


@pytest.fixture
def workdir(nfs: NfsClient, root_fh: NfsFh3, tag: str) -> NfsFh3:
    res = nfs.mkdir(root_fh, tag)
    assert res.ok, res.status
    assert res.obj is not None
    return res.obj


# -- helpers -------------------------------------------------------------------------------


def ok(res: Any) -> Any:
    assert res.status == NfsStat3.NFS3_OK, f"{type(res).__name__}: {res.status.name}"
    return res


def ns(t: NfsTime3) -> int:
    return t.to_ns()


def assert_wcc(wcc: WccData, *, changed: bool = True) -> Fattr3:
    """Both halves present; with `changed`, the object's mtime and ctime moved forward."""
    assert wcc.before is not None, "missing pre-op attributes"
    assert wcc.after is not None, "missing post-op attributes"
    if changed:
        assert ns(wcc.after.mtime) > ns(wcc.before.mtime), wcc
        assert ns(wcc.after.ctime) > ns(wcc.before.ctime), wcc
    else:
        assert ns(wcc.after.ctime) == ns(wcc.before.ctime), wcc
    return wcc.after


def fileid(nfs: NfsClient, fh: NfsFh3) -> int:
    attrs = ok(nfs.getattr(fh)).obj_attributes
    return int(attrs.fileid)


def names_of(nfs: NfsClient, dir_fh: NfsFh3) -> set[bytes]:
    return {e.name for e in nfs.listdir(dir_fh)} - {b".", b".."}


def pipelined_creates(srv: PrismProcess, dir_fh: NfsFh3, names: Sequence[bytes]) -> None:
    """CREATE (GUARDED) every name over one TCP connection without waiting between calls,
    so the server group-commits them; asserts every one succeeded."""
    with RpcClient(
        HOST, srv.nfs_port, NFS_PROGRAM, NFS_V3, cred=auth_sys(), timeout=60, reserved_port=True
    ) as rpc:
        records = [
            rpc.encode(
                Nfs3Proc.CREATE,
                encode_args(
                    Nfs3Proc.CREATE,
                    CreateArgs(DirOpArgs3(dir_fh, n), CreateMode.GUARDED, SATTR_EMPTY),
                ),
            )
            for n in names
        ]
        pending = {peek_xid(r): n for r, n in zip(records, names, strict=True)}
        blob = b"".join(frame(r) for r in records)
        sender = threading.Thread(target=rpc.send_raw, args=(blob,), kwargs={"framed": False})
        sender.start()
        try:
            while pending:
                reply = rpc.recv_record()
                name = pending.pop(peek_xid(reply))
                res = decode_result(Nfs3Proc.CREATE, raise_for_reply(decode_reply(reply)))
                assert res.ok, (name, res.status)
        finally:
            sender.join()


# -- MOUNT ---------------------------------------------------------------------------------


def test_mount_mnt_export_dump_umnt(srv: PrismProcess, transport: str, tag: str) -> None:
    srv.cli("vm", "create", f"far-{transport}", "--client", "10.99.0.0/16")
    with srv.mount_client(transport) as m:
        m.null()
        res = m.mnt_raw("/vm")
        assert res.status == MountStat3.MNT3_OK
        assert res.fhandle is not None
        assert 1 in res.auth_flavors  # AUTH_SYS
        # The root handle names the VM's root directory.
        with srv.nfs_client(transport) as nfs:
            root = ok(nfs.getattr(res.fhandle)).obj_attributes
            assert root.type == FileType.DIR
            sub = ok(nfs.mkdir(res.fhandle, tag)).obj
            ok(nfs.create(sub, "file"))
            sub_attrs = ok(nfs.getattr(sub)).obj_attributes

        # A subdirectory is mountable and yields the same object; a file is not.
        sub_fh, _ = m.mnt(f"/vm/{tag}")
        with srv.nfs_client(transport) as nfs:
            assert ok(nfs.getattr(sub_fh)).obj_attributes.fileid == sub_attrs.fileid
        assert m.mnt_raw(f"/vm/{tag}/file").status == MountStat3.MNT3ERR_NOTDIR
        assert m.mnt_raw(f"/vm/{tag}/missing").status == MountStat3.MNT3ERR_NOENT

        # VMs not bound to 127.0.0.1, and VMs that do not exist.
        far = m.mnt_raw(f"/far-{transport}")
        assert far.status == MountStat3.MNT3ERR_ACCES
        assert far.fhandle is None
        assert m.mnt_raw("/no-such-vm").status == MountStat3.MNT3ERR_NOENT
        for path in ("/", "", "//", "x" * 600, "/vm/" + "y" * 600, "/vm/a\0b", "/VM", "/v m"):
            assert m.mnt_raw(path).status == MountStat3.MNT3ERR_NOENT, path

        exports = dict(m.export())
        opts = b"(rw,secure,no_root_squash)"  # each group: a CIDR and the options
        assert exports[b"/vm"] == (b"127.0.0.0/8" + opts, b"::1/128" + opts)
        assert f"/far-{transport}".encode() not in exports  # not ours to mount, or to see

        # DUMP lists what we mounted; UMNT forgets it, UMNTALL forgets all of ours.
        me = dump_host(m)
        dump = m.dump()
        assert (me, f"/vm/{tag}".encode()) in dump
        assert (me, b"/vm") in dump
        assert not any(d.startswith(f"/far-{transport}".encode()) for _, d in dump)
        m.mnt(f"//vm//{tag}/./")  # one directory, one DUMP entry, however it is spelled
        assert [d for _, d in m.dump()].count(f"/vm/{tag}".encode()) == 1
        m.umnt(f"/vm/{tag}/")
        dump = m.dump()
        assert (me, f"/vm/{tag}".encode()) not in dump
        assert (me, b"/vm") in dump
        m.umntall()
        assert not [d for h, d in m.dump() if h == me]


def test_rebinding_a_vm_revokes_its_handles(srv: PrismProcess, transport: str, tag: str) -> None:
    srv.cli("vm", "create", tag)
    root = srv.mount(f"/{tag}", transport)
    with srv.nfs_client(transport, vm=tag) as nfs:
        f = ok(nfs.create(root, "f")).obj
        if transport == "vrpc":  # a channel's binding is its peer's uid: another one detaches it
            srv.cli("vm", "set", tag, "--vrpc-user", "1001")
            with pytest.raises(ServerGone, match="principals changed"):
                nfs.getattr(f)
            with pytest.raises(AttachRefused):
                srv.mount(f"/{tag}", transport)
            srv.cli("vm", "set", tag, "--vrpc-user", "none")
            with srv.nfs_client(transport, vm=tag) as again:
                ok(again.getattr(f))
            return
        srv.cli("vm", "set", tag, "--client", "10.99.0.0/16")
        assert nfs.getattr(f).status == NfsStat3.NFS3ERR_ACCES
        assert nfs.lookup(root, "f").status == NfsStat3.NFS3ERR_ACCES
        assert nfs.write(f, 0, b"x").status == NfsStat3.NFS3ERR_ACCES
        with srv.mount_client(transport) as m:
            assert m.mnt_raw(f"/{tag}").status == MountStat3.MNT3ERR_ACCES
        srv.cli("vm", "set", tag, "--client", "127.0.0.1/32")
        ok(nfs.getattr(f))


def test_rpc_level_errors(srv: PrismProcess, transport: str) -> None:
    with srv.rpc_client(NFS_PROGRAM, NFS_V3, transport) as rpc:
        rpc.call(Nfs3Proc.NULL)
        with pytest.raises(ProcUnavailable):
            rpc.call(22)
        with pytest.raises(GarbageArgsError):
            rpc.call(Nfs3Proc.GETATTR, b"\x00\x00")
    with srv.rpc_client(NFS_PROGRAM, 2, transport) as rpc:
        with pytest.raises(ProgMismatch) as info:
            rpc.call(0)
        assert (info.value.low, info.value.high) == (3, 3)
    with srv.rpc_client(MOUNT_PROGRAM, MOUNT_V3, transport) as rpc:
        rpc.call(0)


# -- files: CREATE, WRITE, READ, COMMIT, SETATTR ---------------------------------------------


def test_create_write_read(nfs: NfsClient, workdir: NfsFh3, transport: str) -> None:
    res = ok(nfs.create(workdir, "data", Sattr3(mode=0o640)))
    assert res.obj is not None
    attrs = res.obj_attributes
    assert attrs.type == FileType.REG
    assert attrs.mode == 0o640
    assert (attrs.size, attrs.uid, attrs.gid, attrs.nlink) == (0, 0, 0, 1)
    assert attrs.fileid != 0
    dir_after = assert_wcc(res.dir_wcc)
    assert dir_after.fileid == fileid(nfs, workdir)
    fh = res.obj

    io = UDP_IO if transport == "udp" else MiB
    payload = os.urandom(io)
    w = ok(nfs.write(fh, 0, payload, StableHow.FILE_SYNC))
    assert w.count == len(payload)
    assert w.committed == StableHow.FILE_SYNC
    assert len(w.verf) == 8
    assert w.file_wcc.before is not None and w.file_wcc.before.size == 0
    assert w.file_wcc.after is not None and w.file_wcc.after.size == len(payload)

    # A sparse write past the end: the gap reads back as zeros.
    tail = b"tail-bytes"
    gap_at = len(payload) + 5000
    w2 = ok(nfs.write(fh, gap_at, tail))
    assert w2.file_wcc.before is not None and w2.file_wcc.before.size == len(payload)
    assert w2.file_wcc.after is not None and w2.file_wcc.after.size == gap_at + len(tail)
    assert w2.verf == w.verf

    r = ok(nfs.read(fh, 0, io))
    assert r.data == payload  # one READ of rtmax bytes
    assert not r.eof
    assert r.file_attributes is not None and r.file_attributes.size == gap_at + len(tail)
    whole = nfs.read_all(fh, chunk=min(io, 64 * 1024))
    assert whole == payload + bytes(5000) + tail
    r = ok(nfs.read(fh, gap_at, 100))
    assert (r.data, r.eof) == (tail, True)
    r = ok(nfs.read(fh, gap_at + 10_000, 100))
    assert (r.data, r.eof) == (b"", True)

    # A READ asking for more than the transport carries (UDP) is shortened, never refused.
    r = ok(nfs.read(fh, 0, MiB))
    assert len(r.data) == io
    assert r.data == payload[: len(r.data)]

    # Regular-file operations on a directory and vice versa.
    assert nfs.read(workdir, 0, 10).status == NfsStat3.NFS3ERR_ISDIR
    assert nfs.write(workdir, 0, b"x").status in (NfsStat3.NFS3ERR_ISDIR, NfsStat3.NFS3ERR_INVAL)
    assert nfs.lookup(fh, "x").status == NfsStat3.NFS3ERR_NOTDIR
    assert nfs.create(fh, "x").status == NfsStat3.NFS3ERR_NOTDIR


def test_unstable_write_and_commit(nfs: NfsClient, workdir: NfsFh3) -> None:
    fh = ok(nfs.create(workdir, "unstable")).obj
    w1 = ok(nfs.write(fh, 0, b"a" * 1000, StableHow.UNSTABLE))
    w2 = ok(nfs.write(fh, 1000, b"b" * 1000, StableHow.UNSTABLE))
    assert w1.committed in (StableHow.UNSTABLE, StableHow.DATA_SYNC, StableHow.FILE_SYNC)
    assert w1.count == w2.count == 1000
    assert w1.verf == w2.verf
    assert nfs.read_all(fh) == b"a" * 1000 + b"b" * 1000  # visible before COMMIT
    c = ok(nfs.commit(fh, 0, 0))
    assert c.verf == w1.verf
    after = assert_wcc(c.file_wcc, changed=False)
    assert after.size == 2000
    c2 = ok(nfs.commit(fh, 500, 100))
    assert c2.verf == w1.verf
    w3 = ok(nfs.write(fh, 0, b"c", StableHow.DATA_SYNC))
    assert w3.committed in (StableHow.DATA_SYNC, StableHow.FILE_SYNC)
    assert w3.verf == w1.verf
    assert nfs.commit(workdir).status in (NfsStat3.NFS3_OK, NfsStat3.NFS3ERR_ISDIR)


def minor_faults(pid: int) -> int:
    """A process's minor page faults so far (field 10 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[7])


def test_large_writes_reuse_heap_buffers(srv: PrismProcess) -> None:
    """1 MiB WRITE records do not fault in fresh pages each time: the server keeps large
    buffers on the heap (glibc's default mmap()s them, ~500 faults per MiB, half the CPU of a
    sequential write). Counted from /proc, so the test is about memory, not timing."""
    assert srv.proc is not None
    with srv.nfs_client("tcp") as nfs:
        fh = ok(nfs.create(srv.mount("/vm"), "heap-reuse")).obj
        blocks = [os.urandom(MiB) for _ in range(4)]
        for i, block in enumerate(blocks):  # warm up: the heap grows to its working size
            ok(nfs.write(fh, i * MiB, block, StableHow.UNSTABLE))
        before = minor_faults(srv.proc.pid)
        written = 32
        for i in range(written):
            data = blocks[i % 4][i:] + blocks[i % 4][:i]
            ok(nfs.write(fh, i * MiB, data, StableHow.UNSTABLE))
        faults = minor_faults(srv.proc.pid) - before
        ok(nfs.commit(fh))
    assert faults < written * 32, f"{faults} page faults for {written} MiB written"


def test_setattr_and_guard(
    srv: PrismProcess, nfs: NfsClient, workdir: NfsFh3, transport: str
) -> None:
    fh = ok(nfs.create(workdir, "attrs", Sattr3(mode=0o600))).obj
    ok(nfs.write(fh, 0, b"0123456789"))
    res = ok(nfs.setattr(fh, Sattr3(mode=0o751, uid=1234, gid=4321)))
    after = res.obj_wcc.after
    assert res.obj_wcc.before is not None and after is not None
    assert (after.mode, after.uid, after.gid) == (0o751, 1234, 4321)
    assert ns(after.ctime) > ns(res.obj_wcc.before.ctime)

    # Truncate and extend.
    res = ok(nfs.setattr(fh, Sattr3(size=4)))
    assert res.obj_wcc.before is not None and res.obj_wcc.before.size == 10
    assert res.obj_wcc.after is not None and res.obj_wcc.after.size == 4
    ok(nfs.setattr(fh, Sattr3(size=8)))
    assert nfs.read_all(fh) == b"0123" + bytes(4)

    # Client-supplied times.
    when = NfsTime3(1_600_000_000, 123_456_789)
    res = ok(nfs.setattr(fh, Sattr3(atime=when, mtime=when)))
    got = ok(nfs.getattr(fh)).obj_attributes
    assert got.mtime == when and got.atime == when

    # The guard: the current ctime passes, any other value is NOT_SYNC and changes nothing.
    ctime = got.ctime
    stale = NfsTime3(ctime.seconds, (ctime.nseconds + 1) % 1_000_000_000)
    res = nfs.setattr(fh, Sattr3(mode=0o600), guard=stale)
    assert res.status == NfsStat3.NFS3ERR_NOT_SYNC
    assert res.obj_wcc.after is not None and res.obj_wcc.after.mode == 0o751
    assert ok(nfs.getattr(fh)).obj_attributes.mode == 0o751
    res = ok(nfs.setattr(fh, Sattr3(mode=0o600), guard=ctime))
    assert res.obj_wcc.after is not None and res.obj_wcc.after.mode == 0o600

    assert nfs.setattr(workdir, Sattr3(size=0)).status == NfsStat3.NFS3ERR_ISDIR
    # A non-owner cannot chmod.
    with srv.nfs_client(transport, cred=auth_sys(uid=999, gid=999)) as other:
        assert other.setattr(fh, Sattr3(mode=0o777)).status == NfsStat3.NFS3ERR_PERM


def test_create_modes(nfs: NfsClient, workdir: NfsFh3) -> None:
    # UNCHECKED: creates, and on an existing file applies the size (truncation) only.
    first = ok(nfs.create(workdir, "u", Sattr3(mode=0o600)))
    ok(nfs.write(first.obj, 0, b"content"))
    again = ok(nfs.create(workdir, "u", Sattr3(mode=0o644, size=0)))
    assert again.obj_attributes.fileid == first.obj_attributes.fileid
    assert again.obj_attributes.size == 0
    ok(nfs.write(first.obj, 0, b"content"))
    again = ok(nfs.create(workdir, "u", Sattr3(mode=0o644)))
    assert again.obj_attributes.size == 7

    # GUARDED: EXIST if the name is taken, with the directory's wcc data.
    res = nfs.create(workdir, "u", mode=CreateMode.GUARDED)
    assert res.status == NfsStat3.NFS3ERR_EXIST
    assert res.obj is None
    assert res.dir_wcc.after is not None
    g = ok(nfs.create(workdir, "g", Sattr3(mode=0o604), mode=CreateMode.GUARDED))
    assert g.obj_attributes.mode == 0o604

    # EXCLUSIVE: a retry with the same verifier succeeds with the same object; another
    # verifier (another client's create) gets EXIST.
    verf = os.urandom(8)
    ex = ok(nfs.create(workdir, "x", mode=CreateMode.EXCLUSIVE, verf=verf))
    retry = ok(nfs.create(workdir, "x", mode=CreateMode.EXCLUSIVE, verf=verf))
    assert retry.obj_attributes.fileid == ex.obj_attributes.fileid
    assert retry.obj == ex.obj
    other = nfs.create(workdir, "x", mode=CreateMode.EXCLUSIVE, verf=os.urandom(8))
    assert other.status == NfsStat3.NFS3ERR_EXIST
    assert nfs.create(workdir, "u", mode=CreateMode.EXCLUSIVE).status == NfsStat3.NFS3ERR_EXIST
    # The client then sets the attributes; the file behaves like any other.
    ok(nfs.setattr(ex.obj, Sattr3(mode=0o640, size=0)))
    ok(nfs.write(ex.obj, 0, b"exclusive"))
    assert nfs.read_all(ex.obj) == b"exclusive"
    assert ok(nfs.getattr(ex.obj)).obj_attributes.mode == 0o640
    assert names_of(nfs, workdir) == {b"u", b"g", b"x"}


def test_create_in_the_way_of_a_directory(nfs: NfsClient, workdir: NfsFh3) -> None:
    ok(nfs.mkdir(workdir, "d"))
    assert nfs.create(workdir, "d").status in (NfsStat3.NFS3ERR_ISDIR, NfsStat3.NFS3ERR_EXIST)
    assert nfs.mkdir(workdir, "d").status == NfsStat3.NFS3ERR_EXIST


# -- LOOKUP, ACCESS ------------------------------------------------------------------------


def test_lookup(nfs: NfsClient, root_fh: NfsFh3, workdir: NfsFh3) -> None:
    f = ok(nfs.create(workdir, "f")).obj
    res = ok(nfs.lookup(workdir, "f"))
    assert res.object == f
    assert res.obj_attributes.type == FileType.REG
    assert res.dir_attributes is not None and res.dir_attributes.fileid == fileid(nfs, workdir)
    missing = nfs.lookup(workdir, "missing")
    assert missing.status == NfsStat3.NFS3ERR_NOENT
    assert missing.object is None
    assert missing.dir_attributes is not None  # post-op attributes on failure too

    # '.' is the directory, '..' its parent; at the export root '..' stays at the root.
    root_id = fileid(nfs, root_fh)
    assert ok(nfs.lookup(workdir, ".")).obj_attributes.fileid == fileid(nfs, workdir)
    assert ok(nfs.lookup(workdir, "..")).obj_attributes.fileid == root_id
    up = ok(nfs.lookup(root_fh, ".."))
    assert up.obj_attributes.fileid == root_id
    assert up.object is not None
    assert ok(nfs.lookup(up.object, "..")).obj_attributes.fileid == root_id
    assert nfs.walk(root_fh, "../../..") is not None
    assert fileid(nfs, nfs.walk(root_fh, "../../..")) == root_id


def test_access_for_owner_and_others(
    srv: PrismProcess, nfs: NfsClient, workdir: NfsFh3, transport: str
) -> None:
    files = {}
    for mode in (0o644, 0o600, 0o666, 0o755, 0o060):
        files[mode] = ok(nfs.create(workdir, f"m{mode:o}", Sattr3(mode=mode, gid=50))).obj
    rw = ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND
    with (
        srv.nfs_client(transport, cred=auth_sys(uid=1000, gid=1000)) as other,
        srv.nfs_client(transport, cred=auth_sys(uid=1000, gid=1000, gids=[50])) as member,
    ):
        expect_other = {
            0o644: ACCESS3_READ,
            0o600: 0,
            0o666: rw,
            0o755: ACCESS3_READ | ACCESS3_EXECUTE,
            0o060: 0,
        }
        for mode, fh in files.items():
            res = ok(other.access(fh, ACCESS3_ALL))
            assert res.access == expect_other[mode], oct(mode)
            assert res.obj_attributes is not None and res.obj_attributes.mode == mode
            # Root gets read and write whatever the bits.
            assert ok(nfs.access(fh, ACCESS3_ALL)).access & rw == rw
        # Only the bits asked for are answered.
        assert ok(other.access(files[0o666], ACCESS3_READ)).access == ACCESS3_READ
        # A supplementary group gets the group bits.
        assert ok(member.access(files[0o060], ACCESS3_ALL)).access == rw
        # Directories: others may list and search a 0755 directory but not change it.
        dir_bits = ok(other.access(workdir, ACCESS3_ALL)).access
        assert dir_bits == ACCESS3_READ | ACCESS3_LOOKUP
        assert ok(nfs.access(workdir, ACCESS3_ALL)).access & ACCESS3_DELETE
        # ... and what ACCESS says is what the server enforces.
        assert other.write(files[0o644], 0, b"x").status == NfsStat3.NFS3ERR_ACCES
        assert other.read(files[0o600], 0, 1).status == NfsStat3.NFS3ERR_ACCES
        ok(other.write(files[0o666], 0, b"x"))
        assert other.create(workdir, "nope").status == NfsStat3.NFS3ERR_ACCES
        assert other.remove(workdir, "m644").status == NfsStat3.NFS3ERR_ACCES


# -- names, links, directories -------------------------------------------------------------


def test_link_rename_remove_rmdir(nfs: NfsClient, workdir: NfsFh3) -> None:
    a = ok(nfs.mkdir(workdir, "a", Sattr3(mode=0o750)))
    assert a.obj_attributes.type == FileType.DIR
    assert a.obj_attributes.mode == 0o750
    assert a.obj_attributes.nlink == 2
    assert_wcc(a.dir_wcc)
    assert ok(nfs.getattr(workdir)).obj_attributes.nlink == 3  # '..' of the new directory
    b = ok(nfs.mkdir(workdir, "b")).obj
    f = ok(nfs.create(a.obj, "f")).obj
    ok(nfs.write(f, 0, b"linked"))

    # LINK: a second name for the same object.
    res = ok(nfs.link(f, b, "f2"))
    assert res.file_attributes is not None and res.file_attributes.nlink == 2
    assert_wcc(res.linkdir_wcc)
    assert ok(nfs.lookup(b, "f2")).obj_attributes.fileid == fileid(nfs, f)
    assert nfs.link(f, b, "f2").status == NfsStat3.NFS3ERR_EXIST
    assert nfs.link(a.obj, b, "dirlink").status == NfsStat3.NFS3ERR_ISDIR

    # RENAME across directories: handles name objects, so they survive it.
    res = ok(nfs.rename(a.obj, "f", b, "moved"))
    assert_wcc(res.fromdir_wcc)
    assert_wcc(res.todir_wcc)
    assert nfs.lookup(a.obj, "f").status == NfsStat3.NFS3ERR_NOENT
    assert nfs.read_all(f) == b"linked"
    assert ok(nfs.lookup(b, "moved")).object == f
    # RENAME onto an existing file replaces it; the replaced object's handle goes stale.
    victim = ok(nfs.create(b, "victim")).obj
    ok(nfs.rename(b, "moved", b, "victim"))
    assert nfs.getattr(victim).status == NfsStat3.NFS3ERR_STALE
    assert ok(nfs.lookup(b, "victim")).object == f
    assert nfs.rename(b, "missing", b, "x").status == NfsStat3.NFS3ERR_NOENT
    # A directory cannot move into itself, nor replace a non-empty directory.
    assert nfs.rename(workdir, "a", a.obj, "inside").status == NfsStat3.NFS3ERR_INVAL
    ok(nfs.create(a.obj, "keep"))
    ok(nfs.mkdir(workdir, "c"))
    assert nfs.rename(workdir, "c", workdir, "a").status in (
        NfsStat3.NFS3ERR_NOTEMPTY,
        NfsStat3.NFS3ERR_EXIST,
    )
    assert nfs.rename(workdir, "c", b, "victim").status == NfsStat3.NFS3ERR_NOTDIR

    # REMOVE one link: the other name keeps the data, nlink drops.
    res = ok(nfs.remove(b, "victim"))
    assert_wcc(res.dir_wcc)
    assert ok(nfs.getattr(f)).obj_attributes.nlink == 1
    assert nfs.read_all(ok(nfs.lookup(b, "f2")).object) == b"linked"
    ok(nfs.remove(b, "f2"))
    assert nfs.getattr(f).status == NfsStat3.NFS3ERR_STALE
    res = nfs.remove(b, "f2")
    assert res.status == NfsStat3.NFS3ERR_NOENT
    assert res.dir_wcc.after is not None
    assert nfs.remove(workdir, "a").status == NfsStat3.NFS3ERR_ISDIR

    # RMDIR: only empty directories, only directories.
    res = nfs.rmdir(workdir, "a")
    assert res.status == NfsStat3.NFS3ERR_NOTEMPTY
    assert res.dir_wcc.after is not None
    assert nfs.rmdir(a.obj, "keep").status == NfsStat3.NFS3ERR_NOTDIR
    ok(nfs.remove(a.obj, "keep"))
    res = ok(nfs.rmdir(workdir, "a"))
    assert_wcc(res.dir_wcc)
    assert nfs.getattr(a.obj).status == NfsStat3.NFS3ERR_STALE
    assert names_of(nfs, workdir) == {b"b", b"c"}


def test_symlink_readlink_mknod(nfs: NfsClient, workdir: NfsFh3) -> None:
    target = b"../some/where/else with spaces"
    res = ok(nfs.symlink(workdir, "ln", target))
    assert res.obj_attributes.type == FileType.LNK
    assert res.obj_attributes.size == len(target)
    assert_wcc(res.dir_wcc)
    rl = ok(nfs.readlink(res.obj))
    assert rl.data == target
    assert rl.symlink_attributes is not None and rl.symlink_attributes.type == FileType.LNK
    assert nfs.symlink(workdir, "ln", b"x").status == NfsStat3.NFS3ERR_EXIST
    f = ok(nfs.create(workdir, "plain")).obj
    assert nfs.readlink(f).status == NfsStat3.NFS3ERR_INVAL

    fifo = ok(nfs.mknod(workdir, "fifo", FileType.FIFO, Sattr3(mode=0o620)))
    assert fifo.obj_attributes.type == FileType.FIFO
    assert fifo.obj_attributes.mode == 0o620
    assert_wcc(fifo.dir_wcc)
    assert ok(nfs.lookup(workdir, "fifo")).obj_attributes.type == FileType.FIFO
    chr_ = ok(nfs.mknod(workdir, "null", FileType.CHR, Sattr3(mode=0o666), SpecData3(1, 3)))
    assert chr_.obj_attributes.type == FileType.CHR
    assert chr_.obj_attributes.rdev == SpecData3(1, 3)
    sock = ok(nfs.mknod(workdir, "sock", FileType.SOCK))
    assert sock.obj_attributes.type == FileType.SOCK
    bad = nfs.mknod(workdir, "reg", FileType.REG)
    assert bad.status == NfsStat3.NFS3ERR_BADTYPE
    assert nfs.mknod(workdir, "fifo", FileType.FIFO).status == NfsStat3.NFS3ERR_EXIST
    kinds = {e.name: e.name_attributes.type for e in nfs.listdir(workdir) if e.name_attributes}
    assert kinds[b"ln"] == FileType.LNK
    assert kinds[b"fifo"] == FileType.FIFO
    assert kinds[b"null"] == FileType.CHR


@pytest.mark.parametrize("name", [b"a/b", b"/", b"a\x00b", b"\x00", b""], ids=repr)
def test_bad_names_are_refused(nfs: NfsClient, workdir: NfsFh3, name: bytes) -> None:
    f = ok(nfs.create(workdir, "ok")).obj
    refused = NfsStat3.NFS3ERR_INVAL, NfsStat3.NFS3ERR_NOENT, NfsStat3.NFS3ERR_ACCES
    results = {
        "create": nfs.create(workdir, name),
        "create-guarded": nfs.create(workdir, name, mode=CreateMode.GUARDED),
        "create-exclusive": nfs.create(workdir, name, mode=CreateMode.EXCLUSIVE),
        "mkdir": nfs.mkdir(workdir, name),
        "symlink": nfs.symlink(workdir, name, b"target"),
        "mknod": nfs.mknod(workdir, name, FileType.FIFO),
        "lookup": nfs.lookup(workdir, name),
        "remove": nfs.remove(workdir, name),
        "rmdir": nfs.rmdir(workdir, name),
        "link": nfs.link(f, workdir, name),
        "rename-to": nfs.rename(workdir, "ok", workdir, name),
        "rename-from": nfs.rename(workdir, name, workdir, "other"),
    }
    for what, res in results.items():
        assert res.status in refused, (what, res.status)
    # Nothing was created, nothing was lost, and the server still answers.
    assert names_of(nfs, workdir) == {b"ok"}
    nfs.null()
    ok(nfs.getattr(f))


def test_name_length_limit(nfs: NfsClient, workdir: NfsFh3) -> None:
    longest = b"n" * 255
    ok(nfs.create(workdir, longest))
    ok(nfs.lookup(workdir, longest))
    # XDR limits names to NFS3_MAXNAMLEN; a longer one is refused (Linux's knfsd: garbage
    # args), never stored.
    try:
        res = nfs.create(workdir, b"n" * 256)
    except GarbageArgsError:
        pass
    else:
        assert res.status == NfsStat3.NFS3ERR_NAMETOOLONG
    assert names_of(nfs, workdir) == {longest}


# -- READDIR / READDIRPLUS -----------------------------------------------------------------


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
def test_readdir_paging_while_the_directory_changes(
    srv: PrismProcess, nfs: NfsClient, workdir: NfsFh3, plus: bool
) -> None:
    original = [f"entry-{i:05d}".encode() for i in range(2000)]
    pipelined_creates(srv, workdir, original)
    rng = random.Random(20240601 + plus)
    present = set(original)
    removed_unseen: set[bytes] = set()
    added: set[bytes] = set()
    seen: list[bytes] = []
    fileids: dict[bytes, int] = {}
    cookie, verf = 0, ZERO_VERF
    pages = 0

    def page(cookie: int, verf: bytes) -> Any:
        if plus:
            return nfs.readdirplus(workdir, cookie, verf, dircount=2048, maxcount=8192)
        return nfs.readdir(workdir, cookie, verf, count=2048)

    while True:
        res = page(cookie, verf)
        assert res.status == NfsStat3.NFS3_OK, f"page {pages}: {res.status.name}"
        assert res.dir_attributes is not None and res.dir_attributes.type == FileType.DIR
        pages += 1
        for e in res.entries:
            seen.append(e.name)
            fileids[e.name] = e.fileid
            if plus and e.name not in (b".", b".."):
                assert e.name_attributes is not None and e.name_handle is not None
                assert e.name_attributes.fileid == e.fileid
        if res.eof:
            break
        assert res.entries, "a page with no entries and no EOF"
        cookie, verf = res.entries[-1].cookie, res.cookieverf
        # Between pages: remove the entry the cookie points at (no BAD_COOKIE may follow),
        # some entries not yet returned (they must not appear), some already returned, and
        # add new ones (which may or may not appear, but at most once).
        seen_set = set(seen)
        last = res.entries[-1].name
        doomed = {last} if last in present else set()
        unseen = sorted(present - seen_set)
        doomed |= set(rng.sample(unseen, min(2, len(unseen))))
        done = sorted(present & seen_set)
        doomed |= set(rng.sample(done, min(1, len(done))))
        for name in doomed:
            ok(nfs.remove(workdir, name))
            present.discard(name)
            if name not in seen_set:
                removed_unseen.add(name)
        for _ in range(2):
            name = f"new-{len(added):04d}-{rng.randrange(10**6)}".encode()
            ok(nfs.create(workdir, name))
            added.add(name)
            present.add(name)

    assert pages > 20, f"only {pages} pages: the test must page"
    assert seen[:2] == [b".", b".."]
    listed = seen[2:]
    duplicates = [n for n, k in collections.Counter(listed).items() if k > 1]
    assert not duplicates, f"entries returned twice: {sorted(duplicates)[:10]}"
    stable = set(original) - (set(original) - present) - removed_unseen
    skipped = stable - set(listed)
    assert not skipped, f"entries never returned: {sorted(skipped)[:10]}"
    assert not (set(listed) & removed_unseen), "entries removed before their page appeared"
    assert set(listed) <= set(original) | added
    assert len({fileids[n] for n in listed}) == len(listed), "fileids are not unique"

    # A fresh listing shows exactly the directory as it is now.
    assert names_of(nfs, workdir) == present
    for name in rng.sample(sorted(present & set(listed)), 20):
        assert ok(nfs.lookup(workdir, name)).obj_attributes.fileid == fileids[name]


def test_readdirplus_attributes_are_current_after_changes(nfs: NfsClient, workdir: NfsFh3) -> None:
    """READDIRPLUS keeps encoded entries between listings; what it returns must still be
    exactly what GETATTR says after each kind of change (mode, size, times, links, a rename
    and a new object reusing the name)."""

    def listing() -> dict[bytes, Any]:
        res = ok(nfs.readdirplus(workdir, maxcount=65536))
        assert res.eof
        return {e.name: e for e in res.entries if e.name not in (b".", b"..")}

    def assert_current(entries: dict[bytes, Any]) -> None:
        for name, e in entries.items():
            now = ok(nfs.getattr(e.name_handle)).obj_attributes
            assert e.name_attributes == now, name

    fhs = {f"f{i}".encode(): ok(nfs.create(workdir, f"f{i}")).obj for i in range(4)}
    first = listing()
    assert set(first) == set(fhs)
    assert_current(first)
    assert listing() == first  # nothing changed: the same bytes again

    ok(nfs.setattr(fhs[b"f0"], Sattr3(mode=0o600)))
    ok(nfs.write(fhs[b"f1"], 0, b"grown", StableHow.FILE_SYNC))
    ok(nfs.link(fhs[b"f2"], workdir, "f2-link"))
    ok(nfs.rename(workdir, "f3", workdir, "f3-renamed"))
    second = listing()
    assert set(second) == {b"f0", b"f1", b"f2", b"f2-link", b"f3-renamed"}
    assert second[b"f0"].name_attributes.mode == 0o600
    assert second[b"f1"].name_attributes.size == 5
    assert second[b"f2"].name_attributes.nlink == second[b"f2-link"].name_attributes.nlink == 2
    assert second[b"f3-renamed"].fileid == first[b"f3"].fileid
    assert_current(second)

    ok(nfs.remove(workdir, "f0"))
    new = ok(nfs.mkdir(workdir, "f0")).obj
    third = listing()
    assert third[b"f0"].name_attributes.type == FileType.DIR
    assert third[b"f0"].name_handle == new
    assert third[b"f0"].fileid != first[b"f0"].fileid
    assert_current(third)


def test_readdir_sizes(srv: PrismProcess, nfs: NfsClient, workdir: NfsFh3, transport: str) -> None:
    names = [f"f{i}".encode() for i in range(600)]
    pipelined_creates(srv, workdir, names)
    assert nfs.readdir(workdir, count=60).status == NfsStat3.NFS3ERR_TOOSMALL
    assert nfs.readdirplus(workdir, dircount=60, maxcount=60).status == (NfsStat3.NFS3ERR_TOOSMALL)
    # 600 entries with attributes and handles are ~100 KiB: more than a datagram holds.
    # Asked for 1 MiB, the server sends what the transport carries, never SYSTEM_ERR.
    big = ok(nfs.readdirplus(workdir, dircount=MiB, maxcount=MiB))
    if transport != "udp":
        assert big.eof and len(big.entries) == 602
    else:
        assert not big.eof and 100 < len(big.entries) < 602
    assert ok(nfs.readdir(workdir, count=MiB)).entries[-1].name in names
    assert {e.name for e in nfs.listdir(workdir, maxcount=MiB)} == {b".", b"..", *names}
    res = nfs.readdir(ok(nfs.lookup(workdir, "f1")).object)
    assert res.status == NfsStat3.NFS3ERR_NOTDIR
    # A cookie whose entry was removed, and one the server never issued, are not errors.
    entries = ok(nfs.readdir(workdir, count=4096)).entries
    ok(nfs.remove(workdir, entries[5].name))
    rest = ok(nfs.readdir(workdir, entries[5].cookie, count=4096)).entries
    assert [e.name for e in rest[: len(entries) - 6]] == [e.name for e in entries[6:]]
    ok(nfs.readdir(workdir, cookie=0xDEAD_BEEF_1234))


# -- FSSTAT, FSINFO, PATHCONF --------------------------------------------------------------


def test_fsinfo_fsstat_pathconf(nfs: NfsClient, root_fh: NfsFh3, transport: str) -> None:
    info = ok(nfs.fsinfo(root_fh))
    assert info.obj_attributes is not None and info.obj_attributes.type == FileType.DIR
    if transport != "udp":
        assert info.rtmax == MiB
        assert info.wtmax == MiB
    else:  # a reply must fit one datagram
        assert 8192 <= info.rtmax <= 65536
        assert 8192 <= info.wtmax <= 65536
    assert 0 < info.rtpref <= info.rtmax and 0 < info.wtpref <= info.wtmax
    assert info.rtmult > 0 and info.wtmult > 0 and info.dtpref > 0
    assert info.maxfilesize >= 1 << 40
    assert 0 < info.time_delta.to_ns() <= 1_000_000_000
    want = FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME
    assert info.properties & want == want

    st = ok(nfs.fsstat(root_fh))
    assert st.obj_attributes is not None
    assert st.tbytes >= st.fbytes >= st.abytes > 0
    assert st.tfiles >= st.ffiles >= st.afiles > 0
    assert st.invarsec == 0

    pc = ok(nfs.pathconf(root_fh))
    assert pc.obj_attributes is not None
    assert pc.name_max == 255
    assert pc.linkmax > 1
    assert pc.no_trunc and pc.chown_restricted and pc.case_preserving
    assert not pc.case_insensitive


def test_quota_shows_in_fsstat_and_is_enforced(srv: PrismProcess, transport: str, tag: str) -> None:
    srv.cli("vm", "create", tag, "--quota", "1M")
    root = srv.mount(f"/{tag}", transport)
    with srv.nfs_client(transport, vm=tag) as nfs:
        before = ok(nfs.fsstat(root))
        assert before.tbytes == MiB
        f = ok(nfs.create(root, "fill")).obj
        nfs.write_all(f, os.urandom(512 * 1024), chunk=UDP_IO)
        after = ok(nfs.fsstat(root))
        assert after.tbytes == MiB
        assert before.abytes - after.abytes >= 512 * 1024
        res = nfs.write(f, 600 * 1024, os.urandom(UDP_IO))
        ok(res)
        res = nfs.write(f, 2 * MiB, b"x" * 100)
        assert res.status == NfsStat3.NFS3ERR_DQUOT
        assert res.file_wcc.after is not None
        assert ok(nfs.getattr(f)).obj_attributes.size == 600 * 1024 + UDP_IO


# -- handles -------------------------------------------------------------------------------


def test_bad_handles(srv: PrismProcess, nfs: NfsClient, workdir: NfsFh3, transport: str) -> None:
    good = ok(nfs.create(workdir, "f")).obj
    ok(nfs.write(good, 0, b"x"))
    raw = bytearray(good.data)
    assert len(raw) == 31
    flipped_mac = bytearray(raw)
    flipped_mac[-1] ^= 0x01
    flipped_body = bytearray(raw)
    flipped_body[14] ^= 0x01  # the inode number: a forged pointer to another object
    bad_handles = {
        "random": NfsFh3(os.urandom(31)),
        "flipped-mac": NfsFh3(bytes(flipped_mac)),
        "flipped-body": NfsFh3(bytes(flipped_body)),
        "short": NfsFh3(bytes(raw[:8])),
        "empty": NfsFh3(b""),
        "long": NfsFh3(bytes(raw) + b"\0"),
    }
    bad = NfsStat3.NFS3ERR_BADHANDLE
    for label, fh in bad_handles.items():
        assert nfs.getattr(fh).status == bad, label
        assert nfs.lookup(fh, "f").status == bad, label
        assert nfs.read(fh, 0, 1).status == bad, label
        res = nfs.write(fh, 0, b"x")
        assert res.status == bad, label
        assert res.file_wcc == WccData()
        assert nfs.readdirplus(fh).status == bad, label
        assert nfs.create(fh, "n").status == bad, label
        assert nfs.rename(workdir, "f", fh, "n").status == bad, label
        assert nfs.link(good, fh, "n").status == bad, label
        assert nfs.fsinfo(fh).status == bad, label
        assert nfs.commit(fh).status == bad, label
    # More than NFS3_FHSIZE (64) bytes is not a handle at all.
    with pytest.raises(GarbageArgsError):
        nfs.getattr(NfsFh3(os.urandom(65)))
    assert nfs.read_all(good) == b"x"
    assert names_of(nfs, workdir) == {b"f"}


def test_handles_of_a_removed_vm_are_stale(srv: PrismProcess, transport: str, tag: str) -> None:
    srv.cli("vm", "create", tag)
    root = srv.mount(f"/{tag}", transport)
    with srv.nfs_client(transport, vm=tag) as nfs:
        f = ok(nfs.create(root, "f")).obj
        ok(nfs.getattr(f))
        srv.cli("vm", "rm", tag)
        assert nfs.getattr(root).status == NfsStat3.NFS3ERR_STALE
        assert nfs.getattr(f).status == NfsStat3.NFS3ERR_STALE
        assert nfs.read(f, 0, 1).status == NfsStat3.NFS3ERR_STALE
        assert nfs.create(root, "g").status == NfsStat3.NFS3ERR_STALE
    with srv.mount_client(transport) as m:
        assert m.mnt_raw(f"/{tag}").status == MountStat3.MNT3ERR_NOENT
        assert f"/{tag}".encode() not in dict(m.export())


# -- snapshots -----------------------------------------------------------------------------


def test_snapshot_export_is_read_only(
    srv: PrismProcess, nfs: NfsClient, workdir: NfsFh3, transport: str, tag: str
) -> None:
    f = ok(nfs.create(workdir, "f")).obj
    nfs.write_all(f, b"before the snapshot")
    ok(nfs.mkdir(workdir, "sub"))
    snap = f"s-{transport}"
    srv.cli("snapshot", "create", "vm", snap)
    nfs.write_all(f, b"AFTER!")  # changes the live VM only
    ok(nfs.create(workdir, "later"))

    with srv.mount_client(transport) as m:
        exports = dict(m.export())
        assert f"/vm@{snap}".encode() in exports
        sroot, _ = m.mnt(f"/vm@{snap}")
    sdir = nfs.walk(sroot, tag)
    sf = nfs.walk(sdir, "f")
    assert nfs.read_all(sf) == b"before the snapshot"
    assert nfs.read_all(f) == b"AFTER! the snapshot"
    assert names_of(nfs, sdir) == {b"f", b"sub"}
    assert ok(nfs.getattr(sroot)).obj_attributes.fsid != ok(nfs.getattr(f)).obj_attributes.fsid

    rofs = NfsStat3.NFS3ERR_ROFS
    res = nfs.write(sf, 0, b"x")
    assert res.status == rofs
    assert res.file_wcc.after is not None and res.file_wcc.after.size == 19
    assert nfs.write(sf, 0, b"x", StableHow.UNSTABLE).status == rofs
    assert nfs.setattr(sf, Sattr3(mode=0o777)).status == rofs
    assert nfs.setattr(sf, Sattr3(size=0)).status == rofs
    assert nfs.create(sdir, "new").status == rofs
    assert nfs.create(sdir, "f").status == rofs  # even when it would change nothing
    assert nfs.create(sdir, "f", mode=CreateMode.GUARDED).status == rofs
    assert nfs.setattr(sf, SATTR_EMPTY).status == rofs
    assert nfs.write(sf, 0, b"").status == rofs
    assert nfs.mkdir(sdir, "new").status == rofs
    assert nfs.symlink(sdir, "new", b"t").status == rofs
    assert nfs.mknod(sdir, "new", FileType.FIFO).status == rofs
    assert nfs.remove(sdir, "f").status == rofs
    assert nfs.rmdir(sdir, "sub").status == rofs
    assert nfs.rename(sdir, "f", sdir, "g").status == rofs
    assert nfs.link(sf, sdir, "g").status == rofs
    # A snapshot object cannot be linked or moved into the live VM either.
    assert nfs.link(sf, workdir, "g").status in (rofs, NfsStat3.NFS3ERR_XDEV)
    assert nfs.rename(sdir, "f", workdir, "g").status in (rofs, NfsStat3.NFS3ERR_XDEV)
    granted = ok(nfs.access(sf, ACCESS3_ALL)).access
    assert granted & ACCESS3_READ
    assert not granted & (ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE)
    assert nfs.read_all(sf) == b"before the snapshot"
    assert names_of(nfs, sdir) == {b"f", b"sub"}


# -- the duplicate request cache -----------------------------------------------------------


def test_retransmitted_create_gets_the_same_reply(
    srv: PrismProcess, workdir: NfsFh3, transport: str
) -> None:
    with srv.rpc_client(
        NFS_PROGRAM,
        NFS_V3,
        transport,
        cred=auth_sys(),
        reserved_port=True,  # a root client, for the VM is secure
    ) as rpc:
        args = encode_args(
            Nfs3Proc.CREATE,
            CreateArgs(DirOpArgs3(workdir, b"once"), CreateMode.GUARDED, Sattr3(mode=0o600)),
        )
        record = rpc.encode(Nfs3Proc.CREATE, args)
        rpc.send_raw(record)
        first = rpc.recv_record()
        rpc.send_raw(record)  # the same xid and bytes, on the same connection
        second = rpc.recv_record()
        assert peek_xid(first) == peek_xid(second) == peek_xid(record)
        assert second == first
        res = decode_result(Nfs3Proc.CREATE, raise_for_reply(decode_reply(first)))
        assert res.ok and res.obj is not None

        # Without the cache the retransmission would have been EXIST: a new xid shows it.
        fresh = decode_result(Nfs3Proc.CREATE, rpc.call(Nfs3Proc.CREATE, args))
        assert fresh.status == NfsStat3.NFS3ERR_EXIST

        # A retransmitted REMOVE is not NOENT either.
        rm = rpc.encode(Nfs3Proc.REMOVE, encode_args(Nfs3Proc.REMOVE, _remove(workdir, "once")))
        rpc.send_raw(rm)
        r1 = rpc.recv_record()
        rpc.send_raw(rm)
        r2 = rpc.recv_record()
        assert r1 == r2
        assert decode_result(Nfs3Proc.REMOVE, raise_for_reply(decode_reply(r1))).ok

        # A duplicate that arrives while the original runs gets at most the same reply.
        args = encode_args(
            Nfs3Proc.CREATE, CreateArgs(DirOpArgs3(workdir, b"twice"), CreateMode.GUARDED)
        )
        record = rpc.encode(Nfs3Proc.CREATE, args)
        if transport == "tcp":
            rpc.send_raw(frame(record) + frame(record), framed=False)
        else:
            rpc.send_raw(record)
            rpc.send_raw(record)
        replies = [rpc.recv_record()]
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                replies.append(rpc.recv_record(0.1))
            except TimeoutError:
                continue
        assert all(r == replies[0] for r in replies)
        res = decode_result(Nfs3Proc.CREATE, raise_for_reply(decode_reply(replies[0])))
        assert res.ok
    with srv.nfs_client(transport) as nfs:
        assert names_of(nfs, workdir) == {b"twice"}


def _remove(dir_fh: NfsFh3, name: str) -> RemoveArgs:
    return RemoveArgs(DirOpArgs3(dir_fh, name.encode()))


def test_mount_client_over_the_other_transport_agrees(srv: PrismProcess) -> None:
    """The root handle is a property of the VM, not of the transport or the mount."""
    with MountClient(HOST, srv.mount_port, "tcp", cred=auth_sys()) as tcp:
        a, _ = tcp.mnt("/vm")
    with MountClient(HOST, srv.mount_port, "udp", cred=auth_sys()) as udp:
        b, _ = udp.mnt("/vm")
    assert a == b == srv.mount("/vm", "vrpc")
