"""VRPC clients that break the rules, and clients and servers that die, against a real server.

A hostile client has its ring mapped read-write and scribbles on it: indices far ahead, SQEs
naming slots that do not exist or are in flight, lengths beyond a slot, unknown flags,
records that are not RPC calls (and the hostile-server corpus of mutated calls), a slot
rewritten while the server reads a 1 MiB WRITE from it, a flooded kick eventfd, a cleared
SERVER_IDLE flag, a scribbled cq_tail. Each time its own channel is closed (the log names it,
and its client learns why) or its calls get RPC errors, while a TCP client and another
channel keep working; afterwards `prism fsck` finds the store clean.

Lifecycle: a client killed mid-call (during durable CREATEs and 1 MiB WRITEs), 50 times,
leaves no channel and no descriptor behind in the server; SIGTERM (and kill -9) wake a client
asleep in a call with a clear error within a second.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prism.nfs.client import (  # (the wire types, wherever the client takes them from)
    SATTR_EMPTY,
    CreateArgs,
    DirOpArgs3,
    GetattrArgs,
    NfsFh3,
    WriteArgs,
    encode_args,
)
from prism.nfs.const import NFS_PROGRAM, NFS_V3, CreateMode, Nfs3Proc, StableHow
from rpc.message import AcceptedReply, AcceptStat, decode_reply
from tests.server_helpers import PrismProcess, new_data_dir, prism_cli
from tests.test_server_hostile import CRED, mount_corpus, mutated, nfs_corpus
from tests.vrpc_helpers import BACKENDS, nfs_over, socket_of
from vrpc import abi
from vrpc.client import ServerGone, VrpcChannel
from vrpc.native import BACKEND

MiB = 1 << 20
NF3REG = 1  # ftype3 of a regular file (RFC 1813)
_U32 = struct.Struct("=I")
SQ_TAIL, SQ_HEAD = abi.RING_HEADER["sq_tail"][0], abi.RING_HEADER["sq_head"][0]
SERVER_FLAGS, CQ_TAIL = abi.RING_HEADER["server_flags"][0], abi.RING_HEADER["cq_tail"][0]
ENTRIES = abi.RING_HEADER["entries"][0]


def _server(base: Path, backend: str) -> Iterator[PrismProcess]:
    data = new_data_dir(base / "data", ["vm"])
    env = {"PRISM_VRPC_BACKEND": backend}
    with PrismProcess(data, base / "logs", env=env) as server:
        yield server
        assert f"({backend} ring backend)" in server.stderr()
    fsck = prism_cli(data, "fsck", "--json")
    assert '"clean": true' in fsck.stdout, fsck.stdout


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProcess]:
    """The server of the module, with the default ring backend (native when built)."""
    yield from _server(tmp_path_factory.mktemp("vrpc-hostile"), BACKEND)


@pytest.fixture(scope="module", params=BACKENDS)
def any_srv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrismProcess]:
    """A server per ring backend: the ring's checks are C or Python, both must hold."""
    yield from _server(tmp_path_factory.mktemp(f"vrpc-{request.param}"), request.param)


def attach(srv: PrismProcess, **kw: object) -> VrpcChannel:
    return VrpcChannel.attach(socket_of(srv.ready_line), "vm", **kw)  # type: ignore[arg-type]


def word(ch: VrpcChannel, offset: int) -> int:
    return int(_U32.unpack_from(ch.map, offset)[0])


def poke(ch: VrpcChannel, offset: int, value: int) -> None:
    _U32.pack_into(ch.map, offset, value & 0xFFFF_FFFF)


def raw_submit(ch: VrpcChannel, *sqes: tuple[int, int, int]) -> None:
    """Publish SQEs (slot, len, flags) behind the client library's back, and kick."""
    tail, entries = word(ch, SQ_TAIL), word(ch, ENTRIES)
    for i, (slot, length, flags) in enumerate(sqes):
        at = abi.SQ_OFFSET + ((tail + i) & (entries - 1)) * abi.ENTRY_SIZE
        struct.pack_into("=IIII", ch.map, at, slot, length, flags, 0)
    poke(ch, SQ_TAIL, tail + len(sqes))
    os.eventfd_write(ch.kick_fd, 1)


def record_in_slot(ch: VrpcChannel, slot: int, record: bytes) -> int:
    ch.ring.slot(slot)[: len(record)] = record
    return len(record)


def closed_by_server(ch: VrpcChannel, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if word(ch, SERVER_FLAGS) & abi.SERVER_CLOSED:
            return True
        time.sleep(0.01)
    return False


def bystanders_work(srv: PrismProcess, other: VrpcChannel) -> None:
    root = srv.mount("/vm")
    with srv.nfs_client() as tcp:
        tcp.null()
        assert tcp.getattr(root).ok
    assert nfs_over(other).getattr(other.root_fh).ok


def getattr_record(ch: VrpcChannel) -> bytes:
    args = encode_args(Nfs3Proc.GETATTR, GetattrArgs(NfsFh3(ch.root_fh)))
    return ch.rpc(NFS_PROGRAM, NFS_V3, CRED).encode(Nfs3Proc.GETATTR, args)


def tail_far_ahead(ch: VrpcChannel) -> None:
    poke(ch, SQ_TAIL, word(ch, SQ_HEAD) + 2**31)
    os.eventfd_write(ch.kick_fd, 1)


ATTACKS: dict[str, Callable[[VrpcChannel], None]] = {
    "sq_tail far ahead": tail_far_ahead,
    "slot beyond the channel": lambda ch: raw_submit(ch, (ch.ring.nslots, 100, 0)),
    "length beyond a slot": lambda ch: raw_submit(ch, (0, abi.SLOT_SIZE + 1, 0)),
    "a slot twice in flight": lambda ch: raw_submit(
        ch, (0, record_in_slot(ch, 0, getattr_record(ch)), 0), (0, 60, 0)
    ),
    "unknown SQE flags": lambda ch: raw_submit(ch, (0, 60, 0x80)),
    "a record that is not a call": lambda ch: raw_submit(
        ch, (0, record_in_slot(ch, 0, os.urandom(200)), 0)
    ),
    "a REPLY instead of a call": lambda ch: raw_submit(
        ch, (0, record_in_slot(ch, 0, struct.pack(">IIIIIII", 7, 1, 0, 0, 0, 0, 0)), 0)
    ),
    "an empty record": lambda ch: raw_submit(ch, (0, 0, 0)),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_breaking_the_ring_closes_only_that_channel(any_srv: PrismProcess, attack: str) -> None:
    srv = any_srv
    with attach(srv) as bystander, attach(srv) as hostile:
        assert nfs_over(hostile).getattr(hostile.root_fh).ok
        ATTACKS[attack](hostile)
        assert closed_by_server(hostile), f"{attack}: the channel stayed open"
        with pytest.raises(ServerGone, match="protocol error"):
            nfs_over(hostile).getattr(hostile.root_fh)
        bystanders_work(srv, bystander)
        channel = hostile.attached.channel_id
    deadline = time.monotonic() + 5
    pattern = rf"vrpc channel {channel} \(vm vm, uid 0, pid \d+\): protocol error: "
    while not re.search(pattern, srv.stderr()):
        assert time.monotonic() < deadline, f"no log line for channel {channel}"
        time.sleep(0.05)


def test_mutated_calls_get_rpc_errors_or_close_their_channel(srv: PrismProcess) -> None:
    root = srv.mount("/vm")
    with srv.nfs_client() as tcp:
        sandbox = tcp.mkdir(root, "hostile-sandbox").obj
        assert sandbox is not None
        file = tcp.create(sandbox, "f").obj
        link = tcp.symlink(sandbox, "l", b"f").obj
        assert file is not None and link is not None
    corpus = nfs_corpus(sandbox, file, link) + mount_corpus()
    rng = random.Random(1234)
    replies, closed = 0, 0
    with attach(srv) as bystander:
        ch = attach(srv)
        try:
            for i in range(400):
                record = mutated(rng, corpus)
                if len(record) > abi.SLOT_SIZE:
                    continue
                try:
                    reply = ch.call(record, timeout=10)
                except ServerGone as exc:
                    assert "protocol error" in str(exc)
                    closed += 1
                    ch.close()
                    ch = attach(srv)
                    continue
                replies += 1
                decoded = decode_reply(reply)
                assert not (
                    isinstance(decoded, AcceptedReply) and decoded.stat == AcceptStat.SYSTEM_ERR
                ), f"record {i}: SYSTEM_ERR"
                if i % 50 == 0:
                    bystanders_work(srv, bystander)
        finally:
            ch.close()
        bystanders_work(srv, bystander)
    assert replies > 100 and closed > 5, (replies, closed)


def write_record(ch: VrpcChannel, fh: NfsFh3, data: bytes) -> bytes:
    args = WriteArgs(fh, 0, StableHow.FILE_SYNC, data)
    return ch.rpc(NFS_PROGRAM, NFS_V3, CRED).encode(
        Nfs3Proc.WRITE, encode_args(Nfs3Proc.WRITE, args)
    )


def test_a_slot_rewritten_during_a_1mib_write_hurts_only_its_writer(srv: PrismProcess) -> None:
    with attach(srv) as bystander, attach(srv) as hostile:
        vr = nfs_over(hostile)
        made = vr.create(hostile.root_fh, "scribbled")
        assert made.ok and made.obj is not None
        record = write_record(hostile, made.obj, os.urandom(MiB))
        stop = threading.Event()
        view = hostile.ring.slot(0)

        def scribble() -> None:
            noise = os.urandom(4096)
            while not stop.is_set():
                at = random.randrange(200, len(record) - 4096)
                view[at : at + 4096] = noise

        for _ in range(10):
            view[: len(record)] = record
            hostile.ring.submit(0, len(record))
            thread = threading.Thread(target=scribble)
            thread.start()
            try:
                length, _ = hostile.collect(0, time.monotonic() + 30)
            finally:
                stop.set()
                thread.join()
                stop.clear()
            assert length > 0
            bystanders_work(srv, bystander)
        view.release()
        assert vr.getattr(made.obj).ok  # the writer's channel still works: it broke no rule


def test_a_flooded_kick_fd_and_scribbled_words_hurt_no_one_else(srv: PrismProcess) -> None:
    with attach(srv) as bystander, attach(srv) as noisy:
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                os.eventfd_write(noisy.kick_fd, 1)

        threads = [threading.Thread(target=flood) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            started = time.monotonic()
            for _ in range(50):
                bystanders_work(srv, bystander)
            assert time.monotonic() - started < 30
            assert nfs_over(noisy).getattr(noisy.root_fh).ok
        finally:
            stop.set()
            for t in threads:
                t.join()
        # cleared SERVER_IDLE: the client skips its kick; the server's sweep still answers
        poke(noisy, SERVER_FLAGS, 0)
        started = time.monotonic()
        assert nfs_over(noisy).getattr(noisy.root_fh).ok
        assert time.monotonic() - started < 2
        # a scribbled cq_tail: the server never reads its own words back (R5)
        poke(noisy, CQ_TAIL, 12345)
        bystanders_work(srv, bystander)
        with attach(srv) as fresh:
            assert nfs_over(fresh).getattr(fresh.root_fh).ok


# -- lifecycle -------------------------------------------------------------------------------


def server_fds(srv: PrismProcess) -> int:
    """The server's descriptors a channel can hold: ring memfds, eventfds and sockets (the
    store's files come and go with its segments, so they are not counted)."""
    assert srv.proc is not None
    fds = Path(f"/proc/{srv.proc.pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        count += target.startswith(("/memfd:", "anon_inode:[eventfd]", "socket:"))
    return count


def channels_open(srv: PrismProcess) -> int:
    """What the server's `prism stats` figures say (written out once a second)."""
    import json

    shown = json.loads(srv.cli("stats", "--json").stdout)["vrpc"]
    assert shown is not None
    return int(shown["channels"])


def _busy_client(path: Path, n: int) -> None:
    """In a child: attach and keep a durable CREATE or a 1 MiB WRITE in flight, forever."""
    with VrpcChannel.attach(path, "vm") as ch:
        vr = nfs_over(ch)
        payload = os.urandom(MiB)
        made = vr.create(ch.root_fh, f"kill-{n}", mode=CreateMode.GUARDED)
        fh = made.obj if made.ok else vr.lookup(ch.root_fh, f"kill-{n}").object
        assert fh is not None
        i = 0
        while True:
            i += 1
            vr.create(ch.root_fh, f"kill-{n}-{i}", mode=CreateMode.GUARDED)
            vr.write(fh, 0, payload, StableHow.FILE_SYNC)


def test_clients_killed_mid_call_leave_nothing_behind(srv: PrismProcess) -> None:
    path = socket_of(srv.ready_line)
    with attach(srv) as ch:  # warm up: the first channel allocates what later ones reuse
        assert nfs_over(ch).getattr(ch.root_fh).ok
    time.sleep(0.3)
    baseline = server_fds(srv)
    rng = random.Random(7)
    for n in range(50):
        pid = os.fork()
        if pid == 0:
            try:
                _busy_client(path, n)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    deadline = time.monotonic() + 15
    while server_fds(srv) > baseline or channels_open(srv):
        assert time.monotonic() < deadline, (server_fds(srv), baseline, channels_open(srv))
        time.sleep(0.2)
    with srv.nfs_client() as tcp:
        root = srv.mount("/vm")
        made = [e for e in tcp.listdir(root) if e.name.startswith(b"kill-")]
        assert made
        for entry in made:  # every CREATE happened whole (or not at all): a file, named
            assert entry.name_attributes is not None and entry.name_handle is not None
            assert entry.name_attributes.type == NF3REG
            assert tcp.getattr(entry.name_handle).ok
    err = srv.stderr()
    assert "Traceback" not in err and " ERROR " not in err, err[-3000:]


def _create(ch: VrpcChannel, outcome: list[tuple[float, BaseException]]) -> None:
    """A durable CREATE over `ch`; how it ended (when, and what it raised) goes to `outcome`."""
    args = CreateArgs(DirOpArgs3(NfsFh3(ch.root_fh), b"asleep"), CreateMode.UNCHECKED, SATTR_EMPTY)
    try:
        ch.rpc(NFS_PROGRAM, NFS_V3, CRED).call(Nfs3Proc.CREATE, encode_args(Nfs3Proc.CREATE, args))
    except BaseException as exc:
        outcome.append((time.monotonic(), exc))


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_server_end_wakes_a_sleeping_client_within_a_second(tmp_path: Path, how: str) -> None:
    data = new_data_dir(tmp_path / "data")
    with PrismProcess(data, tmp_path / "logs") as server:
        ch = VrpcChannel.attach(socket_of(server.ready_line), "vm", timeout=60)
        lock = os.open(data / "meta", os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)  # the store's write lock: the CREATE waits for it
        outcome: list[tuple[float, BaseException]] = []
        sleeper = threading.Thread(target=_create, args=(ch, outcome))
        sleeper.start()
        time.sleep(0.5)
        assert not outcome, outcome  # asleep in its call
        assert server.proc is not None
        sent = time.monotonic()
        if how == "SIGTERM":
            server.proc.send_signal(signal.SIGTERM)
        else:
            server.kill()
        sleeper.join(5)
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        assert outcome, f"{how}: the client slept on"
        woke, exc = outcome[0]
        assert isinstance(exc, ServerGone), exc
        assert woke - sent < 1.0, f"{how}: woke after {woke - sent:.2f} s"
        assert ("stopping" if how == "SIGTERM" else "stopped or died") in str(exc)
        ch.close()
        if how == "SIGTERM":
            server.stop()  # exits 0 with "stopped cleanly" once the CREATE got its lock
        server.start()  # (after kill -9: over the dead server's socket file)
        with VrpcChannel.attach(socket_of(server.ready_line), "vm") as again:
            assert nfs_over(again).getattr(again.root_fh).ok
