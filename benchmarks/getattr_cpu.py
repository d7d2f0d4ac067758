"""Server CPU per GETATTR over TCP, for two source trees side by side (a hot-path change).

    python3 benchmarks/getattr_cpu.py [--calls 4000] [--rounds 5] BEFORE_TREE AFTER_TREE

Each round starts `prism serve` from each tree in turn (alternating, so a change of load on
the machine hits both alike; `--metrics` on, as a monitored server runs) through
`tests.server_helpers`, makes `--calls` GETATTRs of a VM's root with the project's client
after a warm-up, and reads the server's user+system CPU from /proc/PID/stat around them.
Prints each run and the medians. A tree is a checkout (e.g. `git archive COMMIT | tar -x -C
DIR`); the client and the data directory's set-up are this tree's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.server_helpers import PrismProcess, new_data_dir

CLK_TCK = os.sysconf("SC_CLK_TCK")
WARM_UP = 500


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run(tree: Path, calls: int) -> tuple[float, float]:
    """(server CPU µs, wall µs) per GETATTR against `prism serve` from `tree`."""
    work = Path(tempfile.mkdtemp(prefix="getattr-cpu-"))
    server = PrismProcess(
        new_data_dir(work / "data"),
        work / "logs",
        extra_args=("--no-vrpc", "--metrics", "127.0.0.1:0"),
        command=(sys.executable, "-P", "-m", "prism"),  # -P: not this tree from the cwd
        env={"PYTHONPATH": str(tree.resolve())},
    )
    with server:
        assert server.proc is not None
        root = server.mount("/vm")
        with server.nfs_client() as c:
            for _ in range(WARM_UP):
                c.getattr(root)
            cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
            for _ in range(calls):
                c.getattr(root)
            cpu1, t1 = cpu_seconds(server.proc.pid), time.perf_counter()
    return (cpu1 - cpu0) / calls * 1e6, (t1 - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cpu: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            us, wall = run(getattr(args, name), args.calls)
            cpu[name].append(us)
            print(f"{name:6} {us:7.1f} µs server CPU per GETATTR ({wall:.0f} µs wall)")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    for name, values in cpu.items():
        print(f"{name:6} median {statistics.median(values):.1f} µs")


if __name__ == "__main__":
    main()
