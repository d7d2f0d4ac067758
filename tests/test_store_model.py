"""Model-based test of the store: random operation sequences against an in-memory model.

The model keeps, per namespace (VMs and snapshots), a table of nodes (directories with
entries, files with contents, symlinks with targets) so hard links are shared nodes. After
every step each namespace's tree in the store must equal its model: names, types, contents (whole,
and a piece of each chunk through the store's small read cache),
symlink targets, hard-link identity, nlink, and usage, which must be known without a walk
(its record valid: compositions add the grafted subtrees' recursive statistics, `quota`),
also when operations run in batches (their statistics are deferred to the batch's durable
points and commit). Clones and compositions copy the
model, so "a clone never sees its source's later writes, and vice versa" is part of
equality. Every few steps (and at teardown) `fsck` must be clean and chunk refcounts must
equal the chunk-map records that name them.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from prism.errors import (
    Exists,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    StoreError,
)
from prism.store import CHUNK_SIZE, CloneSource, FileType, ObjectId, SetAttr, Store, txn
from prism.store import records as R

try:
    from prism.store import check, gc
except ImportError:  # the checker is being written alongside; run without it meanwhile
    check = gc = None  # type: ignore[assignment]

NAMES = ["a", "b", "c"]
OFFSETS = [0, 7, 4096, 131000, 131050, 131071, 131072, 131100, 2 * CHUNK_SIZE - 3, 400000]
SIZES = [0, 3, 131000, 131072, 131080, 2 * CHUNK_SIZE + 1]
MAX_NAMESPACES = 7
FSCK_EVERY = 5
MAX_COMPOSES = 6
READ_CACHE = 3 * CHUNK_SIZE
"""The store's read cache of verified chunks, small so that its evictions take part."""
"""Per example, to keep examples short. A graft imports only the volumes its subtree can
reach, so composing VMs into each other never nears MAX_VOLUMES here."""


@dataclass
class Node:
    kind: str  # "dir" | "file" | "link"
    entries: dict[str, int] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""


@dataclass
class Tree:
    nodes: dict[int, Node]
    next_id: int = 2

    @classmethod
    def empty(cls) -> Tree:
        return cls({1: Node("dir")})

    def new(self, node: Node) -> int:
        nid = self.next_id
        self.next_id += 1
        self.nodes[nid] = node
        return nid

    def lookup(self, path: str) -> int | None:
        nid = 1
        for part in [p for p in path.split("/") if p]:
            node = self.nodes[nid]
            if node.kind != "dir" or part not in node.entries:
                return None
            nid = node.entries[part]
        return nid

    def paths(self) -> list[tuple[str, int]]:
        out = [("/", 1)]
        stack = [("", 1)]
        while stack:
            prefix, nid = stack.pop()
            for name, child in sorted(self.nodes[nid].entries.items()):
                path = f"{prefix}/{name}"
                out.append((path, child))
                if self.nodes[child].kind == "dir":
                    stack.append((path, child))
        return sorted(out)

    def nlinks(self) -> Counter[int]:
        links: Counter[int] = Counter()
        for node in self.nodes.values():
            for child in node.entries.values():
                links[child] += 1
        return links

    def subtree(self, nid: int) -> set[int]:
        seen = {nid}
        stack = [nid]
        while stack:
            for child in self.nodes[stack.pop()].entries.values():
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return seen

    def unlink(self, parent: int, name: str) -> None:
        """Drop an entry; drop nodes (recursively for directories) nothing names any more."""
        del self.nodes[parent].entries[name]
        self.gc()

    def gc(self) -> None:
        live = self.subtree(1)
        for nid in list(self.nodes):
            if nid not in live:
                del self.nodes[nid]

    def graft(self, other: Tree, nid: int) -> int:
        """Copy `other`'s subtree at `nid` into this tree (hard links inside stay shared)."""
        mapping = {old: self.new(copy.deepcopy(other.nodes[old])) for old in other.subtree(nid)}
        for new in mapping.values():
            node = self.nodes[new]
            node.entries = {name: mapping[child] for name, child in node.entries.items()}
        return mapping[nid]


def split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition("/")
    return parent or "/", leaf


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="prism-model-"))
        self.store = Store.open(self.tmp / "data", journal=True, read_cache_bytes=READ_CACHE)
        self.models: dict[str, Tree] = {}  # "vm", and "vm@snap" for snapshots
        self.counter = 0
        self.steps = 0
        self.composes = 0

    # -- helpers -----------------------------------------------------------------------

    def fresh_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def vms(self) -> list[str]:
        return sorted(n for n in self.models if "@" not in n)

    def pick(self, items: list, index: int):
        return items[index % len(items)]

    def oid(self, ns: str, path: str) -> ObjectId:
        return self.store.resolve(self.store.namespace(ns).id, path).oid

    def expect(self, error: type[StoreError] | None, call) -> bool:
        """Run `call`; it must raise exactly `error` (or succeed when error is None)."""
        self.last_error: StoreError | None = None
        try:
            call()
        except StoreError as exc:
            self.last_error = exc
            assert error is not None, f"unexpected {exc!r}"
            assert type(exc) is error, f"expected {error.__name__}, got {exc!r}"
            return False
        assert error is None, f"expected {error.__name__}, but the call succeeded"
        return True

    def dirs(self, ns: str) -> list[str]:
        tree = self.models[ns]
        return [p for p, nid in tree.paths() if tree.nodes[nid].kind == "dir"]

    def files(self, ns: str) -> list[str]:
        tree = self.models[ns]
        return [p for p, nid in tree.paths() if tree.nodes[nid].kind == "file"]

    def join(self, parent: str, name: str) -> str:
        return f"{parent.rstrip('/')}/{name}"

    # -- rules: objects ----------------------------------------------------------------

    @initialize()
    def first_vm(self) -> None:
        self.store.create_namespace("vm0")
        self.models["vm0"] = Tree.empty()

    @rule(v=st.integers(0, 99), d=st.integers(0, 99), name=st.sampled_from(NAMES))
    def mkdir(self, v: int, d: int, name: str) -> None:
        ns = self.pick(self.vms(), v)
        parent = self.pick(self.dirs(ns), d)
        tree = self.models[ns]
        pnode = tree.nodes[tree.lookup(parent)]
        error = Exists if name in pnode.entries else None
        if self.expect(error, lambda: self.store.mkdir(self.oid(ns, parent), name.encode())):
            pnode.entries[name] = tree.new(Node("dir"))

    @rule(v=st.integers(0, 99), d=st.integers(0, 99), name=st.sampled_from(NAMES))
    def create(self, v: int, d: int, name: str) -> None:
        ns = self.pick(self.vms(), v)
        parent = self.pick(self.dirs(ns), d)
        tree = self.models[ns]
        pnode = tree.nodes[tree.lookup(parent)]
        error = Exists if name in pnode.entries else None
        if self.expect(
            error, lambda: self.store.create(self.oid(ns, parent), name.encode(), guarded=True)
        ):
            pnode.entries[name] = tree.new(Node("file"))

    @rule(
        v=st.integers(0, 99),
        d=st.integers(0, 99),
        name=st.sampled_from(NAMES),
        link_to=st.sampled_from([b"x", b"../a/b", b"/abs/path"]),
    )
    def symlink(self, v: int, d: int, name: str, link_to: bytes) -> None:
        ns = self.pick(self.vms(), v)
        parent = self.pick(self.dirs(ns), d)
        tree = self.models[ns]
        pnode = tree.nodes[tree.lookup(parent)]
        error = Exists if name in pnode.entries else None
        if self.expect(
            error, lambda: self.store.symlink(self.oid(ns, parent), name.encode(), link_to)
        ):
            pnode.entries[name] = tree.new(Node("link", target=link_to))

    @precondition(lambda self: any(self.files(ns) for ns in self.vms()))
    @rule(
        v=st.integers(0, 99),
        f=st.integers(0, 99),
        offset=st.sampled_from(OFFSETS),
        data=st.binary(min_size=1, max_size=200),
    )
    def write(self, v: int, f: int, offset: int, data: bytes) -> None:
        ns = self.pick([n for n in self.vms() if self.files(n)], v)
        path = self.pick(self.files(ns), f)
        self.store.write(self.oid(ns, path), offset, data)
        node = self.models[ns].nodes[self.models[ns].lookup(path)]
        if len(node.data) < offset + len(data):
            node.data.extend(bytes(offset + len(data) - len(node.data)))
        node.data[offset : offset + len(data)] = data

    @precondition(lambda self: any(self.files(ns) for ns in self.vms()))
    @rule(v=st.integers(0, 99), f=st.integers(0, 99), size=st.sampled_from(SIZES))
    def truncate(self, v: int, f: int, size: int) -> None:
        ns = self.pick([n for n in self.vms() if self.files(n)], v)
        path = self.pick(self.files(ns), f)
        self.store.setattr(self.oid(ns, path), SetAttr(size=size))
        node = self.models[ns].nodes[self.models[ns].lookup(path)]
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))

    @precondition(lambda self: any(self.files(ns) for ns in self.vms()))
    @rule(
        v=st.integers(0, 99),
        f=st.integers(0, 99),
        d=st.integers(0, 99),
        name=st.sampled_from(NAMES),
    )
    def link(self, v: int, f: int, d: int, name: str) -> None:
        ns = self.pick([n for n in self.vms() if self.files(n)], v)
        path = self.pick(self.files(ns), f)
        parent = self.pick(self.dirs(ns), d)
        tree = self.models[ns]
        pnode = tree.nodes[tree.lookup(parent)]
        error = Exists if name in pnode.entries else None
        if self.expect(
            error,
            lambda: self.store.link(self.oid(ns, path), self.oid(ns, parent), name.encode()),
        ):
            pnode.entries[name] = tree.lookup(path)

    @rule(v=st.integers(0, 99), d=st.integers(0, 99), name=st.sampled_from(NAMES))
    def unlink(self, v: int, d: int, name: str) -> None:
        ns = self.pick(self.vms(), v)
        parent = self.pick(self.dirs(ns), d)
        tree = self.models[ns]
        pid = tree.lookup(parent)
        child = tree.nodes[pid].entries.get(name)
        error = None
        if child is None:
            error = NotFound
        elif tree.nodes[child].kind == "dir":
            error = IsADirectory
        if self.expect(error, lambda: self.store.remove(self.oid(ns, parent), name.encode())):
            tree.unlink(pid, name)

    @rule(v=st.integers(0, 99), d=st.integers(0, 99), name=st.sampled_from(NAMES))
    def rmdir(self, v: int, d: int, name: str) -> None:
        ns = self.pick(self.vms(), v)
        parent = self.pick(self.dirs(ns), d)
        tree = self.models[ns]
        pid = tree.lookup(parent)
        child = tree.nodes[pid].entries.get(name)
        error = None
        if child is None:
            error = NotFound
        elif tree.nodes[child].kind != "dir":
            error = NotADirectory
        elif tree.nodes[child].entries:
            error = NotEmpty
        if self.expect(error, lambda: self.store.rmdir(self.oid(ns, parent), name.encode())):
            tree.unlink(pid, name)

    @rule(
        v=st.integers(0, 99),
        s=st.integers(0, 99),
        sname=st.sampled_from(NAMES),
        d=st.integers(0, 99),
        dname=st.sampled_from(NAMES),
    )
    def rename(self, v: int, s: int, sname: str, d: int, dname: str) -> None:
        ns = self.pick(self.vms(), v)
        sdir = self.pick(self.dirs(ns), s)
        ddir = self.pick(self.dirs(ns), d)
        tree = self.models[ns]
        sid, did = tree.lookup(sdir), tree.lookup(ddir)
        moving = tree.nodes[sid].entries.get(sname)
        existing = tree.nodes[did].entries.get(dname)
        error = None
        noop = False
        if moving is None:
            error = NotFound
        elif sid == did and sname == dname:
            noop = True
        elif tree.nodes[moving].kind == "dir" and sid != did and did in tree.subtree(moving):
            error = InvalidArgument
        elif existing == moving:
            noop = True
        elif existing is not None:
            ekind, mkind = tree.nodes[existing].kind, tree.nodes[moving].kind
            if mkind == "dir" and ekind != "dir":
                error = NotADirectory
            elif mkind == "dir" and tree.nodes[existing].entries:
                error = NotEmpty
            elif mkind != "dir" and ekind == "dir":
                error = IsADirectory
        ok = self.expect(
            error,
            lambda: self.store.rename(
                self.oid(ns, sdir), sname.encode(), self.oid(ns, ddir), dname.encode()
            ),
        )
        if ok and not noop:
            del tree.nodes[sid].entries[sname]
            tree.nodes[did].entries[dname] = moving
            tree.gc()

    # -- rules: namespaces -------------------------------------------------------------

    @precondition(lambda self: len(self.models) < MAX_NAMESPACES)
    @rule(v=st.integers(0, 99))
    def clone(self, v: int) -> None:
        ns = self.pick(self.vms(), v)
        new = self.fresh_name("c")
        self.store.clone(new, [CloneSource(ns)])
        self.models[new] = copy.deepcopy(self.models[ns])

    @precondition(lambda self: len(self.models) < MAX_NAMESPACES)
    @rule(v=st.integers(0, 99))
    def snapshot(self, v: int) -> None:
        ns = self.pick(self.vms(), v)
        snap = self.fresh_name("s")
        self.store.snapshot(ns, snap)
        self.models[f"{ns}@{snap}"] = copy.deepcopy(self.models[ns])

    @precondition(lambda self: any("@" in n for n in self.models))
    @rule(s=st.integers(0, 99))
    def rollback(self, s: int) -> None:
        full = self.pick(sorted(n for n in self.models if "@" in n), s)
        vm, snap = full.split("@")
        self.store.rollback(vm, snap)
        self.models[vm] = copy.deepcopy(self.models[full])

    @precondition(lambda self: any("@" in n for n in self.models))
    @rule(s=st.integers(0, 99))
    def clone_snapshot(self, s: int) -> None:
        full = self.pick(sorted(n for n in self.models if "@" in n), s)
        if len(self.models) >= MAX_NAMESPACES:
            return
        vm, snap = full.split("@")
        new = self.fresh_name("c")
        self.store.clone(new, [CloneSource(vm, snapshot=snap)])
        self.models[new] = copy.deepcopy(self.models[full])

    @precondition(lambda self: self.composes < MAX_COMPOSES)
    @rule(
        src=st.integers(0, 99),
        p=st.integers(0, 99),
        into=st.integers(-1, 99),
        d=st.integers(0, 99),
        name=st.sampled_from([*NAMES, "/"]),
        missing=st.sampled_from(["", "", "", "", "source", "dest"]),
    )
    def compose(self, src: int, p: int, into: int, d: int, name: str, missing: str) -> None:
        """Graft a subtree of a VM or snapshot into a new VM (into < 0) or an existing one."""
        self.composes += 1
        if into < 0 and len(self.models) >= MAX_NAMESPACES:
            return
        sname = self.pick(sorted(self.models), src)
        stree = self.models[sname]
        spath, snid = self.pick(stree.paths(), p)
        source_error = None
        if missing == "source":
            source_error = NotFound if stree.nodes[snid].kind == "dir" else NotADirectory
            spath = self.join(spath, "zz")
        elif missing == "dest" and name == "/":
            missing = ""  # the root always exists
        vm, _, snap = sname.partition("@")
        if into < 0:
            target = self.fresh_name("k")
            ttree = Tree.empty()
            parent = "/"
        else:
            target = self.pick(self.vms(), into)
            ttree = copy.deepcopy(self.models[target])  # applied only if the clone works
            parent = self.pick(self.dirs(target), d)
        if missing == "dest":
            parent = self.join(parent, "zz")
        dest = "/" if name == "/" else self.join(parent, name)
        source = CloneSource(vm, snapshot=snap or None, path=spath, dest=dest)
        error = source_error
        if error is not None:
            pass
        elif dest == "/":
            error = None if stree.nodes[snid].kind == "dir" else NotADirectory
        elif ttree.lookup(parent) is None:
            error = NotFound
        before = self.store.list_namespaces()
        ok = self.expect(
            error, lambda: self.store.clone(target, [source], into=into >= 0, replace=True)
        )
        if not ok:
            assert self.store.list_namespaces() == before, "a failed clone changed namespaces"
            return
        if dest == "/":  # the source directory's entries, copied together, join the root
            for entry in stree.nodes[snid].entries:
                if entry in ttree.nodes[1].entries:
                    ttree.unlink(1, entry)
            copied = ttree.graft(stree, snid)
            ttree.nodes[1].entries.update(ttree.nodes[copied].entries)
            ttree.gc()
        else:
            pid = ttree.lookup(parent)
            if name in ttree.nodes[pid].entries:
                ttree.unlink(pid, name)
            ttree.nodes[pid].entries[name] = ttree.graft(stree, snid)
        self.models[target] = ttree

    @precondition(lambda self: self.composes < MAX_COMPOSES)
    @rule(
        v=st.integers(0, 99),
        into=st.integers(-1, 99),
        d=st.integers(0, 99),
        name=st.sampled_from([*NAMES, "/"]),
    )
    def compose_cutting_links(self, v: int, into: int, d: int, name: str) -> None:
        """`compose` of a subtree holding some but not all links of an object, which random
        picks rarely meet: the copy's nlink counts only the links it copies."""
        names = sorted(self.models)
        cuts = [
            (i, p)
            for i, ns in enumerate(names)
            for p, (_, nid) in enumerate(self.models[ns].paths())
            if self.cuts_hard_links(self.models[ns], nid)
        ]
        if cuts:
            src, p = self.pick(cuts, v)
            self.compose(src, p, into, d, name, "")

    @staticmethod
    def cuts_hard_links(tree: Tree, nid: int) -> bool:
        inside = {n for n in tree.subtree(nid) if tree.nodes[n].kind != "dir"}
        links = tree.nlinks()
        within: Counter[int] = Counter()
        for n in tree.subtree(nid):
            for child in tree.nodes[n].entries.values():
                within[child] += 1
        within[nid] += 1  # the graft's own entry
        return any(within[n] != links[n] for n in inside)

    @precondition(lambda self: not self.store.in_batch)
    @rule()
    def begin_batch(self) -> None:
        """Later operations run in one batch, their statistics deferred (`quota`)."""
        self.store.begin_batch()

    @precondition(lambda self: self.store.in_batch)
    @rule(durable=st.booleans())
    def end_batch(self, durable: bool) -> None:
        if durable and self.store.journal is not None:
            self.store.make_durable()  # (the figures stored as pending, then folded)
        self.store.commit()

    @precondition(lambda self: not self.store.in_batch)
    @rule(data=st.binary(min_size=1, max_size=50))
    def aborted_batch(self, data: bytes) -> None:
        """Changes in an aborted batch (including namespace changes) leave no trace."""
        ns = self.vms()[0]
        self.store.begin_batch()
        try:
            root = self.oid(ns, "/")
            self.store.create(root, b"zz-aborted")
            self.store.write(self.oid(ns, "/zz-aborted"), CHUNK_SIZE - 2, data)
            self.store.snapshot(ns, "zz-aborted")
            self.store.clone("zz-aborted", [CloneSource(ns)])
        finally:
            self.store.abort()

    @rule()
    def reopen(self) -> None:
        if self.store.in_batch:
            self.store.commit()
        self.store.close()
        self.store = Store.open(self.tmp / "data", journal=True, read_cache_bytes=READ_CACHE)

    @precondition(lambda self: check is not None and not self.store.in_batch)
    @rule()
    def gc(self) -> None:
        gc.gc(self.store)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def trees_equal_models(self) -> None:
        for ns, tree in self.models.items():
            self.compare(ns, tree)
        self.steps += 1
        if self.steps % FSCK_EVERY == 0:
            self.check_consistency()

    def compare(self, ns: str, tree: Tree) -> None:
        info = self.store.namespace(ns)
        assert info.readonly == ("@" in ns)
        links = tree.nlinks()
        identity: dict[int, ObjectId] = {}
        size = 0
        stack = [("/", 1, info.root)]
        while stack:
            path, nid, oid = stack.pop()
            node = tree.nodes[nid]
            if nid in identity:
                assert identity[nid] == oid, f"{ns}:{path}: hard link names another object"
                continue
            assert oid not in identity.values(), f"{ns}:{path}: two model objects share {oid}"
            identity[nid] = oid
            attr = self.store.getattr(oid)
            if node.kind == "dir":
                assert attr.type == FileType.DIR, f"{ns}:{path}"
                entries, eof = self.store.readdir(oid, 0, limit=1000)
                assert eof
                got = {e.name.decode(): e for e in entries}
                assert sorted(got) == sorted(node.entries), f"{ns}:{path}: entries differ"
                subdirs = sum(tree.nodes[c].kind == "dir" for c in node.entries.values())
                assert attr.nlink == 2 + subdirs, f"{ns}:{path}: directory nlink"
                for name, child in node.entries.items():
                    stack.append((f"{path.rstrip('/')}/{name}", child, got[name].oid))
                    kind = tree.nodes[child].kind
                    want = {"dir": FileType.DIR, "file": FileType.REG, "link": FileType.LNK}
                    assert got[name].type == want[kind], f"{ns}:{path}/{name}: entry type"
            elif node.kind == "file":
                assert attr.type == FileType.REG, f"{ns}:{path}"
                assert attr.size == len(node.data), f"{ns}:{path}: size"
                data, eof = self.store.read(oid, 0, len(node.data) + 1)
                assert eof and data == bytes(node.data), f"{ns}:{path}: content differs"
                for at in range(5, len(node.data), CHUNK_SIZE):  # one chunk each: the cache
                    piece = self.store.read(oid, at, 4096)[0]
                    assert piece == node.data[at : at + 4096], f"{ns}:{path}: bytes at {at}"
                assert attr.nlink == links[nid], f"{ns}:{path}: nlink {attr.nlink}"
                size += len(node.data)
            else:
                assert attr.type == FileType.LNK, f"{ns}:{path}"
                assert self.store.readlink(oid) == node.target, f"{ns}:{path}: target"
                assert attr.nlink == links[nid], f"{ns}:{path}: nlink {attr.nlink}"
                size += len(node.target)  # a symlink's target counts as data
        with txn.read(self.store.ctx) as t:
            raw = t.get(R.U32.pack(info.id), db=self.store.ctx.db.usage)
        assert raw is not None and R.USAGE_VAL.unpack(raw)[2], f"{ns}: usage unknown"
        usage = self.store.usage(ns)
        assert (usage.logical_bytes, usage.files) == (size, len(identity)), f"{ns}: usage"

    def check_consistency(self) -> None:
        store = self.store
        if store.in_batch:
            store.commit()
        with txn.read(store.ctx) as t:
            refs: Counter[bytes] = Counter()
            for _, value in t.cursor(db=store.ctx.db.cmap):
                if value:
                    refs[R.CHUNK_KEY.pack(*R.CMAP_VAL.unpack(value)[:2])] += 1
            for key, value in t.cursor(db=store.ctx.db.chunks):
                count = R.CHUNK_VAL.unpack(value)[3]
                assert count == refs.pop(bytes(key), 0), "chunk refcount != references"
            assert not refs, "chunk-map records name chunks missing from the index"
        if check is not None:
            assert check.fsck(store).errors == []

    def teardown(self) -> None:
        try:
            self.check_consistency()
        finally:
            self.store.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


StoreMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStoreModel = StoreMachine.TestCase
