"""StoreExecutor: the server's store calls, run inline on the event loop, group-committed.

Theory of operation: store calls are short and CPU-bound, so the server runs them directly
on its event loop thread (a thread hop would cost more than most calls). Calls that change
the store run inside one open batch transaction (each in a nested transaction, so a failing
call changes nothing):

* a call that must be durable before its reply leaves (every metadata change, FILE_SYNC
  writes, COMMIT) waits for the batch to commit; the commit is scheduled with `call_soon`,
  so every request already read from the sockets joins the batch first, and they all share
  one fdatasync + one LMDB fsync (group commit);
* a call that may be answered first (an UNSTABLE write) returns at once; its batch commits
  within `max_delay` seconds, or as soon as `max_unsynced` bytes of new content wait for
  their fdatasync, whichever comes first. That bounds the data a crash can take back (the
  client resends it: the write verifier changes) and how long another process (an operator
  command) waits for LMDB's writer lock, while a stream of UNSTABLE writes pays for its
  fsyncs in large, rare steps as a local file would;
* read-only calls run in their own read transaction when no batch is open, or inside the
  open batch (so they see the batch's writes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

from prism.store.store import Store

T = TypeVar("T")
log = logging.getLogger("prism.store")


class StoreExecutor:
    def __init__(
        self, store: Store, *, max_delay: float = 0.25, max_unsynced: int = 64 << 20
    ) -> None:
        self.store = store
        self.max_delay = max_delay
        self.max_unsynced = max_unsynced
        self._waiters: list[asyncio.Future[None]] = []
        self._commit_soon: asyncio.Handle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.commits = 0
        self.calls = 0

    async def call(
        self, fn: Callable[[Store], T], *, writes: bool = False, durable: bool = False
    ) -> T:
        """Run `fn(store)`; with `durable`, return only once its effects are committed."""
        store = self.store
        self.calls += 1
        if writes and not store.in_batch:
            store.begin_batch()
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.max_delay, self._commit)
        result = fn(store)
        if not store.in_batch:
            return result
        if durable:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            if self._commit_soon is None:
                self._commit_soon = loop.call_soon(self._commit)
            await waiter
        elif store.segments.unsynced_bytes >= self.max_unsynced and self._commit_soon is None:
            self._commit_soon = asyncio.get_running_loop().call_soon(self._commit)
        return result

    def _commit(self) -> None:
        if self._commit_soon is not None:
            self._commit_soon.cancel()
            self._commit_soon = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        waiters, self._waiters = self._waiters, []
        error: BaseException | None = None
        try:
            self.store.commit()
            self.commits += 1
        except BaseException as exc:  # the batch is gone: every waiter learns it
            log.exception("commit failed")
            error = exc
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
