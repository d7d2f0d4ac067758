"""Store benchmarks (issue: the Prism store), reported as figures and ratios.

    python3 benchmarks/store_bench.py [--dir DIR] [--quick] [--json OUT]

1. clone time of trees of 1,000, 10,000 and 100,000 files (goal: flat, < 50 ms at 100,000);
2. stored bytes after the same 256 MiB tree is written into 10 namespaces independently
   (goal: about one copy);
3. storage added and time taken by a 4 KiB write into a shared 1 GiB file;
4. raw write and read throughput through the store API against the same bytes written and
   read with plain file I/O on the same disk (goals: write >= 0.7x, read >= 0.9x);
5. the metadata operations whose cost grows with the directories above them (each adds
   to its ancestors' recursive statistics): a 4 KiB extending write, a create and a rename
   across directories at depth 8, in microseconds per operation (elapsed and CPU), as the
   server runs them (journal, a durable point per call, a checkpoint every 100 calls) and in
   one batch.
Every phase runs on the same disk, in the same process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prism.store import CloneSource, Store
from prism.store.types import ObjectId

MiB = 1 << 20


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_tree(store: Store, name: str, files: int, per_dir: int = 1000) -> None:
    info = store.create_namespace(name)
    store.begin_batch()
    d: ObjectId | None = None
    for i in range(files):
        if i % per_dir == 0:
            d = store.mkdir(info.root, f"d{i // per_dir:05d}".encode()).oid
            store.commit()
            store.begin_batch()
        assert d is not None
        f = store.create(d, f"f{i:07d}".encode())
        store.write(f.oid, 0, f"file {i}\n".encode())
    store.commit()


def bench_clone(root: Path, sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        path = root / f"clone-{n}"
        with Store.open(path) as store:
            t0 = time.perf_counter()
            make_tree(store, "src", n)
            build = time.perf_counter() - t0
            times = []
            for k in range(5):
                t0 = time.perf_counter()
                store.clone(f"c{k}", [CloneSource("src")])
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            store.clone("sub", [CloneSource("src", path="/d00000", dest="/x")])
            subtree = time.perf_counter() - t0
        rows.append(
            {
                "files": n,
                "build_s": round(build, 2),
                "clone_ms_median": round(sorted(times)[2] * 1000, 2),
                "clone_ms_max": round(max(times) * 1000, 2),
                "subtree_clone_ms": round(subtree * 1000, 2),
            }
        )
        print(f"  clone {n:>7} files: median {rows[-1]['clone_ms_median']} ms", flush=True)
        shutil.rmtree(path)
    return rows


def tree_content(total: int, files: int) -> list[bytes]:
    size = total // files
    rnd = os.urandom(size + files)
    return [rnd[i : i + size] for i in range(files)]


def bench_dedup(root: Path, total: int, copies: int) -> dict:
    contents = tree_content(total, 64)
    path = root / "dedup"
    with Store.open(path) as store:
        t0 = time.perf_counter()
        for k in range(copies):
            info = store.create_namespace(f"vm{k}")
            store.begin_batch()
            d = store.mkdir(info.root, b"data").oid
            for i, data in enumerate(contents):
                f = store.create(d, f"file{i:03d}".encode())
                for off in range(0, len(data), MiB):
                    store.write(f.oid, off, data[off : off + MiB])
            store.commit()
        elapsed = time.perf_counter() - t0
        st = store.stats()
    shutil.rmtree(path)
    row = {
        "tree_bytes": total,
        "namespaces": copies,
        "logical_bytes": st.logical_bytes,
        "stored_bytes": st.stored_bytes,
        "copies_stored": round(st.stored_bytes / total, 3),
        "dedup_ratio": round(st.dedup_ratio, 2),
        "write_MBps": round(total * copies / elapsed / 1e6, 1),
    }
    print(f"  dedup: {row}", flush=True)
    return row


def bench_cow(root: Path, size: int) -> dict:
    path = root / "cow"
    with Store.open(path) as store:
        info = store.create_namespace("base")
        f = store.create(info.root, b"disk.img")
        store.begin_batch()
        block = os.urandom(MiB)
        for off in range(0, size, MiB):
            store.write(f.oid, off, block[:16] + off.to_bytes(8, "big") + block[24:])
        store.commit()
        clone = store.clone("vm", [CloneSource("base")])
        target = store.resolve(clone.id, "/disk.img").oid
        before = store.stats().stored_bytes
        t0 = time.perf_counter()
        store.write(target, size // 2 + 12345, os.urandom(4096))
        elapsed = time.perf_counter() - t0
        added = store.stats().stored_bytes - before
        same = (
            store.read(f.oid, size // 2 + 12345, 4096)[0]
            != store.read(target, size // 2 + 12345, 4096)[0]
        )
    shutil.rmtree(path)
    row = {
        "file_bytes": size,
        "write_bytes": 4096,
        "stored_bytes_added": added,
        "durable_write_ms": round(elapsed * 1000, 3),
        "source_unchanged": same,
    }
    print(f"  cow: {row}", flush=True)
    return row


def _plain_write(path: Path, data: list[bytes]) -> float:
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for block in data:
            f.write(block)
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def _plain_read(path: Path) -> float:
    drop_caches()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass
    return time.perf_counter() - t0


def _store_write(path: Path, data: list[bytes]) -> tuple[float, Store, ObjectId]:
    store = Store.open(path)
    info = store.create_namespace("tp")
    oid = store.create(info.root, b"big").oid
    t0 = time.perf_counter()
    store.begin_batch()  # one durability point at the end, as the plain file's one fsync
    for i, block in enumerate(data):
        store.write(oid, i * MiB, block)
    store.commit()
    return time.perf_counter() - t0, store, oid


def _store_read(store: Store, oid: ObjectId, blocks: int) -> float:
    drop_caches()
    t0 = time.perf_counter()
    for i in range(blocks):
        store.read(oid, i * MiB, MiB)
    return time.perf_counter() - t0


def bench_throughput(root: Path, total: int, rounds: int = 3) -> dict:
    """Plain file I/O and the store, alternately, `rounds` times each; medians.

    On this VM the first touch of fresh page-cache memory is several times slower than later
    ones, so a warm-up write runs first and the two sides alternate.
    """
    data = [os.urandom(MiB) for _ in range(total // MiB)]
    _plain_write(root / "warmup.bin", data)
    (root / "warmup.bin").unlink()
    times: dict[str, list[float]] = {"pw": [], "pr": [], "sw": [], "sr": []}
    for k in range(rounds):
        plain = root / f"plain{k}.bin"
        times["pw"].append(_plain_write(plain, data))
        times["pr"].append(_plain_read(plain))
        plain.unlink()
        elapsed, store, oid = _store_write(root / f"tp{k}", data)
        times["sw"].append(elapsed)
        times["sr"].append(_store_read(store, oid, len(data)))
        store.close()
        shutil.rmtree(root / f"tp{k}")
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    mb = total / 1e6
    row = {
        "bytes": total,
        "rounds": rounds,
        "caches_dropped": drop_caches(),
        "plain_write_MBps": round(mb / med["pw"], 1),
        "store_write_MBps": round(mb / med["sw"], 1),
        "write_ratio": round(med["pw"] / med["sw"], 3),
        "plain_read_MBps": round(mb / med["pr"], 1),
        "store_read_MBps": round(mb / med["sr"], 1),
        "read_ratio": round(med["pr"] / med["sr"], 3),
    }
    print(f"  throughput: {row}", flush=True)
    return row


def bench_ops(root: Path, ops: int, depth: int = 8) -> dict:
    """Microseconds per operation at `depth` (see the module docstring, item 5)."""
    row: dict = {"depth": depth, "ops": ops}
    for mode in ("durable", "batch"):
        row.update(_ops_in(root / f"ops-{mode}", mode, ops, depth))
    print(f"  ops: {row}", flush=True)
    return row


def _ops_in(path: Path, mode: str, ops: int, depth: int) -> dict:
    row = {}
    with Store.open(path, journal=True) as store:
        d = store.root(store.create_namespace("vm").id)
        for k in range(depth - 1):
            d = store.mkdir(d, b"d%d" % k).oid
        a, b = store.mkdir(d, b"a").oid, store.mkdir(d, b"b").oid
        f = store.create(a, b"log").oid
        block = os.urandom(4096)
        names = [b"f%d" % k for k in range(ops)]
        steps = {
            "write_4k_extend": lambda k: store.write(f, k * 4096, block),
            "create": lambda k: store.create(a, names[k]),
            "rename_across": lambda k: store.rename(a, names[k], b, names[k]),
        }
        for name, step in steps.items():
            store.begin_batch()
            t0, c0 = time.perf_counter(), time.process_time()
            for k in range(ops):
                step(k)
                if mode == "durable":  # as the server: durable per call, checkpoints
                    store.make_durable()
                    if k % 100 == 99:
                        store.commit()
                        store.begin_batch()
            store.commit()
            row[f"{name}_{mode}_us"] = round((time.perf_counter() - t0) / ops * 1e6, 1)
            # CPU time: what the code costs, less disturbed by a shared machine's load
            row[f"{name}_{mode}_cpu_us"] = round((time.process_time() - c0) / ops * 1e6, 1)
    shutil.rmtree(path)
    return row


def _all(root: Path, quick: bool) -> dict:
    print("clone time:", flush=True)
    results: dict = {
        "clone": bench_clone(root, [1000, 5000] if quick else [1000, 10000, 100000]),
    }
    print("dedup:", flush=True)
    results["dedup"] = bench_dedup(root, (16 if quick else 256) * MiB, 3 if quick else 10)
    print("copy-on-write:", flush=True)
    results["cow"] = bench_cow(root, (64 if quick else 1024) * MiB)
    print("throughput:", flush=True)
    results["throughput"] = bench_throughput(root, (64 if quick else 256) * MiB)
    print("metadata operations at depth:", flush=True)
    results["ops"] = bench_ops(root, 300 if quick else 2000)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="scratch directory on the disk to measure")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--only", choices=["ops"], help="run only this phase")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prism-bench-", dir=args.dir))
    quick = args.quick
    try:
        if args.only == "ops":
            results = {"ops": bench_ops(root, 300 if quick else 2000)}
        else:
            results = _all(root, quick)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
