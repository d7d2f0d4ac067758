"""Hardening of the operator commands (issue #10): composition and quota.

* `prism-clone ... --into` onto a destination that exists refuses, naming the path and
  `--replace`, and changes nothing; with `--replace` it replaces.
* A symlink's target is charged to its VM's quota: a client making 4 KiB symlinks in a
  10 MiB-quota VM through a running `prism serve` is refused with NFS3ERR_DQUOT once the
  targets fill the quota, and removing them gives the bytes back.
* `prism-clone --into` (and a new clone with --quota) refuses a composition that would put a
  VM over its quota, naming the quota and what the clone needs.
"""

from __future__ import annotations

import os
from pathlib import Path

from prism.nfs.const import NfsStat3
from prism.store import Store, quota, txn
from tests.op_helpers import PrismServe, prism, prism_json, run_clone

MiB = 1 << 20


def one_line_error(proc) -> str:
    assert proc.returncode != 0, f"{proc.args} should have failed: {proc.stdout}"
    err = proc.stderr
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert proc.stdout == ""
    return err.strip()


def fill(data: Path, vm: str, tree: dict[str, bytes], tmp: Path) -> None:
    """Import `tree` (relative path -> content) into a new VM `vm`."""
    src = tmp / f"src-{vm}"
    for rel, content in tree.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    prism(data, "vm", "create", vm)
    prism(data, "import", vm, str(src))


def listing(data: Path, vm: str) -> dict[str, bytes]:
    """Every regular file of `vm` and its content."""
    out: dict[str, bytes] = {}
    with Store.open(data) as store:
        stack = [("", store.namespace(vm).root)]
        while stack:
            path, oid = stack.pop()
            for e in store.readdir(oid)[0]:
                p = f"{path}/{e.name.decode()}"
                attr = store.getattr(e.oid)
                if attr.type.name == "DIR":
                    stack.append((p, e.oid))
                else:
                    out[p] = store.read(e.oid, 0, 1 << 30)[0]
    return out


def test_clone_into_an_existing_destination_refuses_without_replace(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    fill(data, "src", {"etc/app.conf": b"from src\n", "srv/new": b"new\n"}, tmp_path)
    fill(data, "dst", {"etc/app.conf": b"precious\n", "etc/other": b"only in dst\n"}, tmp_path)
    before = listing(data, "dst")

    for argv, path, label in (
        (["dst", "src:/etc", "--into"], "dst:/etc", "src:/etc"),
        (["dst", "src:/etc=/etc", "--into"], "dst:/etc", "src:/etc"),
        (["dst", "src", "--into"], "dst:/etc", "src:/"),  # laid over '/': each entry
    ):
        err = one_line_error(run_clone(data, *argv))
        assert f"{path} already exists" in err and "--replace" in err, err
        assert label in err, err
        assert listing(data, "dst") == before  # no file lost

    # a destination that does not exist needs no --replace
    prism(data, "vm", "create", "empty")
    run = run_clone(data, "dst", "src:/srv=/srv2", "--into")
    assert run.returncode == 0, run.stderr
    assert listing(data, "dst") == {**before, "/srv2/new": b"new\n"}

    # --replace replaces, as asked; --replace without --into is refused
    assert "applies to --into" in one_line_error(run_clone(data, "new", "src", "--replace"))
    run = run_clone(data, "dst", "src:/etc", "--into", "--replace")
    assert run.returncode == 0, run.stderr
    assert listing(data, "dst")["/etc/app.conf"] == b"from src\n"
    assert "/etc/other" not in listing(data, "dst")
    assert prism_json(data, "fsck")["clean"] is True


def test_symlink_targets_are_charged_to_the_quota(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prism(data, "vm", "create", "q", "--quota", "10M")
    target = b"t" * 4096
    with PrismServe(data) as srv:
        c, root = srv.mount("/q")
        with c:
            made = 0
            for i in range(3000):
                res = c.symlink(root, f"l{i:04}", target)
                if res.status != NfsStat3.NFS3_OK:
                    assert res.status == NfsStat3.NFS3ERR_DQUOT, res.status
                    break
                made += 1
            assert made <= 10 * MiB // len(target), made
            assert made >= 10 * MiB // len(target) - 1, made
            used = prism_json(data, "vm", "show", "q")["logical_bytes"]
            assert used == made * len(target) and used <= 10 * MiB
            # removing symlinks gives their bytes back
            for i in range(10):
                assert c.remove(root, f"l{i:04}").status == NfsStat3.NFS3_OK
            assert prism_json(data, "vm", "show", "q")["logical_bytes"] == used - 10 * 4096
            assert c.symlink(root, "again", target).status == NfsStat3.NFS3_OK
    assert prism_json(data, "fsck")["clean"] is True


def test_usage_of_an_existing_store_is_remeasured_with_symlinks(tmp_path: Path) -> None:
    """A store whose counters were kept without symlink bytes is re-measured on open."""
    data = tmp_path / "data"
    prism(data, "vm", "create", "old")
    with Store.open(data) as store:
        root = store.namespace("old").root
        for i in range(5):
            store.symlink(root, b"l%d" % i, b"x" * 1000)
        # what an older Prism left: the counters without symlinks, and no usage revision
        with txn.write(store.ctx) as t:
            quota.set_usage(store.ctx, t, store.namespace("old").id, 0, 6, True)
            t.delete(b"usage_rev", db=store.ctx.db.meta)
    assert prism_json(data, "vm", "show", "old")["logical_bytes"] == 5000


def test_clone_refuses_what_would_exceed_the_quota(tmp_path: Path) -> None:
    data = tmp_path / "data"
    big = {f"blob{i}": os.urandom(MiB) for i in range(45)}
    fill(data, "big", big, tmp_path)
    prism(data, "vm", "create", "q", "--quota", "10M")
    with Store.open(data) as store:
        store.create(store.namespace("q").root, b"mine", 0o644)
    before = listing(data, "q")
    stats = prism_json(data, "stats")["store"]

    err = one_line_error(run_clone(data, "q", "big:/=/imported", "--into"))
    assert "quota of 10485760 bytes" in err and "prism vm set q --quota" in err, err
    assert f"needs {45 * MiB} bytes" in err, err
    assert listing(data, "q") == before
    assert prism_json(data, "vm", "show", "q")["logical_bytes"] == 0
    # a new VM with a quota smaller than what it is composed of is refused too
    err = one_line_error(run_clone(data, "small", "big", "--quota", "10M"))
    assert "quota of 10485760 bytes" in err, err
    assert "small" not in [vm["name"] for vm in prism_json(data, "vm", "list")]
    assert prism_json(data, "stats")["store"]["stored_bytes"] == stats["stored_bytes"]

    # what fits is accepted
    prism(data, "vm", "set", "q", "--quota", "50M")
    run = run_clone(data, "q", "big:/=/imported", "--into")
    assert run.returncode == 0, run.stderr
    assert prism_json(data, "vm", "show", "q")["logical_bytes"] == 45 * MiB
