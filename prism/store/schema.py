"""The store's on-disk layout: the LMDB environment, its named databases, counters, and the
context (`Ctx`) that every room of the store works on.

A data directory (every directory 0700 and file 0600, tightened on open: the metadata holds
the file-handle MAC key)::

    DATA/meta/data.mdb, lock.mdb   LMDB environment (all metadata, see the databases below)
    DATA/meta/journal              redo journal of a running server (`prism.store.journal`)
    DATA/meta/epoch                writes by other processes, for VRPC tables (`prism.store.epoch`)
    DATA/segments/<id>.seg         chunk bytes, appended back to back (`prism.store.segments`)
    DATA/staging/<token>.lock      flock'ed by the process building the import staged as token
    DATA/nlm/                      the lock service's state, not the store's (`prism.nlm.monitor`)

LMDB databases (keys and values are packed as in `prism.store.records`; every stored value
is followed by a 4-byte seal over its database, key and value, checked on every read, see
`prism.store.sealed`):

    meta      b"format" -> version (2: sealed values);
              b"secret" -> 32 random bytes (file-handle MAC key);
              b"journal_gen" -> generation of the journal records not yet checkpointed;
              b"ns_next" -> next namespace id; b"layer_next" -> next layer id;
              b"ino"+ns -> next inode number; b"stored_bytes", b"chunk_count" -> counters;
              b"referenced_bytes" -> chunk lengths times refcounts (counted on first open
              of a store made before it existed);
              b"usage_rev" -> what `usage` counts (USAGE_REV; older counters are marked
              invalid on open, so they are re-measured);
              b"stage:"+token -> JSON {ns, ino}: an import being built (`prism.store.staging`)
              b"rstat:"+id u64+seq u64 -> directories' recursive statistics not yet
              added up their '..' chains, as journaled by a server (`prism.store.quota`,
              "Deferred propagation"; a replay stores them, the next commit folds them)
    ns        ns id u32 -> JSON {name, kind ("vm"|"snapshot"), top layer, clients, quota, of,
              shares, and for a VM: secure, squash, anon_uid, anon_gid, vrpc_users,
              vrpc_groups, vrpc_token, read_only (`types.Export`; a record written before
              these existed lacks them and means insecure, squash none, VRPC for root only,
              read-write: the access it always had)}
    names     name -> ns id u32 ("web" for a VM, "web@monday" for its snapshot)
    layers    layer id u64 -> JSON {parent, vols, imports, next_vol, next_import}; an
              import is {layer, map, roots, escaped} (roots and escaped since grafts
              import only the volumes they reach; an import without roots counts as
              escaped)
    inodes    layer|vol|ino -> packed Inode, or b"" (whiteout: removed in this layer)
    dirents   layer|vol|dir|cookie|name -> vol|ino|type, or b"" (whiteout)
    cmap      layer|vol|ino|chunk index -> chunk key|length|segment|offset, or b"" (hole);
              an inode's whiteout also hides every lower cmap record of that inode, so
              removing a file writes no per-chunk whiteouts (gc's fold drops what it hides)
    chunks    xxh3-128 hash|seq -> segment|offset|length|refcount
    segments  segment id -> appended bytes|live bytes
    usage     ns id -> logical bytes (file sizes and symlink targets)|objects|valid
    links     layer|vol|ino|dir vol|dir ino -> links there u32, or b"" (whiteout): where
              each multiply-linked object's links live (`prism.store.links`; since the
              database was added, appended last so older numbering holds)

What the records mean is told by the rooms that write them: `layers` (namespaces, layer
chains, volumes, shares), `tree` (inodes, entries, whiteouts), `content` (chunks, chunk maps,
segments), `quota` (usage), `links` (the hard-link index), `txn` (the journal generation and crash
ordering), `staging`.

The rooms are modules of free functions over one `Ctx`, the open store as this process sees
it; data flows downward: schema <- txn <- layers <- tree <- links <- content <- quota <-
perms <- posix <- names <- graft <- compose, staging <- store (the facade), and `check`/`gc`
use the rooms' public functions. No room keeps state of its own outside the `Ctx`.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import lmdb

from prism.errors import Corrupt, PermissionDenied
from prism.store import records as R
from prism.store.diskio import PRIVATE_DIR, PRIVATE_FILE
from prism.store.journal import Change, Journal
from prism.store.sealed import SealedCursor
from prism.store.segments import SegmentFiles
from prism.store.types import Export
from prism.store.writelock import WriteLock

FORMAT_VERSION = 2
"""1: values stored bare; 2: every value sealed (`prism.store.sealed`). Opening a format-1
store seals every record in one transaction first (`txn.upgrade`)."""
MAP_SIZE = 1 << 40
DB_NAMES = (
    "meta", "ns", "names", "layers", "inodes", "dirents", "cmap", "chunks", "segments", "usage",
    "links",
)  # fmt: skip
"""The databases in `Dbs.all` order: their index is the journal's and the seal's number."""
NS_KEY = R.U32
"""Key of a namespace in `ns` and `usage` (and of its b"ino" counter in `meta`)."""
JOURNAL_GEN = b"journal_gen"
USAGE_REV_KEY = b"usage_rev"
USAGE_REV = 2
"""What the usage counters count: 2 = file sizes and symlink targets (1 left symlinks out)."""
REFERENCED = b"referenced_bytes"
"""The `meta` counter of chunk bytes times their references (`content`)."""
STAGE_PREFIX = b"stage:"
STAGING_DIR = "staging"
"""DATA/staging/<token>.lock: flock'ed by the process building the import staged as token."""
PARSED_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Dbs:
    """The named databases of one open environment."""

    meta: Any
    ns: Any
    names: Any
    layers: Any
    inodes: Any
    dirents: Any
    cmap: Any
    chunks: Any
    segments: Any
    usage: Any
    links: Any
    all: tuple[Any, ...]
    """In DB_NAMES order."""
    index: dict[Any, int]
    """Database handle -> its number in DB_NAMES."""

    @classmethod
    def open(cls, env: lmdb.Environment) -> Dbs:
        handles = tuple(env.open_db(name.encode()) for name in DB_NAMES)
        named: dict[str, Any] = dict(zip(DB_NAMES, handles, strict=True))
        return cls(**named, all=handles, index={db: i for i, db in enumerate(handles)})


@dataclass(eq=False, slots=True)
class Ctx:
    """An open store as every room sees it: the layout, this process's open transactions
    (managed by `txn` alone) and caches. A cache is either keyed so that a hit is always
    current (by stored bytes, or by a frozen layer's id) or emptied by `txn.forget_layers`
    when what it is keyed by may change (an abort hands layer ids out again, gc moves
    records)."""

    path: Path
    env: lmdb.Environment
    db: Dbs
    segments: SegmentFiles
    write_lock: WriteLock
    journal: Journal | None
    # -- transactions (`txn`) --
    batch: lmdb.Transaction | None = None
    """The open batch (group commit), if any; reads see its writes."""
    writer: lmdb.Transaction | None = None
    """The top-level write transaction, if any (it holds the write lock)."""
    sharing: bool = False
    """Inside `txn.reading`: the reads of one read-only call share one transaction..."""
    reading: lmdb.Transaction | None = None
    """...this one, opened by the first of them."""
    ns_read: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    """The namespace records `reading`'s transaction read, by id (`layers.ns_record`)."""
    broken: BaseException | None = None
    """Why this process may no longer write (its journal could not be reloaded)."""
    journaled: list[Change] = field(default_factory=list)
    """The batch's changes not yet in the journal."""
    boot_id: int = field(default_factory=lambda: secrets.randbits(63) | 1)
    """The write verifier: changes whenever acknowledged UNSTABLE writes may be lost."""
    # -- caches --
    paths: dict[tuple[int, int], tuple[Any, ...]] = field(default_factory=dict)
    """(top layer, volume) -> the layers to search (`layers.chain`)."""
    import_maps: dict[tuple[int, int], dict[int, int]] = field(default_factory=dict)
    ns_cache: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    layer_cache: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    exports: dict[int, tuple[dict[str, Any], Export]] = field(default_factory=dict)
    damage_logged: set[bytes] = field(default_factory=set)
    damaged_reads: int = 0
    """Reads refused because content failed its hash check (since this process began)."""
    # -- VRPC's attribute tables (`txn`, `tree`; design vrpc.md 7.3-7.5) --
    epoch: Any = None
    """DATA/meta/epoch (`prism.store.epoch.EpochFile`): bumped around every write
    transaction of a process that does not own the journal."""
    epoch_begun: int | None = None
    """The epoch's `begun` of this process's open top-level write transaction."""
    observer: Any = None
    """`api.StoreObserver` told of inode and dirent changes at each nested commit."""
    events: list[tuple[Any, ...]] = field(default_factory=list)
    """The open nested transaction's changes for `observer` (recorded only with one)."""
    # -- recursive statistics deferred to the batch (`quota`, "Recursive statistics") --
    rstat_pending: bytearray = field(default_factory=bytearray)
    """The open batch's differences not yet folded, in the order its operations made them,
    as `records.RSTAT_ENTRY`s (to add to that directory and those above it), so that a
    durable point journals a slice of it as is. An operation appends its own; if it
    aborts they are cut off again (`txn.write`). Its first `rstat_journaled` bytes are in
    the journal."""
    rstat_journaled: int = 0
    rstat_batch: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    """(ns, vol, dir ino) -> (bytes, objects) or None (unknown): entries merged out of
    `rstat_pending` (journaled ones, or any without a journal), so that a long batch
    holds one difference per directory (`txn.compact_rstats`)."""
    rstat_keys: list[bytes] = field(default_factory=list)
    """The b"rstat:" records this batch journaled (a fold inside it deletes them)."""
    rstat_hooks: Any = None
    """`quota.RstatHooks`: what `txn` calls to store (`persist`) and apply (`fold`) them."""

    @property
    def journal_path(self) -> Path:
        return self.path / "meta" / "journal"


def open_env(meta: Path) -> lmdb.Environment:
    return lmdb.open(
        str(meta),
        mode=PRIVATE_FILE,
        map_size=MAP_SIZE,
        max_dbs=16,
        max_readers=1024,
        sync=True,
        metasync=True,
        readahead=False,
    )


def parsed(cache: dict[bytes, dict[str, Any]], raw: bytes) -> dict[str, Any]:
    """The JSON record `raw`, parsed once per distinct stored bytes: a hit is always
    current, so the cache needs no invalidation (only emptying when full). Callers must not
    change the record they get; they copy it to write a new one."""
    record = cache.get(raw)
    if record is None:
        if len(cache) > PARSED_CACHE_SIZE:
            cache.clear()
        record = cache[raw] = json.loads(raw)
    return record


def make_private(root: Path) -> None:
    """Give the data directory, its subdirectories and their files to the server's user
    alone (0700/0600): `meta/data.mdb` holds the file-handle MAC key. Stores made before
    this rule are tightened here, on every open."""
    _chmod_private(root.resolve(), PRIVATE_DIR)
    for path in root.iterdir():  # meta/, segments/, staging/, nlm/ and whatever comes next
        if not path.is_dir():
            _chmod_private(path, PRIVATE_FILE)
            continue
        _chmod_private(path.resolve(), PRIVATE_DIR)  # (each may be a symlink to elsewhere)
        for child in path.iterdir():
            _chmod_private(child, PRIVATE_DIR if child.is_dir() else PRIVATE_FILE)


def _chmod_private(path: Path, mode: int) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == mode:
        return
    try:
        os.chmod(path, mode)
    except FileNotFoundError:
        return  # (a segment `gc` removed meanwhile)
    except PermissionError:
        raise PermissionDenied(
            f"{path} is readable by other users and cannot be made private; "
            f"run `chmod -R go= {path.parent}` as its owner"
        ) from None


def intact_records(
    t: lmdb.Transaction, db: Any, start: bytes | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """Every intact record of `db` (from `start`), in key order: the damaged ones are
    skipped (fsck reports them), and a database LMDB cannot walk to its end ends early."""
    try:
        yield from cast(SealedCursor, t.cursor(db=db)).intact(start)
    except Corrupt:
        return


def next_counter(ctx: Ctx, t: lmdb.Transaction, key: bytes, start: int = 1) -> int:
    raw = t.get(key, db=ctx.db.meta)
    value = R.U64.unpack(raw)[0] if raw else start
    t.put(key, R.U64.pack(value + 1), db=ctx.db.meta)
    return value


def add_meta(ctx: Ctx, t: lmdb.Transaction, key: bytes, delta: int) -> None:
    raw = t.get(key, db=ctx.db.meta)
    value = (R.U64.unpack(raw)[0] if raw else 0) + delta
    t.put(key, R.U64.pack(max(value, 0)), db=ctx.db.meta)


def get_meta(ctx: Ctx, t: lmdb.Transaction, key: bytes) -> int:
    raw = t.get(key, db=ctx.db.meta)
    return R.U64.unpack(raw)[0] if raw else 0


def prepare(ctx: Ctx, t: lmdb.Transaction) -> bytes:
    """Make a new store's meta records, or check an existing store's format; mark usage
    counters kept under an older rule invalid (they are re-measured on their next use).
    Returns the file-handle MAC key."""
    version = t.get(b"format", db=ctx.db.meta)
    if version is None:
        t.put(b"format", R.U32.pack(FORMAT_VERSION), db=ctx.db.meta)
        t.put(b"secret", secrets.token_bytes(32), db=ctx.db.meta)
    elif R.U32.unpack(version)[0] != FORMAT_VERSION:
        raise Corrupt(f"{ctx.path} holds a store of an unknown format version")
    if get_meta(ctx, t, USAGE_REV_KEY) != USAGE_REV:
        for key, raw in list(t.cursor(db=ctx.db.usage)):
            t.put(key, R.USAGE_VAL.pack(*R.USAGE_VAL.unpack(raw)[:2], 0), db=ctx.db.usage)
        t.put(USAGE_REV_KEY, R.U64.pack(USAGE_REV), db=ctx.db.meta)
    if t.get(REFERENCED, db=ctx.db.meta) is None:  # once, for a store made before the counter
        referenced = 0
        for _, value in intact_records(t, ctx.db.chunks):
            _, _, length, refs = R.CHUNK_VAL.unpack(value)
            referenced += length * refs
        t.put(REFERENCED, R.U64.pack(referenced), db=ctx.db.meta)
    return bytes(t.get(b"secret", db=ctx.db.meta) or b"")


def stage_markers(ctx: Ctx, t: lmdb.Transaction) -> dict[str, dict[str, Any]]:
    """Every staged import's marker (b"stage:"+token -> {ns, ino}), by token."""
    cur = t.cursor(db=ctx.db.meta)
    out: dict[str, dict[str, Any]] = {}
    if cur.set_range(STAGE_PREFIX):
        for key, raw in cur:
            if not bytes(key).startswith(STAGE_PREFIX):
                break
            out[bytes(key)[len(STAGE_PREFIX) :].decode()] = json.loads(bytes(raw))
    return out


def staged_roots(ctx: Ctx, t: lmdb.Transaction) -> list[tuple[int, int]]:
    """(namespace id, directory inode of volume 0) of every staged import tree, alive
    or dead: part of its namespace (and its usage) though no entry names it."""
    return [(m["ns"], m["ino"]) for m in stage_markers(ctx, t).values()]
