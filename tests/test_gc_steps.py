"""`prism gc` works in bounded steps, each its own write transaction.

Real parts throughout: stores on disk (real LMDB and segment files), `prism gc` and
`prism serve` as subprocesses, the project's NFS client over TCP.

* While gc reclaims a store full of garbage (dropped VMs, their chunks, mostly-garbage
  segments) for seconds, a client's CREATE through a running server completes in well under
  a second each time: gc releases the write lock between steps.
* kill -9 of gc at random moments leaves a store that opens, that fsck finds free of errors
  (at most debris), whose live data is intact, and that the next gc leaves clean.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prism.nfs.const import NfsStat3
from prism.store import Store, check
from prism.store.gc import gc as store_gc
from tests.server_helpers import REPO_ROOT, PrismProcess, new_data_dir

CONTENT = 2048


def ok(res: Any) -> Any:
    assert res.status == NfsStat3.NFS3_OK, f"{type(res).__name__}: {NfsStat3(res.status).name}"
    return res


def add_garbage(data: Path, vms: int, files: int, rng: random.Random, tag: str = "") -> None:
    """Make `vms` VMs of `files` small files each, with a few files of VM "vm" written in
    between (so segments mix live and dead chunks), snapshot "vm" and drop the snapshot
    (a layer to merge), then remove the VMs: dropped layers, zero-reference chunks and
    mostly-garbage segments for gc."""
    with Store.open(data) as store:
        live = store.root(store.namespace("vm").id)
        for k in range(vms):
            name = f"junk{tag}{k}"
            root = store.root(store.create_namespace(name).id)
            store.begin_batch()
            for f in range(files):
                oid = store.create(root, f"f{f}".encode()).oid
                store.write(oid, 0, rng.randbytes(CONTENT))
                if f % 20 == 0:
                    kept = store.create(live, f"k{tag}{k}-{f}".encode()).oid
                    store.write(kept, 0, rng.randbytes(CONTENT))
                if f % 500 == 499:
                    store.commit()
                    store.begin_batch()
            store.commit()
            store.snapshot("vm", f"s{tag}{k}")
            store.remove_snapshot("vm", f"s{tag}{k}")
            store.remove_namespace(name)


def live_files(data: Path) -> dict[str, bytes]:
    with Store.open(data) as store:
        root = store.root(store.namespace("vm").id)
        entries, eof = store.readdir(root, 0, limit=1_000_000)
        assert eof
        return {e.name.decode(): store.read(e.oid, 0, 1 << 20)[0] for e in entries}


def garbage_records(data: Path) -> int:
    """Layer and chunk records and segment files: what gc's steps take away."""
    with Store.open(data) as store, store.ctx.env.begin() as t:
        records = sum(t.stat(db)["entries"] for db in (store.ctx.db.layers, store.ctx.db.chunks))
        return records + len(store.segments.list_ids())


def spawn_gc(data: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "prism", "gc", "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )


@pytest.mark.slow
def test_a_server_write_gets_through_while_gc_runs(tmp_path: Path) -> None:
    """gc of ~60k dead files for seconds in total; every CREATE a client sends meanwhile
    completes in under 1 s (a single-transaction gc made them wait for all of it)."""
    data = new_data_dir(tmp_path / "data")
    add_garbage(data, 24, 2500, random.Random(1))
    with PrismProcess(data, tmp_path / "logs") as server:
        root = server.mount("/vm")
        with server.nfs_client("tcp", timeout=60) as nfs:
            ok(nfs.create(root, "before"))  # the server has written once: its batch works
            began = time.monotonic()
            gc = spawn_gc(data)
            creates: list[float] = []
            try:
                while gc.poll() is None:
                    t0 = time.perf_counter()
                    ok(nfs.create(root, f"during{len(creates)}"))
                    creates.append(time.perf_counter() - t0)
                    time.sleep(0.01)
                _, err = gc.communicate(timeout=120)
            finally:
                if gc.poll() is None:
                    gc.kill()
                    gc.wait()
            took = time.monotonic() - began
            assert gc.returncode == 0, err.decode()
    print(
        f"gc took {took:.2f} s; {len(creates)} CREATEs during it, max "
        f"{max(creates) * 1000:.0f} ms, median {sorted(creates)[len(creates) // 2] * 1000:.0f} ms"
    )
    assert took > 2.0, f"gc took only {took:.2f} s: too little garbage to measure anything"
    assert len(creates) >= 5
    assert max(creates) < 1.0, f"a CREATE waited {max(creates) * 1000:.0f} ms for gc"
    with Store.open(data) as store:
        assert check.fsck(store).errors == []


@pytest.mark.slow
def test_kill_9_of_gc_at_random_moments_leaves_a_sound_store(tmp_path: Path) -> None:
    seed = int(os.environ.get("PRISM_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    data = new_data_dir(tmp_path / "data")
    kills = halfway = 0
    for run in range(10):
        add_garbage(data, 3, 1500, rng, tag=f"r{run}-")  # gc's work: ~0.2 s after start-up
        expected = live_files(data)
        before = garbage_records(data)
        gc = spawn_gc(data)
        time.sleep(rng.uniform(0.25, 0.6))  # Python's start-up and imports take ~0.3 s
        if gc.poll() is None:
            gc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = gc.communicate(timeout=60)
        assert gc.returncode in (0, -signal.SIGKILL), err.decode()
        context = f"(seed {seed}, run {run})"
        assert live_files(data) == expected, f"live data changed {context}"
        with Store.open(data) as store:
            report = check.fsck(store)
        assert report.errors == [], f"fsck after a kill {context}: {report.errors}"
        # Killed after some steps committed and before the last: debris remains, less of it.
        halfway += bool(report.debris) and garbage_records(data) < before
    print(f"gc kill test: seed {seed}, {kills} kills, {halfway} of them half way through")
    assert kills >= 5, f"gc finished before most kills (seed {seed})"
    expected = live_files(data)
    with Store.open(data) as store:
        store_gc(store)
        report = check.fsck(store)
    assert report.errors == [] and report.debris == [], (report.errors, report.debris)
    assert live_files(data) == expected
