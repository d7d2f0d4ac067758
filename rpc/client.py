"""A small synchronous ONC-RPC client for tests and tools (not for the server's hot path).

Theory of operation: `RpcClient.call(proc, args)` encodes a CALL with the next xid, sends it
(record marked on TCP and Unix sockets, one datagram on UDP) and reads records until the
reply with that xid arrives, skipping stale replies to earlier calls. On UDP it retransmits
the same xid with a doubling interval until `timeout` expires. Every non-SUCCESS reply
becomes a typed `RpcError` subclass; `call_reply` returns the decoded `Reply` instead.
`send_raw`, `recv_record` and `sock` give hostile tests direct access to the wire.
"""

from __future__ import annotations

import collections
import errno
import random
import socket
import time
from types import TracebackType
from typing import Any

from rpc.message import (
    NULL_AUTH,
    AcceptedReply,
    AcceptStat,
    AuthErrorReply,
    AuthStat,
    AuthSys,
    OpaqueAuth,
    ProgMismatchReply,
    Reply,
    RpcMismatchReply,
    decode_reply,
    encode_call,
    peek_xid,
)
from rpc.record import MAX_RECORD_SIZE, UDP_MAX_PAYLOAD, RecordReader, frame

RESERVED_PORT_LOW = 512
RESERVED_PORT_HIGH = 1023
UDP_INITIAL_RETRANSMIT = 0.25
"""Seconds before the first UDP retransmission; doubled on each retry."""


class RpcError(Exception):
    """The server answered with something other than SUCCESS, or did not answer."""


class ProgUnavailable(RpcError):
    """PROG_UNAVAIL: the server does not export the program."""


class ProgMismatch(RpcError):
    """PROG_MISMATCH: the program exists only in versions low..high."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__(f"program supported in versions {low}..{high} only")
        self.low = low
        self.high = high


class ProcUnavailable(RpcError):
    """PROC_UNAVAIL: no such procedure in this program version."""


class GarbageArgsError(RpcError):
    """GARBAGE_ARGS: the server could not decode the arguments."""


class SystemError_(RpcError):
    """SYSTEM_ERR: the server failed while running the procedure."""


class RpcMismatch(RpcError):
    """MSG_DENIED / RPC_MISMATCH: the server speaks RPC versions low..high."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__(f"server speaks RPC versions {low}..{high}")
        self.low = low
        self.high = high


class AuthError(RpcError):
    """MSG_DENIED / AUTH_ERROR."""

    def __init__(self, stat: AuthStat) -> None:
        super().__init__(stat.name)
        self.stat = stat


class RpcTimeout(RpcError, TimeoutError):
    """No reply arrived in time."""


class ConnectionClosed(RpcError, ConnectionError):
    """The server closed the connection before replying."""


_ACCEPT_ERRORS: dict[AcceptStat, type[RpcError]] = {
    AcceptStat.PROG_UNAVAIL: ProgUnavailable,
    AcceptStat.PROC_UNAVAIL: ProcUnavailable,
    AcceptStat.GARBAGE_ARGS: GarbageArgsError,
    AcceptStat.SYSTEM_ERR: SystemError_,
}


def raise_for_reply(reply: Reply) -> bytes:
    """The results of a SUCCESS reply; any other reply raises its `RpcError`."""
    match reply:
        case AcceptedReply(stat=AcceptStat.SUCCESS, body=body):
            return body
        case AcceptedReply(stat=stat):
            raise _ACCEPT_ERRORS[stat](stat.name)
        case ProgMismatchReply(low=low, high=high):
            raise ProgMismatch(low, high)
        case RpcMismatchReply(low=low, high=high):
            raise RpcMismatch(low, high)
        case AuthErrorReply(stat=stat):
            raise AuthError(stat)
    raise TypeError(f"not a reply: {reply!r}")


class RpcClient:
    """Synchronous client for one program version over "tcp", "udp" or "unix".

    For "unix", `host` is the socket path and `port` is ignored. `source` binds the local
    address (e.g. `("10.0.0.2", 0)`); `reserved_port=True` binds a port below 1024 (root only)
    as kernel clients do.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prog: int,
        vers: int,
        *,
        transport: str = "tcp",
        cred: AuthSys | OpaqueAuth | None = None,
        timeout: float = 5.0,
        source: tuple[str, int] | None = None,
        reserved_port: bool = False,
        max_record_size: int = MAX_RECORD_SIZE,
    ) -> None:
        if transport not in ("tcp", "udp", "unix"):
            raise ValueError(f"unknown transport {transport!r}")
        self.host = host
        self.port = port
        self.prog = prog
        self.vers = vers
        self.transport = transport
        self.timeout = timeout
        if isinstance(cred, AuthSys):
            cred = cred.to_opaque()
        self.cred: OpaqueAuth = cred if cred is not None else NULL_AUTH
        self._xid = random.getrandbits(32)
        self._reader = RecordReader(max_record_size)
        self._records: collections.deque[bytes] = collections.deque()
        self.sock = self._connect(source, reserved_port)

    # ------------------------------------------------------------------ connection

    def _connect(self, source: tuple[str, int] | None, reserved_port: bool) -> socket.socket:
        if self.transport == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.host)
            except BaseException:
                sock.close()
                raise
            return sock
        kind = socket.SOCK_STREAM if self.transport == "tcp" else socket.SOCK_DGRAM
        family, _, _, _, address = socket.getaddrinfo(self.host, self.port, type=kind)[0]
        if not reserved_port:
            return self._open(family, kind, address, source)
        host = source[0] if source else ""
        ports = list(range(RESERVED_PORT_LOW, RESERVED_PORT_HIGH + 1))
        random.shuffle(ports)
        last: OSError | None = None
        for port in ports:
            try:
                return self._open(family, kind, address, (host, port))
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    raise
                last = exc
        raise OSError(errno.EADDRINUSE, f"no free reserved port: {last}")

    def _open(
        self, family: int, kind: int, address: Any, source: tuple[str, int] | None
    ) -> socket.socket:
        sock = socket.socket(family, kind)
        try:
            sock.settimeout(self.timeout)
            if source is not None:
                if source[1]:  # a fixed port may still be in TIME_WAIT towards another server
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(source)
            sock.connect(address)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def local_address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def next_xid(self) -> int:
        self._xid = (self._xid + 1) & 0xFFFF_FFFF
        return self._xid

    def encode(self, proc: int, args: bytes = b"", *, xid: int | None = None) -> bytes:
        """A complete CALL record for `proc` (unframed), with the next xid unless given."""
        if xid is None:
            xid = self.next_xid()
        return encode_call(xid, self.prog, self.vers, proc, args, self.cred)

    def call(self, proc: int, args: bytes = b"") -> bytes:
        """Call `proc` and return its encoded results; raises an `RpcError` subclass."""
        return raise_for_reply(self.call_reply(proc, args))

    def call_reply(self, proc: int, args: bytes = b"") -> Reply:
        """Call `proc` and return the decoded reply, whatever its status."""
        record = self.encode(proc, args)
        return self.exchange(record)

    def exchange(self, record: bytes) -> Reply:
        """Send a CALL record and wait for the reply with its xid."""
        xid = peek_xid(record)
        deadline = time.monotonic() + self.timeout
        if self.transport != "udp":
            self.send_raw(record)
            while True:
                reply = self.recv_record(deadline - time.monotonic())
                if peek_xid(reply) == xid:
                    return decode_reply(reply)
        interval = UDP_INITIAL_RETRANSMIT
        while True:
            self.send_raw(record)
            resend_at = min(deadline, time.monotonic() + interval)
            interval *= 2
            while True:
                left = resend_at - time.monotonic()
                if left <= 0:
                    break
                try:
                    reply = self.recv_record(left)
                except RpcTimeout:
                    break
                if peek_xid(reply) == xid:
                    return decode_reply(reply)
            if time.monotonic() >= deadline:
                raise RpcTimeout(f"no reply to xid {xid:#x} in {self.timeout} s")

    # ------------------------------------------------------------------ raw access

    def send_raw(self, data: bytes, *, framed: bool = True) -> None:
        """Send a record (record marked on streams unless `framed=False`: `data` then goes
        onto the stream as is). On UDP, `data` is one datagram."""
        if self.transport == "udp":
            if len(data) > UDP_MAX_PAYLOAD:
                raise ValueError(f"datagram of {len(data)} bytes exceeds {UDP_MAX_PAYLOAD}")
            self.sock.send(data)
        else:
            self.sock.sendall(frame(data) if framed else data)

    def recv_record(self, timeout: float | None = None) -> bytes:
        """The next record (or datagram) from the server.

        Raises `RpcTimeout` after `timeout` seconds (default: the client's), and
        `ConnectionClosed` when a stream ends.
        """
        wait = self.timeout if timeout is None else timeout
        if wait <= 0:
            raise RpcTimeout("timed out waiting for a reply")
        if self.transport == "udp":
            self.sock.settimeout(wait)
            try:
                return self.sock.recv(65536)
            except TimeoutError:
                raise RpcTimeout("timed out waiting for a reply") from None
        deadline = time.monotonic() + wait
        while not self._records:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RpcTimeout("timed out waiting for a reply")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(262144)
            except TimeoutError:
                raise RpcTimeout("timed out waiting for a reply") from None
            except ConnectionResetError:
                raise ConnectionClosed("the server reset the connection") from None
            if not data:
                raise ConnectionClosed("the server closed the connection")
            self._records.extend(self._reader.feed(data))
        return self._records.popleft()
