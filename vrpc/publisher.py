"""The server's writer of the VRPC attribute tables: publication from replies and the store
observer (design vrpc.md 7.3-7.5).

Theory of operation. A VM gets a table (`vrpc.meta.new_table`) when its first ATTACH_META
channel attaches, and loses it with its last one. Two things write it, both on the event-loop
thread (the single writer the seqlock needs):

- Replies. `NfsService` hands over what a VRPC-bound GETATTR or LOOKUP returns
  (`published`): the fattr3 bytes exactly as sent, keyed by the handle's `(ns, vol, ino)` in
  the caller's VM table, with the handle's MAC kept privately, stamped with the store epoch
  captured *before* the store read (`epoch0`); the C writer refuses it if an external writer
  began since. Only here may an entry be inserted: a key is in a VM's table only if that VM
  reached it (its own objects, its snapshots', or through its shares).
- The store observer (`prism.store.api.StoreObserver`, called at each nested commit, before
  the reply leaves and before any other call runs). An inode written in namespace `ns` is
  rewritten, if present, in `ns`'s table (from the inode record, with that view's fsid and
  fileid, by the same encoder as replies) and invalidated in every table that reached it
  through a share; a dropped inode is invalidated everywhere. Shared views are invalidated
  rather than rewritten because a share also answers STALE once the source moves the object
  out of the shared directory (`tree.below_share_root`), which no single inode record says;
  for the same reason a directory change in `ns` invalidates every view other VMs hold of
  `ns`'s objects. Never an insert. A lost batch bumps every table's epoch.

Operator commands (other processes) cannot reach these tables; the store epoch file covers
them (`prism.store.epoch`). Share views are remembered as published (`_shared`: owner identity
-> views), bounded by `MAX_SHARED` (beyond, every table is bumped and the map emptied).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prism.errors import StoreError
from prism.nfs.convert import packed_fattr3
from prism.store.epoch import EpochFile
from prism.store.layers import SHARE_VOL_BASE as _SHARE_VOL_BASE
from prism.store.records import Inode
from prism.store.tree import to_attr
from prism.store.types import ObjectId
from vrpc import abi
from vrpc.meta import MetaWriter, Table, meta_backend, new_table

log = logging.getLogger("prism.vrpc")
MAX_SHARED = 1 << 20
"""Share views remembered at most (beyond, every table is bumped: safe, and rare)."""

View = tuple[int, int, int, int]
"""(table's VM, ns, vol, ino): one key in one table."""


@dataclass(slots=True)
class _VmTable:
    table: Table
    writer: MetaWriter
    users: int = 0


class MetaPublisher:
    """Every VM table of one server, and the store observer that keeps them fresh."""

    def __init__(
        self,
        epoch: EpochFile | None,
        *,
        buckets: int = abi.DEFAULT_META_BUCKETS,
        boot_id: int = 0,
        backend: str | None = None,
    ) -> None:
        self.epoch = epoch
        self.buckets = buckets
        self.boot_id = boot_id
        self._backend = meta_backend(backend)
        self.tables: dict[int, _VmTable] = {}
        self._shared: dict[int, dict[tuple[int, int], set[View]]] = {}
        self._shared_count = 0
        self.invalidations = 0

    # -- tables --------------------------------------------------------------------------

    def attach(self, vm: int, name: str = "") -> Table:
        """The VM's table (made on first use); one more channel maps it."""
        entry = self.tables.get(vm)
        if entry is None:
            table = new_table(self.buckets, f"prism-vrpc-meta-{name or vm}")
            try:
                writer = self._backend.writer(
                    table.map, buckets=self.buckets, vm_ns=vm, boot_id=self.boot_id,
                    epoch=self.epoch,
                )  # fmt: skip
            except BaseException:
                table.close()
                raise
            entry = self.tables[vm] = _VmTable(table, writer)
        entry.users += 1
        return entry.table

    def detach(self, vm: int) -> None:
        """A channel that mapped the VM's table is gone; the last one frees it."""
        entry = self.tables.get(vm)
        if entry is None:
            return
        entry.users -= 1
        if entry.users <= 0:
            del self.tables[vm]
            entry.writer.release()
            entry.table.close()
            for owned in self._shared.values():
                for key, views in owned.items():
                    owned[key] = {v for v in views if v[0] != vm}
            self._shared_count = sum(len(v) for o in self._shared.values() for v in o.values())

    def close(self) -> None:
        for entry in self.tables.values():
            entry.writer.release()
            entry.table.close()
        self.tables.clear()
        self._shared.clear()

    def cdata(self, vm: int) -> Any:
        """The C view of the VM's table, for the fast path (None: no native table)."""
        entry = self.tables.get(vm)
        return getattr(entry.writer, "cdata", None) if entry is not None else None

    # -- publication from replies --------------------------------------------------------

    def epoch0(self) -> int | None:
        """The store epoch to capture before a store read (None: do not publish)."""
        return 0 if self.epoch is None else self.epoch.stable()

    def published(
        self,
        vm: int,
        oid: ObjectId,
        raw: bytes,
        mac: bytes,
        epoch0: int | None,
        owner: Callable[[], ObjectId],
    ) -> None:
        """A reply to a call of VM `vm` carried `raw` (fattr3) for the handle `oid`, `mac`.
        `owner()` gives the object's own identity (asked only for share volumes)."""
        entry = self.tables.get(vm)
        if entry is None or epoch0 is None:
            return
        if oid.vol >= _SHARE_VOL_BASE:
            try:
                home = owner()
            except StoreError:  # (gone meanwhile: then nothing to publish)
                return
            views = self._shared.setdefault(home.ns, {}).setdefault((home.vol, home.ino), set())
            view = (vm, oid.ns, oid.vol, oid.ino)
            if view not in views:
                if self._shared_count >= MAX_SHARED:
                    self.batch_lost()
                    views = self._shared.setdefault(home.ns, {}).setdefault(
                        (home.vol, home.ino), set()
                    )
                views.add(view)
                self._shared_count += 1
        entry.writer.publish(oid.ns, oid.vol, oid.ino, raw, mac=mac, epoch0=epoch0)

    # -- the store observer (prism.store.api.StoreObserver) ------------------------------

    def inode_written(self, ns: int, vol: int, ino: int, inode: bytes) -> None:
        entry = self.tables.get(ns)
        if entry is not None:
            stable = self.epoch0()
            if stable is None:
                self._invalidate(entry, ns, vol, ino)
            else:
                raw = packed_fattr3(to_attr(ObjectId(ns, vol, ino), Inode.unpack(inode))).raw
                entry.writer.publish(ns, vol, ino, raw, epoch0=stable, insert=False)
        self._drop_shared(ns, (vol, ino))

    def inode_dropped(self, ns: int, vol: int, ino: int) -> None:
        entry = self.tables.get(ns)
        if entry is not None:
            self._invalidate(entry, ns, vol, ino)
        self._drop_shared(ns, (vol, ino))

    def dirents_changed(self, ns: int, vol: int, dir_ino: int) -> None:
        # objects of ns may have left a shared directory: no shared view of ns stays
        for key in list(self._shared.get(ns, ())):
            self._drop_shared(ns, key)

    def batch_lost(self) -> None:
        for entry in self.tables.values():
            entry.writer.bump()
        self._shared.clear()
        self._shared_count = 0
        self.invalidations += 1

    def _invalidate(self, entry: _VmTable, ns: int, vol: int, ino: int) -> None:
        if entry.writer.invalidate(ns, vol, ino):
            self.invalidations += 1

    def _drop_shared(self, ns: int, key: tuple[int, int]) -> None:
        owned = self._shared.get(ns)
        if not owned:
            return
        views = owned.pop(key, ())
        self._shared_count -= len(views)
        for vm, vns, vvol, vino in views:
            entry = self.tables.get(vm)
            if entry is not None:
                self._invalidate(entry, vns, vvol, vino)
