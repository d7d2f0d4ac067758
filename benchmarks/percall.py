"""Server CPU per NFS call over TCP, by call kind, for one or more source trees.

    python3 benchmarks/percall.py [--calls 4000] [--rounds 3] [--kinds getattr,read4k]
                                  [--profile DIR] [TREE | NAME=TREE ...]

Each round starts `prism serve` from each tree in turn (alternating, so a change of load on
the machine hits every tree alike; `--no-vrpc`, `--metrics` on, as a monitored server runs)
through `tests.server_helpers`, and for each call kind makes a warm-up and then `--calls`
calls (CREATE+REMOVE: a quarter as many pairs) with the project's client from this process,
one at a time, reading the server's user+system CPU from /proc/PID/stat around them. The
server's CPU is far steadier than wall time on a shared machine. Prints each run and, per
kind and tree, the median over the rounds in µs per call (a CREATE+REMOVE pair counts as
one call). A tree is a checkout (e.g. `git archive COMMIT | tar -x -C DIR`); the default is
this one. The client and the data directory's set-up are this tree's.

Kinds: null, getattr (a VM's root), lookup (a file in it), read4k (aligned 4 KiB reads
cycling over a 1 MiB file), write4k (UNSTABLE 4 KiB writes cycling over a 1 MiB file),
create_remove (CREATE then REMOVE of a new name in the root).

`--profile DIR` runs the server under cProfile instead (one round, the first tree, the CPU
figures inflated by the profiler) and writes DIR/serve.prof and DIR/summary.txt (the top
functions by own time): give it one kind to see where that call's time goes.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prism.nfs.client import NfsClient
from prism.nfs.const import StableHow
from prism.nfs.wire import NfsFh3
from tests.server_helpers import PrismProcess, new_data_dir

CLK_TCK = os.sysconf("SC_CLK_TCK")
WARM_UP = 300
FILE_SIZE = 1 << 20
BLOCK = 4096
KINDS = ("null", "getattr", "lookup", "read4k", "write4k", "create_remove")
PAIR_SHARE = 4
"""create_remove makes calls // PAIR_SHARE pairs (each pair waits for two journal syncs)."""


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


PROFILED = """
import cProfile, runpy, sys, time
out = sys.argv.pop(1)
sys.argv[0] = "prism"
profiler = cProfile.Profile(time.process_time)
profiler.enable()
try:
    runpy.run_module("prism", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""
"""`python -c PROFILED OUT serve ...`: `prism serve` under cProfile timed by this process's
CPU clock (cProfile's default wall clock would count the time the server is preempted by
the client it just woke, inside its socket send)."""


def workload(kind: str, c: NfsClient, root: NfsFh3) -> tuple[Callable[[int], object], int]:
    """(one call of `kind`, given its sequence number; how many calls make a run's unit)."""
    if kind == "null":
        return lambda i: c.null(), 1
    if kind == "getattr":
        return lambda i: c.getattr(root), 1
    if kind == "lookup":
        c.create(root, "looked-up")
        return lambda i: c.lookup(root, "looked-up"), 1
    blocks = FILE_SIZE // BLOCK
    if kind == "read4k":
        fh = c.create(root, "read").obj
        assert fh is not None
        c.write_all(fh, os.urandom(FILE_SIZE))
        return lambda i: c.read(fh, (i * 7 % blocks) * BLOCK, BLOCK), 1
    if kind == "write4k":
        fh = c.create(root, "write").obj
        assert fh is not None
        data = os.urandom(BLOCK)
        return lambda i: c.write(fh, (i * 7 % blocks) * BLOCK, data, StableHow.UNSTABLE), 1
    if kind == "create_remove":

        def pair(i: int) -> None:
            c.create(root, f"n{i}")
            c.remove(root, f"n{i}")

        return pair, PAIR_SHARE
    raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")


def run(tree: Path, kinds: list[str], calls: int, profile: Path | None) -> dict[str, float]:
    """Server CPU µs per call of each kind against `prism serve` from `tree`."""
    work = Path(tempfile.mkdtemp(prefix="percall-"))
    command: tuple[str, ...] = (sys.executable, "-P", "-m", "prism")  # -P: not the cwd's tree
    if profile is not None:
        command = (sys.executable, "-P", "-c", PROFILED, str(work / "serve.prof"))
    server = PrismProcess(
        new_data_dir(work / "data"),
        work / "logs",
        extra_args=("--no-vrpc", "--metrics", "127.0.0.1:0"),
        command=command,
        env={"PYTHONPATH": str(tree.resolve())},
    )
    out: dict[str, float] = {}
    with server:
        assert server.proc is not None
        pid = server.proc.pid
        root = server.mount("/vm")
        with server.nfs_client() as c:
            for kind in kinds:
                one, share = workload(kind, c, root)
                n = max(1, calls // share)
                for i in range(WARM_UP // share):
                    one(-1 - i)
                cpu0, t0 = cpu_seconds(pid), time.perf_counter()
                for i in range(n):
                    one(i)
                cpu1, t1 = cpu_seconds(pid), time.perf_counter()
                user, system = ((b - a) / n * 1e6 for a, b in zip(cpu0, cpu1, strict=True))
                out[kind] = user + system
                wall = (t1 - t0) / n * 1e6
                print(
                    f"  {kind:14} {out[kind]:7.1f} µs server CPU "
                    f"(user {user:.0f}, system {system:.0f}; {wall:.0f} µs wall)"
                )
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        stats = pstats.Stats(str(work / "serve.prof"), stream=text)
        stats.dump_stats(str(profile / "serve.prof"))
        stats.sort_stats("tottime").print_stats(40)
        (profile / "summary.txt").write_text(text.getvalue())
        print(f"profile: {profile / 'serve.prof'} (summary in {profile / 'summary.txt'})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trees", nargs="*", help="TREE or NAME=TREE (default: this tree)")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--profile", type=Path, help="run under cProfile, write profiles here")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    trees: dict[str, Path] = {}
    for spec in args.trees or [str(Path(__file__).resolve().parent.parent)]:
        name, _, path = spec.rpartition("=")
        trees[name or path] = Path(path)
    if args.profile is not None:
        (name, tree), *_ = trees.items()
        run(tree, kinds, args.calls, args.profile)
        return
    cpu: dict[str, dict[str, list[float]]] = {t: {k: [] for k in kinds} for t in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            print(f"round {r + 1}, {name}:")
            for kind, us in run(tree, kinds, args.calls, None).items():
                cpu[name][kind].append(us)
    print(f"load average: {os.getloadavg()[0]:.1f}")
    print("median server CPU µs per call: " + " | ".join(trees))
    for kind in kinds:
        cells = " | ".join(f"{statistics.median(cpu[t][kind]):7.1f}" for t in trees)
        print(f"{kind:14} {cells}")


if __name__ == "__main__":
    main()
