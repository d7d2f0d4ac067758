"""The redo journal: durable metadata changes at the cost of one small fdatasync.

Theory of operation: an LMDB commit with fsync costs two fdatasyncs plus a write of every
dirty B-tree page, several hundred microseconds here, and before the journal the server paid
that for every CREATE or REMOVE. A server that owns the journal instead keeps one LMDB write
transaction (the *batch*) open for up to a fraction of a second and, at each durable point,
appends the batch's new key/value changes to this file and fdatasyncs it: one flush of a few
hundred bytes. The batch itself commits (a *checkpoint*) when it is old enough, when the
server goes quiet, or when the journal is full.

On-disk layout: `DATA/meta/journal`, JOURNAL_SIZE bytes written with zeros once when it is
made, then only ever overwritten in place (so an fdatasync never has to log a size or extent
change). Records follow each other from offset 0::

    magic u32 "PRJ2" | generation u64 | offset u64 (where this record starts) | length u32
      | xxh3-64 of the payload | xxh3-64 of the 32 header bytes before it
    payload: changes back to back, each  kind u8 (PUT/DELETE) | db u8 | klen u32 | vlen u32
             | key | value

Format 1 ("PRJ1", written before the record header had its own checksum) was
`magic u32 | generation u64 | length u32 | xxh3-64 of (generation, length, payload)`; its
records still replay (stopping at the first that does not verify, as that version did), and
records of both formats may follow each other within one generation.

A record is *physical*: the final bytes of a key, so replaying a prefix of records twice gives
the same result as replaying it once.

Generations and crash ordering. LMDB's meta database holds `journal_gen`, the generation of
records not yet checkpointed. A checkpoint writes `journal_gen + 1` in the batch it commits,
so the commit that makes records redundant is the same one that retires them; new records
then overwrite the file from offset 0 with the new generation, and older bytes further on can
never pass for current ones. Content bytes (segments) are fdatasync'd before the record that
names them. Recovery, by whoever next takes the journal's lock: read records of the current
generation from offset 0 up to the first that does not verify, apply them in one LMDB
transaction that also bumps the generation, commit. Only the last record can be torn (each is
written and fdatasync'd before the next, and acknowledged only then), so the first record
that does not verify must be the last of its generation: if a valid header of the current
generation, naming its own offset, follows it anywhere in the file, the journal was damaged in
the middle, and recovery stops with `Corrupt` naming the offset rather than silently drop the
acknowledged records after it. The operator then restores the file, or moves it aside to start
without its records. Records are retired only by a commit that succeeded: if a checkpoint
fails (a full disk), its owner reopens the batch from LMDB plus these records and keeps
appending after them.

Ownership. The process that journals (the server) holds an exclusive `flock` on the file for
its lifetime. Other processes (operator commands) commit to LMDB directly; before a write
they try the lock, and if they get it while records are pending, the owner died: they replay
first, so nothing is ever written on top of a state that lacks acknowledged changes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import xxhash

from prism.errors import Corrupt, NoSpace
from prism.store.diskio import PRIVATE_FILE, fsync_directory, pwrite_all

JOURNAL_SIZE = 16 << 20
MAGIC = 0x50524A32  # "PRJ2"
HEADER = struct.Struct("<IQQIQQ")
_HEADER_SUMMED = struct.Struct("<IQQIQ")  # the fields the header checksum covers
MAGIC_V1 = 0x50524A31  # "PRJ1", replayed but no longer written
HEADER_V1 = struct.Struct("<IQIQ")
CHANGE = struct.Struct("<BBII")
PUT, DELETE = 1, 2
Change = tuple[int, int, bytes, bytes]
"""(PUT or DELETE, database index, key, value) — value is b"" for DELETE."""


class JournalBusy(Exception):
    """Another live process owns the journal."""


def encode_changes(changes: list[Change]) -> bytes:
    pack = CHANGE.pack
    parts: list[bytes] = []
    for kind, db, key, value in changes:
        parts += (pack(kind, db, len(key), len(value)), key, value)
    return b"".join(parts)


def decode_changes(payload: bytes) -> Iterator[Change]:
    view = memoryview(payload)
    pos, end = 0, len(payload)
    while pos < end:
        if pos + CHANGE.size > end:
            raise Corrupt("journal record ends inside a change header")
        kind, db, klen, vlen = CHANGE.unpack_from(view, pos)
        pos += CHANGE.size
        if kind not in (PUT, DELETE) or pos + klen + vlen > end:
            raise Corrupt("journal record holds a malformed change")
        key = bytes(view[pos : pos + klen])
        pos += klen
        value = bytes(view[pos : pos + vlen])
        pos += vlen
        yield kind, db, key, value


def _checksum_v1(generation: int, payload: bytes) -> int:
    hasher = xxhash.xxh3_64(struct.pack("<QI", generation, len(payload)))
    hasher.update(payload)
    return hasher.intdigest()


def _header(generation: int, offset: int, payload: bytes) -> bytes:
    summed = _HEADER_SUMMED.pack(
        MAGIC, generation, offset, len(payload), xxhash.xxh3_64_intdigest(payload)
    )
    return summed + xxhash.xxh3_64_intdigest(summed).to_bytes(8, "little")


def _header_at(data: bytes | memoryview, pos: int, generation: int, offset: int) -> int | None:
    """The payload length of a valid format-2 header of `generation` for `offset` at
    data[pos:], else None."""
    if pos + HEADER.size > len(data):
        return None
    magic, gen, at, length, _, summed = HEADER.unpack_from(data, pos)
    if magic != MAGIC or gen != generation or at != offset:
        return None
    if xxhash.xxh3_64_intdigest(bytes(data[pos : pos + _HEADER_SUMMED.size])) != summed:
        return None
    return int(length)


class Journal:
    """The journal file, locked by this process. Not thread-safe (neither is the store)."""

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self._fd = fd
        self.path = path
        self.size = size
        self.offset = 0
        self.generation = 0

    @classmethod
    def open(cls, path: Path, *, wait: float = 0.0, size: int = JOURNAL_SIZE) -> Journal:
        """Open (making it if needed) and lock the journal; JournalBusy if another process
        still holds it after `wait` seconds."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise JournalBusy(str(path)) from None
                    time.sleep(0.05)
            current = os.fstat(fd).st_size
            if current < size:
                _fill_zeros(fd, current, size, path)
            else:
                size = current
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also drops the flock
            self._fd = -1

    def records(self, generation: int) -> Iterator[bytes]:
        """Payloads of `generation`, from offset 0 to the first record that does not verify;
        Corrupt if a valid record of `generation` follows that one (see the module)."""
        for payload, _ in self._scan(generation):
            yield payload

    def recover(self, generation: int) -> list[bytes]:
        """The payloads of `generation`, to apply after a crash or a failed checkpoint;
        later appends go after them (so they stay until a checkpoint retires them)."""
        payloads = []
        self.offset = 0
        for payload, end in self._scan(generation):
            payloads.append(payload)
            self.offset = end
        self.generation = generation
        return payloads

    def _scan(self, generation: int) -> Iterator[tuple[bytes, int]]:
        """(payload, offset after it) for each record of `generation` from offset 0."""
        data = os.pread(self._fd, self.size, 0)
        offset = 0
        while offset + HEADER_V1.size <= len(data):
            magic = int.from_bytes(data[offset : offset + 4], "little")
            if magic == MAGIC:
                length = _header_at(data, offset, generation, offset)
                start = offset + HEADER.size
                if length is not None and start + length <= len(data):
                    payload = data[start : start + length]
                    if xxhash.xxh3_64_intdigest(payload) == HEADER.unpack_from(data, offset)[4]:
                        yield payload, start + length
                        offset = start + length
                        continue
            elif magic == MAGIC_V1:
                _, gen, length, checksum = HEADER_V1.unpack_from(data, offset)
                start = offset + HEADER_V1.size
                payload = data[start : start + length]
                if gen == generation and _checksum_v1(gen, payload) == checksum:
                    yield payload, start + length
                    offset = start + length
                    continue
            self._check_tail(data, offset, generation)
            return

    def _check_tail(self, data: bytes, offset: int, generation: int) -> None:
        """The record at `offset` does not verify: Corrupt unless it is the torn last one,
        i.e. no valid header of `generation` follows it."""
        pattern = struct.pack("<IQ", MAGIC, generation)
        pos = data.find(pattern, offset + 1)
        while pos >= 0:
            if _header_at(data, pos, generation, pos) is not None:
                raise Corrupt(
                    f"{self.path} is damaged: the record at offset {offset} (generation "
                    f"{generation}) does not verify, yet acknowledged records follow it (one "
                    f"at offset {pos}); recovery stopped rather than drop them. Restore the "
                    "file from a copy, or move it aside to start without its records (losing "
                    "the changes acknowledged since the last checkpoint)"
                )
            pos = data.find(pattern, pos + 1)

    def start(self, generation: int) -> None:
        """Write records of `generation` from offset 0 (after a checkpoint or a recovery)."""
        self.generation = generation
        self.offset = 0

    def room(self) -> int:
        return self.size - self.offset - HEADER.size

    def append(self, payload: bytes) -> None:
        """Write one record after the previous ones (durable after `sync()`)."""
        if len(payload) > self.room():
            raise NoSpace("journal record does not fit; checkpoint first")
        record = _header(self.generation, self.offset, payload) + payload
        pwrite_all(self._fd, record, self.offset, self.path)
        self.offset += len(record)

    def sync(self) -> None:
        os.fdatasync(self._fd)


def _fill_zeros(fd: int, start: int, size: int, path: Path) -> None:
    """Write real zeros (not fallocate: unwritten extents would make each later overwrite a
    metadata change), then make the file and its directory entry durable."""
    block = bytes(1 << 20)
    offset = start
    try:
        while offset < size:
            offset += os.pwrite(fd, block[: min(len(block), size - offset)], offset)
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left to make {path}: free disk space") from exc
        raise
    fsync_directory(path.parent)
