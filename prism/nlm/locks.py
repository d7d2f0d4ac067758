"""POSIX byte-range locks and DOS share reservations, as NLM serves them: pure state, no I/O.

Theory of operation: a lock is held by an `Owner` (client, svid, oh), the triple NLM names
a process by, on a file (any hashable key: the service uses the object's own identity, so
every handle that names one object contends, and nothing else does) over the half-open
byte range [start, end); `END` stands for "to end of file" (NLM length 0), so a range never
needs the file's size. Per file, the held locks obey two invariants:

* one owner's locks never overlap, and never touch when they have the same type (they are
  merged): a new lock replaces the owner's own locks over its range, so a lock over part of
  a range splits it, and a shared lock over an exclusive one downgrades it (and the
  reverse upgrades it, if no other owner holds a conflicting lock there);
* locks of different owners conflict when they overlap and either is exclusive; no two
  conflicting locks are ever held at once.

A blocking request that conflicts becomes a `Waiter` (FIFO per file). Whatever releases
bytes (`unlock`, `free_client`, `cancel` of a waiter) retries that file's waiters in order
and returns the ones now granted, so the caller can tell their clients (NLM GRANTED).
A repeated blocking request for the same waiter refreshes it; `expire` drops waiters not
refreshed within their time to live (their client went away).

Bounds: a client holds at most `max_locks` locks and share reservations together and has at
most `max_waiters` waiters; beyond that a request is answered `NOLOCKS`.

Share reservations (NLM SHARE) are per file: (owner, access, deny), where a new one
conflicts with a held one of another owner if either's access meets the other's deny.
"""

from __future__ import annotations

import bisect
import collections
import enum
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

END = 1 << 64
"""The end of every range that runs to end of file (NLM's length 0)."""
MAX_LOCKS_PER_CLIENT = 4096
"""Locks and share reservations one client may hold at once."""
MAX_WAITERS_PER_CLIENT = 256
"""Blocked lock requests one client may have queued at once."""
WAITER_TTL = 300.0
"""Seconds a waiter lives without its client repeating the request (Linux's client repeats
a blocked LOCK every 30 s)."""


class Outcome(enum.Enum):
    GRANTED = "granted"
    DENIED = "denied"  # a conflicting lock is held (non-blocking request)
    BLOCKED = "blocked"  # queued: the caller is told later
    NOLOCKS = "nolocks"  # over the client's limits


@dataclass(frozen=True, slots=True, order=True)
class Owner:
    """Who holds a lock: the client (its address), the process id and the owner handle."""

    client: str
    svid: int
    oh: bytes


@dataclass(frozen=True, slots=True)
class Lock:
    file: Hashable
    owner: Owner
    start: int
    end: int  # exclusive; END: to end of file
    exclusive: bool
    since: float = 0.0

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end

    def conflicts(self, owner: Owner, start: int, end: int, exclusive: bool) -> bool:
        return self.owner != owner and (self.exclusive or exclusive) and self.overlaps(start, end)


@dataclass(slots=True, eq=False)
class Waiter:
    """A blocked request; `token` is the caller's (e.g. what to send in GRANTED)."""

    file: Hashable
    owner: Owner
    start: int
    end: int
    exclusive: bool
    since: float
    touched: float
    token: object = None

    def same(self, file: Hashable, owner: Owner, start: int, end: int, exclusive: bool) -> bool:
        return (self.file, self.owner, self.start, self.end, self.exclusive) == (
            file,
            owner,
            start,
            end,
            exclusive,
        )


@dataclass(frozen=True, slots=True)
class Share:
    file: Hashable
    owner: Owner  # svid 0: shares are named by (client, oh)
    access: int  # bit 1 read, bit 2 write
    deny: int  # the same bits, denied to others
    since: float = 0.0


@dataclass(slots=True)
class _File:
    locks: dict[Owner, list[Lock]] = field(default_factory=dict)
    """Each owner's locks, disjoint and sorted by start (so their ends are sorted too):
    the ones overlapping a range are one slice, found by bisection."""
    waiters: collections.deque[Waiter] = field(default_factory=collections.deque)
    shares: list[Share] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.locks or self.waiters or self.shares)


def span(offset: int, length: int) -> tuple[int, int]:
    """NLM (offset, length) as [start, end): length 0, or a range past 2^64, runs to END."""
    if length == 0 or offset + length >= END:
        return offset, END
    return offset, offset + length


class LockManager:
    """Every lock, waiter and share reservation of one server; see the module docstring."""

    def __init__(
        self,
        *,
        max_locks: int = MAX_LOCKS_PER_CLIENT,
        max_waiters: int = MAX_WAITERS_PER_CLIENT,
        waiter_ttl: float = WAITER_TTL,
    ) -> None:
        self.max_locks = max_locks
        self.max_waiters = max_waiters
        self.waiter_ttl = waiter_ttl
        self._files: dict[Hashable, _File] = {}
        self._held: collections.Counter[str] = collections.Counter()  # locks + shares
        self._waiting: collections.Counter[str] = collections.Counter()

    # -- queries -------------------------------------------------------------------------

    def test(
        self, file: Hashable, owner: Owner, start: int, end: int, exclusive: bool
    ) -> Lock | None:
        """The first held lock that would conflict with this request, or None."""
        f = self._files.get(file)
        if f is None:
            return None
        for other, held in f.locks.items():
            if other == owner:
                continue
            for lk in held[_first_ending_after(held, start) : _first_starting_at(held, end)]:
                if lk.exclusive or exclusive:
                    return lk
        return None

    def locks(self) -> Iterator[Lock]:
        for f in self._files.values():
            for held in f.locks.values():
                yield from held

    def waiters(self) -> Iterator[Waiter]:
        for f in self._files.values():
            yield from f.waiters

    def shares(self) -> Iterator[Share]:
        for f in self._files.values():
            yield from f.shares

    def clients(self) -> set[str]:
        """Clients holding a lock or share reservation, or waiting for a lock."""
        return {c for c, n in self._held.items() if n} | {c for c, n in self._waiting.items() if n}

    def held_by(self, client: str) -> int:
        return self._held[client]

    # -- locks ---------------------------------------------------------------------------

    def lock(
        self,
        file: Hashable,
        owner: Owner,
        start: int,
        end: int,
        exclusive: bool,
        *,
        block: bool = False,
        now: float = 0.0,
        token: object = None,
    ) -> Outcome:
        if not 0 <= start < end <= END:
            raise ValueError(f"bad lock range [{start}, {end})")
        f = self._files.setdefault(file, _File())
        if self.test(file, owner, start, end, exclusive) is None:
            if self._apply(f, Lock(file, owner, start, end, exclusive, now)):
                self._forget_waiter(f, file, owner, start, end, exclusive)
                return Outcome.GRANTED
            self._drop_if_empty(file, f)
            return Outcome.NOLOCKS
        if not block:
            self._drop_if_empty(file, f)
            return Outcome.DENIED
        for w in f.waiters:
            if w.same(file, owner, start, end, exclusive):
                w.touched = now
                w.token = token
                return Outcome.BLOCKED
        if self._waiting[owner.client] >= self.max_waiters:
            return Outcome.NOLOCKS
        f.waiters.append(Waiter(file, owner, start, end, exclusive, now, now, token))
        self._waiting[owner.client] += 1
        return Outcome.BLOCKED

    def unlock(
        self, file: Hashable, owner: Owner, start: int, end: int, *, now: float = 0.0
    ) -> list[Waiter]:
        """Release the owner's bytes in [start, end) (nothing held is fine); the waiters
        this grants."""
        f = self._files.get(file)
        if f is None:
            return []
        self._carve(f, owner, start, end)
        return self._wake(file, f, now)

    def cancel(self, file: Hashable, owner: Owner, start: int, end: int, exclusive: bool) -> bool:
        """Withdraw a blocked request; False if there is no such waiter."""
        f = self._files.get(file)
        if f is None:
            return False
        found = self._forget_waiter(f, file, owner, start, end, exclusive)
        self._drop_if_empty(file, f)
        return found

    def free_client(self, client: str, *, now: float = 0.0) -> list[Waiter]:
        """Drop every lock, waiter and share of `client`; the waiters this grants."""
        granted: list[Waiter] = []
        for file, f in list(self._files.items()):
            before = len(f.locks) + len(f.shares)
            f.locks = {o: held for o, held in f.locks.items() if o.client != client}
            f.shares = [sh for sh in f.shares if sh.owner.client != client]
            kept = collections.deque(w for w in f.waiters if w.owner.client != client)
            if len(kept) != len(f.waiters):
                f.waiters = kept
            if len(f.locks) + len(f.shares) != before:
                granted += self._wake(file, f, now)
            else:
                self._drop_if_empty(file, f)
        self._held.pop(client, None)
        self._waiting.pop(client, None)
        return granted

    def expire(self, now: float) -> list[Waiter]:
        """Drop waiters not refreshed for `waiter_ttl` seconds; returns them."""
        dropped: list[Waiter] = []
        limit = now - self.waiter_ttl
        for file, f in list(self._files.items()):
            if any(w.touched < limit for w in f.waiters):
                dropped += [w for w in f.waiters if w.touched < limit]
                f.waiters = collections.deque(w for w in f.waiters if w.touched >= limit)
                self._drop_if_empty(file, f)
        for w in dropped:
            self._waiting[w.owner.client] -= 1
        return dropped

    # -- share reservations --------------------------------------------------------------

    def share(
        self, file: Hashable, owner: Owner, access: int, deny: int, now: float = 0.0
    ) -> Outcome:
        f = self._files.setdefault(file, _File())
        mine = [sh for sh in f.shares if sh.owner == owner]
        for sh in f.shares:
            if sh.owner != owner and (sh.access & deny or sh.deny & access):
                self._drop_if_empty(file, f)
                return Outcome.DENIED
        if not mine and self._held[owner.client] >= self.max_locks:
            self._drop_if_empty(file, f)
            return Outcome.NOLOCKS
        f.shares = [sh for sh in f.shares if sh.owner != owner]
        f.shares.append(Share(file, owner, access, deny, now))
        self._held[owner.client] += 1 - len(mine)
        return Outcome.GRANTED

    def unshare(self, file: Hashable, owner: Owner) -> None:
        f = self._files.get(file)
        if f is None:
            return
        kept = [sh for sh in f.shares if sh.owner != owner]
        self._held[owner.client] -= len(f.shares) - len(kept)
        f.shares = kept
        self._drop_if_empty(file, f)

    # -- the range algebra ---------------------------------------------------------------

    def _carve(self, f: _File, owner: Owner, start: int, end: int) -> None:
        """Remove the owner's coverage of [start, end), splitting locks that straddle it."""
        held = f.locks.get(owner)
        if not held:
            return
        i, j = _first_ending_after(held, start), _first_starting_at(held, end)
        if i >= j:
            return
        pieces = [_with(held[i], held[i].start, start)] if held[i].start < start else []
        if end < held[j - 1].end:
            pieces.append(_with(held[j - 1], end, held[j - 1].end))
        self._held[owner.client] += len(pieces) - (j - i)
        held[i:j] = pieces
        if not held:
            del f.locks[owner]

    def _apply(self, f: _File, new: Lock) -> bool:
        """Hold `new` (no conflict checked here), merging with the owner's touching locks
        of the same type; False, changing nothing, if that would exceed the client's limit."""
        owner = new.owner
        held = f.locks.setdefault(owner, [])
        # the owner's locks that overlap or touch the new range
        i, j = _first_ending_at(held, new.start), _first_starting_after(held, new.end)
        start, end, since = new.start, new.end, new.since
        pieces: list[Lock] = []
        for lk in held[i:j]:
            if lk.exclusive == new.exclusive:  # merge
                start, end, since = min(start, lk.start), max(end, lk.end), min(since, lk.since)
            elif lk.overlaps(new.start, new.end):  # the other type: keep what sticks out
                if lk.start < new.start:
                    pieces.append(_with(lk, lk.start, new.start))
                if new.end < lk.end:
                    pieces.append(_with(lk, new.end, lk.end))
            else:  # the other type, only touching
                pieces.append(lk)
        pieces.append(Lock(new.file, owner, start, end, new.exclusive, since))
        pieces.sort(key=_start)
        delta = len(pieces) - (j - i)
        if delta > 0 and self._held[owner.client] + delta > self.max_locks:
            if not held:
                del f.locks[owner]
            return False
        held[i:j] = pieces
        self._held[owner.client] += delta
        return True

    def _wake(self, file: Hashable, f: _File, now: float) -> list[Waiter]:
        """Grant, in FIFO order, every waiter that no held lock conflicts with."""
        granted: list[Waiter] = []
        for w in list(f.waiters):
            if self.test(file, w.owner, w.start, w.end, w.exclusive) is not None:
                continue
            if self._apply(f, Lock(file, w.owner, w.start, w.end, w.exclusive, now)):
                f.waiters.remove(w)
                self._waiting[w.owner.client] -= 1
                granted.append(w)
        self._drop_if_empty(file, f)
        return granted

    def _forget_waiter(
        self, f: _File, file: Hashable, owner: Owner, start: int, end: int, exclusive: bool
    ) -> bool:
        for w in f.waiters:
            if w.same(file, owner, start, end, exclusive):
                f.waiters.remove(w)
                self._waiting[owner.client] -= 1
                return True
        return False

    def _drop_if_empty(self, file: Hashable, f: _File) -> None:
        if f.empty():
            self._files.pop(file, None)


def _with(lk: Lock, start: int, end: int) -> Lock:
    return Lock(lk.file, lk.owner, start, end, lk.exclusive, lk.since)


def _start(lk: Lock) -> int:
    return lk.start


def _end(lk: Lock) -> int:
    return lk.end


def _first_ending_after(held: list[Lock], at: int) -> int:
    """Index of the first lock with end > at (in one owner's sorted, disjoint locks)."""
    return bisect.bisect_right(held, at, key=_end)


def _first_ending_at(held: list[Lock], at: int) -> int:
    """Index of the first lock with end >= at."""
    return bisect.bisect_left(held, at, key=_end)


def _first_starting_at(held: list[Lock], at: int) -> int:
    """Index of the first lock with start >= at."""
    return bisect.bisect_left(held, at, key=_start)


def _first_starting_after(held: list[Lock], at: int) -> int:
    """Index of the first lock with start > at."""
    return bisect.bisect_right(held, at, key=_start)


def covered(locks: Iterable[Lock], limit: int) -> dict[int, dict[Owner, bool]]:
    """Byte -> {owner: exclusive} for bytes below `limit` (for tests and tools)."""
    out: dict[int, dict[Owner, bool]] = {}
    for lk in locks:
        for b in range(lk.start, min(lk.end, limit)):
            out.setdefault(b, {})[lk.owner] = lk.exclusive
    return out
