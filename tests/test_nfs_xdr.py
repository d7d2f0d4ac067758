"""NFSv3 / MOUNTv3 wire layer: golden bytes, round trips, decoder fuzzing, limits, client."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism.nfs import convert
from prism.nfs import wire as t
from prism.nfs.client import MountClient, MountError, NfsClient, NfsError, auth_sys
from prism.nfs.const import (
    MAX_NAME,
    MAX_PATH,
    MAX_READ,
    MAX_READDIR,
    MAX_WRITE,
    MNTPATHLEN,
    NFS3_FHSIZE,
    CreateMode,
    Mount3Proc,
    MountStat3,
    Nfs3Proc,
    NfsStat3,
    StableHow,
    TimeHow,
)
from prism.store.records import INODE_ATTRS, Inode
from prism.store.types import NOW, Attr, FileType, ObjectId
from rpc.xdr import Packer, Unpacker, XdrError

OK = NfsStat3.NFS3_OK
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def u32(*values: int) -> bytes:
    return b"".join(struct.pack(">I", v) for v in values)


def u64(*values: int) -> bytes:
    return b"".join(struct.pack(">Q", v) for v in values)


def pack(value: Any) -> bytes:
    p = Packer()
    value.pack(p)
    return p.get_buffer()


def unpack_all(cls: type[Any], data: bytes) -> Any:
    u = Unpacker(data)
    value = cls.unpack(u)
    assert u.remaining() == 0, f"{cls.__name__} left {u.remaining()} bytes"
    return value


# --- golden bytes, laid out by hand from RFC 1813 -------------------------------------------

FATTR = t.Fattr3(
    type=FileType.REG,
    mode=0o644,
    nlink=1,
    uid=1000,
    gid=100,
    size=5,
    used=4096,
    rdev=t.SpecData3(0, 0),
    fsid=7,
    fileid=42,
    atime=t.NfsTime3(1, 2),
    mtime=t.NfsTime3(3, 4),
    ctime=t.NfsTime3(5, 6),
)
FATTR_BYTES = (
    u32(1, 0o644, 1, 1000, 100)  # type, mode, nlink, uid, gid
    + u64(5, 4096)  # size, used
    + u32(0, 0)  # rdev (specdata1, specdata2)
    + u64(7, 42)  # fsid, fileid
    + u32(1, 2, 3, 4, 5, 6)  # atime, mtime, ctime
)


def test_golden_getattr_args() -> None:
    args = t.GetattrArgs(t.NfsFh3(b"\x01\x02\x03\x04"))
    wire = bytes.fromhex("00000004 01020304")
    assert t.encode_args(Nfs3Proc.GETATTR, args) == wire
    assert t.decode_args(Nfs3Proc.GETATTR, wire) == args


def test_golden_handle_padding() -> None:
    wire = bytes.fromhex("00000005 0102030405 000000")
    assert pack(t.NfsFh3(b"\x01\x02\x03\x04\x05")) == wire
    with pytest.raises(XdrError):
        unpack_all(t.NfsFh3, wire[:-1] + b"\x01")  # non-zero padding


def test_golden_fattr3() -> None:
    assert len(FATTR_BYTES) == 84 == t.FATTR3_SIZE
    assert pack(FATTR) == FATTR_BYTES
    assert unpack_all(t.Fattr3, FATTR_BYTES) == FATTR


def test_golden_getattr_res() -> None:
    wire = u32(0) + FATTR_BYTES
    assert t.encode_result(Nfs3Proc.GETATTR, t.GetattrRes(OK, FATTR)) == wire
    assert t.decode_result(Nfs3Proc.GETATTR, wire) == t.GetattrRes(OK, FATTR)
    stale = t.GetattrRes(NfsStat3.NFS3ERR_STALE)
    assert t.encode_result(Nfs3Proc.GETATTR, stale) == u32(70)


def test_golden_lookup_resfail() -> None:
    res = t.LookupRes(NfsStat3.NFS3ERR_NOENT)
    wire = u32(2, 0)  # status NOENT, dir_attributes: attributes_follow FALSE
    assert t.encode_result(Nfs3Proc.LOOKUP, res) == wire
    assert t.decode_result(Nfs3Proc.LOOKUP, wire) == res


def test_golden_lookup_resok() -> None:
    res = t.LookupRes(OK, t.NfsFh3(b"abcd"), FATTR, None)
    wire = u32(0, 4) + b"abcd" + u32(1) + FATTR_BYTES + u32(0)
    assert t.encode_result(Nfs3Proc.LOOKUP, res) == wire
    assert t.decode_result(Nfs3Proc.LOOKUP, wire) == res


def test_golden_readdir_resok_two_entries() -> None:
    res = t.ReaddirRes(
        OK,
        dir_attributes=None,
        cookieverf=b"verifier",
        entries=(t.Entry3(2, b".", 1), t.Entry3(9, b"ab", 2)),
        eof=True,
    )
    wire = (
        u32(0)  # status
        + u32(0)  # dir_attributes: FALSE
        + b"verifier"  # cookieverf3
        + u32(1)  # entries: value follows
        + u64(2)
        + u32(1)
        + b".\0\0\0"
        + u64(1)
        + u32(1)  # nextentry follows
        + u64(9)
        + u32(2)
        + b"ab\0\0"
        + u64(2)
        + u32(0)  # no more entries
        + u32(1)  # eof
    )
    assert t.encode_result(Nfs3Proc.READDIR, res) == wire
    assert t.decode_result(Nfs3Proc.READDIR, wire) == res


def test_golden_sattr3_and_setattr_args() -> None:
    s = t.Sattr3(mode=0o755, size=10, atime=TimeHow.SET_TO_SERVER_TIME, mtime=t.NfsTime3(100, 5))
    wire = u32(1, 0o755, 0, 0, 1) + u64(10) + u32(1, 2, 100, 5)
    assert pack(s) == wire
    args = t.SetattrArgs(t.NfsFh3(b""), s, guard=t.NfsTime3(7, 8))
    full = u32(0) + wire + u32(1, 7, 8)
    assert t.encode_args(Nfs3Proc.SETATTR, args) == full
    assert t.decode_args(Nfs3Proc.SETATTR, full) == args


def test_golden_write_args_and_res() -> None:
    args = t.WriteArgs(t.NfsFh3(b"fh"), 4096, StableHow.FILE_SYNC, b"hello")
    wire = u32(2) + b"fh\0\0" + u64(4096) + u32(5, 2, 5) + b"hello\0\0\0"
    assert t.encode_args(Nfs3Proc.WRITE, args) == wire
    assert t.decode_args(Nfs3Proc.WRITE, wire) == args
    res = t.WriteRes(OK, t.WccData(), 5, StableHow.FILE_SYNC, b"12345678")
    assert t.encode_result(Nfs3Proc.WRITE, res) == u32(0, 0, 0, 5, 2) + b"12345678"
    fail = t.WriteRes(
        NfsStat3.NFS3ERR_NOSPC, t.WccData(t.WccAttr(1, t.NfsTime3(2, 3), t.NfsTime3(4, 5)))
    )
    assert t.encode_result(Nfs3Proc.WRITE, fail) == u32(28, 1) + u64(1) + u32(2, 3, 4, 5, 0)


def test_golden_readdirplus_entry() -> None:
    e = t.EntryPlus3(3, b"x", 77, FATTR, t.NfsFh3(b"h"))
    wire = u64(3) + u32(1) + b"x\0\0\0" + u64(77) + u32(1) + FATTR_BYTES + u32(1, 1) + b"h\0\0\0"
    assert pack(e) == wire
    assert e.wire_size() == len(wire) + 4
    assert e.dir_size() == 4 + 8 + 8 + 8


def test_golden_mount() -> None:
    res = t.MountRes(MountStat3.MNT3_OK, t.NfsFh3(b"root"), (1, 0))
    wire = u32(0, 4) + b"root" + u32(2, 1, 0)
    assert t.encode_mount_result(Mount3Proc.MNT, res) == wire
    assert t.decode_mount_result(Mount3Proc.MNT, wire) == res
    assert t.encode_mount_result(Mount3Proc.MNT, t.MountRes(MountStat3.MNT3ERR_ACCES)) == u32(13)
    exports = t.Exports((t.ExportNode(b"/vm", (b"10.0.0.2",)), t.ExportNode(b"/x")))
    ewire = (
        u32(1, 3) + b"/vm\0" + u32(1, 8) + b"10.0.0.2" + u32(0) + u32(1, 2) + b"/x\0\0" + u32(0, 0)
    )
    assert t.encode_mount_result(Mount3Proc.EXPORT, exports) == ewire
    assert t.decode_mount_result(Mount3Proc.EXPORT, ewire) == exports
    assert t.decode_mount_args(Mount3Proc.MNT, u32(3) + b"/vm\0") == t.DirPath(b"/vm")


def test_null_is_void() -> None:
    assert t.decode_args(Nfs3Proc.NULL, b"") == t.VOID
    assert t.encode_result(Nfs3Proc.NULL, t.VOID) == b""
    with pytest.raises(XdrError):
        t.decode_args(Nfs3Proc.NULL, b"\0\0\0\0")


# --- strategies -----------------------------------------------------------------------------

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
FH = st.binary(max_size=NFS3_FHSIZE).map(t.NfsFh3)
NAME = st.binary(max_size=40) | st.binary(min_size=MAX_NAME, max_size=MAX_NAME)
PATH = st.binary(max_size=64)
DATA = st.binary(max_size=2048)
VERF = st.binary(min_size=8, max_size=8)
TIME = st.builds(t.NfsTime3, U32, U32)
SPEC = st.builds(t.SpecData3, U32, U32)
FTYPE = st.sampled_from(list(FileType))
STABLE = st.sampled_from(list(StableHow))
FATTR3 = st.builds(t.Fattr3, FTYPE, U32, U32, U32, U32, U64, U64, SPEC, U64, U64, TIME, TIME, TIME)
POST_OP = st.none() | FATTR3
WCC_ATTR = st.builds(t.WccAttr, U64, TIME, TIME)
WCC = st.builds(t.WccData, st.none() | WCC_ATTR, POST_OP)
SET_TIME = st.sampled_from([TimeHow.DONT_CHANGE, TimeHow.SET_TO_SERVER_TIME]) | TIME
OPT_U32 = st.none() | U32
SATTR = st.builds(t.Sattr3, OPT_U32, OPT_U32, OPT_U32, st.none() | U64, SET_TIME, SET_TIME)
DIROP = st.builds(t.DirOpArgs3, FH, NAME)
ERR = st.sampled_from([s for s in NfsStat3 if s != OK])


def _create_args() -> st.SearchStrategy[t.CreateArgs]:
    checked = st.builds(
        t.CreateArgs,
        DIROP,
        st.sampled_from([CreateMode.UNCHECKED, CreateMode.GUARDED]),
        obj_attributes=SATTR,
    )
    exclusive = st.builds(t.CreateArgs, DIROP, st.just(CreateMode.EXCLUSIVE), verf=VERF)
    return checked | exclusive


def _mknod_args() -> st.SearchStrategy[t.MknodArgs]:
    dev = st.builds(t.MknodArgs, DIROP, st.sampled_from([FileType.CHR, FileType.BLK]), SATTR, SPEC)
    special = st.builds(t.MknodArgs, DIROP, st.sampled_from([FileType.SOCK, FileType.FIFO]), SATTR)
    other = st.builds(
        t.MknodArgs, DIROP, st.sampled_from([FileType.REG, FileType.DIR, FileType.LNK])
    )
    return dev | special | other


ARGS: dict[type[Any], st.SearchStrategy[Any]] = {
    t.Void: st.just(t.VOID),
    t.GetattrArgs: st.builds(t.GetattrArgs, FH),
    t.SetattrArgs: st.builds(t.SetattrArgs, FH, SATTR, st.none() | TIME),
    t.LookupArgs: st.builds(t.LookupArgs, DIROP),
    t.AccessArgs: st.builds(t.AccessArgs, FH, U32),
    t.ReadlinkArgs: st.builds(t.ReadlinkArgs, FH),
    t.ReadArgs: st.builds(t.ReadArgs, FH, U64, st.integers(0, MAX_READ)),
    t.WriteArgs: st.builds(t.WriteArgs, FH, U64, STABLE, DATA),
    t.CreateArgs: _create_args(),
    t.MkdirArgs: st.builds(t.MkdirArgs, DIROP, SATTR),
    t.SymlinkArgs: st.builds(t.SymlinkArgs, DIROP, SATTR, PATH),
    t.MknodArgs: _mknod_args(),
    t.RemoveArgs: st.builds(t.RemoveArgs, DIROP),
    t.RmdirArgs: st.builds(t.RmdirArgs, DIROP),
    t.RenameArgs: st.builds(t.RenameArgs, DIROP, DIROP),
    t.LinkArgs: st.builds(t.LinkArgs, FH, DIROP),
    t.ReaddirArgs: st.builds(t.ReaddirArgs, FH, U64, VERF, st.integers(0, MAX_READDIR)),
    t.ReaddirplusArgs: st.builds(
        t.ReaddirplusArgs,
        FH,
        U64,
        VERF,
        st.integers(0, MAX_READDIR),
        st.integers(0, MAX_READDIR),
    ),
    t.FsstatArgs: st.builds(t.FsstatArgs, FH),
    t.FsinfoArgs: st.builds(t.FsinfoArgs, FH),
    t.PathconfArgs: st.builds(t.PathconfArgs, FH),
    t.CommitArgs: st.builds(t.CommitArgs, FH, U64, U32),
    # MOUNT
    t.DirPath: st.builds(t.DirPath, st.binary(max_size=MNTPATHLEN)),
}


def _res(
    cls: type[Any],
    common: dict[str, Any],
    ok: dict[str, Any],
    err: Any = ERR,
    ok_status: Any = OK,
) -> st.SearchStrategy[Any]:
    """Success results carry every field; failures only the RFC's resfail body."""
    success = st.builds(cls, status=st.just(ok_status), **common, **ok)
    failure = st.builds(cls, status=err, **common)
    return success | failure


ENTRY = st.builds(t.Entry3, U64, NAME, U64)
ENTRY_PLUS = st.builds(t.EntryPlus3, U64, NAME, U64, POST_OP, st.none() | FH)
CREATED = ({"dir_wcc": WCC}, {"obj": st.none() | FH, "obj_attributes": POST_OP})
READDIR_OK = {"cookieverf": VERF, "eof": st.booleans()}

RESULTS: dict[type[Any], st.SearchStrategy[Any]] = {
    t.Void: st.just(t.VOID),
    t.GetattrRes: _res(t.GetattrRes, {}, {"obj_attributes": FATTR3}),
    t.SetattrRes: _res(t.SetattrRes, {"obj_wcc": WCC}, {}),
    t.LookupRes: _res(
        t.LookupRes, {"dir_attributes": POST_OP}, {"object": FH, "obj_attributes": POST_OP}
    ),
    t.AccessRes: _res(t.AccessRes, {"obj_attributes": POST_OP}, {"access": U32}),
    t.ReadlinkRes: _res(t.ReadlinkRes, {"symlink_attributes": POST_OP}, {"data": PATH}),
    t.ReadRes: _res(t.ReadRes, {"file_attributes": POST_OP}, {"eof": st.booleans(), "data": DATA}),
    t.WriteRes: _res(
        t.WriteRes, {"file_wcc": WCC}, {"count": U32, "committed": STABLE, "verf": VERF}
    ),
    t.CreateRes: _res(t.CreateRes, *CREATED),
    t.MkdirRes: _res(t.MkdirRes, *CREATED),
    t.SymlinkRes: _res(t.SymlinkRes, *CREATED),
    t.MknodRes: _res(t.MknodRes, *CREATED),
    t.RemoveRes: _res(t.RemoveRes, {"dir_wcc": WCC}, {}),
    t.RmdirRes: _res(t.RmdirRes, {"dir_wcc": WCC}, {}),
    t.RenameRes: _res(t.RenameRes, {"fromdir_wcc": WCC, "todir_wcc": WCC}, {}),
    t.LinkRes: _res(t.LinkRes, {"file_attributes": POST_OP, "linkdir_wcc": WCC}, {}),
    t.ReaddirRes: _res(
        t.ReaddirRes,
        {"dir_attributes": POST_OP},
        {**READDIR_OK, "entries": st.lists(ENTRY, max_size=5).map(tuple)},
    ),
    t.ReaddirplusRes: _res(
        t.ReaddirplusRes,
        {"dir_attributes": POST_OP},
        {**READDIR_OK, "entries": st.lists(ENTRY_PLUS, max_size=4).map(tuple)},
    ),
    t.FsstatRes: _res(
        t.FsstatRes,
        {"obj_attributes": POST_OP},
        {
            "tbytes": U64,
            "fbytes": U64,
            "abytes": U64,
            "tfiles": U64,
            "ffiles": U64,
            "afiles": U64,
            "invarsec": U32,
        },
    ),
    t.FsinfoRes: _res(
        t.FsinfoRes,
        {"obj_attributes": POST_OP},
        {
            "rtmax": U32,
            "rtpref": U32,
            "rtmult": U32,
            "wtmax": U32,
            "wtpref": U32,
            "wtmult": U32,
            "dtpref": U32,
            "maxfilesize": U64,
            "time_delta": TIME,
            "properties": U32,
        },
    ),
    t.PathconfRes: _res(
        t.PathconfRes,
        {"obj_attributes": POST_OP},
        {
            "linkmax": U32,
            "name_max": U32,
            "no_trunc": st.booleans(),
            "chown_restricted": st.booleans(),
            "case_insensitive": st.booleans(),
            "case_preserving": st.booleans(),
        },
    ),
    t.CommitRes: _res(t.CommitRes, {"file_wcc": WCC}, {"verf": VERF}),
    # MOUNT
    t.MountRes: _res(
        t.MountRes,
        {},
        {"fhandle": FH, "auth_flavors": st.lists(I32, max_size=16).map(tuple)},
        err=st.sampled_from([s for s in MountStat3 if s != MountStat3.MNT3_OK]),
        ok_status=MountStat3.MNT3_OK,
    ),
    t.MountList: st.builds(
        t.MountList,
        st.lists(
            st.builds(t.MountBody, st.binary(max_size=255), st.binary(max_size=64)), max_size=4
        ).map(tuple),
    ),
    t.Exports: st.builds(
        t.Exports,
        st.lists(
            st.builds(
                t.ExportNode,
                st.binary(max_size=64),
                st.lists(st.binary(max_size=255), max_size=3).map(tuple),
            ),
            max_size=4,
        ).map(tuple),
    ),
}


NFS_ROWS = [(proc, t.NFS3_PROCS[proc]) for proc in Nfs3Proc]
MOUNT_ROWS = [(proc, t.MOUNT3_PROCS[proc]) for proc in Mount3Proc]


def test_tables_cover_every_procedure() -> None:
    assert set(t.NFS3_PROCS) == set(Nfs3Proc) and len(Nfs3Proc) == 22
    assert set(t.MOUNT3_PROCS) == set(Mount3Proc)
    for _, row in NFS_ROWS + MOUNT_ROWS:
        assert row.args in ARGS and row.res in RESULTS


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("proc", list(Nfs3Proc), ids=lambda p: p.name)
@FAST
@given(data=st.data())
def test_nfs_args_round_trip(proc: Nfs3Proc, data: st.DataObject) -> None:
    args = data.draw(ARGS[t.NFS3_PROCS[proc].args])
    wire = t.encode_args(proc, args)
    assert len(wire) % 4 == 0
    assert t.decode_args(proc, wire) == args
    assert unpack_all(type(args), wire) == args


@pytest.mark.parametrize("proc", list(Nfs3Proc), ids=lambda p: p.name)
@FAST
@given(data=st.data())
def test_nfs_result_round_trip(proc: Nfs3Proc, data: st.DataObject) -> None:
    res = data.draw(RESULTS[t.NFS3_PROCS[proc].res])
    wire = t.encode_result(proc, res)
    assert len(wire) % 4 == 0
    assert t.decode_result(proc, wire) == res
    assert unpack_all(type(res), wire) == res


@pytest.mark.parametrize("proc", list(Mount3Proc), ids=lambda p: p.name)
@FAST
@given(data=st.data())
def test_mount_round_trip(proc: Mount3Proc, data: st.DataObject) -> None:
    row = t.MOUNT3_PROCS[proc]
    args = data.draw(ARGS[row.args])
    assert t.decode_mount_args(proc, t.encode_mount_args(proc, args)) == args
    res = data.draw(RESULTS[row.res])
    assert t.decode_mount_result(proc, t.encode_mount_result(proc, res)) == res


# --- fuzzing: only XdrError, whatever the bytes ---------------------------------------------

ALL_DECODERS = (
    [(f"nfs-args-{p.name}", lambda d, p=p: t.decode_args(p, d)) for p in Nfs3Proc]
    + [(f"nfs-res-{p.name}", lambda d, p=p: t.decode_result(p, d)) for p in Nfs3Proc]
    + [(f"mnt-args-{p.name}", lambda d, p=p: t.decode_mount_args(p, d)) for p in Mount3Proc]
    + [(f"mnt-res-{p.name}", lambda d, p=p: t.decode_mount_result(p, d)) for p in Mount3Proc]
)


@pytest.mark.parametrize(("name", "decode"), ALL_DECODERS, ids=[n for n, _ in ALL_DECODERS])
@FUZZ
@given(blob=st.binary(max_size=512))
def test_fuzz_random_bytes(name: str, decode: Any, blob: bytes) -> None:
    with contextlib.suppress(XdrError):
        decode(blob)


def _mutate(wire: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "word"]))
    if not wire:
        return data.draw(st.binary(min_size=1, max_size=8))
    i = data.draw(st.integers(0, len(wire) - 1))
    if kind == "truncate":
        return wire[:i]
    if kind == "flip":
        return wire[:i] + bytes([wire[i] ^ data.draw(st.integers(1, 255))]) + wire[i + 1 :]
    if kind == "insert":
        return wire[:i] + data.draw(st.binary(min_size=1, max_size=8)) + wire[i:]
    j = i & ~3
    word = data.draw(st.sampled_from([0, 1, 2, 3, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 10001]))
    return wire[:j] + u32(word) + wire[j + 4 :]


@pytest.mark.parametrize("proc", list(Nfs3Proc), ids=lambda p: p.name)
@FUZZ
@given(data=st.data())
def test_fuzz_mutated_valid_messages(proc: Nfs3Proc, data: st.DataObject) -> None:
    row = t.NFS3_PROCS[proc]
    args_wire = _mutate(t.encode_args(proc, data.draw(ARGS[row.args])), data)
    res_wire = _mutate(t.encode_result(proc, data.draw(RESULTS[row.res])), data)
    for decode, wire in ((t.decode_args, args_wire), (t.decode_result, res_wire)):
        with contextlib.suppress(XdrError):
            decode(proc, wire)


# --- limits and strictness ------------------------------------------------------------------


def _getattr_wire(handle_len: int) -> bytes:
    return u32(handle_len) + b"\x01" * handle_len + b"\0" * (-handle_len % 4)


def test_handle_limit() -> None:
    assert t.decode_args(Nfs3Proc.GETATTR, _getattr_wire(64)).object.data == b"\x01" * 64
    with pytest.raises(XdrError):
        t.decode_args(Nfs3Proc.GETATTR, _getattr_wire(65))
    # The encoder lets a test client send an over-long handle; the decoder refuses it.
    wire = t.encode_args(Nfs3Proc.GETATTR, t.GetattrArgs(t.NfsFh3(b"x" * 65)))
    with pytest.raises(XdrError):
        t.decode_args(Nfs3Proc.GETATTR, wire)
    with pytest.raises(XdrError):
        t.decode_mount_result(Mount3Proc.MNT, u32(0, 65) + b"x" * 68 + u32(0))


def test_names_are_unbounded_strings() -> None:
    """filename3 and nfspath3 are string<>: the decoder takes any length the record holds;
    the server's limits (MAX_NAME, MAX_PATH) become NFS3ERR_NAMETOOLONG, not GARBAGE_ARGS."""
    fh = t.NfsFh3(b"dir")
    long = b"n" * (MAX_NAME + 1000)
    for proc, args in [
        (Nfs3Proc.LOOKUP, t.LookupArgs(t.DirOpArgs3(fh, long))),
        (Nfs3Proc.CREATE, t.CreateArgs(t.DirOpArgs3(fh, long), CreateMode.GUARDED, t.Sattr3())),
        (Nfs3Proc.REMOVE, t.RemoveArgs(t.DirOpArgs3(fh, long))),
        (Nfs3Proc.RENAME, t.RenameArgs(t.DirOpArgs3(fh, b"a"), t.DirOpArgs3(fh, long))),
    ]:
        assert t.decode_args(proc, t.encode_args(proc, args)) == args


def test_path_limits() -> None:
    where = t.DirOpArgs3(t.NfsFh3(b"d"), b"l")
    long = t.SymlinkArgs(where, t.Sattr3(), b"p" * (MAX_PATH + 1))
    assert t.decode_args(Nfs3Proc.SYMLINK, t.encode_args(Nfs3Proc.SYMLINK, long)) == long
    with pytest.raises(XdrError):  # dirpath is string<MNTPATHLEN> in XDR itself
        t.decode_mount_args(
            Mount3Proc.MNT, t.encode_mount_args(Mount3Proc.MNT, t.DirPath(b"/" * 1025))
        )


def test_read_and_readdir_counts_are_any_uint32() -> None:
    """The service clamps them to its maximum; the decoder does not judge them."""
    fh, verf = t.NfsFh3(b"f"), bytes(8)
    for count in (MAX_READ, MAX_READ + 1, 0xFFFF_FFFF):
        read = t.ReadArgs(fh, 0, count)
        assert t.decode_args(Nfs3Proc.READ, t.encode_args(Nfs3Proc.READ, read)) == read
    readdir = t.ReaddirArgs(fh, 0, verf, 0xFFFF_FFFF)
    assert t.decode_args(Nfs3Proc.READDIR, t.encode_args(Nfs3Proc.READDIR, readdir)) == readdir
    for dircount, maxcount in [(MAX_READDIR + 1, 4096), (4096, 0xFFFF_FFFF)]:
        plus = t.ReaddirplusArgs(fh, 0, verf, dircount, maxcount)
        assert (
            t.decode_args(Nfs3Proc.READDIRPLUS, t.encode_args(Nfs3Proc.READDIRPLUS, plus)) == plus
        )


def _write_wire(count: int, data: bytes, stable: int = 2) -> bytes:
    return (
        u32(1)
        + b"f\0\0\0"
        + u64(0)
        + u32(count, stable, len(data))
        + data
        + b"\0" * (-len(data) % 4)
    )


def test_write_count_and_data() -> None:
    assert t.decode_args(Nfs3Proc.WRITE, _write_wire(3, b"abc")).data == b"abc"
    # count < len(data): the first `count` bytes are what is to be written.
    short = t.decode_args(Nfs3Proc.WRITE, _write_wire(2, b"abcd"))
    assert short.data == b"ab" and short.count == 2
    with pytest.raises(XdrError):  # count > len(data)
        t.decode_args(Nfs3Proc.WRITE, _write_wire(5, b"abcd"))
    big = b"\0" * (MAX_WRITE + 4)  # opaque<>: the service writes MAX_WRITE of it
    assert t.decode_args(Nfs3Proc.WRITE, _write_wire(len(big), big)).count == len(big)
    assert t.decode_args(Nfs3Proc.WRITE, _write_wire(MAX_WRITE, big[:MAX_WRITE])).count == MAX_WRITE
    with pytest.raises(XdrError):  # stable_how 3 does not exist
        t.decode_args(Nfs3Proc.WRITE, _write_wire(3, b"abc", stable=3))


def test_bad_enums_and_bools() -> None:
    fh = u32(1) + b"f\0\0\0"
    with pytest.raises(XdrError):  # createmode3 = 3
        t.decode_args(Nfs3Proc.CREATE, fh + u32(1) + b"n\0\0\0" + u32(3))
    with pytest.raises(XdrError):  # ftype3 = 0
        t.decode_args(Nfs3Proc.MKNOD, fh + u32(1) + b"n\0\0\0" + u32(0))
    with pytest.raises(XdrError):  # time_how = 3
        t.decode_args(Nfs3Proc.SETATTR, fh + u32(0, 0, 0, 0, 3, 0, 0))
    with pytest.raises(XdrError):  # set_it bool = 2
        t.decode_args(Nfs3Proc.SETATTR, fh + u32(2, 0, 0, 0, 0, 0, 0))
    with pytest.raises(XdrError):  # nfsstat3 = 3 is not defined
        t.decode_result(Nfs3Proc.REMOVE, u32(3, 0, 0))
    with pytest.raises(XdrError):  # fattr3.type = 8
        t.decode_result(Nfs3Proc.GETATTR, u32(0) + u32(8) + FATTR_BYTES[4:])


def test_trailing_bytes_rejected() -> None:
    wire = _getattr_wire(4) + b"\0\0\0\0"
    with pytest.raises(XdrError):
        t.decode_args(Nfs3Proc.GETATTR, wire)


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(ValueError):
        t.decode_args(22, b"")
    with pytest.raises(TypeError):
        t.encode_result(Nfs3Proc.CREATE, t.MkdirRes(OK))
    with pytest.raises(ValueError):  # an OK GETATTR needs attributes
        t.encode_result(Nfs3Proc.GETATTR, t.GetattrRes(OK))
    with pytest.raises(ValueError):  # verifiers are exactly 8 bytes
        t.encode_result(Nfs3Proc.COMMIT, t.CommitRes(OK, verf=b"short"))
    with pytest.raises(ValueError):
        pack(t.Sattr3(atime=TimeHow.SET_TO_CLIENT_TIME))


def test_error_result_builds_failure_bodies() -> None:
    wcc = t.WccData(None, FATTR)
    res = t.error_result(Nfs3Proc.REMOVE, NfsStat3.NFS3ERR_NOENT, dir_wcc=wcc)
    assert res == t.RemoveRes(NfsStat3.NFS3ERR_NOENT, wcc) and not res.ok
    for proc in Nfs3Proc:
        if proc != Nfs3Proc.NULL:
            failure = t.error_result(proc, NfsStat3.NFS3ERR_SERVERFAULT)
            assert t.decode_result(proc, t.encode_result(proc, failure)) == failure


def test_sizes_for_readdir_budgeting() -> None:
    e = t.Entry3(1, b"abcde", 2)
    assert e.wire_size() == len(pack(e)) + 4
    res = t.ReaddirRes(OK, FATTR, bytes(8), (), True)
    assert len(t.encode_result(Nfs3Proc.READDIR, res)) == t.READDIR_RESOK_MAX_FIXED
    res2 = t.ReaddirRes(OK, FATTR, bytes(8), (e,), True)
    assert len(t.encode_result(Nfs3Proc.READDIR, res2)) == t.READDIR_RESOK_MAX_FIXED + e.wire_size()


def test_store_conversions() -> None:
    attr = Attr(
        oid=ObjectId(1, 0, 5),
        type=FileType.CHR,
        mode=0o100644,
        nlink=2,
        uid=3,
        gid=4,
        size=10,
        used=4096,
        rdev=(8, 1),
        atime_ns=1_500_000_000,
        mtime_ns=2_000_000_001,
        ctime_ns=-5,
    )
    f = convert.fattr3_of(attr, fsid=9)
    assert f.mode == 0o644 and f.fileid == 5 and f.rdev == t.SpecData3(8, 1) and f.fsid == 9
    assert f.atime == t.NfsTime3(1, 500_000_000) and f.ctime == t.NfsTime3(0, 0)
    assert convert.wcc_attr(attr) == t.WccAttr(10, t.NfsTime3(2, 1), t.NfsTime3(0, 0))
    assert t.NfsTime3.from_ns(2**70) == t.NfsTime3(2**32 - 1, 999_999_999)
    s = t.Sattr3(mode=0o4755, atime=TimeHow.SET_TO_SERVER_TIME, mtime=t.NfsTime3(3, 4))
    sa = convert.setattr_of(s)
    assert sa.mode == 0o4755 and sa.atime_ns == NOW and sa.mtime_ns == 3_000_000_004
    assert sa.uid is None and sa.size is None
    assert convert.setattr_of(t.Sattr3()).atime_ns is None


# --- the client, over an in-process fake server ---------------------------------------------


class FakeServer:
    """Decodes calls with the server-side codecs and answers from a tiny in-memory tree."""

    def __init__(self) -> None:
        self.files: dict[bytes, bytearray] = {b"file": bytearray()}
        self.calls: list[Nfs3Proc] = []

    def call(self, proc: int, args: bytes) -> bytes:
        p = Nfs3Proc(proc)
        self.calls.append(p)
        a = t.decode_args(p, args)
        return t.encode_result(p, self.handle(p, a))

    def handle(self, proc: Nfs3Proc, a: Any) -> Any:
        if proc == Nfs3Proc.NULL:
            return t.VOID
        if proc == Nfs3Proc.LOOKUP:
            path = a.what.dir.data + b"/" + a.what.name if a.what.dir.data else a.what.name
            if path in (b"a", b"a/b") or path in self.files or path == b"a/b/file":
                return t.LookupRes(OK, t.NfsFh3(path), None, FATTR)
            return t.LookupRes(NfsStat3.NFS3ERR_NOENT, dir_attributes=FATTR)
        if proc == Nfs3Proc.WRITE:
            buf = self.files.setdefault(a.file.data, bytearray())
            n = min(a.count, 3)  # short writes
            end = a.offset + n
            buf.extend(b"\0" * max(0, end - len(buf)))
            buf[a.offset : end] = a.data[:n]
            return t.WriteRes(OK, t.WccData(), n, StableHow.FILE_SYNC, b"V" * 8)
        if proc == Nfs3Proc.READ:
            data = self.files.get(a.file.data)
            if data is None:
                return t.ReadRes(NfsStat3.NFS3ERR_STALE)
            chunk = bytes(data[a.offset : a.offset + min(a.count, 4)])
            return t.ReadRes(OK, None, a.offset + len(chunk) >= len(data), chunk)
        if proc == Nfs3Proc.READDIRPLUS:
            names = [b".", b"..", b"x", b"y", b"z"]
            start = a.cookie
            batch = names[start : start + 2]
            entries = tuple(
                t.EntryPlus3(i + 10, n, i + 1, None, t.NfsFh3(n))
                for i, n in enumerate(batch, start)
            )
            return t.ReaddirplusRes(OK, None, b"C" * 8, entries, start + 2 >= len(names))
        return t.error_result(proc, NfsStat3.NFS3ERR_NOTSUPP)


class FakeMountd:
    def call(self, proc: int, args: bytes) -> bytes:
        p = Mount3Proc(proc)
        a = t.decode_mount_args(p, args)
        if p == Mount3Proc.MNT:
            if a.path == b"/vm":
                res: Any = t.MountRes(MountStat3.MNT3_OK, t.NfsFh3(b""), (1,))
            else:
                res = t.MountRes(MountStat3.MNT3ERR_NOENT)
        elif p == Mount3Proc.EXPORT:
            res = t.Exports((t.ExportNode(b"/vm", (b"*",)),))
        elif p == Mount3Proc.DUMP:
            res = t.MountList((t.MountBody(b"host", b"/vm"),))
        else:
            res = t.VOID
        return t.encode_mount_result(p, res)


def test_client_helpers_over_fake_server() -> None:
    server = FakeServer()
    nfs = NfsClient(rpc=server)
    nfs.null()
    root = t.NfsFh3(b"")
    assert nfs.walk(root, "a/b") == t.NfsFh3(b"a/b")
    with pytest.raises(NfsError) as err:
        nfs.walk(root, "a/missing")
    assert err.value.status == NfsStat3.NFS3ERR_NOENT
    res = nfs.lookup(root, "nope")
    assert not res.ok and res.dir_attributes == FATTR  # failure body, no exception
    assert nfs.write_all(b"file", b"hello world", chunk=8) == 11
    assert bytes(server.files[b"file"]) == b"hello world"
    assert nfs.read_all(b"file") == b"hello world"
    assert nfs.read_all(b"file", offset=6, limit=3) == b"wor"
    assert [e.name for e in nfs.listdir(root)] == [b".", b"..", b"x", b"y", b"z"]
    assert nfs.fsinfo(root).status == NfsStat3.NFS3ERR_NOTSUPP
    assert nfs.mknod(root, "p", FileType.FIFO).status == NfsStat3.NFS3ERR_NOTSUPP
    assert nfs.create(root, "e", mode=CreateMode.EXCLUSIVE).status == NfsStat3.NFS3ERR_NOTSUPP


def test_mount_client_over_fake_server() -> None:
    mnt = MountClient(rpc=FakeMountd())
    mnt.null()
    assert mnt.mnt("/vm") == (t.NfsFh3(b""), (1,))
    with pytest.raises(MountError):
        mnt.mnt(b"/nope")
    assert mnt.export() == [(b"/vm", (b"*",))]
    assert mnt.dump() == [(b"host", b"/vm")]
    mnt.umnt("/vm")
    mnt.umntall()


def test_auth_sys_helper() -> None:
    from rpc.message import AuthSys

    cred = auth_sys(1000, 100, [4, 5], machinename="guest")
    assert isinstance(cred, AuthSys)
    assert (cred.uid, cred.gid, cred.gids, cred.machinename) == (1000, 100, (4, 5), b"guest")
    assert AuthSys.unpack(cred.pack()) == cred


# --- end to end over the real RPC stack (TCP and UDP) ---------------------------------------


@pytest.fixture(scope="module")
def rpc_servers() -> Any:
    """The fake NFS and MOUNT services behind `rpc.server` on TCP and UDP, in a thread."""
    server_mod = pytest.importorskip("rpc.server")
    transport_mod = pytest.importorskip("rpc.transport")
    import asyncio
    import threading

    nfs, mountd = FakeServer(), FakeMountd()
    seen_creds: list[Any] = []

    def handler(service: Any) -> Any:
        async def run(ctx: Any, args: bytes) -> bytes:
            seen_creds.append(ctx.auth_sys)
            return bytes(service.call(ctx.proc, args))

        return run

    def program(number: int, name: str, procs: Any, service: Any) -> Any:
        rows = {
            int(p): server_mod.Procedure(int(p), p.name, handler(service), idempotent=True)
            for p in procs
        }
        return server_mod.Program(number, name, {3: rows})

    dispatcher = server_mod.RpcDispatcher()
    dispatcher.add_program(program(100003, "nfs", Nfs3Proc, nfs))
    dispatcher.add_program(program(100005, "mount", Mount3Proc, mountd))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    ports: dict[str, int] = {}
    servers: list[Any] = []

    async def start() -> None:
        tcp = await transport_mod.serve_tcp(dispatcher, "127.0.0.1", 0)
        udp = await transport_mod.serve_udp(dispatcher, "127.0.0.1", 0)
        servers.extend([tcp, udp])
        ports["tcp"], ports["udp"] = transport_mod.bound_port(tcp), transport_mod.bound_port(udp)
        ready.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield ports, nfs, seen_creds

    def stop() -> None:
        for s in servers:
            s.close()
        loop.stop()

    loop.call_soon_threadsafe(stop)
    thread.join(10)


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_end_to_end_over_rpc(rpc_servers: Any, transport: str) -> None:
    ports, _server, seen_creds = rpc_servers
    port = ports[transport]
    cred = auth_sys(1000, 100, (4,), machinename="e2e")
    with MountClient("127.0.0.1", port, transport, cred=cred, timeout=3) as mnt:
        root, flavors = mnt.mnt("/vm")
        assert flavors == (1,) and mnt.export() == [(b"/vm", (b"*",))]
    with NfsClient("127.0.0.1", port, transport, cred=cred, timeout=3) as nfs:
        nfs.null()
        assert nfs.walk(root, "a/b") == t.NfsFh3(b"a/b")
        name = f"f-{transport}".encode()
        assert nfs.write_all(name, b"0123456789") == 10
        assert nfs.read_all(name) == b"0123456789"
        assert [e.name for e in nfs.listdir(root)][-1] == b"z"
        # A 65-byte handle is garbage to the server's decoder: GARBAGE_ARGS, not a crash.
        from rpc.client import GarbageArgsError

        with pytest.raises(GarbageArgsError):
            nfs.getattr(b"x" * 65)
    assert seen_creds[-1].uid == 1000 and seen_creds[-1].gids == (4,)


# --- the server's pre-encoded READDIRPLUS entries -------------------------------------------

_U32 = st.integers(0, 2**32 - 1)
_NS = st.integers(0, 2**32 * 1_000_000_000 - 1)  # nfstime3 seconds are 32 bits


@FAST
@given(
    kind=st.sampled_from(list(FileType)),
    mode=st.integers(0, 0xFFFF),
    ids=st.tuples(_U32, _U32, _U32),
    size=st.integers(0, 2**63 - 1),
    rdev=st.tuples(_U32, _U32),
    times=st.tuples(_NS, _NS, _NS),
    fsid=st.integers(0, 2**64 - 1),
    fileid=st.integers(0, 2**64 - 1),
    name=st.binary(min_size=1, max_size=255),
    cookie=st.integers(0, 2**64 - 1),
    handle=st.binary(min_size=1, max_size=NFS3_FHSIZE),
)
def test_entryplus3_of_record_encodes_like_entryplus3(
    kind: FileType,
    mode: int,
    ids: tuple[int, int, int],
    size: int,
    rdev: tuple[int, int],
    times: tuple[int, int, int],
    fsid: int,
    fileid: int,
    name: bytes,
    cookie: int,
    handle: bytes,
) -> None:
    """READDIRPLUS encodes entries straight from inode records; the bytes must be exactly
    what the generic `EntryPlus3` encoder writes, alone and inside a whole reply."""

    nlink, uid, gid = ids
    record = Inode(kind, mode, nlink, uid, gid, size, *rdev, *times).pack()
    fast = t.EncodedEntry.entryplus3_of_record(
        fileid, name, cookie, fsid, INODE_ATTRS.unpack_from(record), handle
    )
    at, mt, ct = (t.NfsTime3(*divmod(ns, 1_000_000_000)) for ns in times)
    attrs = t.Fattr3(
        kind, mode & 0o7777, nlink, uid, gid, size, size, t.SpecData3(*rdev), fsid, fileid,
        at, mt, ct,
    )  # fmt: skip
    generic = t.EntryPlus3(fileid, name, cookie, attrs, t.NfsFh3(handle))
    assert pack(fast) == pack(generic)
    assert fast.wire_size() == len(pack(generic)) + 4
    replies = [
        t.ReaddirplusRes(OK, None, b"v" * 8, entries, eof=True)
        for entries in ((fast, fast), (generic, generic))
    ]
    assert pack(replies[0]) == pack(replies[1])
    decoded = unpack_all(t.ReaddirplusRes, pack(replies[0]))
    assert decoded.entries == (generic, generic)
