"""Thin asyncio pumps that feed the sans-IO core: TCP (record marked) and UDP (datagrams).

Theory of operation, TCP: each connection owns a `RecordReader`. Every complete record goes
to the dispatcher's `handle_now`: a call it answers at once is replied to at once; any other
runs as its own task, so pipelined calls are answered as they complete, in any order;
each reply is framed and written whole, so replies never interleave. A connection runs at
most `max_in_flight` calls at once: beyond that, records wait in a queue and reading pauses,
and a call keeps its slot until the transport has accepted its reply (write flow control),
so a peer that does not read its replies stops being read.

Fairness: one turn of the event loop gives a connection at most one bounded parse of its
input (`turn_fragments` fragment headers) and `turn_calls` calls started; input or records
left over wait, with reading paused, for the connection's next turn (`call_soon`), after
every other connection had its own. Memory per connection is thus bounded by one read of
input, the records one parse yields and `max_in_flight` running calls (and no call is taken
while the transport holds more unsent reply bytes than its high-water mark).

A broken stream (a record larger than `max_record_size` or of more than `max_fragments`
fragments) or a record the dispatcher cannot answer at all (not a decodable call) ends that
connection only: nothing after the break is read or run, the calls before it still get their
replies, then the connection closes. On EOF likewise: the replies still due are sent, then
the connection is closed.

UDP: each datagram is one record, dispatched as a task; the reply goes back to the sender.
Beyond `max_udp_in_flight` calls, datagrams are dropped (the client retransmits). A reply
that does not fit in a datagram is replaced by SYSTEM_ERR.

Neither pump lets an exception escape into the event loop; the dispatcher never raises.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import resource
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from rpc.admission import (
    FD_RESERVE,
    MAX_CONNECTIONS,
    ConnectionLimits,
    ConnectionTable,
    Entry,
)
from rpc.message import AcceptStat, encode_accepted, peek_xid
from rpc.record import (
    MAX_FRAGMENTS,
    MAX_RECORD_SIZE,
    UDP_MAX_PAYLOAD,
    RecordReader,
    RecordStreamError,
    frame,
)
from rpc.server import TRANSPORT_TCP, TRANSPORT_UDP, Outcome, RpcDispatcher

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
"""Calls one TCP connection may have running at once."""
MAX_UDP_IN_FLIGHT = 256
"""Calls the UDP endpoint may have running at once."""
TURN_FRAGMENTS = 256
"""Fragment headers one connection's input may have parsed per turn of the event loop."""
TURN_CALLS = 32
"""Calls one connection may start per turn of the event loop."""


@dataclass(frozen=True, slots=True)
class TransportConfig:
    max_record_size: int = MAX_RECORD_SIZE
    max_fragments: int = MAX_FRAGMENTS
    max_in_flight: int = MAX_IN_FLIGHT
    turn_fragments: int = TURN_FRAGMENTS
    turn_calls: int = TURN_CALLS
    max_udp_in_flight: int = MAX_UDP_IN_FLIGHT
    max_udp_payload: int = UDP_MAX_PAYLOAD

    def __post_init__(self) -> None:
        if min(self.max_fragments, self.max_in_flight, self.turn_fragments, self.turn_calls) < 1:
            raise ValueError("fragment, in-flight and per-turn limits must be at least 1")


DEFAULT_CONFIG = TransportConfig()

LOG_EVERY = 10.0
"""Seconds between two log lines about refused, evicted or stalled connections."""


def connection_budget(reserve: int = FD_RESERVE) -> int:
    """How many connections the process's file descriptor limit (RLIMIT_NOFILE) allows,
    keeping `reserve` descriptors (or half the limit, if it is small) for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft - reserve if soft > 2 * reserve else soft // 2))


class Connections:
    """The stream connections of one server, shared by its listeners: a sans-IO
    `ConnectionTable` (caps, eviction, stalled records) plus the timer and the closing it
    asks for. `is_bound(host)` is the service's policy: whether an address may use the
    server at all (connections from other addresses are the first to go)."""

    def __init__(
        self,
        limits: ConnectionLimits | None = None,
        is_bound: Callable[[str], bool] = lambda host: True,
    ) -> None:
        limits = limits or ConnectionLimits(max_connections=connection_budget())
        self.table: ConnectionTable[_StreamConnection] = ConnectionTable(limits, is_bound)
        self._timer: asyncio.TimerHandle | None = None
        self._logged = {"refused": 0, "evicted": 0, "expired": 0}
        self._last_log = -LOG_EVERY

    def admit(self, conn: _StreamConnection, host: str) -> Entry[_StreamConnection] | None:
        entry, evict = self.table.admit(conn, host)
        for victim in evict:
            victim.abort()
        if entry is None or evict:
            self._log()
        return entry

    def release(self, entry: Entry[_StreamConnection]) -> None:
        self.table.release(entry)

    def waiting(self, entry: Entry[_StreamConnection], since: float | None) -> None:
        self.table.waiting(entry, since)
        if since is not None and self._timer is None:
            self._arm()

    def _arm(self) -> None:
        interval = max(0.05, self.table.limits.record_timeout / 4)
        self._timer = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        for conn in self.table.expired(asyncio.get_running_loop().time()):
            conn.abort()
        self._log()
        if self.table.stalled:
            self._arm()

    def _log(self) -> None:
        """One line per LOG_EVERY seconds: a flood of connections must not flood the log."""
        t = self.table
        counts = {"refused": t.refused, "evicted": t.evicted, "expired": t.expired_count}
        now = time.monotonic()
        if counts == self._logged or now - self._last_log < LOG_EVERY:
            return
        new = {k: v - self._logged[k] for k, v in counts.items()}
        self._logged, self._last_log = counts, now
        limits = t.limits
        log.warning(
            "connections: %d refused, %d evicted (limits: %d in all, %d per address; "
            "unbound addresses go first), %d closed after %g s with an incomplete record; "
            "%d open. Raise the file descriptor limit or --max-connections if legitimate "
            "clients are refused",
            new["refused"],
            new["evicted"],
            limits.max_connections,
            limits.max_per_address,
            new["expired"],
            limits.record_timeout,
            len(t),
        )


def _peer(address: Any) -> tuple[str, int]:
    """(host, port) from a socket address of any family."""
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return (str(address) if address else "", 0)


def start_eagerly(coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]) -> None:
    """Run `coro` until it first suspends, and only then give it a Task.

    Most calls (GETATTR, LOOKUP, READ...) complete without ever suspending; running them
    at once saves a Task and an event-loop turn per call (Python 3.12's eager task factory,
    done by hand for 3.11).
    """
    try:
        yielded = coro.send(None)
    except StopIteration:
        return
    task = asyncio.get_running_loop().create_task(_finish(coro, yielded))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _finish(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Drive a coroutine that `start_eagerly` began, from where it suspended."""
    try:
        while True:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                # As Task.__step does: take over the future the coroutine is blocked on.
                yielded._asyncio_future_blocking = False
                with contextlib.suppress(Exception):
                    await yielded  # only waits: the coroutine's own await reads the outcome
            try:
                yielded = coro.send(None)
            except StopIteration:
                return
    except BaseException:
        coro.close()
        raise


class _StreamConnection(asyncio.Protocol):
    """One record-marked stream connection (TCP, or a Unix socket)."""

    def __init__(
        self,
        dispatcher: RpcDispatcher,
        config: TransportConfig,
        kind: str,
        connections: Connections | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._config = config
        self._kind = kind
        self._connections = connections
        self._entry: Entry[_StreamConnection] | None = None
        self._got_input = False  # bytes arrived since the table last heard from us
        self._transport: asyncio.Transport | None = None
        self._peer: tuple[str, int] = ("", 0)
        self._reader = RecordReader(config.max_record_size, config.max_fragments)
        self._input: memoryview | None = None  # received bytes the reader has not consumed
        self._queue: collections.deque[bytes] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._calls_left = 0  # calls this turn may still start
        self._parsed = False  # this turn has parsed input
        self._next_turn: asyncio.Handle | None = None
        self._pumping = False
        self._reading_paused = False
        self._eof = False  # no more input will come: close once the replies due are sent
        self._broken = False  # the stream broke: take no more input, then close likewise
        self._closing = False
        self._writable = asyncio.Event()  # for calls awaiting room to send
        self._writable.set()
        self._can_write = True  # = self._writable.is_set(), read on every call

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._peer = _peer(transport.get_extra_info("peername"))
        if self._connections is not None:
            self._entry = self._connections.admit(self, self._peer[0])
            if self._entry is None:
                log.debug("%s %s: over the connection limits; closed", self._kind, self._peer)
                self.abort()

    def data_received(self, data: bytes) -> None:
        if self._closing or self._broken:
            return
        self._got_input = True
        if self._input is None:
            self._input = memoryview(data)
        else:  # (reading is paused while input waits; this guards transports that lag)
            self._input = memoryview(self._input.tobytes() + data)
        self._turn()

    def eof_received(self) -> bool:
        self._eof = True
        self._pump()
        return True  # keep the write side open until the replies still due are sent

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._entry is not None and self._connections is not None:
            self._connections.release(self._entry)
        self._queue.clear()
        self._input = None
        self._writable.set()
        self._can_write = True
        if self._next_turn is not None:
            self._next_turn.cancel()
            self._next_turn = None

    def pause_writing(self) -> None:
        self._writable.clear()
        self._can_write = False

    def resume_writing(self) -> None:
        self._writable.set()
        self._can_write = True
        self._pump()

    def _turn(self) -> None:
        """A new turn of the event loop for this connection: a fresh work budget."""
        self._next_turn = None
        self._calls_left = self._config.turn_calls
        self._parsed = False
        self._pump()

    def _parse(self) -> None:
        """Feed the reader this turn's share of the input (one bounded `receive`)."""
        self._parsed = True
        data = self._input
        assert data is not None
        try:
            records, used = self._reader.receive(data, self._config.turn_fragments)
        except RecordStreamError as exc:
            log.warning("%s %s: %s; closing the connection", self._kind, self._peer, exc)
            self._queue.extend(exc.records)
            self._break()
            return
        self._queue.extend(records)
        self._input = data[used:] if used < len(data) else None

    def _break(self) -> None:
        """Take no more input (what follows a broken record or a non-call is not
        trusted); the calls already taken still get their replies, then the connection
        closes."""
        self._broken = True
        self._input = None

    def _pump(self) -> None:
        transport = self._transport
        if self._closing or transport is None or self._pumping:
            return  # (a call that finished inside this loop re-enters here: let it run on)
        limit = self._config.max_in_flight
        handle_now = self._dispatcher.handle_now
        queue = self._queue
        self._pumping = True
        try:
            while self._in_flight < limit and self._can_write and not self._closing:
                if not queue:
                    if self._input is None or self._parsed:
                        break
                    self._parse()
                    continue
                if self._calls_left <= 0:
                    break
                self._calls_left -= 1
                outcome = handle_now(queue.popleft(), self._peer, self._kind)
                if type(outcome) is tuple:
                    self._send(*outcome)
                else:
                    self._in_flight += 1
                    start_eagerly(self._serve(cast(Awaitable[Outcome], outcome)), self._tasks)
        finally:
            self._pumping = False
        if self._closing:
            return
        pending = bool(queue) or self._input is not None
        can_run = self._in_flight < limit and self._can_write
        if pending and can_run and self._next_turn is None:
            # This turn's budget is spent: go on at the next turn, after other connections.
            self._next_turn = asyncio.get_running_loop().call_soon(self._turn)
        if (self._eof or self._broken) and not pending and self._in_flight == 0:
            self._close()
            return
        busy = pending or not can_run or self._broken
        if busy and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not busy and self._reading_paused and not self._eof:
            self._reading_paused = False
            transport.resume_reading()
        if self._entry is not None:
            self._watch()

    def _watch(self) -> None:
        """Tell the connection table whether the peer owes us the rest of a record (it
        does not while we are not reading)."""
        entry, connections = self._entry, self._connections
        assert entry is not None and connections is not None
        if self._reader.in_record and not self._reading_paused:
            if self._got_input or entry.stalled_since is None:
                connections.waiting(entry, asyncio.get_running_loop().time())
        elif entry.stalled_since is not None:
            connections.waiting(entry, None)
        self._got_input = False

    def _send(self, reply: bytes | None, close: bool) -> None:
        if reply is not None and not self._closing and self._transport is not None:
            self._transport.write(frame(reply))
        if close and not self._broken:
            log.info("%s %s sent a record that is not a call; closing", self._kind, self._peer)
            self._queue.clear()
            self._break()

    async def _serve(self, pending: Awaitable[Outcome]) -> None:
        """A call that may wait: it keeps its slot until its reply has been accepted."""
        try:
            reply, close = await pending
            self._send(reply, close)
            await self._writable.wait()
        except Exception:  # the dispatcher never raises; this guards the pump itself
            log.exception("%s %s: unexpected error serving a record", self._kind, self._peer)
            self._close()
        finally:
            self._in_flight -= 1
            self._pump()

    def _close(self, abort: bool = False) -> None:
        if not self._closing:
            self._closing = True
            self._queue.clear()
            self._input = None
            if self._transport is not None:
                if abort:
                    self._transport.abort()
                else:
                    self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent replies (a refused, evicted or stalled peer may
        not read them, and its descriptor is what we want back)."""
        self._close(abort=True)


async def serve_tcp(
    dispatcher: RpcDispatcher,
    host: str | None = "0.0.0.0",
    port: int = 0,
    config: TransportConfig = DEFAULT_CONFIG,
    *,
    backlog: int = 128,
    connections: Connections | None = None,
) -> asyncio.Server:
    """Listen for record-marked RPC over TCP; `port=0` picks a free port (see `bound_port`).
    Listeners that share `connections` share its limits (default: a table of their own,
    capped by the file descriptor limit, every address bound)."""
    loop = asyncio.get_running_loop()
    shared = connections or Connections()
    return await loop.create_server(
        lambda: _StreamConnection(dispatcher, config, TRANSPORT_TCP, shared),
        host,
        port,
        reuse_address=True,
        backlog=backlog,
    )


def bound_port(server: asyncio.Server | UdpServer) -> int:
    """The port a server listens on (useful after binding port 0)."""
    if isinstance(server, UdpServer):
        return server.port
    return int(server.sockets[0].getsockname()[1])


class _DatagramEndpoint(asyncio.DatagramProtocol):
    def __init__(self, dispatcher: RpcDispatcher, config: TransportConfig) -> None:
        self._dispatcher = dispatcher
        self._config = config
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(self._tasks) >= self._config.max_udp_in_flight:
            self.dropped += 1
            return
        outcome = self._dispatcher.handle_now(data, _peer(addr), TRANSPORT_UDP)
        if type(outcome) is tuple:
            self._send(outcome[0], addr)
        else:
            start_eagerly(self._serve(cast(Awaitable[Outcome], outcome), addr), self._tasks)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp: %s", exc)

    async def _serve(self, pending: Awaitable[Outcome], addr: Any) -> None:
        try:
            reply, _ = await pending
            self._send(reply, addr)
        except Exception:
            log.exception("udp %s: unexpected error serving a datagram", addr)

    def _send(self, reply: bytes | None, addr: Any) -> None:
        transport = self._transport
        if reply is None or transport is None or transport.is_closing():
            return
        if len(reply) > self._config.max_udp_payload:
            xid = peek_xid(reply) or 0
            log.error("udp %s: reply of %d bytes does not fit a datagram", addr, len(reply))
            reply = encode_accepted(xid, AcceptStat.SYSTEM_ERR)
        transport.sendto(reply, addr)


class UdpServer:
    """A bound UDP endpoint serving RPC; `port` is the bound port."""

    def __init__(self, transport: asyncio.DatagramTransport, protocol: _DatagramEndpoint) -> None:
        self.transport = transport
        self._protocol = protocol

    @property
    def sockname(self) -> Any:
        return self.transport.get_extra_info("sockname")

    @property
    def port(self) -> int:
        return int(self.sockname[1])

    @property
    def dropped(self) -> int:
        """Datagrams dropped because too many calls were running."""
        return self._protocol.dropped

    def close(self) -> None:
        self.transport.close()

    async def wait_closed(self) -> None:
        await self._protocol.closed


async def serve_udp(
    dispatcher: RpcDispatcher,
    host: str = "0.0.0.0",
    port: int = 0,
    config: TransportConfig = DEFAULT_CONFIG,
) -> UdpServer:
    """Serve RPC over UDP on (host, port); `port=0` picks a free port."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _DatagramEndpoint(dispatcher, config), local_addr=(host, port)
    )
    assert isinstance(protocol, _DatagramEndpoint)
    return UdpServer(transport, protocol)
