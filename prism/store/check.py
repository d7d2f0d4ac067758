"""Integrity checking (`fsck`) and space reclamation (`gc`) for a Prism store.

fsck verifies, in one read-consistent pass:
  * every record of every database matches its seal (`prism.store.sealed`); later checks
    skip damaged records, and nothing is dropped on their account;
  * the names index maps exactly every namespace's name to it (repair rebuilds it);
  * every layer's parent and import sources exist;
  * every share mount point is a live share of its namespace and every share is mounted
    (`_check_shares`; repair turns dangling mount points into empty directories);
  * every chunk's refcount equals the number of chunk-map records (in existing layers) that
    name it, and the store's stored-bytes and chunk counters match the chunk index;
  * every referenced chunk exists in its segment with the right length and xxh3-128 hash;
  * no namespace reaches a missing object (each directory entry resolves to an inode);
  * what a damaged B-tree page would lose without a trace shows in the counts: chunk-map
    records agree with the chunk index on where a chunk lives, each directory's nlink is 2 +
    its subdirectories, each object of a namespace's own volume is named by as many entries
    as its nlink says, and the usage record's object and byte counts equal the tree's.
Findings that a crash can legitimately leave (segment bytes no chunk names, layers no
namespace reaches, zero-reference chunks) are reported as *debris*, not errors: `gc` removes
them. `repair=True` fixes refcounts and counters, drops directory entries that point at
missing objects, points chunk-map records where the chunk index says, has wrong usage records
recounted and rebuilds what other records determine: the names index (from the namespace
records), chunk index records (from the chunk maps, when the bytes there verify), segment and
usage records. Other damaged records are left in place: they are refused when read, and
restoring what they held is the operator's call. A damaged or missing chunk is
restored from another copy of the same content when one exists (another chunk record with the
same hash whose bytes verify): the copy is appended to a segment and the chunk record and
every chunk-map record naming the chunk move there.
Damage is never turned into zeros: a chunk with no other copy stays referenced, so reads of
it keep failing with EIO, and fsck lists every file (namespace:path) and byte range it
spoils (`FsckReport.damaged`), in the same run.

gc works in bounded steps: each step is a write transaction of its own (the store's write
lock is held only during it, so a server's writes get in between steps), and stops after
STEP_SECONDS or STEP_RECORDS records, whichever comes first. Every step re-reads what it
decides on, since others write between steps. In order:
  1. discard what imports that died had staged (`Store.reap_stagings`, bounded steps too);
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import lmdb
import xxhash

from prism.errors import Corrupt, NoSpace, StoreError
from prism.store import records as R
from prism.store.records import Inode
from prism.store.sealed import DamagedRecord, SealedCursor, open_value
from prism.store.store import (
    DB_NAMES,
    SHARE_VOL_BASE,
    SHARE_VOL_SPAN,
    Store,
    _View,
    charged_bytes,
)
from prism.store.types import CHUNK_SIZE, ROOT_INO, DirEntry, FileType, ObjectId

COMPACT_BELOW = 0.5
"""Compact a segment when less than this fraction of its bytes is live."""
STEP_SECONDS = 0.25
"""gc commits a step (and releases the write lock) once it has worked this long..."""
STEP_RECORDS = 20000
"""...or deleted this many records or copied this many chunks, whichever comes first."""

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
    checked_records: int = 0

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


def _all_layers(store: Store, t: lmdb.Transaction, *, tolerant: bool = False) -> dict[int, dict]:
    records = _records(t, store._layers) if tolerant else t.cursor(db=store._layers)
    return {R.U64.unpack(k)[0]: json.loads(bytes(v)) for k, v in records}


def _reachable_layers(
    store: Store, t: lmdb.Transaction, layers: dict[int, dict], *, tolerant: bool = False
) -> set[int]:
    records = _records(t, store._ns) if tolerant else t.cursor(db=store._ns)
    stack = [json.loads(bytes(v))["top"] for _, v in records]
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


def _records(
    t: lmdb.Transaction, db: Any, start: bytes | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """Every intact record of `db` (from `start`), in key order: fsck's own passes skip the
    damaged ones, which `_check_records` has reported."""
    try:
        yield from cast(SealedCursor, t.cursor(db=db)).intact(start)
    except Corrupt:
        return


def _check_records(store: Store, t: lmdb.Transaction, report: FsckReport) -> dict[Any, set[bytes]]:
    """Open every record of every database; report each whose seal does not match (its bytes
    changed on disk) and each database LMDB cannot walk to its end. Returns the damaged
    keys by database."""
    damaged: dict[Any, set[bytes]] = {db: set() for db in store._dbs}
    for name, db in zip(DB_NAMES, store._dbs, strict=True):
        cur = cast(SealedCursor, t.cursor(db=db))
        try:
            for key, stored in cur.raw_items():
                report.checked_records += 1
                try:
                    open_value(cur.index, key, stored)
                except DamagedRecord:
                    damaged[db].add(bytes(key))
                    report.errors.append(
                        f"{name} record {bytes(key).hex()}: damaged on disk (its checksum does "
                        "not match); it is refused when read"
                    )
        except Corrupt as exc:
            report.errors.append(f"{name} database: {exc}")
    return damaged


def _check_names(store: Store, t: lmdb.Transaction, report: FsckReport, repair: bool) -> None:
    """The names index must map exactly every namespace's name to its id (MNT looks VMs up
    there). With `repair`, rebuild it from the namespace records (the authority)."""
    by_id = {R.U32.unpack(k)[0]: json.loads(v)["name"] for k, v in _records(t, store._ns)}
    names = {k: R.U32.unpack(v)[0] for k, v in _records(t, store._names) if len(v) == 4}
    wrong = 0
    for ns_id, name in sorted(by_id.items()):
        if names.get(name.encode()) != ns_id:
            wrong += 1
            report.errors.append(f"names index: {name!r} (namespace {ns_id}) is missing or wrong")
    for key, ns_id in sorted(names.items()):
        if by_id.get(ns_id) != key.decode(errors="replace"):
            wrong += 1
            report.errors.append(f"names index: {key!r} names no namespace of that name")
    if not repair:
        return
    stale = {bytes(k) for k, _ in cast(SealedCursor, t.cursor(db=store._names)).raw_items()}
    stale -= {name.encode() for name in by_id.values()}
    if not wrong and not stale:
        return
    for key in stale:
        t.delete(key, db=store._names)
    for ns_id, name in by_id.items():
        t.put(name.encode(), R.U32.pack(ns_id), db=store._names)
    report.repaired.append("rebuilt the names index from the namespace records")


def _good_copy(
    store: Store, t: lmdb.Transaction, digest: bytes, damaged: dict[bytes, int]
) -> bytes | None:
    """The bytes of another chunk record with this content hash that still verifies."""
    for key, value in _records(t, store._chunks, digest):
        if key[:16] != digest:
            break
        if key in damaged:
            continue
        segment, offset, length, _ = R.CHUNK_VAL.unpack(value)
        try:
            data = store.segments.read(segment, offset, length)
        except Corrupt:
            continue
        if xxhash.xxh3_128_digest(data) == digest:
            return data
    return None


def _verifies(store: Store, key: bytes, segment: int, offset: int, length: int) -> bool:
    try:
        data = store.segments.read(segment, offset, length)
    except Corrupt:
        return False
    return xxhash.xxh3_128_digest(data) == key[:16]


def _rebuild_segments(
    store: Store, t: lmdb.Transaction, damaged: set[bytes], report: FsckReport
) -> None:
    """Give every segment that holds chunks but lost its (damaged) record a new one:
    appended = the file's size, live = its chunks' bytes."""
    if not damaged:
        return
    live: Counter[int] = Counter()
    for _, value in _records(t, store._chunks):
        segment, _, length, refs = R.CHUNK_VAL.unpack(value)
        if refs:
            live[segment] += length
    known = {R.U64.unpack(k)[0] for k, _ in _records(t, store._segdb)}
    for segment in live.keys() - known:
        size = store.segments.size_of(segment)
        t.put(R.U64.pack(segment), R.SEGMENT_VAL.pack(size, live[segment]), db=store._segdb)
    report.repaired.append(f"rebuilt the records of {len(live.keys() - known)} segments")


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


@dataclass
class _Tree:
    """What a walk of one namespace reached (share volumes excluded)."""

    objects: dict[tuple[int, int], Inode]  # (vol, ino) -> its inode
    links: Counter[tuple[int, int]] = field(default_factory=Counter)  # entries naming it
    subdirs: Counter[tuple[int, int]] = field(default_factory=Counter)  # directory entries in it
    intact: bool = True  # every directory could be listed


def _cross_check(
    store: Store,
    t: lmdb.Transaction,
    view: _View,
    tree: _Tree,
    report: FsckReport,
    fixes_usage: list[int],
) -> None:
    """Compare what the walk found with what the records say it should find: a damaged
    B-tree page loses records silently (entries vanish from listings), and these counts
    are how that shows. Each directory's nlink is 2 + its subdirectories; every live object
    of the namespace's own volume is named by an entry; the usage record's object and byte
    counts equal the tree's."""
    for (vol, ino), node in tree.objects.items():
        if node.type == FileType.DIR and node.nlink != 2 + tree.subdirs[(vol, ino)]:
            report.errors.append(
                f"namespace {view.name}: directory {vol}:{ino} has nlink {node.nlink} but "
                f"{tree.subdirs[(vol, ino)]} subdirectories: entries may be lost"
            )
        elif node.type != FileType.DIR and vol == 0 and node.nlink != tree.links[(vol, ino)]:
            report.errors.append(
                f"namespace {view.name}: object {vol}:{ino} has nlink {node.nlink} but "
                f"{tree.links[(vol, ino)]} entries name it: entries may be lost"
            )
    own = [layer for layer, v, _ in store._path(t, view.top, 0) if v == 0]
    orphans = set()
    for layer in own:
        prefix = R.INODE_KEY.pack(layer, 0, 0)[:10]
        cur = t.cursor(db=store._inodes)
        if not cur.set_range(prefix):
            continue
        for key, value in cur:
            if not bytes(key).startswith(prefix):
                break
            ino = R.INODE_KEY.unpack(key)[2]
            if (
                value
                and (0, ino) not in tree.objects
                and (0, ino) not in orphans
                and store._inode(t, view, 0, ino) is not None
            ):
                orphans.add((0, ino))
    for vol, ino in sorted(orphans):
        report.errors.append(
            f"namespace {view.name}: object {vol}:{ino} exists but no directory entry names "
            "it: its entry may be lost"
        )
    raw = t.get(R.U32.pack(view.id), db=store._usage)
    if raw is not None:
        nbytes, objects, valid = R.USAGE_VAL.unpack(raw)
        found = (
            sum(charged_bytes(n) for n in tree.objects.values()),
            len(tree.objects),
        )
        if valid and (nbytes, objects) != found:
            report.errors.append(
                f"namespace {view.name}: usage counts {objects} objects and {nbytes} bytes, "
                f"the tree holds {found[1]} and {found[0]}: entries may be lost"
            )
            fixes_usage.append(view.id)


def fsck(store: Store, *, repair: bool = False, progress: Progress | None = None) -> FsckReport:
    report = FsckReport()
    say = progress or (lambda _msg: None)
    if store.in_batch:
        store.commit()
    txn = store._begin_write() if repair else store._snapshot()
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
    say("verifying every metadata record")
    damaged_keys = _check_records(store, t, report)
    # Records present but damaged are not missing: nothing may be dropped on their account.
    damaged_layers = {R.U64.unpack(k)[0] for k in damaged_keys[store._layers] if len(k) == 8}
    _check_names(store, t, report, repair and not damaged_keys[store._ns])
    fixes_usage: list[int] = []
    layers = _all_layers(store, t, tolerant=True)
    say(f"checking {len(layers)} layers")
    present = layers.keys() | damaged_layers  # damaged is not missing: nothing is dropped
    for layer, rec in layers.items():
        if rec["parent"] and rec["parent"] not in present:
            report.errors.append(f"layer {layer}: parent layer {rec['parent']} is missing")
        for vol, src in rec["vols"].items():
            if src[0] not in present:
                report.errors.append(f"layer {layer}: volume {vol} imports missing layer {src[0]}")
    for _, raw in _records(t, store._ns):
        rec = json.loads(raw)
        if rec["top"] not in present:
            report.errors.append(f"namespace {rec['name']}: top layer {rec['top']} is missing")
    reachable = _reachable_layers(store, t, layers, tolerant=True)
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
    relocate: list[tuple[bytes, bytes]] = []  # chunk-map records that disagree with the index
    unindexed: dict[bytes, tuple[int, int, int]] = {}  # chunk key -> where chunk maps say
    for key, value in _records(t, store._cmap):
        if not value:
            continue
        layer = R.U64.unpack_from(key)[0]
        if layer not in present:
            report.errors.append(f"chunk map record of missing layer {layer}")
            bad_cmap.append(bytes(key))
            continue
        digest, seq, length, segment, offset = R.CMAP_VAL.unpack(value)
        chunk_key = R.CHUNK_KEY.pack(digest, seq)
        refs[chunk_key] += 1
        try:
            indexed = t.get(chunk_key, db=store._chunks)
        except Corrupt:
            indexed = None  # a damaged record (reported): the chunk maps may restore it
        if indexed is None:
            unindexed.setdefault(chunk_key, (segment, offset, length))
        else:
            isegment, ioffset, ilength, _ = R.CHUNK_VAL.unpack(indexed)
            if (isegment, ioffset, ilength) != (segment, offset, length):
                report.errors.append(
                    f"chunk map record {bytes(key).hex()}: names chunk {chunk_key.hex()} at "
                    "another place than the chunk index does"
                )
                relocate.append(
                    (bytes(key), R.CMAP_VAL.pack(digest, seq, ilength, isegment, ioffset))
                )

    say(f"verifying {len(refs)} referenced chunks")
    stored_bytes = chunk_count = 0
    damaged: dict[bytes, int] = {}  # chunk key -> its correct refcount (bytes bad or missing)
    fixes: list[tuple[bytes, bytes]] = []
    for key, value in _records(t, store._chunks):
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
    rebuilt: list[tuple[bytes, bytes]] = []  # index records the chunk maps restore
    for key, count in refs.items():
        segment, offset, length = unindexed.get(key, (0, 0, 0))
        if length and _verifies(store, key, segment, offset, length):
            report.errors.append(
                f"chunk {key.hex()}: its index record is missing or damaged; the chunk maps "
                "say where its (intact) bytes are, and `--repair` rebuilds it"
            )
            rebuilt.append((key, R.CHUNK_VAL.pack(segment, offset, length, count)))
            stored_bytes += length
            chunk_count += 1
            continue
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
    mounts: list[tuple[_View, int, int, DirEntry]] = []
    walked: set[int] = set()  # namespaces whose whole tree was read
    staged = store.staged_roots(t)
    hurt: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (namespace, path) -> ranges
    for _, raw in _records(t, store._ns):
        rec = json.loads(raw)
        if rec["top"] not in layers:
            continue
        try:
            view = store._view(t, rec["id"])
            root = store._inode(t, view, 0, ROOT_INO)
        except Corrupt as exc:
            report.errors.append(f"namespace {rec['name']}: {exc}")
            continue
        if root is None:
            report.errors.append(f"namespace {view.name}: root directory is missing")
            continue
        seen: set[tuple[int, int]] = set()
        tree = _Tree({(0, ROOT_INO): root})
        stack = [(0, ROOT_INO, "")]
        for ns_id, ino in staged:  # an import's tree, linked from nowhere until published
            try:
                node = store._inode(t, view, 0, ino) if ns_id == view.id else None
            except Corrupt as exc:
                tree.intact = False
                report.errors.append(f"namespace {view.name}: staged import {ino}: {exc}")
                continue
            if node is not None:
                tree.objects[(0, ino)] = node
                stack.append((0, ino, f"/(import staged in directory {ino})"))
        while stack:
            vol, ino, where = stack.pop()
            if (vol, ino) in seen:
                continue
            seen.add((vol, ino))
            report.checked_objects += 1
            try:
                for entry in store._list(t, view, vol, ino, 0):
                    oid = entry.oid
                    if oid.vol >= SHARE_VOL_BASE:  # a share's mount point (a directory)
                        mounts.append((view, vol, ino, entry))  # checked by `_check_shares`
                        tree.subdirs[(vol, ino)] += 1
                        continue
                    node = store._inode(t, view, oid.vol, oid.ino)
                    path = f"{where}/{entry.name.decode(errors='replace')}"
                    if node is None:
                        report.errors.append(
                            f"namespace {view.name}: entry {entry.name!r} in directory "
                            f"{vol}:{ino} points at a missing object"
                        )
                        dangling.append((view, vol, ino, entry.name))
                        continue
                    if node.type == FileType.DIR:
                        tree.subdirs[(vol, ino)] += 1
                    tree.objects[(oid.vol, oid.ino)] = node
                    tree.links[(oid.vol, oid.ino)] += 1
                    if node.type == FileType.DIR:
                        stack.append((oid.vol, oid.ino, path))
                    elif node.type == FileType.REG and lost:
                        ranges = _damaged_ranges(store, t, view, oid, node.size, lost)
                        if ranges:
                            hurt.setdefault((view.name, path), []).extend(ranges)
            except Corrupt as exc:
                tree.intact = False
                report.errors.append(f"namespace {view.name}: directory {where or '/'}: {exc}")
        if tree.intact:
            walked.add(view.id)
            try:
                _cross_check(store, t, view, tree, report, fixes_usage)
            except Corrupt as exc:
                report.errors.append(f"namespace {view.name}: {exc}")
    for (ns_name, path), ranges in sorted(hurt.items()):
        spans = ", ".join(f"{lo}-{hi - 1}" for lo, hi in _merged(ranges))
        report.damaged.append(f"{ns_name}:{path} bytes {spans}")
        report.errors.append(
            f"{report.damaged[-1]}: damaged, and no other copy exists; reads of those bytes "
            "fail with EIO until they are rewritten (restore the file from a backup)"
        )

    _check_shares(store, t, report, repair, mounts, walked)

    on_disk = set(store.segments.list_ids())
    known = {R.U64.unpack(k)[0] for k, _ in _records(t, store._segdb)}
    known |= {R.U64.unpack(k)[0] for k in damaged_keys[store._segdb] if len(k) == 8}
    stray = on_disk - known
    if stray:
        report.debris.append(f"{len(stray)} segment files no committed chunk names")

    if not repair:
        return
    # Records derived from others are rebuilt; first the damaged ones go.
    for db in (store._chunks, store._segdb, store._usage):
        for key in damaged_keys[db]:
            t.delete(key, db=db)
    for key, value in rebuilt:
        t.put(key, value, db=store._chunks)
    if rebuilt:
        report.repaired.append(f"rebuilt {len(rebuilt)} chunk index records from the chunk maps")
    if damaged_keys[store._usage]:
        report.repaired.append(
            f"dropped {len(damaged_keys[store._usage])} damaged usage records "
            "(they are recounted when next needed)"
        )
    _rebuild_segments(store, t, damaged_keys[store._segdb], report)
    for key, value in fixes:
        t.put(key, value, db=store._chunks)
    if fixes:
        report.repaired.append(f"fixed {len(fixes)} chunk refcounts")
    for key in bad_cmap:
        t.delete(key, db=store._cmap)
    for key, value in relocate:
        t.put(key, value, db=store._cmap)
    if relocate:
        report.repaired.append(f"pointed {len(relocate)} chunk-map records where the index says")
    for ns_id in fixes_usage:
        store._set_usage(t, ns_id, 0, 0, False)
    if fixes_usage:
        report.repaired.append(f"marked {len(fixes_usage)} usage records for recounting")
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
        for key, value in _records(t, store._cmap):
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


def _check_shares(
    store: Store,
    t: lmdb.Transaction,
    report: FsckReport,
    repair: bool,
    mounts: list[tuple[_View, int, int, DirEntry]],
    walked: set[int],
) -> None:
    """Shares: every share mount point met in a namespace's tree (`mounts`: view, directory
    volume and inode, entry) is a share that namespace lists, at that place, whose source VM
    and directory exist; and every share a namespace lists is mounted. A dangling mount
    point (left by older snapshots, clones or `vm rm`) is repaired into an empty directory
    (in a new private top layer for a snapshot, whose top layer others share) and the
    shares that are not mounted are dropped from their namespace (only for the namespaces
    in `walked`, whose whole tree was read: elsewhere a damaged directory may hide a mount)."""
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
        elif _source_gone(store, t, share["src"]):
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
    for _, raw in _records(t, store._ns):
        rec = json.loads(raw)
        if rec["id"] not in walked:  # its tree was not read whole: mounts may be unseen
            continue
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


def _source_gone(store: Store, t: lmdb.Transaction, ns_id: int) -> bool:
    """Whether a share's source namespace was removed (a damaged record is not "removed":
    `_check_records` reports it, and nothing is repaired on its account)."""
    try:
        return store._ns_record(t, ns_id) is None
    except Corrupt:
        return False


def gc(store: Store, *, progress: Progress | None = None) -> GcReport:
    report = GcReport()
    say = progress or (lambda _msg: None)
    if store.in_batch:
        store.commit()
    say(f"discarded {store.reap_stagings()} trees staged by imports that died")
    say("dropping unreachable layers")
    while _step(store, lambda t: _drop_step(store, t, report)):
        pass
    say(f"dropped {report.layers_dropped} unreachable layers")
    say("merging layers that only one namespace still uses")
    while _step(store, lambda t: _merge_step(store, t, report)):
        pass
    say("freeing unreferenced chunks")
    resume: list[bytes] = [b""]
    while _step(store, lambda t: _free_step(store, t, report, resume)):
        pass
    say("compacting segments")
    tried: set[int] = set()
    while _compact_step(store, report, tried):
        pass
    return report


def _step(store: Store, work: Callable[[lmdb.Transaction], bool]) -> bool:
    """Run `work` in a write transaction of its own (the write lock held only meanwhile);
    return whether it found work, so that the caller runs another step."""
    t = store._begin_write()
    try:
        more = work(t)
    except BaseException:
        store._aborted(t)
        raise
    store._durable_commit(t)
    store.forget_layers()
    return more


def _over(began: float, done: int) -> bool:
    return done >= STEP_RECORDS or time.monotonic() - began >= STEP_SECONDS


def _drop_step(store: Store, t: lmdb.Transaction, report: GcReport) -> bool:
    """Delete records of unreachable layers (and release their chunks), a bounded number;
    a layer's own record goes with its last records. Only a layer no other layer names
    (as parent or import source) is dropped, so every remaining layer's parent exists.
    Returns whether unreachable layers remain."""
    began = time.monotonic()
    layers = _all_layers(store, t)
    dead = set(layers) - _reachable_layers(store, t, layers)
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
        for db in (store._inodes, store._dirents, store._cmap):
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
                if db is store._cmap and value:
                    store._unref_chunk(t, R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(value)[:2]))
            done += len(doomed)
            if not finished:
                return True
        t.delete(R.U64.pack(layer), db=store._layers)
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


def _merge_step(store: Store, t: lmdb.Transaction, report: GcReport) -> bool:
    """Fold one layer into its parent (one transaction per fold); whether one was folded."""
    if not _merge_one(store, t, _all_layers(store, t)):
        return False
    report.layers_merged += 1
    return True


def _free_step(store: Store, t: lmdb.Transaction, report: GcReport, resume: list[bytes]) -> bool:
    """Delete zero-reference chunks (as read now: a chunk referenced again meanwhile stays)
    from `resume[0]` on, a bounded number; return whether the index has more to visit."""
    began = time.monotonic()
    freed: list[tuple[bytes, int]] = []
    cur = t.cursor(db=store._chunks)
    more = False
    if cur.set_range(resume[0]):  # b"": from the first key
        for key, value in cur:
            if _over(began, len(freed)):
                resume[0] = bytes(key)
                more = True
                break
            _, _, length, refs = R.CHUNK_VAL.unpack(value)
            if refs == 0:
                freed.append((bytes(key), length))
    for key, length in freed:
        t.delete(key, db=store._chunks)
        report.bytes_reclaimed += length
    report.chunks_freed += len(freed)
    return more


def _compact_step(store: Store, report: GcReport, tried: set[int]) -> bool:
    """One step of compaction: in one write transaction, pick the emptiest segments not yet
    `tried` and, until the step's budget is spent (at least one segment), drop a segment
    no chunk names or copy a mostly-garbage one's live chunks into this process's segment;
    then fdatasync, commit the moved chunk and chunk-map records, and only after that delete
    the old files. Returns whether segments may remain."""
    began = time.monotonic()
    locked: list[int] = []
    t = store._begin_write()
    try:
        doomed, more = _compact(store, t, report, tried, locked, began)
    except BaseException:
        store._aborted(t)
        for fd in locked:
            os.close(fd)
        raise
    try:
        store._durable_commit(t)
        store.forget_layers()
        # Only now, with the moves committed, may the old segment files go.
        for seg_id in doomed:
            store.segments.remove(seg_id)
    finally:
        for fd in locked:
            os.close(fd)
    return more


def _compact(
    store: Store,
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
    zero_by_segment: dict[int, list[tuple[bytes, int]]] = {}
    for key, value in t.cursor(db=store._chunks):
        segment, offset, length, refs = R.CHUNK_VAL.unpack(value)
        if refs == 0:
            zero_by_segment.setdefault(segment, []).append((bytes(key), length))
            continue
        live_by_segment[segment] += length
        chunks_by_segment.setdefault(segment, []).append((bytes(key), offset, length))
    pending: list[int] = []
    moved: dict[tuple[int, int], tuple[int, int]] = {}
    known = {R.U64.unpack(k)[0]: R.SEGMENT_VAL.unpack(v) for k, v in t.cursor(db=store._segdb)}
    # Emptiest first: dropping dead segments needs no room, and compaction (which may use the
    # metadata reserve) stops at the first append that finds the disk full.
    candidates = sorted(
        (set(store.segments.list_ids()) | set(known)) - tried,
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
                t.put(R.U64.pack(seg_id), R.SEGMENT_VAL.pack(appended, live), db=store._segdb)
            continue
        fd = store.segments.try_lock(seg_id)
        if fd is None:
            continue
        locked.append(fd)
        moved_bytes = 0
        disk_full = False
        for key, offset, length in chunks_by_segment.get(seg_id, []):
            data = store.segments.read(seg_id, offset, length)
            try:
                new_seg, new_off = store.segments.append(data, use_reserve=True)
            except NoSpace:
                disk_full = True  # the chunks moved so far stay moved; the segment stays
                break
            copied += 1
            moved_bytes += length
            moved[(seg_id, offset)] = (new_seg, new_off)
            refs = R.CHUNK_VAL.unpack(t.get(key, db=store._chunks) or bytes(28))[3]
            t.put(key, R.CHUNK_VAL.pack(new_seg, new_off, length, refs), db=store._chunks)
            _note_append(store, t, new_seg, new_off, length)
        if disk_full:
            if seg_id in known:
                t.put(
                    R.U64.pack(seg_id),
                    R.SEGMENT_VAL.pack(appended, live - moved_bytes),
                    db=store._segdb,
                )
            tried.update(candidates[position:])
            break
        # Chunks released since the freeing steps name this segment too: they go with it.
        for key, length in zero_by_segment.get(seg_id, []):
            t.delete(key, db=store._chunks)
            report.chunks_freed += 1
            report.bytes_reclaimed += length
        if live:
            report.segments_compacted += 1
        else:
            report.segments_removed += 1
        report.bytes_reclaimed += max(0, store.segments.size_of(seg_id) - live)
        t.delete(R.U64.pack(seg_id), db=store._segdb)
        pending.append(seg_id)
        copied += 1
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
    return pending, False


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
            if db is store._inodes and not value:
                _drop_shadowed_chunks(store, t, target)
            old = t.get(target, db=db)
            if db is store._cmap and old:
                store._unref_chunk(t, R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(old)[:2]))
            vol = R.U32.unpack(b"\0\0" + key[8:10])[0]
            if not value and base and str(vol) not in native:
                if old is not None:
                    t.delete(target, db=db)
            else:
                t.put(target, value, db=db)


def _drop_shadowed_chunks(store: Store, t: lmdb.Transaction, prefix: bytes) -> None:
    """An inode whiteout reaches layer|vol|ino `prefix`: the chunk-map records there are
    shadowed by it for good (a removed file leaves no per-chunk whiteouts), so they go and
    release their chunks."""
    cur = t.cursor(db=store._cmap)
    doomed = []
    if cur.set_range(prefix):
        for key, value in cur:
            if not bytes(key).startswith(prefix):
                break
            doomed.append((bytes(key), bytes(value)))
    for key, value in doomed:
        t.delete(key, db=store._cmap)
        if value:
            store._unref_chunk(t, R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(value)[:2]))
