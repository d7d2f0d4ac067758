"""Value types shared by the store and the protocol layers above it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

from prism.limits import NAME_MAX as NAME_MAX
from prism.limits import NLINK_MAX as NLINK_MAX
from prism.limits import SYMLINK_MAX as SYMLINK_MAX

CHUNK_SIZE = 128 * 1024
"""Files are cut into fixed, offset-aligned chunks of this size (see `prism.store` docs)."""

MAX_FILE_SIZE = 1 << 50
VOL_BITS = 16
INO_BITS = 44
ROOT_INO = 1


class FileType(IntEnum):
    """Object kinds; the values are NFSv3's ftype3 so they cross the wire unchanged."""

    REG = 1
    DIR = 2
    BLK = 3
    CHR = 4
    LNK = 5
    SOCK = 6
    FIFO = 7


@dataclass(frozen=True, slots=True, order=True)
class ObjectId:
    """The lasting identity of an object: namespace, volume within it, inode number.

    It survives restarts, renames and clones of its namespace, and names the namespace, so an
    identity taken from one VM never resolves inside another. Volume 0 is the namespace's own
    lineage; other volumes hold subtrees composed in from other namespaces.
    """

    ns: int
    vol: int
    ino: int

    @property
    def fileid(self) -> int:
        """NFS fileid: unique and non-zero within the namespace."""
        return (self.vol << INO_BITS) | self.ino


@dataclass(frozen=True, slots=True)
class Cred:
    """Who is asking: AUTH_SYS uid, gid and supplementary groups. uid 0 is root."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


ROOT = Cred()

# Access bits as NFSv3 ACCESS uses them.
ACCESS_READ = 0x01
ACCESS_LOOKUP = 0x02
ACCESS_MODIFY = 0x04
ACCESS_EXTEND = 0x08
ACCESS_DELETE = 0x10
ACCESS_EXECUTE = 0x20


class Attr(NamedTuple):
    """Attributes of one object, times in nanoseconds since the epoch. (A NamedTuple:
    immutable like the frozen dataclasses here, and ten times cheaper to make than one of
    twelve fields; nearly every call makes one or two.)"""

    oid: ObjectId
    type: FileType
    mode: int  # permission bits only (0o7777)
    nlink: int
    uid: int
    gid: int
    size: int
    used: int  # bytes of storage charged to the object
    rdev: tuple[int, int]  # (major, minor) for devices
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @property
    def fileid(self) -> int:
        return self.oid.fileid


NOW = -1
"""Sentinel for SetAttr times: use the server's clock."""


@dataclass(frozen=True, slots=True)
class SetAttr:
    """Attributes to change; None leaves a field as it is. Times: ns since epoch, or NOW."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry as READDIR returns it. `cookie` resumes right after this entry."""

    name: bytes
    oid: ObjectId
    type: FileType
    cookie: int


@dataclass(frozen=True, slots=True)
class FsStat:
    total_bytes: int
    free_bytes: int
    avail_bytes: int
    total_files: int
    free_files: int


NOBODY = 65534
"""The anonymous uid/gid that squashed callers become unless a VM names others."""
SQUASH_MODES = ("none", "root", "all")


@dataclass(frozen=True, slots=True)
class Export:
    """How a VM (and its snapshots) may be reached: client CIDRs (empty means loopback),
    privileged source ports only (`secure`), and which AUTH_SYS callers become the
    anonymous anon_uid/anon_gid (`squash`: none, root (uid/gid 0), all). Over VRPC
    (`vrpc.server`) the VM's own id `vm` is what a channel is bound to, and the local users,
    groups and token in `vrpc_*` say who may attach (`prism.access.vrpc_allows`).
    `read_only`: every call that would change the VM is answered NFS3ERR_ROFS (knfsd's
    `ro`); the store itself stays writable (import, shares into other VMs)."""

    clients: tuple[str, ...] = ()
    secure: bool = False
    squash: str = "none"
    anon_uid: int = NOBODY
    anon_gid: int = NOBODY
    vm: int = 0
    vrpc_users: tuple[int, ...] = ()
    vrpc_groups: tuple[int, ...] = ()
    vrpc_token: str = field(default="", repr=False)
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    """A VM filesystem or a snapshot of one (kind 'snapshot', name 'vm@snap')."""

    id: int
    name: str
    kind: str  # "vm" or "snapshot"
    root: ObjectId
    readonly: bool
    clients: tuple[str, ...] = ()
    quota: int | None = None
    created_ns: int = 0
    shares: tuple[ShareInfo, ...] = field(default=())
    export: Export = Export()


@dataclass(frozen=True, slots=True)
class ShareInfo:
    """A live view of `source_ns:source_path` mounted at `path` inside a namespace."""

    path: str
    source_ns: str
    source_path: str
    rw: bool


@dataclass(frozen=True, slots=True)
class Usage:
    logical_bytes: int
    files: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    logical_bytes: int  # sum over VMs (snapshots excluded)
    stored_bytes: int  # distinct chunk bytes on disk that are referenced
    chunk_count: int
    segment_bytes: int  # bytes appended to segment files, garbage included
    referenced_bytes: int = 0
    """Chunk bytes times their references: the content as written, each chunk-map record
    once (a layer that clones or snapshots share holds its records once)."""
    disk_bytes: int = 0
    """The data directory's files, metadata included (apparent sizes, as `du -sb`)."""

    @property
    def dedup_ratio(self) -> float:
        """Logical / stored: dedup, sharing by clones and holes together."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def dedup_bytes(self) -> int:
        """Bytes not stored because identical content was written independently."""
        return self.referenced_bytes - self.stored_bytes

    @property
    def content_dedup_ratio(self) -> float:
        """Referenced / stored: dedup of identical content alone."""
        return self.referenced_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def clone_shared_bytes(self) -> int:
        """Logical bytes beyond the content's references: what VMs see through layers
        they share with clones (holes count here too, since they hold no chunk); negative
        when snapshots, or removed VMs awaiting gc, hold content no VM sees."""
        return self.logical_bytes - self.referenced_bytes


@dataclass(frozen=True, slots=True)
class CloneSource:
    """One source of a composition: `ns[@snap][:path][=dest]`."""

    ns: str
    snapshot: str | None = None
    path: str = "/"
    dest: str | None = None  # defaults to `path`

    @property
    def target(self) -> str:
        return self.dest if self.dest is not None else self.path
