"""The operator commands, run as a user types them: `python3 -m prism ...` and `prism-clone`.

Each command is run in a subprocess against a temporary data directory; output is checked
in its human form and with --json (parsed). Every bad input the operator issue names exits
non-zero with one line on stderr that says what to do, and leaves the store exactly as it
was. What the commands wrote is read back through the store API.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tqdm import tqdm

from prism import cli, importer
from prism.errors import QuotaExceeded
from prism.store import Store
from prism.store.types import FileType, ObjectId
from tests.op_helpers import env as op_env
from tests.op_helpers import ok, ok_json, prism, prism_json, run_clone, run_prism

MiB = 1 << 20
GiB = 1 << 30
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def in_process(data: Path, *args: str) -> Any:
    """A read-only command's --json output, run in this process (fast state checks)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([*args, "--data", str(data), "--json"]) == 0
    return json.loads(out.getvalue())


def state(data: Path) -> Any:
    """Everything an operator can see: VMs with usage, snapshots, store figures."""
    vms = in_process(data, "vm", "list")
    snaps = {vm["name"]: in_process(data, "snapshot", "list", vm["name"]) for vm in vms}
    stats = in_process(data, "stats")["store"]
    del stats["disk_bytes"]  # any transaction may grow the metadata file by a page
    return {"vms": vms, "snapshots": snaps, "stats": stats}


def one_line_error(proc: Any) -> str:
    assert proc.returncode != 0, f"{proc.args} should have failed: {proc.stdout}"
    err = proc.stderr
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert "Traceback" not in err
    assert proc.stdout == ""
    return err.strip()


# -- VM lifecycle -------------------------------------------------------------------------


def test_vm_lifecycle_human_and_json(data: Path) -> None:
    out = prism(data, "vm", "create", "web", "--client", "10.0.0.7/24", "--quota", "512M")
    assert out.strip() == ("created VM web: export /web, clients 10.0.0.0/24, quota 512.0 MiB")
    db = prism_json(data, "vm", "create", "db", "--client", "10.1.0.5", "--quota", "10G")
    assert db["name"] == "db" and db["export"] == "/db"
    assert db["clients"] == ["10.1.0.5/32"] and db["quota"] == 10 * GiB
    assert db["logical_bytes"] == 0 and db["files"] == 1  # the root directory
    assert prism_json(data, "vm", "create", "raw", "--quota", "123456")["quota"] == 123456
    assert prism_json(data, "vm", "create", "lo.cal_1-x", "--quota", "none")["quota"] is None

    listing = prism(data, "vm", "list").splitlines()
    assert listing[0].split() == ["NAME", "EXPORT", "CLIENTS", "QUOTA", "USED", "FILES"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert rows["web"][:3] == ["web", "/web", "10.0.0.0/24"]
    assert rows["lo.cal_1-x"][2] == "loopback"
    vms = {vm["name"]: vm for vm in prism_json(data, "vm", "list")}
    assert sorted(vms) == ["db", "lo.cal_1-x", "raw", "web"]
    for name, vm in vms.items():
        assert vm["export"] == "/" + name
        assert {"name", "export", "clients", "quota", "logical_bytes", "files"} <= set(vm)
    assert vms["web"]["quota"] == 512 * MiB and vms["lo.cal_1-x"]["clients"] == []

    show = prism(data, "vm", "show", "web")
    assert "export:    /web" in show and "quota:     512.0 MiB" in show
    shown = prism_json(data, "vm", "show", "web")
    assert shown["clients"] == ["10.0.0.0/24"] and shown["snapshots"] == []

    out = prism(data, "vm", "set", "web", "--quota", "20M", "--client", "10.9.0.0/16")
    assert out.strip() == "updated VM web: clients 10.9.0.0/16, quota 20.0 MiB"
    changed = prism_json(data, "vm", "set", "web", "--client", "10.9.0.1", "--client", "::1")
    assert changed["clients"] == ["10.9.0.1/32", "::1/128"] and changed["quota"] == 20 * MiB
    assert prism_json(data, "vm", "set", "web", "--quota", "none")["quota"] is None

    assert "removed VM raw" in prism(data, "vm", "rm", "raw")
    assert [vm["name"] for vm in prism_json(data, "vm", "list")] == ["db", "lo.cal_1-x", "web"]


def test_data_directory_defaults(tmp_path: Path) -> None:
    env_data = tmp_path / "from-env"
    ok(run_prism(None, "vm", "create", "a", extra_env={"PRISM_DATA": str(env_data)}))
    assert (env_data / "meta").is_dir()
    ok(run_prism(None, "vm", "create", "b", cwd=tmp_path))
    assert (tmp_path / "prism-data" / "meta").is_dir()
    assert [vm["name"] for vm in ok_json(run_prism(None, "vm", "list", "--json", cwd=tmp_path))]
    assert prism_json(env_data, "vm", "list")[0]["name"] == "a"
    proc = run_prism(tmp_path / "nowhere", "vm", "list")
    line = one_line_error(proc)
    assert "create one with `prism vm create" in line
    assert not (tmp_path / "nowhere").exists()
    # the absolute path, and both ways to name another: a relative --data is resolved
    proc = run_prism(Path("nowhere"), "vm", "list", cwd=tmp_path)
    line = one_line_error(proc)
    assert f"no Prism store at {tmp_path / 'nowhere'}:" in line
    assert "--data" in line and "$PRISM_DATA" in line
    # a store that cannot be made there says where and how to pick another (one line)
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    line = one_line_error(run_prism(not_a_dir / "data", "vm", "create", "a"))
    assert f"cannot open the Prism store at {not_a_dir / 'data'}: Not a directory;" in line
    assert "--data DIR or $PRISM_DATA" in line


# -- bad input --------------------------------------------------------------------------

BAD_INPUT = [
    # (case id, argv (first word "clone" means prism-clone), text the one line must contain)
    ("unknown-vm-show", ["vm", "show", "nope"], "see `prism vm list`"),
    ("unknown-vm-set", ["vm", "set", "nope", "--quota", "1G"], "no VM named 'nope'"),
    ("unknown-vm-rm", ["vm", "rm", "nope"], "no VM named 'nope'"),
    ("unknown-vm-snapshot", ["snapshot", "create", "nope", "s"], "no VM named 'nope'"),
    ("unknown-vm-import", ["import", "nope", "{src}"], "no VM named 'nope'"),
    ("unknown-vm-clone", ["clone", "new", "nope"], "no VM named 'nope'"),
    ("unknown-snapshot", ["snapshot", "rollback", "web", "nope"], "`prism snapshot list web`"),
    ("unknown-snapshot-rm", ["snapshot", "rm", "web", "nope"], "`prism snapshot list web`"),
    ("unknown-snapshot-clone", ["clone", "new", "web@nope"], "`prism snapshot list web`"),
    ("snapshot-not-vm", ["vm", "rm", "web@s1"], "`prism snapshot rm VM SNAP`"),
    ("bad-cidr-octet", ["vm", "create", "a", "--client", "10.0.0.300/24"], "use a CIDR like"),
    ("bad-cidr-prefix", ["vm", "create", "a", "--client", "10.0.0.0/33"], "use a CIDR like"),
    ("bad-cidr-set", ["vm", "set", "web", "--client", "not-an-ip"], "use a CIDR like"),
    ("bad-cidr-clone", ["clone", "new", "web", "--client", "1.2.3"], "use a CIDR like"),
    ("bad-size-unit", ["vm", "create", "a", "--quota", "12Q"], "like 512M, 10G, or 'none'"),
    ("bad-size-fraction", ["vm", "create", "a", "--quota", "1.5G"], "whole numbers; write 1536M"),
    ("bad-size-decimal", ["vm", "create", "a", "--quota", "10GB"], "write 10G for 10 GiB"),
    ("bad-size-absurd", ["vm", "set", "web", "--quota", "99999999999P"], "larger than any"),
    ("bad-size-negative", ["vm", "set", "web", "--quota", "-1"], "--quota"),
    ("bad-size-clone", ["clone", "new", "web", "--quota", "lots"], "like 512M, 10G"),
    ("name-clash-vm", ["vm", "create", "web"], "pick another name or remove it"),
    ("name-clash-clone", ["clone", "web", "base"], "pick another name or remove it"),
    ("clone-target-exists", ["clone", "web", "base"], "`prism-clone web ... --into`"),
    ("name-clash-snapshot", ["snapshot", "create", "web", "s1"], "pick another name"),
    ("bad-name-upper", ["vm", "create", "Web"], "invalid VM name"),
    ("bad-name-leading", ["vm", "create", "_web"], "a-z 0-9 _ . -"),
    ("bad-name-slash", ["vm", "create", "a/b"], "invalid VM name"),
    ("bad-name-at", ["vm", "create", "web@x"], "invalid VM name"),
    ("bad-name-long", ["vm", "create", "a" * 64], "1-63"),
    ("bad-name-clone", ["clone", "Bad", "web"], "invalid VM name"),
    ("bad-snapshot-name", ["snapshot", "create", "web", "Mon"], "invalid snapshot name"),
    ("outside-source", ["clone", "new", "web:/.."], "outside the VM's tree"),
    ("outside-dest", ["clone", "new", "base", "web:/etc=/a/../../x"], "outside the VM's tree"),
    ("outside-import", ["import", "web", "{src}", "--to", "/../x"], "outside the VM's tree"),
    ("relative-source", ["clone", "new", "web:etc"], "must be absolute"),
    ("relative-import", ["import", "web", "{src}", "--to", "x"], "must be absolute"),
    ("missing-source-path", ["clone", "new", "web:/nope"], "give paths that exist"),
    ("missing-dest-parent", ["clone", "new", "base", "web:/etc=/no/such/dir"], "parent"),
    ("dest-under-file", ["clone", "new", "base", "web:/etc=/motd/x"], "nothing was changed"),
    ("file-as-root", ["clone", "new", "web:/motd=/"], "is not a directory"),
    ("missing-import-dir", ["import", "web", "/no/such/dir"], "give the host directory"),
    ("import-clash", ["import", "web", "{src}"], "import into an empty or new directory"),
    ("import-to-file", ["import", "web", "{src}", "--to", "/motd"], "pick another --to"),
    (
        "conflict-same-dest",
        ["clone", "new", "web:/etc=/conf", "base:/srv=/conf"],
        "conflicting sources",
    ),
    (
        "conflict-hides-earlier",
        ["clone", "new", "base", "web:/etc=/srv/etc", "web:/srv=/srv"],
        "conflicting sources",
    ),
    ("into-with-quota", ["clone", "web", "base", "--into", "--quota", "1G"], "prism vm set"),
    ("into-missing-vm", ["clone", "nope", "base", "--into"], "no VM named 'nope'"),
    ("set-nothing", ["vm", "set", "web"], "give --client CIDR, --quota SIZE, --secure/--insecure"),
    ("missing-argument", ["vm", "create"], "see `prism vm create --help`"),
    # serve's bad options: tests/test_cli_service.py (through the one serve launcher)
    ("unknown-command", ["vm", "destroy", "web"], "see `prism vm --help`"),
]


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store with VMs base and web (web has /etc/nginx.conf, /srv/a, /motd and a snapshot
    s1), and a host tree whose top-level names clash with web's."""
    root = tmp_path_factory.mktemp("bad-input")
    data, src = root / "data", root / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "nginx.conf").write_text("from host\n")
    (src / "motd").write_text("host motd\n")
    prism(data, "vm", "create", "base")
    prism(data, "vm", "create", "web", "--client", "10.0.0.0/24", "--quota", "1G")
    prism(data, "import", "web", str(src))
    (src / "srv").mkdir()
    prism(data, "import", "web", str(src / "srv"), "--to", "/srv/a")
    prism(data, "snapshot", "create", "web", "s1")
    return data, src


@pytest.mark.parametrize(
    ("argv", "hint"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_is_refused_with_one_line(
    populated: tuple[Path, Path], argv: list[str], hint: str
) -> None:
    data, src = populated
    before = state(data)
    argv = [a.replace("{src}", str(src)) for a in argv]
    if argv[0] == "clone":
        proc, prog = run_clone(data, *argv[1:]), "prism-clone"
    else:
        proc, prog = run_prism(data, *argv), "prism"
    line = one_line_error(proc)
    assert line.startswith(prog) and ": error: " in line
    assert hint in line, line
    assert state(data) == before


@pytest.mark.parametrize(
    ("argv", "hint", "prog"),
    [
        (["vm", "show", "nope"], "no VM named 'nope'", "prism"),
        (["vm", "create", "a", "--quota", "10GB"], "write 10G for 10 GiB", "prism vm create"),
        (["vm", "lisst"], "invalid choice", "prism vm"),
        (["snapshot", "rm", "web", "nope"], "`prism snapshot list web`", "prism"),
    ],
)
def test_errors_are_json_on_stderr_with_json(
    populated: tuple[Path, Path], argv: list[str], hint: str, prog: str
) -> None:
    data, _ = populated
    proc = run_prism(data, *argv, "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    err = json.loads(proc.stderr)
    assert hint in err["error"], err
    assert err["command"] == prog and err["exit_status"] == 2
    missing = run_prism(data.parent / "nowhere", "stats", "--json")
    assert "no Prism store at" in json.loads(missing.stderr)["error"]


# -- snapshots ----------------------------------------------------------------------------


def _write(store: Store, vm: str, name: bytes, content: bytes) -> ObjectId:
    info = store.namespace(vm)
    attr = store.create(info.root, name, 0o644)
    store.write(attr.oid, 0, content)
    return attr.oid


def _read(store: Store, ns: str, path: str) -> bytes:
    info = store.namespace(ns)
    attr = store.resolve(info.id, path)
    data, _ = store.read(attr.oid, 0, attr.size)
    return data


def test_snapshot_create_list_rollback_rm(data: Path) -> None:
    prism(data, "vm", "create", "vm1", "--client", "10.0.0.0/24")
    with Store.open(data) as store:
        _write(store, "vm1", b"f", b"version one")
    out = prism(data, "snapshot", "create", "vm1", "monday")
    assert out.strip() == "created snapshot vm1@monday (read-only export /vm1@monday)"
    made = prism_json(data, "snapshot", "create", "vm1", "tuesday")
    assert made["name"] == "vm1@tuesday" and made["export"] == "/vm1@tuesday"
    assert made["readonly"] is True and made["clients"] == ["10.0.0.0/24"]
    with Store.open(data) as store:
        info = store.namespace("vm1")
        oid = store.resolve(info.id, "/f").oid
        store.write(oid, 0, b"VERSION TWO")
        assert _read(store, "vm1@monday", "/f") == b"version one"

    lines = prism(data, "snapshot", "list", "vm1").splitlines()
    assert [line.split()[0] for line in lines] == ["monday", "tuesday"]
    assert "export /vm1@monday" in lines[0]
    snaps = prism_json(data, "snapshot", "list", "vm1")
    assert [s["name"] for s in snaps] == ["vm1@monday", "vm1@tuesday"]
    assert all(s["readonly"] and s["export"] == "/" + s["name"] for s in snaps)
    assert prism_json(data, "vm", "show", "vm1")["snapshots"] == ["monday", "tuesday"]
    assert "vm1@" not in json.dumps(prism_json(data, "vm", "list"))  # snapshots are not VMs

    assert prism(data, "snapshot", "rollback", "vm1", "monday").strip() == (
        "rolled vm1 back to monday"
    )
    with Store.open(data) as store:
        assert _read(store, "vm1", "/f") == b"version one"
    assert prism_json(data, "snapshot", "rollback", "vm1", "tuesday") == {
        "rolled_back": "vm1",
        "to": "tuesday",
    }
    assert prism(data, "snapshot", "rm", "vm1", "monday").strip() == "removed snapshot vm1@monday"
    assert prism_json(data, "snapshot", "rm", "vm1", "tuesday") == {"removed": "vm1@tuesday"}
    assert prism(data, "snapshot", "list", "vm1").strip() == "vm1 has no snapshots"
    assert prism_json(data, "snapshot", "list", "vm1") == []


# -- fsck, gc, stats ----------------------------------------------------------------------


def test_fsck_gc_and_stats(data: Path, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    src.mkdir()
    blob = os.urandom(3 * 128 * 1024 + 17)
    for i in range(3):
        (src / f"copy{i}").write_bytes(blob)  # identical files: stored once
    (src / "small").write_bytes(b"small file")
    for vm in ("one", "two"):
        prism(data, "vm", "create", vm, "--quota", "10M")
        prism(data, "import", vm, str(src))

    st = prism_json(data, "stats")
    logical = 3 * len(blob) + len(b"small file")
    per_vm = {vm["name"]: vm for vm in st["vms"]}
    assert set(per_vm) == {"one", "two"}
    for vm in per_vm.values():
        assert vm["logical_bytes"] == logical and vm["files"] == 5 and vm["quota"] == 10 * MiB
    store = st["store"]
    assert store["logical_bytes"] == 2 * logical
    assert store["stored_bytes"] == len(blob) + len(b"small file")
    assert store["chunk_count"] == 5
    assert store["dedup_ratio"] == pytest.approx(2 * logical / store["stored_bytes"], rel=1e-3)
    text = prism(data, "stats")
    assert re.search(r"^one\s+1\.1 MiB\s+5\s+10\.0 MiB$", text, re.M), text
    assert re.search(r"store: logical .* in 5 chunks \(logical/stored 6\.00x\)", text), text
    assert re.search(r"dedup: .* written independently stored once \(ratio 6\.00x\)", text)

    out = prism(data, "fsck")
    assert re.search(r"^fsck: clean; checked \d+ objects, 5 chunks$", out, re.M), out
    report = prism_json(data, "fsck")
    assert report["clean"] is True and report["errors"] == [] and report["checked_chunks"] == 5

    prism(data, "vm", "rm", "one")
    with Store.open(data) as s:  # content only `one` held becomes garbage
        s.write(s.resolve(s.namespace("two").id, "/small").oid, 0, b"SMALL FILE")
    gc = prism_json(data, "gc")
    assert set(gc) >= {"bytes_reclaimed", "chunks_freed", "layers_dropped", "segments_removed"}
    # The freed chunk's bytes stay in a segment that is mostly live: no file shrinks.
    assert gc["chunks_freed"] == 1 and gc["segment_bytes_deleted"] == 0
    assert gc["bytes_reclaimed"] == -gc["metadata_bytes_added"]
    assert prism(data, "gc").startswith("gc: reclaimed 0 B")
    assert prism_json(data, "fsck")["clean"] is True
    assert prism_json(data, "stats")["store"]["chunk_count"] == 5  # 1 freed, 1 new


# -- import -------------------------------------------------------------------------------

T0 = 1_000_000_000_123_456_789  # 2001-09-09, with nanoseconds


def make_tree(root: Path) -> None:
    """A host tree with every kind of thing an image holds."""
    root.mkdir()
    (root / "etc" / "nginx" / "conf.d").mkdir(parents=True)
    (root / "etc" / "nginx" / "nginx.conf").write_text("worker_processes 4;\n")
    (root / "etc" / "nginx" / "conf.d" / "site.conf").write_text("server {}\n")
    (root / "etc" / "shadow").write_text("root:*:19000::::::\n")
    os.chmod(root / "etc" / "shadow", 0o640)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(300_000))  # three chunks
    os.chmod(root / "bin" / "tool", 0o4755)
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "srv").mkdir()
    os.chmod(root / "srv", 0o2750)
    (root / "srv" / "data.bin").write_bytes(b"\0" * 200_000 + b"tail")  # a sparse-ish file
    os.link(root / "etc" / "nginx" / "nginx.conf", root / "srv" / "nginx.conf.hard")
    os.link(root / "etc" / "nginx" / "nginx.conf", root / "nginx.conf.hard2")
    os.symlink("nginx/nginx.conf", root / "etc" / "nginx.conf")
    os.symlink("/etc/shadow", root / "srv" / "abs-link")
    os.symlink("no/such/target", root / "dangling")
    os.mkfifo(root / "srv" / "fifo")
    if IS_ROOT:
        os.chown(root / "etc" / "shadow", 0, 42)
        os.chown(root / "srv", 1000, 1001)
        os.chown(root / "srv" / "data.bin", 1000, 1001)
        os.chown(root / "srv" / "abs-link", 1000, 1001, follow_symlinks=False)
    # times last, deepest first, so creating children does not change them again
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for i, path in enumerate([*paths, root]):
        t = T0 + i * 1_000_000_007
        os.utime(path, ns=(t, t), follow_symlinks=False)


def host_view(root: Path) -> dict[str, Any]:
    """path -> what an import must preserve, read from the host."""
    out: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        rel = "/" + str(path.relative_to(root)) if path != root else "/"
        entry: dict[str, Any] = {
            "mode": stat.S_IMODE(st.st_mode) if not stat.S_ISLNK(st.st_mode) else None,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime": st.st_mtime_ns,
        }
        if stat.S_ISREG(st.st_mode):
            entry |= {"type": "REG", "data": path.read_bytes(), "nlink": st.st_nlink}
            inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISDIR(st.st_mode):
            entry["type"] = "DIR"
        elif stat.S_ISLNK(st.st_mode):
            entry |= {"type": "LNK", "target": os.readlink(path).encode()}
        elif stat.S_ISFIFO(st.st_mode):
            entry["type"] = "FIFO"
        elif stat.S_ISSOCK(st.st_mode):
            entry["type"] = "SOCK"
        elif stat.S_ISCHR(st.st_mode):
            entry["type"] = "CHR"
        out[rel] = entry
    for group in inodes.values():
        for rel in group:
            out[rel]["same_as"] = min(group)
    return out


def store_view(store: Store, vm: str, top: str = "/") -> dict[str, Any]:
    """The same view of a VM subtree, read back through the store API."""
    info = store.namespace(vm)
    out: dict[str, Any] = {}
    names: dict[ObjectId, list[str]] = {}  # hard links: every name of one object
    stack = [("/", store.resolve(info.id, top))]
    while stack:
        rel, attr = stack.pop()
        entry: dict[str, Any] = {
            "type": attr.type.name,
            "mode": attr.mode if attr.type != FileType.LNK else None,
            "uid": attr.uid,
            "gid": attr.gid,
            "mtime": attr.mtime_ns,
        }
        if attr.type == FileType.REG:
            entry["data"], eof = store.read(attr.oid, 0, attr.size + 1)
            assert eof
            entry["nlink"] = attr.nlink
            names.setdefault(attr.oid, []).append(rel)
        elif attr.type == FileType.LNK:
            entry["target"] = store.readlink(attr.oid)
        elif attr.type == FileType.DIR:
            entries, eof = store.readdir(attr.oid, 0, limit=10_000)
            assert eof
            for e in entries:
                stack.append((rel.rstrip("/") + "/" + e.name.decode(), store.getattr(e.oid)))
        out[rel] = entry
    for group in names.values():
        for rel in group:
            out[rel]["same_as"] = min(group)
    return out


def test_import_preserves_the_tree(data: Path, tmp_path: Path) -> None:
    src = tmp_path / "image"
    make_tree(src)
    prism(data, "vm", "create", "base")
    out = prism(data, "import", "base", str(src))
    # the summary line; progress only on a terminal, so stderr stays empty here
    assert re.fullmatch(
        r"imported 6 files, 7 directories, 3 symlinks, 2 hard links, 1 special files, "
        r"\d+\.\d KiB into base:/ in \d+\.\d s \(\d+ files/s, \d+\.\d MB/s\)\n",
        out,
    ), out
    expected = host_view(src)
    with Store.open(data) as store:
        got = store_view(store, "base")
    assert got == expected
    if IS_ROOT:
        assert got["/etc/shadow"]["gid"] == 42 and got["/srv/data.bin"]["uid"] == 1000
    assert got["/bin/tool"]["mode"] == 0o4755 and got["/tmp"]["mode"] == 0o1777
    assert got["/nginx.conf.hard2"]["nlink"] == 3
    assert got["/nginx.conf.hard2"]["same_as"] == got["/etc/nginx/nginx.conf"]["same_as"]

    # --to: into a new directory (made like mkdir -p), with --json
    report = prism_json(data, "import", "base", str(src / "etc"), "--to", "/opt/app/etc")
    assert report["files"] == 3 and report["dirs"] == 2 and report["symlinks"] == 1
    assert report["hardlinks"] == 0 and report["bytes"] > 0 and report["seconds"] >= 0
    with Store.open(data) as store:
        got = store_view(store, "base", "/opt/app/etc")
        assert store.resolve(store.namespace("base").id, "/opt/app").mode == 0o755
    want = host_view(src / "etc")
    # a hard link whose other names stay outside the imported subtree has nlink 1 there
    want["/nginx/nginx.conf"]["nlink"] = 1
    assert got == want

    # importing the same content again is deduplicated
    stored = prism_json(data, "stats")["store"]["stored_bytes"]
    prism(data, "vm", "create", "copy")
    prism(data, "import", "copy", str(src))
    assert prism_json(data, "stats")["store"]["stored_bytes"] == stored


def test_failed_import_leaves_the_vm_as_it_was(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import that fails after some batches were committed removes what it added."""
    src = tmp_path / "many"
    (src / "d").mkdir(parents=True)
    files = [src / f"f{i:02}" for i in range(30)] + [src / "d" / f"g{i:02}" for i in range(30)]
    prism(data, "vm", "create", "q", "--quota", "40000")
    with Store.open(data) as store:
        _write(store, "q", b"keep", b"precious")

    def visible() -> Any:
        seen = state(data)
        del seen["stats"]["segment_bytes"]  # appended chunk bytes stay until `prism gc`
        return seen

    class GrowsAfterTheScan:
        """The source fits the quota when the pre-scan counts it (30 KB), then grows to
        60 KB before the copy: the quota stops the copy midway."""

        def __init__(self) -> None:
            for f in files:
                f.write_bytes(os.urandom(500))

        def scanning(self, found: importer.ImportReport) -> None:
            pass

        def importing(self, total: importer.ImportReport) -> None:
            for f in files:
                f.write_bytes(os.urandom(1000))

        def advance(self, done: importer.ImportReport) -> None:
            pass

        def close(self) -> None:
            pass

    before = visible()
    monkeypatch.setattr(importer, "COMMIT_EVERY_OPS", 5)
    for to in ("/", "/new/dir"):
        with Store.open(data) as store, pytest.raises(QuotaExceeded) as refused:
            importer.import_tree(store, "q", src, to, progress=GrowsAfterTheScan())
        assert not isinstance(refused.value, importer.ImportOverQuota)  # midway, not early
        assert visible() == before
    with Store.open(data) as store:
        assert [e.name for e in store.readdir(store.namespace("q").root)[0]] == [b"keep"]


# -- prism-clone --------------------------------------------------------------------------


def test_prism_clone_composes_and_reports(data: Path, tmp_path: Path) -> None:
    src = tmp_path / "image"
    make_tree(src)
    for vm in ("base", "web"):
        prism(data, "vm", "create", vm)
    prism(data, "import", "base", str(src))
    prism(data, "import", "web", str(src / "etc"), "--to", "/etc/nginx-web")
    prism(data, "snapshot", "create", "web", "v1")

    out = ok(
        run_clone(data, "web2", "base", "web@v1:/etc/nginx-web=/etc/nginx", "--client", "10.0.0.2")
    )
    lines = out.splitlines()
    assert re.fullmatch(r"created VM web2 \(export /web2\) in \d+\.\d ms:", lines[0])
    assert lines[1:] == ["  base:/ -> /", "  web@v1:/etc/nginx-web -> /etc/nginx"]
    res = ok_json(run_clone(data, "web3", "web:/etc", "--quota", "512M", "--json"))
    assert res["vm"]["name"] == "web3" and res["vm"]["export"] == "/web3"
    assert res["vm"]["quota"] == 512 * MiB and res["vm"]["clients"] == []
    assert res["composed"] == [{"source": "web", "path": "/etc", "dest": "/etc"}]
    assert res["seconds"] >= 0 and res["vm"]["files"] > 1

    with Store.open(data) as store:
        web2 = store.namespace("web2")
        assert web2.clients == ("10.0.0.2/32",)
        want = store_view(store, "web", "/etc/nginx-web")
        assert store_view(store, "web2", "/etc/nginx") == want
        assert store_view(store, "web2", "/bin") == store_view(store, "base", "/bin")

    # --into lays more on an existing VM; laying a source over what exists needs --replace
    out = ok(run_clone(data, "web3", "base:/srv=/srv", "--into"))
    assert out.splitlines()[0].startswith("added to VM web3 (export /web3) in")
    ok(run_clone(data, "web3", "base:/srv=/srv", "web:/etc", "--into", "--replace"))
    with Store.open(data) as store:
        srv = store_view(store, "base", "/srv")
        assert srv["/nginx.conf.hard"]["nlink"] == 3
        srv["/nginx.conf.hard"]["nlink"] = 1  # the graft copies one of its three links
        assert store_view(store, "web3", "/srv") == srv
        assert _read(store, "web3", "/srv/data.bin").endswith(b"tail")
    assert prism_json(data, "fsck")["clean"] is True


def test_clone_into_over_a_directory_releases_what_it_replaced(data: Path, tmp_path: Path) -> None:
    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir()
    small.mkdir()
    (big / "blob").write_bytes(os.urandom(1 << 20))
    (small / "note").write_bytes(b"small")
    for vm, src in (("x", big), ("a", small)):
        prism(data, "vm", "create", vm)
        prism(data, "import", vm, str(src), "--to", "/d")
    ok(
        run_clone(data, "x", "a:/d", "--into", "--replace")
    )  # x's /d (and its 1 MiB blob) is replaced
    assert prism_json(data, "vm", "show", "x")["logical_bytes"] == len(b"small")
    prism(data, "gc")
    assert prism_json(data, "stats")["store"]["stored_bytes"] == len(b"small")


def run_on_terminal(argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a new pseudo-terminal, as an operator at
    a terminal would; returns (exit status, everything written to the terminal)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=op_env(), start_new_session=True
        )
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        else:
            proc.kill()
            raise AssertionError(f"{argv} did not finish in {timeout} s: {out!r}")
        return proc.wait(timeout=10), out.decode(errors="replace")
    finally:
        os.close(master)


PROGRESS = re.compile(
    r"\rimporting: +(?P<percent>\d+)%\|[^|]*\| (?P<done>[\d.]+[kMG]?)B/(?P<total>[\d.]+[kMG]?)B, "
    r"(?P<entries>\d+)/(?P<entries_total>\d+) entries "
    r"\[(?P<elapsed>[\d:]+)<(?P<eta>[\d:]+|\?), (?P<rate>[\d.]+[kMG]?|\?)B/s\]"
)


def test_import_shows_progress_on_a_terminal_only(data: Path, tmp_path: Path) -> None:
    src = tmp_path / "many"
    for d in range(20):
        sub = src / f"d{d:02}"
        sub.mkdir(parents=True)
        for f in range(150):
            (sub / f"f{f:03}").write_bytes(b"%d/%d " % (d, f) * 50)
    files = 20 * 150
    total = sum(p.stat().st_size for p in src.rglob("f*"))
    prism(data, "vm", "create", "tty")
    prism(data, "vm", "create", "notty")

    argv = [sys.executable, "-m", "prism", "import", "tty", str(src), "--data", str(data)]
    status, out = run_on_terminal(argv)
    assert status == 0, out
    drawn = list(PROGRESS.finditer(out))
    assert drawn, f"no progress line on the terminal: {out[:500]!r}"
    # the pre-scan's totals: a percentage of the bytes, the entries to do, an ETA
    assert {(m["total"], int(m["entries_total"])) for m in drawn} == {
        (tqdm.format_sizeof(total), files + 20)
    }
    percents = [int(m["percent"]) for m in drawn]
    assert percents == sorted(percents) and len(set(percents)) > 2, percents
    assert any(m["eta"] != "?" and m["rate"] != "?" for m in drawn), out[:1000]
    last = drawn[-1]
    assert last["percent"] == "100" and int(last["entries"]) == files + 20
    # the summary follows the progress line, on a line of its own
    summary = re.search(
        rf"\nimported {files} files, 20 directories, .* into tty:/ in [\d.]+ s "
        r"\(\d+ files/s, [\d.]+ MB/s\)\r?\n",
        out,
    )
    assert summary and summary.start() > last.end(), out[-500:]
    assert prism_json(data, "vm", "show", "tty")["logical_bytes"] == total

    # without a terminal and progress lines (tests/test_import_options.py): the summary alone
    proc = run_prism(data, "import", "notty", str(src), "--progress-interval", "0")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"imported {files} files, 20 directories")
    assert proc.stdout.count("\n") == 1 and "\r" not in proc.stdout
    assert prism_json(data, "vm", "show", "notty")["logical_bytes"] == total
