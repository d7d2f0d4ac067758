"""Which stream connections a server keeps: connection caps and stalled records, sans-IO.

Theory of operation: every stream connection a server accepts (on any of its listeners) is
registered in one `ConnectionTable` under its peer address, with whether that address is
*bound*: the service's policy (`is_bound`) says whether the address may use the server at
all (for Prism: whether it is bound to some VM). Unbound peers can only probe, so they are
the first to go:

* a peer that already has `max_per_address` connections is refused another;
* at `max_connections` an unbound newcomer is refused, and a bound newcomer evicts the
  unbound connection admitted first (or is refused when every connection is bound);
* a connection that holds an incomplete record and has received nothing for
  `record_timeout` seconds while the server was reading it is stalled: `expired(now)`
  returns it for the transport to close (a half-sent record pins its buffer and its file
  descriptor for nothing).

The transport tells the table when a connection starts or stops waiting for the rest of a
record (`waiting`); time comes in as arguments, so the table does no I/O and keeps no clock.
Whether an address is bound is decided once, at admission; a later change of bindings
affects only which connections go first.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

MAX_CONNECTIONS = 65536
"""Default cap on stream connections; transports lower it to what the process's file
descriptor limit leaves (see `rpc.transport.connection_budget`)."""
FD_RESERVE = 512
"""File descriptors kept out of the default connection budget: the store's (LMDB, the
journal, up to 257 open segments), listeners, logs, the metrics endpoint."""
MAX_PER_ADDRESS = 512
"""Default cap on stream connections from one address. Generous: a client opens one or two
per program it uses, and the tests open tens from 127.0.0.1."""
RECORD_TIMEOUT = 30.0
"""Default seconds an incomplete record may go without new bytes before its connection is
closed."""

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = MAX_CONNECTIONS
    max_per_address: int = MAX_PER_ADDRESS
    record_timeout: float = RECORD_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_address < 1:
            raise ValueError("connection limits must be at least 1")
        if self.record_timeout <= 0:
            raise ValueError("record_timeout must be positive")


class Entry(Generic[K]):
    """One admitted connection."""

    __slots__ = ("bound", "conn", "host", "stalled_since")

    def __init__(self, conn: K, host: str, bound: bool) -> None:
        self.conn = conn
        self.host = host
        self.bound = bound
        self.stalled_since: float | None = None  # waiting for the peer since then


class ConnectionTable(Generic[K]):
    """The connections of one server; see the module docstring."""

    def __init__(
        self,
        limits: ConnectionLimits = ConnectionLimits(),
        is_bound: Callable[[str], bool] = lambda host: True,
    ) -> None:
        self.limits = limits
        self.is_bound = is_bound
        self._entries: set[Entry[K]] = set()
        self._unbound: dict[Entry[K], None] = {}  # in admission order: eviction order
        self._per_host: collections.Counter[str] = collections.Counter()
        self._stalled: set[Entry[K]] = set()
        self.refused = 0
        self.evicted = 0
        self.expired_count = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry[K]]:
        return iter(list(self._entries))

    def count(self, host: str) -> int:
        return self._per_host[host]

    @property
    def stalled(self) -> int:
        """Connections waiting for the rest of a record."""
        return len(self._stalled)

    def admit(self, conn: K, host: str) -> tuple[Entry[K] | None, list[K]]:
        """Register `conn` from `host`: its entry (None: refused, close it) and the
        connections to close to make room for it."""
        limits = self.limits
        if self._per_host[host] >= limits.max_per_address:
            self.refused += 1
            return None, []
        bound = self.is_bound(host)
        evict: list[K] = []
        if len(self._entries) >= limits.max_connections:
            if not bound or not self._unbound:
                self.refused += 1
                return None, []
            victim = next(iter(self._unbound))
            self.release(victim)
            self.evicted += 1
            evict.append(victim.conn)
        entry = Entry(conn, host, bound)
        self._entries.add(entry)
        self._per_host[host] += 1
        if not bound:
            self._unbound[entry] = None
        return entry, evict

    def release(self, entry: Entry[K]) -> None:
        """Forget a connection (closed, or chosen to be closed); idempotent."""
        if entry not in self._entries:
            return
        self._entries.discard(entry)
        self._unbound.pop(entry, None)
        self._stalled.discard(entry)
        self._per_host[entry.host] -= 1
        if self._per_host[entry.host] <= 0:
            del self._per_host[entry.host]

    def waiting(self, entry: Entry[K], since: float | None) -> None:
        """The connection waits for the peer to complete a record, having last received
        bytes at `since`; None: it does not (no partial record, or we stopped reading)."""
        entry.stalled_since = since
        if since is None:
            self._stalled.discard(entry)
        elif entry in self._entries:
            self._stalled.add(entry)

    def expired(self, now: float) -> list[K]:
        """Connections stalled for `record_timeout` or more; they are released."""
        limit = now - self.limits.record_timeout
        out = [e for e in self._stalled if e.stalled_since is not None and e.stalled_since <= limit]
        for entry in out:
            self.release(entry)
        self.expired_count += len(out)
        return [e.conn for e in out]
