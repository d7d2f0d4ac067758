"""Issue #10, items 14 and 15: damaged content and damaged metadata are detected, never served.

Every test keeps its data directory on a small tmpfs mounted for it (a real filesystem with
real files), damages real bytes on disk, and checks what a client and `prism fsck` see:

* item 14: a byte flipped in a live chunk of a segment file (under a running server) makes
  READs of that chunk answer NFS3ERR_IO (the rest of the file still reads), is logged once
  with the file and range, and is counted in the metrics; a partial WRITE into it fails too
  rather than folding the damage into a fresh chunk. `fsck --repair` restores a damaged chunk
  from another copy of its content and lists the files and ranges it cannot restore, in one
  run, leaving them failing with EIO (never zeros).
* item 15: random bytes flipped in the records of a closed store's `data.mdb` are each
  reported by `fsck`, and a server on the damaged store answers every MNT, GETATTR, LOOKUP,
  READDIRPLUS and READ either exactly as before the damage or with an I/O error, never with
  wrong data (a listing short of entries, a changed name, NOENT for something that exists).
  Records lost with a damaged B-tree page are simulated by deleting them: fsck finds the
  loss through the counts it can derive, MNT answers MNT3ERR_IO rather than NOENT for a VM
  whose name record is gone, and `fsck --repair` rebuilds the names index. A format-1 store
  (values without seals) is upgraded when opened and keeps its data.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import lmdb
import pytest

from prism.nfs.client import MountClient, NfsClient, NfsError
from prism.nfs.const import Ftype3, MountStat3, NfsStat3
from prism.nfs.wire import Fattr3, NfsFh3, Sattr3
from prism.store import Store
from prism.store.schema import DB_NAMES
from prism.store.sealed import SEAL
from tests.op_helpers import (
    PrismServe,
    clone_command,
    env,
    nfs_mkdirs,
    nfs_put,
    prism,
    run_prism,
)

CHUNK = 128 * 1024
METRICS_PORT = re.compile(r"^prism: ready: .* metrics :(?P<port>\d+)\s*$")


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
    found = re.search(r"^prism_store_damaged_reads_total (\S+)$", body, re.M)
    assert found, body
    return int(float(found[1]))


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


# -- item 15: metadata records -----------------------------------------------------------

IO = "NFS3ERR_IO"


def _attrs(a: Fattr3 | None) -> Any:
    assert a is not None
    return (a.type, a.mode, a.nlink, a.uid, a.gid, a.size, a.fileid, a.mtime, a.ctime)


def observe(c: NfsClient, root: NfsFh3, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a client can see of a tree: path#attr (GETATTR), path#list (READDIRPLUS
    names and attributes), path#lookup (LOOKUP of each name), path#data (READ). Failures are
    recorded as the status's name. With `before`, the names to LOOKUP come from it, so a
    listing that fails or comes back short does not hide what must still be found."""
    out: dict[str, Any] = {}

    def visit(path: str, fh: NfsFh3) -> None:
        res = c.getattr(fh)
        out[path + "#attr"] = _attrs(res.obj_attributes) if res.ok else res.status.name
        if not res.ok:
            return
        assert res.obj_attributes is not None
        kind = res.obj_attributes.type
        if kind == Ftype3.DIR:
            try:
                listing: Any = sorted(
                    (e.name, _attrs(e.name_attributes))
                    for e in c.listdir(fh)
                    if e.name not in (b".", b"..")
                )
            except NfsError as exc:
                listing = exc.status.name
            out[path + "#list"] = listing
            known = before.get(path + "#list") if before is not None else listing
            for name, _ in known if isinstance(known, list) else []:
                child = f"{path}/{name.decode()}"
                found = c.lookup(fh, name)
                out[child + "#lookup"] = (
                    _attrs(found.obj_attributes) if found.ok else found.status.name
                )
                if found.ok and found.object is not None:
                    visit(child, found.object)
        elif kind == Ftype3.REG:
            try:
                out[path + "#data"] = c.read_all(fh)
            except NfsError as exc:
                out[path + "#data"] = exc.status.name

    visit("", root)
    return out


def observe_all(server: PrismServe, exports: list[str], before: dict | None = None) -> dict:
    """`observe` of each export (after its MNT), keys prefixed with the export."""
    out: dict[str, Any] = {}
    for export in exports:
        with MountClient("127.0.0.1", server.mount_port) as m:
            res = m.mnt_raw(export)
        out[export] = res.status.name
        if not res.ok or res.fhandle is None:
            continue
        hint = None
        if before is not None:
            hint = {k[len(export) :]: v for k, v in before.items() if k.startswith(export + "#")}
            hint.update(
                {k[len(export) :]: v for k, v in before.items() if k.startswith(export + "/")}
            )
        with NfsClient("127.0.0.1", server.nfs_port) as c:
            seen = observe(c, res.fhandle, hint)
        out.update({export + key: value for key, value in seen.items()})
    return out


def fill(server: PrismServe, rng: random.Random) -> None:
    """Two VMs, one cloned from the other (so records live in several layers)."""
    c, root = server.mount("/web")
    with c:
        many = nfs_mkdirs(c, root, "many")
        for i in range(50):
            nfs_put(c, root, f"many/file{i:02d}", f"file {i}\n".encode() * (i + 1))
        nfs_mkdirs(c, root, "a/b/c")
        nfs_put(c, root, "a/b/c/big", rng.randbytes(3 * CHUNK + 100))
        nfs_put(c, root, "a/note", b"hello\n")
        assert c.symlink(many, "link", "../a/note", Sattr3(mode=0o777)).ok
    prism(server.data, "snapshot", "create", "web", "mon")
    subprocess.run(
        [*clone_command(), "db", "web", "--data", str(server.data)], check=True, env=env()
    )
    c, root = server.mount("/db")
    with c:
        nfs_put(c, root, "many/file07", b"changed in db\n")
        assert c.remove(c.walk(root, "many"), "file08").ok
        nfs_mkdirs(c, root, "db-only/x")
        nfs_put(c, root, "db-only/x/y", rng.randbytes(CHUNK))


EXPORTS = ["/web", "/db", "/web@mon"]


def raw_records(data: Path) -> list[tuple[str, bytes, bytes]]:
    """(database, key, stored value) of every record, read with plain LMDB."""
    env = lmdb.open(str(data / "meta"), max_dbs=16, readonly=True, lock=False)
    out = []
    try:
        with env.begin() as t:
            for name in DB_NAMES:
                db = env.open_db(name.encode(), txn=t, create=False)
                out += [(name, bytes(k), bytes(v)) for k, v in t.cursor(db=db)]
    finally:
        env.close()
    return out


def flip_records(data: Path, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Flip one random bit inside the key or value of `count` random records (not the meta
    database: its handle key and format are needed to start at all) where they sit in
    data.mdb's leaf pages. Returns (database, key) of each damaged record."""
    path = data / "meta" / "data.mdb"
    blob = path.read_bytes()
    candidates = []
    for name, key, value in raw_records(data):
        if name == "meta" or len(value) > 1000:  # big values live on overflow pages
            continue
        where = blob.find(key + value)
        if where >= 0 and blob.find(key + value, where + 1) < 0:  # only the live copy
            candidates.append((name, key, where, len(key) + len(value)))
    chosen = rng.sample(candidates, count)
    with path.open("r+b") as f:
        for _, _, where, size in chosen:
            pos = where + rng.randrange(size)
            f.seek(pos)
            byte = f.read(1)[0] ^ (1 << rng.randrange(8))
            f.seek(pos)
            f.write(bytes([byte]))
        os.fsync(f.fileno())
    return [(name, key) for name, key, _, _ in chosen]


def test_random_flips_in_records_are_reported_and_never_served(small_fs: Path) -> None:
    data = small_fs / "data"
    prism(data, "vm", "create", "web")
    rng = random.Random(15)
    with PrismServe(data) as server:
        fill(server, rng)
        before = observe_all(server, EXPORTS)
    assert run_prism(data, "fsck").returncode == 0
    assert before["/web/many#list"] and len(before["/web/many#list"]) == 51

    flipped = flip_records(data, rng, 24)
    check = run_prism(data, "fsck", "--json")
    assert check.returncode == 1
    report = json.loads(check.stdout)
    damaged = [e for e in report["errors"] if "damaged on disk" in e]
    assert len(damaged) == len(flipped), "\n".join(report["errors"])

    with PrismServe(data) as server:
        after = observe_all(server, EXPORTS, before)
    wrong = {
        key: (before.get(key), value)
        for key, value in after.items()
        if value != before.get(key) and value not in (IO, MountStat3.MNT3ERR_IO.name)
    }
    assert not wrong, f"served wrong data after flipping {flipped}: {wrong}"
    unseen = [
        key
        for key in before
        if key not in after and not any(after.get(p) in (IO, "MNT3ERR_IO") for p in _ancestors(key))
    ]
    assert not unseen, unseen
    refused = [key for key, value in after.items() if value in (IO, "MNT3ERR_IO")]
    assert refused, "no flip was noticed by any client call"

    # --repair rebuilds what other records determine (chunk index, segments, usage, names)
    # and leaves the rest refused: still never wrong data.
    derived = {"chunks", "segments", "usage", "names"}
    run_prism(data, "fsck", "--repair")
    check = json.loads(run_prism(data, "fsck", "--json").stdout)
    left = [e for e in check["errors"] if "damaged on disk" in e]
    assert sorted(e.split()[0] for e in left) == sorted(
        db for db, _ in flipped if db not in derived
    ), left
    with PrismServe(data) as server:
        repaired = observe_all(server, EXPORTS, before)
    assert all(v == before.get(k) or v in (IO, "MNT3ERR_IO") for k, v in repaired.items())


def _ancestors(key: str) -> list[str]:
    """The calls whose failure hides `key` ("/web/a/b#attr": MNT of /web, then GETATTR and
    LOOKUP of /web, /web/a, /web/a/b)."""
    parts = key.split("#")[0].split("/")
    out = ["/" + parts[1]]
    for i in range(2, len(parts) + 1):
        prefix = "/".join(parts[:i])
        out += [prefix + "#attr", prefix + "#lookup"]
    return out


def _delete_raw(data: Path, db_name: str, match: Any) -> list[bytes]:
    env = lmdb.open(str(data / "meta"), max_dbs=16)
    try:
        with env.begin(write=True) as t:
            db = env.open_db(db_name.encode(), txn=t, create=False)
            doomed = [bytes(k) for k, v in t.cursor(db=db) if match(bytes(k), bytes(v))]
            for key in doomed:
                t.delete(key, db=db)
    finally:
        env.close()
    return doomed


def test_lost_records_are_found_by_counts_and_mnt_says_io(small_fs: Path) -> None:
    data = small_fs / "data"
    prism(data, "vm", "create", "web")
    with PrismServe(data) as server:
        fill(server, random.Random(1))
    # A damaged B-tree page loses its records without a trace: delete some the way it would.
    lost = _delete_raw(data, "dirents", lambda k, v: k.endswith(b"file33"))
    assert lost
    assert _delete_raw(data, "names", lambda k, v: k == b"db")
    check = run_prism(data, "fsck")
    assert check.returncode == 1
    assert "'db' (namespace" in check.stdout and "names index" in check.stdout
    assert "no directory entry names it" in check.stdout or "usage counts" in check.stdout
    with PrismServe(data) as server, MountClient("127.0.0.1", server.mount_port) as m:
        assert m.mnt_raw("/db").status == MountStat3.MNT3ERR_IO  # not NOENT
        assert m.mnt_raw("/nosuch").status == MountStat3.MNT3ERR_NOENT
    repair = run_prism(data, "fsck", "--repair")
    assert "rebuilt the names index" in repair.stdout
    with PrismServe(data) as server:
        c, root = server.mount("/db")
        with c:
            assert c.read_all(c.walk(root, "a/note")) == b"hello\n"


def test_a_format_1_store_is_sealed_when_opened(small_fs: Path) -> None:
    data = small_fs / "data"
    prism(data, "vm", "create", "web")
    with PrismServe(data) as server:
        fill(server, random.Random(2))
        before = observe_all(server, EXPORTS)
    # What an older Prism wrote: the same records with bare values, format 1.
    env = lmdb.open(str(data / "meta"), max_dbs=16)
    with env.begin(write=True) as t:
        for name in DB_NAMES:
            db = env.open_db(name.encode(), txn=t, create=False)
            for key, value in list(t.cursor(db=db)):
                t.put(key, bytes(value)[:-SEAL], db=db)
        t.put(b"format", (1).to_bytes(4, "big"), db=env.open_db(b"meta", txn=t))
    env.close()
    upgrade = run_prism(data, "fsck")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert "upgrading" in upgrade.stderr and "format 2" in upgrade.stderr
    with Store.open(data) as store:
        assert store.namespace("web").name == "web"
    with PrismServe(data) as server:
        assert observe_all(server, EXPORTS) == before
