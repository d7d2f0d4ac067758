"""The store epoch file, DATA/meta/epoch: how processes other than the server tell VRPC's
attribute tables that they are writing (design vrpc.md section 7.5).

Layout (4096 bytes, native-endian, `struct vrpc_epoch_file` of native/vrpc.h; mode 0600 like
every store file, handed to VRPC clients as an O_RDONLY fd):

    @0   u64 magic  b"PRISMEP1"
    @64  u64 begun  write transactions begun by processes that are not the journal's owner
    @128 u64 ended  ... and finished (committed or aborted): ended = max(ended, their begun)

Protocol. A non-owner write transaction increments `begun` right after it holds LMDB's writer
lock and sets `ended` after it commits or aborts, so while it writes `begun > ended` and every
table lookup misses; entries carry the `begun` they were published under, so they miss for good
once it moved. A writer that dies in between leaves `begun > ended` (tables disabled: safe)
until the server's next batch, which holds the writer lock, so no writer is in progress, and
sets `ended = begun` (`repair`). The server's own batches never touch this file: its store
observer updates the tables itself.

Words are loaded and stored whole through a `memoryview.cast("Q")` of the mapping (one aligned
8-byte access, atomic on x86); `begun` is only incremented under LMDB's writer lock, so a plain
read-modify-write suffices. `ended` is a max over concurrent enders; a lost race can only leave
it lower than it should be, which disables tables until the next writer or repair (safe).
`vrpc_epoch_*` in native/vrpc_meta.c are the C equivalents (CAS).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

EPOCH_MAGIC = 0x3150454D53495250  # b"PRISMEP1" read as a little-endian u64
EPOCH_SIZE = 4096
_MAGIC, _BEGUN, _ENDED = 0, 64 // 8, 128 // 8  # indices of the u64 words


def epoch_path(data: Path) -> Path:
    return data / "meta" / "epoch"


class EpochFile:
    """A mapping of the epoch file, read-write (store processes) or read-only (clients)."""

    __slots__ = ("_map", "_words", "path")

    def __init__(self, buf: mmap.mmap, path: Path | None = None) -> None:
        self.path = path
        """The file (None when mapped from an fd)."""
        if len(buf) < EPOCH_SIZE:
            raise ValueError(f"an epoch file has {EPOCH_SIZE} bytes, not {len(buf)}")
        self._map = buf
        with memoryview(buf) as whole:
            self._words = whole[:EPOCH_SIZE].cast("Q")
        if self._words[_MAGIC] != EPOCH_MAGIC:
            self._words.release()
            raise ValueError("not a Prism store epoch file (bad magic)")

    @classmethod
    def open(cls, data: Path) -> EpochFile:
        """Map DATA/meta/epoch read-write, creating it (0600) if it is missing."""
        path = epoch_path(data)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < EPOCH_SIZE:
                os.ftruncate(fd, EPOCH_SIZE)
            buf = mmap.mmap(fd, EPOCH_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        with memoryview(buf) as whole, whole[:8].cast("Q") as magic:
            if magic[0] == 0:  # new file; concurrent creators write the same word
                magic[0] = EPOCH_MAGIC
        return cls(buf, path)

    @classmethod
    def from_fd(cls, fd: int) -> EpochFile:
        """Map an epoch file read-only (a VRPC client, from the fd ATTACHED passed)."""
        return cls(mmap.mmap(fd, EPOCH_SIZE, mmap.MAP_SHARED, mmap.PROT_READ))

    @property
    def map(self) -> mmap.mmap:
        return self._map

    @property
    def begun(self) -> int:
        return int(self._words[_BEGUN])

    @property
    def ended(self) -> int:
        return int(self._words[_ENDED])

    def stable(self) -> int | None:
        """`begun` when no external writer is in progress (`begun == ended`), else None."""
        begun = self._words[_BEGUN]
        return int(begun) if self._words[_ENDED] == begun else None

    def begin(self) -> int:
        """After taking LMDB's writer lock: a write transaction begins. The new `begun`."""
        begun = (self._words[_BEGUN] + 1) & 0xFFFFFFFFFFFFFFFF
        self._words[_BEGUN] = begun
        return int(begun)

    def end(self, begun: int) -> None:
        """After the transaction begun as `begun` committed or aborted."""
        if self._words[_ENDED] < begun:
            self._words[_ENDED] = begun

    def repair(self) -> None:
        """The server, holding the writer lock: no external writer is in progress."""
        self._words[_ENDED] = self._words[_BEGUN]

    def open_readonly(self) -> int:
        """A new O_RDONLY fd of the file, to hand to a VRPC client (the caller closes it)."""
        assert self.path is not None
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        self._words.release()
        self._map.close()
