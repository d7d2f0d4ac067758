"""Encodings prepared in one pass: the server's fast paths for fattr3 and directory entries.

Theory of operation: building an `Fattr3` (and three `NfsTime3`) per object dominates GETATTR
and READDIRPLUS, so the server packs the 84 bytes of a fattr3 with one struct call from plain
integers (`PackedFattr3`) and encodes each entry3 / entryplus3 once (`EncodedEntry`), even
straight from an inode record's attribute fields. Each encodes byte for byte like its generic
type in `base` / `procs_12_21`; clients decode replies into the generic types as usual.
"""

from __future__ import annotations

import struct

from prism.nfs.wire.base import _FATTR3, _U32_MAX
from rpc.xdr import Packer


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
    """A fattr3 already encoded from its fields (times in ns since the epoch; seconds are
    taken modulo 2^32). It only encodes: servers never decode their own attributes."""

    __slots__ = ("raw",)

    def __init__(
        self,
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
    ) -> None:
        self.raw = _FATTR3.pack(
            *_fattr3_fields(
                kind,
                mode,
                nlink,
                uid,
                gid,
                size,
                used,
                major,
                minor,
                fsid,
                fileid,
                atime_ns,
                mtime_ns,
                ctime_ns,
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
