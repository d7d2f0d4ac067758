"""Conversions between NFSv3 wire types and the store's types: the service's side of the seam.

Theory of operation: `prism.nfs.wire` knows nothing of the store and the store nothing of the
wire; the NFS service converts here, in one place. The store's `FileType` has ftype3's values,
so `Ftype3` and `FileType` convert by value. Times cross as nanoseconds since the epoch.
"""

from __future__ import annotations

from typing import cast

from prism.errors import InvalidArgument
from prism.nfs import wire as T
from prism.nfs.const import Ftype3, TimeHow
from prism.store.types import NOW, Attr, FileType, SetAttr


def fattr3(attr: Attr) -> T.Fattr3:
    """The server's fattr3 of `attr`, pre-encoded (`PackedFattr3` encodes exactly like
    `Fattr3` at a tenth of the cost); its fsid is the object's namespace, the exported
    filesystem a handle names."""
    return cast(
        T.Fattr3,
        T.PackedFattr3(
            attr.type,
            attr.mode,
            attr.nlink,
            attr.uid,
            attr.gid,
            attr.size,
            attr.used,
            attr.rdev[0],
            attr.rdev[1],
            attr.oid.ns,
            attr.fileid,
            attr.atime_ns,
            attr.mtime_ns,
            attr.ctime_ns,
        ),
    )


def packed_fattr3(attr: Attr) -> T.PackedFattr3:
    """`fattr3`, typed as what it is (for `EncodedEntry.entryplus3`)."""
    return cast(T.PackedFattr3, fattr3(attr))


def fattr3_of(attr: Attr, fsid: int) -> T.Fattr3:
    """`attr` as a decoded fattr3 (the generic form; the server sends `fattr3`)."""
    return T.Fattr3(
        Ftype3(attr.type),
        attr.mode & 0o7777,
        attr.nlink,
        attr.uid,
        attr.gid,
        attr.size,
        attr.used,
        T.SpecData3(attr.rdev[0], attr.rdev[1]),
        fsid,
        attr.fileid,
        T.NfsTime3.from_ns(attr.atime_ns),
        T.NfsTime3.from_ns(attr.mtime_ns),
        T.NfsTime3.from_ns(attr.ctime_ns),
    )


def wcc_attr(attr: Attr) -> T.WccAttr:
    """wcc_data's pre-operation attributes of `attr`."""
    return T.WccAttr(
        attr.size, T.NfsTime3.from_ns(attr.mtime_ns), T.NfsTime3.from_ns(attr.ctime_ns)
    )


def file_type(ftype: int) -> FileType:
    """The store's kind of an ftype3 (the values are the same)."""
    return FileType(ftype)


def setattr_of(sattr: T.Sattr3) -> SetAttr:
    """The store's SetAttr for a client's sattr3: client times in ns, SET_TO_SERVER_TIME as
    `NOW`. An nfstime3 counts nanoseconds within its second, so nseconds >= 10^9 is
    InvalidArgument (NFS3ERR_INVAL), as in knfsd."""
    return SetAttr(
        mode=None if sattr.mode is None else sattr.mode & 0o7777,
        uid=sattr.uid,
        gid=sattr.gid,
        size=sattr.size,
        atime_ns=_set_time_ns(sattr.atime),
        mtime_ns=_set_time_ns(sattr.mtime),
    )


def _set_time_ns(value: T.SetTime) -> int | None:
    if isinstance(value, T.NfsTime3):
        if value.nseconds >= 1_000_000_000:
            raise InvalidArgument(f"nfstime3 with {value.nseconds} nseconds (must be < 10^9)")
        return value.to_ns()
    return NOW if value == TimeHow.SET_TO_SERVER_TIME else None
