"""NFSv3 and MOUNTv3 wire types (RFC 1813) with their XDR codecs, and the procedure tables.

Theory of operation
-------------------
Every XDR struct or union that the 22 NFSv3 procedures and the six MOUNTv3 procedures use is a
frozen, slotted dataclass with `pack(self, p: Packer)` and `unpack(cls, u: Unpacker)`. The
server decodes arguments and encodes results; the test client does the reverse, with the same
code. There is no I/O here.

Shapes chosen to keep the Python side flat and obvious:

* ``post_op_attr`` is ``Fattr3 | None``, ``pre_op_attr`` is ``WccAttr | None`` and
  ``post_op_fh3`` is ``NfsFh3 | None`` (``None`` = "attributes/handle do not follow").
* ``sattr3``'s ``set_it`` unions are ``None`` (leave alone) or a value; its times are
  ``TimeHow.DONT_CHANGE``, ``TimeHow.SET_TO_SERVER_TIME`` or an ``NfsTime3`` (which *is*
  SET_TO_CLIENT_TIME). Other unions in arguments (createhow3, mknoddata3, sattrguard3) are
  flattened the same way: fields that do not apply to the discriminant are ``None``.
* Each procedure has exactly one result class ``XxxRes`` whose first field is ``status``.
  The fields of the RFC's ``resfail`` arm (``wcc_data`` / ``post_op_attr``) are always
  encoded; the other ``resok`` fields only when ``status`` is NFS3_OK, and decode to their
  defaults otherwise. ``XxxRes(status)`` is therefore a valid failure result for any
  procedure, and adding the failure body is ``XxxRes(status, dir_wcc=...)``.
* Redundant length fields are not stored: READ3resok's ``count`` and WRITE3args' ``count``
  are ``len(data)`` (exposed as a ``count`` property).
* Directory listings are tuples of ``Entry3`` / ``EntryPlus3``; the XDR linked list
  (``*nextentry``) is encoded as value-follows booleans.

Decoders accept exactly one encoding and raise only `XdrError` on hostile input: truncation,
trailing bytes (at the `decode_*` entry points), enum values outside their enums, WRITE count
> len(data), and the bounds the XDR types themselves declare (handles <= NFS3_FHSIZE, MOUNT
dirpath <= MNTPATHLEN). RFC 1813's filename3, nfspath3, WRITE data and the READ/READDIR
counts are unbounded in XDR, so they decode whatever the record holds (a record is itself
bounded); the server's own limits on them (`prism.nfs.const` MAX_NAME, MAX_PATH, MAX_READ,
MAX_WRITE) are the service's to answer: NFS3ERR_NAMETOOLONG, or a reply clamped to the
maximum, never GARBAGE_ARGS. Encoders trust the caller (our own server or a
test client that may deliberately send an over-long handle); they raise ValueError only where
XDR itself cannot represent a value (e.g. a verifier that is not 8 bytes).

`NFS3_PROCS` and `MOUNT3_PROCS` are the single tables mapping each procedure to its argument
and result types; `decode_args`/`encode_result` (server side) and `encode_args`/
`decode_result` (client side) are driven by them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol, Self, TypeVar

from prism.nfs.const import (
    MAX_AUTH_FLAVORS,
    MAX_READ,
    MNTNAMLEN,
    MNTPATHLEN,
    NFS3_COOKIEVERFSIZE,
    NFS3_CREATEVERFSIZE,
    NFS3_FHSIZE,
    NFS3_WRITEVERFSIZE,
    CreateMode,
    Mount3Proc,
    MountStat3,
    Nfs3Proc,
    NfsStat3,
    StableHow,
    TimeHow,
)
from prism.store.types import NOW, Attr, FileType, SetAttr
from rpc.xdr import Packer, Unpacker, XdrError

_E = TypeVar("_E", bound=IntEnum)

_OK = NfsStat3.NFS3_OK
_ZERO_VERF = bytes(8)
_U32_MAX = 0xFFFFFFFF


class Wire(Protocol):
    """What every wire type offers: an XDR encoder and a classmethod decoder."""

    def pack(self, p: Packer) -> None: ...

    @classmethod
    def unpack(cls, u: Unpacker) -> Any: ...


# --- primitive helpers ----------------------------------------------------------------------


def unpack_enum(u: Unpacker, enum: type[_E]) -> _E:
    """Decode an XDR enum, rejecting values the enum does not define."""
    value = u.unpack_int()
    try:
        return enum(value)
    except ValueError:
        raise XdrError(f"{value} is not a valid {enum.__name__}") from None


def _unpack_name(u: Unpacker) -> bytes:
    return u.unpack_string()  # filename3: string<>; the store refuses > MAX_NAME


def _unpack_path(u: Unpacker) -> bytes:
    return u.unpack_string()  # nfspath3: string<>; the store refuses > MAX_PATH


# --- basic structures -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Void:
    """XDR void: NULL's arguments and result, MOUNT's UMNT/UMNTALL results, and so on."""

    def pack(self, p: Packer) -> None:
        pass

    @classmethod
    def unpack(cls, u: Unpacker) -> Void:
        return VOID


VOID = Void()


@dataclass(frozen=True, slots=True)
class NfsFh3:
    """nfs_fh3 (and MOUNT's fhandle3): an opaque handle of at most NFS3_FHSIZE bytes."""

    data: bytes

    def pack(self, p: Packer) -> None:
        p.pack_opaque(self.data)

    @classmethod
    def unpack(cls, u: Unpacker) -> NfsFh3:
        return cls(u.unpack_opaque(NFS3_FHSIZE))


@dataclass(frozen=True, slots=True)
class NfsTime3:
    seconds: int
    nseconds: int

    def pack(self, p: Packer) -> None:
        p.pack_uint(self.seconds)
        p.pack_uint(self.nseconds)

    @classmethod
    def unpack(cls, u: Unpacker) -> NfsTime3:
        return cls(u.unpack_uint(), u.unpack_uint())

    @classmethod
    def from_ns(cls, ns: int) -> NfsTime3:
        """From nanoseconds since the epoch, clamped to what nfstime3 can carry."""
        ns = max(ns, 0)
        seconds, nseconds = divmod(ns, 1_000_000_000)
        if seconds > _U32_MAX:
            return cls(_U32_MAX, 999_999_999)
        return cls(seconds, nseconds)

    def to_ns(self) -> int:
        return self.seconds * 1_000_000_000 + self.nseconds


@dataclass(frozen=True, slots=True)
class SpecData3:
    """specdata3: (major, minor) of a device."""

    specdata1: int = 0
    specdata2: int = 0

    def pack(self, p: Packer) -> None:
        p.pack_uint(self.specdata1)
        p.pack_uint(self.specdata2)

    @classmethod
    def unpack(cls, u: Unpacker) -> SpecData3:
        return cls(u.unpack_uint(), u.unpack_uint())


TIME_ZERO = NfsTime3(0, 0)

_FATTR3 = struct.Struct(">5I2Q2I2Q6I")
FATTR3_SIZE = _FATTR3.size  # 84
POST_OP_ATTR_MAX_SIZE = 4 + FATTR3_SIZE


@dataclass(frozen=True, slots=True)
class Fattr3:
    type: FileType
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    rdev: SpecData3
    fsid: int
    fileid: int
    atime: NfsTime3
    mtime: NfsTime3
    ctime: NfsTime3

    def pack(self, p: Packer) -> None:
        p.pack_raw(
            _FATTR3.pack(
                self.type,
                self.mode,
                self.nlink,
                self.uid,
                self.gid,
                self.size,
                self.used,
                self.rdev.specdata1,
                self.rdev.specdata2,
                self.fsid,
                self.fileid,
                self.atime.seconds,
                self.atime.nseconds,
                self.mtime.seconds,
                self.mtime.nseconds,
                self.ctime.seconds,
                self.ctime.nseconds,
            )
        )

    @classmethod
    def unpack(cls, u: Unpacker) -> Fattr3:
        f = _FATTR3.unpack(u.unpack_fopaque(FATTR3_SIZE))
        try:
            ftype = FileType(f[0])
        except ValueError:
            raise XdrError(f"{f[0]} is not a valid ftype3") from None
        return cls(
            ftype,
            f[1],
            f[2],
            f[3],
            f[4],
            f[5],
            f[6],
            SpecData3(f[7], f[8]),
            f[9],
            f[10],
            NfsTime3(f[11], f[12]),
            NfsTime3(f[13], f[14]),
            NfsTime3(f[15], f[16]),
        )

    @classmethod
    def from_attr(cls, attr: Attr, fsid: int) -> Fattr3:
        """Build fattr3 from the store's attributes; `fsid` names the exported filesystem."""
        return cls(
            attr.type,
            attr.mode & 0o7777,
            attr.nlink,
            attr.uid,
            attr.gid,
            attr.size,
            attr.used,
            SpecData3(attr.rdev[0], attr.rdev[1]),
            fsid,
            attr.fileid,
            NfsTime3.from_ns(attr.atime_ns),
            NfsTime3.from_ns(attr.mtime_ns),
            NfsTime3.from_ns(attr.ctime_ns),
        )


def pack_post_op_attr(p: Packer, attrs: Fattr3 | None) -> None:
    if attrs is None:
        p.pack_bool(False)
    else:
        p.pack_bool(True)
        attrs.pack(p)


def unpack_post_op_attr(u: Unpacker) -> Fattr3 | None:
    return Fattr3.unpack(u) if u.unpack_bool() else None


_WCC_ATTR = struct.Struct(">Q4I")


def _fattr3_fields(
    kind: int,
    mode: int,
    nlink: int,
    uid: int,
    gid: int,
    size: int,
    used: int,
    major: int,
    minor: int,
    fsid: int,
    fileid: int,
    atime_ns: int,
    mtime_ns: int,
    ctime_ns: int,
) -> tuple[int, ...]:
    """fattr3's 17 wire fields in order (`_FATTR3`), times split into seconds and ns."""
    at, an = divmod(atime_ns, 1_000_000_000)
    mt, mn = divmod(mtime_ns, 1_000_000_000)
    ct, cn = divmod(ctime_ns, 1_000_000_000)
    return (
        kind,
        mode & 0o7777,
        nlink,
        uid,
        gid,
        size,
        used,
        major,
        minor,
        fsid,
        fileid,
        at & _U32_MAX,
        an,
        mt & _U32_MAX,
        mn,
        ct & _U32_MAX,
        cn,
    )


class PackedFattr3:
    """A fattr3 already encoded: the server's fast path from the store's `Attr`.

    Building an `Fattr3` (and three `NfsTime3`) per object dominates GETATTR and READDIRPLUS;
    this packs the 84 bytes with one struct call. It only encodes (servers never decode their
    own attributes); clients decode replies into `Fattr3` as usual.
    """

    __slots__ = ("raw",)

    def __init__(self, attr: Attr, fsid: int) -> None:
        self.raw = _FATTR3.pack(
            *_fattr3_fields(
                attr.type,
                attr.mode,
                attr.nlink,
                attr.uid,
                attr.gid,
                attr.size,
                attr.used,
                attr.rdev[0],
                attr.rdev[1],
                fsid,
                attr.fileid,
                attr.atime_ns,
                attr.mtime_ns,
                attr.ctime_ns,
            )
        )

    def pack(self, p: Packer) -> None:
        p.pack_raw(self.raw)


_ENTRY_HEAD = struct.Struct(">QI")
_ENTRYPLUS_TAIL = struct.Struct(">QI5I2Q2I2Q6III")
"""cookie, name_attributes (TRUE + fattr3), name_handle (TRUE + handle length)."""
_TRUE = b"\0\0\0\1"
_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")


class EncodedEntry:
    """An entry3 / entryplus3 already encoded (without its value-follows flag): the server's
    fast path for READDIR and READDIRPLUS. Encodes exactly like `Entry3` / `EntryPlus3`.
    A reply's entries are all encoded or none are (`_pack_listing` joins them at once)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def pack(self, p: Packer) -> None:
        p.pack_raw(self.raw)

    def wire_size(self) -> int:
        return 4 + len(self.raw)

    @classmethod
    def entry3(cls, fileid: int, name: bytes, cookie: int) -> EncodedEntry:
        return cls(
            _ENTRY_HEAD.pack(fileid, len(name))
            + name
            + _PADDING[len(name) & 3]
            + struct.pack(">Q", cookie)
        )

    @classmethod
    def entryplus3_of_record(
        cls,
        fileid: int,
        name: bytes,
        cookie: int,
        fsid: int,
        attrs: tuple[int, ...],
        handle: bytes,
    ) -> EncodedEntry:
        """An entryplus3 from an inode record's `INODE_ATTRS` fields, in two packs."""
        kind, mode, nlink, uid, gid, size, major, minor, at_ns, mt_ns, ct_ns = attrs
        fields = _fattr3_fields(
            kind, mode, nlink, uid, gid, size, size, major, minor, fsid, fileid, at_ns, mt_ns, ct_ns
        )
        tail = _ENTRYPLUS_TAIL.pack(cookie, 1, *fields, 1, len(handle))
        head = _ENTRY_HEAD.pack(fileid, len(name))
        return cls(
            b"".join((head, name, _PADDING[len(name) & 3], tail, handle, _PADDING[len(handle) & 3]))
        )

    @classmethod
    def entryplus3(
        cls, fileid: int, name: bytes, cookie: int, attrs: PackedFattr3, handle: bytes
    ) -> EncodedEntry:
        return cls(
            b"".join(
                (
                    _ENTRY_HEAD.pack(fileid, len(name)),
                    name,
                    _PADDING[len(name) & 3],
                    struct.pack(">Q", cookie),
                    _TRUE,
                    attrs.raw,
                    _TRUE,
                    struct.pack(">I", len(handle)),
                    handle,
                    _PADDING[len(handle) & 3],
                )
            )
        )


@dataclass(frozen=True, slots=True)
class WccAttr:
    size: int
    mtime: NfsTime3
    ctime: NfsTime3

    def pack(self, p: Packer) -> None:
        p.pack_raw(
            _WCC_ATTR.pack(
                self.size,
                self.mtime.seconds,
                self.mtime.nseconds,
                self.ctime.seconds,
                self.ctime.nseconds,
            )
        )

    @classmethod
    def unpack(cls, u: Unpacker) -> WccAttr:
        f = _WCC_ATTR.unpack(u.unpack_fopaque(_WCC_ATTR.size))
        return cls(f[0], NfsTime3(f[1], f[2]), NfsTime3(f[3], f[4]))

    @classmethod
    def from_attr(cls, attr: Attr) -> WccAttr:
        return cls(attr.size, NfsTime3.from_ns(attr.mtime_ns), NfsTime3.from_ns(attr.ctime_ns))


def pack_pre_op_attr(p: Packer, attrs: WccAttr | None) -> None:
    if attrs is None:
        p.pack_bool(False)
    else:
        p.pack_bool(True)
        attrs.pack(p)


def unpack_pre_op_attr(u: Unpacker) -> WccAttr | None:
    return WccAttr.unpack(u) if u.unpack_bool() else None


@dataclass(frozen=True, slots=True)
class WccData:
    """Weak cache consistency data: attributes before (pre_op) and after (post_op)."""

    before: WccAttr | None = None
    after: Fattr3 | None = None

    def pack(self, p: Packer) -> None:
        pack_pre_op_attr(p, self.before)
        pack_post_op_attr(p, self.after)

    @classmethod
    def unpack(cls, u: Unpacker) -> WccData:
        return cls(unpack_pre_op_attr(u), unpack_post_op_attr(u))


WCC_EMPTY = WccData()


def pack_post_op_fh3(p: Packer, fh: NfsFh3 | None) -> None:
    if fh is None:
        p.pack_bool(False)
    else:
        p.pack_bool(True)
        fh.pack(p)


def unpack_post_op_fh3(u: Unpacker) -> NfsFh3 | None:
    return NfsFh3.unpack(u) if u.unpack_bool() else None


SetTime = TimeHow | NfsTime3
"""set_atime / set_mtime: DONT_CHANGE, SET_TO_SERVER_TIME, or an NfsTime3 (client time)."""


def _pack_set_time(p: Packer, value: SetTime) -> None:
    if isinstance(value, NfsTime3):
        p.pack_enum(TimeHow.SET_TO_CLIENT_TIME)
        value.pack(p)
    elif value == TimeHow.SET_TO_CLIENT_TIME:
        raise ValueError("SET_TO_CLIENT_TIME is spelled as an NfsTime3 value")
    else:
        p.pack_enum(value)


def _unpack_set_time(u: Unpacker) -> SetTime:
    how = unpack_enum(u, TimeHow)
    if how == TimeHow.SET_TO_CLIENT_TIME:
        return NfsTime3.unpack(u)
    return how


def _pack_opt_uint(p: Packer, value: int | None) -> None:
    if value is None:
        p.pack_bool(False)
    else:
        p.pack_bool(True)
        p.pack_uint(value)


def _unpack_opt_uint(u: Unpacker) -> int | None:
    return u.unpack_uint() if u.unpack_bool() else None


@dataclass(frozen=True, slots=True)
class Sattr3:
    """Attributes to set; None (or DONT_CHANGE for times) leaves a field alone."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime: SetTime = TimeHow.DONT_CHANGE
    mtime: SetTime = TimeHow.DONT_CHANGE

    def pack(self, p: Packer) -> None:
        _pack_opt_uint(p, self.mode)
        _pack_opt_uint(p, self.uid)
        _pack_opt_uint(p, self.gid)
        if self.size is None:
            p.pack_bool(False)
        else:
            p.pack_bool(True)
            p.pack_uhyper(self.size)
        _pack_set_time(p, self.atime)
        _pack_set_time(p, self.mtime)

    @classmethod
    def unpack(cls, u: Unpacker) -> Sattr3:
        mode = _unpack_opt_uint(u)
        uid = _unpack_opt_uint(u)
        gid = _unpack_opt_uint(u)
        size = u.unpack_uhyper() if u.unpack_bool() else None
        return cls(mode, uid, gid, size, _unpack_set_time(u), _unpack_set_time(u))

    def to_setattr(self) -> SetAttr:
        """The store's SetAttr: client times in ns, SET_TO_SERVER_TIME as `NOW`."""
        return SetAttr(
            mode=None if self.mode is None else self.mode & 0o7777,
            uid=self.uid,
            gid=self.gid,
            size=self.size,
            atime_ns=_set_time_ns(self.atime),
            mtime_ns=_set_time_ns(self.mtime),
        )


SATTR_EMPTY = Sattr3()


def _set_time_ns(value: SetTime) -> int | None:
    if isinstance(value, NfsTime3):
        return value.to_ns()
    return NOW if value == TimeHow.SET_TO_SERVER_TIME else None


@dataclass(frozen=True, slots=True)
class DirOpArgs3:
    dir: NfsFh3
    name: bytes

    def pack(self, p: Packer) -> None:
        self.dir.pack(p)
        p.pack_string(self.name)

    @classmethod
    def unpack(cls, u: Unpacker) -> DirOpArgs3:
        return cls(NfsFh3.unpack(u), _unpack_name(u))


# --- result base ----------------------------------------------------------------------------


class _Result:
    """Mixin for result classes: `ok` is `status == NFS3_OK`."""

    __slots__ = ()
    status: NfsStat3

    @property
    def ok(self) -> bool:
        return self.status == _OK


def _unpack_status(u: Unpacker) -> NfsStat3:
    return unpack_enum(u, NfsStat3)


def _need(value: Any, name: str) -> Any:
    if value is None:
        raise ValueError(f"a successful result needs {name}")
    return value


# --- 0 NULL: Void / Void --------------------------------------------------------------------

# --- 1 GETATTR ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetattrArgs:
    object: NfsFh3

    def pack(self, p: Packer) -> None:
        self.object.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> GetattrArgs:
        return cls(NfsFh3.unpack(u))


@dataclass(frozen=True, slots=True)
class GetattrRes(_Result):
    """OK: obj_attributes. Failure body: void."""

    status: NfsStat3
    obj_attributes: Fattr3 | None = None

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        if self.status == _OK:
            _need(self.obj_attributes, "obj_attributes").pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> GetattrRes:
        status = _unpack_status(u)
        if status == _OK:
            return cls(status, Fattr3.unpack(u))
        return cls(status)


# --- 2 SETATTR ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetattrArgs:
    """`guard` is sattrguard3: None (no check) or the ctime the object must still have."""

    object: NfsFh3
    new_attributes: Sattr3
    guard: NfsTime3 | None = None

    def pack(self, p: Packer) -> None:
        self.object.pack(p)
        self.new_attributes.pack(p)
        if self.guard is None:
            p.pack_bool(False)
        else:
            p.pack_bool(True)
            self.guard.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> SetattrArgs:
        obj = NfsFh3.unpack(u)
        attrs = Sattr3.unpack(u)
        guard = NfsTime3.unpack(u) if u.unpack_bool() else None
        return cls(obj, attrs, guard)


@dataclass(frozen=True, slots=True)
class SetattrRes(_Result):
    """OK and failure: obj_wcc."""

    status: NfsStat3
    obj_wcc: WccData = WCC_EMPTY

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        self.obj_wcc.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> SetattrRes:
        return cls(_unpack_status(u), WccData.unpack(u))


# --- 3 LOOKUP -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LookupArgs:
    what: DirOpArgs3

    def pack(self, p: Packer) -> None:
        self.what.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> LookupArgs:
        return cls(DirOpArgs3.unpack(u))


@dataclass(frozen=True, slots=True)
class LookupRes(_Result):
    """OK: object, obj_attributes, dir_attributes. Failure body: dir_attributes."""

    status: NfsStat3
    object: NfsFh3 | None = None
    obj_attributes: Fattr3 | None = None
    dir_attributes: Fattr3 | None = None

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        if self.status == _OK:
            _need(self.object, "object").pack(p)
            pack_post_op_attr(p, self.obj_attributes)
        pack_post_op_attr(p, self.dir_attributes)

    @classmethod
    def unpack(cls, u: Unpacker) -> LookupRes:
        status = _unpack_status(u)
        if status == _OK:
            obj = NfsFh3.unpack(u)
            obj_attrs = unpack_post_op_attr(u)
            return cls(status, obj, obj_attrs, unpack_post_op_attr(u))
        return cls(status, dir_attributes=unpack_post_op_attr(u))


# --- 4 ACCESS -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessArgs:
    object: NfsFh3
    access: int

    def pack(self, p: Packer) -> None:
        self.object.pack(p)
        p.pack_uint(self.access)

    @classmethod
    def unpack(cls, u: Unpacker) -> AccessArgs:
        return cls(NfsFh3.unpack(u), u.unpack_uint())


@dataclass(frozen=True, slots=True)
class AccessRes(_Result):
    """OK: obj_attributes, access. Failure body: obj_attributes."""

    status: NfsStat3
    obj_attributes: Fattr3 | None = None
    access: int = 0

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        pack_post_op_attr(p, self.obj_attributes)
        if self.status == _OK:
            p.pack_uint(self.access)

    @classmethod
    def unpack(cls, u: Unpacker) -> AccessRes:
        status = _unpack_status(u)
        attrs = unpack_post_op_attr(u)
        if status == _OK:
            return cls(status, attrs, u.unpack_uint())
        return cls(status, attrs)


# --- 5 READLINK -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadlinkArgs:
    symlink: NfsFh3

    def pack(self, p: Packer) -> None:
        self.symlink.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> ReadlinkArgs:
        return cls(NfsFh3.unpack(u))


@dataclass(frozen=True, slots=True)
class ReadlinkRes(_Result):
    """OK: symlink_attributes, data (the target). Failure body: symlink_attributes."""

    status: NfsStat3
    symlink_attributes: Fattr3 | None = None
    data: bytes = b""

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        pack_post_op_attr(p, self.symlink_attributes)
        if self.status == _OK:
            p.pack_string(self.data)

    @classmethod
    def unpack(cls, u: Unpacker) -> ReadlinkRes:
        status = _unpack_status(u)
        attrs = unpack_post_op_attr(u)
        if status == _OK:
            return cls(status, attrs, _unpack_path(u))
        return cls(status, attrs)


# --- 6 READ ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadArgs:
    file: NfsFh3
    offset: int
    count: int

    def pack(self, p: Packer) -> None:
        self.file.pack(p)
        p.pack_uhyper(self.offset)
        p.pack_uint(self.count)

    @classmethod
    def unpack(cls, u: Unpacker) -> ReadArgs:
        fh = NfsFh3.unpack(u)
        offset = u.unpack_uhyper()
        return cls(fh, offset, u.unpack_uint())  # the service clamps it to its maximum


@dataclass(frozen=True, slots=True)
class ReadRes(_Result):
    """OK: file_attributes, eof, data (count = len(data)). Failure body: file_attributes."""

    status: NfsStat3
    file_attributes: Fattr3 | None = None
    eof: bool = False
    data: bytes = b""

    @property
    def count(self) -> int:
        return len(self.data)

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        pack_post_op_attr(p, self.file_attributes)
        if self.status == _OK:
            p.pack_uint(len(self.data))
            p.pack_bool(self.eof)
            p.pack_opaque(self.data)

    @classmethod
    def unpack(cls, u: Unpacker) -> ReadRes:
        status = _unpack_status(u)
        attrs = unpack_post_op_attr(u)
        if status != _OK:
            return cls(status, attrs)
        count = u.unpack_uint()
        eof = u.unpack_bool()
        data = u.unpack_opaque(MAX_READ)
        if count != len(data):
            raise XdrError(f"READ reply count {count} differs from its {len(data)} data bytes")
        return cls(status, attrs, eof, data)


# --- 7 WRITE --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteArgs:
    """The bytes to write are `data`; count = len(data).

    On the wire count may be smaller than the opaque data (never larger): the decoder keeps
    only the first `count` bytes, which is what RFC 1813 says is to be written.
    """

    file: NfsFh3
    offset: int
    stable: StableHow
    data: bytes

    @property
    def count(self) -> int:
        return len(self.data)

    def pack(self, p: Packer) -> None:
        self.file.pack(p)
        p.pack_uhyper(self.offset)
        p.pack_uint(len(self.data))
        p.pack_enum(self.stable)
        p.pack_opaque(self.data)

    @classmethod
    def unpack(cls, u: Unpacker) -> WriteArgs:
        fh = NfsFh3.unpack(u)
        offset = u.unpack_uhyper()
        count = u.unpack_uint()
        stable = unpack_enum(u, StableHow)
        data = u.unpack_opaque()
        if count > len(data):
            raise XdrError(f"WRITE count {count} exceeds its {len(data)} data bytes")
        if count < len(data):
            data = data[:count]
        return cls(fh, offset, stable, data)


@dataclass(frozen=True, slots=True)
class WriteRes(_Result):
    """OK: file_wcc, count, committed, verf. Failure body: file_wcc."""

    status: NfsStat3
    file_wcc: WccData = WCC_EMPTY
    count: int = 0
    committed: StableHow = StableHow.UNSTABLE
    verf: bytes = _ZERO_VERF

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        self.file_wcc.pack(p)
        if self.status == _OK:
            p.pack_uint(self.count)
            p.pack_enum(self.committed)
            p.pack_fopaque(NFS3_WRITEVERFSIZE, self.verf)

    @classmethod
    def unpack(cls, u: Unpacker) -> WriteRes:
        status = _unpack_status(u)
        wcc = WccData.unpack(u)
        if status != _OK:
            return cls(status, wcc)
        count = u.unpack_uint()
        committed = unpack_enum(u, StableHow)
        return cls(status, wcc, count, committed, u.unpack_fopaque(NFS3_WRITEVERFSIZE))


# --- 8 CREATE -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateArgs:
    """createhow3 flattened: UNCHECKED/GUARDED carry `obj_attributes`, EXCLUSIVE `verf`."""

    where: DirOpArgs3
    mode: CreateMode
    obj_attributes: Sattr3 | None = None
    verf: bytes | None = None

    def pack(self, p: Packer) -> None:
        self.where.pack(p)
        p.pack_enum(self.mode)
        if self.mode == CreateMode.EXCLUSIVE:
            p.pack_fopaque(NFS3_CREATEVERFSIZE, _need(self.verf, "verf"))
        else:
            (self.obj_attributes or SATTR_EMPTY).pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> CreateArgs:
        where = DirOpArgs3.unpack(u)
        mode = unpack_enum(u, CreateMode)
        if mode == CreateMode.EXCLUSIVE:
            return cls(where, mode, verf=u.unpack_fopaque(NFS3_CREATEVERFSIZE))
        return cls(where, mode, obj_attributes=Sattr3.unpack(u))


@dataclass(frozen=True, slots=True)
class CreateRes(_Result):
    """OK: obj (post_op_fh3), obj_attributes, dir_wcc. Failure body: dir_wcc.

    MKDIR, SYMLINK and MKNOD return the same shape (subclasses below).
    """

    status: NfsStat3
    obj: NfsFh3 | None = None
    obj_attributes: Fattr3 | None = None
    dir_wcc: WccData = WCC_EMPTY

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        if self.status == _OK:
            pack_post_op_fh3(p, self.obj)
            pack_post_op_attr(p, self.obj_attributes)
        self.dir_wcc.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> Self:
        status = _unpack_status(u)
        if status == _OK:
            fh = unpack_post_op_fh3(u)
            attrs = unpack_post_op_attr(u)
            return cls(status, fh, attrs, WccData.unpack(u))
        return cls(status, dir_wcc=WccData.unpack(u))


# --- 9 MKDIR --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MkdirArgs:
    where: DirOpArgs3
    attributes: Sattr3 = SATTR_EMPTY

    def pack(self, p: Packer) -> None:
        self.where.pack(p)
        self.attributes.pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> MkdirArgs:
        return cls(DirOpArgs3.unpack(u), Sattr3.unpack(u))


@dataclass(frozen=True, slots=True)
class MkdirRes(CreateRes):
    """Same shape as CreateRes."""


# --- 10 SYMLINK -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SymlinkArgs:
    """symlinkdata3 flattened into symlink_attributes and symlink_data (the target)."""

    where: DirOpArgs3
    symlink_attributes: Sattr3
    symlink_data: bytes

    def pack(self, p: Packer) -> None:
        self.where.pack(p)
        self.symlink_attributes.pack(p)
        p.pack_string(self.symlink_data)

    @classmethod
    def unpack(cls, u: Unpacker) -> SymlinkArgs:
        return cls(DirOpArgs3.unpack(u), Sattr3.unpack(u), _unpack_path(u))


@dataclass(frozen=True, slots=True)
class SymlinkRes(CreateRes):
    """Same shape as CreateRes."""


# --- 11 MKNOD -------------------------------------------------------------------------------

_MKNOD_DEVICE = (FileType.CHR, FileType.BLK)
_MKNOD_SPECIAL = (FileType.SOCK, FileType.FIFO)


@dataclass(frozen=True, slots=True)
class MknodArgs:
    """mknoddata3 flattened: CHR/BLK carry attributes and spec; SOCK/FIFO attributes only;
    REG/DIR/LNK carry nothing (the server answers NFS3ERR_BADTYPE)."""

    where: DirOpArgs3
    type: FileType
    attributes: Sattr3 | None = None
    spec: SpecData3 | None = None

    def pack(self, p: Packer) -> None:
        self.where.pack(p)
        p.pack_enum(self.type)
        if self.type in _MKNOD_DEVICE:
            (self.attributes or SATTR_EMPTY).pack(p)
            (self.spec or SpecData3()).pack(p)
        elif self.type in _MKNOD_SPECIAL:
            (self.attributes or SATTR_EMPTY).pack(p)

    @classmethod
    def unpack(cls, u: Unpacker) -> MknodArgs:
        where = DirOpArgs3.unpack(u)
        ftype = unpack_enum(u, FileType)
        if ftype in _MKNOD_DEVICE:
            return cls(where, ftype, Sattr3.unpack(u), SpecData3.unpack(u))
        if ftype in _MKNOD_SPECIAL:
            return cls(where, ftype, Sattr3.unpack(u))
        return cls(where, ftype)


@dataclass(frozen=True, slots=True)
class MknodRes(CreateRes):
    """Same shape as CreateRes."""


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


# --- MOUNT v3 -------------------------------------------------------------------------------


def _unpack_dirpath(u: Unpacker) -> bytes:
    return u.unpack_string(MNTPATHLEN)


def _unpack_mntname(u: Unpacker) -> bytes:
    return u.unpack_string(MNTNAMLEN)


@dataclass(frozen=True, slots=True)
class DirPath:
    """dirpath: MNT's and UMNT's argument."""

    path: bytes

    def pack(self, p: Packer) -> None:
        p.pack_string(self.path)

    @classmethod
    def unpack(cls, u: Unpacker) -> DirPath:
        return cls(_unpack_dirpath(u))


@dataclass(frozen=True, slots=True)
class MountRes:
    """mountres3. OK: fhandle, auth_flavors. Failure body: void."""

    status: MountStat3
    fhandle: NfsFh3 | None = None
    auth_flavors: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == MountStat3.MNT3_OK

    def pack(self, p: Packer) -> None:
        p.pack_enum(self.status)
        if self.status == MountStat3.MNT3_OK:
            _need(self.fhandle, "fhandle").pack(p)
            p.pack_uint(len(self.auth_flavors))
            for flavor in self.auth_flavors:
                p.pack_int(flavor)

    @classmethod
    def unpack(cls, u: Unpacker) -> MountRes:
        status = unpack_enum(u, MountStat3)
        if status != MountStat3.MNT3_OK:
            return cls(status)
        fh = NfsFh3.unpack(u)
        n = u.unpack_array_length(MAX_AUTH_FLAVORS)
        return cls(status, fh, tuple(u.unpack_int() for _ in range(n)))


@dataclass(frozen=True, slots=True)
class MountBody:
    """One mountlist entry (DUMP): which host has mounted which directory."""

    hostname: bytes
    directory: bytes


@dataclass(frozen=True, slots=True)
class MountList:
    """mountlist, DUMP's result."""

    entries: tuple[MountBody, ...] = ()

    def pack(self, p: Packer) -> None:
        for entry in self.entries:
            p.pack_bool(True)
            p.pack_string(entry.hostname)
            p.pack_string(entry.directory)
        p.pack_bool(False)

    @classmethod
    def unpack(cls, u: Unpacker) -> MountList:
        entries = []
        while u.unpack_bool():
            entries.append(MountBody(_unpack_mntname(u), _unpack_dirpath(u)))
        return cls(tuple(entries))


@dataclass(frozen=True, slots=True)
class ExportNode:
    """One exports entry: a directory and the groups (host names) allowed to mount it."""

    dir: bytes
    groups: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Exports:
    """exports, EXPORT's result."""

    entries: tuple[ExportNode, ...] = ()

    def pack(self, p: Packer) -> None:
        for node in self.entries:
            p.pack_bool(True)
            p.pack_string(node.dir)
            for group in node.groups:
                p.pack_bool(True)
                p.pack_string(group)
            p.pack_bool(False)
        p.pack_bool(False)

    @classmethod
    def unpack(cls, u: Unpacker) -> Exports:
        nodes = []
        while u.unpack_bool():
            path = _unpack_dirpath(u)
            groups = []
            while u.unpack_bool():
                groups.append(_unpack_mntname(u))
            nodes.append(ExportNode(path, tuple(groups)))
        return cls(tuple(nodes))


# --- procedure tables -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcCodec:
    """One row of a procedure table: the argument and result types of a procedure."""

    args: type[Any]  # a Wire type; Any so callers may construct it, e.g. res(status)
    res: type[Any]


NFS3_PROCS: dict[Nfs3Proc, ProcCodec] = {
    Nfs3Proc.NULL: ProcCodec(Void, Void),
    Nfs3Proc.GETATTR: ProcCodec(GetattrArgs, GetattrRes),
    Nfs3Proc.SETATTR: ProcCodec(SetattrArgs, SetattrRes),
    Nfs3Proc.LOOKUP: ProcCodec(LookupArgs, LookupRes),
    Nfs3Proc.ACCESS: ProcCodec(AccessArgs, AccessRes),
    Nfs3Proc.READLINK: ProcCodec(ReadlinkArgs, ReadlinkRes),
    Nfs3Proc.READ: ProcCodec(ReadArgs, ReadRes),
    Nfs3Proc.WRITE: ProcCodec(WriteArgs, WriteRes),
    Nfs3Proc.CREATE: ProcCodec(CreateArgs, CreateRes),
    Nfs3Proc.MKDIR: ProcCodec(MkdirArgs, MkdirRes),
    Nfs3Proc.SYMLINK: ProcCodec(SymlinkArgs, SymlinkRes),
    Nfs3Proc.MKNOD: ProcCodec(MknodArgs, MknodRes),
    Nfs3Proc.REMOVE: ProcCodec(RemoveArgs, RemoveRes),
    Nfs3Proc.RMDIR: ProcCodec(RmdirArgs, RmdirRes),
    Nfs3Proc.RENAME: ProcCodec(RenameArgs, RenameRes),
    Nfs3Proc.LINK: ProcCodec(LinkArgs, LinkRes),
    Nfs3Proc.READDIR: ProcCodec(ReaddirArgs, ReaddirRes),
    Nfs3Proc.READDIRPLUS: ProcCodec(ReaddirplusArgs, ReaddirplusRes),
    Nfs3Proc.FSSTAT: ProcCodec(FsstatArgs, FsstatRes),
    Nfs3Proc.FSINFO: ProcCodec(FsinfoArgs, FsinfoRes),
    Nfs3Proc.PATHCONF: ProcCodec(PathconfArgs, PathconfRes),
    Nfs3Proc.COMMIT: ProcCodec(CommitArgs, CommitRes),
}

MOUNT3_PROCS: dict[Mount3Proc, ProcCodec] = {
    Mount3Proc.NULL: ProcCodec(Void, Void),
    Mount3Proc.MNT: ProcCodec(DirPath, MountRes),
    Mount3Proc.DUMP: ProcCodec(Void, MountList),
    Mount3Proc.UMNT: ProcCodec(DirPath, Void),
    Mount3Proc.UMNTALL: ProcCodec(Void, Void),
    Mount3Proc.EXPORT: ProcCodec(Void, Exports),
}


def _row(table: dict[Any, ProcCodec], proc: int) -> ProcCodec:
    try:
        return table[proc]
    except KeyError:
        raise ValueError(f"no such procedure {proc}; check the table first") from None


def _decode(cls: type[Any], data: bytes | memoryview) -> Any:
    u = Unpacker(data)
    value = cls.unpack(u)
    u.done()
    return value


def _encode(cls: type[Any], value: Any) -> bytes:
    if type(value) is not cls:
        raise TypeError(f"expected {cls.__name__}, got {type(value).__name__}")
    p = Packer()
    value.pack(p)
    return p.get_buffer()


def decode_args(proc: int, data: bytes | memoryview) -> Any:
    """Server side: decode NFSv3 arguments. Raises XdrError (-> GARBAGE_ARGS) on bad input;
    ValueError if `proc` is not in NFS3_PROCS (answer PROC_UNAVAIL before calling)."""
    return _decode(_row(NFS3_PROCS, proc).args, data)


def encode_result(proc: int, result: Any) -> bytes:
    """Server side: encode an NFSv3 result of exactly the procedure's result type."""
    return _encode(_row(NFS3_PROCS, proc).res, result)


def encode_args(proc: int, args: Any) -> bytes:
    """Client side: encode NFSv3 arguments."""
    return _encode(_row(NFS3_PROCS, proc).args, args)


def decode_result(proc: int, data: bytes | memoryview) -> Any:
    """Client side: decode an NFSv3 result; raises XdrError on a malformed reply."""
    return _decode(_row(NFS3_PROCS, proc).res, data)


def error_result(proc: int, status: NfsStat3, **body: Any) -> Any:
    """A failure result for `proc`, e.g. error_result(LOOKUP, NOENT, dir_attributes=a)."""
    if status == _OK:
        raise ValueError("error_result needs a failure status")
    return _row(NFS3_PROCS, proc).res(status, **body)


def decode_mount_args(proc: int, data: bytes | memoryview) -> Any:
    return _decode(_row(MOUNT3_PROCS, proc).args, data)


def encode_mount_result(proc: int, result: Any) -> bytes:
    return _encode(_row(MOUNT3_PROCS, proc).res, result)


def encode_mount_args(proc: int, args: Any) -> bytes:
    return _encode(_row(MOUNT3_PROCS, proc).args, args)


def decode_mount_result(proc: int, data: bytes | memoryview) -> Any:
    return _decode(_row(MOUNT3_PROCS, proc).res, data)
