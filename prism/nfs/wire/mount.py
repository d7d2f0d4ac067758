"""MOUNT v3 (RFC 1813 appendix I): MNT's path and result, DUMP's mount list, EXPORT's list.

Bounds are the XDR types' own: dirpath <= MNTPATHLEN, name <= MNTNAMLEN, handles
<= NFS3_FHSIZE, at most MAX_AUTH_FLAVORS flavors; anything else is `XdrError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prism.nfs.const import (
    MAX_AUTH_FLAVORS,
    MNTNAMLEN,
    MNTPATHLEN,
    MountStat3,
)
from prism.nfs.wire.base import (
    NfsFh3,
    _need,
    unpack_enum,
)
from rpc.xdr import Packer, Unpacker

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
