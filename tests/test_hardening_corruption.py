"""Issue #10, items 14 and 15: damaged content and damaged metadata are detected, never served.

Every test keeps its data directory on a small tmpfs mounted for it (a real filesystem with
real files), damages real bytes on disk, and checks what a client and `prism fsck` see:

* item 14: a byte flipped in a live chunk of a segment file (under a running server) makes
  READs of that chunk answer NFS3ERR_IO (the rest of the file still reads), is logged once
  with the file and range, and is counted in the metrics; a partial WRITE into it fails too
  rather than folding the damage into a fresh chunk. `fsck --repair` restores a damaged chunk
  from another copy of its content and lists the files and ranges it cannot restore, in one
  run, leaving them failing with EIO (never zeros).
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.nfs.const import NfsStat3
from prism.store import Store
from tests.op_helpers import PrismServe, nfs_mkdirs, nfs_put, prism, run_prism

CHUNK = 128 * 1024
METRICS_PORT = re.compile(r"^prism: ready: .* metrics :(?P<port>\d+)\s*$")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs of its own for the data directory."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def flip_in_segments(data: Path, content: bytes, at: int) -> None:
    """Flip one byte, `at` bytes into the only stored copy of `content` in the segments."""
    hits = []
    for seg in (data / "segments").glob("*.seg"):
        blob = seg.read_bytes()
        pos = blob.find(content)
        while pos >= 0:
            hits.append((seg, pos))
            pos = blob.find(content, pos + 1)
    assert len(hits) == 1, f"expected one stored copy, found {len(hits)}"
    seg, pos = hits[0]
    fd = os.open(seg, os.O_RDWR)
    try:
        old = os.pread(fd, 1, pos + at)
        os.pwrite(fd, bytes([old[0] ^ 0x5A]), pos + at)
        os.fsync(fd)
    finally:
        os.close(fd)


def damaged_reads_metric(server: PrismServe) -> int:
    port = next(int(m["port"]) for line in server.lines if (m := METRICS_PORT.match(line)))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    found = re.search(r"^prism_store_damaged_reads_total (\d+)$", body, re.M)
    assert found, body
    return int(found[1])


# -- item 14: content chunks -------------------------------------------------------------


def test_read_of_a_damaged_chunk_answers_io_logs_once_and_counts(small_fs: Path) -> None:
    data = small_fs / "data"
    prism(data, "vm", "create", "alpha")
    a, b, c = (os.urandom(CHUNK) for _ in range(3))
    with PrismServe(data, "--metrics", "127.0.0.1:0") as server:
        client, root = server.mount("/alpha")
        with client:
            nfs_mkdirs(client, root, "dir")
            fh = nfs_put(client, root, "dir/f", a + b + c)
            assert client.read(fh, CHUNK, CHUNK).data == b
            flip_in_segments(data, b, 1000)  # bit rot under the running server

            assert damaged_reads_metric(server) == 0
            assert client.read(fh, 0, CHUNK).data == a
            assert client.read(fh, 2 * CHUNK, CHUNK).data == c
            for offset, count in ((CHUNK + 5, 10), (CHUNK - 10, 20), (0, 3 * CHUNK)):
                res = client.read(fh, offset, count)
                assert res.status == NfsStat3.NFS3ERR_IO, (offset, count, res.status)
            # a partial write must not fold the damaged bytes into a fresh, valid chunk
            assert client.write(fh, CHUNK + 7, b"x").status == NfsStat3.NFS3ERR_IO
            assert client.read(fh, CHUNK, 10).status == NfsStat3.NFS3ERR_IO
            assert damaged_reads_metric(server) == 5
            # rewriting the whole chunk replaces the damage
            assert client.write(fh, CHUNK, b).ok
            assert client.read(fh, 0, 3 * CHUNK).data == a + b + c
    logged = [line for line in server.lines if "damaged content" in line]
    assert len(logged) == 1, server.log()
    assert "alpha" in logged[0] and "bytes 131072-262143" in logged[0], logged[0]


def test_fsck_repair_restores_from_a_copy_and_lists_what_it_cannot(small_fs: Path) -> None:
    data = small_fs / "data"
    prism(data, "vm", "create", "alpha")
    a, b, c, d = (os.urandom(CHUNK) for _ in range(4))
    with PrismServe(data) as server:
        client, root = server.mount("/alpha")
        with client:
            nfs_mkdirs(client, root, "dir")
            nfs_put(client, root, "dir/first", a + b)
            nfs_put(client, root, "second", c + d[:1000])
    prism(data, "snapshot", "create", "alpha", "mon")
    flip_in_segments(data, b, 7)
    flip_in_segments(data, d[:1000], 999)
    # Writing b again after the damage: dedup compares bytes, finds the stored copy differs
    # and stores a second, good copy under the same hash.
    with Store.open(data) as store:
        ns = store.namespace("alpha")
        copy = store.create(ns.root, b"copy-of-b")
        store.write(copy.oid, 0, b)

    check = run_prism(data, "fsck")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "does not match its hash" in check.stdout
    assert "restores it from there" in check.stdout  # b has another copy
    for where in ("alpha:/second bytes 131072-132071", "alpha@mon:/second bytes 131072-132071"):
        assert where in check.stdout, check.stdout

    repair = run_prism(data, "fsck", "--repair", "--json")
    assert repair.returncode == 1, repair.stdout + repair.stderr  # damage is left behind
    assert "restored 1 damaged or missing chunks" in repair.stdout
    assert "alpha:/second bytes 131072-132071" in repair.stdout
    assert "alpha:/dir/first" not in repair.stdout

    with Store.open(data) as store:
        for name in ("alpha", "alpha@mon"):
            ns = store.namespace(name)
            first = store.lookup(store.lookup(ns.root, b"dir").oid, b"first").oid
            assert store.read(first, 0, 2 * CHUNK)[0] == a + b  # restored
            second = store.lookup(ns.root, b"second").oid
            assert store.read(second, 0, CHUNK)[0] == c  # undamaged part still reads
            with pytest.raises(Exception, match="damaged content") as err:
                store.read(second, CHUNK, 10)  # never zeros
            assert getattr(err.value, "errno", None) == 5  # EIO
    after = run_prism(data, "fsck")
    assert after.returncode == 1
    assert "alpha:/dir/first" not in after.stdout
    assert "alpha:/second bytes 131072-132071" in after.stdout
