"""Benchmark workloads, run identically against a local directory or an NFS export.

Theory of operation
-------------------
A workload sees only the small ``Fs`` protocol below: paths are absolute inside the target
("/seq.dat").  ``LocalFs`` maps them onto a directory with plain ``os`` calls (the upper
limit: what the disk and page cache give without any network or server); ``NfsFs`` sends
them through libnfs (``benchmarks/nfsclient.py``) to Ganesha or Prism.  The same code, the
same data (seeded random, so nothing deduplicates) and the same order run on every target.

libnfs 4.0 resolves every path from the export root (no dentry cache) and sends, per call
(counted on the wire against Ganesha):

  creat("/m00001") + close      GETATTR(root), CREATE, LOOKUP
  creat("/tree/d07/f1") + write + close
                                LOOKUP x2, CREATE, LOOKUP, WRITE (UNSTABLE), COMMIT
  stat("/m00001")               LOOKUP, GETATTR
  unlink("/m00001")             GETATTR(root), REMOVE
  fstat(open file)              GETATTR
  1 MiB pwrite / pread          one WRITE (UNSTABLE) / READ of 1 MiB (rtmax/wtmax = 1 MiB)
  fsync, or close after writes  COMMIT

The metadata rows work at the export root to keep LOOKUPs out of them.

Each workload returns ``Result`` rows.  ``suite()`` runs them in order:

  seq_write   create /seq.dat, SIZE MiB in 1 MiB pwrites, fsync, close      MiB/s
  (sync + drop page caches, if permitted)
  seq_read    read /seq.dat sequentially in 1 MiB preads                     MiB/s
  rand_read   N 4 KiB preads at random 4 KiB-aligned offsets (warm cache)    ops/s
  getattr     N fstat calls on one open file                                 us/op
  create      F empty files at the root (create + close)                     ops/s
  stat        stat each of them by path                                      ops/s
  readdir     list the root (F entries) R times                              entries/s
  unlink      remove the F files                                             ops/s
  create_par  create F files at the root from C clients at once               ops/s
  unlink_par  remove them, C clients at once                                  ops/s
              (C = CLIENTS forked processes, each with its own connection and
              mount, like C guests of one server; each works on its own names)
  copy_tree   copy a local tree of T small files (1-16 KiB) into /tree       files/s
              (source read from a warm page cache; each file committed on close)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import re
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nfsclient import NfsClient

MIB = 1024 * 1024
IO_SIZE = MIB
RAND_IO_SIZE = 4096
SEQ_FILE = "/seq.dat"
TREE_DIR = "/tree"
META_PREFIX = "/m"
PAR_PREFIX = "/c"
CLIENTS = 8
TREE_DIRS = 20
TREE_MIN_SIZE = 1024
TREE_MAX_SIZE = 16 * 1024


# -- targets ------------------------------------------------------------------------------


class File(Protocol):
    def pwrite(self, data: Any, offset: int) -> int: ...
    def pread_into(self, buf: Any, offset: int) -> int: ...
    def fsync(self) -> None: ...
    def fstat(self) -> Any: ...
    def close(self) -> None: ...


class Fs(Protocol):
    """What a workload may do to a target.  Paths are absolute within the target."""

    def create(self, path: str) -> File: ...
    def open_read(self, path: str) -> File: ...
    def stat(self, path: str) -> Any: ...
    def mkdir(self, path: str) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def listdir(self, path: str) -> list[str]: ...
    def is_dir(self, path: str) -> bool: ...
    def another(self) -> Fs:
        """An independent client of the same target (its own connection), for concurrency."""
        ...


class LocalFile:
    """An fd; with ``commit_on_close`` a written file is fsync'd on close, as NFS does."""

    __slots__ = ("commit_on_close", "dirty", "fd")

    def __init__(self, fd: int, commit_on_close: bool) -> None:
        self.fd = fd
        self.commit_on_close = commit_on_close
        self.dirty = False

    def pwrite(self, data: Any, offset: int) -> int:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.dirty = True
        return done

    def pread_into(self, buf: Any, offset: int) -> int:
        return os.preadv(self.fd, [buf], offset)

    def fsync(self) -> None:
        os.fsync(self.fd)
        self.dirty = False

    def fstat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def close(self) -> None:
        if self.dirty and self.commit_on_close:
            os.fsync(self.fd)
        os.close(self.fd)


class LocalFs:
    """Plain file I/O on a local directory: the limit the NFS targets are measured against.

    NFS clients flush and COMMIT a written file when it is closed (libnfs 4.0 sends COMMIT
    from ``nfs_close``, as the kernel client does for close-to-open consistency), so the
    server makes it durable.  ``commit_on_close`` (default) gives the local target the same
    durability with an fsync on close; without it, copy_tree is ``cp -r`` into page cache.
    """

    def __init__(self, root: Path | str, *, commit_on_close: bool = True) -> None:
        self.root = str(Path(root).resolve())
        self.commit_on_close = commit_on_close
        os.makedirs(self.root, exist_ok=True)

    def _p(self, path: str) -> str:
        return self.root + path

    def create(self, path: str) -> File:
        fd = os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        return LocalFile(fd, self.commit_on_close)

    def open_read(self, path: str) -> File:
        return LocalFile(os.open(self._p(path), os.O_RDONLY), False)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(self._p(path))

    def mkdir(self, path: str) -> None:
        os.mkdir(self._p(path), 0o755)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self._p(path))

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(self._p(path))

    def another(self) -> LocalFs:
        return LocalFs(self.root, commit_on_close=self.commit_on_close)


class NfsFs:
    """The same operations through libnfs against an NFSv3 server."""

    def __init__(self, client: NfsClient) -> None:
        self.client = client

    def create(self, path: str) -> File:
        return self.client.creat(path, 0o644)

    def open_read(self, path: str) -> File:
        return self.client.open(path, os.O_RDONLY)

    def stat(self, path: str) -> Any:
        return self.client.stat(path)

    def mkdir(self, path: str) -> None:
        self.client.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        self.client.rmdir(path)

    def unlink(self, path: str) -> None:
        self.client.unlink(path)

    def listdir(self, path: str) -> list[str]:
        return self.client.listdir(path)

    def is_dir(self, path: str) -> bool:
        try:
            return (self.client.stat(path).mode & 0o170000) == 0o040000
        except FileNotFoundError:
            return False

    def another(self) -> NfsFs:
        return NfsFs(self.client.connect_again())


def remove_tree(fs: Fs, path: str) -> None:
    """rm -r through the target (used for cleanup, never timed)."""
    for name in fs.listdir(path):
        child = f"{path.rstrip('/')}/{name}"
        if fs.is_dir(child):
            remove_tree(fs, child)
        else:
            fs.unlink(child)
    if path != "/":
        fs.rmdir(path)


def clean_root(fs: Fs) -> None:
    """Remove everything the suite may have left at the target's root."""
    for name in fs.listdir("/"):
        path = "/" + name
        if (
            name == SEQ_FILE[1:]
            or re.fullmatch(META_PREFIX[1:] + r"\d{5}", name)
            or re.fullmatch(PAR_PREFIX[1:] + r"\d+-\d{5}", name)
        ):
            fs.unlink(path)
        elif path == TREE_DIR:
            remove_tree(fs, path)


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    """One measured row: ``value`` in ``unit``; ``higher_is_better`` tells how to read it."""

    name: str
    unit: str
    value: float
    higher_is_better: bool
    seconds: float
    ops: int
    nbytes: int = 0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Workload:
    """A row of the report: what it measures, its unit and which direction is better."""

    title: str
    unit: str
    higher_is_better: bool = True


#: Row order of the report (also used by run.py and the README).
WORKLOADS: dict[str, Workload] = {
    "seq_write": Workload("Sequential write (1 MiB pwrites + fsync)", "MiB/s"),
    "seq_read": Workload("Sequential read (1 MiB preads, cold cache)", "MiB/s"),
    "rand_read": Workload("Random 4 KiB reads (warm cache)", "ops/s"),
    "getattr": Workload("GETATTR latency (fstat on open file)", "us/op", False),
    "create": Workload("Create empty files", "ops/s"),
    "stat": Workload("Stat files by path (LOOKUP + GETATTR)", "ops/s"),
    "readdir": Workload("Readdir (entries listed)", "entries/s"),
    "unlink": Workload("Unlink files", "ops/s"),
    "create_par": Workload(f"Create empty files, {CLIENTS} clients at once", "ops/s"),
    "unlink_par": Workload(f"Unlink files, {CLIENTS} clients at once", "ops/s"),
    "copy_tree": Workload("Copy tree of small files (1-16 KiB)", "files/s"),
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall clock, this process's CPU (plus that of the client processes it reaps), and
    optionally a server process's CPU."""

    def __init__(self, server_cpu: Callable[[], float] | None) -> None:
        self._server_cpu = server_cpu

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        s0 = self._server_cpu() if self._server_cpu else 0.0
        c0 = time.process_time() + _children_cpu()
        t0 = time.perf_counter()
        yield out
        out["seconds"] = time.perf_counter() - t0
        out["client_cpu_s"] = time.process_time() + _children_cpu() - c0
        if self._server_cpu:
            out["server_cpu_s"] = self._server_cpu() - s0


def _row(
    name: str,
    m: dict[str, float],
    ops: int,
    *,
    nbytes: int = 0,
    extra: dict[str, float] | None = None,
) -> Result:
    secs = m["seconds"]
    unit = WORKLOADS[name].unit
    if unit == "MiB/s":
        value = nbytes / MIB / secs
    elif unit == "us/op":
        value = secs / ops * 1e6
    else:
        value = ops / secs
    return Result(
        name=name,
        unit=unit,
        value=value,
        higher_is_better=WORKLOADS[name].higher_is_better,
        seconds=secs,
        ops=ops,
        nbytes=nbytes,
        client_cpu_s=m["client_cpu_s"],
        server_cpu_s=m.get("server_cpu_s"),
        extra=extra or {},
    )


# -- data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    size_mb: int = 256
    ops: int = 5000
    files: int = 5000
    readdir_repeat: int = 5
    tree_files: int = 2000
    seed: int = 1


def make_blocks(size_mb: int, seed: int) -> list[bytes]:
    """``size_mb`` distinct 1 MiB random blocks (nothing for a dedup store to share)."""
    rng = random.Random(seed)
    return [rng.randbytes(IO_SIZE) for _ in range(size_mb)]


def make_source_tree(root: Path, nfiles: int, seed: int) -> list[tuple[str, int]]:
    """Write the local source tree once; returns (relative path, size) in copy order."""
    rng = random.Random(seed ^ 0x7EE)
    files = []
    for i in range(nfiles):
        rel = f"d{i % TREE_DIRS:02d}/f{i:05d}.bin"
        files.append((rel, rng.randint(TREE_MIN_SIZE, TREE_MAX_SIZE)))
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == f"{nfiles} {seed}":
        return files
    for d in range(TREE_DIRS):
        (root / f"d{d:02d}").mkdir(parents=True, exist_ok=True)
    for rel, size in files:
        (root / rel).write_bytes(rng.randbytes(size))
    marker.write_text(f"{nfiles} {seed}")
    return files


def warm_source_tree(root: Path, files: list[tuple[str, int]]) -> None:
    """Read the source tree once so that copy_tree times the target, not the source disk."""
    for rel, _size in files:
        with open(root / rel, "rb") as fh:
            fh.read()


# -- workloads ----------------------------------------------------------------------------


def seq_write(fs: Fs, meter: Meter, blocks: list[bytes]) -> Result:
    with meter.measure() as m:
        f = fs.create(SEQ_FILE)
        off = 0
        for block in blocks:
            f.pwrite(block, off)
            off += len(block)
        f.fsync()
        f.close()
    return _row("seq_write", m, len(blocks), nbytes=off)


def seq_read(fs: Fs, meter: Meter, expect: int) -> Result:
    buf = memoryview(bytearray(IO_SIZE))
    with meter.measure() as m:
        f = fs.open_read(SEQ_FILE)
        off = 0
        calls = 0
        while True:
            n = f.pread_into(buf, off)
            calls += 1
            if n <= 0:
                break
            off += n
        f.close()
    if off != expect:
        raise RuntimeError(f"seq_read: read {off} bytes, expected {expect}")
    return _row("seq_read", m, calls, nbytes=off)


def rand_read(fs: Fs, meter: Meter, size: int, n: int, seed: int) -> Result:
    rng = random.Random(seed)
    pages = size // RAND_IO_SIZE
    offsets = [rng.randrange(pages) * RAND_IO_SIZE for _ in range(n)]
    buf = memoryview(bytearray(RAND_IO_SIZE))
    f = fs.open_read(SEQ_FILE)
    try:
        with meter.measure() as m:
            for off in offsets:
                if f.pread_into(buf, off) != RAND_IO_SIZE:
                    raise RuntimeError(f"rand_read: short read at {off}")
    finally:
        f.close()
    return _row("rand_read", m, n, nbytes=n * RAND_IO_SIZE)


def getattr_latency(fs: Fs, meter: Meter, n: int) -> Result:
    f = fs.open_read(SEQ_FILE)
    try:
        fstat = f.fstat
        with meter.measure() as m:
            for _ in range(n):
                fstat()
    finally:
        f.close()
    return _row("getattr", m, n)


def _meta_names(nfiles: int) -> list[str]:
    return [f"{META_PREFIX}{i:05d}" for i in range(nfiles)]


def metadata(fs: Fs, meter: Meter, nfiles: int, readdir_repeat: int) -> list[Result]:
    names = _meta_names(nfiles)
    out = []
    with meter.measure() as m:
        for p in names:
            fs.create(p).close()
    out.append(_row("create", m, nfiles))
    with meter.measure() as m:
        for p in names:
            fs.stat(p)
    out.append(_row("stat", m, nfiles))
    entries = 0
    with meter.measure() as m:
        for _ in range(readdir_repeat):
            entries += len(fs.listdir("/"))
    if entries < nfiles * readdir_repeat:
        raise RuntimeError(f"readdir: saw {entries} entries, expected >= {nfiles} per listing")
    out.append(_row("readdir", m, entries, extra={"listings": readdir_repeat}))
    with meter.measure() as m:
        for p in names:
            fs.unlink(p)
    out.append(_row("unlink", m, nfiles))
    return out


def _create_files(fs: Fs, names: list[str]) -> None:
    for p in names:
        fs.create(p).close()


def _unlink_files(fs: Fs, names: list[str]) -> None:
    for p in names:
        fs.unlink(p)


def _client_process(
    fs: Fs, work: Callable[[Fs, list[str]], None], names: list[str], start: Any
) -> None:
    """One concurrent client: connect on its own, wait for the others, then work."""
    mine = fs.another()
    start.wait()
    work(mine, names)


def _concurrently(
    name: str,
    fs: Fs,
    meter: Meter,
    work: Callable[[Fs, list[str]], None],
    shares: list[list[str]],
) -> Result:
    """Time `work` run by one forked client process per share of names, all at once (the
    clock starts when every client has connected)."""
    ctx = multiprocessing.get_context("fork")  # the target's Fs is not picklable
    start = ctx.Barrier(len(shares) + 1, timeout=120)
    procs = [
        ctx.Process(target=_client_process, args=(fs, work, names, start), daemon=True)
        for names in shares
    ]
    for proc in procs:
        proc.start()
    try:
        start.wait()
        with meter.measure() as m:
            for proc in procs:
                proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} client processes failed (exit {failed})")
    return _row(name, m, sum(map(len, shares)), extra={"clients": len(shares)})


def concurrent_metadata(fs: Fs, meter: Meter, nfiles: int, clients: int) -> list[Result]:
    """Create, then unlink, `nfiles` files at the root from `clients` processes at once."""
    per = nfiles // clients
    shares = [[f"{PAR_PREFIX}{k}-{i:05d}" for i in range(per)] for k in range(clients)]
    return [
        _concurrently("create_par", fs, meter, _create_files, shares),
        _concurrently("unlink_par", fs, meter, _unlink_files, shares),
    ]


def copy_tree(fs: Fs, meter: Meter, src: Path, files: list[tuple[str, int]]) -> Result:
    dirs = sorted({rel.split("/")[0] for rel, _ in files})
    total = 0
    with meter.measure() as m:
        fs.mkdir(TREE_DIR)
        for d in dirs:
            fs.mkdir(f"{TREE_DIR}/{d}")
        for rel, _size in files:
            with open(src / rel, "rb") as fh:
                data = fh.read()
            f = fs.create(f"{TREE_DIR}/{rel}")
            f.pwrite(data, 0)
            f.close()
            total += len(data)
    return _row(
        "copy_tree",
        m,
        len(files),
        nbytes=total,
        extra={"MiB/s": total / MIB / m["seconds"]},
    )


def suite(
    fs: Fs,
    params: Params,
    *,
    blocks: list[bytes],
    source_tree: Path,
    tree_files: list[tuple[str, int]],
    drop_caches: Callable[[], bool],
    server_cpu: Callable[[], float] | None = None,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Run every workload once, in order, on a clean target; leaves the target clean."""
    meter = Meter(server_cpu)
    clean_root(fs)
    size = len(blocks) * IO_SIZE
    results = []

    def done(r: Result) -> None:
        results.append(r)
        log(f"    {r.name:<10} {r.value:>12,.1f} {r.unit:<6} ({r.seconds:.3f} s)")

    done(seq_write(fs, meter, blocks))
    drop_caches()
    done(seq_read(fs, meter, size))
    done(rand_read(fs, meter, size, params.ops, params.seed))
    done(getattr_latency(fs, meter, params.ops))
    fs.unlink(SEQ_FILE)
    os.sync()  # let the filesystem finish freeing (and discarding) the big file first
    for r in metadata(fs, meter, params.files, params.readdir_repeat):
        done(r)
    for r in concurrent_metadata(fs, meter, params.files, CLIENTS):
        done(r)
    warm_source_tree(source_tree, tree_files)
    os.sync()
    done(copy_tree(fs, meter, source_tree, tree_files))
    remove_tree(fs, TREE_DIR)
    return results
