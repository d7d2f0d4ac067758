"""Transport-independent ONC-RPC dispatch: one record in, one reply record (or none) out.

Theory of operation: a program is a table. `Program.versions[vers][proc]` is a `Procedure`
row (number, name, handler, `idempotent` flag); anything not in the table is answered by the
table's shape alone: an unknown program gets PROG_UNAVAIL, an unknown version PROG_MISMATCH
with the lowest and highest registered versions, an unknown procedure PROC_UNAVAIL.

`RpcDispatcher.dispatch(record, peer, transport)` decodes the call header (`rpc.message`),
checks the credential flavor, looks the procedure up and awaits its handler:

    async def handler(ctx: CallContext, args: bytes) -> bytes   # encoded results

A row may also carry an `immediate` handler, the same work done without waiting; transports
call `handle_now`, which answers such calls (and every error) synchronously and returns an
awaitable only for calls that may wait.

A handler reports failure by raising: `GarbageArgs` or `rpc.xdr.XdrError` -> GARBAGE_ARGS,
`AuthFailure(stat)` -> MSG_DENIED/AUTH_ERROR, `DropCall` -> no reply (the client retries);
any other exception -> SYSTEM_ERR plus a logged traceback. The dispatcher never raises.

Procedures flagged `idempotent=False` go through the `DuplicateRequestCache`: a
retransmission of a completed call is answered with the original reply bytes without running
the handler again, and one arriving while the original still runs is dropped.

`dispatcher.stats` counts calls, errors and latency (a histogram, `rpc.latency`) per (prog,
vers, proc) and outcomes by name, for a metrics endpoint to read. An error is any reply other
than OK: an RPC-level failure (GARBAGE_ARGS, SYSTEM_ERR...), or a SUCCESS whose results carry
a non-OK status of the program's own (NFS3ERR_NOENT, MNT3ERR_ACCES...), which the `StatusOf`
given with the program at `add_program` reads from the encoded results.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import xxhash

from rpc.latency import Latencies
from rpc.message import (
    AcceptStat,
    AuthFlavor,
    AuthStat,
    AuthSys,
    RpcDecodeError,
    RpcVersionMismatch,
    decode_call,
    encode_accepted,
    encode_auth_error,
    encode_prog_mismatch,
)
from rpc.xdr import XdrError

log = logging.getLogger(__name__)

TRANSPORT_TCP = "tcp"
TRANSPORT_UDP = "udp"
TRANSPORT_SHM = "shm"

DRC_MAX_ENTRIES = 8192
DRC_MAX_AGE = 120.0
"""Seconds a completed reply stays in the duplicate request cache."""
DRC_MAX_BYTES = 32 * 1024 * 1024
"""Total reply bytes the duplicate request cache may hold."""

DEFAULT_FLAVORS = frozenset({AuthFlavor.AUTH_NONE, AuthFlavor.AUTH_SYS})


class GarbageArgs(Exception):
    """Raised by a handler whose arguments do not decode: answered with GARBAGE_ARGS."""


class AuthFailure(Exception):
    """Raised by a handler to answer MSG_DENIED / AUTH_ERROR with `stat`."""

    def __init__(self, stat: AuthStat, message: str = "") -> None:
        super().__init__(message or stat.name)
        self.stat = stat


class DropCall(Exception):
    """Raised by a handler to send no reply at all (the client will retransmit)."""


class CallContext(NamedTuple):
    """What a handler knows about the call besides its arguments. (A NamedTuple, immutable
    like a frozen dataclass but built in a third of its time: the dispatcher makes one per
    call.)"""

    xid: int
    prog: int
    vers: int
    proc: int
    flavor: int
    auth_sys: AuthSys | None
    peer: tuple[str, int]
    transport: str
    binding: int | None = None
    """The VM (namespace id) a VRPC channel is bound to; None on TCP and UDP."""


Handler = Callable[[CallContext, bytes], Awaitable[bytes]]
ImmediateHandler = Callable[[CallContext, bytes], bytes]
Outcome = tuple[bytes | None, bool]
"""(reply record or None, whether a stream transport should close the connection)"""
StatusOf = Callable[[int, bytes], str | None]
"""How a program's results report failure: (procedure, encoded results) -> the name of the
non-OK status they carry, or None (OK, or a procedure whose results carry no status)."""


@dataclass(frozen=True, slots=True)
class Procedure:
    """One row of a program's table.

    `immediate`, when given, does the same work as `handler` without ever waiting; the
    dispatcher then answers the call synchronously (`handle_now`), sparing the coroutines
    and event-loop work that most calls (GETATTR, LOOKUP, READ...) never need.
    """

    number: int
    name: str
    handler: Handler
    idempotent: bool = True
    immediate: ImmediateHandler | None = None


@dataclass(frozen=True, slots=True)
class Program:
    """An RPC program: `versions[vers][proc] -> Procedure`."""

    number: int
    name: str
    versions: Mapping[int, Mapping[int, Procedure]]

    def __post_init__(self) -> None:
        if not self.versions:
            raise ValueError(f"program {self.name} has no versions")
        for vers, procs in self.versions.items():
            for number, procedure in procs.items():
                if number != procedure.number:
                    raise ValueError(
                        f"{self.name} v{vers}: {procedure.name} is filed under {number} "
                        f"but numbered {procedure.number}"
                    )

    @property
    def low(self) -> int:
        return min(self.versions)

    @property
    def high(self) -> int:
        return max(self.versions)


def procedure_table(procedures: Iterable[Procedure]) -> dict[int, Procedure]:
    """Index procedures by number, refusing duplicates."""
    table: dict[int, Procedure] = {}
    for procedure in procedures:
        if procedure.number in table:
            raise ValueError(f"procedure number {procedure.number} appears twice")
        table[procedure.number] = procedure
    return table


async def null_handler(ctx: CallContext, args: bytes) -> bytes:
    """Procedure 0 of every program: no arguments, no results."""
    return b""


NULL_PROCEDURE = Procedure(0, "NULL", null_handler)


# --------------------------------------------------------------------------- DRC


class DrcState(enum.Enum):
    NEW = "new"  # not seen: run it, then call complete() or abandon()
    IN_PROGRESS = "in-progress"  # the original is still running: drop the retransmission
    DONE = "done"  # answer with the cached reply


DrcKey = tuple[str, int, int, int, int, int, int]


class _DrcEntry:
    __slots__ = ("reply", "when")

    def __init__(self, when: float, reply: bytes | None) -> None:
        self.when = when
        self.reply = reply


class DuplicateRequestCache:
    """Bounded cache of replies to non-idempotent calls, keyed by `DuplicateRequestCache.key`.

    Entries are kept in the order they were last written; the oldest go first when the cache
    holds more than `max_entries` entries or `max_bytes` reply bytes, and any entry older than
    `max_age` seconds is forgotten.
    """

    def __init__(
        self,
        max_entries: int = DRC_MAX_ENTRIES,
        max_age: float = DRC_MAX_AGE,
        max_bytes: int = DRC_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: collections.OrderedDict[DrcKey, _DrcEntry] = collections.OrderedDict()
        self._bytes = 0

    @staticmethod
    def key(host: str, xid: int, prog: int, vers: int, proc: int, args: bytes) -> DrcKey:
        return (host, xid, prog, vers, proc, len(args), xxhash.xxh3_64_intdigest(args))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        """Reply bytes currently held."""
        return self._bytes

    def begin(self, key: DrcKey) -> tuple[DrcState, bytes | None]:
        """Look a call up; a NEW call is recorded as in progress."""
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.reply is None:
                return DrcState.IN_PROGRESS, None
            return DrcState.DONE, entry.reply
        self._entries[key] = _DrcEntry(now, None)
        self._evict()
        return DrcState.NEW, None

    def complete(self, key: DrcKey, reply: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None and old.reply is not None:
            self._bytes -= len(old.reply)
        self._entries[key] = _DrcEntry(self._clock(), reply)
        self._bytes += len(reply)
        self._evict()

    def abandon(self, key: DrcKey) -> None:
        """Forget a call that produced no reply, so its retransmission runs again."""
        old = self._entries.pop(key, None)
        if old is not None and old.reply is not None:
            self._bytes -= len(old.reply)

    def _expire(self, now: float) -> None:
        limit = now - self.max_age
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.when > limit:
                break
            del entries[key]
            if entry.reply is not None:
                self._bytes -= len(entry.reply)

    def _evict(self) -> None:
        entries = self._entries
        while entries and (len(entries) > self.max_entries or self._bytes > self.max_bytes):
            _, entry = entries.popitem(last=False)
            if entry.reply is not None:
                self._bytes -= len(entry.reply)


# --------------------------------------------------------------------------- stats


@dataclass(slots=True)
class ProcStats:
    program: str
    name: str
    calls: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    """Replies other than OK by status: the program's own status of a SUCCESS reply
    (`StatusOf`), else the RPC outcome (GARBAGE_ARGS, SYSTEM_ERR, AUTH_ERROR, DROPPED)."""
    latency: Latencies = field(default_factory=Latencies)
    """Handler latencies: from the handler's start to its encoded reply."""


@dataclass(slots=True)
class DispatcherStats:
    """Live counters. `procs` is keyed by (prog, vers, proc); `outcomes` by outcome name:
    an `AcceptStat` name, "RPC_MISMATCH", "AUTH_ERROR", "DROPPED", "UNDECODABLE",
    "DRC_HIT" or "DRC_IN_PROGRESS"."""

    procs: dict[tuple[int, int, int], ProcStats] = field(default_factory=dict)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)


# --------------------------------------------------------------------------- dispatcher


class RpcDispatcher:
    """Routes call records to registered programs; see the module docstring."""

    def __init__(
        self,
        *,
        drc: DuplicateRequestCache | None = None,
        flavors: Iterable[int] = DEFAULT_FLAVORS,
    ) -> None:
        self._programs: dict[int, Program] = {}
        self._status_of: dict[int, StatusOf] = {}
        self.drc = drc if drc is not None else DuplicateRequestCache()
        self.flavors = frozenset(flavors)
        self.stats = DispatcherStats()

    def add_program(self, program: Program, status_of: StatusOf | None = None) -> None:
        """Serve `program`; `status_of` reads the status its results carry, so that replies
        with a non-OK one count as errors (without it only RPC-level failures do)."""
        if program.number in self._programs:
            raise ValueError(f"program {program.number} ({program.name}) is already registered")
        self._programs[program.number] = program
        if status_of is not None:
            self._status_of[program.number] = status_of

    async def dispatch(self, record: bytes, peer: tuple[str, int], transport: str) -> bytes | None:
        """The unframed reply record for `record`, or None to send nothing."""
        reply, _ = await self.handle(record, peer, transport)
        return reply

    async def handle(self, record: bytes, peer: tuple[str, int], transport: str) -> Outcome:
        """Like `dispatch`, plus whether a stream transport should close the connection
        (true only for records that are not decodable calls, as Linux's sunrpc does)."""
        outcome = self.handle_now(record, peer, transport)
        if type(outcome) is tuple:
            return outcome
        return await cast(Awaitable[Outcome], outcome)

    def handle_now(
        self, record: bytes, peer: tuple[str, int], transport: str, binding: int | None = None
    ) -> Outcome | Awaitable[Outcome]:
        """The outcome of `record` when it can be had without waiting (every error, and
        calls to procedures with an `immediate` handler), else an awaitable of it.
        `binding` is the VM a shared-memory channel is bound to (`CallContext.binding`)."""
        outcomes = self.stats.outcomes
        try:
            header, args = decode_call(record)
        except RpcDecodeError as exc:
            log.debug("%s from %s: %s", type(exc).__name__, peer, exc)
            if exc.reply is None:
                outcomes["UNDECODABLE"] += 1
                return None, True
            outcomes["RPC_MISMATCH" if isinstance(exc, RpcVersionMismatch) else "AUTH_ERROR"] += 1
            return exc.reply, False
        xid = header.xid
        if header.cred.flavor not in self.flavors:
            outcomes["AUTH_ERROR"] += 1
            return encode_auth_error(xid, AuthStat.AUTH_BADCRED), False
        program = self._programs.get(header.prog)
        if program is None:
            outcomes["PROG_UNAVAIL"] += 1
            return encode_accepted(xid, AcceptStat.PROG_UNAVAIL), False
        procs = program.versions.get(header.vers)
        if procs is None:
            outcomes["PROG_MISMATCH"] += 1
            return encode_prog_mismatch(xid, program.low, program.high), False
        procedure = procs.get(header.proc)
        if procedure is None:
            outcomes["PROC_UNAVAIL"] += 1
            return encode_accepted(xid, AcceptStat.PROC_UNAVAIL), False
        ctx = CallContext(
            xid,
            header.prog,
            header.vers,
            header.proc,
            header.cred.flavor,
            header.auth_sys,
            peer,
            transport,
            binding,
        )
        if procedure.idempotent:
            if procedure.immediate is not None:
                return self._run_now(procedure, ctx, args), False
            return self._handle_idempotent(procedure, ctx, args)
        return self._handle_once(procedure, ctx, args)

    async def _handle_idempotent(
        self, procedure: Procedure, ctx: CallContext, args: bytes
    ) -> Outcome:
        return await self._run(procedure, ctx, args), False

    async def _handle_once(self, procedure: Procedure, ctx: CallContext, args: bytes) -> Outcome:
        """A non-idempotent call, through the duplicate request cache."""
        key = DuplicateRequestCache.key(ctx.peer[0], ctx.xid, ctx.prog, ctx.vers, ctx.proc, args)
        state, cached = self.drc.begin(key)
        if state is DrcState.DONE:
            self.stats.outcomes["DRC_HIT"] += 1
            return cached, False
        if state is DrcState.IN_PROGRESS:
            self.stats.outcomes["DRC_IN_PROGRESS"] += 1
            return None, False
        reply = None
        try:
            if procedure.immediate is not None:
                reply = self._run_now(procedure, ctx, args)
            else:
                reply = await self._run(procedure, ctx, args)
        finally:
            if reply is None:
                self.drc.abandon(key)
            else:
                self.drc.complete(key, reply)
        return reply, False

    async def _run(self, procedure: Procedure, ctx: CallContext, args: bytes) -> bytes | None:
        start = time.perf_counter()
        try:
            body: bytes | Exception = await procedure.handler(ctx, args)
        except Exception as exc:
            body = exc
        return self._reply(procedure, ctx, body, start)

    def _run_now(self, procedure: Procedure, ctx: CallContext, args: bytes) -> bytes | None:
        assert procedure.immediate is not None
        start = time.perf_counter()
        try:
            body: bytes | Exception = procedure.immediate(ctx, args)
        except Exception as exc:
            body = exc
        return self._reply(procedure, ctx, body, start)

    def _reply(
        self, procedure: Procedure, ctx: CallContext, body: bytes | Exception, start: float
    ) -> bytes | None:
        """The reply to a call whose handler returned `body` (or raised it), counted."""
        status = None
        if isinstance(body, Exception):
            reply, outcome = self._failed(procedure, ctx, body)
            status = outcome
        else:
            reply, outcome = encode_accepted(ctx.xid, AcceptStat.SUCCESS, body), "SUCCESS"
            status_of = self._status_of.get(ctx.prog)
            if status_of is not None:
                status = status_of(ctx.proc, body)
        self._count(procedure, ctx, outcome, status, time.perf_counter() - start)
        return reply

    def _failed(
        self, procedure: Procedure, ctx: CallContext, exc: Exception
    ) -> tuple[bytes | None, str]:
        """The reply (and outcome name) for a handler that raised `exc`."""
        if isinstance(exc, (GarbageArgs, XdrError)):
            log.debug("%s from %s: garbage args: %s", procedure.name, ctx.peer, exc)
            return encode_accepted(ctx.xid, AcceptStat.GARBAGE_ARGS), "GARBAGE_ARGS"
        if isinstance(exc, AuthFailure):
            return encode_auth_error(ctx.xid, exc.stat), "AUTH_ERROR"
        if isinstance(exc, DropCall):
            return None, "DROPPED"
        log.error(
            "%s (prog %d vers %d proc %d) failed for %s",
            procedure.name,
            ctx.prog,
            ctx.vers,
            ctx.proc,
            ctx.peer,
            exc_info=exc,
        )
        return encode_accepted(ctx.xid, AcceptStat.SYSTEM_ERR), "SYSTEM_ERR"

    def _count(
        self,
        procedure: Procedure,
        ctx: CallContext,
        outcome: str,
        status: str | None,
        elapsed: float,
    ) -> None:
        """Count a call: its outcome, and `status` (None: OK) as an error of its procedure."""
        key = (ctx.prog, ctx.vers, ctx.proc)
        stats = self.stats.procs.get(key)
        if stats is None:
            program = self._programs[ctx.prog].name
            stats = self.stats.procs[key] = ProcStats(program, procedure.name)
        stats.calls += 1
        stats.latency.observe(elapsed)
        if status is not None:
            stats.errors[status] += 1
        self.stats.outcomes[outcome] += 1
