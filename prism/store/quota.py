"""Usage, quotas and space statistics.

A namespace's usage record (`usage` database: ns id -> bytes|objects|valid) counts the data
bytes it holds (file sizes and symlink targets: `charged_bytes`) and its objects; every
operation that changes them adjusts it in the same transaction (`add_usage`). A graft
cannot know its result's usage in O(1), so it marks the record invalid; the next writer that
reads it (`usage`, `stats`, a change under a quota) re-measures it by walking the tree and the
imports staged in it (`get_usage`, stored), and it is kept current again; `fsstat` measures
invalid counters (never reading them as 0) without storing. A whole clone, snapshot or
rollback copies the record as it is (`copy_usage`). A share's
objects count in their source VM, not where they are mounted. A quota limits the bytes;
`check_quota` refuses a change that would exceed it, and a VM at its quota may still remove
and shrink. Store-wide figures (`stats`) come from the usage records, the counters of
`content` and one stat per file of the data directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path

import lmdb

from prism.errors import QuotaExceeded, Stale
from prism.store import records as R
from prism.store import txn
from prism.store.api import Space
from prism.store.layers import SHARE_VOL_BASE, View, view_by_name, view_of
from prism.store.records import Inode
from prism.store.schema import NS_KEY, REFERENCED, Ctx, get_meta, staged_roots
from prism.store.tree import get_inode, list_dir, locate, to_attr
from prism.store.types import ROOT_INO, Attr, FileType, FsStat, ObjectId, StoreStats, Usage


def get_usage(ctx: Ctx, t: lmdb.Transaction, view: View) -> tuple[int, int]:
    raw = t.get(NS_KEY.pack(view.id), db=ctx.db.usage)
    if raw is not None:
        nbytes, objects, valid = R.USAGE_VAL.unpack(raw)
        if valid:
            return nbytes, objects
    nbytes, objects = _measure(ctx, t, view)
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


def _measure(ctx: Ctx, t: lmdb.Transaction, view: View) -> tuple[int, int]:
    """Walk the whole tree and the trees staged in it (when the counters are unknown:
    kept under an older rule, or dropped by fsck as damaged)."""
    seen: set[tuple[int, int]] = set()
    nbytes = objects = 0
    stack = [(0, ROOT_INO)]
    stack += [(0, ino) for ns, ino in staged_roots(ctx, t) if ns == view.id]
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
            stack.extend(
                (e.oid.vol, e.oid.ino)
                for e in list_dir(ctx, t, view, vol, ino, 0)
                if e.oid.vol < SHARE_VOL_BASE  # a share's bytes belong to its source
            )
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
    return node.size if node.type in (FileType.REG, FileType.LNK) else 0
