"""The NFSv3 and MOUNTv3 procedure tables: one row per procedure, the only place that says
what a procedure is.

Theory of operation: like NFS-Ganesha's `nfs3_func_desc[]`, a row names its argument and
result types (which drive decoding, encoding and, through `res.failed`, the failure body),
the service method that answers it (`handler`, bound by name when `prism.nfs.service`
builds its RPC program, so a row without a method fails at startup, not on a call), and flags:

* `writes`: the procedure changes the store, so it runs in a write transaction (and the store
  answers NFS3ERR_ROFS for an object of a snapshot or a read-only share).
* `idempotent`: False sends retransmissions through the duplicate request cache, so a
  retransmitted CREATE/REMOVE/RENAME gets the first reply, not EEXIST/NOENT.
* `durability`: when the change must be on disk relative to the reply (`Durability`).

Anything not in a table is not a procedure: the RPC layer answers PROC_UNAVAIL before
decoding. `decode_args`/`encode_result` (server side) and `encode_args`/`decode_result`
(client side) are driven by the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from prism.nfs.const import Mount3Proc, Nfs3Proc, NfsStat3
from prism.nfs.wire.base import _OK, Void
from prism.nfs.wire.mount import DirPath, Exports, MountList, MountRes
from prism.nfs.wire.procs_1_11 import (
    AccessArgs,
    AccessRes,
    CreateArgs,
    CreateRes,
    GetattrArgs,
    GetattrRes,
    LookupArgs,
    LookupRes,
    MkdirArgs,
    MkdirRes,
    MknodArgs,
    MknodRes,
    ReadArgs,
    ReadlinkArgs,
    ReadlinkRes,
    ReadRes,
    SetattrArgs,
    SetattrRes,
    SymlinkArgs,
    SymlinkRes,
    WriteArgs,
    WriteRes,
)
from prism.nfs.wire.procs_12_21 import (
    CommitArgs,
    CommitRes,
    FsinfoArgs,
    FsinfoRes,
    FsstatArgs,
    FsstatRes,
    LinkArgs,
    LinkRes,
    PathconfArgs,
    PathconfRes,
    ReaddirArgs,
    ReaddirplusArgs,
    ReaddirplusRes,
    ReaddirRes,
    RemoveArgs,
    RemoveRes,
    RenameArgs,
    RenameRes,
    RmdirArgs,
    RmdirRes,
)
from rpc.xdr import Packer, Unpacker


class Durability(Enum):
    """When a procedure's change must be durable, relative to its reply."""

    NONE = "none"
    """It changes nothing: answered at once, without waiting for anything."""
    REPLY = "reply"
    """Durable before the reply leaves (with `prism serve --async`, only at COMMIT)."""
    STABLE = "stable"
    """WRITE: as its `stable` argument asks; an UNSTABLE write is answered before the
    commit, and a later COMMIT makes it durable."""
    COMMIT = "commit"
    """COMMIT: waits for the commit of the open batch (every earlier UNSTABLE write), even
    with `prism serve --async`."""


@dataclass(frozen=True, slots=True)
class ProcRow:
    """One procedure: its codec, the service method that answers it, and its flags."""

    args: type[Any]  # a Wire type; Any so callers may construct it, e.g. res(status)
    res: type[Any]
    handler: str
    writes: bool = False
    idempotent: bool = True
    durability: Durability = Durability.NONE

    def failed(self, status: NfsStat3, args: Any, gathered: Any) -> Any:
        """The procedure's failure result, its body built from what the call gathered."""
        return self.res.failed(status, args, gathered)


_REPLY = Durability.REPLY

NFS3_PROCS: dict[Nfs3Proc, ProcRow] = {
    Nfs3Proc.NULL: ProcRow(Void, Void, "null"),
    Nfs3Proc.GETATTR: ProcRow(GetattrArgs, GetattrRes, "getattr"),
    Nfs3Proc.SETATTR: ProcRow(
        SetattrArgs, SetattrRes, "setattr", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.LOOKUP: ProcRow(LookupArgs, LookupRes, "lookup"),
    Nfs3Proc.ACCESS: ProcRow(AccessArgs, AccessRes, "access"),
    Nfs3Proc.READLINK: ProcRow(ReadlinkArgs, ReadlinkRes, "readlink"),
    Nfs3Proc.READ: ProcRow(ReadArgs, ReadRes, "read"),
    Nfs3Proc.WRITE: ProcRow(
        WriteArgs, WriteRes, "write", writes=True, durability=Durability.STABLE
    ),
    Nfs3Proc.CREATE: ProcRow(
        CreateArgs, CreateRes, "create", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.MKDIR: ProcRow(
        MkdirArgs, MkdirRes, "mkdir", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.SYMLINK: ProcRow(
        SymlinkArgs, SymlinkRes, "symlink", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.MKNOD: ProcRow(
        MknodArgs, MknodRes, "mknod", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.REMOVE: ProcRow(
        RemoveArgs, RemoveRes, "remove", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.RMDIR: ProcRow(
        RmdirArgs, RmdirRes, "rmdir", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.RENAME: ProcRow(
        RenameArgs, RenameRes, "rename", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.LINK: ProcRow(
        LinkArgs, LinkRes, "link", writes=True, idempotent=False, durability=_REPLY
    ),
    Nfs3Proc.READDIR: ProcRow(ReaddirArgs, ReaddirRes, "readdir"),
    Nfs3Proc.READDIRPLUS: ProcRow(ReaddirplusArgs, ReaddirplusRes, "readdirplus"),
    Nfs3Proc.FSSTAT: ProcRow(FsstatArgs, FsstatRes, "fsstat"),
    Nfs3Proc.FSINFO: ProcRow(FsinfoArgs, FsinfoRes, "fsinfo"),
    Nfs3Proc.PATHCONF: ProcRow(PathconfArgs, PathconfRes, "pathconf"),
    Nfs3Proc.COMMIT: ProcRow(CommitArgs, CommitRes, "commit", durability=Durability.COMMIT),
}

MOUNT3_PROCS: dict[Mount3Proc, ProcRow] = {
    Mount3Proc.NULL: ProcRow(Void, Void, "mount_null"),
    Mount3Proc.MNT: ProcRow(DirPath, MountRes, "mnt"),
    Mount3Proc.DUMP: ProcRow(Void, MountList, "dump"),
    Mount3Proc.UMNT: ProcRow(DirPath, Void, "umnt"),
    Mount3Proc.UMNTALL: ProcRow(Void, Void, "umntall"),
    Mount3Proc.EXPORT: ProcRow(Void, Exports, "export"),
}
"""MOUNT's handlers are coroutines `(ctx, args)`: they change nothing in the store."""


def _row(table: dict[Any, ProcRow], proc: int) -> ProcRow:
    try:
        return table[proc]
    except KeyError:
        raise ValueError(f"no such procedure {proc}; check the table first") from None


def decode_as(cls: type[Any], data: bytes | memoryview) -> Any:
    """Decode one whole value of wire type `cls`; trailing bytes are an XdrError."""
    u = Unpacker(data)
    value = cls.unpack(u)
    u.done()
    return value


def encode_as(cls: type[Any], value: Any) -> bytes:
    """Encode `value`, which must be exactly of wire type `cls`."""
    if type(value) is not cls:
        raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
    p = Packer()
    value.pack(p)
    return p.get_buffer()


def decode_args(proc: int, data: bytes | memoryview) -> Any:
    """Server side: decode NFSv3 arguments. Raises XdrError (-> GARBAGE_ARGS) on bad input;
    ValueError if `proc` is not in NFS3_PROCS (answer PROC_UNAVAIL before calling)."""
    return decode_as(_row(NFS3_PROCS, proc).args, data)


def encode_result(proc: int, result: Any) -> bytes:
    """Server side: encode an NFSv3 result of exactly the procedure's result type."""
    return encode_as(_row(NFS3_PROCS, proc).res, result)


def encode_args(proc: int, args: Any) -> bytes:
    """Client side: encode NFSv3 arguments."""
    return encode_as(_row(NFS3_PROCS, proc).args, args)


def decode_result(proc: int, data: bytes | memoryview) -> Any:
    """Client side: decode an NFSv3 result; raises XdrError on a malformed reply."""
    return decode_as(_row(NFS3_PROCS, proc).res, data)


def error_result(proc: int, status: NfsStat3, **body: Any) -> Any:
    """A failure result for `proc`, e.g. error_result(LOOKUP, NOENT, dir_attributes=a)."""
    if status == _OK:
        raise ValueError("error_result needs a failure status")
    return _row(NFS3_PROCS, proc).res(status, **body)


def decode_mount_args(proc: int, data: bytes | memoryview) -> Any:
    return decode_as(_row(MOUNT3_PROCS, proc).args, data)


def encode_mount_result(proc: int, result: Any) -> bytes:
    return encode_as(_row(MOUNT3_PROCS, proc).res, result)


def encode_mount_args(proc: int, args: Any) -> bytes:
    return encode_as(_row(MOUNT3_PROCS, proc).args, args)


def decode_mount_result(proc: int, data: bytes | memoryview) -> Any:
    return decode_as(_row(MOUNT3_PROCS, proc).res, data)
