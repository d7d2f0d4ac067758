"""VRPC against TCP on one `prism serve`: latency, throughput and server CPU per operation.

    python3 benchmarks/vrpc_bench.py            # about 6 minutes on a loaded 2-CPU machine
    python3 benchmarks/vrpc_bench.py --quick    # a smoke run (few ops, one repetition)

Theory of operation: one server (fresh data directory under /var/tmp, VM "bench", TCP ports
chosen free, the VRPC control socket at DATA/vrpc.sock) serves every row. Each row is measured
for every transport in the same repetition, the order alternating between repetitions
(interleaved); a row's figure is the median of `--repeat` (3) repetitions, and ratios are
taken between those medians. Server CPU per operation is the server process's user+system
time (/proc/PID/stat) over the measurement, divided by its operations (10 ms ticks: short
rows are coarse).

Transports: `tcp` (one TCP connection from a privileged port), `vrpc` (one channel attached
with ATTACH_NO_FASTPATH: every call takes the generic Python server path, as TCP does) and
`vrpc-fast` (one channel as clients get it by default: GETATTR hits of the VM's attribute
table and NULL answered in C, the rest in Python). `table` is a `stat` answered from the
shared attribute table with no RPC at all (`VrpcChannel.stat_from_table`).

Clients measure the transports, not a client library, and are equally lean on both: a call
record is encoded before timing (only the xid is patched per call, so the server's duplicate
request cache never answers instead of the handlers); TCP sends it with one `sendall` of the
record mark and record and reads the reply with `recv_into` a preallocated buffer; VRPC copies
it into a slot and submits, sleeps and reaps in one C call (`VrpcChannel.call`); either way the
reply is copied out once and checked by its accept and NFS status words only, not decoded.
One row goes through `prism.client` (GETATTR by handle, decoded) to show what a library user
sees. libnfs over TCP (`nfsclient.py`, C) is context.

Rows: GETATTR latency (1 client) over tcp, vrpc and vrpc-fast, and the table `stat`; READ and
WRITE 4 KiB ops/s; READ and WRITE 1 MiB MiB/s; 1, 2, 4, 8 client processes of GETATTR (tcp,
vrpc, vrpc-fast) and of 4 KiB READ (tcp, vrpc), aggregate ops/s.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from prism.nfs import wire as T  # noqa: E402
from prism.nfs.client import MountClient, NfsClient, auth_sys  # noqa: E402
from prism.nfs.const import NFS_PROGRAM, NFS_V3, Nfs3Proc, StableHow  # noqa: E402
from rpc.client import RpcClient, raise_for_reply  # noqa: E402
from rpc.message import decode_reply, encode_call  # noqa: E402
from tests.server_helpers import PrismProcess  # noqa: E402
from vrpc.client import VrpcChannel  # noqa: E402
from vrpc.control import ATTACH_NO_FASTPATH  # noqa: E402

HOST = "127.0.0.1"
VM = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FILE_SIZE = 64 << 20
"""The file the READ rows read and the 4 KiB WRITE row overwrites."""
KIB4 = 4096
MIB = 1 << 20
_OK_WORDS = struct.Struct(">I")
_ACCEPT_AT = 20  # xid, REPLY, MSG_ACCEPTED, verifier AUTH_NONE + length 0, then accept_stat
CRED = auth_sys(0, 0).to_opaque()
TRANSPORTS = ("tcp", "vrpc")
"""Compared in the READ and WRITE rows (the C fast path answers neither)."""
GETATTR_TRANSPORTS = ("tcp", "vrpc", "vrpc-fast")
_MARK = struct.Struct(">I")
ROOT = os.geteuid() == 0
"""As root, TCP clients call from a privileged port, as the VM (secure by default) asks."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -- the server ----------------------------------------------------------------------------


class Server:
    """`prism serve` on a fresh data directory, through the one launcher the tests use
    (`tests.server_helpers.PrismProcess`), with VM `VM` created."""

    def __init__(self, root: Path) -> None:
        self.process = PrismProcess(root / "data", root / "logs")
        self.process.cli("vm", "create", VM)
        self.ready_line = self.process.start().strip()
        self.proc = self.process.proc
        assert self.proc is not None
        self.nfs_port, self.mount_port = self.process.nfs_port, self.process.mount_port
        self.vrpc = str(self.process.vrpc_socket())

    def stop(self) -> None:
        self.process.stop(check=False)


# -- raw clients: pre-encoded records, status words checked ---------------------------------


class Raw:
    """One connection (TCP) or channel (VRPC) carrying pre-encoded NFS call records."""

    def __init__(self, transport: str, server: dict[str, Any]) -> None:
        self.transport = transport
        self.xid = random.getrandbits(32)
        self.ch: VrpcChannel | None = None
        if transport == "tcp":
            self.tcp = RpcClient(
                HOST, server["nfs_port"], NFS_PROGRAM, NFS_V3, cred=CRED, reserved_port=ROOT
            )
            self.sock = self.tcp.sock
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = bytearray(2 * MIB + 4096)
            self.view = memoryview(self.buf)
            self.exchange: Callable[[bytearray], bytes] = self._tcp
        else:
            flags = ATTACH_NO_FASTPATH if transport == "vrpc" else 0
            self.ch = VrpcChannel.attach(server["vrpc"], VM, timeout=30, flags=flags, meta=True)
            self.exchange = self.ch.call

    def _tcp(self, record: bytearray) -> bytes:
        """One exchange over the connection: the record mark and record in one send, the
        reply read into the preallocated buffer (the server replies in one fragment)."""
        self.sock.sendall(_MARK.pack(0x8000_0000 | len(record)) + record)
        view, got, need = self.view, 0, 4
        while got < need:
            n = self.sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("the server closed the connection")
            got += n
            if need == 4 and got >= 4:
                mark = _MARK.unpack_from(self.buf)[0]
                if not mark & 0x8000_0000:
                    raise RuntimeError("a reply in several fragments: not expected here")
                need = 4 + (mark & 0x7FFF_FFFF)
        return bytes(view[4:need])

    def record(self, proc: int, args: bytes) -> bytearray:
        record = bytearray(encode_call(0, NFS_PROGRAM, NFS_V3, proc, args, CRED))
        first = self.call(record, full=True)
        assert first, "the first call failed"
        return record

    def call(self, record: bytearray, *, full: bool = False) -> bytes:
        self.xid = (self.xid + 1) & 0xFFFF_FFFF
        _OK_WORDS.pack_into(record, 0, self.xid)
        reply = self.exchange(record)
        if full:
            raise_for_reply(decode_reply(reply))  # an RPC-level failure raises its error
        if reply[8:12] != b"\0\0\0\0" or reply[_ACCEPT_AT : _ACCEPT_AT + 8] != bytes(8):
            raise RuntimeError(f"{self.transport}: call failed: {reply[:32].hex()}")
        return reply

    def close(self) -> None:
        if self.ch is None:
            self.tcp.close()
        else:
            self.ch.close()


def getattr_args(fh: bytes) -> bytes:
    return T.encode_args(Nfs3Proc.GETATTR, T.GetattrArgs(T.NfsFh3(fh)))


def read_args(fh: bytes, offset: int, count: int) -> bytes:
    return T.encode_args(Nfs3Proc.READ, T.ReadArgs(T.NfsFh3(fh), offset, count))


def write_args(fh: bytes, offset: int, data: bytes) -> bytes:
    args = T.WriteArgs(T.NfsFh3(fh), offset, StableHow.UNSTABLE, data)
    return T.encode_args(Nfs3Proc.WRITE, args)


# -- the measurements (each returns (operations, seconds)) ----------------------------------


def m_getattr(raw: Raw, fh: bytes, ops: int) -> tuple[int, float]:
    record = raw.record(Nfs3Proc.GETATTR, getattr_args(fh))
    start = time.perf_counter()
    for _ in range(ops):
        raw.call(record)
    return ops, time.perf_counter() - start


def m_table(raw: Raw, fh: bytes, ops: int) -> tuple[int, float]:
    """`stat` from the shared attribute table: no RPC (the GETATTR rows published it)."""
    assert raw.ch is not None
    stat = raw.ch.stat_from_table
    if stat(fh) is None:
        raise RuntimeError("table miss: the GETATTR rows should have published the file")
    start = time.perf_counter()
    for _ in range(ops):
        if stat(fh) is None:
            raise RuntimeError("table miss during the row")
    return ops, time.perf_counter() - start


def m_read(raw: Raw, fh: bytes, ops: int, size: int, seed: int) -> tuple[int, float]:
    rng = random.Random(seed)
    slots = FILE_SIZE // size
    records = [raw.record(Nfs3Proc.READ, read_args(fh, rng.randrange(slots) * size, size))]
    records += [
        bytearray(encode_call(0, NFS_PROGRAM, NFS_V3, Nfs3Proc.READ, a, CRED))
        for a in (read_args(fh, rng.randrange(slots) * size, size) for _ in range(ops - 1))
    ]
    start = time.perf_counter()
    for record in records:
        reply = raw.call(record)
        if len(reply) < size:
            raise RuntimeError(f"short READ reply: {len(reply)} bytes")
    return ops, time.perf_counter() - start


def m_write(raw: Raw, fh: bytes, ops: int, size: int, seed: int) -> tuple[int, float]:
    rng = random.Random(seed)
    slots = FILE_SIZE // size
    records = [
        bytearray(
            encode_call(
                0,
                NFS_PROGRAM,
                NFS_V3,
                Nfs3Proc.WRITE,
                write_args(fh, rng.randrange(slots) * size, rng.randbytes(size)),
                CRED,
            )
        )
        for _ in range(ops)
    ]
    start = time.perf_counter()
    for record in records:
        raw.call(record)
    return ops, time.perf_counter() - start


def m_client_getattr(
    transport: str, server: dict[str, Any], fh: bytes, ops: int
) -> tuple[int, float]:
    from prism.client import connect

    url = f"nfs://{HOST}:{server['nfs_port']}/{VM}?mountport={server['mount_port']}"
    with connect(url, uid=0, gid=0, transport=transport, vrpc_socket=server["vrpc"]) as c:
        handle = T.NfsFh3(fh)
        assert c.nfs.getattr(handle).ok
        start = time.perf_counter()
        for _ in range(ops):
            c.nfs.getattr(handle)
        return ops, time.perf_counter() - start


def _worker(
    transport: str,
    server: dict[str, Any],
    fh: bytes,
    what: str,
    until: float,
    seed: int,
    barrier: Any,
    out: Any,
) -> None:
    raw = Raw(transport, server)
    rng = random.Random(seed)
    if what == "getattr":
        records = [raw.record(Nfs3Proc.GETATTR, getattr_args(fh))]
    else:
        slots = FILE_SIZE // KIB4
        records = [
            raw.record(Nfs3Proc.READ, read_args(fh, rng.randrange(slots) * KIB4, KIB4))
            for _ in range(64)
        ]
    barrier.wait()
    deadline = time.monotonic() + until
    done = 0
    while time.monotonic() < deadline:
        for record in records:
            raw.call(record)
        done += len(records)
    raw.close()
    out.put(done)


def m_parallel(
    transport: str, server: dict[str, Any], fh: bytes, what: str, clients: int, seconds: float
) -> tuple[int, float]:
    """`clients` forked processes, each with its own connection or channel, start together
    and call for `seconds`: (all their calls, the wall time until the last one finished)."""
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(transport, server, fh, what, seconds, i, barrier, out))
        for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    barrier.wait(120)
    start = time.perf_counter()
    counts = [out.get(timeout=seconds + 120) for _ in procs]
    elapsed = time.perf_counter() - start
    for proc in procs:
        proc.join(30)
    return sum(counts), elapsed


def m_libnfs(kind: str, server: dict[str, Any], ops: int, seed: int) -> tuple[int, float]:
    from nfsclient import NfsClient as LibNfs

    rng = random.Random(seed)
    with LibNfs(HOST, f"/{VM}", nfs_port=server["nfs_port"], mount_port=server["mount_port"]) as n:
        f = n.open("/file", os.O_RDWR)
        try:
            start = time.perf_counter()
            if kind == "getattr":
                for _ in range(ops):
                    f.fstat()
            elif kind in ("read4k", "read1m"):
                size = KIB4 if kind == "read4k" else MIB
                buf = bytearray(size)
                for _ in range(ops):
                    f.pread_into(buf, rng.randrange(FILE_SIZE // size) * size)
            else:
                size = KIB4 if kind == "write4k" else MIB
                data = [rng.randbytes(size) for _ in range(ops)]
                start = time.perf_counter()
                for chunk in data:
                    f.pwrite(chunk, rng.randrange(FILE_SIZE // size) * size)
            return ops, time.perf_counter() - start
        finally:
            f.close()


# -- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="few operations, one repetition")
    ap.add_argument("--no-libnfs", action="store_true", help="skip the libnfs context rows")
    args = ap.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    scale = 0.1 if args.quick else 1.0
    n_getattr, n_4k, n_1m = int(3000 * scale), int(2000 * scale), max(4, int(32 * scale))
    par_seconds = 0.5 if args.quick else 1.5
    clients_list = (1, 2, 4, 8)

    root = Path(tempfile.mkdtemp(prefix="prism-vrpc-bench-", dir="/var/tmp"))
    srv = Server(root)
    pid = srv.proc.pid
    info = {"nfs_port": srv.nfs_port, "mount_port": srv.mount_port, "vrpc": srv.vrpc}
    print(srv.ready_line, file=sys.stderr)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        with MountClient(HOST, srv.mount_port, "tcp", cred=auth_sys(0, 0)) as m:
            root_fh, _ = m.mnt(f"/{VM}")
        with NfsClient(HOST, srv.nfs_port, "tcp", cred=auth_sys(0, 0)) as nfs:
            made = nfs.create(root_fh, "file", T.Sattr3(mode=0o644))
            fh = made.obj.data
            rng = random.Random(1)
            for off in range(0, FILE_SIZE, MIB):
                assert nfs.write(made.obj, off, rng.randbytes(MIB), StableHow.UNSTABLE).ok
            assert nfs.commit(made.obj).ok
        raws = {t: Raw(t, info) for t in GETATTR_TRANSPORTS}

        def measure(row: str, who: str, fn: Callable[[], tuple[int, float]]) -> None:
            cpu0 = server_cpu(pid)
            ops, secs = fn()
            cpu = server_cpu(pid) - cpu0
            results.setdefault((row, who), []).append((ops / secs, cpu / ops * 1e6))
            print(
                f"  {row:28s} {who:12s} {ops / secs:10.1f}/s  cpu {cpu / ops * 1e6:7.1f} us/op",
                file=sys.stderr,
            )

        for rep in range(repeat):
            print(f"repetition {rep + 1}/{repeat}", file=sys.stderr)
            order = TRANSPORTS if rep % 2 == 0 else TRANSPORTS[::-1]
            g_order = GETATTR_TRANSPORTS if rep % 2 == 0 else GETATTR_TRANSPORTS[::-1]
            seed = 1000 * rep
            for t in g_order:
                measure("getattr", t, lambda t=t: m_getattr(raws[t], fh, n_getattr))
            measure("table", "vrpc-fast", lambda: m_table(raws["vrpc-fast"], fh, n_getattr * 10))
            for t in order:
                measure(
                    "client-getattr", t, lambda t=t: m_client_getattr(t, info, fh, n_getattr // 2)
                )
            for t in order:
                measure("read4k", t, lambda t=t, s=seed: m_read(raws[t], fh, n_4k, KIB4, s))
            for t in order:
                measure("write4k", t, lambda t=t, s=seed + 1: m_write(raws[t], fh, n_4k, KIB4, s))
            for t in order:
                measure("read1m", t, lambda t=t, s=seed + 2: m_read(raws[t], fh, n_1m, MIB, s))
            for t in order:
                measure("write1m", t, lambda t=t, s=seed + 3: m_write(raws[t], fh, n_1m, MIB, s))
            if not args.no_libnfs:
                for kind, n in (
                    ("getattr", n_getattr),
                    ("read4k", n_4k),
                    ("write4k", n_4k),
                    ("read1m", n_1m),
                    ("write1m", n_1m),
                ):
                    measure(kind, "libnfs", lambda k=kind, n=n, s=seed + 4: m_libnfs(k, info, n, s))
            for what, whos in (("getattr", g_order), ("read4k", order)):
                for clients in clients_list:
                    for t in whos:
                        measure(
                            f"par-{what}-{clients}",
                            t,
                            lambda t=t, w=what, c=clients: m_parallel(
                                t, info, fh, "getattr" if w == "getattr" else "read", c, par_seconds
                            ),
                        )
        for raw in raws.values():
            raw.close()
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)

    med = {
        key: (statistics.median(r for r, _ in vals), statistics.median(c for _, c in vals))
        for key, vals in results.items()
    }
    print(table(med, clients_list, n_getattr, n_4k, n_1m, repeat, par_seconds))
    return 0


def table(
    med: dict[tuple[str, str], tuple[float, float]],
    clients_list: tuple[int, ...],
    n_getattr: int,
    n_4k: int,
    n_1m: int,
    repeat: int,
    par_seconds: float,
) -> str:
    def rate(row: str, who: str) -> float | None:
        return med[(row, who)][0] if (row, who) in med else None

    def cpu(row: str, who: str) -> str:
        return f"{med[(row, who)][1]:.0f}" if (row, who) in med else "-"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    lines = [
        f"Medians of {repeat}; server CPU in µs per operation (user+sys).",
        "",
        "| row | TCP | VRPC (Python path) | VRPC fast path | goal row: ratio "
        "| libnfs (TCP) | server CPU µs/op tcp / vrpc / fast |",
        "|---|---|---|---|---|---|---|",
    ]

    def lat(row: str, who: str) -> str:
        r = rate(row, who)
        return f"{1e6 / r:.1f} µs" if r else "-"

    tcp, vrpc, fast = (rate("getattr", w) for w in GETATTR_TRANSPORTS)
    lines.append(
        f"| GETATTR latency, 1 client ({n_getattr} ops) | {lat('getattr', 'tcp')} "
        f"| {lat('getattr', 'vrpc')} | {lat('getattr', 'vrpc-fast')} "
        f"| TCP/fast {ratio(fast, tcp)} (goal 3x); TCP/Python path {ratio(vrpc, tcp)} "
        f"| {lat('getattr', 'libnfs')} "
        f"| {cpu('getattr', 'tcp')} / {cpu('getattr', 'vrpc')} / {cpu('getattr', 'vrpc-fast')} |"
    )
    table_rate = rate("table", "vrpc-fast")
    lines.append(
        f"| `stat` from the shared table ({n_getattr * 10} lookups) | {lat('getattr', 'tcp')} "
        f"| - | {lat('table', 'vrpc-fast')} (no RPC) "
        f"| TCP GETATTR/table {ratio(table_rate, tcp)} (goal 10x) | - | - |"
    )
    tcp, vrpc = rate("client-getattr", "tcp"), rate("client-getattr", "vrpc")
    lines.append(
        f"| GETATTR latency through prism.client ({n_getattr // 2} ops, decoded; default "
        f"channel) | {lat('client-getattr', 'tcp')} | - | {lat('client-getattr', 'vrpc')} "
        f"| TCP/VRPC {ratio(vrpc, tcp)} | - "
        f"| {cpu('client-getattr', 'tcp')} / - / {cpu('client-getattr', 'vrpc')} |"
    )
    for row, title, unit, goal in (
        ("read4k", f"READ 4 KiB, random ({n_4k} ops)", "ops/s", "1.3x"),
        ("write4k", f"WRITE 4 KiB UNSTABLE, random ({n_4k} ops)", "ops/s", "1.3x"),
        ("read1m", f"READ 1 MiB ({n_1m} MiB)", "MiB/s", "1.0x"),
        ("write1m", f"WRITE 1 MiB UNSTABLE ({n_1m} MiB)", "MiB/s", "1.0x"),
    ):
        tcp, vrpc, lib = rate(row, "tcp"), rate(row, "vrpc"), rate(row, "libnfs")
        fmt = lambda v, unit=unit: f"{v:.0f} {unit}" if v else "-"  # noqa: E731
        lines.append(
            f"| {title} | {fmt(tcp)} | {fmt(vrpc)} | (Python path) "
            f"| VRPC/TCP {ratio(vrpc, tcp)} (goal {goal}) | {fmt(lib)} "
            f"| {cpu(row, 'tcp')} / {cpu(row, 'vrpc')} / - |"
        )
    for what, title in (("getattr", "GETATTR"), ("read4k", "READ 4 KiB")):
        for clients in clients_list:
            row = f"par-{what}-{clients}"
            tcp, vrpc, fast = (rate(row, w) for w in GETATTR_TRANSPORTS)
            fmt = lambda v: f"{v:.0f} ops/s" if v else "-"  # noqa: E731
            goal = (
                f"fast/TCP {ratio(fast, tcp)}{' (goal 3x)' if clients == 8 else ''}; "
                f"Python path/TCP {ratio(vrpc, tcp)}"
                if what == "getattr"
                else f"VRPC/TCP {ratio(vrpc, tcp)}"
            )
            lines.append(
                f"| {title}, {clients} client process{'es' if clients > 1 else ''} "
                f"({par_seconds:g} s), aggregate | {fmt(tcp)} | {fmt(vrpc)} "
                f"| {fmt(fast) if what == 'getattr' else '(Python path)'} | {goal} | - "
                f"| {cpu(row, 'tcp')} / {cpu(row, 'vrpc')} / {cpu(row, 'vrpc-fast')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
