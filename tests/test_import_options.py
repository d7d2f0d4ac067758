"""`prism import` options (issue #14, "Import"), with real `prism import` processes on real
data directories and host trees (files, directories, symlinks, hard links, FIFOs, sockets,
device nodes):

* `--exclude PATTERN`: names at any depth, paths from the source's top, directories only
  with a trailing '/'; an excluded directory is never opened (inotify watches it), and an
  excluded name does not clash with the destination.
* `--one-file-system`: a tmpfs mounted inside the source, a file bind-mounted from it and a
  directory bind-mounted from the source's own filesystem are not entered or copied; each
  mount point stays as an empty directory.
* `--dry-run`: the same figures as the import that follows, and the store's files are
  byte-identical afterwards.
* Progress: the pre-scan's totals, then a percentage and an ETA; on a pipe one greppable
  line every --progress-interval seconds (JSON with --json, whose summary stays JSON).
* Streaming: the import's Python memory does not grow with the number of directories.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import socket
import stat
import struct
import subprocess
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from prism.importer import ImportReport, import_tree
from prism.store import Store
from tests.op_helpers import ok, prism, prism_json, run_prism
from tests.test_cli import IS_ROOT, host_view, make_tree, store_view

IN_ACCESS = 0x1
IN_OPEN = 0x20
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class OpenWatch:
    """Which of some directories (or the files in them) anything opened or read, by
    inotify. `stat` makes no event; `opendir`, `open` and `getdents` do."""

    def __init__(self, dirs: list[Path]) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.dirs: dict[int, Path] = {}
        for d in dirs:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(d), IN_OPEN | IN_ACCESS)
            assert wd >= 0, (d, os.strerror(ctypes.get_errno()))
            self.dirs[wd] = d

    def opened(self) -> set[Path]:
        seen: set[Path] = set()
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            at = 0
            while at < len(buf):
                wd, _mask, _cookie, size = _EVENT.unpack_from(buf, at)
                seen.add(self.dirs[wd])
                at += _EVENT.size + size

    def close(self) -> None:
        os.close(self.fd)


def fingerprint(data: Path) -> dict[str, str]:
    """Every file of the data directory and its SHA-256, but LMDB's reader table
    (meta/lock.mdb) and the epoch file (meta/epoch): every command that opens the store,
    `prism vm list` included, moves those two (they coordinate processes; no data)."""
    out = {}
    for path in sorted(data.rglob("*")):
        rel = str(path.relative_to(data))
        if path.is_dir():
            out[rel] = "<dir>"
        elif rel not in ("meta/lock.mdb", "meta/epoch"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def add_specials(root: Path) -> None:
    """A socket and (as root) a character device beside make_tree's FIFO."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(root / "srv")  # a socket path may be too long for sun_path from tmp_path
    try:
        sock.bind("sock")
    finally:
        os.chdir(cwd)
        sock.close()
    if IS_ROOT:
        os.mknod(root / "srv" / "null", 0o620 | stat.S_IFCHR, os.makedev(1, 3))


def without(view: dict[str, Any], *prefixes: str, suffix: str = "~") -> dict[str, Any]:
    """`view` less the entries at or under `prefixes`, and those ending with `suffix`."""
    return {
        k: v
        for k, v in view.items()
        if not any(k == p or k.startswith(p + "/") for p in prefixes) and not k.endswith(suffix)
    }


# -- --exclude ----------------------------------------------------------------------------


def test_exclude_leaves_out_names_and_paths_and_never_enters_them(tmp_path: Path) -> None:
    data, src = tmp_path / "data", tmp_path / "image"
    make_tree(src)
    add_specials(src)
    for d in ("var/cache/apt/archives", "var/lib/cache", "home/ann/.cache/fonts", "var/log"):
        (src / d).mkdir(parents=True)
    (src / "var/cache/apt/archives/big.deb").write_bytes(os.urandom(100_000))
    (src / "var/lib/cache/keep").write_bytes(b"not /var/cache\n")
    (src / "home/ann/.cache/fonts/f").write_bytes(b"font cache\n")
    (src / "home/ann/notes.txt").write_bytes(b"notes\n")
    (src / "var/log/syslog.log").write_bytes(b"log\n")
    (src / "var/log/messages").write_bytes(b"messages\n")
    (src / "etc/app.log").write_bytes(b"log\n")
    (src / "srv/tmp").write_bytes(b"a file named tmp: 'tmp/' is for directories\n")
    (src / "tmp/junk").write_bytes(b"junk\n")
    want = without(
        host_view(src), "/var/cache", "/home/ann/.cache", "/tmp", suffix=".log"
    )  # read before watching: host_view opens everything
    assert "/srv/tmp" in want and "/var/lib/cache/keep" in want and "/srv/sock" in want

    excluded = [src / d for d in ("var/cache", "var/cache/apt", "home/ann/.cache", "tmp")]
    control = [src / "var/lib/cache", src / "home/ann"]
    prism(data, "vm", "create", "vm")
    watch = OpenWatch(excluded + control)
    try:
        report = prism_json(
            data,
            "import",
            "vm",
            str(src),
            "--exclude",
            "*.log",
            "--exclude",
            "/var/cache",
            "--exclude",
            "home/*/.cache",
            "--exclude",
            "tmp/",
        )
        opened = watch.opened()
    finally:
        watch.close()
    assert opened == set(control), "an excluded directory was entered"
    # var/cache, home/ann/.cache, tmp (each once: not entered), and three *.log
    assert report["excluded"] == 3 + 2, report
    with Store.open(data) as store:
        assert store_view(store, "vm") == want
    assert report["files"] == sum(1 for v in want.values() if v["type"] == "REG") - 2  # links
    assert report["hardlinks"] == 2 and report["specials"] == (3 if IS_ROOT else 2)

    # an excluded name does not clash with what the destination holds
    clash = run_prism(data, "import", "vm", str(src / "var/log"), "--to", "/var/log")
    assert clash.returncode == 2 and "already exists" in clash.stderr, clash.stderr
    report = prism_json(
        data, "import", "vm", str(src / "var/log"), "--to", "/var/log2", "--exclude", "*.log"
    )
    assert report["files"] == 1 and report["excluded"] == 1


@pytest.mark.parametrize(
    ("pattern", "says"),
    [("/", "names nothing"), ("", "names nothing"), ("a/../b", "'..' cannot name")],
)
def test_an_exclude_pattern_that_names_nothing_is_refused(
    tmp_path: Path, pattern: str, says: str
) -> None:
    data, src = tmp_path / "data", tmp_path / "src"
    src.mkdir()
    prism(data, "vm", "create", "vm")
    proc = run_prism(data, "import", "vm", str(src), "--exclude", pattern)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# -- --one-file-system ----------------------------------------------------------------------


def mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
def test_one_file_system_does_not_enter_a_tmpfs_mounted_inside_the_source(tmp_path: Path) -> None:
    data, src = tmp_path / "data", tmp_path / "root"
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_bytes(b"guest\n")
    (src / "etc/resolv.conf").write_bytes(b"nameserver 10.0.0.1 (hidden under a mount)\n")
    (src / "mnt").mkdir()
    (src / "var").mkdir()
    (src / "var/data").write_bytes(b"on the source's filesystem\n")
    (src / "var mirror").mkdir()  # a bind mount of the same filesystem: the same device
    mounted: list[Path] = []
    try:
        mount("-t", "tmpfs", "-o", "size=16m,mode=0750,uid=1000", "prism-test", str(src / "mnt"))
        mounted.append(src / "mnt")
        (src / "mnt/sub").mkdir()
        (src / "mnt/sub/big").write_bytes(os.urandom(1 << 20))
        (src / "mnt/resolv").write_bytes(b"nameserver 192.0.2.53\n")
        mount("--bind", str(src / "mnt/resolv"), str(src / "etc/resolv.conf"))
        mounted.append(src / "etc/resolv.conf")
        mount("--bind", str(src / "var"), str(src / "var mirror"))
        mounted.append(src / "var mirror")
        mirror = (src / "var mirror").stat()
        assert mirror.st_dev == (src / "etc").stat().st_dev
        tmpfs_root = (src / "mnt").stat()
        prism(data, "vm", "create", "vm")
        prism(data, "vm", "create", "all")

        watch = OpenWatch([src / "mnt", src / "mnt/sub", src / "etc"])
        try:
            dry = prism_json(data, "import", "vm", str(src), "--one-file-system", "--dry-run")
            report = prism_json(data, "import", "vm", str(src), "--one-file-system")
            opened = watch.opened()
        finally:
            watch.close()
        assert opened == {src / "etc"}, "the import entered the tmpfs"
        assert report["mount_points"] == ["/etc/resolv.conf", "/mnt", "/var mirror"], report
        assert report["files"] == 2 and report["dirs"] == 4, report
        assert {k: dry[k] for k in report if k not in ("seconds", "scan_seconds", "dry_run")} == {
            k: report[k] for k in report if k not in ("seconds", "scan_seconds", "dry_run")
        }
        with Store.open(data) as store:
            view = store_view(store, "vm")
        assert sorted(view) == [
            "/",
            "/etc",
            "/etc/hostname",
            "/mnt",
            "/var",
            "/var mirror",
            "/var/data",
        ]
        assert view["/var mirror"]["mtime"] == mirror.st_mtime_ns
        # the mount point, empty, with the mounted root's attributes (as cp -ax makes it)
        assert view["/mnt"] == {
            "type": "DIR",
            "mode": 0o750,
            "uid": 1000,
            "gid": 0,
            "mtime": tmpfs_root.st_mtime_ns,
        }

        # without the option the walk crosses into the mounts, as it always did
        report = prism_json(data, "import", "all", str(src))
        assert report["mount_points"] == [] and report["files"] == 6, report
        with Store.open(data) as store:
            view = store_view(store, "all")
        assert view["/etc/resolv.conf"]["data"] == b"nameserver 192.0.2.53\n"
        assert len(view["/mnt/sub/big"]["data"]) == 1 << 20
        assert view["/var mirror/data"]["data"] == b"on the source's filesystem\n"
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=False, timeout=30)


# -- --dry-run ----------------------------------------------------------------------------

FIGURES = (
    "files",
    "dirs",
    "symlinks",
    "hardlinks",
    "specials",
    "bytes",
    "excluded",
    "mount_points",
    "skipped",
)


def test_dry_run_counts_what_the_import_copies_and_writes_nothing(tmp_path: Path) -> None:
    data, src = tmp_path / "data", tmp_path / "image"
    make_tree(src)
    add_specials(src)
    prism(data, "vm", "create", "vm")
    prism(data, "import", "vm", str(src / "etc"), "--to", "/old")  # a store with content
    prism(data, "snapshot", "create", "vm", "monday")
    before = fingerprint(data)

    dry = prism_json(data, "import", "vm", str(src), "--dry-run", "--exclude", "*.conf")
    assert fingerprint(data) == before
    out = prism(data, "import", "vm", str(src), "--dry-run")
    assert re.fullmatch(
        r"dry run: would import 6 files, 7 directories, 3 symlinks, 2 hard links, "
        rf"{3 if IS_ROOT else 2} special files, \d+\.\d KiB into vm:/ \(scanned in [\d.]+ s; "
        r"nothing was written\)\n",
        out,
    ), out
    # what an import would refuse, a dry run refuses
    clash = run_prism(data, "import", "vm", str(src / "etc"), "--to", "/old", "--dry-run")
    assert clash.returncode == 2 and "already exists" in clash.stderr, clash.stderr
    snap = run_prism(data, "import", "vm@monday", str(src), "--dry-run")
    assert snap.returncode == 2 and "import into a VM" in snap.stderr, snap.stderr
    assert fingerprint(data) == before

    real = prism_json(data, "import", "vm", str(src), "--exclude", "*.conf")
    assert dry["dry_run"] is True and real["dry_run"] is False
    assert {k: dry[k] for k in FIGURES} == {k: real[k] for k in FIGURES}
    # nginx.conf is excluded, so the first of its other two names is a file, the next a link
    assert dry["specials"] == (3 if IS_ROOT else 2) and dry["hardlinks"] == 1
    assert dry["excluded"] == 3 and dry["bytes"] > 300_000
    assert fingerprint(data) != before


def test_an_import_over_the_quota_is_named_by_the_dry_run_and_refused_before_writing(
    tmp_path: Path,
) -> None:
    data, src = tmp_path / "data", tmp_path / "image"
    make_tree(src)
    prism(data, "vm", "create", "vm")
    prism(data, "import", "vm", str(src / "bin"), "--to", "/old")  # the VM holds something
    used = prism_json(data, "vm", "show", "vm")["logical_bytes"]
    assert used == 300_000
    dry = prism_json(data, "import", "vm", str(src), "--dry-run")
    assert dry["over_quota"] is None  # no quota
    needed = dry["charged_bytes"]  # the symlinks' targets count too, a hard link once
    targets = len("nginx/nginx.conf") + len("/etc/shadow") + len("no/such/target")
    assert needed == dry["bytes"] + targets

    # room for every byte, but not for the last directory (/tmp, made once all is written):
    # the store makes no object in a VM at its quota
    prism(data, "vm", "set", "vm", "--quota", str(used + needed))
    before = fingerprint(data)
    dry = prism_json(data, "import", "vm", str(src), "--dry-run")
    message = dry["over_quota"].pop("message")
    assert dry["over_quota"] == {
        "vm": "vm",
        "quota": used + needed,
        "used": used,
        "needed": needed,
        "shortfall": 1,
        "fitting_quota": used + needed + 1,
    }
    out = prism(data, "import", "vm", str(src), "--dry-run").splitlines()
    assert out[0].startswith("dry run: would import") and len(out) == 2, out
    assert out[1] == f"over quota: {message}"
    assert re.fullmatch(
        r"vm uses 293\.0 KiB of its 781\.3 KiB quota and this import needs 488\.4 KiB, 1 B "
        r"more than the quota allows; raise it with `prism vm set vm --quota (\d+K)` or leave "
        r"things out with --exclude PATTERN",
        message,
    ), message
    for extra in ((), ("--json",)):  # the real import: refused before it stages anything
        refused = run_prism(data, "import", "vm", str(src), *extra)
        assert refused.returncode == 2 and refused.stdout == "", refused
        error = refused.stderr.strip()
        assert "\n" not in error and f"{message} (nothing was imported)" in error, error
        if extra:
            assert json.loads(error)["error"] == f"{message} (nothing was imported)"
        assert fingerprint(data) == before
    # without what is made after the last byte (/tmp, /srv/fifo) the bytes fit exactly
    prism(data, "vm", "create", "exact", "--quota", str(needed))
    late = ("--exclude", "/tmp", "--exclude", "fifo")
    fits = prism_json(data, "import", "exact", str(src), *late, "--dry-run")
    assert fits["over_quota"] is None and fits["charged_bytes"] == needed
    prism(data, "vm", "set", "exact", "--quota", str(needed - 1))
    over = prism_json(data, "import", "exact", str(src), *late, "--dry-run")["over_quota"]
    assert over["shortfall"] == 1 and over["fitting_quota"] == needed
    prism(data, "vm", "set", "exact", "--quota", str(needed))
    prism(data, "import", "exact", str(src), *late)
    assert prism_json(data, "vm", "show", "exact")["logical_bytes"] == needed

    # the command it suggests makes room
    suggested = re.search(r"`prism vm set vm --quota (\d+K)`", message)
    assert suggested is not None
    prism(data, "vm", "set", "vm", "--quota", suggested[1])
    assert prism_json(data, "import", "vm", str(src), "--dry-run")["over_quota"] is None
    # the quota the dry run names is exactly enough: the store counts what it counted
    prism(data, "vm", "set", "vm", "--quota", str(used + needed + 1))
    assert prism_json(data, "import", "vm", str(src), "--dry-run")["over_quota"] is None
    report = prism_json(data, "import", "vm", str(src))
    assert report["charged_bytes"] == needed and report["over_quota"] is None
    assert prism_json(data, "vm", "show", "vm")["logical_bytes"] == used + needed


# -- progress -------------------------------------------------------------------------------

SCAN_LINE = re.compile(r"prism import: phase=scan entries=(\d+) bytes=(\d+) elapsed=\d+s")
COPY_LINE = re.compile(
    r"prism import: phase=copy percent=(?P<percent>\d+) bytes=(?P<bytes>\d+)/(?P<total>\d+) "
    r"entries=(?P<entries>\d+)/(?P<entries_total>\d+) elapsed=\d+s "
    r"rate=(?:[\d.]+MB/s|\?) eta=(?P<eta>\d+s|\?)"
)


def wide_tree(root: Path) -> tuple[int, int]:
    """20 directories of 150 small files and one of ten 256 KiB files: (entries, bytes)."""
    for d in range(20):
        sub = root / f"d{d:02}"
        sub.mkdir(parents=True)
        for f in range(150):
            (sub / f"f{f:03}").write_bytes(b"%d/%d " % (d, f) * 50)
    (root / "blobs").mkdir()
    for i in range(10):
        (root / "blobs" / f"b{i}").write_bytes(os.urandom(256 * 1024))
    return 21 + 20 * 150 + 10, sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    data, src = tmp_path / "data", tmp_path / "many"
    entries, total = wide_tree(src)
    prism(data, "vm", "create", "vm")

    proc = run_prism(data, "import", "vm", str(src), "--to", "/a", "--progress-interval", "0.001")
    out = ok(proc)
    assert out.startswith(f"imported {20 * 150 + 10} files, 21 directories")
    assert out.count("\n") == 1  # the summary alone on stdout
    lines = proc.stderr.splitlines()
    scans = [m for m in map(SCAN_LINE.fullmatch, lines) if m]
    copies = [m for m in map(COPY_LINE.fullmatch, lines) if m]
    assert len(scans) + len(copies) == len(lines), [
        line for line in lines if not (SCAN_LINE.fullmatch(line) or COPY_LINE.fullmatch(line))
    ]
    assert scans and len(copies) > 3, proc.stderr[:2000]
    assert all(int(m[1]) <= entries and int(m[2]) <= total for m in scans)
    lines_before_copy = lines.index(copies[0].string)
    assert all(lines.index(m.string) < lines_before_copy for m in scans)  # scan, then copy
    assert {(int(m["total"]), int(m["entries_total"])) for m in copies} == {(total, entries)}
    done = [(int(m["bytes"]), int(m["entries"]), int(m["percent"])) for m in copies]
    assert done == sorted(done) and done[-1][0] <= total
    assert any(m["eta"] != "?" for m in copies)

    # --json: the summary stays one JSON document on stdout; each progress line is JSON
    proc = run_prism(
        data, "import", "vm", str(src), "--to", "/b", "--json", "--progress-interval", "0.001"
    )
    summary = json.loads(ok(proc))
    assert summary["files"] == 20 * 150 + 10 and summary["bytes"] == total
    records = [json.loads(line)["progress"] for line in proc.stderr.splitlines()]
    assert {r["phase"] for r in records} == {"scan", "copy"}
    copy = [r for r in records if r["phase"] == "copy"]
    assert {(r["total_bytes"], r["total_entries"], r["unit"]) for r in copy} == {
        (total, entries, "bytes")
    }
    assert all(0 <= r["percent"] <= 100 and r["elapsed"] >= 0 for r in copy)
    assert any(r["eta"] is not None and r["rate"] > 0 for r in copy)

    # the default interval (10 s) prints nothing for a short import, and 0 never does
    proc = run_prism(data, "import", "vm", str(src / "blobs"), "--to", "/c")
    assert ok(proc) and proc.stderr == ""
    proc = run_prism(data, "import", "vm", str(src), "--to", "/d", "--progress-interval", "0")
    assert ok(proc) and proc.stderr == ""


# -- streaming ------------------------------------------------------------------------------


class Recorder:
    """A `prism.importer.Progress` that keeps what it was told (so the pre-scan runs)."""

    def __init__(self) -> None:
        self.total: ImportReport | None = None
        self.done = 0

    def scanning(self, found: ImportReport) -> None:
        pass

    def importing(self, total: ImportReport) -> None:
        self.total = total

    def advance(self, done: ImportReport) -> None:
        self.done = done.entries

    def close(self) -> None:
        pass


def nested_tree(root: Path, levels: int) -> int:
    """A tree of `levels` levels of 6 directories each holding a small file: how many
    directories. Its listings and depth stay small while the directory count grows."""
    count = 0
    frontier = [root]
    root.mkdir()
    for _ in range(levels):
        nxt = []
        for parent in frontier:
            for i in range(6):
                d = parent / f"d{i}"
                d.mkdir()
                (d / "f").write_bytes(b"x")
                nxt.append(d)
        count += len(nxt)
        frontier = nxt
    return count


def test_import_memory_does_not_grow_with_the_number_of_directories(tmp_path: Path) -> None:
    data = tmp_path / "data"
    small, large = tmp_path / "small", tmp_path / "large"
    n_small, n_large = nested_tree(small, 2), nested_tree(large, 4)  # 42 and 1554 directories
    peaks = {}
    with Store.open(data) as store:
        store.create_namespace("vm")
        for name, src in (("small", small), ("large", large)):
            recorder = Recorder()
            tracemalloc.start()
            try:
                report = import_tree(store, "vm", src, f"/{name}", progress=recorder)
                peaks[name] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert recorder.total is not None and recorder.done == recorder.total.entries
            assert report.dirs == (n_small if name == "small" else n_large)
    # 37 times the directories; keeping each directory until the end (to set its times
    # then) measured 1.2 MB more
    assert peaks["large"] - peaks["small"] < 150_000, peaks
