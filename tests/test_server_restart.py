"""Restarts and crashes of a real `prism serve`: handles, verifiers, durability.

A restart reuses the data directory and the ports (`PrismProcess.restart`), as an operator
or a supervisor would, so clients keep their addresses and the file handles they hold.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from prism.nfs.client import NfsClient
from prism.nfs.const import NfsStat3, StableHow
from prism.nfs.wire import NfsFh3
from rpc.client import RpcError
from tests.server_helpers import PrismProcess, running_server

BLOCK = 4096


def ok(res: Any) -> Any:
    assert res.status == NfsStat3.NFS3_OK, f"{type(res).__name__}: {res.status.name}"
    return res


def block(i: int) -> bytes:
    """Block `i`'s content: distinct per block, so a misplaced block cannot pass."""
    return (f"block {i:06d} ".encode() * (BLOCK // 13 + 1))[:BLOCK]


def test_handles_keep_working_across_a_restart(prism_server: PrismProcess) -> None:
    server = prism_server
    root = server.mount("/vm")
    udp = server.nfs_client("udp", timeout=20)  # one socket, kept across the restart
    try:
        with server.nfs_client("tcp") as nfs:
            d = ok(nfs.mkdir(root, "dir")).obj
            f = ok(nfs.create(d, "file")).obj
            w = ok(nfs.write(f, 0, b"written before the restart"))
            ok(nfs.symlink(d, "link", b"file"))
            before_verf = w.verf
            before_attrs = ok(nfs.getattr(f)).obj_attributes
        assert ok(udp.getattr(f)).obj_attributes.fileid == before_attrs.fileid

        server.restart()

        assert server.mount("/vm") == root  # the same root handle
        with server.nfs_client("tcp") as nfs:
            attrs = ok(nfs.getattr(f)).obj_attributes
            assert (attrs.fileid, attrs.size, attrs.mtime) == (
                before_attrs.fileid,
                before_attrs.size,
                before_attrs.mtime,
            )
            assert nfs.read_all(f) == b"written before the restart"
            assert ok(nfs.lookup(d, "file")).object == f
            assert ok(nfs.readlink(nfs.walk(d, "link"))).data == b"file"
            ok(nfs.create(d, "after"))
            w = ok(nfs.write(f, 0, b"WRITTEN"))
            # A new boot, a new verifier: clients resend uncommitted writes.
            assert w.verf != before_verf
            assert ok(nfs.commit(f)).verf == w.verf
        # The old UDP socket needs no reconnecting: same address, same handles.
        assert udp.read_all(f) == b"WRITTEN before the restart"
        assert ok(udp.lookup(d, "after")).ok
        assert ok(udp.write(f, 0, b"w", StableHow.UNSTABLE)).verf == w.verf
    finally:
        udp.close()


def test_committed_and_file_sync_data_survive_kill_9(prism_server: PrismProcess) -> None:
    server = prism_server
    root = server.mount("/vm")
    committed_data = os.urandom(300_000)
    sync_data = os.urandom(200_000)
    with server.nfs_client("tcp") as nfs:
        committed = ok(nfs.create(root, "committed")).obj
        sync = ok(nfs.create(root, "sync")).obj
        verfs = set()
        for off in range(0, len(committed_data), 64 * 1024):
            w = ok(
                nfs.write(committed, off, committed_data[off : off + 64 * 1024], StableHow.UNSTABLE)
            )
            assert w.committed == StableHow.UNSTABLE
            verfs.add(w.verf)
        c = ok(nfs.commit(committed))
        assert verfs == {c.verf}
        for off in range(0, len(sync_data), 50_000):
            w = ok(nfs.write(sync, off, sync_data[off : off + 50_000], StableHow.FILE_SYNC))
            assert w.committed == StableHow.FILE_SYNC
        ok(nfs.rename(root, "sync", root, "sync-renamed"))  # metadata is durable too
        old_verf = c.verf

    server.restart(crash=True)  # kill -9: no chance to flush anything

    with server.nfs_client("tcp") as nfs:
        assert nfs.read_all(committed) == committed_data
        assert nfs.read_all(sync) == sync_data
        assert ok(nfs.lookup(root, "sync-renamed")).object == sync
        assert nfs.lookup(root, "sync").status == NfsStat3.NFS3ERR_NOENT
        assert ok(nfs.commit(committed)).verf != old_verf
    server.stop()
    fsck = server.cli("fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def _writer(
    nfs: NfsClient,
    fh: NfsFh3,
    stable: StableHow,
    acked: list[int],
    stop: threading.Event,
    commit_every: int = 8,
) -> None:
    """Write blocks 0, 1, 2, ...; `acked` gets each block that is known durable."""
    pending: list[int] = []
    verf = None
    i = 0
    try:
        while not stop.is_set():
            w = nfs.write(fh, i * BLOCK, block(i), stable)
            if not w.ok:
                return
            if stable == StableHow.FILE_SYNC:
                acked.append(i)
            else:
                if verf not in (None, w.verf):
                    return
                verf = w.verf
                pending.append(i)
                if len(pending) == commit_every:
                    c = nfs.commit(fh)
                    if not c.ok or c.verf != verf:
                        return  # the server restarted: those writes may be gone
                    acked.extend(pending)
                    pending.clear()
            i += 1
    except (RpcError, OSError):
        return  # the server died under us


def test_acknowledged_writes_survive_kill_9_mid_stream(prism_server: PrismProcess) -> None:
    """Writers stream FILE_SYNC writes and UNSTABLE writes + COMMITs; kill -9 hits them
    mid-stream. Every write the server acknowledged as durable must be there afterwards."""
    server = prism_server
    root = server.mount("/vm")
    runs = []
    stop = threading.Event()
    for stable in (StableHow.FILE_SYNC, StableHow.UNSTABLE):
        nfs = server.nfs_client("tcp", timeout=5)
        fh = ok(nfs.create(root, f"stream-{stable.name}")).obj
        acked: list[int] = []
        t = threading.Thread(target=_writer, args=(nfs, fh, stable, acked, stop))
        runs.append((stable, nfs, fh, acked, t))
    for *_, t in runs:
        t.start()
    time.sleep(1.5)
    server.kill()
    stop.set()
    for stable, nfs, _, acked, t in runs:
        t.join(10)
        assert not t.is_alive()
        nfs.close()
        assert len(acked) >= 20, f"{stable.name}: only {len(acked)} acknowledged writes"

    server.start()
    with server.nfs_client("tcp") as nfs:
        for stable, _, fh, acked, _ in runs:
            size = ok(nfs.getattr(fh)).obj_attributes.size
            assert size >= (max(acked) + 1) * BLOCK, stable.name
            data = nfs.read_all(fh, chunk=256 * 1024, limit=(max(acked) + 1) * BLOCK)
            lost = [i for i in acked if data[i * BLOCK : (i + 1) * BLOCK] != block(i)]
            assert not lost, f"{stable.name}: acknowledged blocks lost: {lost[:10]}"


def test_async_mode_never_claims_data_durable_before_commit(tmp_path: Path) -> None:
    """`--async` answers metadata changes before they are on disk, but says so for data:
    a FILE_SYNC write is answered UNSTABLE, and what COMMIT acknowledged survives kill -9."""
    with running_server(tmp_path, extra_args=["--async"]) as server:
        assert "--async" in server.all_stderr()
        root = server.mount("/vm")
        data = os.urandom(150_000)
        with server.nfs_client("tcp") as nfs:
            f = ok(nfs.create(root, "file")).obj
            w = ok(nfs.write(f, 0, data, StableHow.FILE_SYNC))
            assert w.committed == StableHow.UNSTABLE
            assert ok(nfs.commit(f)).verf == w.verf
            for i in range(50):
                ok(nfs.create(root, f"quick{i}"))
            ok(nfs.remove(root, "quick0"))
        server.restart(crash=True)
        with server.nfs_client("tcp") as nfs:
            assert nfs.read_all(f) == data  # COMMIT waited for the journal
            assert ok(nfs.lookup(root, "file")).object == f
        server.stop()
        fsck = server.cli("fsck", check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
