"""A small VRPC channel client: attach to a VM through the server's control socket, then
exchange ONC-RPC records over shared memory.

    with VrpcChannel.attach("/data/vrpc.sock", "web", token=b"") as ch:
        reply = ch.call(call_record)        # one complete CALL record in, its REPLY out
        nfs = NfsClient(rpc=ch.rpc(NFS_PROGRAM, NFS_V3, cred))   # or a program-level caller

Theory of operation: `attach` connects a Unix SOCK_SEQPACKET socket, sends one ATTACH and
receives ATTACHED with the ring memfd and the kick and call eventfds (SCM_RIGHTS), or
REFUSED, raised as `AttachRefused` (`status`, `message`). `call` copies the record into a free
slot, submits it (kicking the server only if it sleeps) and sleeps in
poll([call eventfd, control socket]) until the reply is there; a reply of
`VRPC_CQE_NOREPLY` (the server dropped the call: a duplicate still running) is resent with
the same xid after a short back-off, as TCP clients do. The control socket stays open for the
channel's life, so a server that stops, dies or detaches the channel wakes a sleeping call at
once: `ServerGone` says why (the server's REFUSED message when it sent one). Handles, like the
root handle in `attached.root_fh`, stay valid across channels and server restarts; after
`ServerGone` attach again.

One channel serves one thread: calls are sequential (open one channel per thread). `ring`,
`map`, `kick_fd` and `call_fd` are there for tests that must misbehave on purpose.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
import struct
import time
from types import TracebackType

from prism.nfs.handles import HANDLE_SIZE, HANDLE_VERSION
from prism.store.epoch import EpochFile
from rpc.client import RpcTimeout, raise_for_reply
from rpc.message import (
    NULL_AUTH,
    AuthSys,
    OpaqueAuth,
    Reply,
    decode_reply,
    encode_call,
    peek_xid,
)
from rpc.xdr import XdrError
from vrpc import abi
from vrpc.control import (
    ATTACH_META,
    CLIENT_ID_SIZE,
    MAX_MESSAGE,
    Attach,
    Attached,
    Refused,
    RefuseStatus,
    encode_attach,
)
from vrpc.control import (
    decode_reply as decode_control,
)
from vrpc.meta import MetaReader, map_table, meta_backend
from vrpc.native import ring_backend
from vrpc.ring import ClientRing, RingClosed, RingOpenError, map_segment

ATTACH_TIMEOUT = 5.0
"""Seconds to wait for the server's answer to ATTACH."""
GONE_GRACE = 1.0
"""Seconds a woken client waits for the server's word on why its channel ended."""
NOREPLY_BACKOFF = 0.01
"""Seconds before the first resend of a call the server dropped; doubled up to 1 s."""


class VrpcError(Exception):
    """Something went wrong with a VRPC channel."""


class AttachRefused(VrpcError, PermissionError):
    """The server refused ATTACH: `status` (a `RefuseStatus`) and its `message` say why."""

    def __init__(self, status: RefuseStatus, message: str) -> None:
        super().__init__(f"VRPC attach refused ({status.name}): {message}")
        self.status = status
        self.message = message

    def __reduce__(self) -> tuple[type[AttachRefused], tuple[RefuseStatus, str]]:
        return (AttachRefused, (self.status, self.message))


class ServerGone(VrpcError, ConnectionError):
    """The channel is gone: the server stopped, died or detached it. Attach again."""


_HANDLE_BODY = struct.Struct(">BIHQ")  # a handle's version, ns, vol, ino (prism.nfs.handles)


class VrpcChannel:
    """One attached channel; see the module docstring."""

    def __init__(
        self,
        sock: socket.socket,
        attached: Attached,
        fds: list[int],
        timeout: float,
        client_id: bytes,
    ) -> None:
        self.sock = sock
        self.attached = attached
        self.timeout = timeout
        ring_fd, self.kick_fd, self.call_fd = fds
        try:
            self.map = map_segment(ring_fd)
        finally:
            os.close(ring_fd)
        try:
            self.ring: ClientRing = ring_backend.client(
                self.map, kick_fd=self.kick_fd, call_fd=self.call_fd
            )
        except RingOpenError:
            self.map.close()
            raise
        self.client_id = client_id
        self._meta: MetaReader | None = None
        self._free = list(range(self.ring.nslots))
        self._done: dict[int, tuple[int, int]] = {}  # reaped completions: slot -> (len, flags)
        self._closed = False

    @classmethod
    def attach(
        cls,
        path: str | os.PathLike[str],
        vm: str,
        *,
        token: bytes | str = b"",
        slots: int = 0,
        client_id: bytes | None = None,
        flags: int = 0,
        timeout: float = 10.0,
        abi_major: int = abi.ABI_MAJOR,
        meta: bool = False,
    ) -> VrpcChannel:
        """Attach to VM `vm` through the control socket at `path`. `token` is the VM's
        (`prism vm vrpc-token`), if this process's user is not one of its VRPC users;
        `client_id` (16 bytes) keeps the server's duplicate request cache across channels.
        `timeout` bounds each call; `meta` maps the VM's attribute table too
        (`stat_from_table`). Raises `AttachRefused`, or `OSError` if no server listens."""
        if isinstance(token, str):
            token = token.encode()
        if meta:
            flags |= ATTACH_META
        msg = Attach(
            vm,
            client_id or os.urandom(CLIENT_ID_SIZE),
            token,
            slots,
            flags,
            abi_major=abi_major,
        )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        fds: list[int] = []
        try:
            sock.settimeout(ATTACH_TIMEOUT)
            sock.connect(os.fspath(path))
            sock.send(encode_attach(msg))
            data = _receive(sock, fds)
            try:
                answer = decode_control(data)
            except XdrError as exc:
                raise VrpcError(f"the server's answer to ATTACH is malformed: {exc}") from None
            if isinstance(answer, Refused):
                raise AttachRefused(answer.status, answer.message)
            if len(fds) != answer.fd_count:
                raise VrpcError(f"ATTACHED carried {len(fds)} fds, not {answer.fd_count}")
            sock.setblocking(False)
            channel = cls(sock, answer, fds[:3], timeout, msg.client_id)
            fds = fds[3:]  # (the table's and the epoch file's are closed below once mapped)
            if len(fds) == 2:
                try:
                    channel._map_meta(*fds)
                except BaseException:
                    channel.close()
                    raise
            return channel
        except BaseException:
            sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def _map_meta(self, table_fd: int, epoch_fd: int) -> None:
        epoch = EpochFile.from_fd(epoch_fd)
        try:
            self._meta = meta_backend().reader(map_table(table_fd), epoch=epoch)
        except BaseException:
            epoch.close()
            raise

    def stat_from_table(self, handle: bytes) -> bytes | None:
        """The object's fattr3 (84 XDR bytes) from the VM's attribute table, with no RPC:
        exactly what a GETATTR would answer at this instant, or None when the table cannot
        say (not attached with `meta`, not published yet, changed since, an operator command
        writing the store): then ask the server (its reply publishes it)."""
        meta = self._meta
        if meta is None or len(handle) != HANDLE_SIZE or handle[0] != HANDLE_VERSION:
            return None
        _, ns, vol, ino = _HANDLE_BODY.unpack_from(handle)
        return meta.lookup(ns, vol, ino)

    # -- calls ---------------------------------------------------------------------------

    @property
    def root_fh(self) -> bytes:
        return self.attached.root_fh

    def call(self, record: bytes | memoryview, timeout: float | None = None) -> bytes:
        """Send one complete CALL record; return its REPLY record. A call the server dropped
        (`CQE_NOREPLY`) is resent, same xid, after a back-off; raises `RpcTimeout` after
        `timeout` seconds (default: the channel's), `ServerGone` if the channel ends."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        backoff = NOREPLY_BACKOFF
        while True:
            if self._done or len(self._free) != self.ring.nslots:
                slot = self.submit(record)  # other calls in flight: the general way
                got = None
            else:  # the common case: submit, wait and reap in one step (one C call)
                slot = self._put(record)
                try:
                    left = max(0.0, deadline - time.monotonic())
                    got = self.ring.call_one(slot, len(record), left, self.sock.fileno())
                except RingClosed:
                    self._free.append(slot)
                    raise self._gone() from None
            length, flags = got if got is not None else self.collect(slot, deadline)
            if not flags & abi.CQE_NOREPLY:
                return self.reply(slot, length)
            self.release(slot)
            if time.monotonic() + backoff > deadline:
                raise RpcTimeout(f"no reply to xid {peek_xid(bytes(record[:4]))} in time")
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    # The parts of `call`, for callers that keep several calls in flight: `submit` each,
    # then `collect` a given slot or take the `next_completion`, and hand every slot back
    # with `reply` (which reads it) or `release`.

    def submit(self, record: bytes | memoryview) -> int:
        """Put `record` into a free slot and publish it; returns the slot."""
        slot = self._put(record)
        try:
            self.ring.submit(slot, len(record))
        except RingClosed:
            self._free.append(slot)
            raise self._gone() from None
        return slot

    def _put(self, record: bytes | memoryview) -> int:
        """Copy `record` into a free slot (not submitted yet); returns the slot."""
        if self._closed:
            raise ServerGone("the channel is closed")
        if not self._free:
            raise VrpcError("every slot is in flight: collect a reply first")
        if len(record) > abi.SLOT_SIZE:
            raise ValueError(f"a record of {len(record)} bytes does not fit a slot")
        slot = self._free.pop()
        self.ring.slot(slot)[: len(record)] = record
        return slot

    def collect(self, slot: int, deadline: float) -> tuple[int, int]:
        """Wait until `slot` completes (until `deadline`, a `time.monotonic()` value):
        (reply length, CQE flags)."""
        while slot not in self._done:
            self._reap(deadline)
        return self._done.pop(slot)

    def next_completion(self, deadline: float) -> tuple[int, int, int]:
        """Wait for any submitted call to complete: (slot, reply length, CQE flags)."""
        while not self._done:
            self._reap(deadline)
        slot = next(iter(self._done))
        length, flags = self._done.pop(slot)
        return slot, length, flags

    def reply(self, slot: int, length: int) -> bytes:
        """The reply in a completed slot; the slot is free again."""
        data = bytes(self.ring.slot(slot)[:length])
        self._free.append(slot)
        return data

    def release(self, slot: int) -> None:
        """Free a completed slot without reading it."""
        self._free.append(slot)

    def _reap(self, deadline: float) -> None:
        """Move completions into `_done`, sleeping for them if there are none yet."""
        try:
            got = self.ring.reap()
            if not got:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RpcTimeout("no reply from the VRPC server in time")
                self.ring.wait(left, self.sock.fileno())
                got = self.ring.reap()
        except RingClosed:
            raise self._gone() from None
        for slot, length, flags in got:
            self._done[slot] = (length, flags)

    def _gone(self) -> ServerGone:
        """Why the channel ended: the server's REFUSED message, if it left one."""
        why = "the server closed the channel (it stopped or died)"
        with contextlib.suppress(OSError, XdrError):
            select.select([self.sock], [], [], GONE_GRACE)  # (a dead server: EOF at once)
            data = self.sock.recv(MAX_MESSAGE + 1)
            answer = decode_control(data) if data else None
            if isinstance(answer, Refused):
                why = f"the server detached the channel: {answer.message}"
        return ServerGone(why)

    def rpc(
        self, prog: int, vers: int, cred: AuthSys | OpaqueAuth | None = None, *, owns: bool = False
    ) -> ChannelRpc:
        """A client of program `prog` version `vers` over this channel (`ChannelRpc`), for
        `prism.nfs.client.NfsClient(rpc=...)` and `MountClient(rpc=...)`."""
        return ChannelRpc(self, prog, vers, cred, owns=owns)

    # -- the end -------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._meta is not None:
            self._meta.release()
            self._meta = None
        self.ring.release()
        self.map.close()
        os.close(self.kick_fd)
        os.close(self.call_fd)
        self.sock.close()

    def __enter__(self) -> VrpcChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ChannelRpc:
    """A client of one program version over a channel, shaped like `rpc.client.RpcClient`
    (`call`, `call_reply`, `encode`, `exchange`, and `send_raw` / `recv_record` for tests),
    so it serves as `prism.nfs.client.NfsClient(rpc=...)` and `MountClient(rpc=...)`.
    Closing it closes the channel only if it `owns` it."""

    def __init__(
        self,
        channel: VrpcChannel,
        prog: int,
        vers: int,
        cred: AuthSys | OpaqueAuth | None = None,
        *,
        owns: bool = False,
    ) -> None:
        self.channel = channel
        self.prog = prog
        self.vers = vers
        self.cred: OpaqueAuth = cred.to_opaque() if isinstance(cred, AuthSys) else cred or NULL_AUTH
        self.owns = owns
        self._xid = int.from_bytes(os.urandom(4), "big")

    def next_xid(self) -> int:
        self._xid = (self._xid + 1) & 0xFFFF_FFFF
        return self._xid

    def encode(self, proc: int, args: bytes = b"", *, xid: int | None = None) -> bytes:
        """A complete CALL record for `proc`, with the next xid unless given."""
        return encode_call(
            self.next_xid() if xid is None else xid, self.prog, self.vers, proc, args, self.cred
        )

    def call(self, proc: int, args: bytes = b"") -> bytes:
        """Call `proc`: its encoded results; any other reply raises its `RpcError`."""
        return raise_for_reply(self.call_reply(proc, args))

    def call_reply(self, proc: int, args: bytes = b"") -> Reply:
        return self.exchange(self.encode(proc, args))

    def exchange(self, record: bytes) -> Reply:
        return decode_reply(self.channel.call(record))

    def send_raw(self, record: bytes) -> None:
        """Submit a CALL record without waiting for its reply (`recv_record` reads it)."""
        self.channel.submit(record)

    def recv_record(self, timeout: float | None = None) -> bytes:
        """The next reply to a record sent with `send_raw` (dropped calls are skipped)."""
        wait = self.channel.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            slot, length, flags = self.channel.next_completion(deadline)
            if not flags & abi.CQE_NOREPLY:
                return self.channel.reply(slot, length)
            self.channel.release(slot)

    def close(self) -> None:
        if self.owns:
            self.channel.close()

    def __enter__(self) -> ChannelRpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _receive(sock: socket.socket, fds: list[int]) -> bytes:
    """One packet; the fds it carries are appended to `fds` (the caller closes them)."""
    received = array.array("i")
    data, ancdata, _flags, _ = sock.recvmsg(
        MAX_MESSAGE + 1, socket.CMSG_SPACE(5 * received.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
    fds.extend(received)
    if not data:
        raise VrpcError("the server closed the control socket without answering ATTACH")
    return data
