"""Hardening of the durability path: a full disk, a damaged journal, a stalled writer.

Every test here runs against real parts: a real `prism serve` subprocess on a real small
filesystem (tmpfs, mounted by the test: the suite runs as root), the project's NFS client over
real sockets, real LMDB and journal files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from prism.nfs.const import NfsStat3, StableHow
from prism.store import Store
from prism.store import journal as J
from rpc.client import RpcError
from tests.server_helpers import REPO_ROOT, PrismProcess, prism_cli
from tests.test_store_journal import crash_with_acknowledged_changes

MiB = 1 << 20


def resize(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def fill_outside(mnt: Path) -> Path:
    """Fill every free byte of `mnt` with a file that is not Prism's (another tenant)."""
    hog = mnt / "hog"
    fd = os.open(hog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (MiB, 65536, 4096, 512, 1):
            block = os.urandom(size)
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return hog


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def status(res: Any) -> NfsStat3:
    return NfsStat3(res.status)


def ok(res: Any) -> Any:
    assert res.status == NfsStat3.NFS3_OK, f"{type(res).__name__}: {NfsStat3(res.status).name}"
    return res


def names_in(nfs: Any, dir_fh: Any) -> list[str]:
    return sorted(n for e in nfs.listdir(dir_fh) if (n := e.name.decode()) not in (".", ".."))


def _from_four_clients(
    server: PrismProcess, names: list[str], call: Callable[[Any, str], Any]
) -> dict[str, str]:
    """`call(nfs, name)` for each of `names`, from 4 concurrent clients (so durable points
    group several calls); each name's outcome: its NFS status name, or the RPC error."""
    out: dict[str, str] = {}

    def worker(part: list[str]) -> None:
        with server.nfs_client("tcp", timeout=30) as nfs:
            for name in part:
                try:
                    out[name] = status(call(nfs, name)).name
                except RpcError as exc:
                    out[name] = repr(exc)

    threads = [threading.Thread(target=worker, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _create_many(server: PrismProcess, dir_fh: Any, names: list[str]) -> dict[str, str]:
    """CREATE `names` from 4 concurrent clients; each name's outcome as in `_from_four_clients`."""
    return _from_four_clients(server, names, lambda nfs, name: nfs.create(dir_fh, name))


def _fill_with_data(server: PrismProcess, root: Any) -> tuple[Any, int]:
    """FILE_SYNC 1 MiB writes of distinct bytes until NFS3ERR_NOSPC; (file, bytes written)."""
    with server.nfs_client("tcp", timeout=30) as nfs:
        fh = ok(nfs.create(root, "filler")).obj
        offset = 0
        for _ in range(1024):
            res = nfs.write(fh, offset, os.urandom(MiB), StableHow.FILE_SYNC)
            if res.status == NfsStat3.NFS3ERR_NOSPC:
                return fh, offset
            ok(res)
            offset += MiB
    raise AssertionError("the small filesystem never filled up")


def test_disk_full_keeps_every_acknowledged_change(small_fs: Path, tmp_path: Path) -> None:
    """The issue's reproduction: fill the data directory's filesystem with FILE_SYNC writes
    until NOSPC, then CREATE 3,000 files and REMOVE some: every OK must be durable (LOOKUP
    finds it, across a crash and a restart on a larger filesystem), REMOVE must really
    remove, and `prism gc` must reclaim the space."""
    data = small_fs / "data"
    prism_cli(data, "vm", "create", "vm")
    server = PrismProcess(data, tmp_path / "logs")
    server.start()
    try:
        root = server.mount("/vm")
        filler, written = _fill_with_data(server, root)
        assert written > 8 * MiB
        with server.nfs_client("tcp", timeout=30) as nfs:
            d = ok(nfs.mkdir(root, "d")).obj
        names = [f"f{i:05d}" for i in range(3000)]
        created = _create_many(server, d, names)
        bad = {n: s for n, s in created.items() if s not in ("NFS3_OK", "NFS3ERR_NOSPC")}
        assert not bad, f"{len(bad)} CREATEs neither OK nor NOSPC: {list(bad.items())[:5]}"
        acked = sorted(n for n, s in created.items() if s == "NFS3_OK")
        assert len(acked) == len(names), "metadata must keep working on a data-full disk"
        with server.nfs_client("tcp", timeout=30) as nfs:
            missing = [n for n in acked if status(nfs.lookup(d, n)) != NfsStat3.NFS3_OK]
            assert not missing, f"{len(missing)} acknowledged CREATEs are gone: {missing[:5]}"
            removed = acked[::2]
            for name in removed:
                ok(nfs.remove(d, name))
            ok(nfs.remove(root, "filler"))
            for name in removed[:50]:
                assert status(nfs.lookup(d, name)) == NfsStat3.NFS3ERR_NOENT
        server.restart(crash=True)  # kill -9: only the journal holds the newest changes
        kept = sorted(set(acked) - set(removed))
        with server.nfs_client("tcp", timeout=30) as nfs:
            listed = names_in(nfs, d)
            assert listed == kept
            assert status(nfs.lookup(root, "filler")) == NfsStat3.NFS3ERR_NOENT
        server.stop()
        report = json.loads(prism_cli(data, "gc", "--json").stdout)
        assert report["bytes_reclaimed"] >= written // 2, report
        assert free_bytes(small_fs) > written // 2
        assert prism_cli(data, "fsck").returncode == 0
        resize(small_fs, "128m")
        server.start()
        with server.nfs_client("tcp", timeout=30) as nfs:
            assert names_in(nfs, d) == kept
            fh = ok(nfs.create(root, "after")).obj
            ok(nfs.write(fh, 0, os.urandom(MiB), StableHow.FILE_SYNC))
        del filler
    finally:
        if server.running:
            server.stop()


def _remove_many(server: PrismProcess, dir_fh: Any, names: list[str]) -> dict[str, str]:
    """REMOVE `names` from 4 concurrent clients; each name's outcome as in `_from_four_clients`."""
    return _from_four_clients(server, names, lambda nfs, name: nfs.remove(dir_fh, name))


def test_a_disk_filled_by_others_refuses_changes_but_loses_none(
    small_fs: Path, tmp_path: Path
) -> None:
    """Another tenant fills the filesystem to the last byte, so LMDB cannot commit at all:
    CREATEs are refused (NFS3ERR_NOSPC), REMOVEs are either NFS3_OK and durable (the journal
    holds them) or NFS3ERR_NOSPC; the server restarts after kill -9 on the full disk, still
    serves what it acknowledged, takes more REMOVEs, and checkpoints everything once there is
    room again."""
    data = small_fs / "data"
    prism_cli(data, "vm", "create", "vm")
    server = PrismProcess(data, tmp_path / "logs")
    server.start()
    try:
        root = server.mount("/vm")
        with server.nfs_client("tcp", timeout=30) as nfs:
            d = ok(nfs.mkdir(root, "d")).obj
        files = [f"g{i:04d}" for i in range(600)]
        assert set(_create_many(server, d, files).values()) == {"NFS3_OK"}
        hog = fill_outside(small_fs)
        assert free_bytes(small_fs) == 0
        created = _create_many(server, d, [f"new{i}" for i in range(50)])
        assert set(created.values()) == {"NFS3ERR_NOSPC"}, created
        removed = _remove_many(server, d, files[:300])
        bad = {n: s for n, s in removed.items() if s not in ("NFS3_OK", "NFS3ERR_NOSPC")}
        assert not bad, f"{len(bad)} REMOVEs neither OK nor NOSPC: {list(bad.items())[:5]}"
        gone = {n for n, s in removed.items() if s == "NFS3_OK"}
        assert gone, "the journal has room: REMOVEs are still acknowledged"
        kept = sorted(set(files) - gone)
        server.kill()
        # An operator command must replay the dead server's records before anything else,
        # and cannot commit them on the full disk: a one-line error, not a traceback.
        cli = prism_cli(data, "vm", "list", check=False)
        assert cli.returncode != 0 and "no space left" in cli.stderr, cli.stderr
        assert "Traceback" not in cli.stderr, cli.stderr
        server.start()  # the server does start on the full disk
        with server.nfs_client("tcp", timeout=30) as nfs:
            assert names_in(nfs, d) == kept
            for name in kept[:100]:
                assert status(nfs.remove(d, name)) in (NfsStat3.NFS3_OK, NfsStat3.NFS3ERR_NOSPC)
            kept = names_in(nfs, d)
            assert len(kept) < 300
        hog.unlink()
        time.sleep(2)  # the server retries its checkpoint every second
        server.restart(crash=True)
        assert "replayed" not in server.stderr()  # that checkpoint retired every record
        with server.nfs_client("tcp", timeout=30) as nfs:
            assert names_in(nfs, d) == kept
        server.stop()
        assert prism_cli(data, "fsck").returncode == 0
        server.start()
        with server.nfs_client("tcp", timeout=30) as nfs:
            assert names_in(nfs, d) == kept
            ok(nfs.create(d, "after"))
    finally:
        if server.running:
            server.stop()


def _record_offsets(journal_path: Path, count: int) -> list[int]:
    journal = J.Journal.open(journal_path)
    try:
        payloads = list(journal.records(0))  # a new store's first generation
        assert len(payloads) == count
        offsets = [0]
        for p in payloads[:-1]:
            offsets.append(offsets[-1] + J.HEADER.size + len(p))
        return offsets
    finally:
        journal.close()


def test_a_damaged_journal_record_stops_recovery(tmp_path: Path) -> None:
    """The issue's reproduction: a journal owner dies (kill -9 equivalent: no checkpoint)
    with 79 acknowledged records pending; one byte changes in record 21. `prism fsck` and
    `prism serve` must refuse with the offset, not start without 58 acknowledged operations;
    a byte changed in the last record is a torn tail, dropped cleanly."""
    data = tmp_path / "data"
    with Store.open(data) as store:
        store.create_namespace("vm")
    crash_with_acknowledged_changes(data, 79)
    journal_path = data / "meta" / "journal"
    offsets = _record_offsets(journal_path, 79)
    saved = journal_path.read_bytes()
    with journal_path.open("r+b") as f:
        f.seek(offsets[21] + J.HEADER.size + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    fsck = prism_cli(data, "fsck", check=False)
    assert fsck.returncode != 0
    assert f"record at offset {offsets[21]} " in fsck.stderr, fsck.stderr
    server = PrismProcess(data, tmp_path / "logs")
    with pytest.raises(AssertionError, match=f"record at offset {offsets[21]} "):
        server.start()
    # What the error offers: moving the journal aside starts without its records.
    journal_path.rename(data / "meta" / "journal.damaged")
    assert "clean" in prism_cli(data, "fsck").stdout
    # A changed byte in the last record: a torn tail, which was never acknowledged.
    damaged = bytearray(saved)
    damaged[offsets[78] + J.HEADER.size + 5] ^= 0x01
    journal_path.write_bytes(bytes(damaged))
    with server, server.nfs_client("tcp") as nfs:
        names = names_in(nfs, server.mount("/vm"))
    assert names == sorted(f"durable{i}" for i in range(78))
    assert prism_cli(data, "fsck").returncode == 0


HOLDER = """
import sys, time
from prism.store import Store
store = Store.open(sys.argv[1])
store.begin_batch()  # a write transaction: the store's write lock, then LMDB's writer
store.create(store.namespace("vm").root, b"held", 0o644)
print("HELD", flush=True)
time.sleep(float(sys.argv[2]))  # stalled, as an import blocked on a FIFO would be
store.commit()
"""


def _latencies(server: PrismProcess, fh: Any, seconds: float) -> list[float]:
    """GETATTR round trips (seconds) from a client of its own, for `seconds`."""
    out = []
    with server.nfs_client("tcp", timeout=30) as nfs:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            ok(nfs.getattr(fh))
            out.append(time.perf_counter() - t0)
            time.sleep(0.005)
    return out


def test_another_process_holding_the_write_lock_does_not_freeze_the_server(
    prism_server: PrismProcess,
) -> None:
    """The issue's reproduction: another process holds a write transaction for 3 s while a
    client's CREATE waits for it; another client's GETATTRs must stay fast (< 100 ms) all
    along, and the CREATE completes once the holder commits."""
    server = prism_server
    root = server.mount("/vm")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(server.data), "3"],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"HELD\n"
        created: list[Any] = []

        def create() -> None:
            with server.nfs_client("tcp", timeout=30) as nfs:
                t0 = time.monotonic()
                created.append(nfs.create(root, "waited"))
                created.append(time.monotonic() - t0)

        writer = threading.Thread(target=create)
        writer.start()
        slow = _latencies(server, root, 2.0)
        writer.join(30)
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert max(slow) < 0.1, f"GETATTR took up to {max(slow) * 1000:.0f} ms ({len(slow)} calls)"
    ok(created[0])
    assert created[1] > 1.0  # it did wait for the holder
    with server.nfs_client("tcp") as nfs:
        assert {"held", "waited"} <= set(names_in(nfs, root))


def test_an_import_holds_the_write_lock_only_in_bounded_steps(
    prism_server: PrismProcess, tmp_path: Path
) -> None:
    """`prism import` of many files while clients work: GETATTR stays under 100 ms and a
    CREATE waits at most about one bounded step of the import, not for its whole batch."""
    server = prism_server
    src = tmp_path / "src"
    for d in range(30):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d}" / f"f{f}").write_bytes(os.urandom(16384))
    root = server.mount("/vm")
    importer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prism",
            "import",
            "vm",
            str(src),
            "--to",
            "/imported",
            "--data",
            str(server.data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    creates: list[float] = []

    def create_while_importing() -> None:
        with server.nfs_client("tcp", timeout=60) as nfs:
            while importer.poll() is None:
                t0 = time.perf_counter()
                ok(nfs.create(root, f"during{len(creates)}"))
                creates.append(time.perf_counter() - t0)

    writer = threading.Thread(target=create_while_importing)
    writer.start()
    getattrs: list[float] = []
    try:
        while importer.poll() is None:
            getattrs += _latencies(server, root, 0.2)
        _, err = importer.communicate(timeout=60)
        assert importer.returncode == 0, err
    finally:
        if importer.poll() is None:
            importer.kill()
        writer.join(60)
    assert len(creates) >= 3, "the import finished too fast to measure anything"
    # The server's own checkpoints fsync on the loop, behind the import's fsyncs on the same
    # disk: rare outliers come from there, not from waiting for the import's lock.
    p99 = sorted(getattrs)[len(getattrs) * 99 // 100]
    assert p99 < 0.1, f"GETATTR p99 {p99 * 1000:.0f} ms"
    assert max(getattrs) < 0.5, f"GETATTR took up to {max(getattrs) * 1000:.0f} ms"
    assert max(creates) < 1.5, f"CREATE took up to {max(creates) * 1000:.0f} ms"
