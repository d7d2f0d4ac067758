"""The Prism store: per-VM namespaces over content-addressed chunks, in LMDB and segments.

`Store` is the facade: it opens and closes a data directory and exposes the operations that
`prism.nfs`, `prism.nlm`, the CLI and the importer call (their contract is `api.FileStore`).
The work is done by the rooms, each a module of free functions over one context
(`schema.Ctx`), each opening with its theory of operation:

    schema    the on-disk layout: LMDB environment, named databases, counters, `Ctx`
    txn       batches, durable points, journal replay, locks, the store epoch and observer
              events: the crash ordering
    layers    namespace records, layer chains, volumes, share routing
    tree      inodes, directory entries, whiteouts, merged listings, share containment
    links     the hard-link index: in which directories a multiply-linked object's links are
    content   chunking, dedup, the chunk map, segment accounting, damage
    quota     usage, quotas, statistics, directories' recursive statistics
    perms     permission rules (pure)
    posix     the per-object operations that change no names
    names     making, linking, moving and removing names
    graft     what a graft reaches of its source (volumes, links), without walking its files
    compose   namespace lifecycle: create, remove, snapshot, rollback, clone, share
    staging   imports built out of sight and published in one transaction
    check/gc  integrity checking and space reclamation, over the rooms' public functions
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prism.errors import NotFound
from prism.limits import READ_CACHE_MB
from prism.store import compose, layers, names, posix, quota, staging, txn
from prism.store.api import (
    Access,
    FileStore,
    Found,
    Listing,
    Made,
    Mountable,
    Read,
    Renamed,
    Space,
    StoreObserver,
    Target,
    Wcc,
)
from prism.store.diskio import PRIVATE_DIR
from prism.store.epoch import EpochFile
from prism.store.layers import UNCHANGED
from prism.store.schema import Ctx, Dbs, make_private, open_env, prepare
from prism.store.segments import SegmentFiles
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
from prism.store.writelock import WriteLock


class Store:
    """Namespaces of POSIX trees over deduplicated chunks (see the rooms named above)."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.path = ctx.path
        self.segments = ctx.segments
        # The first write: `txn.begin_write` replays what a dead journal owner left, so
        # every process opening the store sees its acknowledged changes (the journal's
        # owner resumes its records afterwards, in `txn.resume_journal`).
        with txn.write(ctx) as t:
            self.secret: bytes = prepare(ctx, t)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        journal: bool = False,
        journal_wait: float = 5.0,
        read_cache_bytes: int = READ_CACHE_MB << 20,
    ) -> Store:
        """Open the store at `path`. With `journal`, this process takes the redo journal
        (see `prism.store.journal`): a batch's durable points then cost one small fdatasync
        instead of an LMDB commit. One process at a time may journal (the server); another
        that asks waits up to `journal_wait` seconds, then gets Busy. Without `journal`, the
        changes a dead journal owner left are replayed first. `read_cache_bytes` bounds the
        verified chunks kept in memory (`segments`, "Read cache"; filled only by reads)."""
        root = Path(path)
        meta = root / "meta"
        if not meta.exists():
            if not create:
                raise NotFound(f"no Prism store at {root}: create one with `prism vm create`")
            root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            meta.mkdir(mode=PRIVATE_DIR)
        make_private(root)
        env = open_env(meta)
        owned = txn.lock_journal(meta / "journal", journal_wait) if journal else None
        try:
            ctx = Ctx(
                root,
                env,
                Dbs.open(env),
                SegmentFiles(root / "segments", read_cache_bytes),
                WriteLock(root),
                owned,
            )
            ctx.epoch = EpochFile.open(root)
            ctx.rstat_hooks = quota.RstatHooks(ctx)
            txn.upgrade(ctx)
            store = cls(ctx)
        except BaseException:
            if owned is not None:
                owned.close()
            env.close()
            raise
        if owned is not None:
            try:
                txn.resume_journal(ctx)
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        ctx = self.ctx
        if ctx.batch is not None:
            txn.abort(ctx)
        ctx.segments.close()
        if ctx.journal is not None:
            ctx.journal.close()
            ctx.journal = None
        ctx.write_lock.close()
        if ctx.epoch is not None:
            ctx.epoch.close()
        ctx.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def observer(self) -> StoreObserver | None:
        return cast("StoreObserver | None", self.ctx.observer)

    @observer.setter
    def observer(self, observer: StoreObserver | None) -> None:
        self.ctx.observer = observer
        self.ctx.events.clear()

    @property
    def epoch(self) -> EpochFile | None:
        """DATA/meta/epoch, mapped (`prism.store.epoch`)."""
        return cast("EpochFile | None", self.ctx.epoch)

    @property
    def journal(self) -> Any:
        """The redo journal this process owns (`prism.store.journal.Journal`), or None."""
        return self.ctx.journal

    @property
    def boot_id(self) -> int:
        """The write verifier: it changes whenever acknowledged UNSTABLE writes may be lost."""
        return self.ctx.boot_id

    @property
    def damaged_reads(self) -> int:
        """Reads refused because content failed its hash check (since this process began)."""
        return self.ctx.damaged_reads

    # -- transactions (`txn`) ------------------------------------------------------------

    @property
    def in_batch(self) -> bool:
        return self.ctx.batch is not None

    def reading(self) -> contextlib.AbstractContextManager[None]:
        return txn.reading(self.ctx)

    def begin_batch(self) -> None:
        txn.begin_batch(self.ctx)

    def try_begin_batch(self) -> bool:
        """`begin_batch()` if the write lock is free now; False, at once, while another
        process holds or waits for it (the server retries without blocking its loop)."""
        return txn.try_begin_batch(self.ctx)

    def commit(self) -> None:
        """Commit the open batch to LMDB with fsync (with a journal: a checkpoint)."""
        txn.commit(self.ctx)

    def make_durable(self) -> None:
        """Make every operation of the open batch durable (group commit)."""
        txn.make_durable(self.ctx)

    def abort(self) -> None:
        txn.abort(self.ctx)

    # -- namespaces (`layers`, `compose`, `quota`) ----------------------------------------

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
        """A new VM; access options not given take the new-VM defaults (secure, squash
        none, anonymous 65534:65534, VRPC for root only, read-write)."""
        return compose.create_namespace(
            self.ctx,
            name,
            clients=clients,
            quota=quota,
            secure=secure,
            squash=squash,
            anon_uid=anon_uid,
            anon_gid=anon_gid,
            vrpc_users=vrpc_users,
            vrpc_groups=vrpc_groups,
            read_only=read_only,
        )

    def namespace(self, name: str) -> NamespaceInfo:
        return layers.namespace(self.ctx, name)

    def namespace_by_id(self, ns_id: int) -> NamespaceInfo:
        return layers.namespace_by_id(self.ctx, ns_id)

    def mountable(self, name: str, path: str) -> Mountable:
        return posix.mountable(self.ctx, name, path)

    def export_of(self, ns_id: int) -> Export:
        """How a namespace may be reached (a snapshot as its VM); Stale if gone. The per-call
        fast path of the NFS server's access checks."""
        return layers.export_of(self.ctx, ns_id)

    def list_namespaces(self, kind: str | None = None) -> list[NamespaceInfo]:
        return layers.list_namespaces(self.ctx, kind)

    def set_namespace(
        self,
        name: str,
        *,
        clients: tuple[str, ...] | list[str] | None = None,
        quota: Any = UNCHANGED,
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
        return layers.set_namespace(
            self.ctx,
            name,
            clients=clients,
            quota=quota,
            secure=secure,
            squash=squash,
            anon_uid=anon_uid,
            anon_gid=anon_gid,
            vrpc_users=vrpc_users,
            vrpc_groups=vrpc_groups,
            read_only=read_only,
            add_clients=add_clients,
            remove_clients=remove_clients,
        )

    def rename_namespace(self, old: str, new: str) -> NamespaceInfo:
        return layers.rename_namespace(self.ctx, old, new)

    def vrpc_token(self, name: str, *, rotate: bool = False) -> str:
        """VM `name`'s VRPC attach token, made at first use; `rotate` replaces it, so every
        channel attached with the old one is detached at its next call."""
        return layers.vrpc_token(self.ctx, name, rotate=rotate)

    def remove_namespace(self, name: str, *, force: bool = False) -> None:
        """Remove a namespace (a VM with its snapshots). A VM that others share from is
        refused, naming them, unless `force`, which removes those shares first."""
        compose.remove_namespace(self.ctx, name, force=force)

    def snapshot(self, name: str, snap: str) -> NamespaceInfo:
        return compose.snapshot(self.ctx, name, snap)

    def list_snapshots(self, name: str) -> list[NamespaceInfo]:
        vm = self.namespace(name)
        return [s for s in self.list_namespaces("snapshot") if s.name.startswith(vm.name + "@")]

    def remove_snapshot(self, name: str, snap: str) -> None:
        self.namespace(name)
        full = f"{name}@{snap}"
        with txn.write(self.ctx) as t:
            layers.view_by_name(self.ctx, t, full)
        self.remove_namespace(full)

    def rollback(self, name: str, snap: str) -> NamespaceInfo:
        return compose.rollback(self.ctx, name, snap)

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
        """Compose `new` from sources laid over each other; O(number of sources) (plus one
        walk of the result when a source predates recursive statistics and the result has a
        quota, which it must fit in).

        With `into`, the sources are laid over the existing VM `new`; a source whose
        destination already exists there is refused unless `replace`."""
        return compose.clone(
            self.ctx, new, sources, into=into, replace=replace, clients=clients, quota=quota
        )

    def share(
        self, src: str, src_path: str, dst: str, dst_path: str, *, rw: bool = False
    ) -> NamespaceInfo:
        """Make a live view of `src:src_path` appear at `dst:dst_path` (read-only unless rw)."""
        return compose.share(self.ctx, src, src_path, dst, dst_path, rw=rw)

    def unshare(self, dst: str, dst_path: str) -> NamespaceInfo:
        """Remove the share mounted at `dst:dst_path` (its mount point goes with it)."""
        return compose.unshare(self.ctx, dst, dst_path)

    def usage(self, name: str) -> Usage:
        return quota.usage(self.ctx, name)

    def stats(self) -> StoreStats:
        return quota.stats(self.ctx)

    def fsstat(self, ns_id: int) -> FsStat:
        return quota.fsstat(self.ctx, ns_id)

    def fsstat_attr(self, oid: ObjectId) -> Space:
        return quota.fsstat_attr(self.ctx, oid)

    # -- staged imports (`staging`) --------------------------------------------------------

    def begin_staging(self, vm: str) -> tuple[ObjectId, str, int]:
        """A new detached directory of `vm` to build an import in: (its id, the staging
        token, the fd of the lock file that the caller holds until it publishes or
        discards)."""
        return staging.begin_staging(self.ctx, vm)

    def publish_staging(self, token: str, to: str) -> None:
        """Lay the staged tree into its VM at absolute path `to`, in one transaction."""
        staging.publish_staging(self.ctx, token, to)

    def discard_staging(self, token: str, *, step: int = 2000) -> None:
        """Remove a staged tree in bounded steps, then its marker."""
        staging.discard_staging(self.ctx, token, step=step)

    def reap_stagings(self) -> int:
        """Discard what imports that died had staged; return how many there were."""
        return staging.reap_stagings(self.ctx)

    # -- objects (`posix`, `names`) ------------------------------------------------------
    # The `*_wcc` and `*_attr` operations answer with everything an NFS reply needs, from
    # one transaction (`api`); the plain ones are shorthands for operators and tests.

    def root(self, ns_id: int) -> ObjectId:
        return posix.root(self.ctx, ns_id)

    def getattr(self, oid: ObjectId) -> Attr:
        return posix.attributes(self.ctx, oid)

    def identity(self, oid: ObjectId) -> ObjectId:
        """The object's own identity: the same for every handle that names it (a share's
        handles name objects of its source VM). What byte-range locks are held on."""
        return posix.identity(self.ctx, oid)

    def resolve(self, ns_id: int, path: str) -> Attr:
        return posix.resolve(self.ctx, ns_id, path)

    def lookup_in(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Found:
        return posix.lookup_in(self.ctx, dir, name, cred)

    def lookup(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Attr:
        return self.lookup_in(dir, name, cred).attr

    def access_attr(self, oid: ObjectId, cred: Cred | None, mask: int) -> Access:
        return posix.access(self.ctx, oid, cred, mask)

    def access(self, oid: ObjectId, cred: Cred | None, mask: int) -> int:
        return self.access_attr(oid, cred, mask).granted

    def readlink_attr(self, oid: ObjectId) -> Target:
        return posix.readlink(self.ctx, oid)

    def readlink(self, oid: ObjectId) -> bytes:
        return self.readlink_attr(oid).target

    def read_attr(self, oid: ObjectId, offset: int, count: int, cred: Cred | None = None) -> Read:
        return posix.read_attr(self.ctx, oid, offset, count, cred)

    def read(
        self, oid: ObjectId, offset: int, count: int, cred: Cred | None = None
    ) -> tuple[bytes, bool]:
        got = self.read_attr(oid, offset, count, cred)
        return got.data, got.eof

    def setattr_wcc(
        self,
        oid: ObjectId,
        sattr: SetAttr,
        cred: Cred | None = None,
        *,
        guard_ctime_ns: int | None = None,
    ) -> Wcc:
        return posix.set_attributes(self.ctx, oid, sattr, cred, guard_ctime_ns=guard_ctime_ns)

    def setattr(
        self,
        oid: ObjectId,
        sattr: SetAttr,
        cred: Cred | None = None,
        *,
        guard_ctime_ns: int | None = None,
    ) -> Attr:
        return self.setattr_wcc(oid, sattr, cred, guard_ctime_ns=guard_ctime_ns).after

    def write_wcc(self, oid: ObjectId, offset: int, data: bytes, cred: Cred | None = None) -> Wcc:
        return posix.write(self.ctx, oid, offset, data, cred)

    def write(self, oid: ObjectId, offset: int, data: bytes, cred: Cred | None = None) -> Attr:
        return self.write_wcc(oid, offset, data, cred).after

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
        return names.create(
            self.ctx, dir, name, mode, cred, exclusive=exclusive, guarded=guarded, sattr=sattr
        )

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
    ) -> Attr:
        return self.create_wcc(
            dir, name, mode, cred, exclusive=exclusive, guarded=guarded, sattr=sattr
        ).attr

    def mkdir_wcc(
        self,
        dir: ObjectId,
        name: bytes,
        mode: int = 0o755,
        cred: Cred | None = None,
        *,
        sattr: SetAttr | None = None,
    ) -> Made:
        return names.mkdir(self.ctx, dir, name, mode, cred, sattr=sattr)

    def mkdir(
        self,
        dir: ObjectId,
        name: bytes,
        mode: int = 0o755,
        cred: Cred | None = None,
        *,
        sattr: SetAttr | None = None,
    ) -> Attr:
        return self.mkdir_wcc(dir, name, mode, cred, sattr=sattr).attr

    def symlink_wcc(
        self,
        dir: ObjectId,
        name: bytes,
        target: bytes,
        cred: Cred | None = None,
        *,
        mode: int = 0o777,
        sattr: SetAttr | None = None,
    ) -> Made:
        return names.symlink(self.ctx, dir, name, target, cred, mode=mode, sattr=sattr)

    def symlink(
        self,
        dir: ObjectId,
        name: bytes,
        target: bytes,
        cred: Cred | None = None,
        *,
        mode: int = 0o777,
        sattr: SetAttr | None = None,
    ) -> Attr:
        return self.symlink_wcc(dir, name, target, cred, mode=mode, sattr=sattr).attr

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
    ) -> Made:
        return names.mknod(self.ctx, dir, name, ftype, mode, cred, rdev=rdev, sattr=sattr)

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
    ) -> Attr:
        return self.mknod_wcc(dir, name, ftype, mode, cred, rdev=rdev, sattr=sattr).attr

    def remove_wcc(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Wcc:
        return names.remove(self.ctx, dir, name, cred)

    def remove(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> None:
        self.remove_wcc(dir, name, cred)

    def rmdir_wcc(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Wcc:
        return names.rmdir(self.ctx, dir, name, cred)

    def rmdir(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> None:
        self.rmdir_wcc(dir, name, cred)

    def rename_wcc(
        self,
        src_dir: ObjectId,
        src_name: bytes,
        dst_dir: ObjectId,
        dst_name: bytes,
        cred: Cred | None = None,
    ) -> Renamed:
        return names.rename(self.ctx, src_dir, src_name, dst_dir, dst_name, cred)

    def rename(
        self,
        src_dir: ObjectId,
        src_name: bytes,
        dst_dir: ObjectId,
        dst_name: bytes,
        cred: Cred | None = None,
    ) -> None:
        self.rename_wcc(src_dir, src_name, dst_dir, dst_name, cred)

    def link_wcc(self, oid: ObjectId, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Made:
        return names.link(self.ctx, oid, dir, name, cred)

    def link(self, oid: ObjectId, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Attr:
        return self.link_wcc(oid, dir, name, cred).attr

    def readdir(
        self, dir: ObjectId, cookie: int = 0, cred: Cred | None = None, *, limit: int = 1000
    ) -> tuple[list[DirEntry], bool]:
        return posix.readdir(self.ctx, dir, cookie, cred, limit=limit)

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
        return posix.readdir_raw(
            self.ctx, dir, cookie, cred, limit=limit, attrs=attrs, parent=parent
        )


if TYPE_CHECKING:  # mypy (`make lint`) proves that the facade keeps the contract

    def _keeps_contract(store: Store) -> FileStore:
        return store
