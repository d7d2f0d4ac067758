"""Integrity checking (`fsck`) and space reclamation (`gc`) for a Prism store.

fsck verifies, in one read-consistent pass:
  * every layer's parent and import sources exist;
  * every share mount point is a live share of its namespace and every share is mounted
    (`_check_shares`; repair turns dangling mount points into empty directories);
  * every chunk's refcount equals the number of chunk-map records (in existing layers) that
    name it, and the store's stored-bytes and chunk counters match the chunk index;
  * every referenced chunk exists in its segment with the right length and xxh3-128 hash;
  * no namespace reaches a missing object (each directory entry resolves to an inode).
Findings that a crash can legitimately leave (segment bytes no chunk names, layers no
namespace reaches, zero-reference chunks) are reported as *debris*, not errors: `gc` removes
them. `repair=True` fixes refcounts and counters, drops directory entries that point at
missing objects and turns chunk-map records that name missing or damaged chunks into holes
(reported: that data is lost).

gc first discards what imports that died had staged (`Store.reap_stagings`), then, in
one write transaction: drops layers no namespace reaches (releasing their chunk
references), deletes zero-reference chunks, then compacts segments that are mostly garbage
by copying their live chunks into a fresh segment (fdatasync before the commit that moves
them) and deletes segment files no committed chunk names. Segments locked by a live writer
are never touched.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import lmdb
import xxhash

from prism.errors import NoSpace, StoreError
from prism.store import records as R
from prism.store.store import SHARE_VOL_BASE, SHARE_VOL_SPAN, Store, _View
from prism.store.types import ROOT_INO, DirEntry, FileType

COMPACT_BELOW = 0.5
"""Compact a segment when less than this fraction of its bytes is live."""

Progress = Callable[[str], None]


@dataclass
class FsckReport:
    errors: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    debris: list[str] = field(default_factory=list)
    checked_objects: int = 0
    checked_chunks: int = 0

    @property
    def clean(self) -> bool:
        return not self.errors


@dataclass
class GcReport:
    layers_merged: int = 0
    layers_dropped: int = 0
    chunks_freed: int = 0
    segments_removed: int = 0
    segments_compacted: int = 0
    bytes_reclaimed: int = 0


def _all_layers(store: Store, t: lmdb.Transaction) -> dict[int, dict]:
    return {R.U64.unpack(k)[0]: json.loads(bytes(v)) for k, v in t.cursor(db=store._layers)}


def _reachable_layers(store: Store, t: lmdb.Transaction, layers: dict[int, dict]) -> set[int]:
    stack = [json.loads(bytes(v))["top"] for _, v in t.cursor(db=store._ns)]
    seen: set[int] = set()
    while stack:
        layer = stack.pop()
        if layer in seen or layer not in layers:
            continue
        seen.add(layer)
        rec = layers[layer]
        if rec["parent"]:
            stack.append(rec["parent"])
        stack.extend(src[0] for src in rec["vols"].values())
    return seen


def fsck(store: Store, *, repair: bool = False, progress: Progress | None = None) -> FsckReport:
    report = FsckReport()
    say = progress or (lambda _msg: None)
    if store.in_batch:
        store.commit()
    txn = store._begin_write() if repair else store._env.begin()
    try:
        _fsck(store, txn, report, repair, say)
    except BaseException:
        store._aborted(txn)
        raise
    if repair:
        store._durable_commit(txn)
    else:
        txn.abort()
    return report


def _fsck(
    store: Store, t: lmdb.Transaction, report: FsckReport, repair: bool, say: Progress
) -> None:
    layers = _all_layers(store, t)
    say(f"checking {len(layers)} layers")
    for layer, rec in layers.items():
        if rec["parent"] and rec["parent"] not in layers:
            report.errors.append(f"layer {layer}: parent layer {rec['parent']} is missing")
        for vol, src in rec["vols"].items():
            if src[0] not in layers:
                report.errors.append(f"layer {layer}: volume {vol} imports missing layer {src[0]}")
    for _, raw in t.cursor(db=store._ns):
        rec = json.loads(bytes(raw))
        if rec["top"] not in layers:
            report.errors.append(f"namespace {rec['name']}: top layer {rec['top']} is missing")
    reachable = _reachable_layers(store, t, layers)
    unreachable = set(layers) - reachable
    if unreachable:
        report.debris.append(f"{len(unreachable)} layers no namespace reaches (gc drops them)")
    abandoned = [token for token in store._stagings() if store._staging_dead(token)]
    if abandoned:
        report.debris.append(
            f"{len(abandoned)} trees staged by imports that died (gc or the next import "
            "removes them)"
        )

    say("counting chunk references")
    refs: Counter[bytes] = Counter()
    bad_cmap: list[bytes] = []
    for key, value in t.cursor(db=store._cmap):
        if not value:
            continue
        layer = R.U64.unpack_from(key)[0]
        if layer not in layers:
            report.errors.append(f"chunk map record of missing layer {layer}")
            bad_cmap.append(bytes(key))
            continue
        refs[R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(value)[:2])] += 1

    say(f"verifying {len(refs)} referenced chunks")
    stored_bytes = chunk_count = 0
    damaged: set[bytes] = set()
    fixes: list[tuple[bytes, bytes]] = []
    for key, value in t.cursor(db=store._chunks):
        key = bytes(key)
        segment, offset, length, count = R.CHUNK_VAL.unpack(value)
        want = refs.pop(key, 0)
        if count != want:
            report.errors.append(f"chunk {key.hex()}: refcount {count}, but {want} references")
            fixes.append((key, R.CHUNK_VAL.pack(segment, offset, length, want)))
        if want == 0:
            continue
        stored_bytes += length
        chunk_count += 1
        report.checked_chunks += 1
        try:
            data = store.segments.read(segment, offset, length)
        except Exception as exc:
            report.errors.append(f"chunk {key.hex()}: unreadable ({exc})")
            damaged.add(key)
            continue
        if xxhash.xxh3_128_digest(data) != key[:16]:
            report.errors.append(f"chunk {key.hex()}: content does not match its hash")
            damaged.add(key)
    for key, count in refs.items():
        report.errors.append(f"chunk {key.hex()}: {count} references but not in the index")
        damaged.add(key)
    if store._get_meta(t, b"stored_bytes") != stored_bytes:
        report.errors.append("stored-bytes counter is wrong")
    if store._get_meta(t, b"chunk_count") != chunk_count:
        report.errors.append("chunk counter is wrong")

    say("walking namespaces")
    dangling: list[tuple[_View, int, int, bytes]] = []
    mounts: list[tuple[_View, int, int, DirEntry]] = []
    for _, raw in t.cursor(db=store._ns):
        rec = json.loads(bytes(raw))
        if rec["top"] not in layers:
            continue
        view = store._view(t, rec["id"])
        seen: set[tuple[int, int]] = set()
        stack = [(0, ROOT_INO)]
        if store._inode(t, view, 0, ROOT_INO) is None:
            report.errors.append(f"namespace {view.name}: root directory is missing")
            continue
        while stack:
            vol, ino = stack.pop()
            if (vol, ino) in seen:
                continue
            seen.add((vol, ino))
            report.checked_objects += 1
            for entry in store._list(t, view, vol, ino, 0):
                if entry.oid.vol >= SHARE_VOL_BASE:
                    mounts.append((view, vol, ino, entry))  # checked by `_check_shares`
                    continue
                node = store._inode(t, view, entry.oid.vol, entry.oid.ino)
                if node is None:
                    report.errors.append(
                        f"namespace {view.name}: entry {entry.name!r} in directory "
                        f"{vol}:{ino} points at a missing object"
                    )
                    dangling.append((view, vol, ino, entry.name))
                elif node.type == FileType.DIR and entry.oid.vol < SHARE_VOL_BASE:
                    stack.append((entry.oid.vol, entry.oid.ino))  # shares: checked at source

    _check_shares(store, t, report, repair, mounts)

    on_disk = set(store.segments.list_ids())
    known = {R.U64.unpack(k)[0] for k, _ in t.cursor(db=store._segdb)}
    stray = on_disk - known
    if stray:
        report.debris.append(f"{len(stray)} segment files no committed chunk names")

    if not repair:
        return
    for key, value in fixes:
        t.put(key, value, db=store._chunks)
    if fixes:
        report.repaired.append(f"fixed {len(fixes)} chunk refcounts")
    for key in bad_cmap:
        t.delete(key, db=store._cmap)
    if damaged:
        lost = 0
        for key, value in list(t.cursor(db=store._cmap)):
            if value and R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(value)[:2]) in damaged:
                t.put(bytes(key), R.WHITEOUT, db=store._cmap)
                lost += 1
        report.repaired.append(
            f"turned {lost} references to {len(damaged)} missing or damaged chunks into holes "
            "(that data is lost)"
        )
    for view, vol, ino, name in dangling:
        t.put(R.dirent_key(view.top, vol, ino, name), R.WHITEOUT, db=store._dirents)
    if dangling:
        report.repaired.append(f"removed {len(dangling)} entries pointing at missing objects")
    for counter, count in ((b"stored_bytes", stored_bytes), (b"chunk_count", chunk_count)):
        t.put(counter, R.U64.pack(count), db=store._meta)


def _check_shares(
    store: Store,
    t: lmdb.Transaction,
    report: FsckReport,
    repair: bool,
    mounts: list[tuple[_View, int, int, DirEntry]],
) -> None:
    """Shares: every share mount point met in a namespace's tree (`mounts`: view, directory
    volume and inode, entry) is a share that namespace lists, at that place, whose source VM
    and directory exist; and every share a namespace lists is mounted. A dangling mount
    point (left by older snapshots, clones or `vm rm`) is repaired into an empty directory
    (in a new private top layer for a snapshot, whose top layer others share) and the
    shares that are not mounted are dropped from their namespace."""
    mounted: dict[int, set[int]] = {}
    private: set[int] = set()  # snapshots given a private top layer by this repair
    for view, dvol, dino, entry in mounts:
        vol = entry.oid.vol
        share = next(
            (sh for sh in view.record.get("shares", ()) if 0 <= vol - sh["base"] < SHARE_VOL_SPAN),
            None,
        )
        problem = None
        if share is None:
            problem = f"is a share mount point, but {view.name} has no such share"
        elif (share["at"], share["name"].encode(), share["root"]) != (
            [dvol, dino],
            entry.name,
            [vol - share["base"], entry.oid.ino],
        ):
            problem = "is a share mount point that does not match its share"
        elif store._ns_record(t, share["src"]) is None:
            problem = "is a share of a VM that was removed"
        else:
            try:
                node = store._inode(t, view, vol, entry.oid.ino)
            except StoreError:
                node = None
            if node is None or node.type != FileType.DIR:
                problem = "is a share whose source directory is gone"
        if problem is None and share is not None:
            mounted.setdefault(view.id, set()).add(share["base"])
            continue
        report.errors.append(f"namespace {view.name}: {entry.name!r} in {dvol}:{dino} {problem}")
        if repair:
            if view.kind == "snapshot" and view.id not in private:
                private.add(view.id)
                view.top = store._new_layer(t, view.top, store._layer(t, view.top))
                view.record = dict(view.record, top=view.top)
                store._put_ns(t, view.record)
            store._unmount(t, view, dvol, dino, entry.name)
            report.repaired.append(
                f"namespace {view.name}: {entry.name!r} in {dvol}:{dino} is an empty "
                "directory instead of a dangling share"
            )
    for _, raw in t.cursor(db=store._ns):
        rec = json.loads(bytes(raw))
        shares = rec.get("shares", ())
        kept = [sh for sh in shares if sh["base"] in mounted.get(rec["id"], ())]
        for sh in shares:
            if sh not in kept:
                report.errors.append(
                    f"namespace {rec['name']}: the share at {sh['path']} is not mounted there"
                )
        if repair and len(kept) != len(shares):
            store._put_ns(t, dict(rec, shares=kept))
            report.repaired.append(
                f"namespace {rec['name']}: dropped {len(shares) - len(kept)} shares"
            )


def gc(store: Store, *, progress: Progress | None = None) -> GcReport:
    report = GcReport()
    say = progress or (lambda _msg: None)
    if store.in_batch:
        store.commit()
    say(f"discarded {store.reap_stagings()} trees staged by imports that died")
    locked: list[int] = []
    t = store._begin_write()
    try:
        doomed_segments = _gc(store, t, report, say, locked)
        store.segments.sync()
    except BaseException:
        store._aborted(t)
        for fd in locked:
            os.close(fd)
        raise
    store._durable_commit(t)
    store.forget_layers()
    # Only now, with the moves committed, may the old segment files go.
    for seg_id in doomed_segments:
        store.segments.remove(seg_id)
    for fd in locked:
        os.close(fd)
    store.segments.roll_if_full()
    return report


def _gc(
    store: Store, t: lmdb.Transaction, report: GcReport, say: Progress, locked: list[int]
) -> list[int]:
    """Do gc's metadata work; return the segment files to delete once it commits."""
    layers = _all_layers(store, t)
    dead = set(layers) - _reachable_layers(store, t, layers)
    say(f"dropping {len(dead)} unreachable layers")
    for layer in dead:
        layers.pop(layer)
    for layer in dead:
        prefix = R.layer_prefix(layer)
        for db in (store._inodes, store._dirents, store._cmap):
            cur = t.cursor(db=db)
            doomed = []
            if cur.set_range(prefix):
                for key, value in cur:
                    if not bytes(key).startswith(prefix):
                        break
                    doomed.append((bytes(key), bytes(value)))
            for key, value in doomed:
                t.delete(key, db=db)
                if db is store._cmap and value:
                    store._unref_chunk(t, R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(value)[:2]))
        t.delete(R.U64.pack(layer), db=store._layers)
        report.layers_dropped += 1

    say("merging layers that only one namespace still uses")
    while _merge_one(store, t, layers):
        report.layers_merged += 1

    say("freeing unreferenced chunks")
    live_by_segment: Counter[int] = Counter()
    chunks_by_segment: dict[int, list[tuple[bytes, int, int]]] = {}
    freed = []
    for key, value in t.cursor(db=store._chunks):
        segment, offset, length, refs = R.CHUNK_VAL.unpack(value)
        if refs == 0:
            freed.append(bytes(key))
            report.bytes_reclaimed += length
            continue
        live_by_segment[segment] += length
        chunks_by_segment.setdefault(segment, []).append((bytes(key), offset, length))
    for key in freed:
        t.delete(key, db=store._chunks)
    report.chunks_freed = len(freed)

    say("compacting segments")
    pending: list[int] = []
    moved: dict[tuple[int, int], tuple[int, int]] = {}
    known = {R.U64.unpack(k)[0]: R.SEGMENT_VAL.unpack(v) for k, v in t.cursor(db=store._segdb)}
    # Emptiest first: dropping dead segments needs no room, and compaction (which may use the
    # metadata reserve) stops at the first append that finds the disk full.
    disk_full = False
    for seg_id in sorted(
        set(store.segments.list_ids()) | set(known), key=lambda s: live_by_segment.get(s, 0)
    ):
        appended = known.get(seg_id, (0, 0))[0]
        live = live_by_segment.get(seg_id, 0)
        if live and (disk_full or (appended and live >= COMPACT_BELOW * appended)):
            if seg_id in known and known[seg_id][1] != live:
                t.put(R.U64.pack(seg_id), R.SEGMENT_VAL.pack(appended, live), db=store._segdb)
            continue
        fd = store.segments.try_lock(seg_id)
        if fd is None:
            continue
        locked.append(fd)
        moved_bytes = 0
        for key, offset, length in chunks_by_segment.get(seg_id, []):
            data = store.segments.read(seg_id, offset, length)
            try:
                new_seg, new_off = store.segments.append(data, use_reserve=True)
            except NoSpace:
                disk_full = True  # the chunks moved so far stay moved; the segment stays
                break
            moved_bytes += length
            moved[(seg_id, offset)] = (new_seg, new_off)
            refs = R.CHUNK_VAL.unpack(t.get(key, db=store._chunks) or bytes(28))[3]
            t.put(key, R.CHUNK_VAL.pack(new_seg, new_off, length, refs), db=store._chunks)
            seg_key = R.U64.pack(new_seg)
            raw = t.get(seg_key, db=store._segdb)
            app, liv = R.SEGMENT_VAL.unpack(raw) if raw else (0, 0)
            t.put(
                seg_key,
                R.SEGMENT_VAL.pack(max(app, new_off + length), liv + length),
                db=store._segdb,
            )
        if disk_full:
            if seg_id in known:
                t.put(
                    R.U64.pack(seg_id),
                    R.SEGMENT_VAL.pack(appended, live - moved_bytes),
                    db=store._segdb,
                )
            continue
        if live:
            report.segments_compacted += 1
        else:
            report.segments_removed += 1
        report.bytes_reclaimed += max(0, store.segments.size_of(seg_id) - live)
        t.delete(R.U64.pack(seg_id), db=store._segdb)
        pending.append(seg_id)
    if moved:
        updates = []
        for key, value in t.cursor(db=store._cmap):
            if not value:
                continue
            digest, seq, length, segment, offset = R.CMAP_VAL.unpack(value)
            target = moved.get((segment, offset))
            if target is not None:
                updates.append(
                    (bytes(key), R.CMAP_VAL.pack(digest, seq, length, target[0], target[1]))
                )
        for key, value in updates:
            t.put(key, value, db=store._cmap)
    return pending


def _merge_one(store: Store, t: lmdb.Transaction, layers: dict[int, dict]) -> bool:
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
    for _, raw in t.cursor(db=store._ns):
        ns = json.loads(bytes(raw))
        tops[ns["id"]] = ns
        if ns["top"] in users:
            users[ns["top"]].append(("ns", ns["id"]))
    for parent, refs in users.items():
        if len(refs) != 1 or refs[0][0] != "child":
            continue
        child = refs[0][1]
        _fold(store, t, child, parent, layers)
        for ns in tops.values():
            if ns["top"] == child:
                store._put_ns(t, dict(ns, top=parent))
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
                store._put_layer(t, layer, rec)
        merged = dict(layers[child], parent=layers[parent]["parent"])
        store._put_layer(t, parent, merged)
        layers[parent] = merged
        t.delete(R.U64.pack(child), db=store._layers)
        layers.pop(child)
        store.forget_layers()
        return True
    return False


def _fold(store: Store, t: lmdb.Transaction, child: int, parent: int, layers: dict) -> None:
    base = layers[parent]["parent"] == 0
    native = layers[parent]["vols"]
    lprefix = R.layer_prefix(child)
    new_prefix = R.layer_prefix(parent)
    for db in (store._inodes, store._dirents, store._cmap):
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
            old = t.get(target, db=db)
            if db is store._cmap and old:
                store._unref_chunk(t, R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(old)[:2]))
            vol = R.U32.unpack(b"\0\0" + key[8:10])[0]
            if not value and base and str(vol) not in native:
                if old is not None:
                    t.delete(target, db=db)
            else:
                t.put(target, value, db=db)
