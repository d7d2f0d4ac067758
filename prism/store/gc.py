"""Space reclamation (`gc`) for a Prism store.

gc works in bounded steps: each step is a write transaction of its own (the store's write
lock is held only during it, so a server's writes get in between steps), and stops after
STEP_SECONDS or STEP_RECORDS records, whichever comes first. Every step re-reads what it
decides on, since others write between steps. In order:
  1. discard what imports that died had staged (`staging.reap_stagings`, bounded steps too);
  2. drop layers no namespace reaches, deleting their records and releasing the chunks their
     chunk maps name (in the same transaction), a bounded number of records per step. Only
     a layer no other layer names (as parent or import source) is dropped, and its layer
     record goes with its last records, so every remaining layer's parent exists;
  3. merge layers that only one child uses, one fold (one child layer's records) per step;
     an inode whiteout folded onto a layer drops that layer's chunk-map records of the
     inode and releases their chunks;
  4. delete zero-reference chunk records (a chunk referenced again meanwhile stays);
  5. compact segments, emptiest first, at least one segment per step: a segment no live
     chunk names is dropped, a mostly-garbage one has its live chunks copied into this
     process's segment; the copies are fdatasync'd before the commit that moves the chunk
     and chunk-map records (and deletes chunk records that fell to zero references since
     step 4 and still name the segment), and the old files are deleted only after that
     commit. Segments locked by a live writer are never touched.
What gc reports is what the data directory's files shrank by (`du -sb` before minus after,
and `prism stats`' `disk_bytes`): the sizes of the segment files it deleted, less the copies
it appended and the growth of the metadata file (LMDB never shrinks its file; freed pages
are reused). A chunk freed in step 4 is not counted by itself: its bytes leave the disk only
with its segment, which step 5 counts whole.
Unique bytes (`unique_bytes`, for `prism vm show`): the chunk bytes that removing some
namespaces and then running gc would free, found without changing anything and without a
walk of files: in one read transaction it works out which layers gc would drop and fold
(from the layer records alone), counts the chunk-map records those steps would release
(the dropped layers' records, and in a fold the parent's records its child shadows), and
compares the counts with the chunks' refcounts: a chunk is freed when every reference goes.
What gc would free anyway (layers already unreachable, folds already due) is not counted.
Cost: the chunk-map records of the layers only those namespaces reach, plus the records of
the layers a fold would merge (the writes since the latest snapshot or clone), plus, once
for all the groups asked, those of what gc would free anyway (`_Reads`).
Crash ordering: content first, then metadata, within each step. A kill between or inside
steps leaves only what fsck reports as debris and the next gc removes: unreachable layers
(dropped in part: their records are unreachable, their chunk references already consistent),
zero-reference chunks, copies in a segment that no committed chunk names, and old segment
files whose moves committed.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb

from prism.errors import NoSpace
from prism.store import records as R
from prism.store import txn
from prism.store.content import drop_chunks, note_append, unref_chunk
from prism.store.layers import all_layers, put_layer, put_ns, reachable_layers
from prism.store.schema import Ctx
from prism.store.store import Store

COMPACT_BELOW = 0.5
"""Compact a segment when less than this fraction of its bytes is live."""
STEP_SECONDS = 0.25
"""gc commits a step (and releases the write lock) once it has worked this long..."""
STEP_RECORDS = 20000
"""...or deleted this many records or copied this many chunks, whichever comes first."""
Progress = Callable[[str], None]


@dataclass
class GcReport:
    layers_merged: int = 0
    layers_dropped: int = 0
    chunks_freed: int = 0
    segments_removed: int = 0
    segments_compacted: int = 0
    bytes_reclaimed: int = 0
    """The data directory's shrinkage: `segment_bytes_deleted - bytes_copied -
    metadata_bytes_added` (negative if it grew)."""
    segment_bytes_deleted: int = 0
    """Sizes of the segment files deleted."""
    bytes_copied: int = 0
    """Live chunk bytes copied out of mostly-garbage segments before they were deleted."""
    metadata_bytes_added: int = 0
    """Growth of the metadata file (`meta/data.mdb`) while gc ran (a server writing
    meanwhile grows it too)."""


def gc(store: Store, *, progress: Progress | None = None) -> GcReport:
    report = GcReport()
    say = progress or (lambda _msg: None)
    if store.in_batch:
        store.commit()
    ctx = store.ctx
    metadata_before = _metadata_size(ctx)
    say(f"discarded {store.reap_stagings()} trees staged by imports that died")
    say("dropping unreachable layers")
    while _step(ctx, lambda t: _drop_step(ctx, t, report)):
        pass
    say(f"dropped {report.layers_dropped} unreachable layers")
    say("merging layers that only one namespace still uses")
    while _step(ctx, lambda t: _merge_step(ctx, t, report)):
        pass
    say("freeing unreferenced chunks")
    resume: list[bytes] = [b""]
    while _step(ctx, lambda t: _free_step(ctx, t, report, resume)):
        pass
    say("compacting segments")
    tried: set[int] = set()
    while _compact_step(ctx, report, tried):
        pass
    report.metadata_bytes_added = max(0, _metadata_size(ctx) - metadata_before)
    report.bytes_reclaimed = (
        report.segment_bytes_deleted - report.bytes_copied - report.metadata_bytes_added
    )
    return report


def _metadata_size(ctx: Ctx) -> int:
    return os.stat(ctx.path / "meta" / "data.mdb").st_size


def _step(ctx: Ctx, work: Callable[[lmdb.Transaction], bool]) -> bool:
    """Run `work` in a write transaction of its own (the write lock held only meanwhile);
    return whether it found work, so that the caller runs another step."""
    t = txn.begin_write(ctx)
    try:
        more = work(t)
    except BaseException:
        txn.aborted(ctx, t)
        raise
    txn.durable_commit(ctx, t)
    txn.forget_layers(ctx)
    return more


def _over(began: float, done: int) -> bool:
    return done >= STEP_RECORDS or time.monotonic() - began >= STEP_SECONDS


def _drop_step(ctx: Ctx, t: lmdb.Transaction, report: GcReport) -> bool:
    """Delete records of unreachable layers (and release their chunks), a bounded number;
    a layer's own record goes with its last records. Only a layer no other layer names
    (as parent or import source) is dropped, so every remaining layer's parent exists.
    Returns whether unreachable layers remain."""
    began = time.monotonic()
    layers = all_layers(ctx, t)
    dead = set(layers) - reachable_layers(ctx, t, layers)
    named: Counter[int] = Counter()
    for rec in layers.values():
        if rec["parent"]:
            named[rec["parent"]] += 1
        for src in rec["vols"].values():
            named[src[0]] += 1
    leaves = sorted(layer for layer in dead if not named[layer])
    done = 0
    while leaves:
        layer = leaves.pop(0)
        prefix = R.layer_prefix(layer)
        finished = True
        for db in (ctx.db.inodes, ctx.db.dirents, ctx.db.cmap, ctx.db.links):
            cur = t.cursor(db=db)
            doomed: list[tuple[bytes, bytes]] = []
            if cur.set_range(prefix):
                for key, value in cur:
                    if not bytes(key).startswith(prefix):
                        break
                    if _over(began, done + len(doomed)):
                        finished = False
                        break
                    doomed.append((bytes(key), bytes(value)))
            for key, value in doomed:
                t.delete(key, db=db)
                if db is ctx.db.cmap and value:
                    unref_chunk(ctx, t, R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(value)[:2]))
            done += len(doomed)
            if not finished:
                return True
        t.delete(R.U64.pack(layer), db=ctx.db.layers)
        report.layers_dropped += 1
        done += 1
        rec = layers.pop(layer)
        dead.discard(layer)
        for parent in [rec["parent"], *(src[0] for src in rec["vols"].values())]:
            if parent:
                named[parent] -= 1
                if parent in dead and not named[parent]:
                    leaves.append(parent)
        if _over(began, done):
            break
    return bool(dead) and done > 0


def _merge_step(ctx: Ctx, t: lmdb.Transaction, report: GcReport) -> bool:
    """Fold one layer into its parent (one transaction per fold); whether one was folded."""
    if not _merge_one(ctx, t, all_layers(ctx, t)):
        return False
    report.layers_merged += 1
    return True


def _free_step(ctx: Ctx, t: lmdb.Transaction, report: GcReport, resume: list[bytes]) -> bool:
    """Delete zero-reference chunks (as read now: a chunk referenced again meanwhile stays)
    from `resume[0]` on, a bounded number; return whether the index has more to visit."""
    began = time.monotonic()
    freed: list[bytes] = []
    cur = t.cursor(db=ctx.db.chunks)
    more = False
    if cur.set_range(resume[0]):  # b"": from the first key
        for key, value in cur:
            if _over(began, len(freed)):
                resume[0] = bytes(key)
                more = True
                break
            if R.CHUNK_VAL.unpack(value)[3] == 0:
                freed.append(bytes(key))
    for key in freed:
        t.delete(key, db=ctx.db.chunks)
    report.chunks_freed += len(freed)
    return more


def _compact_step(ctx: Ctx, report: GcReport, tried: set[int]) -> bool:
    """One step of compaction: in one write transaction, pick the emptiest segments not yet
    `tried` and, until the step's budget is spent (at least one segment), drop a segment
    no chunk names or copy a mostly-garbage one's live chunks into this process's segment;
    then fdatasync, commit the moved chunk and chunk-map records, and only after that delete
    the old files. Returns whether segments may remain."""
    began = time.monotonic()
    locked: list[int] = []
    t = txn.begin_write(ctx)
    try:
        doomed, more = _compact(ctx, t, report, tried, locked, began)
    except BaseException:
        txn.aborted(ctx, t)
        for fd in locked:
            os.close(fd)
        raise
    try:
        txn.durable_commit(ctx, t)
        txn.forget_layers(ctx)
        # Only now, with the moves committed, may the old segment files go.
        for seg_id in doomed:
            ctx.segments.remove(seg_id)
    finally:
        for fd in locked:
            os.close(fd)
    return more


def _compact(
    ctx: Ctx,
    t: lmdb.Transaction,
    report: GcReport,
    tried: set[int],
    locked: list[int],
    began: float,
) -> tuple[list[int], bool]:
    """Do one compaction step's metadata work; return (segment files to delete once it
    commits, whether segments remain to look at)."""
    live_by_segment: Counter[int] = Counter()
    chunks_by_segment: dict[int, list[tuple[bytes, int, int]]] = {}
    zero_by_segment: dict[int, list[bytes]] = {}
    for key, value in t.cursor(db=ctx.db.chunks):
        segment, offset, length, refs = R.CHUNK_VAL.unpack(value)
        if refs == 0:
            zero_by_segment.setdefault(segment, []).append(bytes(key))
            continue
        live_by_segment[segment] += length
        chunks_by_segment.setdefault(segment, []).append((bytes(key), offset, length))
    pending: list[int] = []
    moved: dict[tuple[int, int], tuple[int, int]] = {}
    known = {R.U64.unpack(k)[0]: R.SEGMENT_VAL.unpack(v) for k, v in t.cursor(db=ctx.db.segments)}
    # Emptiest first: dropping dead segments needs no room, and compaction (which may use the
    # metadata reserve) stops at the first append that finds the disk full.
    candidates = sorted(
        (set(ctx.segments.list_ids()) | set(known)) - tried,
        key=lambda s: live_by_segment.get(s, 0),
    )
    copied = 0
    for position, seg_id in enumerate(candidates):
        if copied and _over(began, copied):
            return pending, True
        tried.add(seg_id)
        appended = known.get(seg_id, (0, 0))[0]
        live = live_by_segment.get(seg_id, 0)
        if live and appended and live >= COMPACT_BELOW * appended:
            if seg_id in known and known[seg_id][1] != live:
                t.put(R.U64.pack(seg_id), R.SEGMENT_VAL.pack(appended, live), db=ctx.db.segments)
            continue
        fd = ctx.segments.try_lock(seg_id)
        if fd is None:
            continue
        locked.append(fd)
        moved_bytes = 0
        disk_full = False
        for key, offset, length in chunks_by_segment.get(seg_id, []):
            data = ctx.segments.read(seg_id, offset, length)
            try:
                new_seg, new_off = ctx.segments.append(data, use_reserve=True)
            except NoSpace:
                disk_full = True  # the chunks moved so far stay moved; the segment stays
                break
            copied += 1
            moved_bytes += length
            report.bytes_copied += length
            moved[(seg_id, offset)] = (new_seg, new_off)
            refs = R.CHUNK_VAL.unpack(t.get(key, db=ctx.db.chunks) or bytes(28))[3]
            t.put(key, R.CHUNK_VAL.pack(new_seg, new_off, length, refs), db=ctx.db.chunks)
            note_append(ctx, t, new_seg, new_off, length)
        if disk_full:
            if seg_id in known:
                t.put(
                    R.U64.pack(seg_id),
                    R.SEGMENT_VAL.pack(appended, live - moved_bytes),
                    db=ctx.db.segments,
                )
            tried.update(candidates[position:])
            break
        # Chunks released since the freeing steps name this segment too: they go with it.
        for key in zero_by_segment.get(seg_id, []):
            t.delete(key, db=ctx.db.chunks)
            report.chunks_freed += 1
        if live:
            report.segments_compacted += 1
        else:
            report.segments_removed += 1
        report.segment_bytes_deleted += ctx.segments.size_of(seg_id)  # locked: it cannot grow
        t.delete(R.U64.pack(seg_id), db=ctx.db.segments)
        pending.append(seg_id)
        copied += 1
    if moved:
        updates = []
        for key, value in t.cursor(db=ctx.db.cmap):
            if not value:
                continue
            digest, seq, length, segment, offset = R.CMAP_VAL.unpack(value)
            target = moved.get((segment, offset))
            if target is not None:
                updates.append(
                    (bytes(key), R.CMAP_VAL.pack(digest, seq, length, target[0], target[1]))
                )
        for key, value in updates:
            t.put(key, value, db=ctx.db.cmap)
    return pending, False


def _merge_one(ctx: Ctx, t: lmdb.Transaction, layers: dict[int, dict]) -> bool:
    """Fold one layer into its parent when that parent has no other user. O(child's records).

    After snapshots or clones are removed, a namespace's chain keeps frozen layers whose
    records the namespace itself has shadowed or whited out; merging frees them and keeps
    lookups short.
    """
    users: dict[int, list[tuple[str, int]]] = {layer: [] for layer in layers}
    for layer, rec in layers.items():
        if rec["parent"] in users:
            users[rec["parent"]].append(("child", layer))
        for src in rec["vols"].values():
            if src[0] in users:
                users[src[0]].append(("import", layer))
    tops = {}
    for _, raw in t.cursor(db=ctx.db.ns):
        ns = json.loads(bytes(raw))
        tops[ns["id"]] = ns
        if ns["top"] in users:
            users[ns["top"]].append(("ns", ns["id"]))
    for parent, refs in users.items():
        if len(refs) != 1 or refs[0][0] != "child":
            continue
        child = refs[0][1]
        _fold(ctx, t, child, parent, layers)
        for ns in tops.values():
            if ns["top"] == child:
                put_ns(ctx, t, dict(ns, top=parent))
        for layer, rec in layers.items():
            changed = False
            if rec["parent"] == child:
                rec["parent"] = parent
                changed = True
            for src in rec["vols"].values():
                if src[0] == child:
                    src[0] = parent
                    changed = True
            for imp in rec["imports"].values():
                if imp["layer"] == child:
                    imp["layer"] = parent
                    changed = True
            if changed and layer != child:
                put_layer(ctx, t, layer, rec)
        merged = dict(layers[child], parent=layers[parent]["parent"])
        put_layer(ctx, t, parent, merged)
        layers[parent] = merged
        t.delete(R.U64.pack(child), db=ctx.db.layers)
        layers.pop(child)
        txn.forget_layers(ctx)
        return True
    return False


def _fold(ctx: Ctx, t: lmdb.Transaction, child: int, parent: int, layers: dict) -> None:
    base = layers[parent]["parent"] == 0
    native = layers[parent]["vols"]
    lprefix = R.layer_prefix(child)
    new_prefix = R.layer_prefix(parent)
    for db in (ctx.db.inodes, ctx.db.dirents, ctx.db.cmap, ctx.db.links):
        cur = t.cursor(db=db)
        moves = []
        if cur.set_range(lprefix):
            for key, value in cur:
                if not bytes(key).startswith(lprefix):
                    break
                moves.append((bytes(key), bytes(value)))
        for key, value in moves:
            t.delete(key, db=db)
            target = new_prefix + key[8:]
            if db is ctx.db.inodes and not value:
                # The whiteout shadows the layer's chunk-map records of the inode for good.
                drop_chunks(ctx, t, target)
            old = t.get(target, db=db)
            if db is ctx.db.cmap and old:
                unref_chunk(ctx, t, R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(old)[:2]))
            vol = R.U32.unpack(b"\0\0" + key[8:10])[0]
            if not value and base and str(vol) not in native:
                if old is not None:
                    t.delete(target, db=db)
            else:
                t.put(target, value, db=db)


def unique_bytes(
    store: Store, groups: Sequence[Sequence[str]], *, progress: Progress | None = None
) -> list[int]:
    """For each group of namespace names, the chunk bytes that removing them together (as
    `prism vm rm` removes a VM with its snapshots) and then running gc would free. Read only
    (see "Unique bytes" above)."""
    say = progress or (lambda _msg: None)
    ctx = store.ctx
    with txn.read(ctx) as t:
        layers = all_layers(ctx, t)
        tops: dict[str, int] = {}
        for _, raw in t.cursor(db=ctx.db.ns):
            rec = json.loads(bytes(raw))
            tops[rec["name"]] = rec["top"]
        reads = _Reads(ctx, t, say)
        base = reads.freed(_released(reads, layers, tops.values()))
        reads.remember = False  # what only one group's pass reads is read once
        out = []
        for group in groups:
            say(f"counting what only {', '.join(group)} references")
            kept = [top for name, top in tops.items() if name not in group]
            freed = reads.freed(_released(reads, layers, kept))
            out.append(sum(length for key, length in freed.items() if key not in base))
        return out


_KEY_SIZE = R.CHUNK_KEY.size
"""A chunk-map record's value starts with the chunk's key (`records.CMAP_VAL`)."""


class _Reads:
    """The reads of `unique_bytes`' passes in its one read transaction. Every pass (the
    store as it is, then without each group) also counts the layers nobody reaches and the
    folds already due, which belong to the whole store rather than to the group: what the
    first pass reads (`remember`) is kept for the others, so that their cost is the
    group's alone; the rest is not kept (memory stays that of one pass, twice at most)."""

    def __init__(self, ctx: Ctx, t: lmdb.Transaction, say: Progress) -> None:
        self.ctx, self.t, self.say = ctx, t, say
        self.remember = True
        self._layers: dict[int, Counter[bytes]] = {}
        self._shadowed: dict[tuple[tuple[int, ...], tuple[int, ...]], Counter[bytes]] = {}
        self._chunks: dict[bytes, tuple[int, int]] = {}
        self._seen = 0

    def layer(self, layer: int) -> Counter[bytes]:
        """The chunk references (key -> count) of the layer's chunk-map records."""
        refs = self._layers.get(layer)
        if refs is None:
            refs = Counter()
            if self.remember:
                self._layers[layer] = refs
            for _, value in _records(self.t, self.ctx.db.cmap, R.layer_prefix(layer)):
                if value:
                    refs[value[:_KEY_SIZE]] += 1
                self._seen += 1
                if self._seen % 200_000 == 0:
                    self.say(f"read {self._seen} chunk-map records")
        return refs

    def shadowed(self, child: list[int], parent: list[int]) -> Counter[bytes]:
        key = (tuple(child), tuple(parent))
        refs = self._shadowed.get(key)
        if refs is None:
            refs = _shadowed(self.ctx, self.t, child, parent)
            if self.remember:
                self._shadowed[key] = refs
        return refs

    def freed(self, released: Counter[bytes]) -> dict[bytes, int]:
        """The chunks (key -> length) whose every reference is among `released`."""
        out = {}
        chunks = self._chunks
        for key, count in released.items():
            known = chunks.get(key)
            if known is None:
                raw = self.t.get(key, db=self.ctx.db.chunks)
                known = R.CHUNK_VAL.unpack(raw)[2:] if raw is not None else (0, 0)
                if self.remember:
                    chunks[key] = known
            length, refs = known
            if 0 < refs <= count:
                out[key] = length
        return out


def _released(reads: _Reads, layers: dict[int, dict], tops: Iterable[int]) -> Counter[bytes]:
    """The chunk references (chunk key -> count) gc would release if the namespaces whose
    top layers are `tops` were the only ones: the records of the layers none of them
    reaches (`_drop_step`), and in each fold (`_merge_one`, `_fold`) the parent's records
    that the child shadows (a record at the same place, or a whiteout of the inode)."""
    tops = list(tops)
    reach: set[int] = set()
    stack = list(tops)
    while stack:
        layer = stack.pop()
        if layer in reach or layer not in layers:
            continue
        reach.add(layer)
        stack.append(layers[layer]["parent"])
        stack.extend(src[0] for src in layers[layer]["vols"].values())
    released: Counter[bytes] = Counter()
    for layer in layers.keys() - reach:
        released.update(reads.layer(layer))
    parent = {layer: layers[layer]["parent"] for layer in reach}
    sources = {layer: [src[0] for src in layers[layer]["vols"].values()] for layer in reach}
    members = {layer: [layer] for layer in reach}  # a layer's records after folds, top first
    while True:
        users: dict[int, list[tuple[str, int]]] = {layer: [] for layer in parent}
        for layer in parent:
            if parent[layer] in users:
                users[parent[layer]].append(("child", layer))
            for src in sources[layer]:
                if src in users:
                    users[src].append(("import", layer))
        for top in tops:
            if top in users:
                users[top].append(("ns", top))
        fold = next((p for p, u in users.items() if len(u) == 1 and u[0][0] == "child"), None)
        if fold is None:
            return released
        child = users[fold][0][1]
        released.update(reads.shadowed(members[child], members[fold]))
        members[fold] = members.pop(child) + members[fold]
        sources[fold] = sources.pop(child)
        del parent[child]
        for layer in parent:
            if parent[layer] == child:
                parent[layer] = fold
            sources[layer] = [fold if src == child else src for src in sources[layer]]
        tops = [fold if top == child else top for top in tops]


def _shadowed(ctx: Ctx, t: lmdb.Transaction, child: list[int], parent: list[int]) -> Counter[bytes]:
    """The chunk references among `parent`'s records (its member layers, top first) that
    folding `child` onto it releases: those at a place where the child has a chunk-map
    record, and those of an inode the child whites out."""
    places: set[bytes] = set()  # vol|ino|index
    gone: set[bytes] = set()  # vol|ino
    for layer in child:
        prefix = R.layer_prefix(layer)
        places.update(key[8:] for key, _ in _records(t, ctx.db.cmap, prefix))
        gone.update(key[8:] for key, value in _records(t, ctx.db.inodes, prefix) if not value)
    out: Counter[bytes] = Counter()
    visible: dict[bytes, bytes] = {}  # the parent's record at each place it holds one
    for inode in gone:
        for layer in parent:
            for key, value in _records(t, ctx.db.cmap, R.layer_prefix(layer) + inode):
                visible.setdefault(key[8:], value)
    for place in places - visible.keys():
        for layer in parent:
            raw = t.get(R.layer_prefix(layer) + place, db=ctx.db.cmap)
            if raw is not None:
                visible[place] = bytes(raw)
                break
    for place, value in visible.items():
        if value and (place in places or place[:10] in gone):
            out[value[:_KEY_SIZE]] += 1
    return out


def _records(t: lmdb.Transaction, db: Any, prefix: bytes) -> Iterable[tuple[bytes, bytes]]:
    cur = t.cursor(db=db)
    if cur.set_range(prefix):
        for key, value in cur:
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key, bytes(value)
