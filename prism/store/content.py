"""File content: fixed-size chunks, inline dedup, the chunk map, and segment accounting.

A file is cut into fixed, offset-aligned chunks of CHUNK_SIZE (128 KiB). Fixed alignment
(rather than content-defined chunking) keeps random writes cheap: a write touches only the
chunks it overlaps, so a 4 KiB write into a shared 1 GiB file reads, patches and stores one
chunk and adds one chunk-map record (`cmap`: layer|vol|ino|index -> chunk) to the writer's
top layer; identical files and identical aligned regions of partially identical files share
chunks. Chunks are keyed by xxh3-128 of their bytes and deduplicated inline; since xxh3 is not
collision-resistant and a VM may be an adversary, a hash hit also compares length and bytes,
and a genuine collision gets the next `seq`. All-zero chunks are stored as holes (no record,
or a whiteout over a lower layer's chunk). A chunk's refcount is the number of chunk-map
records (in any existing layer) that name it; `stored_bytes` and `chunk_count` in `meta` sum
the chunks with references, `referenced_bytes` their lengths times their refcounts (the
content as written: dedup saves `referenced_bytes - stored_bytes`). A segment's record
counts the bytes appended to it and the live bytes its chunks hold, which `gc` compacts by.

Crash ordering (see `txn`): chunk bytes are appended to this process's segment before the
transaction that names them commits, and that commit fdatasyncs the segment first.

Damage. A chunk whose bytes no longer match its hash is refused (`Corrupt`: EIO on the
wire), never served: each chunk is verified whole, once per fetch, and counted in
`Ctx.damaged_reads` and logged once with the file and byte range. A lone chunk read is
kept verified in the segments' read cache (bounded in bytes, `segments`, "Read cache"): a
chunk verified once is then served from memory, and damage to its bytes on disk afterwards
shows at the next read that misses the cache, and in `prism fsck`. `fsck --repair` restores a
chunk from another copy of its content and never turns damage into zeros.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lmdb
import xxhash

from prism.errors import Corrupt
from prism.store import records as R
from prism.store.layers import PathEntry, View, chain
from prism.store.schema import REFERENCED, Ctx, add_meta
from prism.store.segments import DamagedChunk
from prism.store.tree import lower_has
from prism.store.types import CHUNK_SIZE, ObjectId

ZEROS = bytes(CHUNK_SIZE)
log = logging.getLogger("prism.store")


@dataclass(frozen=True, slots=True)
class ChunkRef:
    key: bytes  # hash 16 | seq u32
    length: int
    segment: int
    offset: int


def chunk_ref(raw: bytes | memoryview) -> ChunkRef:
    digest, seq, length, segment, offset = R.CMAP_VAL.unpack(raw)
    return ChunkRef(R.CHUNK_KEY.pack(digest, seq), length, segment, offset)


def store_chunk(
    ctx: Ctx, t: lmdb.Transaction, content: bytes, counts: dict[bytes, int] | None = None
) -> tuple[bytes, int, int]:
    """Find or add `content`; take a reference. Returns (chunk key, segment, offset).
    With `counts`, the meta counters' differences are added there (see `add_counts`)."""
    digest = xxhash.xxh3_128_digest(content)
    length = len(content)
    cur = t.cursor(db=ctx.db.chunks)
    seq = 0
    if cur.set_range(digest):
        for key, value in cur:
            key = bytes(key)
            if key[:16] != digest:
                break
            seq = R.CHUNK_KEY.unpack(key)[1] + 1
            segment, offset, clen, refs = R.CHUNK_VAL.unpack(value)
            if clen == length and ctx.segments.read(segment, offset, clen) == content:
                _count(ctx, t, counts, length if refs == 0 else 0, 0 if refs else 1, length)
                t.put(key, R.CHUNK_VAL.pack(segment, offset, clen, refs + 1), db=ctx.db.chunks)
                return key, segment, offset
    segment, offset = ctx.segments.append(content)
    key = R.CHUNK_KEY.pack(digest, seq)
    t.put(key, R.CHUNK_VAL.pack(segment, offset, length, 1), db=ctx.db.chunks)
    note_append(ctx, t, segment, offset, length)
    _count(ctx, t, counts, length, 1, length)
    return key, segment, offset


def unref_chunk(
    ctx: Ctx, t: lmdb.Transaction, key: bytes, counts: dict[bytes, int] | None = None
) -> None:
    raw = t.get(key, db=ctx.db.chunks)
    if raw is None:
        return
    segment, offset, length, refs = R.CHUNK_VAL.unpack(raw)
    referenced = -length if refs else 0
    if refs <= 1:
        refs = 0
        _count(ctx, t, counts, -length, -1, referenced)
    else:
        refs -= 1
        _count(ctx, t, counts, 0, 0, referenced)
    t.put(key, R.CHUNK_VAL.pack(segment, offset, length, refs), db=ctx.db.chunks)


_COUNTERS = (b"stored_bytes", b"chunk_count", REFERENCED)


def _count(ctx: Ctx, t: lmdb.Transaction, counts: dict[bytes, int] | None, *deltas: int) -> None:
    """Add (stored bytes, chunks, referenced bytes) to the meta counters, or to `counts`."""
    for name, delta in zip(_COUNTERS, deltas, strict=True):
        if delta:
            if counts is None:
                add_meta(ctx, t, name, delta)
            else:
                counts[name] = counts.get(name, 0) + delta


def add_counts(ctx: Ctx, t: lmdb.Transaction, counts: dict[bytes, int]) -> None:
    """Add what `store_chunk` and `unref_chunk` gathered in `counts`: one read and write
    per counter that changed (a chunk rewritten in place changes `chunk_count` by 0)."""
    for name, delta in counts.items():
        if delta:
            add_meta(ctx, t, name, delta)


def chunk_at(
    ctx: Ctx, t: lmdb.Transaction, path: tuple[PathEntry, ...], ino: int, index: int
) -> ChunkRef | None:
    for layer, v, _ in path:
        raw = t.get(R.cmap_key(layer, v, ino, index), db=ctx.db.cmap)
        if raw is not None:
            return chunk_ref(raw) if raw else None
    return None


def _chunk_bytes(
    ctx: Ctx, ref: ChunkRef | None, view: View, vol: int, ino: int, index: int
) -> bytes:
    """Chunk `index` of the file, verified (b"" for a hole)."""
    if ref is None:
        return b""
    return _read_run(ctx, view, vol, ino, index, [ref])


def _read_run(ctx: Ctx, view: View, vol: int, ino: int, first: int, refs: list[ChunkRef]) -> bytes:
    """Whole chunks `first`, `first`+1... of a file, adjacent in one segment, read in one
    pread and each verified against its hash. Damage raises Corrupt, after it is counted
    in `damaged_reads` and logged once per chunk with the file and byte range. A lone
    chunk goes through the read cache (`SegmentFiles.read_chunk`): small reads of a chunk
    then fetch and hash it once, not once per read."""
    head = refs[0]
    try:
        if len(refs) == 1:
            return ctx.segments.read_chunk(head.segment, head.offset, head.length, head.key[:16])
        return ctx.segments.read_chunks(
            head.segment, head.offset, [(r.length, r.key[:16]) for r in refs]
        )
    except DamagedChunk as exc:
        ref = refs[exc.position]
        lo = (first + exc.position) * CHUNK_SIZE
        where = (
            f"{view.name}: file {ObjectId(view.id, vol, ino).fileid}, "
            f"bytes {lo}-{lo + ref.length - 1} (chunk {ref.key.hex()})"
        )
        ctx.damaged_reads += 1
        if ref.key not in ctx.damage_logged:
            if len(ctx.damage_logged) > 4096:
                ctx.damage_logged.clear()
            ctx.damage_logged.add(ref.key)
            log.error("damaged content in %s: %s; reads of it fail with EIO", where, exc)
        raise Corrupt(
            f"damaged content in {where}; run `prism fsck --repair` to restore it "
            "from another copy or list the damaged files"
        ) from None


def _set_chunk(
    ctx: Ctx,
    t: lmdb.Transaction,
    top: int,
    path: tuple[PathEntry, ...],
    vol: int,
    ino: int,
    index: int,
    content: bytes,
    counts: dict[bytes, int] | None = None,
) -> None:
    key = R.cmap_key(top, vol, ino, index)
    old = t.get(key, db=ctx.db.cmap)
    old_key = chunk_ref(old).key if old else None
    if _all_zero(content):
        if lower_has(t, path, ctx.db.cmap, lambda layer, v: R.cmap_key(layer, v, ino, index)):
            t.put(key, R.WHITEOUT, db=ctx.db.cmap)
        elif old is not None:
            t.delete(key, db=ctx.db.cmap)
    else:
        chunk_key, segment, offset = store_chunk(ctx, t, content, counts)
        digest, seq = R.CHUNK_KEY.unpack(chunk_key)
        t.put(
            key,
            R.CMAP_VAL.pack(digest, seq, len(content), segment, offset),
            db=ctx.db.cmap,
        )
    if old_key is not None:
        unref_chunk(ctx, t, old_key, counts)


def read_range(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, start: int, end: int
) -> bytes:
    """Bytes [start, end) of a file: holes and the tails of short chunks read as zeros;
    stored chunks are fetched whole (one pread per run of chunks adjacent in a segment)
    and verified once per fetch, then the wanted bytes are sliced out. A range inside one
    chunk (every small READ) is one chunk-map lookup and one slice of the (cached) chunk."""
    path = chain(ctx, t, view.top, vol)
    first = start // CHUNK_SIZE
    if first == (end - 1) // CHUNK_SIZE:  # inside one chunk (every small READ): one slice
        base = first * CHUNK_SIZE
        lo, hi = start - base, end - base
        ref = chunk_at(ctx, t, path, ino, first)
        if ref is None or ref.length <= lo:
            return ZEROS[: hi - lo]
        data = _read_run(ctx, view, vol, ino, first, [ref])
        return data[lo:hi] if hi <= ref.length else data[lo:] + ZEROS[: hi - ref.length]
    parts: list[bytes | memoryview] = []
    run: list[ChunkRef] = []  # chunks adjacent in one segment, wanted end to end
    run_first = run_lo = run_len = 0  # run's first chunk index; wanted bytes in the run

    def flush() -> None:
        data = _read_run(ctx, view, vol, ino, run_first, run)
        if run_lo == 0 and run_len == len(data):
            parts.append(data)
        else:
            parts.append(memoryview(data)[run_lo : run_lo + run_len])
        run.clear()

    for index in range(start // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1):
        base = index * CHUNK_SIZE
        lo = max(start, base) - base
        hi = min(end, base + CHUNK_SIZE) - base
        ref = chunk_at(ctx, t, path, ino, index)
        have = min(hi, ref.length) if ref is not None else 0
        if ref is not None and lo < have:
            last = run[-1] if run else None
            if (
                last is not None
                and lo == 0
                and last.segment == ref.segment
                and last.offset + last.length == ref.offset
                and run_lo + run_len == ref.offset - run[0].offset
            ):
                run.append(ref)
                run_len += have
            else:
                if run:
                    flush()
                run.append(ref)
                run_first, run_lo, run_len = index, lo, have - lo
        if hi > max(lo, have):
            if run:
                flush()
            parts.append(ZEROS[: hi - max(lo, have)])
    if run:
        flush()
    if len(parts) == 1:
        return parts[0] if isinstance(parts[0], bytes) else bytes(parts[0])
    return b"".join(parts)


def write_range(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    vol: int,
    ino: int,
    offset: int,
    data: bytes,
    new_size: int,
) -> None:
    path = chain(ctx, t, view.top, vol)
    end = offset + len(data)
    mv = memoryview(data)
    counts: dict[bytes, int] = {}  # (the chunk counters, added once: `add_counts`)
    for index in range(offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1):
        base = index * CHUNK_SIZE
        lo = max(offset, base)
        hi = min(end, base + CHUNK_SIZE)
        clen = min(CHUNK_SIZE, new_size - base)
        piece = mv[lo - offset : hi - offset]
        if lo == base and hi - base == clen:
            content = bytes(piece)
        else:
            old = _chunk_bytes(ctx, chunk_at(ctx, t, path, ino, index), view, vol, ino, index)
            buf = bytearray(clen)
            buf[: min(len(old), clen)] = old[:clen]
            buf[lo - base : hi - base] = piece
            content = bytes(buf)
        _set_chunk(ctx, t, view.top, path, vol, ino, index, content, counts)
    add_counts(ctx, t, counts)


def truncate(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, old_size: int, new_size: int
) -> None:
    if new_size >= old_size:
        return  # growing leaves a hole
    path = chain(ctx, t, view.top, vol)
    if new_size % CHUNK_SIZE:
        index = new_size // CHUNK_SIZE
        old = _chunk_bytes(ctx, chunk_at(ctx, t, path, ino, index), view, vol, ino, index)
        keep = new_size % CHUNK_SIZE
        if len(old) > keep:
            _set_chunk(ctx, t, view.top, path, vol, ino, index, old[:keep])
    first_dropped = -(-new_size // CHUNK_SIZE)
    drop_top_chunks(ctx, t, view.top, vol, ino, first_dropped)
    whiteouts: set[int] = set()
    for layer, v, _ in path[1:]:
        prefix = R.cmap_prefix(layer, v, ino)
        cur = t.cursor(db=ctx.db.cmap)
        if cur.set_range(R.cmap_key(layer, v, ino, first_dropped)):
            for key, value in cur:
                key = bytes(key)
                if not key.startswith(prefix):
                    break
                if value:
                    whiteouts.add(R.CMAP_KEY.unpack(key)[3])
    for index in whiteouts:
        t.put(R.cmap_key(view.top, vol, ino, index), R.WHITEOUT, db=ctx.db.cmap)


def drop_top_chunks(
    ctx: Ctx, t: lmdb.Transaction, top: int, vol: int, ino: int, first: int
) -> None:
    """Delete the file's chunk-map records in layer `top` from chunk `first` on and release
    the chunks they name."""
    drop_chunks(ctx, t, R.cmap_prefix(top, vol, ino), R.cmap_key(top, vol, ino, first))


def drop_chunks(ctx: Ctx, t: lmdb.Transaction, prefix: bytes, start: bytes = b"") -> None:
    """Delete the chunk-map records under `prefix` (layer|vol|ino), from key `start` on,
    and release the chunks they name."""
    doomed: list[tuple[bytes, bytes]] = []
    cur = t.cursor(db=ctx.db.cmap)
    if cur.set_range(start or prefix):
        for key, value in cur:
            if not bytes(key).startswith(prefix):
                break
            doomed.append((bytes(key), bytes(value)))
    for key, value in doomed:
        t.delete(key, db=ctx.db.cmap)
        if value:
            unref_chunk(ctx, t, chunk_ref(value).key)


def note_append(ctx: Ctx, t: lmdb.Transaction, segment: int, offset: int, length: int) -> None:
    """Account `length` live bytes appended at `offset` of `segment` in its record."""
    seg_key = R.U64.pack(segment)
    raw = t.get(seg_key, db=ctx.db.segments)
    appended, live = R.SEGMENT_VAL.unpack(raw) if raw else (0, 0)
    t.put(
        seg_key,
        R.SEGMENT_VAL.pack(max(appended, offset + length), live + length),
        db=ctx.db.segments,
    )


def _all_zero(data: bytes) -> bool:
    """Whether a chunk is all zeros (stored as a hole); memcmp stops at the first byte set."""
    return data == (ZEROS if len(data) == CHUNK_SIZE else bytes(len(data)))
