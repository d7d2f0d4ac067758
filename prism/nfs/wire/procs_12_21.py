"""NFSv3 procedures 12-21 (RFC 1813 sections 3.3.12-3.3.21), in RFC order: REMOVE, RMDIR,
RENAME, LINK, READDIR, READDIRPLUS, FSSTAT, FSINFO, PATHCONF, COMMIT.

Same conventions as `procs_1_11`: one `XxxArgs`, one `XxxRes` with `status` first, and
`XxxRes.failed` for the failure arm. Listings are tuples of `Entry3` / `EntryPlus3` (or the
server's `EncodedEntry`); the XDR linked list is encoded as value-follows booleans.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Self

from prism.nfs.const import (
    NFS3_COOKIEVERFSIZE,
    NFS3_WRITEVERFSIZE,
    NfsStat3,
)
from prism.nfs.wire.base import (
    _OK,
    _ZERO_VERF,
    FATTR3_SIZE,
    POST_OP_ATTR_MAX_SIZE,
    TIME_ZERO,
    WCC_EMPTY,
    DirOpArgs3,
    Fattr3,
    Gathered,
    NfsFh3,
    NfsTime3,
    WccData,
    _Result,
    _unpack_name,
    _unpack_status,
    pack_post_op_attr,
    pack_post_op_fh3,
    unpack_post_op_attr,
    unpack_post_op_fh3,
)
from prism.nfs.wire.packed import (
    _TRUE,
    EncodedEntry,
)
from rpc.xdr import Packer, Unpacker

# --- 12 REMOVE / 13 RMDIR -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoveArgs:
    object: DirOpArgs3

    def pack(self, p: Packer) -> None:
        self.object.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> Self:
        return cls(DirOpArgs3.unpack(u))


@dataclass(frozen=True, slots=True)
class RemoveRes(_Result):
    """OK and failure: dir_wcc."""

    status: NfsStat3
    dir_wcc: WccData = WCC_EMPTY

    @classmethod
    def failed(cls, status: NfsStat3, args: RemoveArgs, gathered: Gathered) -> Self:
        """Failure body: the directory's wcc_data (REMOVE, RMDIR)."""
        return cls(status, gathered.wcc(args.object.dir))

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        self.dir_wcc.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> Self:
        return cls(_unpack_status(u), WccData.unpack(u))


@dataclass(frozen=True, slots=True)
class RmdirArgs(RemoveArgs):
    """Same shape as RemoveArgs."""


@dataclass(frozen=True, slots=True)
class RmdirRes(RemoveRes):
    """Same shape as RemoveRes."""


# --- 14 RENAME ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenameArgs:
    from_: DirOpArgs3
    to: DirOpArgs3

    def pack(self, p: Packer) -> None:
        self.from_.pack(p)
        self.to.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> RenameArgs:
        return cls(DirOpArgs3.unpack(u), DirOpArgs3.unpack(u))


@dataclass(frozen=True, slots=True)
class RenameRes(_Result):
    """OK and failure: fromdir_wcc, todir_wcc."""

    status: NfsStat3
    fromdir_wcc: WccData = WCC_EMPTY
    todir_wcc: WccData = WCC_EMPTY

    @classmethod
    def failed(cls, status: NfsStat3, args: RenameArgs, gathered: Gathered) -> Self:
        """Failure body: both directories' wcc_data."""
        return cls(status, gathered.wcc(args.from_.dir), gathered.wcc(args.to.dir))

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        self.fromdir_wcc.pack(p)
        self.todir_wcc.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> RenameRes:
        return cls(_unpack_status(u), WccData.unpack(u), WccData.unpack(u))


# --- 15 LINK --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkArgs:
    file: NfsFh3
    link: DirOpArgs3

    def pack(self, p: Packer) -> None:
        self.file.pack(p)
        self.link.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> LinkArgs:
        return cls(NfsFh3.unpack(u), DirOpArgs3.unpack(u))


@dataclass(frozen=True, slots=True)
class LinkRes(_Result):
    """OK and failure: file_attributes, linkdir_wcc."""

    status: NfsStat3
    file_attributes: Fattr3 | None = None
    linkdir_wcc: WccData = WCC_EMPTY

    @classmethod
    def failed(cls, status: NfsStat3, args: LinkArgs, gathered: Gathered) -> Self:
        """Failure body: the file's post_op_attr and the directory's wcc_data."""
        return cls(status, gathered.post(args.file), gathered.wcc(args.link.dir))

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        pack_post_op_attr(p, self.file_attributes)
        self.linkdir_wcc.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> LinkRes:
        return cls(_unpack_status(u), unpack_post_op_attr(u), WccData.unpack(u))


# --- 16 READDIR -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReaddirArgs:
    dir: NfsFh3
    cookie: int
    cookieverf: bytes
    count: int

    def pack(self, p: Packer) -> None:
        self.dir.pack(p)
        p.pack_uhyper(self.cookie)
        p.pack_fopaque(NFS3_COOKIEVERFSIZE, self.cookieverf)
        p.pack_uint(self.count)

    @classmethod
    def unpack(cls, u: Unpacker) -> ReaddirArgs:
        fh = NfsFh3.unpack(u)
        cookie = u.unpack_uhyper()
        verf = u.unpack_fopaque(NFS3_COOKIEVERFSIZE)
        return cls(fh, cookie, verf, u.unpack_uint())  # the service clamps the count


def _padded(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True, slots=True)
class Entry3:
    fileid: int
    name: bytes
    cookie: int

    def pack(self, p: Packer) -> None:
        p.pack_uhyper(self.fileid)
        p.pack_string(self.name)
        p.pack_uhyper(self.cookie)

    @classmethod
    def unpack(cls, u: Unpacker) -> Entry3:
        return cls(u.unpack_uhyper(), _unpack_name(u), u.unpack_uhyper())

    def wire_size(self) -> int:
        """Bytes this entry adds to a READDIR reply, its value-follows flag included."""
        return 4 + 8 + 4 + _padded(len(self.name)) + 8


def _pack_listing(p: Packer, res: Any) -> None:
    """READDIR3res and READDIRPLUS3res share one shape; only the entry type differs."""
    p.pack_enum(res.status)
    pack_post_op_attr(p, res.dir_attributes)
    if res.status == _OK:
        p.pack_fopaque(NFS3_COOKIEVERFSIZE, res.cookieverf)
        entries = res.entries
        if entries and type(entries[0]) is EncodedEntry:  # the server's path: one join
            p.pack_raw(_TRUE + _TRUE.join([entry.raw for entry in entries]))
        else:
            for entry in entries:
                p.pack_bool(True)
                entry.pack(p)
        p.pack_bool(False)
        p.pack_bool(res.eof)


def _unpack_listing(u: Unpacker, unpack_entry: Any) -> tuple[Any, ...]:
    status = _unpack_status(u)
    attrs = unpack_post_op_attr(u)
    if status != _OK:
        return (status, attrs)
    verf = u.unpack_fopaque(NFS3_COOKIEVERFSIZE)
    entries = []
    while u.unpack_bool():
        entries.append(unpack_entry(u))
    return (status, attrs, verf, tuple(entries), u.unpack_bool())


READDIR_RESOK_MAX_FIXED = 4 + POST_OP_ATTR_MAX_SIZE + NFS3_COOKIEVERFSIZE + 4 + 4
"""Bytes of a READDIR/READDIRPLUS OK reply besides its entries (with dir attributes):
status, post_op_attr, cookieverf, the final value-follows FALSE and eof."""


@dataclass(frozen=True, slots=True)
class ReaddirRes(_Result):
    """OK: dir_attributes, cookieverf, entries, eof. Failure body: dir_attributes."""

    status: NfsStat3
    dir_attributes: Fattr3 | None = None
    cookieverf: bytes = _ZERO_VERF
    entries: tuple[Entry3, ...] = ()
    eof: bool = False

    @classmethod
    def failed(cls, status: NfsStat3, args: ReaddirArgs, gathered: Gathered) -> Self:
        """Failure body: the directory's post_op_attr."""
        return cls(status, gathered.post(args.dir))

    def pack(self, p: Packer) -> None:
        _pack_listing(p, self)

    @classmethod
    def unpack(cls, u: Unpacker) -> ReaddirRes:
        return cls(*_unpack_listing(u, Entry3.unpack))


# --- 17 READDIRPLUS -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReaddirplusArgs:
    dir: NfsFh3
    cookie: int
    cookieverf: bytes
    dircount: int
    maxcount: int

    def pack(self, p: Packer) -> None:
        self.dir.pack(p)
        p.pack_uhyper(self.cookie)
        p.pack_fopaque(NFS3_COOKIEVERFSIZE, self.cookieverf)
        p.pack_uint(self.dircount)
        p.pack_uint(self.maxcount)

    @classmethod
    def unpack(cls, u: Unpacker) -> ReaddirplusArgs:
        fh = NfsFh3.unpack(u)
        cookie = u.unpack_uhyper()
        verf = u.unpack_fopaque(NFS3_COOKIEVERFSIZE)
        return cls(fh, cookie, verf, u.unpack_uint(), u.unpack_uint())


@dataclass(frozen=True, slots=True)
class EntryPlus3:
    """entryplus3: name_attributes is post_op_attr, name_handle is post_op_fh3."""

    fileid: int
    name: bytes
    cookie: int
    name_attributes: Fattr3 | None = None
    name_handle: NfsFh3 | None = None

    def pack(self, p: Packer) -> None:
        p.pack_uhyper(self.fileid)
        p.pack_string(self.name)
        p.pack_uhyper(self.cookie)
        pack_post_op_attr(p, self.name_attributes)
        pack_post_op_fh3(p, self.name_handle)

    @classmethod
    def unpack(cls, u: Unpacker) -> EntryPlus3:
        fileid = u.unpack_uhyper()
        name = _unpack_name(u)
        cookie = u.unpack_uhyper()
        attrs = unpack_post_op_attr(u)
        return cls(fileid, name, cookie, attrs, unpack_post_op_fh3(u))

    def dir_size(self) -> int:
        """Bytes counted against READDIRPLUS `dircount` (no attributes, no handle)."""
        return 4 + 8 + 4 + _padded(len(self.name)) + 8

    def wire_size(self) -> int:
        """Bytes this entry adds to the reply (counted against `maxcount`)."""
        size = self.dir_size() + 4 + 4
        if self.name_attributes is not None:
            size += FATTR3_SIZE
        if self.name_handle is not None:
            size += 4 + _padded(len(self.name_handle.data))
        return size


@dataclass(frozen=True, slots=True)
class ReaddirplusRes(_Result):
    """OK: dir_attributes, cookieverf, entries, eof. Failure body: dir_attributes."""

    status: NfsStat3
    dir_attributes: Fattr3 | None = None
    cookieverf: bytes = _ZERO_VERF
    entries: tuple[EntryPlus3, ...] = ()
    eof: bool = False

    @classmethod
    def failed(cls, status: NfsStat3, args: ReaddirplusArgs, gathered: Gathered) -> Self:
        """Failure body: the directory's post_op_attr."""
        return cls(status, gathered.post(args.dir))

    def pack(self, p: Packer) -> None:
        _pack_listing(p, self)

    @classmethod
    def unpack(cls, u: Unpacker) -> ReaddirplusRes:
        return cls(*_unpack_listing(u, EntryPlus3.unpack))


# --- 18 FSSTAT ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FsstatArgs:
    fsroot: NfsFh3

    def pack(self, p: Packer) -> None:
        self.fsroot.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> FsstatArgs:
        return cls(NfsFh3.unpack(u))


_FSSTAT = struct.Struct(">6QI")


@dataclass(frozen=True, slots=True)
class FsstatRes(_Result):
    """OK: obj_attributes and the counters. Failure body: obj_attributes."""

    status: NfsStat3
    obj_attributes: Fattr3 | None = None
    tbytes: int = 0
    fbytes: int = 0
    abytes: int = 0
    tfiles: int = 0
    ffiles: int = 0
    afiles: int = 0
    invarsec: int = 0

    @classmethod
    def failed(cls, status: NfsStat3, args: FsstatArgs, gathered: Gathered) -> Self:
        """Failure body: the root's post_op_attr."""
        return cls(status, gathered.post(args.fsroot))

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        pack_post_op_attr(p, self.obj_attributes)
        if self.status == _OK:
            p.pack_raw(
                _FSSTAT.pack(
                    self.tbytes,
                    self.fbytes,
                    self.abytes,
                    self.tfiles,
                    self.ffiles,
                    self.afiles,
                    self.invarsec,
                )
            )

    @classmethod
    def unpack(cls, u: Unpacker) -> FsstatRes:
        status = _unpack_status(u)
        attrs = unpack_post_op_attr(u)
        if status != _OK:
            return cls(status, attrs)
        return cls(status, attrs, *_FSSTAT.unpack(u.unpack_fopaque(_FSSTAT.size)))


# --- 19 FSINFO ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FsinfoArgs:
    fsroot: NfsFh3

    def pack(self, p: Packer) -> None:
        self.fsroot.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> FsinfoArgs:
        return cls(NfsFh3.unpack(u))


_FSINFO_HEAD = struct.Struct(">7IQ")


@dataclass(frozen=True, slots=True)
class FsinfoRes(_Result):
    """OK: obj_attributes and the limits. Failure body: obj_attributes."""

    status: NfsStat3
    obj_attributes: Fattr3 | None = None
    rtmax: int = 0
    rtpref: int = 0
    rtmult: int = 0
    wtmax: int = 0
    wtpref: int = 0
    wtmult: int = 0
    dtpref: int = 0
    maxfilesize: int = 0
    time_delta: NfsTime3 = TIME_ZERO
    properties: int = 0

    @classmethod
    def failed(cls, status: NfsStat3, args: FsinfoArgs, gathered: Gathered) -> Self:
        """Failure body: the root's post_op_attr."""
        return cls(status, gathered.post(args.fsroot))

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        pack_post_op_attr(p, self.obj_attributes)
        if self.status == _OK:
            p.pack_raw(
                _FSINFO_HEAD.pack(
                    self.rtmax,
                    self.rtpref,
                    self.rtmult,
                    self.wtmax,
                    self.wtpref,
                    self.wtmult,
                    self.dtpref,
                    self.maxfilesize,
                )
            )
            self.time_delta.pack(p)
            p.pack_uint(self.properties)

    @classmethod
    def unpack(cls, u: Unpacker) -> FsinfoRes:
        status = _unpack_status(u)
        attrs = unpack_post_op_attr(u)
        if status != _OK:
            return cls(status, attrs)
        rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref, maxfilesize = _FSINFO_HEAD.unpack(
            u.unpack_fopaque(_FSINFO_HEAD.size)
        )
        return cls(
            status,
            attrs,
            rtmax,
            rtpref,
            rtmult,
            wtmax,
            wtpref,
            wtmult,
            dtpref,
            maxfilesize,
            NfsTime3.unpack(u),
            u.unpack_uint(),
        )


# --- 20 PATHCONF ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathconfArgs:
    object: NfsFh3

    def pack(self, p: Packer) -> None:
        self.object.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> PathconfArgs:
        return cls(NfsFh3.unpack(u))


@dataclass(frozen=True, slots=True)
class PathconfRes(_Result):
    """OK: obj_attributes and the properties. Failure body: obj_attributes."""

    status: NfsStat3
    obj_attributes: Fattr3 | None = None
    linkmax: int = 0
    name_max: int = 0
    no_trunc: bool = False
    chown_restricted: bool = False
    case_insensitive: bool = False
    case_preserving: bool = False

    @classmethod
    def failed(cls, status: NfsStat3, args: PathconfArgs, gathered: Gathered) -> Self:
        """Failure body: the object's post_op_attr."""
        return cls(status, gathered.post(args.object))

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        pack_post_op_attr(p, self.obj_attributes)
        if self.status == _OK:
            p.pack_uint(self.linkmax)
            p.pack_uint(self.name_max)
            p.pack_bool(self.no_trunc)
            p.pack_bool(self.chown_restricted)
            p.pack_bool(self.case_insensitive)
            p.pack_bool(self.case_preserving)

    @classmethod
    def unpack(cls, u: Unpacker) -> PathconfRes:
        status = _unpack_status(u)
        attrs = unpack_post_op_attr(u)
        if status != _OK:
            return cls(status, attrs)
        return cls(
            status,
            attrs,
            u.unpack_uint(),
            u.unpack_uint(),
            u.unpack_bool(),
            u.unpack_bool(),
            u.unpack_bool(),
            u.unpack_bool(),
        )


# --- 21 COMMIT ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitArgs:
    file: NfsFh3
    offset: int
    count: int

    def pack(self, p: Packer) -> None:
        self.file.pack(p)
        p.pack_uhyper(self.offset)
        p.pack_uint(self.count)

    @classmethod
    def unpack(cls, u: Unpacker) -> CommitArgs:
        return cls(NfsFh3.unpack(u), u.unpack_uhyper(), u.unpack_uint())


@dataclass(frozen=True, slots=True)
class CommitRes(_Result):
    """OK: file_wcc, verf. Failure body: file_wcc."""

    status: NfsStat3
    file_wcc: WccData = WCC_EMPTY
    verf: bytes = _ZERO_VERF

    @classmethod
    def failed(cls, status: NfsStat3, args: CommitArgs, gathered: Gathered) -> Self:
        """Failure body: the file's wcc_data."""
        return cls(status, gathered.wcc(args.file))

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        self.file_wcc.pack(p)
        if self.status == _OK:
            p.pack_fopaque(NFS3_WRITEVERFSIZE, self.verf)

    @classmethod
    def unpack(cls, u: Unpacker) -> CommitRes:
        status = _unpack_status(u)
        wcc = WccData.unpack(u)
        if status != _OK:
            return cls(status, wcc)
        return cls(status, wcc, u.unpack_fopaque(NFS3_WRITEVERFSIZE))
