"""StoreExecutor: the server's store calls, run inline on the event loop, group-committed.

Theory of operation: store calls are short and CPU-bound, so the server runs them directly
on its event loop thread (a thread hop would cost more than most calls). Calls that change
the store run inside one open batch transaction (each in a nested transaction, so a failing
call changes nothing):

* a call that must be durable before its reply leaves (every metadata change, FILE_SYNC
  writes, COMMIT) waits for a *durable point*, scheduled with `call_soon` so that every
  request already read from the sockets joins it first (group commit). With the store's
  journal (the server's case) a durable point appends the batch's new changes to the journal
  and fdatasyncs it; without one it commits the batch;
* a call that may be answered first (an UNSTABLE write) returns at once; a durable point
  follows once `max_unsynced` bytes of new content wait for their fdatasync;
* the batch itself commits to LMDB (a checkpoint, which retires the journal's records)
  `max_delay` seconds after it began, or once no store call has come for `idle_delay`
  seconds. That bounds how long another process (an operator command) waits for LMDB's
  writer lock or sees a state a little behind the server's, and what a crash can take back
  of UNSTABLE data (the client resends it: the write verifier changes);
* read-only calls run in their own read transaction when no batch is open, or inside the
  open batch (so they see the batch's writes).

Another process (an operator command) may hold the store's write lock: a write call then
waits for it asynchronously (`prism.store.writelock`; `try_begin_batch` never blocks), while
read-only calls go on in their own LMDB read transactions, which never wait for a writer.

A failed durable point or checkpoint (a full disk) fails every call waiting for it with the
store's error (NoSpace becomes NFS3ERR_NOSPC), never an OK: the store reopens the batch from
the journal, which keeps every change acknowledged earlier, and the executor retries the
checkpoint every `retry_delay` seconds.

Figures (for the metrics endpoint, `prism.metrics`): `flushes` times every durable point
(the journal append and its fdatasync, content first) and `checkpoints` every batch commit,
failed ones included, as latency histograms (`rpc.latency`); `lock_waits` counts the polls
for a write lock another process held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from prism.errors import StoreError
from prism.store.store import Store
from rpc.latency import Latencies

T = TypeVar("T")
log = logging.getLogger("prism.store")


class StoreExecutor:
    def __init__(
        self,
        store: Store,
        *,
        max_delay: float = 0.25,
        idle_delay: float = 0.005,
        max_unsynced: int = 64 << 20,
        retry_delay: float = 1.0,
    ) -> None:
        self.store = store
        self.max_delay = max_delay
        self.idle_delay = idle_delay
        self.max_unsynced = max_unsynced
        self.retry_delay = retry_delay
        self._waiters: list[asyncio.Future[None]] = []
        self._durable_soon: asyncio.Handle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._calls_at_idle_check = 0
        self.commits = 0
        self.calls = 0
        self.lock_waits = 0
        self.flushes = Latencies()
        self.checkpoints = Latencies()
        self._lock_poll: asyncio.Future[None] | None = None

    async def call(
        self, fn: Callable[[Store], T], *, writes: bool = False, durable: bool = False
    ) -> T:
        """Run `fn(store)`; with `durable`, return only once its effects are durable."""
        store = self.store
        self.calls += 1
        if writes and self._deadline is None:
            if not store.in_batch:
                await self._begin_batch()
            if self._deadline is None:  # not armed by a call that waited alongside
                self._arm(self.max_delay, idle=store.journal is not None)
        result = fn(store)
        if not store.in_batch:
            return result
        if durable:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            if self._durable_soon is None:
                self._durable_soon = loop.call_soon(self._make_durable)
            await waiter
        elif store.segments.unsynced_bytes >= self.max_unsynced and self._durable_soon is None:
            self._durable_soon = asyncio.get_running_loop().call_soon(self._make_durable)
        return result

    def call_now(self, fn: Callable[[Store], T]) -> T:
        """Run a read-only `fn(store)` (in the open batch, if any, so it sees its writes;
        else in one read transaction, however many store calls it makes)."""
        self.calls += 1
        with self.store.reading():
            return fn(self.store)

    async def _begin_batch(self) -> None:
        """Open the batch once the store's write lock is free. Another process may hold it
        (an operator command), and blocking on it would stop the loop's reads: one task
        polls for it on behalf of every waiting call."""
        while not self.store.try_begin_batch():
            if self._lock_poll is None:
                self._lock_poll = asyncio.ensure_future(self._poll_write_lock())
            await asyncio.shield(self._lock_poll)

    async def _poll_write_lock(self) -> None:
        delay = 0.001
        try:
            while not self.store.try_begin_batch():
                self.lock_waits += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
            if self._deadline is None:  # even if every waiting call has gone meanwhile
                self._arm(self.max_delay, idle=self.store.journal is not None)
        finally:
            self._lock_poll = None

    def resume(self) -> None:
        """Schedule the checkpoint of a batch the store opened by itself (records of a dead
        server it could not checkpoint at start-up, on a full disk)."""
        if self.store.in_batch and self._deadline is None:
            self._arm(self.retry_delay, idle=False)

    def _arm(self, delay: float, *, idle: bool) -> None:
        """Checkpoint the open batch in `delay` seconds, or (`idle`) once calls stop."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(delay, self._commit)
        if idle:
            self._calls_at_idle_check = self.calls
            self._idle = loop.call_later(self.idle_delay, self._commit_when_idle)

    def _make_durable(self) -> None:
        self._durable_soon = None
        self._settle(self.store.make_durable, self.flushes)
        if not self.store.in_batch:  # it had to checkpoint (or failed)
            self._cancel_timers()

    def _commit(self) -> None:
        if self._durable_soon is not None:
            self._durable_soon.cancel()
            self._durable_soon = None
        self._cancel_timers()
        self._settle(self.store.commit, self.checkpoints)
        self.commits += 1
        if self.store.in_batch:  # the checkpoint failed: the journal holds the batch
            self._arm(self.retry_delay, idle=False)

    def _commit_when_idle(self) -> None:
        self._idle = None
        if self.calls != self._calls_at_idle_check or self._waiters:
            self._calls_at_idle_check = self.calls
            self._idle = asyncio.get_running_loop().call_later(
                self.idle_delay, self._commit_when_idle
            )
            return
        self._commit()

    def _cancel_timers(self) -> None:
        for timer in (self._deadline, self._idle):
            if timer is not None:
                timer.cancel()
        self._deadline = self._idle = None

    def _settle(self, action: Callable[[], None], timed: Latencies) -> None:
        """Run `action` (a durable point or a commit), timed into `timed`, and release every
        waiter with its outcome."""
        waiters, self._waiters = self._waiters, []
        error: BaseException | None = None
        start = time.perf_counter()
        try:
            action()
        except StoreError as exc:  # NoSpace: the changes not yet durable are gone
            log.warning("making the store durable failed: %s", exc)
            error = exc
        except BaseException as exc:  # the batch is gone: every waiter learns it
            log.exception("making the store durable failed")
            error = exc
        timed.observe(time.perf_counter() - start)
        for waiter in waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def flush(self) -> None:
        """Commit whatever is pending now (shutdown, operator requests)."""
        if self.store.in_batch or self._waiters:
            self._commit()
