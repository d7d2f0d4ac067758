"""Usage, quotas, space statistics, and each directory's recursive statistics.

A namespace's usage record (`usage` database: ns id -> bytes|objects|valid) counts the data
bytes it holds (file sizes and symlink targets: `charged_bytes`) and its objects; every
operation that changes them adjusts it in the same transaction (`add_usage`). A whole clone,
snapshot or rollback copies the record as it is (`copy_usage`); a graft adds the grafted
subtree's recursive statistics to it (below), so a composed VM's usage is exact at once. A
share's objects count in their source VM, not where they are mounted. A quota limits the
bytes; `check_quota` refuses a change that would exceed it, and a VM at its quota may still
remove and shrink. A record marked invalid (a graft of a subtree without statistics, fsck's
repair, counters kept under an older rule) is re-measured by the next writer that reads it,
walking the tree and the imports staged in it (`get_usage`, stored); `fsstat` measures
invalid counters (never reading them as 0) without storing. Store-wide figures (`stats`) come
from the usage records, the counters of `content` and one stat per file of the data directory.

Recursive statistics (CephFS's rstats). Each directory carries the charged bytes and the
objects of its subtree, itself included (`RSTAT`, the 16 trailing bytes of its inode record,
where a symlink keeps its target). A non-directory counts in its directory while it has one
link; one with more is counted by no directory (the hard-link index, `links`, knows its
links, and a graft counts it from there): a file joins its directory's figures when it is
made or its links fall back to one, and leaves them when a second link is made. What a
share shows is not counted, nor is a staged import until it is published (its root is where
its figures stop). A graft thus adds a subtree's usage in O(1) from its root's figures.

Deferred propagation. A change adds its difference to the directory holding the object in
memory only (`add_rstat` appends it to the batch's `Ctx.rstat_pending`, cut off again if
the operation fails); a rename of a directory moves the figures stored in its record from one
'..' chain to the other, and what is pending below it follows it. At the batch's commit, at
the end of every write transaction outside a batch, and before anything reads the figures
or freezes a layer (snapshot, clone, graft, rollback, vm rm), `fold` adds them up each dirty
'..' chain once, reading and writing each directory on the union of those chains once, in
the same transaction. So a stored figure plus the differences pending in its subtree is
always exact, and a change pays one packed entry appended, not a walk. Differences pending
for a directory that is gone are dropped (whoever removed it took its stored figures out of
the chain above).

Crash ordering is the batch's: a durable point (`RstatHooks.persist`) journals the
differences new since the last one as one `b"rstat:"` record of `meta`, with the changes
they describe, and never stores it in the batch (which holds them in memory). A replay of the
journal stores those records; the next commit folds them (`fold` reads them all and deletes
them). A fold inside a batch also journals the deletion of the batch's own records, so a
replay never adds them twice. A checkpoint (the batch's commit) retires them all.

Stores made before these statistics: a directory without them is unknown, and so is every
directory above one (a directory moved into a known one makes that chain unknown), so
nothing is ever wrong, only unknown. They are built lazily: a graft whose subtree is unknown
(or from a lineage older than the hard-link index) marks the VM's usage invalid, and the walk
that measures it (`get_usage`) writes every directory's figures into the VM's top layer, so
from then on that VM composes exactly at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import struct
from pathlib import Path
from typing import cast

import lmdb

from prism.errors import QuotaExceeded, Stale
from prism.store import records as R
from prism.store import txn
from prism.store.api import Space
from prism.store.layers import SHARE_VOL_BASE, View, ns_record, view_by_name, view_of
from prism.store.records import Inode
from prism.store.schema import NS_KEY, REFERENCED, Ctx, get_meta, staged_roots
from prism.store.tree import MAX_DEPTH, get_inode, list_dir, locate, put_inode, to_attr
from prism.store.types import ROOT_INO, Attr, FileType, FsStat, ObjectId, StoreStats, Usage


def get_usage(ctx: Ctx, t: lmdb.Transaction, view: View) -> tuple[int, int]:
    raw = t.get(NS_KEY.pack(view.id), db=ctx.db.usage)
    if raw is not None:
        nbytes, objects, valid = R.USAGE_VAL.unpack(raw)
        if valid:
            return nbytes, objects
    fold(ctx, t)  # (the walk below stores exact figures: nothing may stay pending)
    nbytes, objects = _measure(ctx, t, view, build=view.kind == "vm")
    t.put(NS_KEY.pack(view.id), R.USAGE_VAL.pack(nbytes, objects, 1), db=ctx.db.usage)
    return nbytes, objects


def add_usage(ctx: Ctx, t: lmdb.Transaction, view: View, dbytes: int, dobjects: int) -> None:
    raw = t.get(NS_KEY.pack(view.id), db=ctx.db.usage)
    if raw is None:
        return
    nbytes, objects, valid = R.USAGE_VAL.unpack(raw)
    if valid:
        t.put(
            NS_KEY.pack(view.id),
            R.USAGE_VAL.pack(max(0, nbytes + dbytes), max(0, objects + dobjects), 1),
            db=ctx.db.usage,
        )


def copy_usage(ctx: Ctx, t: lmdb.Transaction, src: int, dst: int) -> None:
    """Namespace `dst` holds what `src` holds (a snapshot, rollback or whole clone): its
    counters, known or not, in O(1); unknown ones are measured when first needed."""
    raw = t.get(NS_KEY.pack(src), db=ctx.db.usage)
    t.put(NS_KEY.pack(dst), bytes(raw) if raw else R.USAGE_VAL.pack(0, 0, 0), db=ctx.db.usage)


def set_usage(ctx: Ctx, t: lmdb.Transaction, ns_id: int, nbytes: int, objects: int, valid: bool):
    t.put(NS_KEY.pack(ns_id), R.USAGE_VAL.pack(nbytes, objects, int(valid)), db=ctx.db.usage)


def _measure(ctx: Ctx, t: lmdb.Transaction, view: View, *, build: bool = False) -> tuple[int, int]:
    """Walk the whole tree and the trees staged in it (when the counters are unknown:
    kept under an older rule, or dropped by fsck as damaged). With `build`, also store
    every directory's recursive statistics in the view's top layer (see above)."""
    seen: set[tuple[int, int]] = set()
    nbytes = objects = 0
    stack = [(0, ROOT_INO)]
    stack += [(0, ino) for ns, ino in staged_roots(ctx, t) if ns == view.id]
    dirs: dict[tuple[int, int], tuple[Inode, list[tuple[int, int]]]] = {}
    nodes: dict[tuple[int, int], Inode] = {}
    while stack:
        vol, ino = stack.pop()
        if (vol, ino) in seen:
            continue
        seen.add((vol, ino))
        node = get_inode(ctx, t, view, vol, ino)
        if node is None:
            continue
        objects += 1
        nbytes += charged_bytes(node)
        if node.type == FileType.DIR:
            children = [
                (e.oid.vol, e.oid.ino)
                for e in list_dir(ctx, t, view, vol, ino, 0)
                if e.oid.vol < SHARE_VOL_BASE  # a share's bytes belong to its source
            ]
            stack.extend(children)
            if build:
                dirs[(vol, ino)] = (node, children)
        elif build:
            nodes[(vol, ino)] = node
    figures: dict[tuple[int, int], tuple[int, int]] = {}
    for d in reversed(list(dirs)):  # (each directory after every directory below it)
        node, children = dirs[d]
        total = [0, 1]
        for c in children:
            w = figures.get(c) if c in dirs else weight(nodes[c]) if c in nodes else None
            if w is not None:
                total[0] += w[0]
                total[1] += w[1]
        figures[d] = (total[0], total[1])
        if rstat(node) != figures[d]:
            node.target = RSTAT.pack(*figures[d])
            put_inode(ctx, t, view, *d, node)
    return nbytes, objects


def check_quota(ctx: Ctx, t: lmdb.Transaction, view: View, more_bytes: int) -> None:
    if view.quota is None:
        return
    used, _ = get_usage(ctx, t, view)
    if used + more_bytes > view.quota or (more_bytes == 0 and used >= view.quota):
        raise QuotaExceeded(
            f"{view.name} would exceed its quota of {view.quota} bytes "
            f"({used} used); raise it with `prism vm set {view.name} --quota SIZE`"
        )


def usage(ctx: Ctx, name: str) -> Usage:
    with txn.write(ctx) as t:
        nbytes, objects = get_usage(ctx, t, view_by_name(ctx, t, name))
        return Usage(nbytes, objects)


def stats(ctx: Ctx) -> StoreStats:
    with txn.write(ctx) as t:
        logical = 0
        for _, raw in t.cursor(db=ctx.db.ns):
            rec = json.loads(bytes(raw))
            if rec["kind"] == "vm":
                logical += get_usage(ctx, t, view_of(ctx, t, rec["id"]))[0]
        segment_bytes = sum(R.SEGMENT_VAL.unpack(v)[0] for _, v in t.cursor(db=ctx.db.segments))
        return StoreStats(
            logical_bytes=logical,
            stored_bytes=get_meta(ctx, t, b"stored_bytes"),
            chunk_count=get_meta(ctx, t, b"chunk_count"),
            segment_bytes=segment_bytes,
            referenced_bytes=get_meta(ctx, t, REFERENCED),
            disk_bytes=directory_bytes(ctx.path),
        )


def directory_bytes(root: Path) -> int:
    """The apparent sizes of the files under `root` (what `du -sb` counts of them), one
    stat per file: segment files are large, so there are few. A directory that is a
    symlink (a data directory may place `segments/` elsewhere) is followed."""
    total = 0
    for top, _, files in os.walk(root, followlinks=True):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # (a segment gc removed meanwhile)
                st = os.lstat(os.path.join(top, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def fsstat(ctx: Ctx, ns_id: int) -> FsStat:
    with txn.read(ctx) as t:
        return _fsstat(ctx, t, view_of(ctx, t, ns_id))


def fsstat_attr(ctx: Ctx, oid: ObjectId) -> Space:
    """`fsstat` of the object's namespace, and the object's attributes (None if it is gone:
    the namespace's figures still stand), from one transaction (NFS FSSTAT)."""
    with txn.read(ctx) as t:
        stat = _fsstat(ctx, t, view_of(ctx, t, oid.ns))
        try:
            attr: Attr | None = to_attr(oid, locate(ctx, t, oid)[2])
        except Stale:
            attr = None
        return Space(stat, attr)


def _fsstat(ctx: Ctx, t: lmdb.Transaction, view: View) -> FsStat:
    raw = t.get(NS_KEY.pack(view.id), db=ctx.db.usage)
    used, objects, valid = R.USAGE_VAL.unpack(raw) if raw else (0, 0, 0)
    if not valid:  # counters not known yet: the true figures, not zero
        used, objects = _measure(ctx, t, view)
    free_files = 1 << 32
    if view.quota is not None:
        free = max(0, view.quota - used)
        return FsStat(view.quota, free, free, objects + free_files, free_files)
    disk = shutil.disk_usage(ctx.path)
    return FsStat(disk.total, disk.free, disk.free, objects + free_files, free_files)


def charged_bytes(node: Inode) -> int:
    """The data bytes an object counts against its VM's quota: a file's size, a symlink's
    target (both are bytes a VM stores)."""
    return node.size if node.type in _CHARGED else 0


_CHARGED = frozenset((FileType.REG, FileType.LNK))
_DIR = FileType.DIR


RSTAT = struct.Struct(">QQ")
"""A directory's recursive statistics: the charged bytes and the objects of its subtree,
itself included, as its inode record's trailing bytes (see the module docstring)."""
Delta = tuple[int, int] | None
"""A difference of (bytes, objects) to add to a directory and those above it; None makes
them unknown."""
_PENDING = b"rstat:"
_ENTRY = R.RSTAT_ENTRY


def rstat(node: Inode) -> tuple[int, int] | None:
    """A directory's stored figures (None: unknown, or not a directory)."""
    if node.type != FileType.DIR or len(node.target) != RSTAT.size:
        return None
    return cast(tuple[int, int], RSTAT.unpack(node.target))


def empty_rstat(node: Inode) -> Inode:
    """`node`, a new empty directory, with its figures: itself alone."""
    node.target = RSTAT.pack(0, 1)
    return node


def weight(node: Inode) -> Delta:
    """What an object adds to the figures of the directory holding it: a directory its
    stored figures (what is pending below it follows it), a file with one link its bytes
    and itself, a file with more nothing."""
    kind = node.type
    if kind == _DIR:
        return rstat(node)
    if node.nlink != 1:
        return (0, 0)
    return (node.size if kind in _CHARGED else 0, 1)


def negate(change: Delta) -> Delta:
    return None if change is None else (-change[0], -change[1])


def add_rstat(ctx: Ctx, view: View, d: tuple[int, int], change: Delta) -> None:
    """Add `change` to directory `d` and every directory above it: deferred, O(1) (see the
    module docstring). Shares are not counted, nor what has no known holder."""
    vol, ino = d
    if vol >= SHARE_VOL_BASE or ino in R.HOLDERS_NOT_KNOWN:
        return
    if change is None:
        ctx.rstat_pending += _ENTRY.pack(view.id, vol, ino, 1, 0, 0)
    elif change != (0, 0):
        ctx.rstat_pending += _ENTRY.pack(view.id, vol, ino, 0, *change)


def left_dir(ctx: Ctx, view: View, node: Inode, gone: Delta, d: tuple[int, int]) -> None:
    """Directory `d` lost an entry naming `node` (whose weight there was `gone`; `node` is
    as it is after): it leaves `d`'s figures, or, down to one link, joins those of the
    directory of its last link."""
    if node.type == FileType.DIR or node.nlink <= 0:
        add_rstat(ctx, view, d, negate(gone))
    elif node.nlink == 1:
        add_rstat(ctx, view, (node.parent_vol, node.parent_ino), weight(node))


def fold(ctx: Ctx, t: lmdb.Transaction) -> None:
    """Add every pending difference (this transaction's, the batch's, the stored ones)
    up its directory's '..' chain, reading and writing each directory of the union of
    those chains once. A chain stops at the root, at a staged import's root, and at a
    directory whose figures are unknown (so are those above it)."""
    pending: dict[tuple[int, int, int], Delta] = dict(ctx.rstat_batch)
    for ns, vol, ino, unknown, nbytes, objects in _ENTRY.iter_unpack(ctx.rstat_pending):
        txn.merge_delta(pending, (ns, vol, ino), None if unknown else (nbytes, objects))
    journaled = ctx.rstat_keys  # (a replay would store them: retire them with the fold)
    ctx.rstat_pending, ctx.rstat_journaled = bytearray(), 0
    ctx.rstat_batch, ctx.rstat_keys = {}, []
    for gone in journaled:
        t.delete(gone, db=ctx.db.meta)
    stored: list[bytes] = []
    cur = t.cursor(db=ctx.db.meta)
    if cur.set_range(_PENDING):
        for raw_key, value in cur:
            if not bytes(raw_key).startswith(_PENDING):
                break
            stored.append(bytes(raw_key))
            for ns, vol, ino, unknown, nbytes, objects in _ENTRY.iter_unpack(value):
                txn.merge_delta(pending, (ns, vol, ino), None if unknown else (nbytes, objects))
    for done in stored:
        t.delete(done, db=ctx.db.meta)
    if not pending:
        return
    by_ns: dict[int, list[tuple[tuple[int, int], Delta]]] = {}
    for (ns, vol, ino), change in pending.items():
        by_ns.setdefault(ns, []).append(((vol, ino), change))
    stops = set(staged_roots(ctx, t))
    for ns, items in by_ns.items():
        if ns_record(ctx, t, ns) is None:
            continue  # removed: nothing left to count
        view = view_of(ctx, t, ns)
        nodes: dict[tuple[int, int], Inode | None] = {}
        sums: dict[tuple[int, int], Delta] = {}
        for d, change in items:
            for _ in range(MAX_DEPTH):
                if d not in nodes:
                    nodes[d] = get_inode(ctx, t, view, *d)
                node = nodes[d]
                if node is None or rstat(node) is None:
                    break  # gone, or unknown (and so is everything above)
                txn.merge_delta(sums, d, change)
                up = (node.parent_vol, node.parent_ino)
                if d == (0, ROOT_INO) or up == d or (d[0] == 0 and (ns, d[1]) in stops):
                    break
                d = up
        for (vol, ino), change in sums.items():
            node = nodes[(vol, ino)]
            assert node is not None
            if change is None:
                node.target = b""
            elif change != (0, 0):
                nbytes, objects = RSTAT.unpack(node.target)
                node.target = RSTAT.pack(max(0, nbytes + change[0]), max(0, objects + change[1]))
            else:
                continue
            put_inode(ctx, t, view, vol, ino, node)


class RstatHooks:
    """What `txn` calls (it cannot import this room): `persist` at a durable point, `fold`
    before a commit."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.prefix = _PENDING + secrets.token_bytes(8)
        self.seq = 0

    def persist(self) -> tuple[bytes, bytes] | None:
        """The batch's differences not yet journaled, as one `meta` record to journal."""
        ctx = self.ctx
        pending, done = ctx.rstat_pending, ctx.rstat_journaled
        end = len(pending)
        if end == done:
            return None
        value = bytes(pending[done:] if done else pending)
        ctx.rstat_journaled = end
        if end > txn.RSTAT_COMPACT:
            txn.compact_rstats(ctx, end)
        self.seq += 1
        return self.prefix + R.U64.pack(self.seq), value

    def fold(self, t: lmdb.Transaction) -> None:
        """Fold before a commit, which retires the journal's records: its own are not
        deleted one by one."""
        self.ctx.rstat_keys = []
        fold(self.ctx, t)


def check_rstats(
    ctx: Ctx,
    t: lmdb.Transaction,
    objects: dict[tuple[int, int], Inode],
    stops: set[tuple[int, int]],
) -> list[str]:
    """Each directory's stored figures against its subtree's, from a walk's objects (fsck).
    Figures with differences still pending are not checked."""
    cur = t.cursor(db=ctx.db.meta)
    if cur.set_range(_PENDING) and bytes(cur.key()).startswith(_PENDING):
        return []
    sums = {d: [0, 1] for d, node in objects.items() if node.type == FileType.DIR}
    kids: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for k, node in objects.items():
        up = (node.parent_vol, node.parent_ino)
        if k == (0, ROOT_INO) or k in stops or up not in sums or up == k:
            continue
        if node.type == FileType.DIR:
            kids.setdefault(up, []).append(k)
        elif node.nlink == 1:
            sums[up][0] += charged_bytes(node)
            sums[up][1] += 1
    order: list[tuple[int, int]] = []
    todo = [
        d
        for d, node in objects.items()
        if d in sums
        and (d == (0, ROOT_INO) or d in stops or (node.parent_vol, node.parent_ino) not in sums)
    ]
    done: set[tuple[int, int]] = set()
    while todo:
        d = todo.pop()
        if d in done:
            continue
        done.add(d)
        order.append(d)
        todo.extend(kids.get(d, ()))
    errors = []
    for d in reversed(order):
        for k in kids.get(d, ()):
            if k in done:
                sums[d][0] += sums[k][0]
                sums[d][1] += sums[k][1]
        have = rstat(objects[d])
        if have is not None and have != tuple(sums[d]):
            errors.append(
                f"directory {d[0]}:{d[1]} says its subtree holds {have[1]} objects and "
                f"{have[0]} bytes, but it holds {sums[d][1]} and {sums[d][0]}"
            )
    return errors
