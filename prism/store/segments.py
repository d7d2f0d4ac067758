"""Content segments: append-only files that hold chunk bytes.

Theory of operation: each process that writes content owns one *active* segment, a file
`segments/<id>.seg` named by a random 64-bit id (so no metadata transaction is needed to pick
a name and an aborted transaction can never make two writers share one). The writer holds an
exclusive `flock` on its active segment for as long as it may append to it; `gc` skips locked
segments, so it never compacts or deletes bytes that a live writer has not committed yet.

Chunks are appended back to back with no framing: the LMDB chunk index is the only authority
on where a chunk lives, and `fsck` checks every referenced chunk's length and hash. Readers of
file content use `read_chunks`, which verifies every chunk it returns against its xxh3-128
hash (a whole chunk at a time, once per fetch), so damaged bytes surface as `DamagedChunk`
and are never served (see "Read cache" for what a cached chunk means). Bytes that reached
a segment but whose transaction never committed (a crash, an abort) are debris that
`gc` reclaims by compaction. `sync()` (fdatasync, plus an fsync of the directory after a new
segment appears) is called before the metadata that references new bytes commits.

Read cache. `read_chunk` keeps each lone chunk it has read and verified in an LRU cache of
at most `cache_bytes` (`prism.limits.READ_CACHE_MB`, the server's `--read-cache-mb`), so a
small read of a chunk fetched lately costs neither a 128 KiB pread nor its hash. A chunk is
cached under its place and its digest (segment, offset, length, xxh3-128): a hit hands back
bytes that were read from that place and matched the very digest the caller's metadata
names, so it needs no invalidation when gc moves or deletes segments, or fsck repairs a
chunk elsewhere (those name a new place). A chunk verified once is served from memory while
cached: damage to its bytes on disk afterwards is found by the next read that misses (after
eviction or a restart) and by `prism fsck`, never by a hit; memory is not re-verified.

Room for metadata. Content may not fill the filesystem: an append that would leave less than
`metadata_reserve()` bytes free (1/32 of the filesystem, clamped to 8 MiB..1 GiB) fails with
NoSpace, so the journal's checkpoints (LMDB commits) still find pages on a data-full disk and
REMOVE, which frees content only once its metadata commits, keeps working. New names (the
store's `SegmentFiles.require_room` before it creates an object or a link) stop at half the
reserve, so that the rest is left to REMOVE and checkpoints. Only `gc`'s compaction (which
frees more than it writes) may append into the reserve.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import xxhash

from prism.errors import Corrupt, NoSpace
from prism.limits import READ_CACHE_MB
from prism.store.diskio import PRIVATE_DIR, PRIVATE_FILE, fsync_directory, pwrite_all

SEGMENT_TARGET_SIZE = 64 * 1024 * 1024
"""A writer starts a new segment after a commit once its active one is this large."""
WRITEBACK_STEP = 8 * 1024 * 1024
"""After this many appended bytes, ask the kernel to start writing them out (without
waiting), so that the fdatasync before the next commit finds little left to do."""

RESERVE_SHARE = 32
RESERVE_MIN = 8 << 20
RESERVE_MAX = 1 << 30

_SYNC_FILE_RANGE_WRITE = 2


def metadata_reserve(path: Path) -> int:
    """Bytes of `path`'s filesystem that content appends leave free for metadata."""
    st = os.statvfs(path)
    return min(RESERVE_MAX, max(RESERVE_MIN, st.f_blocks * st.f_frsize // RESERVE_SHARE))


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, length: int) -> None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a hint: failures change nothing

    return start_writeback


_start_writeback = _load_sync_file_range()


class DamagedChunk(Corrupt):
    """A chunk's bytes are missing or do not match its hash; `position` says which chunk of
    the run that was read (the caller knows which file and range that is)."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


ENTRY_OVERHEAD = 384
"""Bytes of memory a cached chunk costs besides its own (key, bytes header, dict entry:
about 330 measured), counted against the read cache's capacity so that small chunks too
stay within it."""
Place = tuple[int, int, int, bytes]
"""Where a chunk lives and what it must hash to: (segment, offset, length, xxh3-128)."""


class VerifiedChunks:
    """Chunks read and verified lately, least recently used first out; the memory held
    (`size`: their bytes plus ENTRY_OVERHEAD each) never exceeds `capacity`. Keyed by
    `Place`, whose bytes never change."""

    __slots__ = ("capacity", "chunks", "size")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.chunks: OrderedDict[Place, bytes] = OrderedDict()
        self.size = 0

    def get(self, place: Place) -> bytes | None:
        data = self.chunks.get(place)
        if data is not None:
            self.chunks.move_to_end(place)
        return data

    def put(self, place: Place, data: bytes) -> None:
        cost = len(data) + ENTRY_OVERHEAD
        if cost > self.capacity or place in self.chunks:
            return
        while self.size + cost > self.capacity:
            self.size -= len(self.chunks.popitem(last=False)[1]) + ENTRY_OVERHEAD
        self.chunks[place] = data
        self.size += cost


def segment_name(seg_id: int) -> str:
    return f"{seg_id:016x}.seg"


def parse_segment_name(name: str) -> int | None:
    if len(name) != 20 or not name.endswith(".seg"):
        return None
    try:
        return int(name[:16], 16)
    except ValueError:
        return None


class SegmentFiles:
    """Appends to this process's active segment and reads any segment."""

    def __init__(self, directory: Path, cache_bytes: int = READ_CACHE_MB << 20) -> None:
        self.directory = directory
        self.verified = VerifiedChunks(cache_bytes)
        directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        self._read_fds: dict[int, int] = {}
        self._active_id: int | None = None
        self._active_fd: int | None = None
        self._active_path: Path | None = None
        self._active_size = 0
        self._dirty = False
        self._new_file = False
        self.unsynced_bytes = 0
        self._written_back = 0  # offset up to which writeback was started
        self.reserve = metadata_reserve(directory)

    # -- writing -----------------------------------------------------------------------

    def require_room(self, size: int, keep: int) -> None:
        """NoSpace unless writing `size` bytes leaves `keep` bytes of the filesystem free."""
        if free_bytes(self.directory) - size < keep:
            raise NoSpace(
                f"{self.directory.parent} is full: its last {self.reserve >> 20} MiB are kept "
                "for metadata, so that files can still be removed; remove files, then run "
                "`prism gc`"
            )

    def append(self, data: bytes, *, use_reserve: bool = False) -> tuple[int, int]:
        """Append `data`; return (segment id, offset). Not durable until `sync()`. NoSpace
        if that would eat into the metadata reserve (unless `use_reserve`: gc only)."""
        if not use_reserve:
            self.require_room(len(data), self.reserve)
        if self._active_fd is None:
            self._open_new()
        assert self._active_fd is not None and self._active_id is not None
        offset = self._active_size
        pwrite_all(self._active_fd, data, offset, self._active_path)
        self._active_size += len(data)
        self._dirty = True
        self.unsynced_bytes += len(data)
        if _start_writeback and self._active_size - self._written_back >= WRITEBACK_STEP:
            _start_writeback(self._active_fd, self._written_back, 0)
            self._written_back = self._active_size
        return self._active_id, offset

    def _open_new(self) -> None:
        while True:
            seg_id = secrets.randbits(63) or 1
            path = self.directory / segment_name(seg_id)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
            except FileExistsError:
                continue
            break
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._active_id, self._active_fd, self._active_size = seg_id, fd, 0
        self._active_path = path
        self._written_back = 0
        self._new_file = True

    def sync(self) -> None:
        """Make every appended byte durable (call before committing metadata)."""
        if self._dirty and self._active_fd is not None:
            os.fdatasync(self._active_fd)
            self._dirty = False
        self.unsynced_bytes = 0
        if self._new_file:
            fsync_directory(self.directory)
            self._new_file = False

    def roll_if_full(self) -> None:
        """After a commit: start a fresh segment next time if the active one is full."""
        if self._active_fd is not None and self._active_size >= SEGMENT_TARGET_SIZE:
            self.release_active()

    def release_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)  # also drops the flock
        self._active_fd = self._active_id = self._active_path = None
        self._active_size = 0

    # -- reading -----------------------------------------------------------------------

    def _fd(self, seg_id: int) -> int:
        fd = self._read_fds.get(seg_id)
        if fd is None:
            path = self.directory / segment_name(seg_id)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise Corrupt(f"segment {path} is missing; run `prism fsck --repair`") from exc
            if len(self._read_fds) > 256:
                for old in list(self._read_fds)[:64]:
                    os.close(self._read_fds.pop(old))
            self._read_fds[seg_id] = fd
        return fd

    def read(self, seg_id: int, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(seg_id), length, offset)
        if len(data) != length:
            raise Corrupt(f"segment {seg_id:016x} is short at offset {offset}; run `prism fsck`")
        return data

    def read_chunks(self, seg_id: int, offset: int, chunks: Sequence[tuple[int, bytes]]) -> bytes:
        """The chunks stored back to back from `offset`, given as (length, xxh3-128 digest),
        in one pread; each is verified against its digest before any byte is returned."""
        total = sum(length for length, _ in chunks)
        try:
            data = os.pread(self._fd(seg_id), total, offset)
        except Corrupt as exc:
            raise DamagedChunk(str(exc), 0) from None
        view = memoryview(data)
        pos = 0
        for position, (length, digest) in enumerate(chunks):
            if pos + length > len(data):
                raise DamagedChunk(
                    f"segment {seg_id:016x} ends inside a chunk at offset {offset + pos}", position
                )
            if xxhash.xxh3_128_digest(view[pos : pos + length]) != digest:
                raise DamagedChunk(
                    f"chunk at segment {seg_id:016x} offset {offset + pos} does not match its hash",
                    position,
                )
            pos += length
        return data

    def read_chunk(self, seg_id: int, offset: int, length: int, digest: bytes) -> bytes:
        """One chunk, verified against `digest`: from the read cache, else read (and
        verified) by `read_chunks` and kept in the cache."""
        place = (seg_id, offset, length, digest)
        data = self.verified.get(place)
        if data is None:
            data = self.read_chunks(seg_id, offset, ((length, digest),))
            self.verified.put(place, data)
        return data

    def forget(self, seg_id: int) -> None:
        fd = self._read_fds.pop(seg_id, None)
        if fd is not None:
            os.close(fd)

    # -- maintenance -------------------------------------------------------------------

    def list_ids(self) -> list[int]:
        ids = []
        for entry in os.scandir(self.directory):
            seg_id = parse_segment_name(entry.name)
            if seg_id is not None:
                ids.append(seg_id)
        return ids

    def try_lock(self, seg_id: int) -> int | None:
        """Open and lock a segment for maintenance; None if a live writer holds it."""
        if seg_id == self._active_id:
            return None
        try:
            fd = os.open(self.directory / segment_name(seg_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def remove(self, seg_id: int) -> None:
        self.forget(seg_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / segment_name(seg_id))

    def size_of(self, seg_id: int) -> int:
        try:
            return os.stat(self.directory / segment_name(seg_id)).st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        self.release_active()
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
