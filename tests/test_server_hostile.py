"""A live `prism serve` under a storm of random and mutated RPC records, over TCP and UDP.

The corpus is one valid call of every NFS procedure (and the MOUNT procedures) on a sandbox
directory. Each record sent is a mutation of one of them (truncated, bytes flipped, a length
word made huge, bytes inserted or dropped, header fields scrambled, spliced with another) or
pure noise or, now and then, the valid call itself. On TCP some batches also carry stream
damage: an oversized record header, a record split into many fragments, zero-length
fragments, a record cut off by the end of the stream.

What must hold: the server answers every decodable call with a reply that is never
SYSTEM_ERR (a handler crashed) and it keeps answering probes during the storm; afterwards
NULL, GETATTR, MNT and READ work over both transports, a file outside the sandbox (whose
handle no record carries, and which handles sealed with the store's key cannot reach) is
unchanged, the server stops cleanly, and `prism fsck` finds the store clean.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prism.nfs.client import auth_sys
from prism.nfs.const import (
    ACCESS3_ALL,
    MOUNT_PROGRAM,
    MOUNT_V3,
    NFS_PROGRAM,
    NFS_V3,
    CreateMode,
    Mount3Proc,
    Nfs3Proc,
    StableHow,
)
from prism.nfs.wire import (
    VOID,
    AccessArgs,
    CommitArgs,
    CreateArgs,
    DirOpArgs3,
    DirPath,
    FsinfoArgs,
    FsstatArgs,
    GetattrArgs,
    LinkArgs,
    LookupArgs,
    MkdirArgs,
    MknodArgs,
    NfsFh3,
    PathconfArgs,
    ReadArgs,
    ReaddirArgs,
    ReaddirplusArgs,
    ReadlinkArgs,
    RemoveArgs,
    RenameArgs,
    RmdirArgs,
    Sattr3,
    SetattrArgs,
    SymlinkArgs,
    WriteArgs,
    encode_args,
    encode_mount_args,
)
from prism.store.types import FileType
from rpc.message import AcceptedReply, AcceptStat, decode_reply, encode_call
from rpc.record import LAST_FRAGMENT, RecordReader, frame
from tests.server_helpers import HOST, PrismProcess, prism_cli

STORM_SECONDS = 14.0
TCP_WORKERS = 4
BATCH = 40
PROBE_EVERY = 1.5
PROBE_TIMEOUT = 10.0
MAX_RSS_GROWTH = 400 * 1024 * 1024

_WORD = struct.Struct(">I")
HUGE = (0xFFFF_FFFF, 0x7FFF_FFFF, 0x8000_0000, 0x0010_0001, 0xFFFF_FFF0, 65536, 1 << 24)


# -- the corpus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    prog: int
    vers: int
    proc: int
    args: bytes


def nfs_corpus(sandbox: NfsFh3, file: NfsFh3, link: NfsFh3) -> list[Call]:
    def d(name: str) -> DirOpArgs3:
        return DirOpArgs3(sandbox, name.encode())

    P = Nfs3Proc
    args = {
        P.NULL: VOID,
        P.GETATTR: GetattrArgs(file),
        P.SETATTR: SetattrArgs(file, Sattr3(mode=0o644, size=300)),
        P.LOOKUP: LookupArgs(d("file")),
        P.ACCESS: AccessArgs(file, ACCESS3_ALL),
        P.READLINK: ReadlinkArgs(link),
        P.READ: ReadArgs(file, 0, 4096),
        P.WRITE: WriteArgs(file, 100, StableHow.UNSTABLE, os.urandom(200)),
        P.CREATE: CreateArgs(d("c1"), CreateMode.UNCHECKED, Sattr3(mode=0o600)),
        P.MKDIR: MkdirArgs(d("d1"), Sattr3(mode=0o700)),
        P.SYMLINK: SymlinkArgs(d("s1"), Sattr3(), b"../target"),
        P.MKNOD: MknodArgs(d("n1"), FileType.FIFO, Sattr3(mode=0o600)),
        P.REMOVE: RemoveArgs(d("c1")),
        P.RMDIR: RmdirArgs(d("d1")),
        P.RENAME: RenameArgs(d("c1"), d("c2")),
        P.LINK: LinkArgs(file, d("l1")),
        P.READDIR: ReaddirArgs(sandbox, 0, bytes(8), 4096),
        P.READDIRPLUS: ReaddirplusArgs(sandbox, 0, bytes(8), 4096, 16384),
        P.FSSTAT: FsstatArgs(sandbox),
        P.FSINFO: FsinfoArgs(sandbox),
        P.PATHCONF: PathconfArgs(file),
        P.COMMIT: CommitArgs(file, 0, 0),
    }
    calls = [Call(NFS_PROGRAM, NFS_V3, p, encode_args(p, a)) for p, a in args.items()]
    calls.append(
        Call(
            NFS_PROGRAM,
            NFS_V3,
            P.CREATE,
            encode_args(P.CREATE, CreateArgs(d("x1"), CreateMode.EXCLUSIVE, verf=b"8bytes!!")),
        )
    )
    calls.append(
        Call(
            NFS_PROGRAM,
            NFS_V3,
            P.WRITE,
            encode_args(P.WRITE, WriteArgs(file, 0, StableHow.FILE_SYNC, os.urandom(3000))),
        )
    )
    return calls


def mount_corpus() -> list[Call]:
    M = Mount3Proc
    args = {
        M.NULL: VOID,
        M.MNT: DirPath(b"/vm/sandbox"),
        M.DUMP: VOID,
        M.UMNT: DirPath(b"/vm/sandbox"),
        M.UMNTALL: VOID,
        M.EXPORT: VOID,
    }
    return [Call(MOUNT_PROGRAM, MOUNT_V3, p, encode_mount_args(p, a)) for p, a in args.items()]


# -- mutations -------------------------------------------------------------------------------

CRED = auth_sys(uid=0, gid=0, gids=[1, 2, 3]).to_opaque()


def encode(rng: random.Random, call: Call) -> bytes:
    return encode_call(rng.getrandbits(32), call.prog, call.vers, call.proc, call.args, CRED)


def _truncate(rng: random.Random, rec: bytes, corpus: list[Call]) -> bytes:
    return rec[: rng.randrange(len(rec))]


def _flip(rng: random.Random, rec: bytes, corpus: list[Call]) -> bytes:
    out = bytearray(rec)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    return bytes(out)


def _huge_length(rng: random.Random, rec: bytes, corpus: list[Call]) -> bytes:
    out = bytearray(rec)
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(0, max(1, len(out) - 3), 4)
        out[i : i + 4] = _WORD.pack(rng.choice(HUGE))
    return bytes(out)


def _insert_delete(rng: random.Random, rec: bytes, corpus: list[Call]) -> bytes:
    i = rng.randrange(len(rec))
    if rng.random() < 0.5:
        return rec[:i] + os.urandom(rng.choice((1, 3, 4, 8, 100))) + rec[i:]
    return rec[:i] + rec[i + rng.choice((1, 4, 8, 32)) :]


def _header(rng: random.Random, rec: bytes, corpus: list[Call]) -> bytes:
    # xid, msg type, rpc version, prog, vers, proc, cred flavor, cred length.
    out = bytearray(rec)
    field_ = rng.randrange(8)
    value = rng.choice((0, 1, 2, 3, 4, 22, 100000, 100003, 100005, rng.getrandbits(32)))
    out[field_ * 4 : field_ * 4 + 4] = _WORD.pack(value)
    return bytes(out)


def _splice(rng: random.Random, rec: bytes, corpus: list[Call]) -> bytes:
    other = encode(rng, rng.choice(corpus))
    return rec[: rng.randrange(len(rec))] + other[rng.randrange(len(other)) :]


def _noise(rng: random.Random, rec: bytes, corpus: list[Call]) -> bytes:
    return os.urandom(rng.choice((0, 1, 4, 24, 40, 100, 1000, 9000)))


def _valid(rng: random.Random, rec: bytes, corpus: list[Call]) -> bytes:
    return rec


MUTATIONS: list[tuple[Callable[[random.Random, bytes, list[Call]], bytes], int]] = [
    (_truncate, 3),
    (_flip, 5),
    (_huge_length, 4),
    (_insert_delete, 2),
    (_header, 3),
    (_splice, 2),
    (_noise, 1),
    (_valid, 1),
]
_MUTATORS = [m for m, _ in MUTATIONS]
_WEIGHTS = [w for _, w in MUTATIONS]


def mutated(rng: random.Random, corpus: list[Call]) -> bytes:
    rec = encode(rng, rng.choice(corpus))
    mutate = rng.choices(_MUTATORS, _WEIGHTS)[0]
    return mutate(rng, rec, corpus)


def stream_damage(rng: random.Random, corpus: list[Call]) -> bytes:
    """Bytes to end a TCP batch with (framing included)."""
    kind = rng.randrange(5)
    rec = encode(rng, rng.choice(corpus))
    if kind == 0:  # a record header far beyond the record limit
        return _WORD.pack(LAST_FRAGMENT | rng.choice((0x7FFF_FFFF, 0x1000_0000, 2 << 20)))
    if kind == 1:  # many small non-last fragments adding up past the limit
        return _WORD.pack(0x0008_0000) + bytes(0x0008_0000) + _WORD.pack(0x0010_0000)
    if kind == 2:  # a valid record in many fragments, with empty ones in between
        out = bytearray()
        pos = 0
        while pos < len(rec):
            n = rng.randint(1, 7)
            out += _WORD.pack(0) + _WORD.pack(len(rec[pos : pos + n])) + rec[pos : pos + n]
            pos += n
        return bytes(out) + _WORD.pack(LAST_FRAGMENT)
    if kind == 3:  # a record cut off by the end of the stream
        return frame(rec)[: rng.randrange(1, len(rec) + 4)]
    return _WORD.pack(LAST_FRAGMENT | 1000) + os.urandom(10)  # header promising more


# -- the storm -------------------------------------------------------------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    system_errors: list[bytes] = field(default_factory=list)
    probe_failures: list[str] = field(default_factory=list)

    def reply(self, data: bytes, sent: dict[int, bytes]) -> None:
        try:
            reply = decode_reply(data)
        except Exception:
            with self.lock:
                self.replies["undecodable-reply"] += 1
            return
        name = type(reply).__name__
        if isinstance(reply, AcceptedReply):
            name = reply.stat.name
            if reply.stat == AcceptStat.SYSTEM_ERR:
                with self.lock:
                    self.system_errors.append(sent.get(reply.xid, b"?"))
        with self.lock:
            self.replies[name] += 1


def _xid(rec: bytes) -> int | None:
    return _WORD.unpack_from(rec)[0] if len(rec) >= 4 else None


def _drain(sock: socket.socket, into: bytearray) -> None:
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 20):
            into.extend(chunk)


def tcp_worker(port: int, corpus: list[Call], seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        records = [mutated(rng, corpus) for _ in range(BATCH)]
        sent = {x: r for r in records if (x := _xid(r)) is not None}
        blob = b"".join(frame(r) for r in records)
        if rng.random() < 0.3:
            blob += stream_damage(rng, corpus)
        received = bytearray()
        with socket.create_connection((HOST, port), timeout=10) as sock:
            reader = threading.Thread(target=_drain, args=(sock, received), daemon=True)
            reader.start()
            with contextlib.suppress(OSError):
                sock.sendall(blob)
                sock.shutdown(socket.SHUT_WR)
            reader.join(15)
            assert not reader.is_alive(), "the server neither answered nor closed in 15 s"
        with tally.lock:
            tally.sent["tcp"] += len(records)
        with contextlib.suppress(Exception):
            for rec in RecordReader(64 << 20).feed(bytes(received)):
                tally.reply(rec, sent)


def udp_worker(port: int, corpus: list[Call], seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    sent: dict[int, bytes] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((HOST, port))
        sock.setblocking(False)
        while time.monotonic() < until:
            for _ in range(20):
                rec = mutated(rng, corpus)[:65507]
                if (x := _xid(rec)) is not None:
                    sent[x] = rec
                with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                    sock.send(rec)
                    with tally.lock:
                        tally.sent["udp"] += 1
            time.sleep(0.01)  # ~2,000 datagrams/s: more is only dropped by the server
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                while True:
                    tally.reply(sock.recv(65536), sent)
        sock.setblocking(True)
        sock.settimeout(1.0)
        with contextlib.suppress(OSError):
            while True:
                tally.reply(sock.recv(65536), sent)


def probe(server: PrismProcess, root: NfsFh3, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        try:
            with server.nfs_client("tcp", timeout=PROBE_TIMEOUT) as nfs:
                nfs.null()
                assert nfs.getattr(root).ok
        except Exception as exc:
            tally.probe_failures.append(f"{time.monotonic():.1f}: {exc!r}")
        time.sleep(PROBE_EVERY)


def first_traceback(log: str) -> str:
    """The first logged traceback (with the line before it): what the server choked on."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
    end = next(
        (i for i in range(start + 1, len(lines)) if not lines[i].startswith((" ", "Traceback"))),
        len(lines) - 1,
    )
    return "the server logged a traceback:\n" + "\n".join(lines[max(0, start - 1) : end + 1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_hostile_records_do_not_hurt_the_server(prism_server: PrismProcess) -> None:
    server = prism_server
    root = server.mount("/vm")
    with server.nfs_client("tcp") as nfs:
        canary_dir = nfs.mkdir(root, "canary").obj
        canary = nfs.create(canary_dir, "keep").obj
        canary_data = os.urandom(50_000)
        nfs.write_all(canary, canary_data)
        sandbox = nfs.mkdir(root, "sandbox").obj
        file = nfs.create(sandbox, "file").obj
        nfs.write_all(file, os.urandom(5000))
        link = nfs.symlink(sandbox, "link", b"file").obj
        assert canary_dir and canary and sandbox and file and link
    nfs_calls = nfs_corpus(sandbox, file, link)
    mount_calls = mount_corpus()
    assert server.proc is not None
    rss_before = rss_bytes(server.proc.pid)

    tally = Tally()
    until = time.monotonic() + STORM_SECONDS
    jobs: list[tuple[Callable[..., None], tuple[object, ...]]] = [
        (tcp_worker, (server.nfs_port, nfs_calls, 1000 + i, until, tally))
        for i in range(TCP_WORKERS - 1)
    ]
    jobs += [
        (tcp_worker, (server.mount_port, mount_calls, 7, until, tally)),
        (udp_worker, (server.nfs_port, nfs_calls, 11, until, tally)),
        (udp_worker, (server.mount_port, mount_calls, 13, until, tally)),
        (probe, (server, root, until, tally)),
    ]
    failures: list[BaseException] = []

    def guarded(target: Callable[..., None], args: tuple[object, ...]) -> None:
        try:
            target(*args)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(STORM_SECONDS + 60)
        assert not t.is_alive(), "a storm thread hung"

    summary = f"sent {dict(tally.sent)}, replies {dict(tally.replies)}"
    assert not failures, f"{failures[0]!r}; {summary}"
    assert server.running, f"the server died: {server.stderr()[-3000:]}"
    assert sum(tally.sent.values()) >= 3000, summary
    assert tally.sent["udp"] >= 500, summary
    assert tally.replies["SUCCESS"] >= 100, summary
    assert tally.replies["GARBAGE_ARGS"] >= 100, summary
    assert not tally.system_errors, (
        f"{len(tally.system_errors)} SYSTEM_ERR replies, first for record "
        f"{tally.system_errors[0].hex()}; {summary}\n{server.stderr()[-3000:]}"
    )
    assert not tally.probe_failures, f"probes failed during the storm: {tally.probe_failures}"
    assert rss_bytes(server.proc.pid) - rss_before < MAX_RSS_GROWTH

    # Afterwards: everything answers normally, over both transports.
    for transport in ("tcp", "udp"):
        assert server.mount("/vm", transport) == root
        with server.nfs_client(transport) as nfs:
            nfs.null()
            attrs = nfs.getattr(root)
            assert attrs.ok and attrs.obj_attributes.type == FileType.DIR
            assert nfs.read_all(canary, chunk=16384) == canary_data
            assert nfs.lookup(sandbox, "file").ok
    assert "Traceback" not in server.stderr(), first_traceback(server.stderr())

    server.stop()
    fsck = prism_cli(server.data, "fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "fsck: clean" in fsck.stdout, fsck.stdout
