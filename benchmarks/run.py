"""Run the NFS benchmarks side by side: local disk, NFS-Ganesha and Prism.

    bash benchmarks/setup.sh
    python3 benchmarks/run.py --targets local,ganesha,prism --size-mb 256

Each target gets the same workloads (``benchmarks/workloads.py``) on a fresh directory on
the same disk; the servers are started and stopped by this script.  Prints a Markdown table
with Prism/Ganesha and Prism/local ratios and writes a JSON file with every number (client
and server CPU seconds included, to show which side was busy).

For each run the Prism target makes a fresh data dir, runs ``{prism} vm create bench --data
DIR``, then ``{prism} serve --data DIR --bind 127.0.0.1 --nfs-port P --mount-port M
--no-portmap`` (through ``tests.server_helpers.PrismProcess``, as the tests do) and waits
until a libnfs mount of ``/bench`` succeeds (the setup command can be overridden, the serve
command given more arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

sys.path.insert(1, str(REPO))

from ganesha import Ganesha, GaneshaError, child_setup, pick_ports  # noqa: E402
from nfsclient import LIBNFS_SONAME, NfsClient, try_mount  # noqa: E402
from workloads import (  # noqa: E402
    CLIENTS,
    WORKLOADS,
    LocalFs,
    NfsFs,
    Params,
    Result,
    make_blocks,
    make_source_tree,
    suite,
)

from tests.server_helpers import PrismProcess  # noqa: E402

TARGETS = ("local", "ganesha", "prism", "prism-async")
NAMES = {"local": "local", "ganesha": "Ganesha", "prism": "Prism", "prism-async": "Prism --async"}
HOST = "127.0.0.1"
EXPORT = "/bench"
#: (NFS, MOUNT) ports; away from 2049/20048/111 so a Prism dev server can keep those.
DEFAULT_PORTS = {
    "ganesha": (12049, 12048),
    "prism": (22049, 22048),
    "prism-async": (22149, 22148),
}
PRISM_START_TIMEOUT_S = 60.0
PRISM_SETUP = "{prism} vm create bench --data {data}"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class PrismError(RuntimeError):
    """The Prism server could not be prepared or did not answer a mount."""


def log(msg: str) -> None:
    print(msg, flush=True)


def drop_caches() -> bool:
    """sync, then drop the page cache; False when not permitted (containers, non-root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def process_cpu(pid: int) -> Callable[[], float]:
    """A function returning user+system CPU seconds of ``pid`` (all its threads)."""
    path = f"/proc/{pid}/stat"

    def read() -> float:
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    return read


# -- Prism ------------------------------------------------------------------------------


class PrismServer:
    """``prism serve`` as a child process (``tests.server_helpers.PrismProcess``, the one
    launcher the tests use too), ready once ``/bench`` mounts over libnfs."""

    def __init__(
        self,
        prism_cmd: str,
        data_dir: Path,
        workdir: Path,
        *,
        nfs_port: int,
        mount_port: int,
        setup: str,
        serve_args: str,
        timeout: float,
        cpus: set[int] | None = None,
    ) -> None:
        self.subst = {"prism": prism_cmd, "data": shlex.quote(str(data_dir))}
        self.data_dir = data_dir
        self.setup_cmd = setup.format(**self.subst) if setup else ""
        self.timeout = timeout
        self.process = PrismProcess(
            data_dir,
            workdir / "prism-logs",
            nfs_port=nfs_port,
            mount_port=mount_port,
            extra_args=shlex.split(serve_args),
            command=shlex.split(prism_cmd),
            preexec_fn=child_setup(cpus),
            start_timeout=timeout,
        )
        self.serve_cmd = shlex.join(self.process.argv())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.env = env

    @property
    def nfs_port(self) -> int:
        return self.process.nfs_port

    @property
    def mount_port(self) -> int:
        return self.process.mount_port

    def output_tail(self, lines: int = 20) -> str:
        out = self.process.stdout() + self.process.stderr()
        return "\n".join(out.splitlines()[-lines:])

    def start(self) -> None:
        # A fresh store for every run: `vm create` then starts from nothing, as for Ganesha.
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True)
        if self.setup_cmd:
            log(f"  prism setup: {self.setup_cmd}")
            res = subprocess.run(
                self.setup_cmd,
                shell=True,
                cwd=REPO,
                env=self.env,
                capture_output=True,
                text=True,
            )
            if res.returncode != 0:
                raise PrismError(
                    f"`{self.setup_cmd}` failed with status {res.returncode}:\n"
                    f"{(res.stdout + res.stderr).strip()[-2000:]}\n"
                    "(override with --prism-setup, or --prism-setup '' to skip)"
                )
        log(f"  prism serve: {self.serve_cmd}")
        started = time.monotonic()
        try:
            self.process.start()
        except AssertionError as exc:
            raise PrismError(f"`{self.serve_cmd}` did not start: {exc}") from None
        try:
            self._wait_mount(started + self.timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_mount(self, deadline: float) -> None:
        last = "not tried"
        while time.monotonic() < deadline:
            err = try_mount(HOST, EXPORT, self.nfs_port, self.mount_port)
            if err is None:
                return
            last = err
            time.sleep(0.25)
        raise PrismError(
            f"the Prism server did not answer a libnfs mount of {HOST}:{EXPORT} (NFS port"
            f" {self.nfs_port}, MOUNT port {self.mount_port}) within {self.timeout:.0f}s;"
            f" last error: {last}; its output:\n{self.output_tail()}"
        )

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def stop(self) -> None:
        if self.process.proc is not None:
            self.process.stop(check=False)


# -- targets ----------------------------------------------------------------------------


def ports(nfs: int | None, mount: int | None, target: str) -> tuple[int, int]:
    """Ports given on the command line are used as they are; defaults move if taken."""
    if nfs is not None or mount is not None:
        defaults = DEFAULT_PORTS[target]
        return (nfs or defaults[0], mount or defaults[1])
    chosen = pick_ports(DEFAULT_PORTS[target], HOST)
    if chosen != DEFAULT_PORTS[target]:
        log(f"  {target}: default ports {DEFAULT_PORTS[target]} are taken, using {chosen}")
    return chosen


@contextlib.contextmanager
def open_target(
    name: str, args: argparse.Namespace, workdir: Path
) -> Iterator[tuple[Any, Callable[[], float] | None, dict[str, Any]]]:
    """Yields (fs, server_cpu, info) for one target, starting and stopping its server."""
    if name == "local":
        local = workdir / "local"
        info = {"path": str(local), "commit_on_close": args.local_commit_on_close}
        yield LocalFs(local, commit_on_close=args.local_commit_on_close), None, info
        return
    if name == "ganesha":
        nfs_port, mount_port = ports(args.ganesha_nfs_port, args.ganesha_mount_port, "ganesha")
        g = Ganesha(
            workdir / "ganesha-export",
            workdir / "ganesha",
            nfs_port=nfs_port,
            mount_port=mount_port,
            pseudo=EXPORT,
            rpcbind=args.rpcbind,
            cpus=args.server_cpus,
        )
        g.start()
        try:
            assert g.pid is not None
            with NfsClient(HOST, EXPORT, nfs_port=g.nfs_port, mount_port=g.mount_port) as client:
                info = {
                    "read_max": client.read_max,
                    "write_max": client.write_max,
                    "version": ganesha_version(),
                    "nfs_port": g.nfs_port,
                    "mount_port": g.mount_port,
                }
                yield NfsFs(client), process_cpu(g.pid), info
        finally:
            g.stop()
        return
    if name in ("prism", "prism-async"):
        if name == "prism":
            nfs_port, mount_port = ports(args.prism_nfs_port, args.prism_mount_port, name)
        else:
            nfs_port, mount_port = ports(None, None, name)
        p = PrismServer(
            args.prism_cmd,
            workdir / f"{name}-data",
            workdir,
            nfs_port=nfs_port,
            mount_port=mount_port,
            setup=args.prism_setup,
            serve_args=args.prism_serve_args + (" --async" if name == "prism-async" else ""),
            timeout=args.prism_timeout,
            cpus=args.server_cpus,
        )
        p.start()
        try:
            with NfsClient(HOST, EXPORT, nfs_port=p.nfs_port, mount_port=p.mount_port) as client:
                info = {
                    "read_max": client.read_max,
                    "write_max": client.write_max,
                    "serve": p.serve_cmd,
                    "nfs_port": p.nfs_port,
                    "mount_port": p.mount_port,
                }
                yield NfsFs(client), process_cpu(p.pid), info
        finally:
            p.stop()
        return
    raise ValueError(f"unknown target {name!r}")


def ganesha_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["ganesha.nfsd", "-v"], capture_output=True, text=True, timeout=10
        ).stdout
        return out.strip().splitlines()[0].split("=", 1)[-1].strip()
    return "unknown"


# -- report -----------------------------------------------------------------------------


def median_results(runs: list[list[Result]]) -> dict[str, dict[str, Any]]:
    """Per workload: the run with the median value (all runs' values kept)."""
    by_name: dict[str, list[Result]] = {}
    for run in runs:
        for r in run:
            by_name.setdefault(r.name, []).append(r)
    out = {}
    for name, rs in by_name.items():
        med = statistics.median_low(r.value for r in rs)
        chosen = next(r for r in rs if r.value == med)
        row = chosen.to_json()
        row["runs"] = [r.value for r in rs]
        out[name] = row
    return out


def fmt(value: float | None) -> str:
    if value is None:
        return "pending"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not b["value"]:
        return None
    return a["value"] / b["value"]


def markdown_table(
    results: dict[str, dict[str, dict[str, Any]]], params: Params, targets: list[str]
) -> str:
    """One row per workload; a requested target without numbers shows "pending"."""
    shown = [t for t in TARGETS if t in targets or t in results]
    pairs = [
        (a, b)
        for a, b in (
            ("prism", "ganesha"),
            ("prism-async", "ganesha"),
            ("prism", "local"),
            ("ganesha", "local"),
        )
        if a in shown and b in shown
    ]
    cols = ["Workload", "Unit", "Better", *shown]
    cols += [f"{NAMES[a]}/{NAMES[b]}" for a, b in pairs]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    sizes = {
        "seq_write": f"{params.size_mb} MiB",
        "seq_read": f"{params.size_mb} MiB",
        "rand_read": f"N={params.ops}",
        "getattr": f"N={params.ops}",
        "create": f"{params.files} files",
        "stat": f"{params.files} files",
        "readdir": f"{params.files} entries x{params.readdir_repeat}",
        "unlink": f"{params.files} files",
        "create_par": f"{params.files // CLIENTS * CLIENTS} files",
        "unlink_par": f"{params.files // CLIENTS * CLIENTS} files",
        "copy_tree": f"{params.tree_files} files",
    }
    for name, w in WORKLOADS.items():
        rows = {t: results.get(t, {}).get(name) for t in shown}
        better = "higher" if w.higher_is_better else "lower"
        cells = [f"{w.title}, {sizes[name]}", w.unit, better]
        cells += [fmt(r["value"]) if r else "pending" for r in rows.values()]
        for a, b in pairs:
            r = ratio(rows[a], rows[b])
            cells.append(f"{r:.2f}" if r is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--targets",
        default="local,ganesha,prism,prism-async",
        help="comma-separated subset; prism-async is `prism serve --async` (metadata"
        " acknowledged before it is durable, as Ganesha's VFS backend does)",
    )
    ap.add_argument("--size-mb", type=int, default=256, help="sequential file size (MiB)")
    ap.add_argument("--ops", type=int, default=5000, help="random reads / GETATTRs")
    ap.add_argument("--files", type=int, default=5000, help="files for create/stat/unlink")
    ap.add_argument("--readdir-repeat", type=int, default=5, help="listings of the dir")
    ap.add_argument("--tree-files", type=int, default=2000, help="small files to copy")
    ap.add_argument("--repeat", type=int, default=3, help="runs per target; median kept")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--workdir",
        default=None,
        help="parent for the target dirs (default: a new dir under /var/tmp, same disk)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    ap.add_argument(
        "--pin",
        default="none",
        choices=("none", "same", "split"),
        help="CPU placement: none (scheduler), same (client and server on one CPU), split"
        " (client on one CPU, server on the others)",
    )
    ap.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="the CPU for --pin same (and the client's for split); default: the CPU that"
        " takes most of the block devices' interrupts, so fsync waits wake up where they run",
    )
    ap.add_argument("--json", default=None, help="result file (default benchmarks/results/)")
    ap.add_argument(
        "--local-commit-on-close",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fsync written local files on close, like an NFS client's COMMIT",
    )
    ap.add_argument("--ganesha-nfs-port", type=int, default=None, help="default 12049")
    ap.add_argument("--ganesha-mount-port", type=int, default=None, help="default 12048")
    ap.add_argument(
        "--rpcbind",
        default="auto",
        choices=("auto", "stub", "system"),
        help="how Ganesha registers: private stub (no port 111) or a running rpcbind",
    )
    ap.add_argument("--prism-cmd", default=f"{shlex.quote(sys.executable)} -m prism")
    ap.add_argument(
        "--prism-setup", default=PRISM_SETUP, help="run once before serving ('' to skip)"
    )
    ap.add_argument(
        "--prism-serve-args",
        default="",
        metavar="ARGS",
        help="more arguments for `prism serve --data DIR --bind 127.0.0.1 --nfs-port N"
        " --mount-port M --no-portmap` (e.g. '-v')",
    )
    ap.add_argument("--prism-nfs-port", type=int, default=None, help="default 22049")
    ap.add_argument("--prism-mount-port", type=int, default=None, help="default 22048")
    ap.add_argument("--prism-timeout", type=float, default=PRISM_START_TIMEOUT_S)
    args = ap.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    cpus = sorted(os.sched_getaffinity(0))
    args.client_cpus = args.server_cpus = None
    cpu = args.cpu if args.cpu is not None else disk_irq_cpu(cpus)
    if cpu not in cpus:
        ap.error(f"--cpu {cpu}: this process may run on CPUs {cpus} only")
    if args.pin == "same":
        args.client_cpus = args.server_cpus = {cpu}
    elif args.pin == "split":
        if len(cpus) < 2:
            ap.error("--pin split needs at least two CPUs")
        args.client_cpus, args.server_cpus = {cpu}, set(cpus) - {cpu}
    bad = [t for t in args.target_list if t not in TARGETS]
    if bad:
        ap.error(f"unknown target(s) {', '.join(bad)}; choose from {', '.join(TARGETS)}")
    return args


def disk_irq_cpu(cpus: list[int]) -> int:
    """The CPU in `cpus` that has handled the most block-device (virtio-blk, nvme, ahci,
    scsi) interrupts, per /proc/interrupts; the first CPU when that cannot be told."""
    try:
        lines = Path("/proc/interrupts").read_text().splitlines()
    except OSError:
        return cpus[0]
    if not lines:
        return cpus[0]
    ncpu = len(lines[0].split())
    totals = [0] * ncpu
    for line in lines[1:]:
        fields = line.split()
        if not re.search(r"virtio\d+-req|nvme|ahci|scsi|ata_piix", line):
            continue
        for i, count in enumerate(fields[1 : 1 + ncpu]):
            if count.isdigit():
                totals[i] += int(count)
    best = max(cpus, key=lambda c: totals[c] if c < ncpu else -1)
    return best if best < ncpu and totals[best] > 0 else cpus[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = Params(
        size_mb=args.size_mb,
        ops=args.ops,
        files=args.files,
        readdir_repeat=args.readdir_repeat,
        tree_files=args.tree_files,
        seed=args.seed,
    )
    base = Path(args.workdir) if args.workdir else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="prism-bench-", dir=base))
    log(f"work dir {workdir}; libnfs {LIBNFS_SONAME}; targets {', '.join(args.target_list)}")
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
        log(f"pinned: client on CPUs {args.client_cpus}, servers on {args.server_cpus}")
    started = dt.datetime.now(dt.UTC)
    can_drop = drop_caches()
    if not can_drop:
        log("note: cannot write /proc/sys/vm/drop_caches; reads after writes may be cached")
    log(f"preparing {params.size_mb} MiB of random data and {params.tree_files} source files")
    blocks = make_blocks(params.size_mb, params.seed)
    source_tree = workdir / "source-tree"
    tree_files = make_source_tree(source_tree, params.tree_files, params.seed)

    results: dict[str, dict[str, dict[str, Any]]] = {}
    infos: dict[str, Any] = {}
    errors: dict[str, str] = {}
    try:
        for target in args.target_list:
            runs = []
            try:
                for i in range(args.repeat):
                    log(f"[{target}] run {i + 1}/{args.repeat}")
                    drop_caches()
                    with open_target(target, args, workdir) as (fs, server_cpu, info):
                        infos[target] = info
                        runs.append(
                            suite(
                                fs,
                                params,
                                blocks=blocks,
                                source_tree=source_tree,
                                tree_files=tree_files,
                                drop_caches=drop_caches,
                                server_cpu=server_cpu,
                                log=log,
                            )
                        )
            except (GaneshaError, PrismError, OSError, RuntimeError) as exc:
                errors[target] = str(exc)
                log(f"[{target}] FAILED: {exc}")
            if runs:
                results[target] = median_results(runs)
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = markdown_table(results, params, args.target_list)
    print()
    print(table)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "host": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "libnfs": LIBNFS_SONAME,
        },
        "params": dataclasses.asdict(params),
        "drop_caches": can_drop,
        "pin": args.pin,
        "targets": infos,
        "errors": errors,
        "results": results,
        "markdown": table,
    }
    if args.json:
        out = Path(args.json)
    else:
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        out = HERE / "results" / f"bench-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"\nwrote {out}")
    for target, err in errors.items():
        log(f"{target} failed: {err.splitlines()[0]}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
