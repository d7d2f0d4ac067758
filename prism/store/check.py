"""Integrity checking (`fsck`) and space reclamation (`gc`) for a Prism store.

fsck verifies, in one read-consistent pass:
  * every layer's parent and import sources exist;
  * every chunk's refcount equals the number of chunk-map records (in existing layers) that
    name it, and the store's stored-bytes and chunk counters match the chunk index;
  * every referenced chunk exists in its segment with the right length and xxh3-128 hash;
  * no namespace reaches a missing object (each directory entry resolves to an inode).
Findings that a crash can legitimately leave (segment bytes no chunk names, layers no
namespace reaches, zero-reference chunks) are reported as *debris*, not errors: `gc` removes
them. `repair=True` fixes refcounts and counters and drops directory entries that point at missing
objects. A damaged or missing chunk is restored from another copy of the same content when
one exists (another chunk record with the same hash whose bytes verify): the copy is appended
to a segment and the chunk record and every chunk-map record naming the chunk move there.
Damage is never turned into zeros: a chunk with no other copy stays referenced, so reads of
it keep failing with EIO, and fsck lists every file (namespace:path) and byte range it
spoils (`FsckReport.damaged`), in the same run.

gc, in one write transaction: drops layers no namespace reaches (releasing their chunk
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

from prism.errors import Corrupt
from prism.store import records as R
from prism.store.store import SHARE_VOL_BASE, Store, _View
from prism.store.types import CHUNK_SIZE, ROOT_INO, FileType, ObjectId

COMPACT_BELOW = 0.5
"""Compact a segment when less than this fraction of its bytes is live."""

Progress = Callable[[str], None]


@dataclass
class FsckReport:
    errors: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    """Files (namespace:path and byte ranges) whose content is damaged with no other copy."""
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


def _good_copy(
    store: Store, t: lmdb.Transaction, digest: bytes, damaged: dict[bytes, int]
) -> bytes | None:
    """The bytes of another chunk record with this content hash that still verifies."""
    cur = t.cursor(db=store._chunks)
    if not cur.set_range(digest):
        return None
    for key, value in cur:
        if bytes(key[:16]) != digest:
            break
        if bytes(key) in damaged:
            continue
        segment, offset, length, _ = R.CHUNK_VAL.unpack(value)
        try:
            data = store.segments.read(segment, offset, length)
        except Corrupt:
            continue
        if xxhash.xxh3_128_digest(data) == digest:
            return data
    return None


def _note_append(store: Store, t: lmdb.Transaction, segment: int, offset: int, length: int):
    """Account `length` live bytes appended at `offset` of `segment` in the segments db."""
    seg_key = R.U64.pack(segment)
    raw = t.get(seg_key, db=store._segdb)
    appended, live = R.SEGMENT_VAL.unpack(raw) if raw else (0, 0)
    t.put(
        seg_key, R.SEGMENT_VAL.pack(max(appended, offset + length), live + length), db=store._segdb
    )


def _damaged_ranges(
    store: Store, t: lmdb.Transaction, view: _View, oid: ObjectId, size: int, lost: set[bytes]
) -> list[tuple[int, int]]:
    """The byte ranges [lo, hi) of a file whose chunks are in `lost`."""
    path = store._path(t, view.top, oid.vol)
    out = []
    for index in range(-(-size // CHUNK_SIZE)):
        ref = store._chunk_at(t, path, oid.ino, index)
        if ref is not None and ref.key in lost:
            lo = index * CHUNK_SIZE
            out.append((lo, min(size, lo + ref.length)))
    return out


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def fsck(store: Store, *, repair: bool = False, progress: Progress | None = None) -> FsckReport:
    report = FsckReport()
    say = progress or (lambda _msg: None)
    if store.in_batch:
        store.commit()
    txn = store._begin_write() if repair else store._env.begin()
    try:
        _fsck(store, txn, report, repair, say)
    except BaseException:
        txn.abort()
        raise
    if repair:
        store.segments.sync()
        txn.commit()
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
    damaged: dict[bytes, int] = {}  # chunk key -> its correct refcount (bytes bad or missing)
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
            damaged[key] = want
            continue
        if xxhash.xxh3_128_digest(data) != key[:16]:
            report.errors.append(f"chunk {key.hex()}: content does not match its hash")
            damaged[key] = want
    for key, count in refs.items():
        report.errors.append(f"chunk {key.hex()}: {count} references but not in the index")
        damaged[key] = count
    if store._get_meta(t, b"stored_bytes") != stored_bytes:
        report.errors.append("stored-bytes counter is wrong")
    if store._get_meta(t, b"chunk_count") != chunk_count:
        report.errors.append("chunk counter is wrong")
    copies = {key: _good_copy(store, t, key[:16], damaged) for key in damaged}
    lost = {key for key, data in copies.items() if data is None}
    for key in damaged.keys() - lost:
        if not repair:
            report.errors.append(
                f"chunk {key.hex()}: another chunk holds the same content; "
                "`prism fsck --repair` restores it from there"
            )

    say("walking namespaces")
    dangling: list[tuple[_View, int, int, bytes]] = []
    hurt: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (namespace, path) -> ranges
    for _, raw in t.cursor(db=store._ns):
        rec = json.loads(bytes(raw))
        if rec["top"] not in layers:
            continue
        view = store._view(t, rec["id"])
        seen: set[tuple[int, int]] = set()
        stack = [(0, ROOT_INO, "")]
        if store._inode(t, view, 0, ROOT_INO) is None:
            report.errors.append(f"namespace {view.name}: root directory is missing")
            continue
        while stack:
            vol, ino, where = stack.pop()
            if (vol, ino) in seen:
                continue
            seen.add((vol, ino))
            report.checked_objects += 1
            for entry in store._list(t, view, vol, ino, 0):
                node = store._inode(t, view, entry.oid.vol, entry.oid.ino)
                path = f"{where}/{entry.name.decode(errors='replace')}"
                if node is None:
                    report.errors.append(
                        f"namespace {view.name}: entry {entry.name!r} in directory "
                        f"{vol}:{ino} points at a missing object"
                    )
                    dangling.append((view, vol, ino, entry.name))
                elif entry.oid.vol >= SHARE_VOL_BASE:
                    continue  # shares: checked at their source
                elif node.type == FileType.DIR:
                    stack.append((entry.oid.vol, entry.oid.ino, path))
                elif node.type == FileType.REG and lost:
                    ranges = _damaged_ranges(store, t, view, entry.oid, node.size, lost)
                    if ranges:
                        hurt.setdefault((view.name, path), []).extend(ranges)
    for (ns_name, path), ranges in sorted(hurt.items()):
        spans = ", ".join(f"{lo}-{hi - 1}" for lo, hi in _merged(ranges))
        report.damaged.append(f"{ns_name}:{path} bytes {spans}")
        report.errors.append(
            f"{report.damaged[-1]}: damaged, and no other copy exists; reads of those bytes "
            "fail with EIO until they are rewritten (restore the file from a backup)"
        )

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
    moved: dict[bytes, tuple[int, int]] = {}
    for key, copy in copies.items():
        if copy is None:
            continue
        segment, offset = store.segments.append(copy)
        _note_append(store, t, segment, offset, len(copy))
        if t.get(key, db=store._chunks) is None:
            stored_bytes += len(copy)
            chunk_count += 1
        t.put(key, R.CHUNK_VAL.pack(segment, offset, len(copy), damaged[key]), db=store._chunks)
        moved[key] = (segment, offset)
    if moved:
        updates = []
        for key, value in t.cursor(db=store._cmap):
            if value:
                digest, seq, length, _, _ = R.CMAP_VAL.unpack(value)
                target = moved.get(R.CHUNK_KEY.pack(digest, seq))
                if target is not None:
                    updates.append((bytes(key), R.CMAP_VAL.pack(digest, seq, length, *target)))
        for key, value in updates:
            t.put(key, value, db=store._cmap)
        report.repaired.append(
            f"restored {len(moved)} damaged or missing chunks from other copies of their content"
        )
    if lost:
        report.repaired.append(
            f"left {len(lost)} damaged chunks with no other copy in place, so that reads of "
            f"them keep failing with EIO (not zeros) in: {'; '.join(report.damaged)}"
        )
    for view, vol, ino, name in dangling:
        t.put(R.dirent_key(view.top, vol, ino, name), R.WHITEOUT, db=store._dirents)
    if dangling:
        report.repaired.append(f"removed {len(dangling)} entries pointing at missing objects")
    for counter, count in ((b"stored_bytes", stored_bytes), (b"chunk_count", chunk_count)):
        t.put(counter, R.U64.pack(count), db=store._meta)


def gc(store: Store, *, progress: Progress | None = None) -> GcReport:
    report = GcReport()
    say = progress or (lambda _msg: None)
    if store.in_batch:
        store.commit()
    locked: list[int] = []
    t = store._begin_write()
    try:
        doomed_segments = _gc(store, t, report, say, locked)
        store.segments.sync()
    except BaseException:
        t.abort()
        for fd in locked:
            os.close(fd)
        raise
    t.commit()
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
    for seg_id in set(store.segments.list_ids()) | set(known):
        appended = known.get(seg_id, (0, 0))[0]
        live = live_by_segment.get(seg_id, 0)
        if live and appended and live >= COMPACT_BELOW * appended:
            if seg_id in known and known[seg_id][1] != live:
                t.put(R.U64.pack(seg_id), R.SEGMENT_VAL.pack(appended, live), db=store._segdb)
            continue
        fd = store.segments.try_lock(seg_id)
        if fd is None:
            continue
        locked.append(fd)
        for key, offset, length in chunks_by_segment.get(seg_id, []):
            data = store.segments.read(seg_id, offset, length)
            new_seg, new_off = store.segments.append(data)
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
