"""The store's read cache of verified chunks (`prism.store.segments`, "Read cache").

Against a real store on disk: the cache holds at most its capacity in bytes and gives back
least recently used chunks first; a small read of a cached chunk costs no pread; a chunk
verified once is served from memory even if its bytes on disk are damaged afterwards (the
documented contract), while any read that misses the cache (after eviction, with the cache
off, or in a fresh process) still refuses the damage; gc moving chunks and rewrites leave
reads equal to what was written; `prism serve --read-cache-mb` sizes a real server's cache.
"""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest

from prism.errors import Corrupt
from prism.limits import READ_CACHE_MB
from prism.nfs.const import NfsStat3
from prism.store import CHUNK_SIZE, ObjectId, SetAttr, Store, gc
from prism.store.segments import ENTRY_OVERHEAD, VerifiedChunks
from tests.server_helpers import running_server
from tests.test_hardening_corruption import flip_in_segments


def chunks(seed: int, count: int) -> bytes:
    return random.Random(seed).randbytes(count * CHUNK_SIZE)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def make_file(store: Store, name: bytes, content: bytes) -> ObjectId:
    root = store.root(store.create_namespace(name.decode()).id)
    oid = store.create(root, name).oid
    store.write(oid, 0, content)
    store.commit()
    return oid


def count_preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        calls.append(length)
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread)
    return calls


def held(cache: VerifiedChunks) -> int:
    return sum(len(data) + ENTRY_OVERHEAD for data in cache.chunks.values())


def test_lru_bounded_in_bytes() -> None:
    cache = VerifiedChunks(3 * (100 + ENTRY_OVERHEAD))
    for i in range(3):
        cache.put((1, i * 100, 100, b"d"), bytes([i]) * 100)
    assert cache.get((1, 0, 100, b"d")) == bytes(100)  # now the most recently used
    cache.put((1, 300, 100, b"d"), b"x" * 100)
    assert cache.size == cache.capacity == held(cache)
    assert cache.get((1, 100, 100, b"d")) is None  # the least recently used went first
    assert cache.get((1, 0, 100, b"d")) is not None
    cache.put((1, 400, 301, b"d"), b"y" * cache.capacity)  # larger than the whole cache
    assert cache.size == held(cache) and cache.get((1, 400, 301, b"d")) is None
    off = VerifiedChunks(0)
    off.put((1, 0, 1, b"d"), b"z")
    assert off.size == 0 and not off.chunks


def test_many_small_chunks_stay_within_the_capacity_in_memory() -> None:
    """The capacity bounds memory, not just chunk bytes: tiny chunks (small files) cost
    their keys and entries too."""
    capacity = 1 << 20
    cache = VerifiedChunks(capacity)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):
            cache.put((7 << 40, i * 100 + (1 << 33), 100, os.urandom(16)), os.urandom(100))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert cache.size == held(cache) <= capacity
    assert grown <= capacity * 1.1, grown


def test_small_reads_of_a_cached_chunk_cost_no_disk_read(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = chunks(1, 4)
    with Store.open(data) as store:
        oid = make_file(store, b"vm", content)
        preads = count_preads(monkeypatch)
        for _ in range(3):
            for index in range(4):
                at = index * CHUNK_SIZE + 8192
                assert store.read(oid, at, 4096)[0] == content[at : at + 4096]
        assert preads == [CHUNK_SIZE] * 4  # each chunk fetched (and hashed) once


def test_memory_stays_bounded_over_a_file_larger_than_the_cache(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capacity = 4 * CHUNK_SIZE
    content = chunks(2, 48)
    with Store.open(data, read_cache_bytes=capacity) as store:
        oid = make_file(store, b"vm", content)
        cache = store.segments.verified
        preads = count_preads(monkeypatch)
        rng = random.Random(3)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            peak_growth = 0
            for _ in range(600):
                at = rng.randrange(len(content) // 4096) * 4096
                assert store.read(oid, at, 4096)[0] == content[at : at + 4096]
                assert cache.size <= capacity
                peak_growth = max(peak_growth, tracemalloc.get_traced_memory()[0] - base)
        finally:
            tracemalloc.stop()
        assert cache.size == held(cache) <= capacity
        assert len(cache.chunks) == 3  # 4 chunks and their entries would be too much
        # what is held is the cache plus the chunk in flight and small change
        assert peak_growth < capacity + 2 * CHUNK_SIZE, peak_growth
        assert len(preads) > 400  # 3 of 48 chunks cached: most reads miss and fetch


def test_a_chunk_damaged_after_it_was_verified(data: Path) -> None:
    """Verified once, a chunk is served from memory while it stays cached (damage on disk
    afterwards does not reach a hit, and the bytes served are the ones that matched the
    hash); every read that misses refuses the damage, as fsck reports it."""
    a, b = chunks(4, 1), chunks(5, 1)
    with Store.open(data, read_cache_bytes=CHUNK_SIZE + ENTRY_OVERHEAD) as store:
        fa = make_file(store, b"a", a)
        fb = make_file(store, b"b", b)
        assert store.read(fa, 4096, 4096)[0] == a[4096:8192]  # cached, verified
        flip_in_segments(data, a, 100)
        assert store.read(fa, 0, 4096)[0] == a[:4096]  # a hit: the verified bytes
        assert store.read(fb, 0, 4096)[0] == b[:4096]  # evicts a (capacity: one chunk)
        with pytest.raises(Corrupt, match="damaged content"):
            store.read(fa, 0, 4096)
        with pytest.raises(Corrupt, match="damaged content"):
            store.read(fa, 0, 4096)  # a failed fetch is never cached
        assert store.ctx.damaged_reads == 2
    for capacity in (0, READ_CACHE_MB << 20):  # no cache; a fresh process's cache
        with Store.open(data, read_cache_bytes=capacity) as store:
            fa = store.resolve(store.namespace("a").id, "/a").oid
            with pytest.raises(Corrupt, match="damaged content"):
                store.read(fa, 0, 4096)
            fb = store.resolve(store.namespace("b").id, "/b").oid
            assert store.read(fb, 0, 4096)[0] == b[:4096]


def test_reads_stay_exact_across_rewrites_and_gc_moves(data: Path) -> None:
    rng = random.Random(6)
    model = bytearray(chunks(7, 6))
    with Store.open(data, read_cache_bytes=3 * CHUNK_SIZE) as store:
        oid = make_file(store, b"vm", bytes(model))
        for step in range(40):
            at = rng.randrange(len(model) - 5000)
            if step % 3 == 0:
                piece = rng.randbytes(rng.choice([100, 4096, 5000]))
                store.write(oid, at, piece)
                model[at : at + len(piece)] = piece
                store.commit()
            if step % 10 == 9:
                gc.gc(store)  # compacts: live chunks move to new places
            assert store.read(oid, at, 4096)[0] == model[at : at + 4096]
        assert store.read(oid, 0, len(model))[0] == model


def test_reads_inside_one_chunk_over_holes_and_short_chunks(data: Path) -> None:
    """Every range inside one chunk (the small READ's path) equals the file's bytes: a
    stored chunk, a hole, a chunk shorter than the file there (grown by truncate), and the
    boundaries between them."""
    head = chunks(9, 1)
    with Store.open(data, read_cache_bytes=CHUNK_SIZE) as store:
        oid = make_file(store, b"vm", head + b"tail" * 25)  # chunk 1 holds 100 bytes
        store.setattr(oid, SetAttr(size=4 * CHUNK_SIZE))  # chunk 1's rest, 2 and 3: zeros
        store.write(oid, 3 * CHUNK_SIZE + 10, b"x" * 50)
        model = bytearray(4 * CHUNK_SIZE)
        model[: CHUNK_SIZE + 100] = head + b"tail" * 25
        model[3 * CHUNK_SIZE + 10 : 3 * CHUNK_SIZE + 60] = b"x" * 50
        spots = [0, 5, 4096, CHUNK_SIZE - 4096, CHUNK_SIZE, CHUNK_SIZE + 60, CHUNK_SIZE + 100]
        spots += [CHUNK_SIZE + 200, 2 * CHUNK_SIZE + 7, 3 * CHUNK_SIZE, 3 * CHUNK_SIZE + 30]
        for at in spots:
            for count in (1, 40, 4096, CHUNK_SIZE - at % CHUNK_SIZE):
                got, eof = store.read(oid, at, count)
                assert got == model[at : at + count], (at, count)
                assert eof == (at + count >= len(model))


@pytest.mark.parametrize("megabytes", [0, 1])
def test_serve_read_cache_mb_sizes_the_servers_cache(tmp_path: Path, megabytes: int) -> None:
    """`prism serve --read-cache-mb N`: with 1, a chunk read once is served from memory
    after its bytes on disk are damaged; with 0, nothing is cached and the damage is
    refused (EIO) at every read."""
    a = chunks(8, 1)
    with running_server(tmp_path, extra_args=("--read-cache-mb", str(megabytes))) as server:
        root = server.mount()
        with server.nfs_client() as client:
            fh = client.create(root, "f").obj
            assert client.write(fh, 0, a).ok
            assert client.read(fh, 0, 4096).data == a[:4096]
            flip_in_segments(server.data, a, 5000)
            res = client.read(fh, 8192, 4096)
            if megabytes:
                assert res.ok and res.data == a[8192:12288]
            else:
                assert res.status == NfsStat3.NFS3ERR_IO
