"""GETATTR latency against one real `prism serve`: TCP, VRPC with and without the C fast path,
and a `stat` answered from the shared attribute table (issue #12 items 4-5).

Each client sends the same pre-encoded CALL record and waits for the raw reply (no client-side
decoding: that costs the same on every transport), one call at a time. Rounds are interleaved
(TCP, VRPC fast, VRPC Python, table) so that machine load hits every row alike; the figure is
the median over rounds of each round's mean latency.

    PYTHONPATH=. python3 benchmarks/vrpc_getattr.py [--ops 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rpc.message import AuthSys, encode_call
from tests.server_helpers import PrismProcess, new_data_dir
from tests.vrpc_helpers import nfs_over
from vrpc.client import VrpcChannel
from vrpc.control import ATTACH_NO_FASTPATH


def getattr_record(xid: int, fh: bytes) -> bytes:
    cred = AuthSys(0, b"bench", 0, 0, ()).to_opaque()
    args = struct.pack(">I", len(fh)) + fh + b"\0" * (-len(fh) % 4)
    return encode_call(xid, 100003, 3, 1, args, cred)


def tcp_round(port: int, record: bytes, ops: int) -> float:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        framed = struct.pack(">I", 0x80000000 | len(record)) + record
        t0 = time.perf_counter()
        for _ in range(ops):
            s.sendall(framed)
            need, got = None, b""
            while need is None or len(got) < need:
                got += s.recv(65536)
                if need is None and len(got) >= 4:
                    need = 4 + (struct.unpack_from(">I", got)[0] & 0x7FFFFFFF)
        return (time.perf_counter() - t0) / ops


def vrpc_round(ch: VrpcChannel, record: bytes, ops: int) -> float:
    call = ch.call
    t0 = time.perf_counter()
    for _ in range(ops):
        call(record)
    return (time.perf_counter() - t0) / ops


def table_round(ch: VrpcChannel, fh: bytes, ops: int) -> float:
    stat = ch.stat_from_table
    t0 = time.perf_counter()
    for _ in range(ops):
        if stat(fh) is None:
            raise SystemExit("table miss: the benchmark needs a published entry")
    return (time.perf_counter() - t0) / ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    opts = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="prism-vrpc-bench-"))
    data = new_data_dir(base / "data")
    with PrismProcess(data, base / "logs") as srv:
        fh = srv.mount("/vm").data
        record = getattr_record(1, fh)
        sock = data / "vrpc.sock"
        fast = VrpcChannel.attach(sock, "vm", meta=True)
        slow = VrpcChannel.attach(sock, "vm", flags=ATTACH_NO_FASTPATH)
        assert nfs_over(fast).getattr(fh).ok  # publishes the root's attributes
        rows: dict[str, list[float]] = {"tcp": [], "vrpc_fast": [], "vrpc_python": [], "table": []}
        for _ in range(opts.rounds):
            rows["tcp"].append(tcp_round(srv.nfs_port, record, opts.ops))
            rows["vrpc_fast"].append(vrpc_round(fast, record, opts.ops))
            rows["vrpc_python"].append(vrpc_round(slow, record, opts.ops))
            rows["table"].append(table_round(fast, fh, opts.ops))
        fast.close()
        slow.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    for name, value in med.items():
        print(f"{name:12} {value * 1e6:8.2f} us   TCP/this {med['tcp'] / value:6.2f}x")


if __name__ == "__main__":
    main()
