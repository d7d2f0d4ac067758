"""The store's contract: `FileStore`, what `prism.nfs`, `prism.nlm`, the CLI, the importer and
future transports may call, and the results it answers with.

Types are in `prism.store.types`; errors are `prism.errors.StoreError` subclasses, each
with an errno that `prism.nfs.status.nfsstat_for` maps; names are `bytes` (NFS names are
opaque), operators' paths `str`. `cred=None` means the store's own caller: no permission
checks.

One operation, one transaction. Each operation resolves its handles and does all its work
in one transaction, and returns what its caller's reply needs from that same transaction:
an object's attributes before and after a change (`Wcc`), a new object with its directory
around the change (`Made`), both directories of a rename (`Renamed`). A failing operation
changes nothing and raises; the attributes it had read travel on the error
(`StoreError.attrs`, by the caller's ObjectId), as both before and after.

Threading and durability. A store object is not thread-safe: one thread owns it (the
server's `StoreExecutor`). Several processes may open one data directory (the server and
operator commands). Outside a batch every change is durable when it returns. Inside one
(`begin_batch`) each change runs in a nested transaction, reads see the batch, and nothing
is durable until `make_durable` (a journal append) or `commit`; `abort` drops the batch.

Errors each operation may raise, besides `Stale` (the handle's object or namespace is gone),
`Corrupt` (damage on disk: EIO) and `NoSpace`:
  lookup_in     NotADirectory, PermissionDenied, NotFound, InvalidName, NameTooLong
  read_attr     IsADirectory, InvalidArgument, PermissionDenied
  setattr_wcc   ReadOnly, NotPermitted, PermissionDenied, NotSync (ctime guard),
                IsADirectory, InvalidArgument, FileTooLarge, QuotaExceeded
  write_wcc     ReadOnly, IsADirectory, InvalidArgument, PermissionDenied, FileTooLarge,
                QuotaExceeded
  create_wcc, mkdir_wcc, symlink_wcc, mknod_wcc
                ReadOnly, NotADirectory, PermissionDenied, Exists, IsADirectory (create
                over a directory), InvalidName, NameTooLong, NotPermitted (devices need
                root), InvalidArgument, QuotaExceeded
  remove_wcc, rmdir_wcc
                ReadOnly, NotADirectory, PermissionDenied, NotFound, IsADirectory,
                NotEmpty, NotPermitted (a share's mount point), InvalidArgument
  rename_wcc    as remove, plus CrossDevice (across namespaces or shares), Exists
  link_wcc      ReadOnly, CrossDevice, IsADirectory, TooManyLinks, Exists, PermissionDenied
  namespace, export_of, namespace_by_id: NotFound / Stale
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from prism.errors import StoreError
from prism.store import records as R
from prism.store.types import (
    Attr,
    CloneSource,
    Cred,
    DirEntry,
    Export,
    FileType,
    FsStat,
    NamespaceInfo,
    ObjectId,
    SetAttr,
    StoreStats,
    Usage,
)

# The answers of the per-call operations are NamedTuples: immutable like the frozen
# dataclasses below, at a third of their cost to build (every NFS call builds one).


class Wcc(NamedTuple):
    """An object's attributes around a change, read in the change's transaction (NFS
    wcc_data). `before` is None when the change made the object."""

    before: Attr | None
    after: Attr


class Made(NamedTuple):
    """A name made (create, mkdir, symlink, mknod, link): the object it names, and its
    directory around the change."""

    attr: Attr
    dir: Wcc


class Renamed(NamedTuple):
    """Both directories of a rename around it (one directory: the same twice)."""

    src: Wcc
    dst: Wcc


class Found(NamedTuple):
    """A name looked up, and its directory's attributes."""

    attr: Attr
    dir: Attr


class Access(NamedTuple):
    """The ACCESS bits granted, and the object's attributes."""

    granted: int
    attr: Attr


class Target(NamedTuple):
    """A symbolic link's target, and the link's attributes."""

    target: bytes
    attr: Attr


class Read(NamedTuple):
    """Bytes read, whether they end at the end of the file, and the file's attributes."""

    data: bytes
    eof: bool
    attr: Attr


class Space(NamedTuple):
    """A namespace's space and object counts, and the attributes of the object asked
    through (None if it is gone)."""

    stat: FsStat
    attr: Attr | None


@dataclass(frozen=True, slots=True)
class Mountable:
    """A namespace and what a path names in it, from one transaction (MOUNT's MNT): the
    caller checks its access to `info` before it may learn whether the path exists, so a
    path that does not resolve is the error it raised (`missing`), not an exception."""

    info: NamespaceInfo
    attr: Attr | None
    missing: StoreError | None


RawEntry = tuple[int, bytes, int, int, bytes | None]
"""(cookie, name, vol, ino, the inode record or None): what READDIR(PLUS) encodes, no
objects built. The record is opaque but for `record_attrs`; equal records, equal attributes."""
record_attrs: Callable[[bytes], tuple[Any, ...]] = R.INODE_ATTRS.unpack_from
"""A RawEntry record's attributes: (type, mode, nlink, uid, gid, size, rdev major, rdev
minor, atime ns, mtime ns, ctime ns)."""
LAST_COOKIE = R.LAST_COOKIE
"""The largest cookie an entry is ever given: a READDIR cookie above it was never issued."""


@dataclass(frozen=True, slots=True)
class Listing:
    """Directory entries after a cookie, whether they reach the end, and the directory's
    attributes (and, on a listing from the start, its parent's: '..')."""

    entries: list[RawEntry]
    eof: bool
    dir: Attr
    parent: Attr | None


class StoreObserver(Protocol):
    """Told of every change to inode and directory-entry records, as `Store.observer`
    (VRPC's attribute tables, `vrpc.publisher`). Calls come on the writing thread after the
    nested transaction that made the changes committed (a failed operation reports nothing),
    before control returns to the operation's caller; `ns` is the namespace written (an
    object's owner: writes through a share land in its source VM), `vol` its own volume.
    `batch_lost` says that changes reported since the last durable point were undone."""

    def inode_written(self, ns: int, vol: int, ino: int, inode: bytes) -> None:
        """The object's record is now `inode` (`records.Inode` packed)."""

    def inode_dropped(self, ns: int, vol: int, ino: int) -> None: ...

    def dirents_changed(self, ns: int, vol: int, dir_ino: int) -> None:
        """An entry of the directory was added, replaced or removed."""

    def batch_lost(self) -> None: ...


class FileStore(Protocol):
    """What the store's callers may call (`prism.store.Store` satisfies it; `tests/
    store_contract.py` checks that with mypy). Operations not named in the module docstring
    raise NotFound / Stale for a missing namespace or object and InvalidArgument for a bad
    argument, each with a message that tells an operator what to do."""

    observer: StoreObserver | None
    """Who is told of inode and dirent changes made by this process (None: nobody)."""

    @property
    def secret(self) -> bytes:
        """32 random bytes made with the store: the file-handle MAC key."""

    @property
    def boot_id(self) -> int:
        """The write verifier: it changes whenever acknowledged UNSTABLE writes may be lost."""

    @property
    def damaged_reads(self) -> int: ...

    # -- transactions --

    @property
    def in_batch(self) -> bool: ...

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Inside it, the reads of several calls of a read-only operation share one read
        transaction (one snapshot), or see the open batch."""

    def begin_batch(self) -> None: ...

    def try_begin_batch(self) -> bool:
        """`begin_batch` if the write lock is free now; False, at once, if not."""

    def make_durable(self) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...

    # -- namespaces (the CLI; MOUNT resolves exports with `mountable`) --

    def create_namespace(
        self,
        name: str,
        *,
        clients: tuple[str, ...] | list[str] = (),
        quota: int | None = None,
        secure: bool | None = None,
        squash: str | None = None,
        anon_uid: int | None = None,
        anon_gid: int | None = None,
        vrpc_users: Sequence[int] | None = None,
        vrpc_groups: Sequence[int] | None = None,
        read_only: bool | None = None,
    ) -> NamespaceInfo:
        """A new VM. Exists if the name is taken."""

    def namespace(self, name: str) -> NamespaceInfo:
        """A VM ("web") or a snapshot ("web@monday"). NotFound if there is none."""

    def namespace_by_id(self, ns_id: int) -> NamespaceInfo: ...

    def mountable(self, name: str, path: str) -> Mountable:
        """Namespace `name` and the object at `path` in it (MNT). NotFound if there is no
        such namespace; a path that does not resolve is `missing`."""

    def export_of(self, ns_id: int) -> Export:
        """Who may reach a namespace and how (a snapshot as its VM): every call's fast
        path. Stale if the namespace is gone."""

    def list_namespaces(self, kind: str | None = None) -> list[NamespaceInfo]: ...

    def set_namespace(
        self,
        name: str,
        *,
        clients: tuple[str, ...] | list[str] | None = None,
        quota: Any = ...,
        secure: bool | None = None,
        squash: str | None = None,
        anon_uid: int | None = None,
        anon_gid: int | None = None,
        vrpc_users: Sequence[int] | None = None,
        vrpc_groups: Sequence[int] | None = None,
        read_only: bool | None = None,
        add_clients: Sequence[str] = (),
        remove_clients: Sequence[str] = (),
    ) -> NamespaceInfo:
        """Change the options given (quota=None removes the quota; vrpc_users=[] clears;
        `clients` replaces the list, then `add_clients` and `remove_clients` apply)."""

    def rename_namespace(self, old: str, new: str) -> NamespaceInfo:
        """Rename a VM and its snapshots; its handles, shares, token and quota follow.
        Exists if `new` is taken, InvalidArgument if it is not a valid name."""

    def vrpc_token(self, name: str, *, rotate: bool = False) -> str:
        """VM `name`'s VRPC attach token, made at first use; `rotate` replaces it."""

    def remove_namespace(self, name: str, *, force: bool = False) -> None:
        """Remove a VM with its snapshots, or one snapshot. Busy while another VM shares
        from it, unless `force`."""

    def snapshot(self, name: str, snap: str) -> NamespaceInfo:
        """A read-only view of VM `name`, O(1). Exists if taken."""

    def list_snapshots(self, name: str) -> list[NamespaceInfo]: ...

    def remove_snapshot(self, name: str, snap: str) -> None: ...

    def rollback(self, name: str, snap: str) -> NamespaceInfo: ...

    def clone(
        self,
        new: str,
        sources: list[CloneSource],
        *,
        into: bool = False,
        replace: bool = False,
        clients: tuple[str, ...] | list[str] = (),
        quota: int | None = None,
    ) -> NamespaceInfo:
        """Compose `new` from sources laid over each other. Exists (a destination is taken
        and not `replace`), QuotaExceeded (nothing changed)."""

    def share(
        self, src: str, src_path: str, dst: str, dst_path: str, *, rw: bool = False
    ) -> NamespaceInfo:
        """A live view of `src:src_path` at `dst:dst_path`."""

    def unshare(self, dst: str, dst_path: str) -> NamespaceInfo: ...

    def usage(self, name: str) -> Usage: ...

    def stats(self) -> StoreStats: ...

    def fsstat(self, ns_id: int) -> FsStat: ...

    def fsstat_attr(self, oid: ObjectId) -> Space: ...

    # -- staged imports (the importer) --

    def begin_staging(self, vm: str) -> tuple[ObjectId, str, int]: ...

    def publish_staging(self, token: str, to: str) -> None:
        """Exists if a name the staged tree brings exists at `to` (nothing published)."""

    def discard_staging(self, token: str, *, step: int = 2000) -> None: ...

    def reap_stagings(self) -> int: ...

    # -- objects: what NFS procedures ask, each answered from one transaction --

    def root(self, ns_id: int) -> ObjectId: ...

    def getattr(self, oid: ObjectId) -> Attr: ...

    def identity(self, oid: ObjectId) -> ObjectId:
        """The object a handle names, the same through every share: what locks hold on."""

    def resolve(self, ns_id: int, path: str) -> Attr:
        """An operator's path ("/etc/nginx") in a namespace."""

    def lookup_in(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Found: ...

    def access_attr(self, oid: ObjectId, cred: Cred | None, mask: int) -> Access: ...

    def readlink_attr(self, oid: ObjectId) -> Target: ...

    def read_attr(
        self, oid: ObjectId, offset: int, count: int, cred: Cred | None = None
    ) -> Read: ...

    def setattr_wcc(
        self,
        oid: ObjectId,
        sattr: SetAttr,
        cred: Cred | None = None,
        *,
        guard_ctime_ns: int | None = None,
    ) -> Wcc: ...

    def write_wcc(
        self, oid: ObjectId, offset: int, data: bytes, cred: Cred | None = None
    ) -> Wcc: ...

    def create_wcc(
        self,
        dir: ObjectId,
        name: bytes,
        mode: int = 0o644,
        cred: Cred | None = None,
        *,
        exclusive: bytes | None = None,
        guarded: bool = False,
        sattr: SetAttr | None = None,
    ) -> Made:
        """Unchecked (neither `guarded` nor `exclusive`): an existing regular file is
        answered (truncated if sattr.size is given); `guarded`: Exists; `exclusive` (an
        8-byte verifier): a retry with the same verifier answers the same file."""

    def mkdir_wcc(
        self,
        dir: ObjectId,
        name: bytes,
        mode: int = 0o755,
        cred: Cred | None = None,
        *,
        sattr: SetAttr | None = None,
    ) -> Made: ...

    def symlink_wcc(
        self,
        dir: ObjectId,
        name: bytes,
        target: bytes,
        cred: Cred | None = None,
        *,
        mode: int = 0o777,
        sattr: SetAttr | None = None,
    ) -> Made: ...

    def mknod_wcc(
        self,
        dir: ObjectId,
        name: bytes,
        ftype: FileType,
        mode: int,
        cred: Cred | None = None,
        *,
        rdev: tuple[int, int] = (0, 0),
        sattr: SetAttr | None = None,
    ) -> Made: ...

    def remove_wcc(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Wcc: ...

    def rmdir_wcc(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Wcc: ...

    def rename_wcc(
        self,
        src_dir: ObjectId,
        src_name: bytes,
        dst_dir: ObjectId,
        dst_name: bytes,
        cred: Cred | None = None,
    ) -> Renamed: ...

    def link_wcc(
        self, oid: ObjectId, dir: ObjectId, name: bytes, cred: Cred | None = None
    ) -> Made: ...

    def readdir_raw(
        self,
        dir: ObjectId,
        cookie: int = 0,
        cred: Cred | None = None,
        *,
        limit: int = 1000,
        attrs: bool = True,
        parent: bool = False,
    ) -> Listing:
        """Entries after `cookie` (0: from the start; cookies are stable across changes and
        restarts, and an unknown one resumes at the next entry); '.' and '..' are not
        entries (`parent` asks for '..''s attributes)."""

    # -- shorthands for operators, the importer and tests: the same operations, answering
    # only the object's attributes (or nothing) --

    def lookup(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Attr: ...

    def access(self, oid: ObjectId, cred: Cred | None, mask: int) -> int: ...

    def readlink(self, oid: ObjectId) -> bytes: ...

    def read(
        self, oid: ObjectId, offset: int, count: int, cred: Cred | None = None
    ) -> tuple[bytes, bool]: ...

    def setattr(
        self,
        oid: ObjectId,
        sattr: SetAttr,
        cred: Cred | None = None,
        *,
        guard_ctime_ns: int | None = None,
    ) -> Attr: ...

    def write(self, oid: ObjectId, offset: int, data: bytes, cred: Cred | None = None) -> Attr: ...

    def create(
        self,
        dir: ObjectId,
        name: bytes,
        mode: int = 0o644,
        cred: Cred | None = None,
        *,
        exclusive: bytes | None = None,
        guarded: bool = False,
        sattr: SetAttr | None = None,
    ) -> Attr: ...

    def mkdir(
        self,
        dir: ObjectId,
        name: bytes,
        mode: int = 0o755,
        cred: Cred | None = None,
        *,
        sattr: SetAttr | None = None,
    ) -> Attr: ...

    def symlink(
        self,
        dir: ObjectId,
        name: bytes,
        target: bytes,
        cred: Cred | None = None,
        *,
        mode: int = 0o777,
        sattr: SetAttr | None = None,
    ) -> Attr: ...

    def mknod(
        self,
        dir: ObjectId,
        name: bytes,
        ftype: FileType,
        mode: int,
        cred: Cred | None = None,
        *,
        rdev: tuple[int, int] = (0, 0),
        sattr: SetAttr | None = None,
    ) -> Attr: ...

    def remove(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> None: ...

    def rmdir(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> None: ...

    def rename(
        self,
        src_dir: ObjectId,
        src_name: bytes,
        dst_dir: ObjectId,
        dst_name: bytes,
        cred: Cred | None = None,
    ) -> None: ...

    def link(self, oid: ObjectId, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Attr: ...

    def readdir(
        self, dir: ObjectId, cookie: int = 0, cred: Cred | None = None, *, limit: int = 1000
    ) -> tuple[list[DirEntry], bool]: ...
