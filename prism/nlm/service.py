"""The NLM (100021 v1, v3, v4) and NSM (100024 v1) programs over the lock manager.

Theory of operation: `NlmService.program()` is one table for the three NLM versions (v1
lacks SHARE, UNSHARE, NM_LOCK and FREE_ALL); a row names the procedure, its argument type
and its handler, and for the `_MSG` forms the `_RES` procedure that carries the result back:
such a call is answered with an empty reply at once and its result is sent as a call to the
client's own NLM service, found through the client's portmapper. Versions 1 and 3 differ
from 4 only in 32-bit offsets (`prism.nlm.types`) and in knowing no status beyond DEADLCK.

Every file handle goes through the NFS service's own check (`NfsService.object_of`: MAC,
and the caller's address bound to the handle's VM), and a lock is held on the object's own
identity (`Store.identity`): every handle naming one object, through a `prism share` or
not, contends; objects that merely share deduplicated content do not. A client is its
address; a lock owner is (address, svid, oh), as `prism.nlm.locks` defines.

A blocked LOCK is queued; when it is granted the server calls the client's NLM GRANTED
procedure (at most `CALLBACK_ATTEMPTS` times, backing off) and releases the lock again if
the client cannot be reached or declines it. While that call is pending, the client's
repeated LOCK for the same range (Linux repeats a blocked LOCK every 30 s) answers GRANTED
and settles it, and its CANCEL releases the lock, as a cancelled wait must leave nothing
held. Waiters not repeated by their client for `WAITER_TTL` seconds are dropped.

Restarts (NSM): before a client is granted anything it is recorded in the data directory
(`prism.nlm.monitor`). On start the state number moves on; if clients were recorded, the
server runs a grace period (`--grace`, default 90 s) during which only reclaims are granted,
and sends each client SM_NOTIFY so it reclaims. A client that sends us SM_NOTIFY (it
rebooted) or FREE_ALL loses every lock it held.

For `prism locks`, the server keeps `nlm/locks.json` current (rewritten at most every
`SNAPSHOT_DELAY` seconds after a change, removed on a clean stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prism.errors import PermissionDenied, ReadOnly, StoreError
from prism.nfs.handles import BadHandle
from prism.nfs.service import NfsService
from prism.nlm.locks import END, LockManager, Outcome, Owner, Waiter, span
from prism.nlm.monitor import DEFAULT_GRACE, Monitor
from prism.nlm.types import (
    NLM_PROGRAM,
    NLM_V1,
    NLM_V3,
    NLM_V4,
    NSM_PROGRAM,
    NSM_V1,
    CancArgs,
    LockArgs,
    Mon,
    MonId,
    MyId,
    NlmHolder,
    NlmLock,
    NlmProc,
    NlmStat,
    Notify,
    NsmProc,
    NsmResult,
    Res,
    ShareArgs,
    ShareRes,
    SmName,
    SmStat,
    SmStatRes,
    StatChge,
    TestArgs,
    TestRes,
    UnlockArgs,
    decode,
    encode,
)
from rpc.client import RpcClient, RpcError
from rpc.portmap import IPPROTO_TCP, IPPROTO_UDP, PMAP_PORT, is_loopback, pmap_getport
from rpc.server import (
    TRANSPORT_UDP,
    CallContext,
    Procedure,
    Program,
    procedure_table,
)

log = logging.getLogger("prism.nlm")

CALLBACK_ATTEMPTS = 4
"""Calls (GRANTED, _RES, SM_NOTIFY) to a client before giving up on it."""
CALLBACK_BACKOFF = 1.0
"""Seconds before the second attempt; doubled for each one after."""
CALLBACK_TIMEOUT = 5.0
MAX_CLIENTS = 1024
"""Client addresses that may hold or wait for locks at once (each is limited by
`prism.nlm.locks`); a new one beyond this gets DENIED_NOLOCKS."""
EXPIRE_EVERY = 30.0
SNAPSHOT_DELAY = 0.2
SNAPSHOT_ROWS = 10_000
"""Locks, waiters and shares `nlm/locks.json` lists at most (it counts the rest)."""

CallbackFn = Callable[[str, int, int, int, bytes, str], bytes]
"""(host, prog, vers, proc, args, transport) -> results: one RPC call to a client."""


def call_client(host: str, prog: int, vers: int, proc: int, args: bytes, transport: str) -> bytes:
    """One call to a program of `host`, found through its portmapper (blocking)."""
    prot = IPPROTO_UDP if transport == TRANSPORT_UDP else IPPROTO_TCP
    transport = "udp" if prot == IPPROTO_UDP else "tcp"
    port = pmap_getport(host, prog, vers, prot, PMAP_PORT, transport=transport, timeout=2.0)
    if not port:
        raise RpcError(f"{host} has no program {prog} v{vers} registered")
    with RpcClient(host, port, prog, vers, transport=transport, timeout=CALLBACK_TIMEOUT) as client:
        return client.call(proc, args)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a waiter needs to tell its client when it is granted (the GRANTED args)."""

    vers: int
    transport: str
    cookie: bytes
    exclusive: bool
    alock: NlmLock


@dataclass(slots=True)
class NlmStats:
    granted: int = 0
    denied: int = 0
    blocked: int = 0
    waits_granted: int = 0
    wait_seconds: float = 0.0
    callbacks_failed: int = 0
    released_by_notify: int = 0
    grace_refused: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


_STAT = {
    Outcome.GRANTED: NlmStat.GRANTED,
    Outcome.DENIED: NlmStat.DENIED,
    Outcome.BLOCKED: NlmStat.BLOCKED,
    Outcome.NOLOCKS: NlmStat.DENIED_NOLOCKS,
}
_MSG_RES = {
    NlmProc.TEST_MSG: NlmProc.TEST_RES,
    NlmProc.LOCK_MSG: NlmProc.LOCK_RES,
    NlmProc.CANCEL_MSG: NlmProc.CANCEL_RES,
    NlmProc.UNLOCK_MSG: NlmProc.UNLOCK_RES,
}


class _Refused(Exception):
    def __init__(self, stat: NlmStat) -> None:
        super().__init__(stat.name)
        self.stat = stat


def _key(file: Hashable, owner: Owner, start: int, end: int, exclusive: bool) -> tuple[Any, ...]:
    return (file, owner, start, end, exclusive)


def _lock_range(host: str, alock: NlmLock) -> tuple[Owner, int, int]:
    """The owner and the [start, end) range that `alock`, sent from `host`, names."""
    start, end = span(alock.offset, alock.length)
    return Owner(host, alock.svid, alock.oh), start, end


def _length(start: int, end: int) -> int:
    return 0 if end == END else end - start


class NlmService:
    """Lock state of one server and its NLM and NSM programs; see the module docstring."""

    def __init__(
        self,
        nfs: NfsService,
        monitor: Monitor,
        *,
        grace: float = DEFAULT_GRACE,
        manager: LockManager | None = None,
        callback: CallbackFn = call_client,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nfs = nfs
        self.monitor = monitor
        self.grace = grace
        self.manager = manager or LockManager()
        self.callback = callback
        self.clock = clock
        self.grace_until = 0.0
        self.stats = NlmStats()
        self.names: dict[str, str] = {}  # client address -> caller name it gave
        self._tasks: set[asyncio.Task[Any]] = set()
        self._telling: dict[tuple[Any, ...], asyncio.Future[Any]] = {}
        """Granted waiters whose client has not yet acknowledged, by `_key`."""
        self._vm_names: dict[int, str] = {}
        self._recording = asyncio.Lock()
        """Held from checking the monitored list to changing it (`_monitor`)."""
        self._snapshot_due: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Move the NSM state on; with clients to reclaim, start grace and notify them."""
        await asyncio.to_thread(self.monitor.restart)
        clients = list(self.monitor.clients.values())
        if clients and self.grace > 0:
            self.grace_until = self.clock() + self.grace
            log.info("lock grace period: %g s for %d clients to reclaim", self.grace, len(clients))
        for client in clients:
            self.names[client.address] = client.name
            self._spawn(self._notify(client.address))
        self._expiry = asyncio.get_running_loop().call_later(EXPIRE_EVERY, self._expire)
        self._write_snapshot()

    async def stop(self) -> None:
        for handle in (self._expiry, self._snapshot_due):
            if handle is not None:
                handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.monitor.locks_path)

    def in_grace(self) -> bool:
        return self.clock() < self.grace_until

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- programs ------------------------------------------------------------------------

    def program(self) -> Program:
        P = NlmProc
        rows = [
            self._row(P.NULL, None, None),
            self._row(P.TEST, TestArgs, self.test),
            self._row(P.LOCK, LockArgs, self.lock, idempotent=False),
            self._row(P.CANCEL, CancArgs, self.cancel, idempotent=False),
            self._row(P.UNLOCK, UnlockArgs, self.unlock, idempotent=False),
            self._row(P.GRANTED, TestArgs, self.granted_to_us),
            self._row(P.TEST_MSG, TestArgs, self.test),
            self._row(P.LOCK_MSG, LockArgs, self.lock, idempotent=False),
            self._row(P.CANCEL_MSG, CancArgs, self.cancel, idempotent=False),
            self._row(P.UNLOCK_MSG, UnlockArgs, self.unlock, idempotent=False),
            self._row(P.GRANTED_MSG, TestArgs, None),
            self._row(P.TEST_RES, TestRes, None),
            self._row(P.LOCK_RES, Res, None),
            self._row(P.CANCEL_RES, Res, None),
            self._row(P.UNLOCK_RES, Res, None),
            self._row(P.GRANTED_RES, Res, None),
        ]
        later = [
            self._row(P.SHARE, ShareArgs, self.share, idempotent=False),
            self._row(P.UNSHARE, ShareArgs, self.unshare, idempotent=False),
            self._row(P.NM_LOCK, LockArgs, self.nm_lock, idempotent=False),
            self._row(P.FREE_ALL, Notify, self.free_all, idempotent=False),
        ]
        v1 = procedure_table(rows)
        v3 = procedure_table(rows + later)
        return Program(NLM_PROGRAM, "nlm", {NLM_V1: v1, NLM_V3: v3, NLM_V4: v3})

    def _row(
        self,
        proc: NlmProc,
        args_type: Any,
        fn: Callable[[CallContext, Any], Any] | None,
        *,
        idempotent: bool = True,
    ) -> Procedure:
        """A row: decode `args_type`, run `fn` (None: a void procedure), encode; `_MSG`
        procedures answer empty and send the result to the client's `_RES` procedure."""
        res_proc = _MSG_RES.get(proc)

        async def handler(ctx: CallContext, data: bytes) -> bytes:
            wide = ctx.vers == NLM_V4
            args = decode(args_type, data, wide) if args_type is not None else None
            if fn is None:
                return b""
            result = fn(ctx, args)
            if asyncio.iscoroutine(result):
                result = await result
            if result is None:
                return b""
            body = encode(result, wide)
            if res_proc is None:
                return body
            self._spawn(self._send(ctx.peer[0], ctx.vers, int(res_proc), body, ctx.transport))
            return b""

        return Procedure(int(proc), proc.name, handler, idempotent)

    def nsm_program(self) -> Program:
        N = NsmProc

        def row(proc: NsmProc, args_type: Any, fn: Callable[[CallContext, Any], Any]) -> Procedure:
            async def handler(ctx: CallContext, data: bytes) -> bytes:
                args = decode(args_type, data) if args_type is not None else None
                result = fn(ctx, args)
                return b"" if result is None else encode(result)

            return Procedure(int(proc), proc.name, handler, proc != N.NOTIFY)

        rows = [
            row(N.NULL, None, lambda ctx, a: None),
            row(N.STAT, SmName, lambda ctx, a: SmStatRes(NsmResult.STAT_SUCC, self.monitor.state)),
            # This NSM monitors only the clients of its own lock manager.
            row(N.MON, Mon, lambda ctx, a: SmStatRes(NsmResult.STAT_FAIL, self.monitor.state)),
            row(N.UNMON, MonId, lambda ctx, a: SmStat(self.monitor.state)),
            row(N.UNMON_ALL, MyId, lambda ctx, a: SmStat(self.monitor.state)),
            row(N.SIMU_CRASH, None, lambda ctx, a: None),
            row(N.NOTIFY, StatChge, self.sm_notify),
        ]
        return Program(NSM_PROGRAM, "status", {NSM_V1: procedure_table(rows)})

    # -- helpers -------------------------------------------------------------------------

    def _file(self, host: str, fh: bytes, *, exclusive: bool = False) -> Hashable:
        """The lock key of the object `fh` names, if `host` may use it. As knfsd (which
        opens the file for writing to lock it exclusively), a read-only export grants shared
        locks and refuses exclusive ones (LOCK and TEST): NLM4_ROFS (DENIED before v4).
        UNLOCK and CANCEL always pass, so what was held or queued before can be let go."""
        nfs = self.nfs

        def run(s: Any) -> Any:
            return s.identity(nfs.object_of(s, host, fh, changing=exclusive))

        try:
            return nfs.executor.call_now(run)
        except BadHandle:
            raise _Refused(NlmStat.STALE_FH) from None
        except PermissionDenied:
            raise _Refused(NlmStat.FAILED) from None
        except ReadOnly:
            raise _Refused(NlmStat.ROFS) from None
        except StoreError:
            raise _Refused(NlmStat.STALE_FH) from None

    def _stop_telling(
        self, file: Hashable, owner: Owner, start: int, end: int, exclusive: bool
    ) -> bool:
        """Cancel the GRANTED call under way for this lock, if any (True if there was one)."""
        telling = self._telling.pop(_key(file, owner, start, end, exclusive), None)
        if telling is None:
            return False
        telling.cancel()
        return True

    @staticmethod
    def _stat(ctx: CallContext, stat: NlmStat) -> NlmStat:
        return stat.for_version(ctx.vers)

    def _count(self, outcome: Outcome) -> None:
        name = outcome.value
        self.stats.outcomes[name] = self.stats.outcomes.get(name, 0) + 1

    def _too_many_clients(self, host: str) -> bool:
        clients = self.manager.clients()
        return host not in clients and len(clients) >= MAX_CLIENTS

    async def _monitor(self, host: str, name: str) -> None:
        """Record `host` durably before it is granted anything (see `prism.nlm.monitor`).
        Callers grant as soon as this returns, with no await in between, and a forget
        holds `_recording` from its check to its write: so a client is never forgotten
        between being found recorded here and holding a lock."""
        async with self._recording:
            if host not in self.monitor.clients and len(self.monitor.clients) >= MAX_CLIENTS:
                for address in await self._forget_idle(self.monitor.clients):
                    self.names.pop(address, None)
            self.names.setdefault(host, name)
            if host not in self.monitor.clients:
                await asyncio.to_thread(self.monitor.add, host, name)

    async def _forget_idle(self, hosts: Iterable[str]) -> set[str]:
        """Forget those of `hosts` that hold and wait for nothing now. Hold `_recording`."""
        idle = set(hosts) - self.manager.clients()
        if idle:
            await asyncio.to_thread(self.monitor.forget, idle)
        return idle

    # -- NLM procedures ------------------------------------------------------------------

    def test(self, ctx: CallContext, a: TestArgs) -> TestRes:
        host = ctx.peer[0]
        try:
            if self.in_grace():
                raise _Refused(NlmStat.DENIED_GRACE_PERIOD)
            file = self._file(host, a.alock.fh, exclusive=a.exclusive)
        except _Refused as exc:
            return TestRes(a.cookie, self._stat(ctx, exc.stat))
        owner, start, end = _lock_range(host, a.alock)
        held = self.manager.test(file, owner, start, end, a.exclusive)
        if held is None:
            return TestRes(a.cookie, NlmStat.GRANTED)
        holder = NlmHolder(
            held.exclusive,
            held.owner.svid,
            held.owner.oh,
            held.start,
            _length(held.start, held.end),
        )
        return TestRes(a.cookie, NlmStat.DENIED, holder)

    async def lock(self, ctx: CallContext, a: LockArgs, *, monitored: bool = True) -> Res:
        host = ctx.peer[0]
        try:
            if self.in_grace() and not a.reclaim:
                self.stats.grace_refused += 1
                raise _Refused(NlmStat.DENIED_GRACE_PERIOD)
            file = self._file(host, a.alock.fh, exclusive=a.exclusive)
        except _Refused as exc:
            return Res(a.cookie, self._stat(ctx, exc.stat))
        if self._too_many_clients(host):
            return Res(a.cookie, NlmStat.DENIED_NOLOCKS)
        if monitored:
            await self._monitor(host, a.alock.caller_name)
        owner, start, end = _lock_range(host, a.alock)
        grant = Grant(ctx.vers, ctx.transport, a.cookie, a.exclusive, a.alock)
        outcome = self.manager.lock(
            file,
            owner,
            start,
            end,
            a.exclusive,
            block=a.block and monitored,
            now=self.clock(),
            token=grant,
        )
        self._count(outcome)
        if outcome is Outcome.GRANTED:  # the client now knows: no GRANTED call needed
            self._stop_telling(file, owner, start, end, a.exclusive)
        self._changed()
        return Res(a.cookie, self._stat(ctx, _STAT[outcome]))

    async def nm_lock(self, ctx: CallContext, a: LockArgs) -> Res:
        """A lock for a client that runs no status monitor: never blocks, never notified."""
        return await self.lock(ctx, a, monitored=False)

    def cancel(self, ctx: CallContext, a: CancArgs) -> Res:
        host = ctx.peer[0]
        try:
            file = self._file(host, a.alock.fh)
        except _Refused as exc:
            return Res(a.cookie, self._stat(ctx, exc.stat))
        owner, start, end = _lock_range(host, a.alock)
        cancelled = self.manager.cancel(file, owner, start, end, a.exclusive)
        # No such waiter, but a GRANTED call under way: the client gave up waiting first.
        if not cancelled and self._stop_telling(file, owner, start, end, a.exclusive):
            self._wake(self.manager.unlock(file, owner, start, end, now=self.clock()))
        self._changed()
        return Res(a.cookie, NlmStat.GRANTED)

    def unlock(self, ctx: CallContext, a: UnlockArgs) -> Res:
        host = ctx.peer[0]
        try:
            file = self._file(host, a.alock.fh)
        except _Refused as exc:
            return Res(a.cookie, self._stat(ctx, exc.stat))
        owner, start, end = _lock_range(host, a.alock)
        self._wake(self.manager.unlock(file, owner, start, end, now=self.clock()))
        self._changed()
        return Res(a.cookie, NlmStat.GRANTED)

    def granted_to_us(self, ctx: CallContext, a: TestArgs) -> Res:
        """GRANTED is the server's call to a client; this server waits for no locks."""
        return Res(a.cookie, NlmStat.DENIED)

    async def share(self, ctx: CallContext, a: ShareArgs) -> ShareRes:
        host = ctx.peer[0]
        try:
            if self.in_grace() and not a.reclaim:
                raise _Refused(NlmStat.DENIED_GRACE_PERIOD)
            file = self._file(host, a.share.fh)
        except _Refused as exc:
            return ShareRes(a.cookie, self._stat(ctx, exc.stat))
        if self._too_many_clients(host):
            return ShareRes(a.cookie, NlmStat.DENIED_NOLOCKS)
        await self._monitor(host, a.share.caller_name)
        owner = Owner(host, 0, a.share.oh)
        outcome = self.manager.share(file, owner, a.share.access, a.share.mode, self.clock())
        self._changed()
        return ShareRes(a.cookie, self._stat(ctx, _STAT[outcome]))

    def unshare(self, ctx: CallContext, a: ShareArgs) -> ShareRes:
        host = ctx.peer[0]
        try:
            file = self._file(host, a.share.fh)
        except _Refused as exc:
            return ShareRes(a.cookie, self._stat(ctx, exc.stat))
        self.manager.unshare(file, Owner(host, 0, a.share.oh))
        self._changed()
        return ShareRes(a.cookie, NlmStat.GRANTED)

    def free_all(self, ctx: CallContext, a: Notify) -> None:
        """Release a host's locks: the caller's own, or (from loopback, as a local status
        monitor would call it) those of every client that gave `a.name` as its name."""
        host = ctx.peer[0]
        hosts = {host}
        if is_loopback(host):
            hosts |= {addr for addr, name in self.names.items() if name == a.name}
        for client in hosts:
            self.release_client(client)

    # -- NSM procedures ------------------------------------------------------------------

    def sm_notify(self, ctx: CallContext, a: StatChge) -> None:
        """A client rebooted (its status monitor tells us): its locks are gone. Only an
        address bound to a VM can hold locks, so only such an address is listened to."""
        host = ctx.peer[0]
        if not self.nfs.peer_bound(host):
            return
        log.info("%s (%s) restarted (state %d): releasing its locks", host, a.mon_name, a.state)
        self.stats.released_by_notify += 1
        self.release_client(host)

    def release_client(self, host: str) -> None:
        self._wake(self.manager.free_client(host, now=self.clock()))
        self._changed()

    # -- granting blocked locks ----------------------------------------------------------

    def _wake(self, granted: list[Waiter]) -> None:
        now = self.clock()
        for w in granted:
            self.stats.waits_granted += 1
            self.stats.wait_seconds += now - w.since
            key = _key(w.file, w.owner, w.start, w.end, w.exclusive)
            self._telling[key] = self._spawn(self._tell_granted(w, key))

    async def _tell_granted(self, w: Waiter, key: tuple[Any, ...]) -> None:
        grant = w.token
        assert isinstance(grant, Grant)
        args = encode(TestArgs(grant.cookie, grant.exclusive, grant.alock), grant.vers == NLM_V4)
        reply = await self._send(
            w.owner.client, grant.vers, int(NlmProc.GRANTED), args, grant.transport
        )
        ok = False
        if reply is not None:
            with contextlib.suppress(Exception):
                ok = decode(Res, reply, grant.vers == NLM_V4).stat == NlmStat.GRANTED
        self._telling.pop(key, None)
        if not ok:  # nobody to hold it: release it for the next waiter
            log.info("%s did not take its granted lock; releasing it", w.owner.client)
            self._wake(self.manager.unlock(w.file, w.owner, w.start, w.end, now=self.clock()))
            self._changed()

    async def _send(
        self, host: str, vers: int, proc: int, args: bytes, transport: str, prog: int = NLM_PROGRAM
    ) -> bytes | None:
        """Call the client, at most CALLBACK_ATTEMPTS times; None if it never answered."""
        delay = CALLBACK_BACKOFF
        for attempt in range(CALLBACK_ATTEMPTS):
            try:
                return await asyncio.to_thread(
                    self.callback, host, prog, vers, proc, args, transport
                )
            except (OSError, RpcError, ValueError) as exc:
                log.debug("call %d.%d to %s failed: %s", prog, proc, host, exc)
            if attempt + 1 < CALLBACK_ATTEMPTS:
                await asyncio.sleep(delay)
                delay *= 2
        self.stats.callbacks_failed += 1
        log.warning(
            "%s did not answer program %d procedure %d after %d attempts",
            host,
            prog,
            proc,
            CALLBACK_ATTEMPTS,
        )
        return None

    async def _notify(self, host: str) -> None:
        """Tell a recorded client that this server restarted (SM_NOTIFY to its monitor)."""
        args = encode(StatChge(_local_address_for(host), self.monitor.state))
        reply = await self._send(host, NSM_V1, int(NsmProc.NOTIFY), args, "udp", NSM_PROGRAM)
        if reply is not None:  # told: unless it reclaimed meanwhile, it need not be again
            async with self._recording:
                await self._forget_idle([host])

    def _expire(self) -> None:
        self.manager.expire(self.clock())
        self._changed()
        self._expiry = asyncio.get_running_loop().call_later(EXPIRE_EVERY, self._expire)

    # -- what `prism locks` reads --------------------------------------------------------

    def _changed(self) -> None:
        if self._snapshot_due is None:
            loop = asyncio.get_running_loop()
            self._snapshot_due = loop.call_later(SNAPSHOT_DELAY, self._write_snapshot)

    def snapshot(self) -> dict[str, Any]:
        wall = time.time() - self.clock()
        rows: list[dict[str, Any]] = []
        items: list[tuple[str, Any]] = [("lock", lk) for lk in self.manager.locks()]
        items += [("waiting", w) for w in self.manager.waiters()]
        items += [("share", sh) for sh in self.manager.shares()]
        for kind, item in items[:SNAPSHOT_ROWS]:
            oid = item.file
            row = {
                "kind": kind,
                "vm": self._vm_name(oid.ns),
                "client": item.owner.client,
                "name": self.names.get(item.owner.client, ""),
                "fileid": oid.fileid,
                "svid": item.owner.svid,
                "since": round(wall + item.since, 3),
            }
            if kind == "share":
                row.update(access=item.access, deny=item.deny)
            else:
                row.update(
                    start=item.start,
                    length=_length(item.start, item.end),
                    type="write" if item.exclusive else "read",
                )
            rows.append(row)
        return {
            "pid": os.getpid(),
            "state": self.monitor.state,
            "grace_left": round(max(0.0, self.grace_until - self.clock()), 1),
            "locks": rows,
            "more": max(0, len(items) - SNAPSHOT_ROWS),
        }

    def _vm_name(self, ns: int) -> str:
        name = self._vm_names.get(ns)
        if name is None:
            try:
                info = self.nfs.executor.call_now(lambda s: s.namespace_by_id(ns))
                name = self._vm_names[ns] = info.name
            except StoreError:
                return f"#{ns}"
        return name

    def _write_snapshot(self) -> None:
        self._snapshot_due = None
        path = self.monitor.locks_path
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot(), sort_keys=True))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s for `prism locks`: %s", path, exc)


def _local_address_for(host: str) -> str:
    """This server's address as `host` sees it (the name clients monitor it by)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, PMAP_PORT))
        return str(s.getsockname()[0])
    return socket.gethostname()
