"""Operator benchmarks (issue: operating Prism), through the commands as operators run them.

    python3 benchmarks/ops_bench.py [--dir DIR] [--files 20000] [--vms 10] [--json OUT]

1. `prism import` of a tree of 20,000 files (files/s and MB/s) against `cp -a` of the same
   tree on the same disk;
2. `prism-clone` time for VMs of 1,000 and 100,000 files (the command's own figure, and the
   whole process as an operator waits for it);
3. `prism stats --json` after importing the same tree into 10 VMs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRISM = [sys.executable, "-m", "prism"]
CLONE = [
    sys.executable,
    "-c",
    "import sys; from prism.cli import clone_main; sys.exit(clone_main())",
]


def make_tree(root: Path, files: int, seed: int = 7) -> int:
    """A source-like tree: 1-32 KiB files (some repeated), 50 per directory."""
    rng = random.Random(seed)
    total = 0
    blobs = [rng.randbytes(rng.randint(1, 32) * 1024) for _ in range(files // 4)]
    for i in range(files):
        d = root / f"dir{i // 2500:02d}" / f"sub{(i // 50) % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        data = blobs[i % len(blobs)] if i % 3 == 0 else rng.randbytes(rng.randint(1, 32) * 1024)
        (d / f"file{i:06d}.dat").write_bytes(data)
        total += len(data)
    return total


def run(cmd: list[str], data: Path) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(
        [*cmd, "--data", str(data)], check=True, capture_output=True, text=True
    ).stdout
    return time.perf_counter() - start, out


def drop_caches() -> None:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--clone-files", type=int, default=100_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prism-ops-", dir=args.dir))
    results: dict[str, object] = {}
    try:
        src = root / "src"
        nbytes = make_tree(src, args.files)
        print(f"tree: {args.files} files, {nbytes / 1e6:.1f} MB", flush=True)

        drop_caches()
        start = time.perf_counter()
        subprocess.run(["cp", "-a", str(src), str(root / "cp-copy")], check=True)
        subprocess.run(["sync"], check=True)
        cp_s = time.perf_counter() - start

        data = root / "data"
        run([*PRISM, "vm", "create", "vm0"], data)
        drop_caches()
        import_s, _ = run([*PRISM, "import", "vm0", str(src)], data)
        results["import"] = {
            "files": args.files,
            "bytes": nbytes,
            "prism_s": round(import_s, 2),
            "prism_files_per_s": round(args.files / import_s),
            "prism_MBps": round(nbytes / import_s / 1e6, 1),
            "cp_a_s": round(cp_s, 2),
            "cp_a_files_per_s": round(args.files / cp_s),
            "ratio_prism_over_cp": round(cp_s / import_s, 3),
        }
        print(f"import: {results['import']}", flush=True)

        for k in range(1, args.vms):
            run([*PRISM, "vm", "create", f"vm{k}"], data)
            run([*PRISM, "import", f"vm{k}", str(src)], data)
        _, stats = run([*PRISM, "stats", "--json"], data)
        results["stats_after_10_imports"] = json.loads(stats)["store"]
        print(f"stats: {results['stats_after_10_imports']}", flush=True)

        clone_rows = []
        big = root / "big"
        make_tree(big, args.clone_files, seed=9)
        small = root / "small"
        make_tree(small, 1000, seed=8)
        for name, tree, count in (("small", small, 1000), ("large", big, args.clone_files)):
            vm_data = root / f"clone-{name}"
            run([*PRISM, "vm", "create", "base"], vm_data)
            run([*PRISM, "import", "base", str(tree)], vm_data)
            files = count
            wall, out = run([*CLONE, "copy", "base", "--json"], vm_data)
            clone_rows.append(
                {
                    "files": files,
                    "clone_ms": round(json.loads(out)["seconds"] * 1000, 2),
                    "command_wall_ms": round(wall * 1000, 1),
                }
            )
            print(f"prism-clone: {clone_rows[-1]}", flush=True)
        results["clone"] = clone_rows
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
