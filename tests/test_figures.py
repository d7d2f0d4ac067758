"""Figures that tell the truth: what `prism gc`, `prism stats` and `prism vm show` report,
checked against measurements made outside Prism (`find -printf %s` over the data directory)
and against what the store does when the thing measured is really removed.

Every command runs as a user types it (a subprocess on a real data directory).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from prism.cli.output import human
from prism.store import CHUNK_SIZE, CloneSource, SetAttr, Store, txn
from prism.store import records as R
from prism.store.gc import gc, unique_bytes
from prism.store.schema import REFERENCED
from tests.op_helpers import ok, prism, prism_json, run_clone, run_prism

KiB = 1 << 10
MiB = 1 << 20


def du_files(data: Path) -> int:
    """What `du -sb` counts of the data directory's files (directories left out: some
    filesystems size them by their entries), measured by find(1), not by Prism."""
    out = subprocess.run(
        ["find", str(data), "-type", "f", "-printf", "%s\\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line) for line in out.split())


def make_src(root: Path) -> Path:
    (root / "d").mkdir(parents=True)
    (root / "big").write_bytes(os.urandom(3 * MiB + 5))
    (root / "d" / "small").write_bytes(os.urandom(200 * KiB))
    return root


def write_file(data: Path, vm: str, name: str, content: bytes) -> None:
    with Store.open(data) as store:
        info = store.namespace(vm)
        attr = store.create(info.root, name.encode(), 0o644)
        store.write(attr.oid, 0, content)


def store_figures(data: Path) -> dict[str, Any]:
    return prism_json(data, "stats")["store"]


# -- gc -----------------------------------------------------------------------------------


def test_gc_reports_what_the_data_directory_loses(tmp_path: Path) -> None:
    """Write, dedup, clone, share, remove, gc: the figure gc reports (text and --json)
    equals the change of the data directory's files and of `prism stats`, whether a
    segment goes whole or has its live chunks copied out first."""
    data = tmp_path / "data"
    src = make_src(tmp_path / "src")
    prism(data, "vm", "create", "one")
    prism(data, "import", "one", str(src))
    prism(data, "vm", "create", "two")
    prism(data, "import", "two", str(src), "--to", "/copy")  # dedup: stored once
    ok(run_clone(data, "three", "one"))  # clone: shares one's layers
    prism(data, "share", "one:/d", "two:/copy/d2")  # a share is a mount, not content
    # One segment, three quarters of it garbage once `one` and `three` go: compacted.
    with Store.open(data) as store:
        for vm, size in (("one", 3 * MiB), ("two", MiB)):
            info = store.namespace(vm)
            attr = store.create(info.root, b"own", 0o644)
            store.write(attr.oid, 0, os.urandom(size))
    prism(data, "vm", "create", "four")
    write_file(data, "four", "alone", os.urandom(MiB))  # a segment of its own: removed
    prism(data, "unshare", "two:/copy/d2")
    for vm in ("one", "three", "four"):
        prism(data, "vm", "rm", vm)

    du_before, stats_before = du_files(data), store_figures(data)
    report = prism_json(data, "gc")
    du_after, stats_after = du_files(data), store_figures(data)

    assert report["segments_removed"] >= 1 and report["segments_compacted"] >= 1, report
    assert report["bytes_copied"] >= MiB, report  # two's own file moved out
    assert report["bytes_reclaimed"] == du_before - du_after, report
    assert report["bytes_reclaimed"] == stats_before["disk_bytes"] - stats_after["disk_bytes"]
    assert stats_before["disk_bytes"] == du_before and stats_after["disk_bytes"] == du_after
    assert (
        report["segment_bytes_deleted"] - report["bytes_copied"]
        == stats_before["segment_bytes"] - stats_after["segment_bytes"]
    ), report
    assert report["bytes_reclaimed"] == (
        report["segment_bytes_deleted"] - report["bytes_copied"] - report["metadata_bytes_added"]
    )
    # one's and four's own files went (big and small stay: two holds them).
    assert 4 * MiB - 64 * KiB <= report["bytes_reclaimed"] <= 4 * MiB, report
    assert prism_json(data, "fsck")["clean"] is True

    # The text says the same figure; a gc with nothing to do reclaims nothing.
    prism(data, "vm", "rm", "two")
    du_before = du_files(data)
    text = prism(data, "gc")
    reclaimed = du_before - du_files(data)
    assert text.startswith(f"gc: reclaimed {human(reclaimed)} ("), text
    assert re.search(rf"-{re.escape(human(reclaimed))} segment files|metadata", text), text
    du_before = du_files(data)
    assert prism_json(data, "gc")["bytes_reclaimed"] == du_before - du_files(data) == 0


# -- stats: dedup and clones apart --------------------------------------------------------


def test_stats_tells_dedup_from_sharing_by_clones(tmp_path: Path) -> None:
    """Content written twice independently is dedup; a clone's is sharing: `prism stats`
    shows them apart (text and --json), and keeps the fields it had."""
    src = make_src(tmp_path / "src")
    content = 3 * MiB + 5 + 200 * KiB

    twice = tmp_path / "twice"
    for vm in ("a", "b"):
        prism(twice, "vm", "create", vm)
        prism(twice, "import", vm, str(src))
    st = store_figures(twice)
    assert st["logical_bytes"] == 2 * content and st["stored_bytes"] == content
    assert st["referenced_bytes"] == 2 * content
    assert st["dedup_bytes"] == content and st["content_dedup_ratio"] == 2.0
    assert st["clone_shared_bytes"] == 0
    assert st["dedup_ratio"] == 2.0  # the overall ratio, as before
    text = prism(twice, "stats")
    assert f"dedup: {human(content)} of identical content" in text, text
    assert "(ratio 2.00x)" in text and "clones: 0 B seen by several VMs" in text, text

    cloned = tmp_path / "cloned"
    prism(cloned, "vm", "create", "a")
    prism(cloned, "import", "a", str(src))
    ok(run_clone(cloned, "b", "a"))
    st = store_figures(cloned)
    assert st["logical_bytes"] == 2 * content and st["stored_bytes"] == content
    assert st["referenced_bytes"] == content
    assert st["dedup_bytes"] == 0 and st["content_dedup_ratio"] == 1.0
    assert st["clone_shared_bytes"] == content
    assert st["dedup_ratio"] == 2.0
    text = prism(cloned, "stats")
    assert "dedup: 0 B of identical content" in text and "(ratio 1.00x)" in text, text
    assert f"clones: {human(content)} seen by several VMs" in text, text

    # Writing into the clone parts the two: what is rewritten is no longer shared.
    write_file(cloned, "b", "again", (src / "big").read_bytes())  # dedup with a's big
    st = store_figures(cloned)
    assert st["dedup_bytes"] == 3 * MiB + 5 and st["clone_shared_bytes"] == content
    assert prism_json(cloned, "fsck")["clean"] is True


def test_referenced_counter_counted_for_an_older_store_and_checked_by_fsck(
    tmp_path: Path,
) -> None:
    """A store made before the counter gets it counted when first opened; fsck reports a
    wrong one and --repair fixes it."""
    data = tmp_path / "data"
    src = make_src(tmp_path / "src")
    for vm in ("a", "b"):
        prism(data, "vm", "create", vm)
        prism(data, "import", vm, str(src))
    want = store_figures(data)["referenced_bytes"]
    assert want > 0
    with Store.open(data) as store, txn.write(store.ctx) as t:
        t.delete(REFERENCED, db=store.ctx.db.meta)  # as an older Prism left it
    assert store_figures(data)["referenced_bytes"] == want
    assert prism_json(data, "fsck")["clean"] is True
    with Store.open(data) as store, txn.write(store.ctx) as t:
        t.put(REFERENCED, R.U64.pack(want + 7), db=store.ctx.db.meta)
    proc = run_prism(data, "fsck", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["errors"] == ["referenced-bytes counter is wrong"]
    prism(data, "fsck", "--repair")
    assert store_figures(data)["referenced_bytes"] == want


# -- vm show: used and unique ---------------------------------------------------------------


def freed_by(data: Path, tmp_path: Path, *command: str) -> int:
    """The stored bytes that `command` (a removal) and then `prism gc` free, on a copy of
    the data directory: what `unique` must predict."""
    copy = tmp_path / f"copy-{'-'.join(command)}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(data, copy)
    prism(copy, "gc")  # what gc frees anyway is no removal's doing
    before = store_figures(copy)["stored_bytes"]
    prism(copy, *command)
    prism(copy, "gc")
    return before - store_figures(copy)["stored_bytes"]


def edit(data: Path, vm: str, *, remove: str = "", add: str = "", size: int = 0) -> None:
    with Store.open(data) as store:
        root = store.namespace(vm).root
        if remove:
            store.remove(root, remove.encode())
        if add:
            attr = store.create(root, add.encode(), 0o644)
            store.write(attr.oid, 0, os.urandom(size))


def test_vm_show_used_and_unique_per_vm_and_snapshot(tmp_path: Path) -> None:
    """`unique` is what removing the VM (with its snapshots) or a snapshot, then gc, frees,
    checked by doing it on a copy: through snapshots (whose unique content the VM removed
    or rewrote after them), a clone that parts from its source, and dedup with another VM."""
    data = tmp_path / "data"
    src = make_src(tmp_path / "src")
    other = tmp_path / "other"
    other.mkdir()
    (other / "same-small").write_bytes((src / "d" / "small").read_bytes())
    prism(data, "vm", "create", "web")
    prism(data, "import", "web", str(src))
    prism(data, "vm", "create", "other")
    prism(data, "import", "other", str(other))  # dedup: small is not web's alone
    prism(data, "snapshot", "create", "web", "s1")
    edit(data, "web", remove="big", add="n1", size=MiB)  # big: s1's alone now
    prism(data, "snapshot", "create", "web", "s2")
    edit(data, "web", add="n2", size=512 * KiB)
    ok(run_clone(data, "kid", "web"))
    edit(data, "web", remove="n1", add="n3", size=256 * KiB)  # n1: s2's and kid's
    edit(data, "kid", add="n4", size=384 * KiB)

    web = prism_json(data, "vm", "show", "web")
    kid = prism_json(data, "vm", "show", "kid")
    snaps = {s["name"]: s for s in web["snapshot_space"]}
    assert web["snapshots"] == ["s1", "s2"] and set(snaps) == {"s1", "s2"}
    # used: what the quota counts (file sizes), for the VM and for each snapshot
    assert web["used_bytes"] == web["logical_bytes"] == 200 * KiB + 512 * KiB + 256 * KiB
    assert snaps["s1"]["used_bytes"] == 3 * MiB + 5 + 200 * KiB
    assert snaps["s2"]["used_bytes"] == 200 * KiB + MiB
    # unique: what removal and gc free, exactly
    assert snaps["s1"]["unique_bytes"] == 3 * MiB + 5  # big
    assert snaps["s2"]["unique_bytes"] == 0  # n1 is kid's too
    assert web["unique_bytes"] == 3 * MiB + 5 + 256 * KiB  # big (s1) and n3; kid keeps the rest
    assert kid["unique_bytes"] == 384 * KiB  # n4; n1 is s2's too
    assert snaps["s1"]["unique_bytes"] == freed_by(data, tmp_path, "snapshot", "rm", "web", "s1")
    assert snaps["s2"]["unique_bytes"] == freed_by(data, tmp_path, "snapshot", "rm", "web", "s2")
    assert web["unique_bytes"] == freed_by(data, tmp_path, "vm", "rm", "web")
    assert kid["unique_bytes"] == freed_by(data, tmp_path, "vm", "rm", "kid")
    other_unique = prism_json(data, "vm", "show", "other")["unique_bytes"]
    assert other_unique == 0 == freed_by(data, tmp_path, "vm", "rm", "other")

    text = prism(data, "vm", "show", "web")
    assert re.search(
        rf"^used: +{re.escape(human(web['used_bytes']))} in {web['files']} files, unique "
        rf"{re.escape(human(web['unique_bytes']))}$",
        text,
        re.M,
    ), text
    assert f"s1 (used {human(snaps['s1']['used_bytes'])}, unique 3.0 MiB)" in text, text
    assert "s2 (used 1.2 MiB, unique 0 B)" in text, text

    # Garbage gc would free anyway is nobody's unique: after `snapshot rm s1`, before gc.
    prism(data, "snapshot", "rm", "web", "s1")
    web = prism_json(data, "vm", "show", "web")
    assert web["unique_bytes"] == 256 * KiB == freed_by(data, tmp_path, "vm", "rm", "web")


def test_unique_through_a_graft_and_a_rollback(tmp_path: Path) -> None:
    """A VM composed from a subtree of another keeps the layers it imports, and a rollback
    leaves the rolled-back writes to gc: unique says what removal and gc really free."""
    data = tmp_path / "data"
    src = make_src(tmp_path / "src")
    prism(data, "vm", "create", "web")
    prism(data, "import", "web", str(src))
    ok(run_clone(data, "part", "web:/d"))
    edit(data, "web", remove="big", add="n1", size=256 * KiB)
    edit(data, "part", add="p1", size=128 * KiB)
    prism(data, "snapshot", "create", "part", "s")
    edit(data, "part", add="p2", size=64 * KiB)
    prism(data, "snapshot", "rollback", "part", "s")  # p2 is garbage now
    for vm, command in (
        ("web", ["vm", "rm", "web"]),
        ("part", ["vm", "rm", "part"]),
    ):
        got = prism_json(data, "vm", "show", vm)
        assert got["unique_bytes"] == freed_by(data, tmp_path, *command), (vm, got)
    assert prism_json(data, "vm", "show", "web")["unique_bytes"] == 256 * KiB  # n1
    part = prism_json(data, "vm", "show", "part")
    # p1, and big: web removed it after the graft, whose import keeps the layer that
    # holds it (though part sees only /d); without part, gc folds that layer into web's.
    assert part["unique_bytes"] == 128 * KiB + 3 * MiB + 5
    assert part["snapshot_space"][0]["unique_bytes"] == 0
    assert freed_by(data, tmp_path, "snapshot", "rm", "part", "s") == 0


def _stored_after_gc(path: Path, remove: str | None = None) -> int:
    with Store.open(path) as store:
        if remove is not None:
            store.remove_namespace(remove)
        gc(store)
        return store.stats().stored_bytes


@pytest.mark.parametrize("seed", range(20))
def test_unique_matches_removal_after_random_histories(tmp_path: Path, seed: int) -> None:
    """Random histories of writes, overwrites, removals, snapshots, rollbacks, whole and
    subtree clones, and partial gc: every VM's and snapshot's unique bytes equal what
    removing it and running gc frees (done on a copy, in this process)."""
    rng = random.Random(seed)
    data = tmp_path / "data"
    blocks = [os.urandom(CHUNK_SIZE) for _ in range(12)]  # shared pool: dedup happens

    def content() -> bytes:
        n = rng.randint(1, 3)
        return b"".join(
            rng.choice(blocks) if rng.random() < 0.5 else os.urandom(CHUNK_SIZE) for _ in range(n)
        )[: rng.randint(1, n * CHUNK_SIZE)]

    with Store.open(data) as store:
        store.create_namespace("vm0")
        store.mkdir(store.namespace("vm0").root, b"d", 0o755)
        vms, snaps = ["vm0"], []
        for step in range(40):
            vm = rng.choice(vms)
            root = store.namespace(vm).root
            d = store.resolve(store.namespace(vm).id, "/d")
            where = rng.choice([root, d.oid])
            names = [e.name for e in store.readdir(where)[0] if e.name not in (b".", b"..", b"d")]
            kind = rng.random()
            if kind < 0.35 or not names:
                name = f"f{rng.randint(0, 6)}".encode()
                if name in names:
                    oid = store.lookup(where, name).oid
                else:
                    oid = store.create(where, name, 0o644).oid
                store.write(oid, rng.choice([0, CHUNK_SIZE]), content())
            elif kind < 0.5:
                store.remove(where, rng.choice(names))
            elif kind < 0.6:
                snap = f"s{step}"
                store.snapshot(vm, snap)
                snaps.append(f"{vm}@{snap}")
            elif kind < 0.7 and [s for s in snaps if s.startswith(vm + "@")]:
                snap = rng.choice([s for s in snaps if s.startswith(vm + "@")])
                store.rollback(vm, snap.split("@")[1])
            elif kind < 0.8 and len(vms) < 4:
                new = f"vm{step}"
                mine = [s.split("@")[1] for s in snaps if s.startswith(vm + "@")]
                snap = rng.choice([None, *mine])
                path = rng.choice(["/", "/d"])  # whole, or a subtree (a graft)
                store.clone(new, [CloneSource(vm, snapshot=snap, path=path)])
                vms.append(new)
            elif kind < 0.85 and snaps:
                victim = snaps.pop(rng.randrange(len(snaps)))
                store.remove_namespace(victim)
            elif kind < 0.9:
                gc(store)
            else:
                oid = store.lookup(where, rng.choice(names)).oid
                store.setattr(oid, SetAttr(size=rng.randint(0, 2 * CHUNK_SIZE)))
        groups = [[vm, *(s for s in snaps if s.startswith(vm + "@"))] for vm in vms]
        groups += [[s] for s in snaps]
        got = unique_bytes(store, groups)

    copy = tmp_path / "copy"
    for group, unique in zip(groups, got, strict=True):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(data, copy)
        before = _stored_after_gc(copy)
        assert before - _stored_after_gc(copy, group[0]) == unique, (seed, group)


def test_unique_bytes_reads_what_the_store_holds_for_gc_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prism vm show`'s unique bytes cost the VM's own records plus one read of what gc
    would free anyway (here a removed VM not yet collected), however many snapshots it
    asks about: each pass no longer reads that again."""
    import prism.store.gc as gc_module

    read = 0
    records = gc_module._records

    def counted(t: Any, db: Any, prefix: bytes) -> Any:
        nonlocal read
        for item in records(t, db, prefix):
            read += 1
            yield item

    monkeypatch.setattr(gc_module, "_records", counted)
    clean, garbage = tmp_path / "clean", tmp_path / "garbage"
    with Store.open(clean) as store:
        store.create_namespace("web")
        for i in range(4):
            attr = store.create(store.namespace("web").root, f"f{i}".encode(), 0o644)
            store.write(attr.oid, 0, os.urandom(2 * CHUNK_SIZE))
            store.snapshot("web", f"s{i}")
    shutil.copytree(clean, garbage)
    removed = 300
    with Store.open(garbage) as store:
        store.create_namespace("gone")
        for i in range(removed):
            attr = store.create(store.namespace("gone").root, f"g{i}".encode(), 0o644)
            store.write(attr.oid, 0, os.urandom(64))
        store.remove_namespace("gone")
    groups = [["web", *(f"web@s{i}" for i in range(4))], *([f"web@s{i}"] for i in range(4))]
    reads, answers = [], []
    for data in (clean, garbage):
        with Store.open(data) as store:
            read = 0
            answers.append(unique_bytes(store, groups))
            reads.append(read)
    assert answers[0] == answers[1] and answers[0][0] == 4 * 2 * CHUNK_SIZE
    assert reads[1] - reads[0] == removed, reads  # once, not once per group and again


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRISM_DATA", raising=False)
