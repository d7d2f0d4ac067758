"""Sealed LMDB records: every stored value carries a checksum over its database, key and value.

LMDB 0.9 keeps no checksums, so a flipped bit in `data.mdb` would otherwise be served as a
wrong name, a wrong attribute or a wrong chunk location. The store therefore never touches an
LMDB transaction directly: it goes through `SealedTxn`, the one place values are sealed and
opened.

Layout of a stored value::

    value | seal u32 (big-endian) = xxh32(key | value, seed = the database's index)

The index is the database's position in `schema.DB_NAMES` (the same number the journal
uses), so a record is also bound to its database. A whiteout (an empty value) is stored as
its seal alone. `SealedTxn.get` and `SealedCursor` open every value they hand out and raise
`Corrupt` naming the database and key when the seal does not match, so a damaged record is
refused, never served; LMDB's own errors about damaged pages become `Corrupt` too.

A flipped byte in a *key* moves no record: it stays where it was in its page, out of order, so
a search for its original key ends on it or right after it, and a range scan may start right
after it. A miss is as much an answer as a hit (NOENT, ESTALE, a hole that reads as zeros, or
a fall through to an older record in a lower layer), so every miss of `get` and the start of
every scan (`SealedCursor.set_range`) also open the records on both sides of where the key
would be: if either is damaged the answer is `Corrupt`, not a silently missing record.
Flips in LMDB's own page structure (headers, branch pages) are LMDB's to detect.

The journal keeps *unsealed* changes (the recorder sits above this layer), so its replay
seals them as any other write. `fsck` opens every record of every database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import lmdb
import xxhash

from prism.errors import Corrupt

SEAL = 4
"""Bytes appended to every stored value."""

_seal = xxhash.xxh32_digest


def seal(index: int, key: bytes, value: bytes) -> bytes:
    """The stored form of `value` under `key` in database number `index`."""
    return value + _seal(key + value, seed=index)


def open_value(index: int, key: bytes, stored: bytes) -> bytes:
    """The value sealed in `stored`; Corrupt if the seal does not match."""
    value = stored[:-SEAL]
    if len(stored) < SEAL or _seal(key + value, seed=index) != stored[-SEAL:]:
        raise DamagedRecord(index, key)
    return value


class DamagedRecord(Corrupt):
    """A stored record does not match its seal (its bytes on disk changed)."""

    def __init__(self, index: int, key: bytes) -> None:
        super().__init__(
            f"damaged metadata record (database {index}, key {bytes(key).hex()}): it was "
            "changed on disk; it is not served. Run `prism fsck` to list every damaged record"
        )
        self.index = index
        self.key = bytes(key)


_PAGE_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError)
"""LMDB's errors for pages that do not hold what their parents say."""


def lmdb_damage(exc: lmdb.Error) -> Corrupt:
    return Corrupt(f"damaged metadata page in data.mdb ({exc}); run `prism fsck`")


def _check_here(cur: lmdb.Cursor, index: int) -> None:
    key, stored = cast(tuple[bytes, bytes], cur.item())  # buffers=False: bytes
    if len(stored) < SEAL or _seal(key + stored[:-SEAL], seed=index) != stored[-SEAL:]:
        raise DamagedRecord(index, key)


def _check_around(cur: lmdb.Cursor, index: int, found: bool, *, restore: bool = True) -> None:
    """Open the record at the cursor (if `found`: else the last one) and the one before it.
    With `restore`, the cursor ends where it started."""
    if found:
        _check_here(cur, index)
        if cur.prev():
            _check_here(cur, index)
            if restore:
                cur.next()
        elif restore:
            cur.first()  # (a failed prev leaves the cursor unpositioned)
    elif cur.last():
        _check_here(cur, index)
        if restore:
            cur.next()


class SealedTxn:
    """An LMDB transaction whose values are sealed on put and verified on get."""

    __slots__ = ("_cursors", "_index", "raw")

    def __init__(self, raw: lmdb.Transaction, index: dict[Any, int]) -> None:
        self.raw = raw
        self._index = index
        self._cursors: dict[Any, lmdb.Cursor] = {}  # for confirming misses, one per database

    def get(self, key: bytes, default: bytes | None = None, *, db: Any) -> bytes | None:
        try:
            stored = cast(bytes | None, self.raw.get(key, db=db))  # buffers=False: bytes
        except _PAGE_DAMAGE as exc:
            raise lmdb_damage(exc) from None
        if stored is None:
            cur = self._cursors.get(db)
            if cur is None:
                cur = self._cursors[db] = self.raw.cursor(db=db)
            try:
                _check_around(cur, self._index[db], cur.set_range(key), restore=False)
            except _PAGE_DAMAGE as exc:
                raise lmdb_damage(exc) from None
            return default
        index = self._index[db]
        value = stored[:-SEAL]
        if _seal(key + value, seed=index) != stored[-SEAL:]:
            raise DamagedRecord(index, key)
        return value

    def put(self, key: bytes, value: bytes, *, db: Any) -> bool:
        return self.raw.put(key, value + _seal(key + value, seed=self._index[db]), db=db)

    def delete(self, key: bytes, *, db: Any) -> bool:
        return self.raw.delete(key, db=db)

    def cursor(self, *, db: Any) -> SealedCursor:
        return SealedCursor(self.raw.cursor(db=db), self._index[db])

    def commit(self) -> None:
        self.raw.commit()

    def abort(self) -> None:
        self.raw.abort()

    def __enter__(self) -> SealedTxn:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.raw.commit()
        else:
            self.raw.abort()


class SealedCursor:
    """A cursor whose values are opened (verified) as they are read."""

    __slots__ = ("_cur", "damaged", "index")

    def __init__(self, cur: lmdb.Cursor, index: int) -> None:
        self._cur = cur
        self.index = index

    def set_range(self, key: bytes) -> bool:
        """Position at the first key >= `key`, after checking the records around it."""
        try:
            found = bool(self._cur.set_range(key))
            _check_around(self._cur, self.index, found)
        except _PAGE_DAMAGE as exc:
            raise lmdb_damage(exc) from None
        return found

    def key(self) -> bytes:
        return bytes(self._cur.key())

    def value(self) -> bytes:
        return open_value(self.index, bytes(self._cur.key()), bytes(self._cur.value()))

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        index = self.index
        try:
            for key, stored in cast(Iterator[tuple[bytes, bytes]], self._cur):
                yield key, open_value(index, key, stored)
        except _PAGE_DAMAGE as exc:
            raise lmdb_damage(exc) from None

    def intact(self, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Like iterating (from the first key >= `start`, if given), but a damaged record is
        skipped and its key added to `damaged` (for listings that must go on past one bad
        record, and for fsck)."""
        self.damaged: list[bytes] = []
        index = self.index
        if start is not None:
            try:
                if not self._cur.set_range(start):
                    return
            except _PAGE_DAMAGE as exc:
                raise lmdb_damage(exc) from None
        for key, stored in self.raw_items():
            try:
                yield key, open_value(index, key, stored)
            except DamagedRecord:
                self.damaged.append(bytes(key))

    def raw_items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, stored bytes) from the current position, without opening (for fsck)."""
        try:
            yield from cast(Iterator[tuple[bytes, bytes]], self._cur)
        except _PAGE_DAMAGE as exc:
            raise lmdb_damage(exc) from None


SEAL_PROGRESS_EVERY = 100_000
"""Records `seal_all` seals between two progress reports."""


def seal_all(txn: lmdb.Transaction, dbs: tuple[Any, ...], progress: Any = None) -> int:
    """Seal every record of an unsealed (format 1) store in place; return how many."""
    done = 0
    for index, db in enumerate(dbs):
        cur = txn.cursor(db=db)
        if not cur.first():
            continue
        while True:
            key, value = cast(tuple[bytes, bytes], cur.item())
            cur.put(key, seal(index, key, value))
            done += 1
            if progress is not None and done % SEAL_PROGRESS_EVERY == 0:
                progress(done)
            if not cur.next():
                break
    return done
