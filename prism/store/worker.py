"""StoreWorker: one thread owns the Store and runs calls in group-committed batches.

Theory of operation: callers (the asyncio NFS server, possibly from several connections at
once) submit `fn(store)` closures with a `durable` flag. The worker thread drains whatever
is queued, runs each call inside one open batch transaction (each call in its own nested
transaction, so a failing call changes nothing), and then:

* answers non-durable calls (reads, UNSTABLE writes) at once;
* if any durable call ran, commits the batch (one fdatasync of new content, one LMDB fsync)
  and only then answers the durable calls. Concurrent durable calls therefore share an fsync.

A batch with only non-durable calls stays open at most `max_delay` seconds, so uncommitted
UNSTABLE data is bounded in time, and another process (an operator command) never waits
longer than that for LMDB's writer lock.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from prism.store.store import Store

T = TypeVar("T")
log = logging.getLogger("prism.store")

_STOP = object()


class StoreWorker:
    def __init__(self, store: Store, *, max_delay: float = 0.02, max_batch: int = 512) -> None:
        self.store = store
        self.max_delay = max_delay
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="prism-store", daemon=True)
        self._started = False
        self.commits = 0
        self.calls = 0

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self) -> None:
        """Commit what is pending and stop the thread (the store stays open)."""
        if self._started:
            self._queue.put(_STOP)
            self._thread.join()
            self._started = False

    def submit(self, fn: Callable[[Store], T], *, durable: bool) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((fn, future, durable))
        return future

    async def call(self, fn: Callable[[Store], T], *, durable: bool = False) -> T:
        return await asyncio.wrap_future(self.submit(fn, durable=durable))

    def call_sync(self, fn: Callable[[Store], T], *, durable: bool = False) -> T:
        return self.submit(fn, durable=durable).result()

    def flush(self) -> None:
        """Block until everything submitted so far is durable."""
        self.call_sync(lambda _s: None, durable=True)

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        store = self.store
        deadline: float | None = None
        stopping = False
        while not stopping:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                items = [self._queue.get(timeout=timeout)]
            except queue.Empty:
                items = []
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            waiting: list[tuple[Future[Any], Any]] = []
            for item in items:
                if item is _STOP:
                    stopping = True
                    continue
                fn, future, durable = item
                if not future.set_running_or_notify_cancel():
                    continue
                if not store.in_batch:
                    try:
                        store.begin_batch()
                    except Exception as exc:
                        future.set_exception(exc)
                        continue
                    deadline = time.monotonic() + self.max_delay
                self.calls += 1
                try:
                    result = fn(store)
                except BaseException as exc:
                    future.set_exception(exc)
                    continue
                if durable:
                    waiting.append((future, result))
                else:
                    future.set_result(result)
            due = deadline is not None and time.monotonic() >= deadline
            if store.in_batch and (waiting or due or stopping):
                try:
                    store.commit()
                    self.commits += 1
                except BaseException as exc:
                    log.exception("commit failed")
                    for future, _ in waiting:
                        future.set_exception(exc)
                    waiting = []
                deadline = None
            for future, result in waiting:
                future.set_result(result)
