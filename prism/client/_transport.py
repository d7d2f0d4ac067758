"""How `prism.client` reaches a server: the URL, the transport seam, reconnection.

Theory of operation: `parse_url` turns "nfs://HOST[:PORT]/VM?mountport=N" into a `Target`.
`open_transport` picks the transport ("auto", "tcp" or "vrpc") and returns it with the reason
for the choice. A `Transport` is anything with `call(prog, vers, proc, args) -> results`
(the SUCCESS body; other replies raise `rpc.client.RpcError` subclasses) and `close()`;
`RpcCallerFor` adapts one (prog, vers) of it to `prism.nfs.client.RpcCaller`, so
`NfsClient` and `MountClient` run unchanged over any transport.

The one transport class is `RecordTransport`: it encodes each call as an ONC-RPC CALL
record (AUTH_SYS, the next xid) and hands it to a `Link`, which sends one record and
returns the REPLY record (`call(record, timeout)`, `close()`); a link is opened by a
`connect(timeout)` function. `TcpLink` is one TCP connection per program (NFS on the NFS
port, MOUNT on the mount port, opened on first use; MOUNT's closed after each call); a
VRPC channel (`vrpc.client.VrpcChannel`) has the same two methods. Calls are serialized
(one lock, one call in flight). When a link fails with `ConnectionError` or another
`OSError` (the server restarted, crashed or detached the channel), the transport opens a
new link with a growing pause and resends the very same record (same xid, so a server
that kept its duplicate request cache answers a retransmission from it) until the call's
deadline; file handles stay valid because a restarted Prism accepts the handles it issued.
A link that never worked fails at once (wrong address or port). A call that gets no reply
on a live link before its deadline raises `TimeoutError`.

VRPC (`open_vrpc`) is the same `RecordTransport` whose `connect` attaches a
`vrpc.client.VrpcChannel` to the VM named by the export (its first component, without
"@snapshot"), always with one `client_id`, so a server that kept its duplicate request cache
answers a resent call from it, as for TCP. A server that stops or dies wakes a call asleep on
the ring at once (`ServerGone`, a `ConnectionError`), and the transport reattaches and resends
as above. "auto" takes VRPC only when the host is this host, the socket attaches and the
export's root handle over the channel equals the one TCP's MNT gives (the socket belongs to
the very server of the URL, not another one that happens to serve the same VM name);
otherwise TCP, with the first reason that failed.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prism.nfs.client import MountClient, MountError, connect_rpc
from prism.nfs.const import MOUNT_PROGRAM, MOUNT_V3, NFS_PORT, NFS_PROGRAM
from rpc.client import (
    AuthError,
    ConnectionClosed,
    ProcUnavailable,
    ProgMismatch,
    ProgUnavailable,
    RpcClient,
    RpcError,
    raise_for_reply,
)
from rpc.message import AuthSys, UndecodableReply, decode_reply, encode_call, peek_xid
from rpc.portmap import PMAP_PORT, pmap_getport
from vrpc.client import AttachRefused, VrpcChannel, VrpcError
from vrpc.control import CLIENT_ID_SIZE

DEFAULT_VRPC_SOCKET = "/run/prism/vrpc.sock"
"""Where a system-wide `prism serve` puts its VRPC control socket by convention."""
VRPC_SOCKET_ENV = "PRISM_VRPC_SOCKET"
TRANSPORTS = ("auto", "tcp", "vrpc")
URL_PARAMS = ("mountport", "nfsport")
IPPROTO_TCP = 6
RECONNECT_FIRST_PAUSE = 0.05
RECONNECT_MAX_PAUSE = 1.0
_PROG = struct.Struct(">I")
_PROG_OFFSET = 12
"""Where a CALL record holds its program number (after xid, msg_type, rpcvers)."""


class TransportUnavailable(OSError):
    """The transport asked for cannot be used; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPROTONOSUPPORT, message)


class Transport(Protocol):
    """What the client needs from a transport. `name` is "tcp" or "vrpc"."""

    name: str

    def call(self, prog: int, vers: int, proc: int, args: bytes) -> bytes: ...

    def close(self) -> None: ...


class RpcCallerFor:
    """One program version of a transport, as `prism.nfs.client.RpcCaller`."""

    def __init__(self, transport: Transport, prog: int, vers: int) -> None:
        self._transport = transport
        self._prog = prog
        self._vers = vers

    def call(self, proc: int, args: bytes) -> bytes:
        try:
            return self._transport.call(self._prog, self._vers, proc, args)
        except RpcError as exc:
            raise rpc_oserror(exc) from exc


def rpc_oserror(exc: RpcError) -> OSError:
    """An RPC-level failure as the OSError a file API raises."""
    if isinstance(exc, AuthError):
        return PermissionError(
            errno.EACCES, f"the server refused the credential ({exc.stat.name}); check uid/gid"
        )
    if isinstance(exc, ProgUnavailable | ProgMismatch | ProcUnavailable):
        return OSError(errno.EPROTONOSUPPORT, f"the server does not serve this call: {exc}")
    return OSError(errno.EIO, f"RPC failure: {type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed "nfs://HOST[:PORT]/VM?mountport=N": where the server is and which export."""

    host: str
    export: str
    nfs_port: int = NFS_PORT
    mount_port: int = 0
    """0: ask the portmapper on HOST."""
    portmap_port: int = PMAP_PORT


def parse_url(url: str) -> Target:
    """Parse a client URL; raises ValueError naming what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "nfs":
        raise ValueError(f"{url!r}: expected nfs://HOST[:PORT]/VM[?mountport=N]")
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r}: no host (nfs://HOST[:PORT]/VM)")
    export = urllib.parse.unquote(parts.path)
    if export.strip("/") == "":
        raise ValueError(f"{url!r}: no VM to mount (nfs://HOST[:PORT]/VM)")
    try:
        nfs_port = parts.port or NFS_PORT
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number in 1..65535") from None
    mount_port = 0
    for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
        if key not in URL_PARAMS or len(values) != 1 or not values[0].isdigit():
            raise ValueError(
                f"{url!r}: bad query parameter {key!r}; accepted: "
                + ", ".join(f"{name}=PORT (once)" for name in URL_PARAMS)
            )
        port = int(values[0])
        if not 0 < port < 65536:
            raise ValueError(f"{url!r}: {key}={port} is not a port number")
        if key == "mountport":
            mount_port = port
        elif parts.port is None:
            nfs_port = port  # libnfs spells the NFS port "nfsport"
    return Target(host, "/" + export.strip("/"), nfs_port, mount_port)


def vrpc_socket_path(vrpc_socket: str | os.PathLike[str] | None) -> str:
    """The VRPC control socket to try: the argument, else $PRISM_VRPC_SOCKET, else the
    conventional system path."""
    if vrpc_socket is not None:
        return os.fspath(vrpc_socket)
    return os.environ.get(VRPC_SOCKET_ENV) or DEFAULT_VRPC_SOCKET


def is_local_host(host: str) -> bool:
    """Whether `host` names this machine (loopback, or an address a socket here can bind)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, _, _, _, address in infos:
        if ipaddress.ip_address(address[0]).is_loopback:
            return True
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False


def open_transport(
    target: Target,
    cred: AuthSys,
    *,
    transport: str,
    vrpc_socket: str | os.PathLike[str] | None,
    token: bytes | str | None,
    timeout: float,
) -> tuple[Transport, str]:
    """The transport to `target` and why it was chosen."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
    socket_path = vrpc_socket_path(vrpc_socket)
    if transport == "vrpc":
        return open_vrpc(target, cred, socket_path, token, timeout), f"asked for, at {socket_path}"
    if transport == "tcp":
        return tcp_transport(target, cred, timeout=timeout), "asked for"
    tcp = tcp_transport(target, cred, timeout=timeout)
    if not is_local_host(target.host):
        return tcp, f"{target.host} is not this host, VRPC serves local clients only"
    if not os.path.exists(socket_path):
        return tcp, f"no VRPC socket at {socket_path}"
    try:
        vrpc = open_vrpc(target, cred, socket_path, token, timeout)
    except TransportUnavailable as exc:
        return tcp, f"VRPC at {socket_path} unavailable: {exc.strerror}"
    try:
        same = _mnt_root(vrpc, target.export) == _mnt_root(tcp, target.export)
    except (MountError, OSError) as exc:
        vrpc.close()
        return tcp, f"VRPC at {socket_path} unchecked: MNT {target.export} failed ({exc})"
    if not same:
        vrpc.close()
        return tcp, (
            f"VRPC at {socket_path} belongs to another server: the root handles of "
            f"{target.export} differ from {target.host}:{target.nfs_port}'s"
        )
    tcp.close()
    return vrpc, f"local server, attached at {socket_path}"


def _mnt_root(transport: Transport, export: str) -> bytes:
    """The root handle MNT gives for `export` over `transport`."""
    fh, _ = MountClient(rpc=RpcCallerFor(transport, MOUNT_PROGRAM, MOUNT_V3)).mnt(export)
    return fh.data


def vrpc_vm(export: str) -> str:
    """The VM a channel for `export` binds to: "/web@snap/dir" -> "web"."""
    return export.strip("/").split("/")[0].split("@")[0]


def open_vrpc(
    target: Target, cred: AuthSys, socket_path: str, token: bytes | str | None, timeout: float
) -> RecordTransport:
    """A transport over channels of the control socket at `socket_path`, bound to the VM of
    `target.export`; the first channel is attached here, so a socket that cannot serve us
    raises `TransportUnavailable` with the reason."""
    vm = vrpc_vm(target.export)
    client_id = os.urandom(CLIENT_ID_SIZE)  # one for every channel: the DRC key survives

    def connect(left: float) -> Link:
        try:
            return VrpcChannel.attach(
                socket_path, vm, token=token or b"", client_id=client_id, timeout=left
            )
        except AttachRefused:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no VRPC socket at {socket_path}") from None
        except ConnectionRefusedError:
            message = f"no server listens on {socket_path} (is prism serve running?)"
            raise ConnectionRefusedError(errno.ECONNREFUSED, message) from None
        except VrpcError as exc:  # e.g. a server stopping while we attach: try again
            raise ConnectionError(errno.ECONNRESET, f"attach at {socket_path}: {exc}") from None

    try:
        first: list[Link] = [connect(timeout)]
    except AttachRefused as exc:
        message = f"the server refused to attach VM {vm!r}: {exc.message}"
        raise TransportUnavailable(message) from None
    except OSError as exc:
        raise TransportUnavailable(exc.strerror or str(exc)) from None

    def reconnect(left: float) -> Link:
        return first.pop() if first else connect(left)

    return RecordTransport("vrpc", reconnect, cred, timeout=timeout, peer=f"VRPC {socket_path}")


class Link(Protocol):
    """One connection over which records travel; useless once it raised ConnectionError."""

    def call(self, record: bytes, timeout: float) -> bytes: ...

    def close(self) -> None: ...


class RecordTransport:
    """A `Transport` over links that `connect(timeout)` opens, reconnecting as needed."""

    def __init__(
        self,
        name: str,
        connect: Callable[[float], Link],
        cred: AuthSys,
        *,
        timeout: float,
        peer: str = "the server",
    ) -> None:
        self.name = name
        self.peer = peer
        self.timeout = timeout
        self.reconnects = 0
        """How many links were opened again after a failure (for tests and tools)."""
        self.last_failure: OSError | None = None
        """Why the last link failed, if one did (what a TimeoutError reports)."""
        self._connect = connect
        self._cred = cred.to_opaque()
        self._lock = threading.Lock()
        self._xid = random.getrandbits(32)
        self._link: Link | None = None
        self._worked = False  # once a call got through, failures mean "reconnect"
        self._closed = False

    def _drop(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def call(self, prog: int, vers: int, proc: int, args: bytes) -> bytes:
        with self._lock:
            if self._closed:
                raise ValueError("I/O operation on a closed prism.client connection")
            self._xid = (self._xid + 1) & 0xFFFF_FFFF
            record = encode_call(self._xid, prog, vers, proc, args, self._cred)
            deadline = time.monotonic() + self.timeout
            pause = RECONNECT_FIRST_PAUSE
            failure: OSError | None = None
            broke: OSError | None = None  # how the link this call was on failed
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f"last failure: {failure}"
                    if broke is not None and broke is not failure:
                        why = f"the link failed: {broke}; reconnecting: {failure}"
                    raise TimeoutError(
                        errno.ETIMEDOUT,
                        f"no reply from {self.peer} over {self.name} in {self.timeout:g} s ({why})",
                    )
                try:
                    if self._link is None:
                        self._link = self._connect(left)
                        self.reconnects += failure is not None
                    reply = self._link.call(record, left)
                except TimeoutError:
                    self._drop()
                    raise TimeoutError(
                        errno.ETIMEDOUT,
                        f"no reply from {self.peer} over {self.name} in {self.timeout:g} s",
                    ) from None
                except OSError as exc:  # ConnectionError and RpcError's ConnectionClosed too
                    self._drop()
                    if not self._worked:
                        raise  # never reached: a wrong address or port fails at once
                    failure = self.last_failure = exc  # the server went away: resend
                    broke = broke or exc
                    time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                    pause = min(pause * 2, RECONNECT_MAX_PAUSE)
                    continue
                if peek_xid(reply) != self._xid:
                    self._drop()
                    raise ConnectionClosed(f"{self.peer} answered another call over {self.name}")
                try:
                    decoded = decode_reply(reply)
                except UndecodableReply as exc:
                    self._drop()
                    message = f"{self.peer} sent an undecodable reply: {exc}"
                    raise OSError(errno.EIO, message) from None
                self._worked = True
                return raise_for_reply(decoded)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()


class TcpLink:
    """One TCP connection per RPC program to the server of `target` (a `Link`)."""

    def __init__(self, target: Target, cred: AuthSys, ports: dict[int, int]) -> None:
        self.target = target
        self.cred = cred
        self._ports = ports  # program -> port, shared by the links of one transport
        self._conns: dict[int, RpcClient] = {}

    def _port(self, prog: int) -> int:
        if prog in self._ports:
            return self._ports[prog]
        if prog != MOUNT_PROGRAM:
            raise ValueError(f"no port known for RPC program {prog}")
        try:
            where = self.target.portmap_port
            port = pmap_getport(self.target.host, MOUNT_PROGRAM, MOUNT_V3, IPPROTO_TCP, where)
        except OSError as exc:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED,
                f"no portmapper at {self.target.host}:{where} to find the MOUNT port "
                f"({exc}); give it in the URL: ?mountport=N",
            ) from None
        if not port:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED,
                f"the portmapper at {self.target.host} knows no MOUNT v3 service; "
                "give the port in the URL: ?mountport=N",
            )
        self._ports[prog] = port
        return port

    def call(self, record: bytes, timeout: float) -> bytes:
        prog = _PROG.unpack_from(record, _PROG_OFFSET)[0]
        conn = self._conns.get(prog)
        if conn is None:
            port = self._port(prog)
            # (version 0: the records come encoded, the connection only carries them)
            conn = connect_rpc(self.target.host, port, prog, 0, "tcp", self.cred, None, timeout)
            self._conns[prog] = conn
        xid = peek_xid(record)
        deadline = time.monotonic() + timeout
        conn.send_raw(record)
        while True:  # skip late replies to calls given up on
            reply = conn.recv_record(deadline - time.monotonic())
            if peek_xid(reply) == xid:
                break
        if prog == MOUNT_PROGRAM:  # MNT happens once: keep no second connection
            self._conns.pop(prog).close()
        return reply

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def tcp_transport(target: Target, cred: AuthSys, *, timeout: float) -> RecordTransport:
    """ONC-RPC over TCP to the NFS and MOUNT ports of `target`, reconnecting as needed."""
    ports = {NFS_PROGRAM: target.nfs_port}
    if target.mount_port:
        ports[MOUNT_PROGRAM] = target.mount_port

    def connect(timeout: float) -> Link:
        return TcpLink(target, cred, ports)

    return RecordTransport("tcp", connect, cred, timeout=timeout, peer=target.host)
