"""Child process of `test_store_crash.py`: random durable store operations until killed.

Usage: python tests/store_crash_child.py DATA_DIR SEED LOG [journal]  (or DATA_DIR setup)

It rebuilds the expected state from the store (which the parent has just verified), prints
`READY`, then loops: for each operation it appends `BEGIN <state>` to LOG (the whole expected
state if the operation takes effect), runs the operation (one autocommitted call or one
committed batch: atomic and durable when it returns; with `journal`, as the server does: in
a long batch, made durable by a journal record), then appends `DONE <state>`. The parent
kills it with SIGKILL at a random moment and checks that the store holds the last DONE state,
or the BEGIN state of the operation that was in flight.

A state is {namespace: {path: [size, sha256]}} over the VMs and snapshots this test owns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
from pathlib import Path

from prism.store import CHUNK_SIZE, CloneSource, FileType, SetAttr, Store

VM = "crash"
CLONE = "crash-clone"
DIRS = ["/", "/d0", "/d1"]
SIZES = [0, 1, 4096, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 300_000]
MAX_FILES = 24
MAX_SNAPSHOTS = 3

State = dict[str, dict[str, list]]


_DIGESTS: dict[int, tuple[bytes, list]] = {}


def digest(data: bytes) -> list:
    """[size, sha256] of `data`, memoised per bytes object (states share most contents)."""
    hit = _DIGESTS.get(id(data))
    if hit is not None and hit[0] is data:
        return hit[1]
    value = [len(data), hashlib.sha256(data).hexdigest()]
    if len(_DIGESTS) > 4096:
        _DIGESTS.clear()
    _DIGESTS[id(data)] = (data, value)
    return value


def join(d: str, name: str) -> str:
    return f"{d.rstrip('/')}/{name}"


def read_state(store: Store) -> tuple[State, dict[str, dict[str, bytes]]]:
    """Every namespace of the test: path -> [size, sha] (and the contents themselves)."""
    state: State = {}
    contents: dict[str, dict[str, bytes]] = {}
    for info in store.list_namespaces():
        if info.name.split("@")[0] not in (VM, CLONE):
            continue
        files: dict[str, list] = {}
        data: dict[str, bytes] = {}
        for d in DIRS:
            doid = store.resolve(info.id, d).oid
            entries, eof = store.readdir(doid, 0, limit=100_000)
            assert eof
            for entry in entries:
                if entry.type != FileType.REG:
                    continue
                path = join(d, entry.name.decode())
                size = store.getattr(entry.oid).size
                content, _ = store.read(entry.oid, 0, size)
                assert len(content) == size
                files[path] = digest(content)
                data[path] = content
        state[info.name] = files
        contents[info.name] = data
    return state, contents


def setup(store: Store) -> None:
    store.create_namespace(VM)
    root = store.root(store.namespace(VM).id)
    for d in DIRS[1:]:
        store.mkdir(root, d[1:].encode())


def main() -> None:
    data_dir, seed, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    journaled = len(sys.argv) > 4 and sys.argv[4] == "journal"
    rng = random.Random(seed)
    gc = None
    with contextlib.suppress(ImportError):  # the checker may not exist yet
        from prism.store.gc import gc
    store = Store.open(Path(data_dir), journal=journaled)
    state, contents = read_state(store)
    snaps = sorted(n for n in state if n.startswith(VM + "@"))
    serial = max([int(n.split("@s")[1]) for n in snaps] + [0])
    out = sys.stdout

    # The log goes to a file, not the stdout pipe: a pipe nobody drains until the kill would
    # fill up and stall the child after a few operations.
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def say(kind: str, st: State) -> None:
        os.write(log, f"{kind} {json.dumps(st, sort_keys=True)}\n".encode())

    def oid(ns: str, path: str):
        return store.resolve(store.namespace(ns).id, path).oid

    out.write("READY\n")
    out.flush()
    while True:
        vms = [n for n in (VM, CLONE) if n in state]
        ns = rng.choice(vms)
        files = sorted(contents[ns])
        new_state = json.loads(json.dumps(state))
        new_contents = {k: dict(v) for k, v in contents.items()}
        roll = rng.random()
        action = None
        if roll < 0.30 or not files:
            if len(files) >= MAX_FILES:
                continue
            path = join(rng.choice(DIRS), f"f{rng.randrange(40)}")
            size = rng.choice(SIZES)
            # a few seeds only, so identical content recurs (dedup)
            content = random.Random(rng.randrange(6)).randbytes(size)

            def action(path=path, content=content, ns=ns) -> None:
                parent, _, leaf = path.rpartition("/")
                own_batch = not store.in_batch
                store.begin_batch()
                try:
                    f = store.create(oid(ns, parent or "/"), leaf.encode()).oid
                    store.setattr(f, SetAttr(size=0))
                    store.write(f, 0, content)
                except BaseException:
                    store.abort()
                    raise
                if own_batch:
                    store.commit()

            new_contents[ns][path] = content
        elif roll < 0.50:
            path = rng.choice(files)
            old = contents[ns][path]
            offset = rng.choice([0, 5, CHUNK_SIZE - 7, CHUNK_SIZE, len(old), len(old) + 1000])
            piece = rng.randbytes(rng.choice([1, 100, 5000, CHUNK_SIZE + 10]))
            buf = bytearray(old)
            if len(buf) < offset + len(piece):
                buf.extend(bytes(offset + len(piece) - len(buf)))
            buf[offset : offset + len(piece)] = piece

            def action(path=path, offset=offset, piece=piece, ns=ns) -> None:
                store.write(oid(ns, path), offset, piece)

            new_contents[ns][path] = bytes(buf)
        elif roll < 0.60:
            path = rng.choice(files)
            size = rng.choice([0, 3, CHUNK_SIZE - 1, CHUNK_SIZE + 5, 200_000])
            old = contents[ns][path]
            new = old[:size] + bytes(max(0, size - len(old)))

            def action(path=path, size=size, ns=ns) -> None:
                store.setattr(oid(ns, path), SetAttr(size=size))

            new_contents[ns][path] = new
        elif roll < 0.72:
            src = rng.choice(files)
            dst = join(rng.choice(DIRS), f"f{rng.randrange(40)}")
            if dst == src:
                continue

            def action(src=src, dst=dst, ns=ns) -> None:
                sp, _, sn = src.rpartition("/")
                dp, _, dn = dst.rpartition("/")
                store.rename(oid(ns, sp or "/"), sn.encode(), oid(ns, dp or "/"), dn.encode())

            new_contents[ns][dst] = new_contents[ns].pop(src)
        elif roll < 0.82:
            path = rng.choice(files)

            def action(path=path, ns=ns) -> None:
                parent, _, leaf = path.rpartition("/")
                store.remove(oid(ns, parent or "/"), leaf.encode())

            del new_contents[ns][path]
        elif roll < 0.88:
            snaps = sorted(n for n in state if n.startswith(VM + "@"))
            if len(snaps) >= MAX_SNAPSHOTS:
                victim = snaps[0]

                def action(victim=victim) -> None:
                    store.remove_snapshot(VM, victim.split("@")[1])

                del new_contents[victim]
            else:
                serial += 1
                name = f"s{serial}"

                def action(name=name) -> None:
                    store.snapshot(VM, name)

                new_contents[f"{VM}@{name}"] = dict(contents[VM])
        elif roll < 0.94:
            if CLONE in state:

                def action() -> None:
                    store.remove_namespace(CLONE)

                del new_contents[CLONE]
            else:
                source = rng.choice([n for n in state if n != CLONE])
                vm, _, snap = source.partition("@")

                def action(vm=vm, snap=snap) -> None:
                    store.clone(CLONE, [CloneSource(vm, snapshot=snap or None)])

                new_contents[CLONE] = dict(contents[source])
        elif gc is not None:

            def action() -> None:
                gc(store)

        else:
            continue
        new_state = {
            name: {path: digest(data) for path, data in files_.items()}
            for name, files_ in new_contents.items()
        }
        say("BEGIN", new_state)
        if journaled:
            # As the server runs: one long batch, a journal record per operation, and
            # now and then a checkpoint.
            store.begin_batch()
            action()
            store.make_durable()
            if rng.random() < 0.1:
                store.commit()
        else:
            action()
        say("DONE", new_state)
        state, contents = new_state, new_contents


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "setup":
        with Store.open(Path(sys.argv[1])) as s:
            setup(s)
    else:
        main()
