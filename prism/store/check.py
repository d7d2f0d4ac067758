"""Integrity checking (`fsck`) of a Prism store; space reclamation is `prism.store.gc`.

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
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import lmdb
import xxhash

from prism.errors import Corrupt, StoreError
from prism.store import links, txn
from prism.store import records as R
from prism.store.compose import unmount
from prism.store.content import chunk_at, note_append
from prism.store.layers import (
    SHARE_VOL_BASE,
    SHARE_VOL_SPAN,
    View,
    all_layers,
    chain,
    load_layer,
    new_layer,
    ns_record,
    put_ns,
    reachable_layers,
    view_of,
)
from prism.store.quota import charged_bytes, check_rstats, set_usage
from prism.store.records import Inode
from prism.store.schema import DB_NAMES, REFERENCED, Ctx, get_meta, intact_records, staged_roots
from prism.store.sealed import DamagedRecord, SealedCursor, open_value
from prism.store.staging import staging_dead, stagings
from prism.store.store import Store
from prism.store.tree import get_inode, list_dir
from prism.store.types import CHUNK_SIZE, ROOT_INO, DirEntry, FileType, ObjectId

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


def _check_records(ctx: Ctx, t: lmdb.Transaction, report: FsckReport) -> dict[Any, set[bytes]]:
    """Open every record of every database; report each whose seal does not match (its bytes
    changed on disk) and each database LMDB cannot walk to its end. Returns the damaged
    keys by database."""
    damaged: dict[Any, set[bytes]] = {db: set() for db in ctx.db.all}
    for name, db in zip(DB_NAMES, ctx.db.all, strict=True):
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


def _check_names(ctx: Ctx, t: lmdb.Transaction, report: FsckReport, repair: bool) -> None:
    """The names index must map exactly every namespace's name to its id (MNT looks VMs up
    there). With `repair`, rebuild it from the namespace records (the authority)."""
    by_id = {R.U32.unpack(k)[0]: json.loads(v)["name"] for k, v in intact_records(t, ctx.db.ns)}
    names = {k: R.U32.unpack(v)[0] for k, v in intact_records(t, ctx.db.names) if len(v) == 4}
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
    stale = {bytes(k) for k, _ in cast(SealedCursor, t.cursor(db=ctx.db.names)).raw_items()}
    stale -= {name.encode() for name in by_id.values()}
    if not wrong and not stale:
        return
    for key in stale:
        t.delete(key, db=ctx.db.names)
    for ns_id, name in by_id.items():
        t.put(name.encode(), R.U32.pack(ns_id), db=ctx.db.names)
    report.repaired.append("rebuilt the names index from the namespace records")


def _good_copy(
    ctx: Ctx, t: lmdb.Transaction, digest: bytes, damaged: dict[bytes, int]
) -> bytes | None:
    """The bytes of another chunk record with this content hash that still verifies."""
    for key, value in intact_records(t, ctx.db.chunks, digest):
        if key[:16] != digest:
            break
        if key in damaged:
            continue
        segment, offset, length, _ = R.CHUNK_VAL.unpack(value)
        try:
            data = ctx.segments.read(segment, offset, length)
        except Corrupt:
            continue
        if xxhash.xxh3_128_digest(data) == digest:
            return data
    return None


def _verifies(ctx: Ctx, key: bytes, segment: int, offset: int, length: int) -> bool:
    try:
        data = ctx.segments.read(segment, offset, length)
    except Corrupt:
        return False
    return xxhash.xxh3_128_digest(data) == key[:16]


def _rebuild_segments(
    ctx: Ctx, t: lmdb.Transaction, damaged: set[bytes], report: FsckReport
) -> None:
    """Give every segment that holds chunks but lost its (damaged) record a new one:
    appended = the file's size, live = its chunks' bytes."""
    if not damaged:
        return
    live: Counter[int] = Counter()
    for _, value in intact_records(t, ctx.db.chunks):
        segment, _, length, refs = R.CHUNK_VAL.unpack(value)
        if refs:
            live[segment] += length
    known = {R.U64.unpack(k)[0] for k, _ in intact_records(t, ctx.db.segments)}
    for segment in live.keys() - known:
        size = ctx.segments.size_of(segment)
        t.put(R.U64.pack(segment), R.SEGMENT_VAL.pack(size, live[segment]), db=ctx.db.segments)
    report.repaired.append(f"rebuilt the records of {len(live.keys() - known)} segments")


def _damaged_ranges(
    ctx: Ctx, t: lmdb.Transaction, view: View, oid: ObjectId, size: int, lost: set[bytes]
) -> list[tuple[int, int]]:
    """The byte ranges [lo, hi) of a file whose chunks are in `lost`."""
    path = chain(ctx, t, view.top, oid.vol)
    out = []
    for index in range(-(-size // CHUNK_SIZE)):
        ref = chunk_at(ctx, t, path, oid.ino, index)
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
    held: Counter[tuple[int, int, int, int]] = field(default_factory=Counter)
    """(vol, ino, dir vol, dir ino) -> entries of the directory naming a hard-linked object"""
    intact: bool = True  # every directory could be listed


def _check_links(
    ctx: Ctx, t: lmdb.Transaction, view: View, tree: _Tree, report: FsckReport
) -> None:
    """In a lineage the hard-link index covers (`prism.store.links`), every
    non-directory's nlink equals the entries naming it, whatever its volume, and the index
    records exactly the links of those with more than one."""
    index = {v: links.indexed(ctx, t, view, v) for v in {vol for vol, _ in tree.objects}}
    where: dict[tuple[int, int], dict[tuple[int, int], int]] = {}
    for (v, i, dv, di), n in tree.held.items():
        where.setdefault((v, i), {})[(dv, di)] = n
    for (vol, ino), node in tree.objects.items():
        if node.type == FileType.DIR:
            continue
        named = tree.links[(vol, ino)]
        recorded = index[vol].pop(ino, {})
        held = where.get((vol, ino), {})
        if node.nlink != named or recorded != (held if named > 1 else {}):
            report.errors.append(
                f"namespace {view.name}: object {vol}:{ino} has nlink {node.nlink}, "
                f"{named} entries name it, in {held}, and the hard-link index records "
                f"{recorded}"
            )
    for vol, rest in index.items():
        for ino in rest:
            if (vol, ino) not in tree.objects:
                report.errors.append(
                    f"namespace {view.name}: the hard-link index names {vol}:{ino}, "
                    "which no entry names"
                )


def _cross_check(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
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
    if links.complete(ctx, t, view.top):
        _check_links(ctx, t, view, tree, report)
    stops = {(0, ino) for ns, ino in staged_roots(ctx, t) if ns == view.id}
    for error in check_rstats(ctx, t, tree.objects, stops):
        report.errors.append(f"namespace {view.name}: {error}")
    own = [layer for layer, v, _ in chain(ctx, t, view.top, 0) if v == 0]
    orphans = set()
    for layer in own:
        prefix = R.INODE_KEY.pack(layer, 0, 0)[:10]
        cur = t.cursor(db=ctx.db.inodes)
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
                and get_inode(ctx, t, view, 0, ino) is not None
            ):
                orphans.add((0, ino))
    for vol, ino in sorted(orphans):
        report.errors.append(
            f"namespace {view.name}: object {vol}:{ino} exists but no directory entry names "
            "it: its entry may be lost"
        )
    raw = t.get(R.U32.pack(view.id), db=ctx.db.usage)
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
    ctx = store.ctx
    t = txn.begin_write(ctx) if repair else txn.read_own(ctx)
    try:
        _fsck(ctx, t, report, repair, say)
    except BaseException:
        txn.aborted(ctx, t)
        raise
    if repair:
        txn.durable_commit(ctx, t)
    else:
        t.abort()
    return report


def _fsck(ctx: Ctx, t: lmdb.Transaction, report: FsckReport, repair: bool, say: Progress) -> None:
    say("verifying every metadata record")
    damaged_keys = _check_records(ctx, t, report)
    # Records present but damaged are not missing: nothing may be dropped on their account.
    damaged_layers = {R.U64.unpack(k)[0] for k in damaged_keys[ctx.db.layers] if len(k) == 8}
    _check_names(ctx, t, report, repair and not damaged_keys[ctx.db.ns])
    fixes_usage: list[int] = []
    layers = all_layers(ctx, t, tolerant=True)
    say(f"checking {len(layers)} layers")
    present = layers.keys() | damaged_layers  # damaged is not missing: nothing is dropped
    for layer, rec in layers.items():
        if rec["parent"] and rec["parent"] not in present:
            report.errors.append(f"layer {layer}: parent layer {rec['parent']} is missing")
        for vol, src in rec["vols"].items():
            if src[0] not in present:
                report.errors.append(f"layer {layer}: volume {vol} imports missing layer {src[0]}")
    for _, raw in intact_records(t, ctx.db.ns):
        rec = json.loads(raw)
        if rec["top"] not in present:
            report.errors.append(f"namespace {rec['name']}: top layer {rec['top']} is missing")
    reachable = reachable_layers(ctx, t, layers, tolerant=True)
    unreachable = set(layers) - reachable
    if unreachable:
        report.debris.append(f"{len(unreachable)} layers no namespace reaches (gc drops them)")
    abandoned = [token for token in stagings(ctx) if staging_dead(ctx, token)]
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
    for key, value in intact_records(t, ctx.db.cmap):
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
            indexed = t.get(chunk_key, db=ctx.db.chunks)
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
    stored_bytes = chunk_count = referenced = 0
    damaged: dict[bytes, int] = {}  # chunk key -> its correct refcount (bytes bad or missing)
    fixes: list[tuple[bytes, bytes]] = []
    for key, value in intact_records(t, ctx.db.chunks):
        segment, offset, length, count = R.CHUNK_VAL.unpack(value)
        want = refs.pop(key, 0)
        if count != want:
            report.errors.append(f"chunk {key.hex()}: refcount {count}, but {want} references")
            fixes.append((key, R.CHUNK_VAL.pack(segment, offset, length, want)))
        if want == 0:
            continue
        stored_bytes += length
        chunk_count += 1
        referenced += want * length
        report.checked_chunks += 1
        try:
            data = ctx.segments.read(segment, offset, length)
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
        if length and _verifies(ctx, key, segment, offset, length):
            report.errors.append(
                f"chunk {key.hex()}: its index record is missing or damaged; the chunk maps "
                "say where its (intact) bytes are, and `--repair` rebuilds it"
            )
            rebuilt.append((key, R.CHUNK_VAL.pack(segment, offset, length, count)))
            stored_bytes += length
            chunk_count += 1
            referenced += count * length
            continue
        report.errors.append(f"chunk {key.hex()}: {count} references but not in the index")
        damaged[key] = count
    if get_meta(ctx, t, b"stored_bytes") != stored_bytes:
        report.errors.append("stored-bytes counter is wrong")
    if get_meta(ctx, t, b"chunk_count") != chunk_count:
        report.errors.append("chunk counter is wrong")
    if get_meta(ctx, t, REFERENCED) != referenced:
        report.errors.append("referenced-bytes counter is wrong")
    copies = {key: _good_copy(ctx, t, key[:16], damaged) for key in damaged}
    lost = {key for key, data in copies.items() if data is None}
    for key in damaged.keys() - lost:
        if not repair:
            report.errors.append(
                f"chunk {key.hex()}: another chunk holds the same content; "
                "`prism fsck --repair` restores it from there"
            )

    say("walking namespaces")
    dangling: list[tuple[View, int, int, bytes]] = []
    mounts: list[tuple[View, int, int, DirEntry]] = []
    walked: set[int] = set()  # namespaces whose whole tree was read
    staged = staged_roots(ctx, t)
    hurt: dict[tuple[str, str], list[tuple[int, int]]] = {}  # (namespace, path) -> ranges
    for _, raw in intact_records(t, ctx.db.ns):
        rec = json.loads(raw)
        if rec["top"] not in layers:
            continue
        try:
            view = view_of(ctx, t, rec["id"])
            root = get_inode(ctx, t, view, 0, ROOT_INO)
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
                node = get_inode(ctx, t, view, 0, ino) if ns_id == view.id else None
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
                for entry in list_dir(ctx, t, view, vol, ino, 0):
                    oid = entry.oid
                    if oid.vol >= SHARE_VOL_BASE:  # a share's mount point (a directory)
                        mounts.append((view, vol, ino, entry))  # checked by `_check_shares`
                        tree.subdirs[(vol, ino)] += 1
                        continue
                    node = get_inode(ctx, t, view, oid.vol, oid.ino)
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
                    if node.type != FileType.DIR and node.nlink > 1:
                        tree.held[(oid.vol, oid.ino, vol, ino)] += 1
                    if node.type == FileType.DIR:
                        stack.append((oid.vol, oid.ino, path))
                    elif node.type == FileType.REG and lost:
                        ranges = _damaged_ranges(ctx, t, view, oid, node.size, lost)
                        if ranges:
                            hurt.setdefault((view.name, path), []).extend(ranges)
            except Corrupt as exc:
                tree.intact = False
                report.errors.append(f"namespace {view.name}: directory {where or '/'}: {exc}")
        if tree.intact:
            walked.add(view.id)
            try:
                _cross_check(ctx, t, view, tree, report, fixes_usage)
            except Corrupt as exc:
                report.errors.append(f"namespace {view.name}: {exc}")
    for (ns_name, path), ranges in sorted(hurt.items()):
        spans = ", ".join(f"{lo}-{hi - 1}" for lo, hi in _merged(ranges))
        report.damaged.append(f"{ns_name}:{path} bytes {spans}")
        report.errors.append(
            f"{report.damaged[-1]}: damaged, and no other copy exists; reads of those bytes "
            "fail with EIO until they are rewritten (restore the file from a backup)"
        )

    _check_shares(ctx, t, report, repair, mounts, walked)

    on_disk = set(ctx.segments.list_ids())
    known = {R.U64.unpack(k)[0] for k, _ in intact_records(t, ctx.db.segments)}
    known |= {R.U64.unpack(k)[0] for k in damaged_keys[ctx.db.segments] if len(k) == 8}
    stray = on_disk - known
    if stray:
        report.debris.append(f"{len(stray)} segment files no committed chunk names")

    if not repair:
        return
    # Records derived from others are rebuilt; first the damaged ones go.
    for db in (ctx.db.chunks, ctx.db.segments, ctx.db.usage):
        for key in damaged_keys[db]:
            t.delete(key, db=db)
    for key, value in rebuilt:
        t.put(key, value, db=ctx.db.chunks)
    if rebuilt:
        report.repaired.append(f"rebuilt {len(rebuilt)} chunk index records from the chunk maps")
    if damaged_keys[ctx.db.usage]:
        report.repaired.append(
            f"dropped {len(damaged_keys[ctx.db.usage])} damaged usage records "
            "(they are recounted when next needed)"
        )
    _rebuild_segments(ctx, t, damaged_keys[ctx.db.segments], report)
    for key, value in fixes:
        t.put(key, value, db=ctx.db.chunks)
    if fixes:
        report.repaired.append(f"fixed {len(fixes)} chunk refcounts")
    for key in bad_cmap:
        t.delete(key, db=ctx.db.cmap)
    for key, value in relocate:
        t.put(key, value, db=ctx.db.cmap)
    if relocate:
        report.repaired.append(f"pointed {len(relocate)} chunk-map records where the index says")
    for ns_id in fixes_usage:
        set_usage(ctx, t, ns_id, 0, 0, False)
    if fixes_usage:
        report.repaired.append(f"marked {len(fixes_usage)} usage records for recounting")
    moved: dict[bytes, tuple[int, int]] = {}
    for key, copy in copies.items():
        if copy is None:
            continue
        segment, offset = ctx.segments.append(copy)
        note_append(ctx, t, segment, offset, len(copy))
        if t.get(key, db=ctx.db.chunks) is None:
            stored_bytes += len(copy)
            chunk_count += 1
            referenced += damaged[key] * len(copy)
        t.put(key, R.CHUNK_VAL.pack(segment, offset, len(copy), damaged[key]), db=ctx.db.chunks)
        moved[key] = (segment, offset)
    if moved:
        updates = []
        for key, value in intact_records(t, ctx.db.cmap):
            if value:
                digest, seq, length, _, _ = R.CMAP_VAL.unpack(value)
                target = moved.get(R.CHUNK_KEY.pack(digest, seq))
                if target is not None:
                    updates.append((bytes(key), R.CMAP_VAL.pack(digest, seq, length, *target)))
        for key, value in updates:
            t.put(key, value, db=ctx.db.cmap)
        report.repaired.append(
            f"restored {len(moved)} damaged or missing chunks from other copies of their content"
        )
    if lost:
        report.repaired.append(
            f"left {len(lost)} damaged chunks with no other copy in place, so that reads of "
            f"them keep failing with EIO (not zeros) in: {'; '.join(report.damaged)}"
        )
    for view, vol, ino, name in dangling:
        t.put(R.dirent_key(view.top, vol, ino, name), R.WHITEOUT, db=ctx.db.dirents)
    if dangling:
        report.repaired.append(f"removed {len(dangling)} entries pointing at missing objects")
    counters = ((b"stored_bytes", stored_bytes), (b"chunk_count", chunk_count))
    for counter, count in (*counters, (REFERENCED, referenced)):
        t.put(counter, R.U64.pack(count), db=ctx.db.meta)


def _check_shares(
    ctx: Ctx,
    t: lmdb.Transaction,
    report: FsckReport,
    repair: bool,
    mounts: list[tuple[View, int, int, DirEntry]],
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
        elif _source_gone(ctx, t, share["src"]):
            problem = "is a share of a VM that was removed"
        else:
            try:
                node = get_inode(ctx, t, view, vol, entry.oid.ino)
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
                view.top = new_layer(ctx, t, view.top, load_layer(ctx, t, view.top))
                view.record = dict(view.record, top=view.top)
                put_ns(ctx, t, view.record)
            unmount(ctx, t, view, dvol, dino, entry.name)
            report.repaired.append(
                f"namespace {view.name}: {entry.name!r} in {dvol}:{dino} is an empty "
                "directory instead of a dangling share"
            )
    for _, raw in intact_records(t, ctx.db.ns):
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
            put_ns(ctx, t, dict(rec, shares=kept))
            report.repaired.append(
                f"namespace {rec['name']}: dropped {len(shares) - len(kept)} shares"
            )


def _source_gone(ctx: Ctx, t: lmdb.Transaction, ns_id: int) -> bool:
    """Whether a share's source namespace was removed (a damaged record is not "removed":
    `_check_records` reports it, and nothing is repaired on its account)."""
    try:
        return ns_record(ctx, t, ns_id) is None
    except Corrupt:
        return False
