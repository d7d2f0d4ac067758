"""The store's cross-process write lock, taken before LMDB's writer mutex.

Theory of operation: LMDB lets one write transaction exist at a time and makes every other
writer block inside `mdb_txn_begin`, which cannot be given a timeout. A server that blocked
there would stop its event loop, and with it every read. So every Prism process takes this
lock before it begins a top-level LMDB write transaction and drops it when that transaction
ends: the server *tries* it (never blocking its loop; its writes wait asynchronously while its
reads go on in their own LMDB read transactions, which never wait for a writer), and operator
commands wait for it, for at most `wait` seconds.

Layout: two `flock`s on directories, so that taking them never needs disk space (a full disk
must not stop anyone from freeing room): an exclusive lock on `DATA/meta` is the write lock;
a shared lock on `DATA` marks its holder as *waiting* for it. A process that does not wait
yet only takes the write lock when nobody waits, so a writer that has just committed cannot
take it straight back from a waiting one (the server after a checkpoint, an operator command
after one of its bounded steps): holders alternate with waiters, and each holder keeps it only
for a bounded time (the server's batches, an import's steps).

Lock order: the journal's lock (held by its owner for its lifetime, or tried without waiting
by an operator command, inside its write transaction) -> this lock -> LMDB's writer mutex.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from prism.errors import Busy


class WriteLock:
    """One process's handle on the write lock. Not thread-safe (neither is the store)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self._waiting_fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._lock_fd = os.open(data / "meta", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._waiting_fd)
            raise
        self.held = False
        self._waiting = False

    def try_acquire(self) -> bool:
        """Take the lock if that needs no wait and nobody else waits for it; else return
        False (call again later), marking this process as waiting if the lock is held."""
        if self.held:
            return True
        if not self._waiting and self._others_wait():
            return False  # they go first
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._wait()
            return False
        self._stop_waiting()
        self.held = True
        return True

    def acquire(self, wait: float) -> None:
        """Take the lock, polling for up to `wait` seconds; Busy after that."""
        deadline = time.monotonic() + wait
        delay = 0.001
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                self._stop_waiting()
                raise Busy(
                    f"another process has held the write lock of {self.data} for {wait:.0f} s "
                    "(a `prism serve` that cannot checkpoint on a full disk, or a stalled "
                    "command); free disk space or stop that process, then retry"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def release(self) -> None:
        if self.held:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        for fd in (self._lock_fd, self._waiting_fd):
            if fd >= 0:
                os.close(fd)  # also drops the flocks
        self._lock_fd = self._waiting_fd = -1
        self.held = self._waiting = False

    def _others_wait(self) -> bool:
        try:
            fcntl.flock(self._waiting_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)
        return False

    def _wait(self) -> None:
        if not self._waiting:
            try:
                fcntl.flock(self._waiting_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # someone is probing with LOCK_EX: retry next time
                return
            self._waiting = True

    def _stop_waiting(self) -> None:
        if self._waiting:
            fcntl.flock(self._waiting_fd, fcntl.LOCK_UN)
            self._waiting = False
