"""NFSv3's shared XDR structures (RFC 1813 section 2.5-2.6): handles, times, fattr3,
wcc_data, sattr3, diropargs3, and the base of every procedure's result.

Theory of operation: every struct or union is a frozen, slotted dataclass with
`pack(self, p: Packer)` and `unpack(cls, u: Unpacker)`; there is no I/O here and no store
type (the service converts, `prism.nfs.convert`). A result's failure body is built from the
attributes the service gathered for the handles a call named (`Gathered`), so a procedure
states once, in its result type's `failed`, what its failure arm carries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol, Self, TypeVar

from prism.nfs.const import NFS3_FHSIZE, Ftype3, NfsStat3, TimeHow
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
    type: Ftype3
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
            ftype = Ftype3(f[0])
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


def pack_post_op_attr(p: Packer, attrs: Fattr3 | None) -> None:
    if attrs is None:
        p.pack_bool(False)
    else:
        p.pack_bool(True)
        attrs.pack(p)


def unpack_post_op_attr(u: Unpacker) -> Fattr3 | None:
    return Fattr3.unpack(u) if u.unpack_bool() else None


_WCC_ATTR = struct.Struct(">Q4I")


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


SATTR_EMPTY = Sattr3()


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


class Gathered(Protocol):
    """What the service learnt, during one call, about the handles the call named: enough
    to build any procedure's failure body. A handle it never admitted has no attributes."""

    def post(self, fh: NfsFh3) -> Fattr3 | None:
        """post_op_attr: the object's attributes now, or None if unknown."""
        ...

    def wcc(self, fh: NfsFh3) -> WccData:
        """wcc_data: pre-operation attributes if gathered, with the attributes now."""
        ...


class _Result:
    """Mixin for result classes: `ok` is `status == NFS3_OK`; `failed` builds the
    procedure's failure result (its resfail arm) for a status."""

    __slots__ = ()
    status: NfsStat3

    @property
    def ok(self) -> bool:
        return self.status == _OK

    @classmethod
    def failed(cls, status: NfsStat3, args: Any, gathered: Gathered) -> Self:
        """The failure result; this default carries no body (GETATTR's resfail is void)."""
        return cls(status)  # type: ignore[call-arg]


def _unpack_status(u: Unpacker) -> NfsStat3:
    return unpack_enum(u, NfsStat3)


def _need(value: Any, name: str) -> Any:
    if value is None:
        raise ValueError(f"a successful result needs {name}")
    return value
