"""Shares across the namespace lifecycle (issue #10, item 2), through a running `prism serve`.

A share is a live mount of another VM's subtree; a snapshot is a frozen view. So a
snapshot, and a clone (whole or of a subtree), carries none of its source's shares: where a
share was mounted it shows an empty directory, as a filesystem snapshot shows a mount point.
A rollback keeps the VM's shares mounted. `prism vm rm A` refuses while another VM shares
from A, naming them; `--force` removes those shares first. `prism fsck --repair` repairs the
dangling shares that older versions left (a snapshot or clone carrying a share entry, a
share of a removed VM) instead of failing with exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from prism.nfs.const import NfsStat3
from prism.store import Store, layers, txn
from prism.store import records as R
from tests.op_helpers import (
    PrismServe,
    nfs_get,
    nfs_mkdirs,
    nfs_put,
    nfs_tree,
    prism,
    prism_json,
    run_clone,
    run_prism,
)


def one_line_error(proc) -> str:
    assert proc.returncode != 0, f"{proc.args} should have failed: {proc.stdout}"
    err = proc.stderr
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def tree_of(srv: PrismServe, export: str) -> dict:
    """The whole tree of `export` read with READDIRPLUS (every entry's handle and attrs)."""
    c, root = srv.mount(export)
    with c:
        return nfs_tree(c, root)


def setup_shares(data: Path, srv: PrismServe) -> None:
    """src:/pub shared into dst at /mnt/pub (read-only) and at /top (read-write)."""
    for vm in ("src", "dst"):
        prism(data, "vm", "create", vm)
    s, sroot = srv.mount("/src")
    d, droot = srv.mount("/dst")
    with s, d:
        nfs_mkdirs(s, sroot, "pub/sub")
        nfs_put(s, sroot, "pub/a.txt", b"alpha\n")
        nfs_put(s, sroot, "pub/sub/b.txt", b"beta\n")
        nfs_mkdirs(d, droot, "mnt")
        nfs_put(d, droot, "own.txt", b"dst's own\n")
    prism(data, "share", "src:/pub", "dst:/mnt/pub")
    prism(data, "share", "src:/pub", "dst:/top", "--rw")


SHARED = {"a.txt": b"alpha\n", "sub": "<dir>", "sub/b.txt": b"beta\n"}


def test_snapshots_and_clones_carry_no_dangling_share(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prism(data, "vm", "create", "seed")
    with PrismServe(data) as srv:
        setup_shares(data, srv)
        live = tree_of(srv, "/dst")
        assert {k: live[f"mnt/pub/{k}"] for k in SHARED} == SHARED

        prism(data, "snapshot", "create", "dst", "s")
        assert run_clone(data, "whole", "dst").returncode == 0
        assert run_clone(data, "part", "dst:/mnt=/m").returncode == 0
        assert run_clone(data, "merged", "seed", "dst").returncode == 0  # '/' laid over
        assert run_clone(data, "fromsnap", "dst@s").returncode == 0
        empty_mounts = {"mnt": "<dir>", "mnt/pub": "<dir>", "own.txt": b"dst's own\n"}
        for export, want in (
            ("/dst@s", {**empty_mounts, "top": "<dir>"}),
            ("/whole", {**empty_mounts, "top": "<dir>"}),
            ("/fromsnap", {**empty_mounts, "top": "<dir>"}),
            ("/merged", {**empty_mounts, "top": "<dir>"}),
            ("/part", {"m": "<dir>", "m/pub": "<dir>"}),
        ):
            assert tree_of(srv, export) == want, export  # READDIRPLUS: no STALE entry
        # the clone's empty mount point is its own directory
        w, wroot = srv.mount("/whole")
        with w:
            nfs_put(w, wroot, "mnt/pub/mine", b"whole's\n")
        assert "mine" not in str(tree_of(srv, "/src"))
        # a subtree inside a share cannot be a clone source
        err = one_line_error(run_clone(data, "bad", "dst:/mnt/pub/sub"))
        assert "inside a share" in err, err
        # the VM itself keeps its shares, live
        assert tree_of(srv, "/dst") == live
        assert prism_json(data, "fsck")["clean"] is True

        # a rollback keeps the shares mounted; one whose place is gone is dropped, saying so
        d, droot = srv.mount("/dst")
        with d:
            assert d.remove(droot, "own.txt").ok
            prism(data, "snapshot", "rollback", "dst", "s")
            assert nfs_get(d, droot, "mnt/pub/sub/b.txt") == b"beta\n"
            assert nfs_get(d, droot, "top/a.txt") == b"alpha\n"
            assert tree_of(srv, "/dst") == live
            nfs_mkdirs(d, droot, "later")
            prism(data, "share", "src:/pub", "dst:/later/pub")
            out = prism(data, "snapshot", "rollback", "dst", "s")
            assert "removed the shares at /later/pub" in out, out
            assert [sh["path"] for sh in prism_json(data, "vm", "show", "dst")["shares"]] == [
                "/mnt/pub",
                "/top",
            ]
        assert prism_json(data, "fsck")["clean"] is True


def test_vm_rm_refuses_while_shared_and_force_unshares(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prism(data, "vm", "create", "seed")
    with PrismServe(data) as srv:
        setup_shares(data, srv)
        before = prism_json(data, "vm", "show", "dst")
        err = one_line_error(run_prism(data, "vm", "rm", "src"))
        assert "src is shared into dst:/mnt/pub, dst:/top" in err, err
        assert "prism vm rm src --force" in err and "prism unshare" in err, err
        assert prism_json(data, "vm", "show", "dst") == before
        assert prism_json(data, "vm", "show", "src")["name"] == "src"
        # replacing a directory that holds a share mount point would leave the share dangling
        err = one_line_error(run_clone(data, "dst", "seed:/=/mnt", "--into", "--replace"))
        assert "'pub' in dst is a share" in err and "prism unshare" in err, err
        assert prism_json(data, "vm", "show", "dst") == before

        prism(data, "vm", "rm", "src", "--force")
        assert prism_json(data, "vm", "show", "dst")["shares"] == []
        assert tree_of(srv, "/dst") == {"mnt": "<dir>", "own.txt": b"dst's own\n"}
        d, droot = srv.mount("/dst")
        with d:
            assert d.getattr(droot).ok
            assert d.getattr(d.walk(droot, "mnt")).obj_attributes.nlink == 2
            assert d.lookup(droot, "top").status == NfsStat3.NFS3ERR_NOENT
        assert prism_json(data, "fsck")["clean"] is True


def test_fsck_repairs_dangling_shares_of_older_stores(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prism(data, "vm", "create", "seed")
    with PrismServe(data) as srv:
        setup_shares(data, srv)
    prism(data, "snapshot", "create", "dst", "old")
    prism(data, "vm", "create", "other")
    prism(data, "share", "seed:/", "other:/seed")
    # What older versions left: a snapshot whose top is the frozen layer itself (so it
    # carries dst's share entries without the shares), and a VM shared from a removed VM.
    with Store.open(data) as store, txn.write(store.ctx) as t:
        ctx = store.ctx
        snap = layers.view_by_name(ctx, t, "dst@old")
        layers.put_ns(ctx, t, dict(snap.record, top=layers.load_layer(ctx, t, snap.top)["parent"]))
        seed = R.U32.pack(layers.view_by_name(ctx, t, "seed").id)  # `vm rm seed`, unchecked
        t.delete(seed, db=ctx.db.ns)
        t.delete(seed, db=ctx.db.usage)
        t.delete(b"seed", db=ctx.db.names)
    proc = run_prism(data, "fsck", "--json")
    assert proc.returncode == 1, proc.stderr  # errors found (not a crash: exit 2)
    errors = json.loads(proc.stdout)["errors"]
    assert any("dst@old" in e and "has no such share" in e for e in errors), errors
    assert any("other" in e and "removed" in e for e in errors), errors

    repaired = prism_json(data, "fsck", "--repair")
    assert repaired["repaired"], repaired
    assert prism_json(data, "fsck")["clean"] is True
    with PrismServe(data) as srv:
        assert tree_of(srv, "/dst@old") == {
            "mnt": "<dir>",
            "mnt/pub": "<dir>",
            "own.txt": b"dst's own\n",
            "top": "<dir>",
        }
        assert tree_of(srv, "/other") == {"seed": "<dir>"}
        live = tree_of(srv, "/dst")  # the VM whose frozen layer the snapshot shares
        assert live["mnt/pub/a.txt"] == b"alpha\n" and live["top/sub/b.txt"] == b"beta\n"
    assert prism_json(data, "vm", "show", "other")["shares"] == []
