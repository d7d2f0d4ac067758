"""NFSv3 procedures 0-11 (RFC 1813 sections 3.3.0-3.3.11), in RFC order: NULL, GETATTR,
SETATTR, LOOKUP, ACCESS, READLINK, READ, WRITE, CREATE, MKDIR, SYMLINK, MKNOD.

Each procedure has an argument type `XxxArgs` and one result type `XxxRes` whose first field
is `status`; the resfail arm's fields (post_op_attr / wcc_data) are always encoded, the resok
fields only on NFS3_OK. `XxxRes.failed` builds the failure result from what the call gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from prism.nfs.const import (
    MAX_READ,
    NFS3_CREATEVERFSIZE,
    NFS3_WRITEVERFSIZE,
    CreateMode,
    Ftype3,
    NfsStat3,
    StableHow,
)
from prism.nfs.wire.base import (
    _OK,
    _ZERO_VERF,
    SATTR_EMPTY,
    WCC_EMPTY,
    DirOpArgs3,
    Fattr3,
    Gathered,
    NfsFh3,
    NfsTime3,
    Sattr3,
    SpecData3,
    WccData,
    _need,
    _Result,
    _unpack_path,
    _unpack_status,
    pack_post_op_attr,
    pack_post_op_fh3,
    unpack_enum,
    unpack_post_op_attr,
    unpack_post_op_fh3,
)
from rpc.xdr import Packer, Unpacker, XdrError

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

    @classmethod
    def failed(cls, status: NfsStat3, args: SetattrArgs, gathered: Gathered) -> Self:
        """Failure body: wcc_data of the object."""
        return cls(status, gathered.wcc(args.object))

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

    @classmethod
    def failed(cls, status: NfsStat3, args: LookupArgs, gathered: Gathered) -> Self:
        """Failure body: the directory's post_op_attr."""
        return cls(status, dir_attributes=gathered.post(args.what.dir))

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

    @classmethod
    def failed(cls, status: NfsStat3, args: AccessArgs, gathered: Gathered) -> Self:
        """Failure body: the object's post_op_attr."""
        return cls(status, gathered.post(args.object))

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

    @classmethod
    def failed(cls, status: NfsStat3, args: ReadlinkArgs, gathered: Gathered) -> Self:
        """Failure body: the link's post_op_attr."""
        return cls(status, gathered.post(args.symlink))

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

    @classmethod
    def failed(cls, status: NfsStat3, args: ReadArgs, gathered: Gathered) -> Self:
        """Failure body: the file's post_op_attr."""
        return cls(status, gathered.post(args.file))

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

    @classmethod
    def failed(cls, status: NfsStat3, args: WriteArgs, gathered: Gathered) -> Self:
        """Failure body: the file's wcc_data."""
        return cls(status, gathered.wcc(args.file))

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

    @classmethod
    def failed(cls, status: NfsStat3, args: Any, gathered: Gathered) -> Self:
        """Failure body: the directory's wcc_data (CREATE, MKDIR, SYMLINK, MKNOD)."""
        return cls(status, dir_wcc=gathered.wcc(args.where.dir))

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

_MKNOD_DEVICE = (Ftype3.CHR, Ftype3.BLK)
_MKNOD_SPECIAL = (Ftype3.SOCK, Ftype3.FIFO)


@dataclass(frozen=True, slots=True)
class MknodArgs:
    """mknoddata3 flattened: CHR/BLK carry attributes and spec; SOCK/FIFO attributes only;
    REG/DIR/LNK carry nothing (the server answers NFS3ERR_BADTYPE)."""

    where: DirOpArgs3
    type: Ftype3
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
        ftype = unpack_enum(u, Ftype3)
        if ftype in _MKNOD_DEVICE:
            return cls(where, ftype, Sattr3.unpack(u), SpecData3.unpack(u))
        if ftype in _MKNOD_SPECIAL:
            return cls(where, ftype, Sattr3.unpack(u))
        return cls(where, ftype)


@dataclass(frozen=True, slots=True)
class MknodRes(CreateRes):
    """Same shape as CreateRes."""
