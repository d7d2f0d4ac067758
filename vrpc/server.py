"""The VRPC server: a control socket that attaches channels, and the pump that feeds each
channel's ring into the same sans-IO RPC core as TCP and UDP.

Theory of operation. `VrpcServer.start()` listens on a Unix SOCK_SEQPACKET socket (mode 0666:
whoever can reach it may ask; the kernel-verified credentials decide). Each connection sends
one ATTACH (`vrpc.control`) naming a VM; the server reads the peer's pid, uid and groups from
the kernel (SO_PEERCRED, SO_PEERGROUPS) and admits it if `prism.access.vrpc_allows` says so
for the VM's record. It then creates the channel: a ring in a memfd it sizes, maps and seals
(`vrpc.ring.new_segment`), a kick and a call eventfd, and answers ATTACHED with the three fds
by SCM_RIGHTS; any failure is one REFUSED packet, then the connection closes. The control
connection stays open for the channel's life: EOF there means the client is gone.

A channel is bound to its VM: every record it submits goes to `RpcDispatcher.handle_now` with
`binding=` the VM's namespace id, so the NFS and MOUNT programs accept its calls only for that
VM's handles (and what the VM reaches through its shares and snapshots), and the peer's right
to the VM is checked again before every batch of calls, against the VM record of that moment
(one read of the VM record, like the NFS service's own check of each handle): changing
the VM's principals or rotating its token detaches the channel at its next call, and a sweep
every `SWEEP_SECONDS` detaches idle revoked channels (and drains channels that forgot to kick).

The pump (one per channel, on the event loop; no thread): the kick eventfd sits on the loop
(`add_reader`); a wakeup drains at most `BATCH` SQEs, copies each record once out of the ring
(R2, `ServerRing.record`), and dispatches it as TCP does: an immediate outcome completes its
slot at once, one that must wait runs as a task (`start_eagerly`). A channel runs at most its
slot count of calls; with work left after a batch it yields to the loop (`call_soon`) so that
no channel starves TCP or another channel; with none it re-arms (SERVER_IDLE, rule R4).

Errors. A bad index, length or slot (the ring's R3 checks), a record that is not an RPC call,
or anything on the control socket after ATTACH is a protocol error that closes that channel
only: SERVER_CLOSED is set, the client's call fd written, one REFUSED packet saying why goes
down the control socket, which then closes; calls still running finish and their replies are
dropped, then the channel's memory and fds are freed. Bounds: `MAX_CHANNELS` in total
(`--vrpc-max-channels`), `MAX_CHANNELS_PER_UID`, `MAX_SLOTS` slots per channel,
`MAX_PENDING` connections that have not attached yet, each for at most `ATTACH_TIMEOUT`.

Guest channels (`prism vm vrpc-guest NAME`, a GUEST request from root or the server's own
user). A QEMU guest reaches a ring through ivshmem-plain, over the ring's file on tmpfs
(`vrpc.guestrings`: `/dev/shm/prism-vrpc-<h>/vm-<id>.ring`, `GUEST_SEGMENT_SIZE`, a power of
2 as a BAR must be); no eventfd crosses into a guest, so the ring is in poll mode
(`VRPC_DOORBELL_POLL`): the server looks at its SQ on every turn of the loop for `POLL_SPIN`
after activity, then on a timer backing off from `POLL_MIN` to `POLL_MAX` (the idle cost is
bounded: one look per `POLL_MAX` per guest channel), and the guest polls the CQ.
The channel is bound to its VM when the operator's command makes it, as a token binds a
channel: holding its memory is the capability, the guest cannot name another VM (MOUNT and
NFS accept only that VM's handles), and its control connection ends with the answer. The
binding is the VM id in the file's name, in the server's own directory: nothing in the file
decides it. One per VM. Root may give the file to the user QEMU runs as (GUEST's `owner`,
`prism vm vrpc-guest NAME --owner USER[:GROUP]`): recorded, so re-adoption keeps it. The
sweep and each batch look at the VM once the store epoch moves: a rename only changes the
name the channel is logged under (the channel, like its handles, is bound to the VM's id);
a removal closes the channel for good (SERVER_CLOSED | SERVER_GONE: the guest's next call
fails at once), frees it and removes the file.
The file outlives the channel: when the server stops (SERVER_CLOSED) or dies, QEMU keeps
mapping it, and the next start adopts the files of the VMs that still exist (and removes the
others'): it closes each, waits `ADOPT_SETTLE` for a guest's submission in progress, then
resets it, a new ring whose indices start at the guest's SQ tail under a new boot id and
channel id. A guest that was idle goes on; one with a call in flight sees the new ids, opens
the ring again (validated as at first) and resends the call, as an NFS client retransmits
after a restart (the DRC is gone, as over TCP). A guest that broke the ring protocol gets
its channel closed; the command then resets the same file, and the guest may go on. Every
word read from the shared memory goes through the same validation as a host channel's.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prism.access import LocalPeer, vrpc_allows
from prism.errors import StoreError
from prism.nfs.const import MAX_READ, MAX_WRITE, NFS_PROGRAM, NFS_V3, Nfs3Proc
from prism.nfs.service import NfsService
from prism.store.epoch import EpochFile
from rpc.server import TRANSPORT_SHM, Outcome, ProcStats, RpcDispatcher
from rpc.transport import start_eagerly
from rpc.xdr import XdrError
from vrpc import abi
from vrpc.control import (
    ATTACH_META,
    ATTACH_NO_FASTPATH,
    MAX_CHANNELS,
    MAX_CHANNELS_PER_UID,
    MAX_MESSAGE,
    MAX_REFUSAL,
    Attach,
    Attached,
    GuestOwner,
    GuestRequest,
    GuestRing,
    Refused,
    RefuseStatus,
    decode_request,
    encode_attached,
    encode_guest_ring,
    encode_refused,
)
from vrpc.guestrings import GuestRingError, GuestRings
from vrpc.native import BACKEND, ring_backend
from vrpc.publisher import MetaPublisher
from vrpc.pyring import HeaderWords
from vrpc.ring import RingClosed, RingProtocolError, Segment, ServerRing, eventfd, new_segment
from vrpc.stats import VrpcStats, publish, snapshot, unpublish

log = logging.getLogger("prism.vrpc")

DEFAULT_SLOTS = abi.DEFAULT_SLOTS
"""Slots (calls in flight) of a channel whose ATTACH asks for 0."""
MAX_SLOTS = abi.MAX_SLOTS
"""Slots a channel may have at most (17 MiB of address space per 16 slots)."""
MAX_PENDING = 64
"""Control connections that have not attached yet; more are closed at once."""
ATTACH_TIMEOUT = 5.0
"""Seconds a control connection may take to send its ATTACH."""
BATCH = 32
"""Records one channel may start per turn of the event loop."""
SWEEP_SECONDS = 0.25
"""How often idle channels are re-checked (revoked ones detached, forgotten kicks drained)."""
STATS_SECONDS = 1.0
"""How often the figures `prism stats` shows are written out, while they change."""
GUEST_SLOTS = 4
"""Slots of a guest channel (a guest client runs a few calls at a time)."""
GUEST_SEGMENT_SIZE = 8 << 20
"""Bytes of a guest channel's memfd: the power of 2 above `ring_size(GUEST_SLOTS)`."""
ADOPT_SETTLE = 0.05
"""Seconds between closing the rings a restarted server adopts and resetting them: a guest
that was submitting as it closed has published its SQE by then (and resends it after the
reset, which starts after it)."""
POLL_SPIN = 0.001
"""Seconds a guest channel is looked at on every turn of the loop after activity (its CPU
cost is at most this per burst of calls; other readers run in between)."""
POLL_MIN = 0.0005
"""Seconds between looks at a guest channel's SQ right after activity."""
POLL_MAX = 0.05
"""Seconds between looks at an idle guest channel's SQ (doubling up from POLL_MIN)."""
SO_PEERGROUPS = 59  # Linux; absent from Python's socket module
MAX_PEER_GROUPS = 256  # what fits getsockopt's 1024-byte buffer


def peer_of(conn: socket.socket, token: bytes = b"") -> LocalPeer:
    """The kernel's word on who is at the other end of a Unix socket."""
    pid, uid, gid = struct.unpack("iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    gids = {gid}
    with contextlib.suppress(OSError):  # ERANGE beyond MAX_PEER_GROUPS: the primary gid only
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return LocalPeer(pid, uid, frozenset(gids), token)


class ListenError(Exception):
    """The control socket cannot be made where asked (the message says what to do)."""


@dataclass(eq=False)
class Channel:
    """One attached channel: its ring, doorbells, control connection and running calls."""

    server: VrpcServer
    id: int
    vm: int
    vm_name: str
    peer: LocalPeer
    rpc_peer: tuple[str, int]
    conn: socket.socket | None
    """The control connection; None for a guest channel (its memory is its binding)."""
    segment: Segment
    ring: ServerRing
    kick: int
    call: int
    meta: bool = False
    """Whether it holds its VM's attribute table (`VrpcServer.meta`)."""
    fast: bool = False
    """Whether GETATTR hits and NULL are answered in C (`vrpc_srv_pump` with the table)."""
    fast_seen: tuple[int, int, int, int] = (0, 0, 0, 0)
    """The ring's fast-path counters already folded into the statistics."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    in_flight: int = 0
    closed: bool = False
    freed: bool = False
    again: asyncio.Handle | None = None
    """The drain scheduled for the next turn of the loop, after a full batch."""
    guest: bool = False
    """A poll-mode channel for a QEMU guest (no doorbell fds, no control connection)."""
    poller: asyncio.Handle | None = None
    """A guest channel's next look at its SQ."""
    drained: int = 0
    """SQEs consumed so far (a guest channel's poller backs off while it stays put)."""
    idle_polls: int = 0
    busy_at: float = 0.0
    """Loop time of a guest channel's last activity."""
    allowed_at: int | None = None
    """The store epoch at which the peer's right was last confirmed (`still_allowed`)."""

    def describe(self) -> str:
        kind = "vrpc guest channel" if self.guest else "vrpc channel"
        return f"{kind} {self.id} (vm {self.vm_name}, uid {self.peer.uid}, pid {self.peer.pid})"

    # -- the pump ------------------------------------------------------------------------

    def on_kick(self) -> None:
        if not self.closed:
            self.drain(self.kick)

    def drain(self, kick: int = -1) -> None:
        """Run what the client submitted: at most BATCH records, then yield or sleep. Each
        turn is one C call (`pump`: the kick consumed, GETATTR hits and NULL answered in C
        with the fast path, the ring rearmed when empty), then Python runs the rest."""
        self.again = None
        server = self.server
        left = BATCH
        while not self.closed:
            try:
                meta = server.meta.cdata(self.vm) if self.fast else None
                if meta:
                    work, armed = cast(Any, self.ring).pump(left, kick, meta)
                    drained = server.count_fast(self)
                else:
                    work, armed = self.ring.pump(left, kick)
                    drained = len(work)
                self.drained += drained
            except RingProtocolError:
                self.fail(self.ring.error or "the ring broke")
                return
            except RingClosed:
                return
            kick = -1
            left -= drained
            if work and not server.still_allowed(self):  # once per batch, before any call
                return
            for slot, length in work:
                if self.closed:
                    return
                record = self.ring.record(slot, length)  # the one copy (R2)
                server.stats.calls += 1
                outcome = server.dispatcher.handle_now(
                    record, self.rpc_peer, TRANSPORT_SHM, binding=self.vm
                )
                if type(outcome) is tuple:
                    self.complete(slot, *outcome)
                else:
                    self.in_flight += 1
                    start_eagerly(self._serve(slot, cast(Awaitable[Outcome], outcome)), self.tasks)
            if armed:
                return  # asleep: the client kicks when it submits
            if left <= 0:  # more may wait: after every other reader's turn
                self.again = asyncio.get_running_loop().call_soon(self.drain)
                return

    def poll(self) -> None:
        """A guest channel's doorbell: drain what came; look again at the next turn of the
        loop for `POLL_SPIN` after activity, then `POLL_MIN` later, doubling the wait up to
        `POLL_MAX` while nothing comes."""
        self.poller = None
        if self.closed:
            return
        before = self.drained
        if self.again is None and self.ring.arm():  # (arm: one look at the SQ tail)
            self.drain()
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        if self.drained != before:
            self.busy_at = loop.time()
        if self.drained != before or self.in_flight > 0:
            self.idle_polls = 0
        if loop.time() - self.busy_at < POLL_SPIN:  # the guest's next call comes soon
            self.poller = loop.call_soon(self.poll)
            return
        self.idle_polls = min(self.idle_polls + 1, 16)
        delay = min(POLL_MIN * (1 << self.idle_polls), POLL_MAX)
        self.poller = loop.call_later(delay, self.poll)

    async def _serve(self, slot: int, pending: Awaitable[Outcome]) -> None:
        try:
            self.complete(slot, *await pending)
            if self.guest and not self.closed and self.poller is not None:
                self.poller.cancel()  # the guest's next call follows its reply: look now
                self.busy_at = asyncio.get_running_loop().time()
                self.poller = asyncio.get_running_loop().call_soon(self.poll)
        except Exception:  # the dispatcher never raises; this guards the pump itself
            log.exception("%s: unexpected error serving a call", self.describe())
            self.fail("internal error")
        finally:
            self.in_flight -= 1
            if self.closed and self.in_flight == 0:
                self.free()

    def complete(self, slot: int, reply: bytes | None, close: bool) -> None:
        if close:  # not an RPC call at all: as a TCP connection, the channel ends
            self.fail(f"slot {slot} holds a record that is not an RPC call")
            return
        if self.closed:
            return
        try:
            if reply is None:
                self.ring.complete(slot, b"", abi.CQE_NOREPLY)  # the client resends (R7)
            else:
                self.ring.complete(slot, reply)
        except RingClosed:
            pass

    # -- the end -------------------------------------------------------------------------

    def on_control(self) -> None:
        """The control socket is readable: EOF (the client is gone) or a stray packet."""
        assert self.conn is not None  # (a guest channel has no control connection)
        try:
            data = self.conn.recv(MAX_MESSAGE + 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.fail("a control message after ATTACH")
        else:
            self.detach("the client closed its control socket", RefuseStatus.INVAL, quiet=True)

    def fail(self, what: str) -> None:
        """A protocol error: close this channel, and only this one."""
        if self.closed:
            return
        self.server.stats.protocol_errors += 1
        log.warning("%s: protocol error: %s; channel closed", self.describe(), what)
        self.detach(f"protocol error: {what}", RefuseStatus.INVAL, quiet=True)

    def detach(
        self, why: str, status: RefuseStatus, *, quiet: bool = False, gone: bool = False
    ) -> None:
        """Close the channel: the client wakes (SERVER_CLOSED, call fd) and reads `why` on
        its control socket; running calls finish, their replies dropped, then it is freed.
        `gone`: for good (SERVER_GONE too: a guest stops waiting for the ring's reset)."""
        if self.closed:
            return
        self.closed = True
        if not quiet:
            log.info("%s detached: %s", self.describe(), why)
        if self.again is not None:
            self.again.cancel()
        if self.poller is not None:
            self.poller.cancel()
        loop = asyncio.get_running_loop()
        if self.kick >= 0:
            loop.remove_reader(self.kick)
        if self.conn is not None:
            loop.remove_reader(self.conn.fileno())
            with contextlib.suppress(OSError, ValueError):  # first: the client reads it on waking
                self.conn.send(encode_refused(Refused(status, why[:MAX_REFUSAL])))
        if gone:
            self.ring.retire()
        else:
            self.ring.close()
        if self.conn is not None:
            self.conn.close()
        if self.in_flight == 0:
            self.free()

    def free(self) -> None:
        if self.freed:
            return
        self.freed = True
        self.ring.release()
        self.segment.close()
        for fd in (self.kick, self.call):
            if fd >= 0:
                os.close(fd)
        if self.meta:
            self.server.meta.detach(self.vm)
        self.server.forget(self)


class VrpcServer:
    """Listens on `path` and attaches channels to VMs; see the module docstring."""

    def __init__(
        self,
        dispatcher: RpcDispatcher,
        service: NfsService,
        path: Path,
        *,
        data: Path | None = None,
        max_channels: int = MAX_CHANNELS,
        max_per_uid: int = MAX_CHANNELS_PER_UID,
        default_slots: int = DEFAULT_SLOTS,
        meta_entries: int = abi.DEFAULT_META_BUCKETS,
    ) -> None:
        self.dispatcher = dispatcher
        store = cast(Any, service.store)
        self.meta = MetaPublisher(
            getattr(store, "epoch", None), buckets=meta_entries, boot_id=store.boot_id
        )
        """The VMs' attribute tables (made as ATTACH_META channels come)."""
        self.service = service
        self.path = Path(path)
        self.max_channels = max_channels
        self.max_per_uid = max_per_uid
        self.default_slots = default_slots
        self.stats = VrpcStats()
        self.channels: dict[int, Channel] = {}
        self.guests: dict[int, Channel] = {}
        """Each VM's guest channel, by namespace id (`_guest`)."""
        self.rings = GuestRings(data, GUEST_SEGMENT_SIZE)
        """The guest channels' memory: files that outlive this run (`vrpc.guestrings`)."""
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._pending: dict[socket.socket, asyncio.TimerHandle] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._data = data  # where `prism stats` finds the figures (None: nowhere)
        self._published: dict[str, object] = {}
        self._publisher: asyncio.TimerHandle | None = None

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on `path`; raises `ListenError` saying what to do if that cannot be."""
        path = self.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._clear_stale(path)
            sock.bind(str(path))
            os.chmod(path, 0o666)  # who may attach is decided by peer credentials
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ListenError(
                f"cannot listen for VRPC on {path}: {exc.strerror}; give --vrpc a path in an"
                " existing directory the server may write, or pass --no-vrpc"
            ) from exc
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.service.meta = self.meta
        cast(Any, self.service.store).observer = self.meta
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        self._publish()
        log.info("vrpc: control socket %s (%s ring backend)", path, BACKEND)
        await self._adopt_guests()

    async def _adopt_guests(self) -> None:
        """Take back the guest rings of the last run whose VMs still exist (their guests
        carry on after the reset) and remove the others'."""
        try:
            found = self.rings.vm_ids()
        except GuestRingError as exc:
            log.warning("vrpc: no guest ring adopted: %s", exc)
            return
        if not found and not self.rings.owners:
            return
        vms = self.service.executor.call_now(lambda s: s.list_namespaces("vm"))
        names = {info.id: info.name for info in vms}
        self.rings.forget_others(set(names))
        adopted: list[tuple[int, Segment]] = []
        for vm in found:
            if vm not in names:
                self.rings.remove(vm)
                log.info("vrpc: removed the guest ring of VM id %d, which no longer exists", vm)
                continue
            try:
                segment = self.rings.open(vm)
            except OSError as exc:
                log.warning("vrpc: cannot adopt the guest ring of %s: %s", names[vm], exc)
                continue
            words = HeaderWords(segment.map)
            words.put("server_flags", abi.SERVER_CLOSED)  # (R8)
            words.release()
            adopted.append((vm, segment))  # closed: a guest submits no more
        await asyncio.sleep(ADOPT_SETTLE)
        me = LocalPeer(os.getpid(), os.geteuid(), frozenset(), b"")
        for vm, segment in adopted:
            try:
                ch = self._open_guest(vm, names[vm], me, segment)
            except Exception:
                log.exception("vrpc: cannot adopt the guest ring of %s", names[vm])
                continue
            log.info("%s adopted from the last run (reset)", ch.describe())

    @staticmethod
    def _clear_stale(path: Path) -> None:
        """Remove a dead server's socket at `path`; refuse a live one's, or anything else."""
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ListenError(f"{path} exists and is not a socket: give --vrpc another path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink()  # nobody listens: a server that died
                return
            except OSError:
                return  # (bind will say what is wrong)
        raise ListenError(
            f"another server listens for VRPC on {path}: give this one another --vrpc PATH,"
            " or --no-vrpc"
        )

    async def stop(self) -> None:
        """Stop attaching; wake and detach every channel; let running calls finish."""
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._sweep is not None:
            self._sweep.cancel()
        if self._publisher is not None:
            self._publisher.cancel()
        if self._data is not None:
            unpublish(self._data)
        for conn, timer in list(self._pending.items()):
            timer.cancel()
            self._drop_pending(conn)
        tasks = [t for ch in self.channels.values() for t in ch.tasks]
        for ch in list(self.channels.values()):
            ch.detach("the server is stopping: attach again once it is back", RefuseStatus.BUSY)
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        self.service.meta = None
        cast(Any, self.service.store).observer = None
        self.meta.close()
        self.rings.close()

    # -- attaching -----------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again at the next wakeup
                log.warning("vrpc: cannot accept a control connection: %s", exc)
                return
            if len(self._pending) >= MAX_PENDING:
                conn.close()
                continue
            conn.setblocking(False)
            self._pending[conn] = loop.call_later(ATTACH_TIMEOUT, self._drop_pending, conn)
            loop.add_reader(conn.fileno(), self._on_attach, conn)

    def _drop_pending(self, conn: socket.socket) -> None:
        timer = self._pending.pop(conn, None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
        conn.close()

    def _on_attach(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_MESSAGE + 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        timer = self._pending.pop(conn)
        timer.cancel()
        asyncio.get_running_loop().remove_reader(conn.fileno())
        if not data:
            conn.close()
            return
        try:
            answer = self._attach(conn, data)
        except Exception:
            log.exception("vrpc: ATTACH failed")
            answer = Refused(RefuseStatus.INVAL, "the server failed to attach: see its log")
        if isinstance(answer, Refused):
            self.stats.refused += 1
            log.info("vrpc: ATTACH refused (%s): %s", answer.status.name, answer.message)
            with contextlib.suppress(OSError):
                conn.send(encode_refused(answer))
            conn.close()

    def _attach(self, conn: socket.socket, data: bytes) -> Refused | None:
        """Attach `conn` as ATTACH `data` asks, or say why not."""
        try:
            msg = decode_request(data)
        except XdrError as exc:
            return Refused(RefuseStatus.INVAL, f"not an ATTACH message: {exc}")
        if msg.abi_major != abi.ABI_MAJOR:
            return Refused(
                RefuseStatus.ABI,
                f"this server speaks VRPC ABI {abi.ABI_MAJOR}.{abi.ABI_MINOR}, the client "
                f"{msg.abi_major}.{msg.abi_minor}: upgrade one of them",
            )
        if isinstance(msg, GuestRequest):
            return self._guest(conn, msg)
        peer = peer_of(conn, msg.token)
        if "@" in msg.vm:
            return Refused(
                RefuseStatus.NOENT,
                f"{msg.vm!r} is a snapshot: attach to its VM and MNT /{msg.vm} over the channel",
            )
        try:
            info = self.service.executor.call_now(lambda s: s.namespace(msg.vm))
        except StoreError:
            return Refused(RefuseStatus.NOENT, f"no VM named {msg.vm!r}")
        if not vrpc_allows(info.export, peer):
            why = (
                "the token is not the VM's (rotated?)"
                if msg.token
                else (
                    f"uid {peer.uid} is not among the VM's VRPC users or groups"
                    f" (`prism vm set {msg.vm} --vrpc-user UID`, or use its token)"
                )
            )
            return Refused(RefuseStatus.ACCES, f"may not attach to {msg.vm}: {why}")
        if len(self.channels) >= self.max_channels:
            return Refused(RefuseStatus.BUSY, f"the server has {self.max_channels} channels")
        mine = sum(1 for ch in self.channels.values() if ch.peer.uid == peer.uid)
        if mine >= self.max_per_uid:
            return Refused(RefuseStatus.BUSY, f"uid {peer.uid} has {mine} channels, the most")
        self._open(conn, msg, peer, info.id, self.service.fh(info.root).data)
        return None

    def _guest(self, conn: socket.socket, msg: GuestRequest) -> Refused | None:
        """Answer GUEST: the VM's guest channel (made now unless one is open), or why not."""
        peer = peer_of(conn)
        if peer.uid not in (0, os.geteuid()):
            return Refused(
                RefuseStatus.ACCES,
                f"uid {peer.uid} may not make guest channels: run `prism vm vrpc-guest` as root"
                " or as the server's user (the ring's memory goes to a QEMU they choose)",
            )
        if msg.owner != GuestOwner.KEEP and peer.uid != 0:
            return Refused(
                RefuseStatus.ACCES,
                "only root may give a guest ring to another user (--owner): whoever may open"
                " it can reach the VM, and shrink the file under the server",
            )
        if "@" in msg.vm:
            return Refused(RefuseStatus.NOENT, f"{msg.vm!r} is a snapshot: give its VM")
        try:
            info = self.service.executor.call_now(lambda s: s.namespace(msg.vm))
        except StoreError:
            return Refused(RefuseStatus.NOENT, f"no VM named {msg.vm!r}")
        if msg.owner != GuestOwner.KEEP:
            owner = (msg.uid, msg.gid) if msg.owner == GuestOwner.SET else None
            try:
                self.rings.give(info.id, owner)
            except (GuestRingError, OSError) as exc:
                return Refused(RefuseStatus.BUSY, f"cannot give {msg.vm}'s ring: {exc}")
            log.info("vrpc: %s's guest ring belongs to %s", msg.vm, owner or "the server's user")
        ch = self.guests.get(info.id)
        created = ch is None or ch.closed
        if ch is None or ch.closed:
            if len(self.channels) >= self.max_channels:
                return Refused(RefuseStatus.BUSY, f"the server has {self.max_channels} channels")
            try:
                ch = self._open_guest(info.id, msg.vm, peer, self.rings.open(info.id))
            except (GuestRingError, OSError) as exc:
                log.warning("vrpc: no guest ring for %s: %s", msg.vm, exc)
                return Refused(RefuseStatus.BUSY, f"no guest ring for {msg.vm}: {exc}")
        answer = GuestRing(
            ch.id, self.rings.mem_path(info.id), len(ch.segment.map), ch.ring.nslots, created
        )
        with contextlib.suppress(OSError):
            conn.send(encode_guest_ring(answer))
        conn.close()
        return None

    def _open_guest(self, vm: int, vm_name: str, peer: LocalPeer, segment: Segment) -> Channel:
        """A poll-mode channel bound to `vm`, for a QEMU guest (see the module docstring),
        over its ring file `segment`, reset: its indices start at the guest's SQ tail, so a
        guest idle across the reset goes on, and one with a call in flight sees the new
        boot and channel ids and resends the call."""
        channel_id = next(self._ids)
        words = HeaderWords(segment.map)
        first = words.get("sq_tail")  # (any u32)
        words.release()
        fast = self.meta.epoch is not None and ring_backend.name == "native"
        held = False
        try:
            if fast:
                self.meta.attach(vm, vm_name)
                held = True
            ring = ring_backend.server(
                segment.map,
                nslots=GUEST_SLOTS,
                doorbell=abi.DOORBELL_POLL,
                features=abi.F_FASTPATH if fast else 0,
                boot_id=self.service.store.boot_id,
                channel_id=channel_id,
                first_index=first,
            )
        except BaseException:
            segment.close()
            if held:
                self.meta.detach(vm)
            raise
        rpc_peer = (f"vrpc-guest:{vm}:{channel_id}", 0)  # the DRC's "host" (by VM id)
        ch = Channel(self, channel_id, vm, vm_name, peer, rpc_peer, None, segment, ring, -1, -1)
        ch.meta, ch.fast, ch.guest = held, fast, True
        self.channels[channel_id] = ch
        self.guests[vm] = ch
        self.stats.attached += 1
        log.info("%s made (%d bytes, poll mode)", ch.describe(), len(segment.map))
        loop = asyncio.get_running_loop()
        ch.poller = loop.call_soon(ch.poll)
        if self._sweep is None:  # (which notices the VM's removal)
            self._sweep = loop.call_later(SWEEP_SECONDS, self._sweep_channels)
        return ch

    def _open(
        self, conn: socket.socket, msg: Attach, peer: LocalPeer, vm: int, root_fh: bytes
    ) -> None:
        nslots = min(msg.want_slots or self.default_slots, MAX_SLOTS)
        channel_id = next(self._ids)
        boot_id = self.service.store.boot_id
        segment = new_segment(nslots, f"prism-vrpc-{msg.vm}")
        kick, call = eventfd(), eventfd()
        have_epoch = self.meta.epoch is not None
        want_meta = bool(msg.flags & ATTACH_META) and have_epoch
        # the C fast path answers from the VM's table, so it needs one too
        fast = have_epoch and ring_backend.name == "native" and not msg.flags & ATTACH_NO_FASTPATH
        extra: list[int] = []
        held = False
        try:
            if want_meta or fast:
                table = self.meta.attach(vm, msg.vm)
                held = True
            if want_meta:
                extra = [table.fd]
                extra.append(cast(EpochFile, self.meta.epoch).open_readonly())
            ring = ring_backend.server(
                segment.map, nslots=nslots, boot_id=boot_id, channel_id=channel_id, call_fd=call
            )
            reply = encode_attached(
                Attached(
                    channel_id=channel_id,
                    boot_id=boot_id,
                    ring_size=abi.ring_size(nslots),
                    meta_size=abi.meta_size(self.meta.buckets) if want_meta else 0,
                    vm_ns=vm,
                    root_fh=root_fh,
                    max_io=min(MAX_READ, MAX_WRITE),
                    features=(abi.F_META if want_meta else 0) | (abi.F_FASTPATH if fast else 0),
                )
            )
            fds = array.array("i", [segment.fd, kick, call, *extra])
            conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except BaseException:
            segment.close()
            os.close(kick)
            os.close(call)
            if held:
                self.meta.detach(vm)
            conn.close()
            raise
        finally:
            if len(extra) == 2:
                os.close(extra[1])  # the epoch fd: the client's copy travelled
        ch = Channel(
            self,
            channel_id,
            vm,
            msg.vm,
            peer,
            # the duplicate request cache's "host": one per client instance and user, kept
            # across its channels (the client keeps its client_id when it attaches again)
            (f"vrpc:{msg.vm}:{peer.uid}:{msg.client_id.hex()}", peer.pid),
            conn,
            segment,
            ring,
            kick,
            call,
            meta=held,
            fast=fast,
        )
        self.channels[channel_id] = ch
        self.stats.attached += 1
        loop = asyncio.get_running_loop()
        loop.add_reader(kick, ch.on_kick)
        loop.add_reader(conn.fileno(), ch.on_control)
        log.info("%s attached (%d slots)", ch.describe(), nslots)
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_SECONDS, self._sweep_channels)
        ch.drain()  # (anything submitted before the kick reader existed)

    # -- who may go on -------------------------------------------------------------------

    def still_allowed(self, ch: Channel) -> bool:
        """Whether `ch`'s peer may still use its VM (else the channel is detached). A
        removed VM's channel stays: its calls get STALE, as its handles do over TCP, and it
        can reach nothing else (a VM made again under that name has another id). A guest
        channel's binding is its memory, given by the operator: it has no principals, and
        it ends with its VM (`_guest_vm_lives`).

        VM records change only through operator commands, which are other processes and
        bracket their writes in the store epoch: while the epoch stays where it was (stable)
        when the right was last confirmed, the record is the one read then, so the answer
        stands without reading it again (a store read per batch cost the Python path more
        than the whole transport saved). The epoch is taken before the read, so a write that
        begins during it moves the epoch and the next batch reads again."""
        epoch = self.meta.epoch
        stable = epoch.stable() if epoch is not None else None
        if stable is not None and ch.allowed_at == stable:
            return True
        if ch.guest:
            return self._guest_vm_lives(ch, stable)
        try:
            export = self.service.executor.call_now(lambda s: s.export_of(ch.vm))
        except StoreError:
            return True
        if vrpc_allows(export, ch.peer):
            ch.allowed_at = stable
            return True
        self.stats.revoked += 1
        what = "its token was rotated" if ch.peer.token else "its principals changed"
        ch.detach(f"may no longer use {ch.vm_name}: {what}", RefuseStatus.ACCES)
        return False

    def _guest_vm_lives(self, ch: Channel, stable: int | None) -> bool:
        """Whether guest channel `ch`'s VM still exists (else the channel is closed and
        freed: nothing else would ever end it). A rename changes only the name it is logged
        under: the channel is bound to the VM's id, as its handles are."""
        try:
            info = self.service.executor.call_now(lambda s: s.namespace_by_id(ch.vm))
        except StoreError:
            log.info("%s: its VM was removed; channel closed", ch.describe())
            ch.detach("its VM was removed", RefuseStatus.NOENT, quiet=True, gone=True)
            self.rings.remove(ch.vm)
            return False
        if info.name != ch.vm_name:
            log.info("%s: its VM is now named %s", ch.describe(), info.name)
            ch.vm_name = info.name
        ch.allowed_at = stable
        return True

    def _sweep_channels(self) -> None:
        self._sweep = None
        for ch in list(self.channels.values()):
            if not ch.closed and self.still_allowed(ch) and ch.again is None:
                ch.drain()  # a client that cleared SERVER_IDLE or never kicked
        if self.channels:
            self._sweep = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep_channels)

    def _publish(self) -> None:
        self._publisher = asyncio.get_running_loop().call_later(STATS_SECONDS, self._publish)
        figures = snapshot(self.stats, self.open_channels)
        if self._data is None or figures == self._published:
            return
        try:
            publish(self._data, figures)
        except OSError as exc:
            log.warning("vrpc: cannot write the figures for `prism stats`: %s", exc)
        self._published = figures

    def count_fast(self, ch: Channel) -> int:
        """Fold what `ch`'s C fast path answered since the last look into the one set of
        statistics (the dispatcher's per-procedure figures and outcomes, the VM's calls,
        VRPC's fast-path hits; each call's latency is the batch's average); the SQEs it
        drained meanwhile."""
        drained, getattr_, null, ns = cast(Any, ch.ring).fast_stats
        d0, g0, n0, t0 = ch.fast_seen
        ch.fast_seen = (drained, getattr_, null, ns)
        answered = getattr_ - g0 + null - n0
        if answered:
            each = (ns - t0) / 1e9 / answered
            stats = self.dispatcher.stats
            for proc, n in ((Nfs3Proc.GETATTR, getattr_ - g0), (Nfs3Proc.NULL, null - n0)):
                key, name = (NFS_PROGRAM, NFS_V3, int(proc)), proc.name
                if n:
                    row = stats.procs.get(key)
                    if row is None:
                        row = stats.procs[key] = ProcStats("nfs", name)
                    row.calls += n
                    row.latency.observe(each, n)
                    if proc != Nfs3Proc.NULL:  # as over TCP: NULL names no VM's object
                        self.service.account(ch.vm).calls[proc] += n
            stats.outcomes["SUCCESS"] += answered
            self.stats.fast_path_hits += answered
        return drained - d0

    def forget(self, ch: Channel) -> None:
        self.channels.pop(ch.id, None)
        if self.guests.get(ch.vm) is ch:
            del self.guests[ch.vm]

    @property
    def open_channels(self) -> int:
        return sum(1 for ch in self.channels.values() if not ch.closed)


def default_socket(data: Path) -> Path:
    """Where `prism serve` listens unless `--vrpc PATH` says otherwise."""
    return Path(data) / "vrpc.sock"
