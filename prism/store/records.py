"""Binary layouts of the store's LMDB keys and values (see `prism.store.schema` for the map).

All integers are big-endian so that LMDB's byte order is numeric order: a cursor walks a
directory in cookie order and a file's chunk map in offset order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from prism.store.types import FileType

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# inodes:  layer u64 | vol u16 | ino u64
INODE_KEY = struct.Struct(">QHQ")
# dirents: layer u64 | vol u16 | dir ino u64 | cookie u64 | name
DIRENT_PREFIX = struct.Struct(">QHQ")
DIRENT_COOKIE = struct.Struct(">Q")
# cmap:    layer u64 | vol u16 | ino u64 | chunk index u64
CMAP_KEY = struct.Struct(">QHQQ")
# dirent value: vol u16 | ino u64 | type u8 ; empty value = whiteout
DIRENT_VAL = struct.Struct(">HQB")
# cmap value: chunk key (hash 16 + seq u32) | length u32 | segment u64 | offset u64
CMAP_VAL = struct.Struct(">16sIIQQ")
# chunk index key: hash 16 | seq u32 ; value: segment u64 | offset u64 | length u32 | refs u64
CHUNK_KEY = struct.Struct(">16sI")
CHUNK_VAL = struct.Struct(">QQIQ")
# segments: id u64 -> appended bytes u64 | live bytes u64
SEGMENT_VAL = struct.Struct(">QQ")
# usage: ns u32 -> logical bytes u64 | objects u64 | valid u8
USAGE_VAL = struct.Struct(">QQB")
# a recursive-statistics difference pending for a directory (`quota`, in memory and in the
# values of meta b"rstat:" records): ns u32 | vol u16 | dir ino u64 | unknown u8 |
# bytes i64 | objects i64
RSTAT_ENTRY = struct.Struct(">IHQBqq")

WHITEOUT = b""
"""An empty value hides the same key in lower layers (a deleted entry, object or chunk)."""

FIRST_COOKIE = 3
"""Cookies 0 (start), 1 and 2 (for '.' and '..') are never given to stored entries."""
LAST_COOKIE = (0xFFFF_FFFF_FFFF_FFFF >> 2) + FIRST_COOKIE
"""The largest cookie `name_cookie` gives: a READDIR cookie above it was never issued."""


def name_cookie(name: bytes) -> int:
    """The entry's READDIR cookie: derived from the name, so it is stable forever."""
    return (xxhash.xxh3_64_intdigest(name) >> 2) + FIRST_COOKIE


def inode_key(layer: int, vol: int, ino: int) -> bytes:
    return INODE_KEY.pack(layer, vol, ino)


def dirent_prefix(layer: int, vol: int, dir_ino: int) -> bytes:
    return DIRENT_PREFIX.pack(layer, vol, dir_ino)


def dirent_key(layer: int, vol: int, dir_ino: int, name: bytes) -> bytes:
    return DIRENT_PREFIX.pack(layer, vol, dir_ino) + DIRENT_COOKIE.pack(name_cookie(name)) + name


def cmap_prefix(layer: int, vol: int, ino: int) -> bytes:
    return INODE_KEY.pack(layer, vol, ino)


def cmap_key(layer: int, vol: int, ino: int, index: int) -> bytes:
    return CMAP_KEY.pack(layer, vol, ino, index)


def layer_prefix(layer: int) -> bytes:
    return U64.pack(layer)


_INODE = struct.Struct(">BHIIIQIIqqqHQ8s")
INODE_ATTRS = struct.Struct(">BHIIIQIIqqq")
"""The leading fields of an inode record: type, mode, nlink, uid, gid, size, rdev major and
minor, atime/mtime/ctime ns. READDIRPLUS reads these from the raw record, building no Inode."""
FILE_TYPES = (None, *FileType)
"""FileType by value without the cost of an enum call (index 0 is not a type)."""


HOLDER_UNRECORDED = 0
"""`parent_ino` of a non-directory written by a Prism that did not record holders."""
HOLDER_UNKNOWN = (1 << 64) - 1
"""`parent_ino` of a non-directory that lost the link in its recorded holder while keeping
others (the remaining links' directories are not known)."""
HOLDERS_NOT_KNOWN = (HOLDER_UNRECORDED, HOLDER_UNKNOWN)


@dataclass(slots=True)
class Inode:
    """One object's attributes as stored (mutable working copy).

    `parent_vol`/`parent_ino` name the directory holding the object: for a directory its
    '..'; for any other object the directory it was last made, renamed or linked into, or
    HOLDER_UNKNOWN once that link is gone while others remain, or HOLDER_UNRECORDED. Shares
    use it to tell whether an object is still inside the shared subtree."""

    type: FileType
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev_major: int
    rdev_minor: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    parent_vol: int = 0  # the directory holding it (see above)
    parent_ino: int = 0
    verifier: bytes = b"\0" * 8  # exclusive CREATE verifier
    target: bytes = b""  # symlink target; a directory's figures (`quota.RSTAT`), if known

    def pack(self) -> bytes:
        return (
            _INODE.pack(
                int(self.type),
                self.mode,
                self.nlink,
                self.uid,
                self.gid,
                self.size,
                self.rdev_major,
                self.rdev_minor,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.parent_vol,
                self.parent_ino,
                self.verifier,
            )
            + self.target
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Inode:
        kind, mode, nlink, uid, gid, size, major, minor, at, mt, ct, pvol, pino, verifier = (
            _INODE.unpack_from(data)
        )
        ftype = FILE_TYPES[kind] if 0 < kind < len(FILE_TYPES) else FileType(kind)
        return cls(
            ftype,
            mode,
            nlink,
            uid,
            gid,
            size,
            major,
            minor,
            at,
            mt,
            ct,
            pvol,
            pino,
            verifier,
            bytes(data[_INODE.size :]),
        )


_HOLDER = struct.Struct(">HQ")


def holder_of(raw: bytes | memoryview) -> tuple[int, int, int]:
    """(type value, parent_vol, parent_ino) of a packed inode record, unpacking nothing else
    (the parent fields follow the INODE_ATTRS fields)."""
    pvol, pino = _HOLDER.unpack_from(raw, INODE_ATTRS.size)
    return raw[0], pvol, pino


def holder_known(node: Inode) -> bool:
    """Whether `node.parent_*` names a directory (always so for a directory)."""
    return node.parent_ino not in (HOLDER_UNRECORDED, HOLDER_UNKNOWN)
