"""The Prism store: per-VM namespaces over content-addressed chunks, in LMDB and segments.

On-disk layout of a data directory (every directory 0700 and file 0600, tightened on open:
the metadata holds the file-handle MAC key)::

    DATA/meta/data.mdb, lock.mdb   LMDB environment (all metadata, see the databases below)
    DATA/meta/journal              redo journal of a running server (`prism.store.journal`)
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
              b"usage_rev" -> what `usage` counts (USAGE_REV; older counters are marked
              invalid on open, so they are re-measured);
              b"stage:"+token -> JSON {ns, ino}: an import being built (see below)
    ns        ns id u32 -> JSON {name, kind ("vm"|"snapshot"), top layer, clients, quota, of,
              shares, and for a VM: secure, squash, anon_uid, anon_gid (`types.Export`; a
              record written before these existed lacks them and means insecure, squash none,
              the access it always had)}
    names     name -> ns id u32 ("web" for a VM, "web@monday" for its snapshot)
    layers    layer id u64 -> JSON {parent, vols, imports, next_vol, next_import}
    inodes    layer|vol|ino -> packed Inode, or b"" (whiteout: removed in this layer)
    dirents   layer|vol|dir|cookie|name -> vol|ino|type, or b"" (whiteout)
    cmap      layer|vol|ino|chunk index -> chunk key|length|segment|offset, or b"" (hole)
    chunks    xxh3-128 hash|seq -> segment|offset|length|refcount
    segments  segment id -> appended bytes|live bytes
    usage     ns id -> logical bytes (file sizes and symlink targets)|objects|valid

Layers (copy-on-write and instant clone). A namespace's metadata is a chain of layers: its
mutable *top* layer, then frozen ancestors. A read walks the chain top-down and takes the
first record it meets for a key (a whiteout meaning "gone"); a write always goes to the top.
Snapshot and clone *freeze* the source's top (it becomes the shared parent) and give the
source and the clone fresh empty tops: O(1), independent of the tree's size. Rollback points
a namespace's top at a fresh layer over the snapshot's. A frozen layer is never written again;
`gc` drops layers no namespace reaches and releases what they referenced.

Volumes (composition). Objects are named (namespace, volume, inode). Volume 0 is the
namespace's own lineage. Grafting a subtree of another namespace (`clone` with a path)
*imports* the source's frozen layer: every volume of the source gets a new volume number here,
whose records live in this namespace's layers and fall back to the source's frozen chain, with
volume numbers in fallen-back directory entries translated through the import's map. So a
composition of subtrees from several VMs is O(number of volumes), not O(files).

Shares (`share`). A VM's record lists the live views of other VMs' subtrees mounted in it;
share k's objects are the source's volumes 0..SHARE_VOL_SPAN-1 seen as base+v, routed to
the source's live namespace. A share never leads above its root, whatever the source does:
every access through a share volume first walks the object's holding directories ('..' of
a directory; for another object the directory it was last made, renamed or linked into,
see `records.Inode`) and must meet the share's root before the source's root, else the
object is STALE there; the root's '..' is the directory holding the mount point. A
non-directory written before holders were recorded (parent fields 0) counts as inside
until it is next renamed, linked or unlinked; a hard-linked file counts where its holder is.

Content (dedup and copy-on-write). A file is cut into fixed, offset-aligned chunks of
CHUNK_SIZE (128 KiB). Fixed alignment (rather than content-defined chunking) keeps random
writes cheap: a write touches only the chunks it overlaps, so a 4 KiB write into a shared
1 GiB file reads, patches and stores one chunk and adds one chunk-map record to the writer's
top layer; identical files and identical aligned regions of partially identical files share
chunks. Chunks are keyed by xxh3-128 of their bytes and deduplicated inline; since xxh3 is not
collision-resistant and a VM may be an adversary, a hash hit also compares length and bytes,
and a genuine collision gets the next `seq`. All-zero chunks are stored as holes. A chunk's
refcount is the number of chunk-map records (in any existing layer) that name it.

Crash ordering. Content first, then metadata: new chunk bytes are appended to this process's
segment, the segment is fdatasync'd (and its directory fsync'd when the file is new), and only
then does the LMDB transaction that references them commit (LMDB commits with fsync, so a
commit is atomic and durable, even across a power cut). After any crash the store opens
cleanly; the only possible debris is segment bytes no committed chunk names, which `gc`
removes and `fsck` reports. Group commit: `begin_batch()` runs many operations in one LMDB
transaction (each in a nested transaction, so a failing one changes nothing) that shares one
fdatasync + one commit.

Shares. A share is a live mount of another VM's directory: an entry of the destination's
tree names a share volume (SHARE_VOL_BASE and up), routed through the destination's `shares`
to the source VM's live namespace. A snapshot is a frozen view and a clone a copy, so neither
carries shares: where a share was mounted they show an empty directory (made in their own
top layer; a snapshot of a VM with shares gets a private top over the frozen layer). A
rollback keeps the VM's shares, mounted again where the rolled-back tree has room. A VM that
others share from cannot be removed until those shares are (`remove_namespace(force=True)`
removes them first); fsck repairs dangling mount points that older versions left.

Staged imports. `prism import` builds its tree in a detached directory of the VM (inode
`ino` of volume 0, linked from nowhere; `begin_staging` records it under b"stage:"+token),
committing in bounded batches, then `publish_staging` links it at its destination in one
transaction. The builder holds DATA/staging/<token>.lock; a staged tree whose lock is free
belongs to a dead import and is debris, which the next import or gc removes
(`reap_stagings`). Until then its objects count in the VM's usage, as they did when built.

Damage. A record whose bytes changed on disk fails its seal and is refused (`Corrupt`: EIO on
the wire), never served; so is a chunk whose bytes no longer match its hash (each chunk is
verified whole, once per fetch). `fsck` lists both; `fsck --repair` restores a chunk from
another copy of its content and never turns damage into zeros. Upgrade: a format-1 store
(values without seals) is sealed in place, in one transaction, by the first process that
opens it (with progress in the log); a server of an older Prism must be stopped first.

The journal (`prism.store.journal`, `DATA/meta/journal`). A store opened with `journal=True`
(the server) makes a batch durable without committing it: `make_durable()` fdatasyncs the
segment, then appends the key/value changes made since the last durable point to the journal
and fdatasyncs that; `commit()` is then a checkpoint that also retires the journal's records.
Whoever opens or writes the store after the journal's owner died replays its records first.

Locks, always taken in this order: the journal's `flock` (its owner holds it for its lifetime;
an operator command only tries it, inside its write transaction, to replay a dead owner's
records) -> the store's write lock (`prism.store.writelock`: flocks on DATA/meta and DATA) ->
LMDB's writer mutex. Every top-level write transaction takes the write lock first and drops it
when it ends, so no process ever waits inside LMDB for another's writer: the server only tries
the lock (`try_begin_batch`) and lets its writes wait asynchronously while reads, which never
wait for a writer, go on; an operator command waits for it, and commits its batches in
bounded steps (`prism import`: every COMMIT_EVERY_SECONDS; `prism gc`: every
`check.STEP_SECONDS` or `check.STEP_RECORDS`, or one layer fold or segment compaction) so
that the server's writes wait little.

A full disk. Content appends leave `segments.metadata_reserve()` bytes free, and new names half
of it, so checkpoints and REMOVE keep working once data or names have filled the disk. If a
checkpoint fails anyway (something else filled the filesystem), the journal keeps its records
and the batch is reopened from LMDB plus those records: nothing acknowledged is lost, calls
waiting for that checkpoint fail with NoSpace, and the owner retries later. The owner starts
on a full disk the same way: a dead owner's records it cannot checkpoint stay in the journal
and in its open batch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lmdb
import xxhash

from prism.errors import (
    Busy,
    Corrupt,
    CrossDevice,
    Exists,
    FileTooLarge,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSync,
    PermissionDenied,
    QuotaExceeded,
    ReadOnly,
    Stale,
    StoreError,
    TooManyLinks,
)
from prism.store import records as R
from prism.store.diskio import PRIVATE_DIR, PRIVATE_FILE
from prism.store.journal import (
    DELETE,
    PUT,
    Change,
    Journal,
    JournalBusy,
    decode_changes,
    encode_changes,
)
from prism.store.records import Inode
from prism.store.sealed import SealedCursor, SealedTxn, seal, seal_all
from prism.store.segments import DamagedChunk, SegmentFiles, metadata_reserve
from prism.store.types import (
    ACCESS_DELETE,
    ACCESS_EXECUTE,
    ACCESS_EXTEND,
    ACCESS_LOOKUP,
    ACCESS_MODIFY,
    ACCESS_READ,
    CHUNK_SIZE,
    INO_BITS,
    MAX_FILE_SIZE,
    NAME_MAX,
    NOBODY,
    NOW,
    ROOT_INO,
    SQUASH_MODES,
    SYMLINK_MAX,
    Attr,
    CloneSource,
    Cred,
    DirEntry,
    Export,
    FileType,
    FsStat,
    NamespaceInfo,
    ObjectId,
    SetAttr,
    ShareInfo,
    StoreStats,
    Usage,
)
from prism.store.writelock import WriteLock

FORMAT_VERSION = 2
"""1: values stored bare; 2: every value sealed (`prism.store.sealed`). Opening a format-1
store seals every record in one transaction first."""
MAP_SIZE = 1 << 40
NLINK_MAX = 65000
WRITE_LOCK_WAIT = 120.0
"""How long a process waits for the store's write lock before giving up with Busy."""
MAX_VOLUMES = 0x8000
"""Volumes 1..0x7fff hold composed-in subtrees; 0x8000 and up are reserved for shares."""
SHARE_VOL_BASE = 0x8000
SHARE_VOL_SPAN = 0x40
"""A share of another VM's subtree appears as volumes base..base+SPAN-1: the source's
volume v is seen as base + v (so fileids stay unique inside the namespace)."""
MAX_DEPTH = 100000
"""Directories walked up from an object before giving up (no real tree is this deep)."""
SHARE_SLOTS = (0x10000 - SHARE_VOL_BASE) // SHARE_VOL_SPAN
"""Slots are handed out round-robin and never straight back: a handle into a removed share
stays stale until SHARE_SLOTS more shares have been made in that VM."""
STAGING_DIR = "staging"
"""DATA/staging/<token>.lock: flock'ed by the process building the import staged as token."""
VM_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
SNAP_NAME = VM_NAME
ZEROS = bytes(CHUNK_SIZE)
VERIFIED_CHUNKS = 64
"""Chunks read and verified lately, kept for the next small read of them (8 MiB at most)."""

DB_NAMES = (
    "meta", "ns", "names", "layers", "inodes", "dirents", "cmap", "chunks", "segments", "usage"
)  # fmt: skip
"""The databases in `Store._dbs` order: their index is the journal's and the seal's number."""
_R, _W, _X = 4, 2, 1
_NS_KEY = R.U32
_JOURNAL_GEN = b"journal_gen"
_USAGE_REV = b"usage_rev"
_STAGE = b"stage:"
USAGE_REV = 2
"""What the usage counters count: 2 = file sizes and symlink targets (1 left symlinks out)."""
log = logging.getLogger("prism.store")


_PARSED_CACHE_SIZE = 4096


def _parsed(cache: dict[bytes, dict[str, Any]], raw: bytes) -> dict[str, Any]:
    """The JSON record `raw`, parsed once per distinct stored bytes: a hit is always
    current, so the cache needs no invalidation (only emptying when full). Callers must not
    change the record they get; they copy it to write a new one."""
    record = cache.get(raw)
    if record is None:
        if len(cache) > _PARSED_CACHE_SIZE:
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


def _export_of(rec: dict[str, Any]) -> Export:
    """A VM record's access options (see the `ns` database above for missing fields)."""
    return Export(
        tuple(rec.get("clients", ())),
        rec.get("secure", False),
        rec.get("squash", "none"),
        rec.get("anon_uid", NOBODY),
        rec.get("anon_gid", NOBODY),
    )


def _set_export(
    rec: dict[str, Any],
    secure: bool | None,
    squash: str | None,
    anon_uid: int | None,
    anon_gid: int | None,
) -> None:
    """Change the given access options of VM record `rec` in place."""
    if squash is not None and squash not in SQUASH_MODES:
        raise InvalidArgument(f"invalid squash {squash!r}: use one of {', '.join(SQUASH_MODES)}")
    for what, value in (("anon uid", anon_uid), ("anon gid", anon_gid)):
        if value is not None and not 0 <= value < 1 << 32:
            raise InvalidArgument(f"invalid {what} {value}: use 0 to 4294967295")
    changes: dict[str, Any] = {
        "secure": secure,
        "squash": squash,
        "anon_uid": anon_uid,
        "anon_gid": anon_gid,
    }
    rec.update((key, value) for key, value in changes.items() if value is not None)


def check_name(name: bytes) -> None:
    """Refuse names that cannot be a directory entry."""
    if not name:
        raise InvalidName("empty name")
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes; the limit is {NAME_MAX}")
    if name in (b".", b".."):
        raise InvalidName(f"{name.decode()!r} cannot be used here")
    if b"/" in name or b"\0" in name:
        raise InvalidName("names cannot contain '/' or NUL")


def check_vm_name(name: str) -> None:
    if not VM_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid VM name {name!r}: use 1-63 of a-z 0-9 _ . - starting with a letter or digit"
        )


def parse_clients(clients: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate CIDRs (a bare address means a single host); return them normalised."""
    out = []
    for spec in clients:
        try:
            out.append(str(ipaddress.ip_network(spec, strict=False)))
        except ValueError:
            raise InvalidArgument(
                f"invalid client address {spec!r}: use a CIDR like 10.0.0.0/24 or an address"
            ) from None
    return tuple(out)


@dataclass(slots=True)
class _View:
    """A namespace as one operation sees it."""

    id: int
    name: str
    kind: str
    top: int
    readonly: bool
    quota: int | None
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _ChunkRef:
    key: bytes  # hash 16 | seq u32
    length: int
    segment: int
    offset: int


@dataclass(frozen=True, slots=True)
class _Out:
    """Maps a routed operation's local (vol, ino) back to the caller's ObjectId."""

    ns: int
    base: int = 0

    def oid(self, vol: int, ino: int) -> ObjectId:
        return ObjectId(self.ns, vol + self.base, ino)


def _raw(txn: lmdb.Transaction | None) -> lmdb.Transaction | None:
    """The LMDB transaction under a sealed one (LMDB nests only its own)."""
    return cast(SealedTxn, txn).raw if txn is not None else None


def _chunk_ref(raw: bytes | memoryview) -> _ChunkRef:
    digest, seq, length, segment, offset = R.CMAP_VAL.unpack(raw)
    return _ChunkRef(R.CHUNK_KEY.pack(digest, seq), length, segment, offset)


PathEntry = tuple[int, int, dict[int, int] | None]
"""(layer, volume as numbered in that layer, volume translation into the viewer's numbering)"""


class _ReadTxn:
    """Context manager for reads; a plain class because it runs on every call."""

    __slots__ = ("_batch", "_env", "_index", "_txn")

    def __init__(
        self, env: lmdb.Environment, batch: lmdb.Transaction | None, index: dict[Any, int]
    ) -> None:
        self._env = env
        self._batch = batch
        self._index = index
        self._txn: lmdb.Transaction | None = None

    def __enter__(self) -> lmdb.Transaction:
        if self._batch is not None:
            return self._batch
        self._txn = self._env.begin(buffers=False)
        return cast(lmdb.Transaction, SealedTxn(self._txn, self._index))

    def __exit__(self, *exc: object) -> None:
        if self._txn is not None:
            self._txn.abort()


class _Recorder:
    """A nested write transaction that also notes each change for the journal."""

    __slots__ = ("_db_index", "_txn", "changes", "cursor", "get")

    def __init__(self, txn: lmdb.Transaction, db_index: dict[Any, int]) -> None:
        self._txn = txn
        self._db_index = db_index
        self.changes: list[Change] = []
        self.get = txn.get
        self.cursor = txn.cursor

    def put(self, key: bytes, value: bytes, *, db: Any) -> bool:
        self.changes.append((PUT, self._db_index[db], bytes(key), bytes(value)))
        return self._txn.put(key, value, db=db)

    def delete(self, key: bytes, *, db: Any) -> bool:
        self.changes.append((DELETE, self._db_index[db], bytes(key), b""))
        return self._txn.delete(key, db=db)


class Store:
    """Namespaces of POSIX trees over deduplicated chunks. See the module docstring."""

    def __init__(self, root: Path, env: lmdb.Environment, journal: Journal | None = None) -> None:
        # Fix: this was `self.root`, which shadowed the `root(ns_id)` method of the contract.
        self.path = root
        self._env = env
        self._meta = env.open_db(b"meta")
        self._ns = env.open_db(b"ns")
        self._names = env.open_db(b"names")
        self._layers = env.open_db(b"layers")
        self._inodes = env.open_db(b"inodes")
        self._dirents = env.open_db(b"dirents")
        self._cmap = env.open_db(b"cmap")
        self._chunks = env.open_db(b"chunks")
        self._segdb = env.open_db(b"segments")
        self._usage = env.open_db(b"usage")
        self.segments = SegmentFiles(root / "segments")
        self._batch: lmdb.Transaction | None = None
        self._paths: dict[tuple[int, int], tuple[PathEntry, ...]] = {}
        self._ns_cache: dict[bytes, dict[str, Any]] = {}
        self._layer_cache: dict[bytes, dict[str, Any]] = {}
        self._exports: dict[int, tuple[dict[str, Any], Export]] = {}
        self._import_maps: dict[tuple[int, int], dict[int, int]] = {}
        self.boot_id = secrets.randbits(63) | 1
        self.damaged_reads = 0
        """Reads refused because content failed its hash check (since this process began)."""
        self._damage_logged: set[bytes] = set()
        self._verified: dict[tuple[int, int, int], bytes] = {}  # (segment, offset, length)
        self._dbs = (
            self._meta,
            self._ns,
            self._names,
            self._layers,
            self._inodes,
            self._dirents,
            self._cmap,
            self._chunks,
            self._segdb,
            self._usage,
        )
        self._db_index = {db: i for i, db in enumerate(self._dbs)}
        assert len(DB_NAMES) == len(self._dbs)
        self._journal_path = root / "meta" / "journal"
        self._write_lock = WriteLock(root)
        self._writer: lmdb.Transaction | None = None  # the top-level write txn, if any
        self._broken: BaseException | None = None  # why this process may no longer write
        self.journal = journal
        self._journaled: list[Change] = []  # the batch's changes not yet in the journal
        self._upgrade()
        # The first write: `_begin_write` replays what a dead journal owner left, so every
        # process opening the store sees its acknowledged changes (the journal's owner
        # resumes its records afterwards, in `_resume_journal`).
        with self._write() as t:
            version = t.get(b"format", db=self._meta)
            if version is None:
                t.put(b"format", R.U32.pack(FORMAT_VERSION), db=self._meta)
                t.put(b"secret", secrets.token_bytes(32), db=self._meta)
            elif R.U32.unpack(version)[0] != FORMAT_VERSION:
                raise Corrupt(f"{root} holds a store of an unknown format version")
            if self._get_meta(t, _USAGE_REV) != USAGE_REV:
                # Counters kept under an older rule are re-measured on their next use.
                for key, raw in list(t.cursor(db=self._usage)):
                    t.put(key, R.USAGE_VAL.pack(*R.USAGE_VAL.unpack(raw)[:2], 0), db=self._usage)
                t.put(_USAGE_REV, R.U64.pack(USAGE_REV), db=self._meta)
            self.secret: bytes = bytes(t.get(b"secret", db=self._meta) or b"")

    def _upgrade(self) -> None:
        """Seal every record of a format-1 store, in one transaction (before any journal
        replay, which seals what it replays). A live server of an older Prism must not
        see its records change: while one owns the journal, refuse."""
        with self._env.begin() as t:
            version = t.get(b"format", db=self._meta)
        if version is None or len(version) != R.U32.size or R.U32.unpack(version)[0] != 1:
            return
        if self.journal is None and self._journal_path.exists():  # (a server owns it already)
            try:
                Journal.open(self._journal_path).close()
            except JournalBusy:
                raise Busy(
                    f"{self.path} is served by an older Prism that owns {self._journal_path}; "
                    "stop it, then run any prism command to upgrade the store"
                ) from None
        self._write_lock.acquire(WRITE_LOCK_WAIT)
        txn = self._env.begin(write=True)
        try:
            version = txn.get(b"format", db=self._meta)
            if version is not None and len(version) == R.U32.size:  # nobody upgraded meanwhile
                log.warning("upgrading %s to format 2: sealing every record", self.path)
                count = seal_all(
                    txn,
                    self._dbs,
                    lambda n: log.warning("upgrade: sealed %d records so far", n),
                )
                txn.put(
                    b"format",
                    seal(self._db_index[self._meta], b"format", R.U32.pack(FORMAT_VERSION)),
                    db=self._meta,
                )
                log.warning("upgrade done: sealed %d records", count)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        finally:
            self._write_lock.release()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        journal: bool = False,
        journal_wait: float = 5.0,
    ) -> Store:
        """Open the store at `path`. With `journal`, this process takes the redo journal
        (see `prism.store.journal`): a batch's durable points then cost one small fdatasync
        instead of an LMDB commit. One process at a time may journal (the server); another
        that asks waits up to `journal_wait` seconds, then gets Busy. Without `journal`, the
        changes a dead journal owner left are replayed first."""
        root = Path(path)
        meta = root / "meta"
        if not meta.exists():
            if not create:
                raise NotFound(f"no Prism store at {root}: create one with `prism vm create`")
            root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            meta.mkdir(mode=PRIVATE_DIR)
        make_private(root)
        env = lmdb.open(
            str(meta),
            mode=PRIVATE_FILE,
            map_size=MAP_SIZE,
            max_dbs=16,
            max_readers=1024,
            sync=True,
            metasync=True,
            readahead=False,
        )
        owned = _lock_journal(meta / "journal", journal_wait) if journal else None
        try:
            store = cls(root, env, owned)
        except BaseException:
            if owned is not None:
                owned.close()
            env.close()
            raise
        if owned is not None:
            try:
                store._resume_journal()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        if self._batch is not None:
            self.abort()
        self.segments.close()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self._write_lock.close()
        self._env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------

    @property
    def in_batch(self) -> bool:
        return self._batch is not None

    def begin_batch(self) -> None:
        if self._batch is None:
            self._batch = self._begin_write()

    def try_begin_batch(self) -> bool:
        """`begin_batch()` if the write lock is free now; False, at once, while another
        process holds or waits for it (the server retries without blocking its loop)."""
        if self._batch is None:
            if not self._write_lock.try_acquire():
                return False
            self.begin_batch()
        return True

    def commit(self) -> None:
        """Commit the open batch to LMDB with fsync (with a journal: a checkpoint)."""
        if self._batch is None:
            return
        batch, self._batch = self._batch, None
        journal = self.journal
        if journal is None:
            self._durable_commit(batch)
            return
        next_gen = journal.generation + 1
        try:
            batch.put(_JOURNAL_GEN, R.U64.pack(next_gen), db=self._meta)
            self.segments.sync()
            batch.commit()
        except BaseException as exc:
            # The batch is gone, but the journal (untouched: records are only retired by a
            # commit that succeeded) still holds everything acknowledged from it: reopen the
            # batch from there, keeping the write lock meanwhile (nobody may write on top of
            # a state that lacks those records), so nothing acknowledged is lost and the
            # journal stays the durable copy until a later checkpoint succeeds.
            self.forget_layers()
            batch.abort()
            self._writer = None
            self._reopen_batch()
            raise _commit_error(exc, self.path) from exc
        self._writer = None
        self._write_lock.release()
        self._journaled.clear()
        journal.start(next_gen)
        self.segments.roll_if_full()

    def make_durable(self) -> None:
        """Make every operation of the open batch durable: append its changes to the journal
        and fdatasync it (content first), or commit the batch when there is no journal or
        no room in it. Group commit: one call covers every operation since the last."""
        journal = self.journal
        if self._batch is None:
            return
        if journal is None:
            self.commit()
            return
        if not self._journaled:
            self.segments.sync()
            return
        payload = encode_changes(self._journaled)
        if len(payload) > journal.room():
            self.commit()
            return
        self.segments.sync()
        try:
            journal.append(payload)
            journal.sync()
        except (OSError, NoSpace) as exc:  # checkpoint instead (or fail there)
            log.warning("journal write failed (%s); committing the batch instead", exc)
            self.commit()
            return
        self._journaled.clear()

    def _durable_commit(self, txn: lmdb.Transaction) -> None:
        """Content first (fdatasync the segment), then the metadata that names it."""
        try:
            self.segments.sync()
            txn.commit()
        except BaseException as exc:
            self._aborted(txn)
            error = _commit_error(exc, self.path)
            if error is exc:
                raise
            raise error from exc
        self._writer = None
        self._write_lock.release()
        self.segments.roll_if_full()

    def abort(self) -> None:
        if self._batch is not None:
            batch, self._batch = self._batch, None
            self._journaled.clear()
            self._aborted(batch)

    def _aborted(self, txn: lmdb.Transaction) -> None:
        """Abort `txn` and forget what it may have taught the caches.

        Fix: `_paths` is keyed by layer id, and layer ids come from a counter in LMDB, so an
        aborted transaction (a failed clone, a failing op in a batch, an aborted batch) hands
        its layer ids out again. Paths cached for the aborted layers would then be used for
        unrelated new layers (a clone made after a failed clone saw no root directory).
        """
        self.forget_layers()
        txn.abort()
        if txn is self._writer:
            self._writer = None
            self._write_lock.release()

    def forget_layers(self) -> None:
        """Drop what is cached by layer id (after an abort, or gc moving records)."""
        self._paths.clear()
        self._import_maps.clear()

    @contextlib.contextmanager
    def _write(self) -> Iterator[lmdb.Transaction]:
        if self._batch is not None:
            child = self._sealed(self._env.begin(write=True, parent=_raw(self._batch)))
            recorder = None if self.journal is None else _Recorder(child, self._db_index)
            try:
                yield child if recorder is None else cast(lmdb.Transaction, recorder)
            except BaseException:
                self._aborted(child)
                raise
            child.commit()
            if recorder is not None:
                self._journaled += recorder.changes
            return
        txn = self._begin_write()
        try:
            yield txn
        except BaseException:
            self._aborted(txn)
            raise
        self._durable_commit(txn)

    def _begin_write(self) -> lmdb.Transaction:
        """A top-level write transaction. A process that does not own the journal first
        checks whether its owner died with changes pending, and if so replays them in this
        transaction (holding LMDB's writer lock, so nobody writes in between). Takes the
        store's write lock first (`prism.store.writelock`), waiting up to WRITE_LOCK_WAIT."""
        if self._broken is not None:
            raise Corrupt(
                f"the store could not reload its journal after a failed commit "
                f"({self._broken}); restart the server, which replays it"
            )
        self._write_lock.acquire(WRITE_LOCK_WAIT)
        try:
            txn = self._writer = self._sealed(self._env.begin(write=True))
        except BaseException:
            self._write_lock.release()
            raise
        if self.journal is None and self._journal_path.exists():
            try:
                orphan = Journal.open(self._journal_path)
            except JournalBusy:
                return txn  # its owner is alive
            except BaseException:
                self._aborted(txn)
                raise
            try:
                generation, applied = self._apply_journal(txn, orphan)
                if applied:  # retired by this transaction's commit
                    txn.put(_JOURNAL_GEN, R.U64.pack(generation + 1), db=self._meta)
                    log.warning("replayed %d journal records left by a stopped server", applied)
            except BaseException:
                self._aborted(txn)
                raise
            finally:
                orphan.close()
        return txn

    def _resume_journal(self) -> None:
        """Take up the records a dead owner left: apply them to a batch and checkpoint it.
        On a full disk the checkpoint fails; the batch then stays open (the journal is its
        durable copy) so that the server still starts and clients can remove files."""
        applied = self._reopen_batch()
        if not applied:
            return
        log.warning("replayed %d journal records left by a stopped server", applied)
        try:
            self.commit()
        except NoSpace as exc:
            log.warning("%s; serving them from the journal until a checkpoint succeeds", exc)

    def _reopen_batch(self) -> int:
        """Open the batch as LMDB plus the journal's records, exactly what was acknowledged
        (changes not yet journaled are dropped, and the write verifier changes so that
        clients resend their UNSTABLE writes); return the number of records."""
        journal = self.journal
        assert journal is not None and self._batch is None
        self._journaled.clear()
        self.boot_id = secrets.randbits(63) | 1
        try:
            txn = self._begin_write()
        except BaseException as exc:
            self._broken = exc
            raise
        try:
            _, applied = self._apply_journal(txn, journal)
        except BaseException as exc:
            # Keep the write lock until this process exits: another writer must not commit
            # on top of a state that lacks the journal's records (it replays them first once
            # the journal's owner is gone).
            self.forget_layers()
            txn.abort()
            self._writer = None
            self._broken = exc
            raise
        if applied:
            self._batch = txn
        else:
            self._aborted(txn)
        return applied

    def _apply_journal(self, txn: lmdb.Transaction, journal: Journal) -> tuple[int, int]:
        """Apply the records of the current generation to `txn`, leaving them in place
        (the commit that retires them bumps the generation); return (generation, records).
        The journal's next append goes after them."""
        generation = self._get_meta(txn, _JOURNAL_GEN)
        payloads = journal.recover(generation)
        for payload in payloads:
            for kind, index, key, value in decode_changes(payload):
                if index >= len(self._dbs):
                    raise Corrupt(f"{journal.path} names an unknown database {index}")
                db = self._dbs[index]
                if kind == PUT:
                    txn.put(key, value, db=db)
                else:
                    txn.delete(key, db=db)
        if payloads:
            self.forget_layers()
        return generation, len(payloads)

    def _sealed(self, raw: lmdb.Transaction) -> lmdb.Transaction:
        """`raw` behind the one seam that seals and verifies every value (`sealed`)."""
        return cast(lmdb.Transaction, SealedTxn(raw, self._db_index))

    def _snapshot(self) -> lmdb.Transaction:
        """A read-only transaction of the caller's own (to abort), values verified."""
        return self._sealed(self._env.begin(buffers=False))

    def _read(self) -> _ReadTxn:
        """A read transaction (the open batch, when there is one, so reads see its writes)."""
        return _ReadTxn(self._env, self._batch, self._db_index)

    # -- counters ----------------------------------------------------------------------

    def _counter(self, t: lmdb.Transaction, key: bytes, start: int = 1) -> int:
        raw = t.get(key, db=self._meta)
        value = R.U64.unpack(raw)[0] if raw else start
        t.put(key, R.U64.pack(value + 1), db=self._meta)
        return value

    def _add_meta(self, t: lmdb.Transaction, key: bytes, delta: int) -> None:
        raw = t.get(key, db=self._meta)
        value = (R.U64.unpack(raw)[0] if raw else 0) + delta
        t.put(key, R.U64.pack(max(value, 0)), db=self._meta)

    def _get_meta(self, t: lmdb.Transaction, key: bytes) -> int:
        raw = t.get(key, db=self._meta)
        return R.U64.unpack(raw)[0] if raw else 0

    # -- namespaces and layers -----------------------------------------------------------

    def _ns_record(self, t: lmdb.Transaction, ns_id: int) -> dict[str, Any] | None:
        raw = t.get(_NS_KEY.pack(ns_id), db=self._ns)
        if raw is None:
            return None
        return _parsed(self._ns_cache, bytes(raw))

    def _view(self, t: lmdb.Transaction, ns_id: int) -> _View:
        rec = self._ns_record(t, ns_id)
        if rec is None:
            raise Stale(f"namespace {ns_id} no longer exists")
        return _View(
            ns_id,
            rec["name"],
            rec["kind"],
            rec["top"],
            rec["kind"] == "snapshot",
            rec.get("quota"),
            rec,
        )

    def _view_by_name(self, t: lmdb.Transaction, name: str) -> _View:
        raw = t.get(name.encode(), db=self._names)
        if raw is None:
            what = "snapshot" if "@" in name else "VM"
            for key, rec in t.cursor(db=self._ns):  # the names index is derived from these
                if _parsed(self._ns_cache, bytes(rec))["name"] == name:
                    raise Corrupt(
                        f"the names index has lost {what} {name!r} (namespace "
                        f"{_NS_KEY.unpack(key)[0]}); run `prism fsck --repair` to rebuild it"
                    )
            where = f"prism snapshot list {name.split('@')[0]}" if "@" in name else "prism vm list"
            raise NotFound(f"no {what} named {name!r}; see `{where}`")
        return self._view(t, R.U32.unpack(raw)[0])

    def _put_ns(self, t: lmdb.Transaction, rec: dict[str, Any]) -> None:
        t.put(_NS_KEY.pack(rec["id"]), json.dumps(rec, sort_keys=True).encode(), db=self._ns)

    def _layer_raw(self, t: lmdb.Transaction, layer: int) -> bytes:
        raw = t.get(R.U64.pack(layer), db=self._layers)
        if raw is None:
            raise Corrupt(f"layer {layer} is missing; run `prism fsck --repair`")
        return bytes(raw)

    def _layer(self, t: lmdb.Transaction, layer: int) -> dict[str, Any]:
        """A layer record of the caller's own, to change and put back."""
        return json.loads(self._layer_raw(t, layer))

    def _layer_ro(self, t: lmdb.Transaction, layer: int) -> dict[str, Any]:
        """A layer record for reading only, parsed once per distinct stored bytes."""
        return _parsed(self._layer_cache, self._layer_raw(t, layer))

    def _put_layer(self, t: lmdb.Transaction, layer: int, rec: dict[str, Any]) -> None:
        t.put(R.U64.pack(layer), json.dumps(rec, sort_keys=True).encode(), db=self._layers)

    def _new_layer(self, t: lmdb.Transaction, parent: int, like: dict[str, Any] | None) -> int:
        layer = self._counter(t, b"layer_next")
        rec = {
            "parent": parent,
            "vols": dict(like["vols"]) if like else {},
            "imports": dict(like["imports"]) if like else {},
            "next_vol": like["next_vol"] if like else 1,
            "next_import": like["next_import"] if like else 1,
        }
        self._put_layer(t, layer, rec)
        return layer

    def _layer_is_empty(self, t: lmdb.Transaction, layer: int) -> bool:
        prefix = R.layer_prefix(layer)
        for db in (self._inodes, self._dirents, self._cmap):
            cur = t.cursor(db=db)
            if cur.set_range(prefix) and bytes(cur.key()).startswith(prefix):
                return False
        rec = self._layer(t, layer)
        if rec["parent"] == 0:
            return False
        parent = self._layer(t, rec["parent"])
        return rec["vols"] == parent["vols"]

    def _freeze(self, t: lmdb.Transaction, view: _View) -> int:
        """Make the namespace's current state an immutable layer; return its id. O(1)."""
        if view.kind == "snapshot":
            return view.top
        if self._layer_is_empty(t, view.top):
            return int(self._layer(t, view.top)["parent"])
        frozen = view.top
        view.top = self._new_layer(t, frozen, self._layer(t, frozen))
        view.record = dict(view.record, top=view.top)
        self._put_ns(t, view.record)
        return frozen

    def _path(self, t: lmdb.Transaction, top: int, vol: int) -> tuple[PathEntry, ...]:
        """The layers to search, top-down, for records of `vol` in a view whose top is `top`."""
        cached = self._paths.get((top, vol))
        if cached is not None:
            return cached
        top_rec = self._layer_ro(t, top)
        out: list[PathEntry] = []
        layer = top
        while layer:
            out.append((layer, vol, None))
            layer = top_rec["parent"] if layer == top else self._layer_ro(t, layer)["parent"]
        source = top_rec["vols"].get(str(vol))
        if source is not None:
            src_layer, src_vol, imp = source
            mapping = self._import_maps.get((top, imp))
            if mapping is None:  # an import's map never changes once made
                raw_map = top_rec["imports"][str(imp)]["map"]
                mapping = self._import_maps[(top, imp)] = {int(k): v for k, v in raw_map.items()}
            for layer2, vol2, xl2 in self._path(t, src_layer, src_vol):
                composed = (
                    mapping if xl2 is None else {s: mapping.get(d, d) for s, d in xl2.items()}
                )
                out.append((layer2, vol2, composed))
        result = tuple(out)
        if vol == 0 or source is not None:
            if len(self._paths) > 65536:
                self._paths.clear()
            self._paths[(top, vol)] = result
        return result

    # -- inode records -------------------------------------------------------------------

    def _share_of(self, view: _View, vol: int) -> dict[str, Any]:
        for share in view.record.get("shares", ()):
            if share["base"] <= vol < share["base"] + SHARE_VOL_SPAN:
                return share
        raise Stale(f"the share this object was reached through is gone from {view.name}")

    def _routed(self, t: lmdb.Transaction, view: _View, vol: int) -> tuple[_View, int, int]:
        """Where a volume's objects live: (view of the owner, its volume, base offset).
        Share volumes lead into the source VM's live namespace."""
        if vol < SHARE_VOL_BASE:
            return view, vol, 0
        share = self._share_of(view, vol)
        target = self._view(t, share["src"])
        if not share["rw"]:
            target.readonly = True
            target.name = f"{view.name}:{share['path']} (a read-only share of {target.name})"
        return target, vol - share["base"], share["base"]

    def _below_share_root(
        self,
        t: lmdb.Transaction,
        share: dict[str, Any],
        src: _View,
        vol: int,
        ino: int,
        node: Inode,
    ) -> bool:
        """Whether the source's object (vol, ino) is still inside the share's subtree: its
        holding directory's '..' chain (see `records.Inode`) meets the share's root before
        the source's root. The source may move anything anywhere at any time; what it moved
        out, or what it left only in a directory outside, is no longer the share's."""
        root = (share["root"][0], share["root"][1])
        kind, pvol, pino = int(node.type), node.parent_vol, node.parent_ino
        for _ in range(MAX_DEPTH):
            if (vol, ino) == root:
                return True
            if pino == R.HOLDER_UNKNOWN:
                return False
            if pino == R.HOLDER_UNRECORDED:
                return kind != FileType.DIR  # made by an older Prism; see the docstring
            if (pvol, pino) == (vol, ino) or pvol >= SHARE_VOL_SPAN:
                return False  # the source's root, or a volume the share does not show
            holder = self._holder(t, src, pvol, pino)
            if holder is None or holder[0] != FileType.DIR:
                return False
            vol, ino = pvol, pino
            kind, pvol, pino = holder
        return False

    def _holder(
        self, t: lmdb.Transaction, view: _View, vol: int, ino: int
    ) -> tuple[int, int, int] | None:
        """(type, holder vol, holder ino) of an object of the view's own volumes, as
        `_inode` would give them, unpacking nothing else (share checks walk these)."""
        for layer, v, xl in self._path(t, view.top, vol):
            raw = t.get(R.inode_key(layer, v, ino), db=self._inodes)
            if raw is not None:
                if not raw:
                    return None
                kind, pvol, pino = R.holder_of(raw)
                if xl is not None and pino not in (R.HOLDER_UNRECORDED, R.HOLDER_UNKNOWN):
                    pvol = xl.get(pvol, pvol)
                return kind, pvol, pino
        return None

    def _inode(self, t: lmdb.Transaction, view: _View, vol: int, ino: int) -> Inode | None:
        if vol >= SHARE_VOL_BASE:
            target, local, base = self._routed(t, view, vol)
            node = self._inode(t, target, local, ino)
            if node is not None and R.holder_known(node):
                share = self._share_of(view, vol)
                if [local, ino] == share["root"]:
                    node.parent_vol, node.parent_ino = share["at"]
                else:
                    node.parent_vol += base
            return node
        for layer, v, xl in self._path(t, view.top, vol):
            raw = t.get(R.inode_key(layer, v, ino), db=self._inodes)
            if raw is not None:
                if not raw:
                    return None
                node = Inode.unpack(raw)
                if xl is not None and R.holder_known(node):
                    node.parent_vol = xl.get(node.parent_vol, node.parent_vol)
                return node
        return None

    def _inode_record(self, t: lmdb.Transaction, view: _View, vol: int, ino: int) -> bytes | None:
        """The stored inode record, for readers of its attributes only (a directory's parent
        fields are not translated into the view's volumes, as `_inode` does)."""
        if vol >= SHARE_VOL_BASE:
            node = self._inode(t, view, vol, ino)
            return node.pack() if node is not None else None
        for layer, v, _ in self._path(t, view.top, vol):
            raw = t.get(R.inode_key(layer, v, ino), db=self._inodes)
            if raw is not None:
                return cast(bytes, raw) or None
        return None

    def _put_inode(self, t: lmdb.Transaction, view: _View, vol: int, ino: int, node: Inode) -> None:
        t.put(R.inode_key(view.top, vol, ino), node.pack(), db=self._inodes)

    def _lower_has(self, t: lmdb.Transaction, path: tuple[PathEntry, ...], db: Any, make) -> bool:
        """Whether a layer below the top holds a live record (so a whiteout is needed)."""
        for layer, v, _ in path[1:]:
            raw = t.get(make(layer, v), db=db)
            if raw is not None:
                return bool(raw)
        return False

    def _drop_inode(self, t: lmdb.Transaction, view: _View, vol: int, ino: int) -> None:
        path = self._path(t, view.top, vol)
        key = R.inode_key(view.top, vol, ino)
        if self._lower_has(t, path, self._inodes, lambda layer, v: R.inode_key(layer, v, ino)):
            t.put(key, R.WHITEOUT, db=self._inodes)
        else:
            t.delete(key, db=self._inodes)

    def _obj(
        self, t: lmdb.Transaction, oid: ObjectId, *, writable: bool = False
    ) -> tuple[_View, ObjectId, Inode, _Out]:
        """Resolve an identity: (owner's view, the object's local id there, its inode, the
        map back to the caller's ids). Local and caller ids differ only inside a share."""
        outer = self._view(t, oid.ns)
        view, vol, base = self._routed(t, outer, oid.vol)
        node = self._inode(t, view, vol, oid.ino)
        if node is None:
            raise Stale(f"object {oid.fileid} in {outer.name} no longer exists")
        if base:
            share = self._share_of(outer, oid.vol)
            if not self._below_share_root(t, share, view, vol, oid.ino, node):
                raise Stale(
                    f"object {oid.fileid} is no longer inside {outer.name}:{share['path']} "
                    "(its source VM moved it out of the shared directory)"
                )
        if writable and view.readonly:
            raise ReadOnly(
                f"{view.name} is read-only" if base else f"{view.name} is a read-only snapshot"
            )
        return view, ObjectId(view.id, vol, oid.ino), node, _Out(outer.id, base)

    def _attr(self, oid: ObjectId, node: Inode) -> Attr:
        return Attr(
            oid=oid,
            type=node.type,
            mode=node.mode,
            nlink=node.nlink,
            uid=node.uid,
            gid=node.gid,
            size=node.size,
            used=node.size,
            rdev=(node.rdev_major, node.rdev_minor),
            atime_ns=node.atime_ns,
            mtime_ns=node.mtime_ns,
            ctime_ns=node.ctime_ns,
        )

    def _alloc_ino(self, t: lmdb.Transaction, view: _View) -> int:
        ino = self._counter(t, b"ino" + _NS_KEY.pack(view.id), start=ROOT_INO + 1)
        if ino >= 1 << INO_BITS:
            raise InvalidArgument("namespace ran out of inode numbers")
        return ino

    # -- directory entries ---------------------------------------------------------------

    def _entry(
        self, t: lmdb.Transaction, view: _View, dvol: int, dino: int, name: bytes
    ) -> tuple[int, int, FileType] | None:
        if dvol >= SHARE_VOL_BASE:
            target, local, base = self._routed(t, view, dvol)
            found = self._entry(t, target, local, dino, name)
            if found is None or found[0] >= SHARE_VOL_SPAN:
                return None  # (volumes added to the source later are not shared)
            return found[0] + base, found[1], found[2]
        for layer, v, xl in self._path(t, view.top, dvol):
            raw = t.get(R.dirent_key(layer, v, dino, name), db=self._dirents)
            if raw is not None:
                if not raw:
                    return None
                vol, ino, ftype = R.DIRENT_VAL.unpack(raw)
                if xl is not None:
                    vol = xl.get(vol, vol)
                return vol, ino, FileType(ftype)
        return None

    def _put_entry(
        self,
        t: lmdb.Transaction,
        view: _View,
        dvol: int,
        dino: int,
        name: bytes,
        target: tuple[int, int, FileType],
    ) -> None:
        t.put(
            R.dirent_key(view.top, dvol, dino, name),
            R.DIRENT_VAL.pack(target[0], target[1], int(target[2])),
            db=self._dirents,
        )

    def _drop_entry(self, t: lmdb.Transaction, view: _View, dvol: int, dino: int, name: bytes):
        path = self._path(t, view.top, dvol)
        key = R.dirent_key(view.top, dvol, dino, name)
        if self._lower_has(
            t, path, self._dirents, lambda layer, v: R.dirent_key(layer, v, dino, name)
        ):
            t.put(key, R.WHITEOUT, db=self._dirents)
        else:
            t.delete(key, db=self._dirents)

    def _scan_layer_dir(
        self, t: lmdb.Transaction, prefix: bytes, after: int, prio: int, xl: dict[int, int] | None
    ) -> Iterator[tuple[int, bytes, int, bytes, dict[int, int] | None]]:
        cur = t.cursor(db=self._dirents)
        start = prefix + R.DIRENT_COOKIE.pack(after + 1) if after else prefix
        if not cur.set_range(start):
            return
        plen = len(prefix)
        for key, value in cur:
            key = bytes(key)
            if not key.startswith(prefix):
                return
            cookie = R.DIRENT_COOKIE.unpack_from(key, plen)[0]
            yield cookie, key[plen + 8 :], prio, bytes(value), xl

    def _list_raw(
        self, t: lmdb.Transaction, view: _View, dvol: int, dino: int, after: int
    ) -> Iterator[tuple[int, bytes, int, int, int]]:
        """Live entries after cookie `after`, merged over the layers, in cookie order:
        (cookie, name, vol, ino, type value), volumes in the view's numbering."""
        if dvol >= SHARE_VOL_BASE:
            target, local, base = self._routed(t, view, dvol)
            for cookie, name, vol, ino, ftype in self._list_raw(t, target, local, dino, after):
                if vol < SHARE_VOL_SPAN:
                    yield cookie, name, vol + base, ino, ftype
            return
        path = self._path(t, view.top, dvol)
        if len(path) == 1:  # one layer: no merge needed, whiteouts cannot occur
            layer, v, _ = path[0]
            prefix = R.dirent_prefix(layer, v, dino)
            cur = t.cursor(db=self._dirents)
            if not cur.set_range(prefix + R.DIRENT_COOKIE.pack(after + 1) if after else prefix):
                return
            plen = len(prefix)
            cookie_at, entry_of = R.DIRENT_COOKIE.unpack_from, R.DIRENT_VAL.unpack
            # (`_scan_layer_dir` inlined: this is READDIR's loop; buffers=False gives bytes)
            for key, value in cast(Iterator[tuple[bytes, bytes]], cur):
                if not key.startswith(prefix):
                    return
                if value:
                    yield (cookie_at(key, plen)[0], key[plen + 8 :], *entry_of(value))
            return
        streams = [
            self._scan_layer_dir(t, R.dirent_prefix(layer, v, dino), after, prio, xl)
            for prio, (layer, v, xl) in enumerate(path)
        ]
        last: tuple[int, bytes] | None = None
        for cookie, name, _prio, value, xl in heapq.merge(*streams):
            if (cookie, name) == last:
                continue
            last = (cookie, name)
            if not value:
                continue
            vol, ino, ftype = R.DIRENT_VAL.unpack(value)
            if xl is not None:
                vol = xl.get(vol, vol)
            yield cookie, name, vol, ino, ftype

    def _list(
        self,
        t: lmdb.Transaction,
        view: _View,
        dvol: int,
        dino: int,
        after: int,
        out: _Out | None = None,
    ) -> Iterator[DirEntry]:
        out = out or _Out(view.id)
        for cookie, name, vol, ino, ftype in self._list_raw(t, view, dvol, dino, after):
            yield DirEntry(name, out.oid(vol, ino), _ftype(ftype), cookie)

    def _is_empty_dir(self, t: lmdb.Transaction, view: _View, vol: int, ino: int) -> bool:
        return next(self._list(t, view, vol, ino, 0), None) is None

    # -- permissions ---------------------------------------------------------------------

    @staticmethod
    def _may(node: Inode, cred: Cred | None, want: int) -> bool:
        if cred is None or cred.is_root:
            if want & _X and node.type != FileType.DIR:
                return bool(node.mode & 0o111) or cred is None
            return True
        if cred.uid == node.uid:
            bits = node.mode >> 6
        elif cred.in_group(node.gid):
            bits = node.mode >> 3
        else:
            bits = node.mode
        return bits & want == want

    def _require(self, node: Inode, cred: Cred | None, want: int, what: str) -> None:
        if not self._may(node, cred, want):
            raise PermissionDenied(f"permission denied: {what}")

    def _require_data(self, node: Inode, cred: Cred | None, want: int) -> None:
        """Read/write of file data: the owner may always (as knfsd's owner override)."""
        if cred is not None and cred.uid == node.uid:
            return
        self._require(node, cred, want, "file mode forbids this")

    @staticmethod
    def _sticky_ok(dnode: Inode, node: Inode, cred: Cred | None) -> bool:
        if cred is None or cred.is_root or not dnode.mode & 0o1000:
            return True
        return cred.uid in (dnode.uid, node.uid)

    # -- usage and quota -----------------------------------------------------------------

    def _usage_get(self, t: lmdb.Transaction, view: _View) -> tuple[int, int]:
        raw = t.get(_NS_KEY.pack(view.id), db=self._usage)
        if raw is not None:
            nbytes, objects, valid = R.USAGE_VAL.unpack(raw)
            if valid:
                return nbytes, objects
        nbytes, objects = self._measure(t, view)
        t.put(_NS_KEY.pack(view.id), R.USAGE_VAL.pack(nbytes, objects, 1), db=self._usage)
        return nbytes, objects

    def _usage_add(self, t: lmdb.Transaction, view: _View, dbytes: int, dobjects: int) -> None:
        raw = t.get(_NS_KEY.pack(view.id), db=self._usage)
        if raw is None:
            return
        nbytes, objects, valid = R.USAGE_VAL.unpack(raw)
        if valid:
            t.put(
                _NS_KEY.pack(view.id),
                R.USAGE_VAL.pack(max(0, nbytes + dbytes), max(0, objects + dobjects), 1),
                db=self._usage,
            )

    def _set_usage(self, t: lmdb.Transaction, ns_id: int, nbytes: int, objects: int, valid: bool):
        t.put(_NS_KEY.pack(ns_id), R.USAGE_VAL.pack(nbytes, objects, int(valid)), db=self._usage)

    def _measure(self, t: lmdb.Transaction, view: _View) -> tuple[int, int]:
        """Walk the whole tree (after a composition made the counters unknown)."""
        seen: set[tuple[int, int]] = set()
        nbytes = objects = 0
        stack = [(0, ROOT_INO)]
        while stack:
            vol, ino = stack.pop()
            if (vol, ino) in seen:
                continue
            seen.add((vol, ino))
            node = self._inode(t, view, vol, ino)
            if node is None:
                continue
            objects += 1
            nbytes += charged_bytes(node)
            if node.type == FileType.DIR:
                stack.extend(
                    (e.oid.vol, e.oid.ino)
                    for e in self._list(t, view, vol, ino, 0)
                    if e.oid.vol < SHARE_VOL_BASE  # a share's bytes belong to its source
                )
        return nbytes, objects

    def _check_quota(self, t: lmdb.Transaction, view: _View, more_bytes: int) -> None:
        if view.quota is None:
            return
        used, _ = self._usage_get(t, view)
        if used + more_bytes > view.quota or (more_bytes == 0 and used >= view.quota):
            raise QuotaExceeded(
                f"{view.name} would exceed its quota of {view.quota} bytes "
                f"({used} used); raise it with `prism vm set {view.name} --quota SIZE`"
            )

    # -- content -------------------------------------------------------------------------

    def _store_chunk(self, t: lmdb.Transaction, content: bytes) -> tuple[bytes, int, int]:
        """Find or add `content`; take a reference. Returns (chunk key, segment, offset)."""
        digest = xxhash.xxh3_128_digest(content)
        length = len(content)
        cur = t.cursor(db=self._chunks)
        seq = 0
        if cur.set_range(digest):
            for key, value in cur:
                key = bytes(key)
                if key[:16] != digest:
                    break
                seq = R.CHUNK_KEY.unpack(key)[1] + 1
                segment, offset, clen, refs = R.CHUNK_VAL.unpack(value)
                if clen == length and self.segments.read(segment, offset, clen) == content:
                    if refs == 0:
                        self._add_meta(t, b"stored_bytes", length)
                        self._add_meta(t, b"chunk_count", 1)
                    t.put(key, R.CHUNK_VAL.pack(segment, offset, clen, refs + 1), db=self._chunks)
                    return key, segment, offset
        segment, offset = self.segments.append(content)
        key = R.CHUNK_KEY.pack(digest, seq)
        t.put(key, R.CHUNK_VAL.pack(segment, offset, length, 1), db=self._chunks)
        seg_key = R.U64.pack(segment)
        raw = t.get(seg_key, db=self._segdb)
        appended, live = R.SEGMENT_VAL.unpack(raw) if raw else (0, 0)
        t.put(
            seg_key,
            R.SEGMENT_VAL.pack(max(appended, offset + length), live + length),
            db=self._segdb,
        )
        self._add_meta(t, b"stored_bytes", length)
        self._add_meta(t, b"chunk_count", 1)
        return key, segment, offset

    def _unref_chunk(self, t: lmdb.Transaction, key: bytes) -> None:
        raw = t.get(key, db=self._chunks)
        if raw is None:
            return
        segment, offset, length, refs = R.CHUNK_VAL.unpack(raw)
        if refs <= 1:
            refs = 0
            self._add_meta(t, b"stored_bytes", -length)
            self._add_meta(t, b"chunk_count", -1)
        else:
            refs -= 1
        t.put(key, R.CHUNK_VAL.pack(segment, offset, length, refs), db=self._chunks)

    def _chunk_at(
        self, t: lmdb.Transaction, path: tuple[PathEntry, ...], ino: int, index: int
    ) -> _ChunkRef | None:
        for layer, v, _ in path:
            raw = t.get(R.cmap_key(layer, v, ino, index), db=self._cmap)
            if raw is not None:
                return _chunk_ref(raw) if raw else None
        return None

    def _chunk_bytes(
        self, ref: _ChunkRef | None, view: _View, vol: int, ino: int, index: int
    ) -> bytes:
        """Chunk `index` of the file, verified (b"" for a hole)."""
        if ref is None:
            return b""
        return self._read_run(view, vol, ino, index, [ref])

    def _read_run(
        self, view: _View, vol: int, ino: int, first: int, refs: list[_ChunkRef]
    ) -> bytes:
        """Whole chunks `first`, `first`+1... of a file, adjacent in one segment, read in one
        pread and each verified against its hash. Damage raises Corrupt, after it is counted
        in `damaged_reads` and logged once per chunk with the file and byte range. A lone
        chunk is kept (verified) for the next read of it: small reads of a chunk then fetch
        and hash it once, not once per read."""
        place = (refs[0].segment, refs[0].offset, refs[0].length)
        if len(refs) == 1:
            data = self._verified.get(place)
            if data is not None:
                return data
        try:
            data = self.segments.read_chunks(
                place[0], place[1], [(r.length, r.key[:16]) for r in refs]
            )
        except DamagedChunk as exc:
            ref = refs[exc.position]
            lo = (first + exc.position) * CHUNK_SIZE
            where = (
                f"{view.name}: file {ObjectId(view.id, vol, ino).fileid}, "
                f"bytes {lo}-{lo + ref.length - 1} (chunk {ref.key.hex()})"
            )
            self.damaged_reads += 1
            if ref.key not in self._damage_logged:
                if len(self._damage_logged) > 4096:
                    self._damage_logged.clear()
                self._damage_logged.add(ref.key)
                log.error("damaged content in %s: %s; reads of it fail with EIO", where, exc)
            raise Corrupt(
                f"damaged content in {where}; run `prism fsck --repair` to restore it "
                "from another copy or list the damaged files"
            ) from None
        if len(refs) == 1:
            if len(self._verified) >= VERIFIED_CHUNKS:  # bytes at a place never change
                del self._verified[next(iter(self._verified))]
            self._verified[place] = data
        return data

    def _set_chunk(
        self,
        t: lmdb.Transaction,
        top: int,
        path: tuple[PathEntry, ...],
        vol: int,
        ino: int,
        index: int,
        content: bytes,
    ) -> None:
        key = R.cmap_key(top, vol, ino, index)
        old = t.get(key, db=self._cmap)
        old_key = _chunk_ref(old).key if old else None
        if _all_zero(content):
            if self._lower_has(
                t, path, self._cmap, lambda layer, v: R.cmap_key(layer, v, ino, index)
            ):
                t.put(key, R.WHITEOUT, db=self._cmap)
            elif old is not None:
                t.delete(key, db=self._cmap)
        else:
            chunk_key, segment, offset = self._store_chunk(t, content)
            digest, seq = R.CHUNK_KEY.unpack(chunk_key)
            t.put(
                key,
                R.CMAP_VAL.pack(digest, seq, len(content), segment, offset),
                db=self._cmap,
            )
        if old_key is not None:
            self._unref_chunk(t, old_key)

    def _read_range(
        self, t: lmdb.Transaction, view: _View, vol: int, ino: int, start: int, end: int
    ) -> bytes:
        """Bytes [start, end) of a file: holes and the tails of short chunks read as zeros;
        stored chunks are fetched whole (one pread per run of chunks adjacent in a segment)
        and verified once per fetch, then the wanted bytes are sliced out."""
        path = self._path(t, view.top, vol)
        parts: list[bytes | memoryview] = []
        run: list[_ChunkRef] = []  # chunks adjacent in one segment, wanted end to end
        run_first = run_lo = run_len = 0  # run's first chunk index; wanted bytes in the run

        def flush() -> None:
            data = self._read_run(view, vol, ino, run_first, run)
            if run_lo == 0 and run_len == len(data):
                parts.append(data)
            else:
                parts.append(memoryview(data)[run_lo : run_lo + run_len])
            run.clear()

        for index in range(start // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1):
            base = index * CHUNK_SIZE
            lo = max(start, base) - base
            hi = min(end, base + CHUNK_SIZE) - base
            ref = self._chunk_at(t, path, ino, index)
            have = min(hi, ref.length) if ref is not None else 0
            if ref is not None and lo < have:
                last = run[-1] if run else None
                if (
                    last is not None
                    and lo == 0
                    and last.segment == ref.segment
                    and last.offset + last.length == ref.offset
                    and run_lo + run_len == ref.offset - run[0].offset
                ):
                    run.append(ref)
                    run_len += have
                else:
                    if run:
                        flush()
                    run.append(ref)
                    run_first, run_lo, run_len = index, lo, have - lo
            if hi > max(lo, have):
                if run:
                    flush()
                parts.append(ZEROS[: hi - max(lo, have)])
        if run:
            flush()
        if len(parts) == 1:
            return parts[0] if isinstance(parts[0], bytes) else bytes(parts[0])
        return b"".join(parts)

    def _write_range(
        self,
        t: lmdb.Transaction,
        view: _View,
        vol: int,
        ino: int,
        offset: int,
        data: bytes,
        new_size: int,
    ) -> None:
        path = self._path(t, view.top, vol)
        end = offset + len(data)
        mv = memoryview(data)
        for index in range(offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1):
            base = index * CHUNK_SIZE
            lo = max(offset, base)
            hi = min(end, base + CHUNK_SIZE)
            clen = min(CHUNK_SIZE, new_size - base)
            piece = mv[lo - offset : hi - offset]
            if lo == base and hi - base == clen:
                content = bytes(piece)
            else:
                old = self._chunk_bytes(self._chunk_at(t, path, ino, index), view, vol, ino, index)
                buf = bytearray(clen)
                buf[: min(len(old), clen)] = old[:clen]
                buf[lo - base : hi - base] = piece
                content = bytes(buf)
            self._set_chunk(t, view.top, path, vol, ino, index, content)

    def _truncate(
        self, t: lmdb.Transaction, view: _View, vol: int, ino: int, old_size: int, new_size: int
    ) -> None:
        if new_size >= old_size:
            return  # growing leaves a hole
        path = self._path(t, view.top, vol)
        if new_size % CHUNK_SIZE:
            index = new_size // CHUNK_SIZE
            old = self._chunk_bytes(self._chunk_at(t, path, ino, index), view, vol, ino, index)
            keep = new_size % CHUNK_SIZE
            if len(old) > keep:
                self._set_chunk(t, view.top, path, vol, ino, index, old[:keep])
        first_dropped = -(-new_size // CHUNK_SIZE)
        top_prefix = R.cmap_prefix(view.top, vol, ino)
        doomed: list[tuple[bytes, bytes]] = []
        cur = t.cursor(db=self._cmap)
        if cur.set_range(R.cmap_key(view.top, vol, ino, first_dropped)):
            for key, value in cur:
                if not bytes(key).startswith(top_prefix):
                    break
                doomed.append((bytes(key), bytes(value)))
        for key, value in doomed:
            t.delete(key, db=self._cmap)
            if value:
                self._unref_chunk(t, _chunk_ref(value).key)
        whiteouts: set[int] = set()
        for layer, v, _ in path[1:]:
            prefix = R.cmap_prefix(layer, v, ino)
            cur = t.cursor(db=self._cmap)
            if cur.set_range(R.cmap_key(layer, v, ino, first_dropped)):
                for key, value in cur:
                    key = bytes(key)
                    if not key.startswith(prefix):
                        break
                    if value:
                        whiteouts.add(R.CMAP_KEY.unpack(key)[3])
        for index in whiteouts:
            t.put(R.cmap_key(view.top, vol, ino, index), R.WHITEOUT, db=self._cmap)

    def _destroy(self, t: lmdb.Transaction, view: _View, vol: int, ino: int, node: Inode) -> None:
        """The last link is gone: release the object's own records."""
        if node.type == FileType.REG:
            self._truncate(t, view, vol, ino, node.size, 0)
        self._usage_add(t, view, -charged_bytes(node), -1)
        self._drop_inode(t, view, vol, ino)

    # -- public: namespaces --------------------------------------------------------------

    def _info(self, t: lmdb.Transaction, rec: dict[str, Any]) -> NamespaceInfo:
        clients = rec.get("clients", [])
        quota = rec.get("quota")
        export = _export_of(rec)
        if rec["kind"] == "snapshot":
            parent = self._ns_record(t, rec["of"])
            if parent is not None:
                clients = parent.get("clients", [])
                export = _export_of(parent)
        shares = []
        for share in rec.get("shares", ()):
            source = self._ns_record(t, share["src"])
            shares.append(
                ShareInfo(
                    share["path"],
                    source["name"] if source else "(removed)",
                    share["src_path"],
                    share["rw"],
                )
            )
        return NamespaceInfo(
            id=rec["id"],
            name=rec["name"],
            kind=rec["kind"],
            root=ObjectId(rec["id"], 0, ROOT_INO),
            readonly=rec["kind"] == "snapshot",
            clients=tuple(clients),
            quota=quota,
            created_ns=rec.get("created", 0),
            shares=tuple(shares),
            export=export,
        )

    def _make_ns(
        self,
        t: lmdb.Transaction,
        name: str,
        kind: str,
        top: int,
        *,
        clients: tuple[str, ...] = (),
        quota: int | None = None,
        of: int | None = None,
        next_ino: int | None = None,
    ) -> dict[str, Any]:
        if t.get(name.encode(), db=self._names) is not None:
            raise Exists(f"{name!r} already exists; pick another name or remove it first")
        ns_id = self._counter(t, b"ns_next")
        rec = {
            "id": ns_id,
            "name": name,
            "kind": kind,
            "top": top,
            "clients": list(clients),
            "quota": quota,
            "of": of,
            "created": time.time_ns(),
        }
        if kind == "vm":  # a new VM's access options (README: "Client access")
            _set_export(rec, True, "none", NOBODY, NOBODY)
        self._put_ns(t, rec)
        t.put(name.encode(), _NS_KEY.pack(ns_id), db=self._names)
        if next_ino is not None:
            t.put(b"ino" + _NS_KEY.pack(ns_id), R.U64.pack(next_ino), db=self._meta)
        return rec

    def create_namespace(
        self,
        name: str,
        *,
        clients: tuple[str, ...] | list[str] = (),
        quota: int | None = None,
        secure: bool | None = None,
        squash: str | None = None,
        anon_uid: int | None = None,
        anon_gid: int | None = None,
    ) -> NamespaceInfo:
        """A new VM; access options not given take the new-VM defaults (secure, squash
        none, anonymous 65534:65534)."""
        check_vm_name(name)
        clients = parse_clients(clients)
        if quota is not None and quota < 0:
            raise InvalidArgument("quota must be positive")
        with self._write() as t:
            top = self._new_layer(t, 0, None)
            rec = self._make_ns(t, name, "vm", top, clients=clients, quota=quota)
            _set_export(rec, secure, squash, anon_uid, anon_gid)
            self._put_ns(t, rec)
            now = time.time_ns()
            root = Inode(FileType.DIR, 0o755, 2, 0, 0, 0, 0, 0, now, now, now, 0, ROOT_INO)
            t.put(R.inode_key(top, 0, ROOT_INO), root.pack(), db=self._inodes)
            self._set_usage(t, rec["id"], 0, 1, True)
            return self._info(t, rec)

    def namespace(self, name: str) -> NamespaceInfo:
        with self._read() as t:
            return self._info(t, self._view_by_name(t, name).record)

    def export_of(self, ns_id: int) -> Export:
        """How a namespace may be reached (a snapshot as its VM); Stale if gone. The per-call
        fast path of the NFS server's access checks."""
        with self._read() as t:
            rec = self._ns_record(t, ns_id)
            if rec is None:
                raise Stale(f"namespace {ns_id} no longer exists")
            if rec["kind"] == "snapshot":
                rec = self._ns_record(t, rec["of"]) or rec
            cached = self._exports.get(id(rec))
            if cached is not None and cached[0] is rec:  # (holding rec keeps its id unique)
                return cached[1]
            if len(self._exports) > _PARSED_CACHE_SIZE:
                self._exports.clear()
            export = _export_of(rec)
            self._exports[id(rec)] = (rec, export)
            return export

    def clients_of(self, ns_id: int) -> tuple[str, ...]:
        """The client CIDRs bound to a namespace (a snapshot's are its VM's); Stale if gone."""
        return self.export_of(ns_id).clients

    def namespace_by_id(self, ns_id: int) -> NamespaceInfo:
        with self._read() as t:
            rec = self._ns_record(t, ns_id)
            if rec is None:
                raise Stale(f"namespace {ns_id} no longer exists")
            return self._info(t, rec)

    def list_namespaces(self, kind: str | None = None) -> list[NamespaceInfo]:
        with self._read() as t:
            out = []
            cur = cast(SealedCursor, t.cursor(db=self._ns))
            for _, raw in cur.intact():
                rec = json.loads(bytes(raw))
                if kind is None or rec["kind"] == kind:
                    out.append(self._info(t, rec))
            for key in cur.damaged:  # the others stay listed and served
                log.error("namespace record %s is damaged, not served; run `prism fsck`", key.hex())
            return sorted(out, key=lambda info: info.name)

    _UNCHANGED: Any = object()

    def set_namespace(
        self,
        name: str,
        *,
        clients: tuple[str, ...] | list[str] | None = None,
        quota: Any = _UNCHANGED,
        secure: bool | None = None,
        squash: str | None = None,
        anon_uid: int | None = None,
        anon_gid: int | None = None,
    ) -> NamespaceInfo:
        with self._write() as t:
            view = self._view_by_name(t, name)
            if view.kind != "vm":
                raise InvalidArgument(f"{name!r} is a snapshot; change its VM instead")
            rec = dict(view.record)
            if clients is not None:
                rec["clients"] = list(parse_clients(clients))
            if quota is not self._UNCHANGED:
                if quota is not None and quota < 0:
                    raise InvalidArgument("quota must be positive")
                rec["quota"] = quota
            _set_export(rec, secure, squash, anon_uid, anon_gid)
            self._put_ns(t, rec)
            return self._info(t, rec)

    def remove_namespace(self, name: str, *, force: bool = False) -> None:
        """Remove a namespace (a VM with its snapshots). A VM that others share from is
        refused, naming them, unless `force`, which removes those shares first."""
        with self._write() as t:
            view = self._view_by_name(t, name)
            dependants = self._shares_from(t, view.id) if view.kind == "vm" else []
            if dependants and not force:
                where = ", ".join(f"{rec['name']}:{sh['path']}" for rec, sh in dependants)
                raise Busy(
                    f"{name} is shared into {where}; remove those shares with `prism unshare`,"
                    f" or remove {name} and its shares with `prism vm rm {name} --force`"
                )
            for rec, sh in dependants:
                self._unshare(t, self._view(t, rec["id"]), sh)
            doomed = [view.record]
            if view.kind == "vm":
                doomed += [
                    json.loads(bytes(raw))
                    for _, raw in t.cursor(db=self._ns)
                    if json.loads(bytes(raw)).get("of") == view.id
                ]
            for rec in doomed:
                key = _NS_KEY.pack(rec["id"])
                t.delete(key, db=self._ns)
                t.delete(key, db=self._usage)
                t.delete(b"ino" + key, db=self._meta)
                t.delete(rec["name"].encode(), db=self._names)

    def snapshot(self, name: str, snap: str) -> NamespaceInfo:
        if not SNAP_NAME.fullmatch(snap):
            raise InvalidArgument(f"invalid snapshot name {snap!r}: use a-z 0-9 _ . -")
        with self._write() as t:
            view = self._view_by_name(t, name)
            if view.kind != "vm":
                raise InvalidArgument(f"{name!r} is a snapshot already")
            full = f"{name}@{snap}"
            if t.get(full.encode(), db=self._names) is not None:
                raise Exists(f"snapshot {full!r} already exists")
            frozen = self._freeze(t, view)
            # Fix: a snapshot records its VM's next inode number. A whole clone of the
            # snapshot continues volume 0's numbering from it; without it the clone restarted
            # at ROOT_INO + 1 and its new objects overwrote the snapshot's inodes.
            next_ino = self._get_meta(t, b"ino" + _NS_KEY.pack(view.id)) or ROOT_INO + 1
            mounts = view.record.get("shares", ())
            top = self._new_layer(t, frozen, self._layer(t, frozen)) if mounts else frozen
            rec = self._make_ns(t, full, "snapshot", top, of=view.id, next_ino=next_ino)
            nbytes, objects = self._usage_get(t, view)
            self._set_usage(t, rec["id"], nbytes, objects, True)
            snap_view = self._view(t, rec["id"])
            for share in mounts:
                self._unmount(t, snap_view, share["at"][0], share["at"][1], share["name"].encode())
            return self._info(t, rec)

    def list_snapshots(self, name: str) -> list[NamespaceInfo]:
        vm = self.namespace(name)
        return [s for s in self.list_namespaces("snapshot") if s.name.startswith(vm.name + "@")]

    def remove_snapshot(self, name: str, snap: str) -> None:
        self.namespace(name)
        full = f"{name}@{snap}"
        with self._write() as t:
            self._view_by_name(t, full)
        self.remove_namespace(full)

    def rollback(self, name: str, snap: str) -> NamespaceInfo:
        with self._write() as t:
            view = self._view_by_name(t, name)
            if view.kind != "vm":
                raise InvalidArgument(f"{name!r} is not a VM")
            snapshot = self._view_by_name(t, f"{name}@{snap}")
            view.top = self._new_layer(t, snapshot.top, self._layer(t, snapshot.top))
            view.record = dict(view.record, top=view.top)
            nbytes, objects = self._usage_get(t, snapshot)
            self._set_usage(t, view.id, nbytes, objects, True)
            # Shares are the VM's, not its content's: each is mounted again at its place,
            # and dropped when the rolled-back tree has no room for it there.
            kept = [sh for sh in view.record.get("shares", ()) if self._remount(t, view, sh)]
            view.record["shares"] = kept
            self._put_ns(t, view.record)
            return self._info(t, view.record)

    def clone(
        self,
        new: str,
        sources: list[CloneSource],
        *,
        into: bool = False,
        replace: bool = False,
        clients: tuple[str, ...] | list[str] = (),
        quota: int | None = None,
    ) -> NamespaceInfo:
        """Compose `new` from sources laid over each other; O(number of sources), plus one
        walk of the result when it has a quota (which the result must fit in).

        With `into`, the sources are laid over the existing VM `new`; a source whose
        destination already exists there is refused unless `replace`."""
        if not sources:
            raise InvalidArgument("a clone needs at least one source")
        check_vm_name(new)
        clients = parse_clients(clients)
        for src in sources:
            for p in (src.path, src.target):
                if not p.startswith("/"):
                    raise InvalidArgument(f"path {p!r} must be absolute (start with '/')")
        with self._write() as t:
            frozen: dict[int, int] = {}
            layers: list[tuple[int, _View]] = []
            for src in sources:
                name = src.ns if src.snapshot is None else f"{src.ns}@{src.snapshot}"
                sview = self._view_by_name(t, name)
                if sview.id not in frozen:
                    frozen[sview.id] = self._freeze(t, sview)
                layers.append((frozen[sview.id], sview))
            rest = list(zip(sources, layers, strict=True))
            before = 0
            if into:
                view = self._view_by_name(t, new)
                if view.kind != "vm":
                    raise InvalidArgument(f"cannot clone into snapshot {new!r}")
                if view.quota is not None:
                    before = self._usage_get(t, view)[0]
            elif _is_whole(sources[0]):
                layer, sview = layers[0]
                top = self._new_layer(t, layer, self._layer(t, layer))
                next_ino = self._get_meta(t, b"ino" + _NS_KEY.pack(sview.id)) or ROOT_INO + 1
                rec = self._make_ns(
                    t, new, "vm", top, clients=clients, quota=quota, next_ino=next_ino
                )
                nbytes, objects = self._usage_get(t, sview)
                self._set_usage(t, rec["id"], nbytes, objects, True)
                view = self._view(t, rec["id"])
                for share in sview.record.get("shares", ()):
                    pvol, pino = share["at"]
                    self._unmount(t, view, pvol, pino, share["name"].encode())
                rest = rest[1:]
            else:
                top = self._new_layer(t, 0, None)
                rec = self._make_ns(t, new, "vm", top, clients=clients, quota=quota)
                now = time.time_ns()
                root = Inode(FileType.DIR, 0o755, 2, 0, 0, 0, 0, 0, now, now, now, 0, ROOT_INO)
                t.put(R.inode_key(top, 0, ROOT_INO), root.pack(), db=self._inodes)
                self._set_usage(t, rec["id"], 0, 1, True)
                view = self._view(t, rec["id"])
            for src, (layer, sview) in rest:
                self._graft(t, view, src, layer, sview, replace=replace or not into)
            if rest:
                self._set_usage(t, view.id, 0, 0, False)
            if view.quota is not None:
                after = self._usage_get(t, view)[0]
                if after > view.quota:
                    raise QuotaExceeded(
                        f"{new} would hold {after} bytes, over its quota of {view.quota} bytes "
                        f"(this clone needs {after - before} bytes, {after - view.quota} more "
                        f"than the quota allows); raise it with `prism vm set {new} --quota "
                        "SIZE` (nothing was changed)"
                    )
            return self._info(t, view.record)

    def _graft(
        self,
        t: lmdb.Transaction,
        view: _View,
        src: CloneSource,
        layer: int,
        sview: _View,
        *,
        replace: bool,
    ) -> None:
        label = f"{sview.name}:{src.path}"
        source_view = _View(sview.id, sview.name, "snapshot", layer, True, None, sview.record)
        svol, sino, snode = self._resolve(t, source_view, src.path, label)
        if svol >= SHARE_VOL_BASE:
            raise InvalidArgument(
                f"{label} is inside a share; compose from the VM it is shared from instead"
            )
        vol_map = self._import(t, view, layer)
        target = (vol_map.get(svol, svol), sino, snode.type)
        if src.target == "/":
            if snode.type != FileType.DIR:
                raise NotADirectory(f"{label} is not a directory and cannot become '/'")
            for entry in list(self._list(t, source_view, svol, sino, 0)):
                if not replace:
                    self._refuse_existing(t, view, 0, ROOT_INO, entry.name, "/", label)
                moved = (vol_map.get(entry.oid.vol, entry.oid.vol), entry.oid.ino, entry.type)
                if moved[0] >= SHARE_VOL_BASE:  # a share's mount point: an empty directory
                    moved = (0, self._new_dir(t, view, 0, ROOT_INO), FileType.DIR)
                self._place(t, view, 0, ROOT_INO, entry.name, moved)
        else:
            parent, _, leaf = src.target.rstrip("/").rpartition("/")
            pvol, pino, pnode = self._resolve(
                t, view, parent or "/", f"{view.name}:{parent or '/'}"
            )
            if pnode.type != FileType.DIR:
                raise NotADirectory(f"{view.name}:{parent} is not a directory")
            if not replace:
                self._refuse_existing(t, view, pvol, pino, leaf.encode(), parent + "/", label)
            self._place(t, view, pvol, pino, leaf.encode(), target)
        # The source's shares mounted inside the subtree become empty directories here.
        for share in sview.record.get("shares", ()):
            avol, aino = share["at"]
            if src.target == "/" and (avol, aino) == (svol, sino):
                continue  # placed above
            if self._below(t, source_view, (avol, aino), (svol, sino)):
                self._unmount(t, view, vol_map.get(avol, avol), aino, share["name"].encode())

    def _below(
        self, t: lmdb.Transaction, view: _View, node: tuple[int, int], top: tuple[int, int]
    ) -> bool:
        """Whether directory `node` is `top` or inside it (walking '..' up; O(depth))."""
        vol, ino = node
        for _ in range(100000):
            if (vol, ino) == top:
                return True
            found = self._inode(t, view, vol, ino)
            if found is None or (vol, ino) == (0, ROOT_INO):
                return False
            vol, ino = found.parent_vol, found.parent_ino
        return False

    def _new_dir(self, t: lmdb.Transaction, view: _View, pvol: int, pino: int) -> int:
        """A new empty directory object (root-owned, 0755) whose '..' is (pvol, pino); the
        caller links it."""
        ino = self._alloc_ino(t, view)
        now = time.time_ns()
        node = Inode(FileType.DIR, 0o755, 2, 0, 0, 0, 0, 0, now, now, now, pvol, pino)
        self._put_inode(t, view, 0, ino, node)
        self._usage_add(t, view, 0, 1)
        return ino

    def _unmount(self, t: lmdb.Transaction, view: _View, pvol: int, pino: int, name: bytes):
        """Turn the share mount point `name` of directory (pvol, pino) into an empty
        directory, in `view`'s top layer: what a snapshot, clone or repair shows where a
        share was mounted (as a filesystem snapshot shows a mount point). The parent's link
        count is unchanged (the share counted as a subdirectory)."""
        entry = self._entry(t, view, pvol, pino, name)
        if entry is None or entry[0] < SHARE_VOL_BASE:
            return
        ino = self._new_dir(t, view, pvol, pino)
        self._put_entry(t, view, pvol, pino, name, (0, ino, FileType.DIR))

    def _remount(self, t: lmdb.Transaction, view: _View, share: dict[str, Any]) -> bool:
        """Mount `share` at its place again after the VM's tree changed under it (a
        rollback): over nothing, an empty directory or a stale mount. False when its place
        is gone or holds something else (the caller then drops the share)."""
        pvol, pino = share["at"]
        name = share["name"].encode()
        pnode = self._inode(t, view, pvol, pino)
        if pnode is None or pnode.type != FileType.DIR:
            return False
        target = (share["base"] + share["root"][0], share["root"][1], FileType.DIR)
        entry = self._entry(t, view, pvol, pino, name)
        if entry is not None and entry[:2] == target[:2]:
            return True
        if entry is None:
            pnode.nlink += 1
            self._put_inode(t, view, pvol, pino, pnode)
        elif entry[0] < SHARE_VOL_BASE:
            node = self._inode(t, view, entry[0], entry[1])
            if node is not None:
                if node.type != FileType.DIR or not self._is_empty_dir(t, view, *entry[:2]):
                    return False
                self._destroy(t, view, entry[0], entry[1], node)
        self._put_entry(t, view, pvol, pino, name, target)
        return True

    def _shares_from(self, t: lmdb.Transaction, src: int) -> list[tuple[dict, dict]]:
        """(destination namespace record, share) of every share whose source is `src`."""
        out = []
        for _, raw in t.cursor(db=self._ns):
            rec = json.loads(bytes(raw))
            out += [(rec, sh) for sh in rec.get("shares", ()) if sh["src"] == src]
        return out

    def _refuse_existing(
        self,
        t: lmdb.Transaction,
        view: _View,
        pvol: int,
        pino: int,
        name: bytes,
        where: str,
        label: str,
    ) -> None:
        """Refuse to lay `label` over an existing entry of an existing VM."""
        if self._entry(t, view, pvol, pino, name) is not None:
            path = f"{view.name}:{where.rstrip('/')}/{name.decode(errors='replace')}"
            raise Exists(
                f"{path} already exists; add --replace to replace it (and everything in it) "
                f"with {label} (nothing was changed)"
            )

    def _import(self, t: lmdb.Transaction, view: _View, layer: int) -> dict[int, int]:
        """Give every volume of frozen `layer` fresh volumes here (one import per graft).

        Fix: this used to reuse an earlier import of the same layer. Two grafts of one source
        (at two destinations, or grafted again over the first) then named the *same* objects:
        a write through one path showed through the other, a directory had two parents, and
        replacing one graft deleted objects the other still named. Each graft is a copy, so
        it gets its own volumes; the cost stays O(volumes of the source).
        """
        top = self._layer(t, view.top)
        source = self._layer(t, layer)
        source_vols = [0, *sorted(int(v) for v in source["vols"])]
        imp_id = top["next_import"]
        mapping: dict[int, int] = {}
        for svol in source_vols:
            vol = top["next_vol"]
            if vol >= MAX_VOLUMES:
                raise InvalidArgument("too many composed volumes in this VM")
            top["next_vol"] = vol + 1
            mapping[svol] = vol
            top["vols"][str(vol)] = [layer, svol, imp_id]
        top["imports"][str(imp_id)] = {
            "layer": layer,
            "map": {str(k): v for k, v in mapping.items()},
        }
        top["next_import"] = imp_id + 1
        self._put_layer(t, view.top, top)
        return mapping

    def _place(
        self,
        t: lmdb.Transaction,
        view: _View,
        pvol: int,
        pino: int,
        name: bytes,
        target: tuple[int, int, FileType],
    ) -> None:
        """Bind `name` in a directory to `target`, replacing whatever was there."""
        check_name(name)
        pnode = self._inode(t, view, pvol, pino)
        assert pnode is not None
        old = self._entry(t, view, pvol, pino, name)
        if old is not None and old[0] >= SHARE_VOL_BASE:
            raise NotPermitted(
                f"{name.decode(errors='replace')!r} in {view.name} is a share; "
                "remove it with `prism unshare` first"
            )
        if old is not None and (old[0], old[1]) == target[:2]:
            return  # already bound to this very object (the same source grafted again)
        if old is not None:
            if old[2] == FileType.DIR:
                pnode.nlink -= 1
            self._release(t, view, old[0], old[1])
        self._put_entry(t, view, pvol, pino, name, target)
        node = self._inode(t, view, target[0], target[1])
        if node is None:
            raise Corrupt("grafted object is missing")
        node.parent_vol, node.parent_ino = pvol, pino
        self._put_inode(t, view, target[0], target[1], node)
        if target[2] == FileType.DIR:
            pnode.nlink += 1
        pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
        self._put_inode(t, view, pvol, pino, pnode)

    def _release(self, t: lmdb.Transaction, view: _View, vol: int, ino: int) -> None:
        """An entry naming (vol, ino) was replaced: drop one link, as `rm -r` would.

        Fix: `_place` used to drop just the replaced object's inode record. A replaced
        directory's contents stayed alive (a file in it hard-linked elsewhere kept its old
        nlink), and a replaced file's chunk-map records were never released (leaked chunks).
        """
        stack = [(vol, ino)]
        while stack:
            vol, ino = stack.pop()
            if vol >= SHARE_VOL_BASE:
                continue  # objects seen through a share belong to its source VM
            node = self._inode(t, view, vol, ino)
            if node is None:
                continue
            if node.type == FileType.DIR:
                for entry in list(self._list(t, view, vol, ino, 0)):
                    if entry.oid.vol >= SHARE_VOL_BASE:  # its share would be left dangling
                        raise NotPermitted(
                            f"{entry.name.decode(errors='replace')!r} in {view.name} is a share "
                            "inside what would be replaced; remove it with `prism unshare` first"
                        )
                    self._drop_entry(t, view, vol, ino, entry.name)
                    stack.append((entry.oid.vol, entry.oid.ino))
                self._destroy(t, view, vol, ino, node)
                continue
            node.nlink -= 1
            if node.nlink <= 0:
                self._destroy(t, view, vol, ino, node)
            else:
                node.parent_vol, node.parent_ino = 0, R.HOLDER_UNKNOWN
                node.ctime_ns = time.time_ns()
                self._put_inode(t, view, vol, ino, node)

    def _resolve(
        self, t: lmdb.Transaction, view: _View, path: str, label: str
    ) -> tuple[int, int, Inode]:
        vol, ino = 0, ROOT_INO
        node = self._inode(t, view, vol, ino)
        if node is None:
            raise Corrupt(f"{view.name} has no root directory; run `prism fsck --repair`")
        for part in [p for p in path.split("/") if p and p != "."]:
            if node.type != FileType.DIR:
                raise NotADirectory(f"{label}: a component of the path is not a directory")
            if part == "..":
                vol, ino = node.parent_vol, node.parent_ino
            else:
                entry = self._entry(t, view, vol, ino, part.encode())
                if entry is None:
                    raise NotFound(f"{label} does not exist")
                vol, ino = entry[0], entry[1]
            found = self._inode(t, view, vol, ino)
            if found is None:
                raise NotFound(f"{label} does not exist")
            node = found
        return vol, ino, node

    def share(
        self, src: str, src_path: str, dst: str, dst_path: str, *, rw: bool = False
    ) -> NamespaceInfo:
        """Make a live view of `src:src_path` appear at `dst:dst_path` (read-only unless rw).

        The mount point is created, or may be an existing empty directory. Objects seen
        through the share are the source's own (changes on either side show on the other;
        uid/gid permissions apply as usual); they appear in `dst` as volumes
        base + v, so their identities are distinct from everything else in `dst`.
        """
        for p in (src_path, dst_path):
            if not p.startswith("/"):
                raise InvalidArgument(f"path {p!r} must be absolute (start with '/')")
        with self._write() as t:
            sview = self._view_by_name(t, src)
            dview = self._view_by_name(t, dst)
            for v in (sview, dview):
                if v.kind != "vm":
                    raise InvalidArgument(f"{v.name!r} is a snapshot; shares join VMs")
            if sview.id == dview.id:
                raise InvalidArgument("a VM cannot share into itself; use a symlink")
            svol, sino, snode = self._resolve(t, sview, src_path, f"{src}:{src_path}")
            if snode.type != FileType.DIR:
                raise NotADirectory(f"{src}:{src_path} is not a directory")
            if svol >= SHARE_VOL_BASE:
                raise InvalidArgument(f"{src}:{src_path} is inside a share; share its source")
            parent, _, leaf = dst_path.rstrip("/").rpartition("/")
            if not leaf:
                raise InvalidArgument("the share's mount point cannot be '/'")
            pvol, pino, pnode = self._resolve(t, dview, parent or "/", f"{dst}:{parent or '/'}")
            if pnode.type != FileType.DIR:
                raise NotADirectory(f"{dst}:{parent} is not a directory")
            if pvol >= SHARE_VOL_BASE:
                raise InvalidArgument(f"{dst}:{dst_path} is inside a share")
            name = leaf.encode()
            check_name(name)
            if self._layer(t, sview.top)["next_vol"] > SHARE_VOL_SPAN:
                raise InvalidArgument(
                    f"{src} is composed of more than {SHARE_VOL_SPAN} volumes and cannot be "
                    "shared; share a VM cloned from a subtree of it instead"
                )
            shares = list(dview.record.get("shares", ()))
            used = {sh["base"] for sh in shares}
            first = dview.record.get("next_share_slot", 0)
            slots = [(first + k) % SHARE_SLOTS for k in range(SHARE_SLOTS)]
            slot = next((k for k in slots if SHARE_VOL_BASE + k * SHARE_VOL_SPAN not in used), None)
            if slot is None:
                raise InvalidArgument(f"{dst} already has {SHARE_SLOTS} shares")
            base = SHARE_VOL_BASE + slot * SHARE_VOL_SPAN
            existing = self._entry(t, dview, pvol, pino, name)
            if existing is not None:
                enode = self._inode(t, dview, existing[0], existing[1])
                if (
                    enode is None
                    or enode.type != FileType.DIR
                    or existing[0] >= SHARE_VOL_BASE
                    or not self._is_empty_dir(t, dview, existing[0], existing[1])
                ):
                    raise Exists(
                        f"{dst}:{dst_path} exists and is not an empty directory; "
                        "pick another mount point"
                    )
                self._drop_entry(t, dview, pvol, pino, name)
                self._destroy(t, dview, existing[0], existing[1], enode)
                pnode.nlink -= 1
            rec = dict(dview.record)
            rec["next_share_slot"] = (slot + 1) % SHARE_SLOTS
            rec["shares"] = [
                *shares,
                {
                    "path": "/" + "/".join(p for p in dst_path.split("/") if p),
                    "src": sview.id,
                    "src_path": src_path,
                    "root": [svol, sino],
                    "at": [pvol, pino],
                    "name": leaf,
                    "base": base,
                    "rw": rw,
                },
            ]
            self._put_ns(t, rec)
            self._put_entry(t, dview, pvol, pino, name, (base + svol, sino, FileType.DIR))
            pnode.nlink += 1
            pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
            self._put_inode(t, dview, pvol, pino, pnode)
            return self._info(t, rec)

    def unshare(self, dst: str, dst_path: str) -> NamespaceInfo:
        """Remove the share mounted at `dst:dst_path` (its mount point goes with it)."""
        with self._write() as t:
            dview = self._view_by_name(t, dst)
            norm = "/" + "/".join(p for p in dst_path.split("/") if p)
            shares = list(dview.record.get("shares", ()))
            share = next((sh for sh in shares if sh["path"] == norm), None)
            if share is None:
                raise NotFound(f"no share at {dst}:{norm}; see `prism vm show {dst}`")
            return self._info(t, self._unshare(t, dview, share))

    def _unshare(self, t: lmdb.Transaction, dview: _View, share: dict[str, Any]) -> dict:
        """Remove `share` and its mount point from `dview`; return the new record."""
        pvol, pino = share["at"]
        name = share["name"].encode()
        entry = self._entry(t, dview, pvol, pino, name)
        if entry is not None and entry[0] >= SHARE_VOL_BASE:
            self._drop_entry(t, dview, pvol, pino, name)
            pnode = self._inode(t, dview, pvol, pino)
            if pnode is not None:
                pnode.nlink -= 1
                pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
                self._put_inode(t, dview, pvol, pino, pnode)
        rec = dict(dview.record)
        rec["shares"] = [sh for sh in rec.get("shares", ()) if sh != share]
        self._put_ns(t, rec)
        dview.record = rec
        return rec

    # -- public: staged imports ----------------------------------------------------------

    def begin_staging(self, vm: str) -> tuple[ObjectId, str, int]:
        """A new detached directory of `vm` to build an import in, invisible to the VM's
        tree until `publish_staging`: (its id, the staging token, the fd of the lock file
        that the caller holds until it publishes or discards). What is built there counts
        against the VM's quota as it is built."""
        directory = self.path / STAGING_DIR
        directory.mkdir(exist_ok=True)
        token = secrets.token_hex(8)
        lock = directory / f"{token}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with self._write() as t:
                view = self._view_by_name(t, vm)
                if view.kind != "vm":
                    raise ReadOnly(f"{vm} is a read-only snapshot; import into a VM")
                self._check_quota(t, view, 0)
                ino = self._new_dir(t, view, 0, ROOT_INO)
                marker = json.dumps({"ns": view.id, "ino": ino}).encode()
                t.put(_STAGE + token.encode(), marker, db=self._meta)
        except BaseException:
            os.close(fd)
            os.unlink(lock)
            raise
        return ObjectId(view.id, 0, ino), token, fd

    def publish_staging(self, token: str, to: str) -> None:
        """Lay the staged tree into its VM at absolute path `to`, in one transaction. A
        missing `to` is made (like `mkdir -p`; O(depth)) and the staged directory becomes
        it; an existing directory receives the staged directory's entries (one that exists
        there is refused: nothing is overwritten) and its attributes, O(top-level entries)."""
        with self._write() as t:
            raw = t.get(_STAGE + token.encode(), db=self._meta)
            if raw is None:
                raise NotFound(f"no import staged as {token}")
            marker = json.loads(bytes(raw))
            view = self._view(t, marker["ns"])
            staged = marker["ino"]
            vol, ino = 0, ROOT_INO
            parts = [p for p in to.split("/") if p]
            while parts:
                node = self._inode(t, view, vol, ino)
                if node is None or node.type != FileType.DIR:
                    raise NotADirectory(f"{view.name}:{to} is not a directory; pick another --to")
                entry = self._entry(t, view, vol, ino, parts[0].encode())
                if entry is None:
                    break
                if entry[0] >= SHARE_VOL_BASE:
                    raise InvalidArgument(f"{view.name}:{to} is inside a share; import there")
                vol, ino = entry[0], entry[1]
                parts.pop(0)
            dnode = self._inode(t, view, vol, ino)
            if dnode is None or dnode.type != FileType.DIR:
                raise NotADirectory(f"{view.name}:{to} is not a directory; pick another --to")
            root = self._inode(t, view, 0, staged)
            if root is None:
                raise Stale(f"the import staged in {view.name} is gone (rolled back?)")
            if parts:
                for part in parts[:-1]:
                    made = self._new_dir(t, view, vol, ino)
                    self._place(t, view, vol, ino, part.encode(), (0, made, FileType.DIR))
                    vol, ino = 0, made
                self._place(t, view, vol, ino, parts[-1].encode(), (0, staged, FileType.DIR))
            else:
                for item in list(self._list(t, view, 0, staged, 0)):
                    if self._entry(t, view, vol, ino, item.name) is not None:
                        raise Exists(
                            f"{view.name}:{to.rstrip('/')}/{item.name.decode(errors='replace')}"
                            " already exists; import into an empty or new directory with --to "
                            "/path (nothing was imported)"
                        )
                    target = (item.oid.vol, item.oid.ino, item.type)
                    self._drop_entry(t, view, 0, staged, item.name)
                    self._put_entry(t, view, vol, ino, item.name, target)
                    if item.type == FileType.DIR:
                        child = self._inode(t, view, item.oid.vol, item.oid.ino)
                        assert child is not None
                        child.parent_vol, child.parent_ino = vol, ino
                        self._put_inode(t, view, item.oid.vol, item.oid.ino, child)
                        dnode.nlink += 1
                dnode.mode, dnode.uid, dnode.gid = root.mode, root.uid, root.gid
                dnode.atime_ns, dnode.mtime_ns = root.atime_ns, root.mtime_ns
                dnode.ctime_ns = time.time_ns()
                self._put_inode(t, view, vol, ino, dnode)
                self._destroy(t, view, 0, staged, root)
            t.delete(_STAGE + token.encode(), db=self._meta)
        self._unlock_staging(token)

    def discard_staging(self, token: str, *, step: int = 2000) -> None:
        """Remove a staged tree, committing every `step` removals (the writer lock is never
        held long), then its marker. Dying half way leaves a smaller staged tree, which the
        next `reap_stagings` removes."""
        with self._read() as t:
            raw = t.get(_STAGE + token.encode(), db=self._meta)
        if raw is not None:
            marker = json.loads(bytes(raw))
            with contextlib.suppress(Stale):  # the VM was removed or rolled back meanwhile
                self._empty_tree(ObjectId(marker["ns"], 0, marker["ino"]), step)
            with self._write() as t:
                view = self._view(t, marker["ns"]) if self._ns_record(t, marker["ns"]) else None
                node = self._inode(t, view, 0, marker["ino"]) if view is not None else None
                if view is not None and node is not None:
                    self._destroy(t, view, 0, marker["ino"], node)
                t.delete(_STAGE + token.encode(), db=self._meta)
        self._unlock_staging(token)

    def reap_stagings(self) -> int:
        """Discard what imports that died had staged (their lock file is free); return how
        many there were."""
        dead = [token for token in self._stagings() if self._staging_dead(token)]
        for token in dead:
            self.discard_staging(token)
        return len(dead)

    def _stagings(self) -> list[str]:
        with self._read() as t:
            return list(self._stage_markers(t))

    def staged_roots(self, t: lmdb.Transaction) -> list[tuple[int, int]]:
        """(namespace id, directory inode of volume 0) of every staged import tree, alive
        or dead: part of its namespace (and its usage) though no entry names it."""
        return [(m["ns"], m["ino"]) for m in self._stage_markers(t).values()]

    def _stage_markers(self, t: lmdb.Transaction) -> dict[str, dict[str, Any]]:
        """Every staged import's marker (b"stage:"+token -> {ns, ino}), by token."""
        cur = t.cursor(db=self._meta)
        out: dict[str, dict[str, Any]] = {}
        if cur.set_range(_STAGE):
            for key, raw in cur:
                if not bytes(key).startswith(_STAGE):
                    break
                out[bytes(key)[len(_STAGE) :].decode()] = json.loads(bytes(raw))
        return out

    def _staging_dead(self, token: str) -> bool:
        """Whether no live process holds the staging's lock file."""
        try:
            fd = os.open(self.path / STAGING_DIR / f"{token}.lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def _unlock_staging(self, token: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / STAGING_DIR / f"{token}.lock")

    def _empty_tree(self, top: ObjectId, step: int) -> None:
        """Remove everything below directory `top`, depth first, committing every `step`
        removals."""
        stack: list[tuple[ObjectId, ObjectId, bytes]] = [(top, top, b"")]
        ops = 0
        self.begin_batch()
        try:
            while stack:
                here, parent, name = stack[-1]
                entries, _ = self.readdir(here, limit=step)
                subdirs = [(e.oid, here, e.name) for e in entries if e.type == FileType.DIR]
                if subdirs:
                    stack.extend(subdirs)
                    continue
                for e in entries:
                    self.remove(here, e.name)
                if not entries:
                    stack.pop()
                    if here != top:
                        self.rmdir(parent, name)
                ops += len(entries) or 1
                if ops >= step:
                    self.commit()
                    self.begin_batch()
                    ops = 0
            self.commit()
        except BaseException:
            self.abort()
            raise

    def usage(self, name: str) -> Usage:
        with self._write() as t:
            nbytes, objects = self._usage_get(t, self._view_by_name(t, name))
            return Usage(nbytes, objects)

    def stats(self) -> StoreStats:
        with self._write() as t:
            logical = 0
            for _, raw in t.cursor(db=self._ns):
                rec = json.loads(bytes(raw))
                if rec["kind"] == "vm":
                    logical += self._usage_get(t, self._view(t, rec["id"]))[0]
            segment_bytes = sum(R.SEGMENT_VAL.unpack(v)[0] for _, v in t.cursor(db=self._segdb))
            return StoreStats(
                logical_bytes=logical,
                stored_bytes=self._get_meta(t, b"stored_bytes"),
                chunk_count=self._get_meta(t, b"chunk_count"),
                segment_bytes=segment_bytes,
            )

    def fsstat(self, ns_id: int) -> FsStat:
        with self._read() as t:
            view = self._view(t, ns_id)
            raw = t.get(_NS_KEY.pack(view.id), db=self._usage)
            used, objects, _ = R.USAGE_VAL.unpack(raw) if raw else (0, 0, 0)
        disk = shutil.disk_usage(self.path)
        free_files = 1 << 32
        if view.quota is not None:
            free = max(0, view.quota - used)
            return FsStat(view.quota, free, free, objects + free_files, free_files)
        return FsStat(disk.total, disk.free, disk.free, objects + free_files, free_files)

    # -- public: objects -----------------------------------------------------------------

    def root(self, ns_id: int) -> ObjectId:
        with self._read() as t:
            self._view(t, ns_id)
        return ObjectId(ns_id, 0, ROOT_INO)

    def getattr(self, oid: ObjectId) -> Attr:
        with self._read() as t:
            _, _, node, _ = self._obj(t, oid)
            return self._attr(oid, node)

    def identity(self, oid: ObjectId) -> ObjectId:
        """The object's own identity: the same for every handle that names it (a share's
        handles name objects of its source VM). What byte-range locks are held on."""
        with self._read() as t:
            return self._obj(t, oid)[1]

    def lookup(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Attr:
        return self.lookup_in(dir, name, cred)[0]

    def lookup_in(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> tuple[Attr, Attr]:
        """`lookup`, plus the directory's attributes read in the same transaction (NFS
        LOOKUP returns both)."""
        with self._read() as t:
            view, d, dnode, out = self._obj(t, dir)
            if dnode.type != FileType.DIR:
                raise NotADirectory("lookup in something that is not a directory")
            self._require(dnode, cred, _X, "no search permission on the directory")
            dir_attr = self._attr(dir, dnode)
            if name == b".":
                return dir_attr, dir_attr
            if name == b"..":
                if out.base:
                    share = self._share_of(self._view(t, dir.ns), dir.vol)
                    if [d.vol, d.ino] == share["root"]:  # leave the share for its mount point
                        parent = ObjectId(dir.ns, *share["at"])
                        return self._attr(parent, self._obj(t, parent)[2]), dir_attr
                elif d.vol == 0 and d.ino == ROOT_INO:
                    return dir_attr, dir_attr
                parent = out.oid(dnode.parent_vol, dnode.parent_ino)
                return self._attr(parent, self._obj(t, parent)[2]), dir_attr
            check_name(name)
            entry = self._entry(t, view, d.vol, d.ino, name)
            if entry is None or (out.base and entry[0] >= SHARE_VOL_SPAN):
                raise NotFound(f"{name!r} does not exist")
            node = self._inode(t, view, entry[0], entry[1])
            if node is None:
                raise NotFound(f"{name!r} does not exist")
            return self._attr(out.oid(entry[0], entry[1]), node), dir_attr

    def resolve(self, ns_id: int, path: str) -> Attr:
        with self._read() as t:
            view = self._view(t, ns_id)
            vol, ino, node = self._resolve(t, view, path, f"{view.name}:{path}")
            return self._attr(ObjectId(ns_id, vol, ino), node)

    def access(self, oid: ObjectId, cred: Cred | None, mask: int) -> int:
        with self._read() as t:
            view, _, node, _ = self._obj(t, oid)
        r, w, x = (self._may(node, cred, bit) for bit in (_R, _W, _X))
        if node.type == FileType.DIR:
            granted = (ACCESS_READ if r else 0) | (ACCESS_LOOKUP if x else 0)
            if w and x:
                granted |= ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
        else:
            granted = (ACCESS_READ if r else 0) | (ACCESS_EXECUTE if x else 0)
            if w:
                granted |= ACCESS_MODIFY | ACCESS_EXTEND
        if view.readonly:
            granted &= ~(ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE)
        return granted & mask

    def setattr(
        self,
        oid: ObjectId,
        sattr: SetAttr,
        cred: Cred | None = None,
        *,
        guard_ctime_ns: int | None = None,
    ) -> Attr:
        with self._write() as t:
            view, loc, node, _ = self._obj(t, oid, writable=True)
            if guard_ctime_ns is not None and node.ctime_ns != guard_ctime_ns:
                raise NotSync("the object changed since the client looked (ctime guard)")
            self._apply_sattr(t, view, loc, node, sattr, cred, new=False)
            self._put_inode(t, view, loc.vol, loc.ino, node)
            return self._attr(oid, node)

    def _apply_sattr(
        self,
        t: lmdb.Transaction,
        view: _View,
        oid: ObjectId,
        node: Inode,
        sattr: SetAttr,
        cred: Cred | None,
        *,
        new: bool,
    ) -> None:
        is_owner = cred is None or cred.is_root or cred.uid == node.uid
        now = time.time_ns()
        changed = False
        if sattr.mode is not None:
            if not is_owner:
                raise NotPermitted("only the owner may change the mode")
            node.mode = sattr.mode & 0o7777
            changed = True
        if sattr.uid is not None and sattr.uid != node.uid:
            if not (cred is None or cred.is_root):
                raise NotPermitted("only root may change the owner")
            node.uid = sattr.uid
            changed = True
        if sattr.gid is not None and sattr.gid != node.gid:
            if not (cred is None or cred.is_root or (is_owner and cred.in_group(sattr.gid))):
                raise NotPermitted("only root, or the owner into a group of theirs, may chgrp")
            node.gid = sattr.gid
            changed = True
        if (
            sattr.mode is not None
            and node.mode & 0o2000
            and not (cred is None or cred.is_root or cred.in_group(node.gid))
        ):
            node.mode &= ~0o2000  # setgid only to a group of the caller's (as Linux does)
        if sattr.size is not None:
            if node.type == FileType.DIR:
                raise IsADirectory("cannot change the size of a directory")
            if node.type != FileType.REG:
                raise InvalidArgument("only regular files have a settable size")
            if sattr.size > MAX_FILE_SIZE:
                raise FileTooLarge(f"size {sattr.size} exceeds {MAX_FILE_SIZE}")
            if not new:
                self._require_data(node, cred, _W)
            if sattr.size != node.size:
                if sattr.size > node.size:
                    self._check_quota(t, view, sattr.size - node.size)
                self._truncate(t, view, oid.vol, oid.ino, node.size, sattr.size)
                self._usage_add(t, view, sattr.size - node.size, 0)
                node.size = sattr.size
                node.mtime_ns = now
            changed = True
        for field in ("atime_ns", "mtime_ns"):
            value = getattr(sattr, field)
            if value is None:
                continue
            if value == NOW:
                if not is_owner and not self._may(node, cred, _W):
                    raise PermissionDenied("need write permission to touch the times")
                value = now
            elif not is_owner:
                raise NotPermitted("only the owner may set explicit times")
            setattr(node, field, value)
            changed = True
        if changed:
            node.ctime_ns = now

    def read(
        self, oid: ObjectId, offset: int, count: int, cred: Cred | None = None
    ) -> tuple[bytes, bool]:
        data, eof, _ = self.read_attr(oid, offset, count, cred)
        return data, eof

    def read_attr(
        self, oid: ObjectId, offset: int, count: int, cred: Cred | None = None
    ) -> tuple[bytes, bool, Attr]:
        """`read` plus the file's attributes, from the same transaction (NFS READ)."""
        if offset < 0 or count < 0:
            raise InvalidArgument("negative offset or count")
        with self._read() as t:
            view, loc, node, _ = self._obj(t, oid)
            if node.type == FileType.DIR:
                raise IsADirectory("cannot read a directory as a file")
            if node.type != FileType.REG:
                raise InvalidArgument("only regular files can be read")
            self._require_data(node, cred, _R)
            attr = self._attr(oid, node)
            if offset >= node.size or count == 0:
                return b"", offset >= node.size, attr
            end = min(node.size, offset + count)
            data = self._read_range(t, view, loc.vol, loc.ino, offset, end)
            return data, end == node.size, attr

    def write(self, oid: ObjectId, offset: int, data: bytes, cred: Cred | None = None) -> Attr:
        if offset < 0:
            raise InvalidArgument("negative offset")
        end = offset + len(data)
        if end > MAX_FILE_SIZE:
            raise FileTooLarge(f"write past {MAX_FILE_SIZE} bytes")
        with self._write() as t:
            view, loc, node, _ = self._obj(t, oid, writable=True)
            if node.type == FileType.DIR:
                raise IsADirectory("cannot write to a directory")
            if node.type != FileType.REG:
                raise InvalidArgument("only regular files can be written")
            self._require_data(node, cred, _W)
            # Fix: an empty write (NFS WRITE with count 0) must not extend the file; it
            # used to set the size to `offset`.
            new_size = max(node.size, end) if data else node.size
            grow = new_size - node.size
            if grow:
                self._check_quota(t, view, grow)
            if data:
                self._write_range(t, view, loc.vol, loc.ino, offset, data, new_size)
            node.size = new_size
            node.mtime_ns = node.ctime_ns = time.time_ns()
            if node.mode & 0o6000 and cred is not None and not cred.is_root:
                node.mode &= ~0o6000
            self._put_inode(t, view, loc.vol, loc.ino, node)
            if grow:
                self._usage_add(t, view, grow, 0)
            return self._attr(oid, node)

    def _dir_for_change(
        self, t: lmdb.Transaction, dir: ObjectId, cred: Cred | None
    ) -> tuple[_View, ObjectId, Inode, _Out]:
        view, d, dnode, out = self._obj(t, dir, writable=True)
        if dnode.type != FileType.DIR:
            raise NotADirectory("not a directory")
        self._require(dnode, cred, _W | _X, "no write permission on the directory")
        return view, d, dnode, out

    def _new_object(
        self,
        dir: ObjectId,
        name: bytes,
        node_type: FileType,
        mode: int,
        cred: Cred | None,
        sattr: SetAttr | None,
        *,
        target: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
        verifier: bytes | None = None,
    ) -> Attr:
        check_name(name)
        self.segments.require_room(0, self.segments.reserve // 2)
        with self._write() as t:
            view, d, dnode, out = self._dir_for_change(t, dir, cred)
            if self._entry(t, view, d.vol, d.ino, name) is not None:
                raise Exists(f"{name!r} already exists")
            self._check_quota(t, view, len(target))
            ino = self._alloc_ino(t, view)
            now = time.time_ns()
            who = cred or Cred()
            gid = dnode.gid if dnode.mode & 0o2000 else who.gid
            node = Inode(
                node_type,
                0,
                2 if node_type == FileType.DIR else 1,
                who.uid,
                gid,
                len(target),
                rdev[0],
                rdev[1],
                now,
                now,
                now,
                d.vol,
                d.ino,
                verifier or b"\0" * 8,
                target,
            )
            oid = ObjectId(view.id, 0, ino)
            # The mode and attributes asked for at creation obey SETATTR's ownership rules,
            # applied as the caller (the new object is already the caller's).
            given = sattr or SetAttr()
            self._apply_sattr(
                t,
                view,
                oid,
                node,
                SetAttr(
                    mode=mode if given.mode is None else given.mode,
                    uid=given.uid,
                    gid=given.gid,
                    atime_ns=given.atime_ns,
                    mtime_ns=given.mtime_ns,
                ),
                cred,
                new=True,
            )
            size = sattr.size if sattr is not None and node_type == FileType.REG else None
            if size:  # CREATE may ask for a size: the new file is a hole that long
                if size > MAX_FILE_SIZE:
                    raise FileTooLarge(f"size {size} exceeds {MAX_FILE_SIZE}")
                self._check_quota(t, view, size)
                node.size = size
            self._put_inode(t, view, 0, ino, node)
            self._put_entry(t, view, d.vol, d.ino, name, (0, ino, node_type))
            if node_type == FileType.DIR:
                dnode.nlink += 1
            dnode.mtime_ns = dnode.ctime_ns = now
            self._put_inode(t, view, d.vol, d.ino, dnode)
            self._usage_add(t, view, charged_bytes(node), 1)
            return self._attr(out.oid(0, ino), node)

    def create(
        self,
        dir: ObjectId,
        name: bytes,
        mode: int = 0o644,
        cred: Cred | None = None,
        *,
        exclusive: bytes | None = None,
        guarded: bool = False,
        sattr: SetAttr | None = None,
    ) -> Attr:
        check_name(name)
        with self._read() as t:
            view, d, dnode, out = self._obj(t, dir)
            if dnode.type != FileType.DIR:
                raise NotADirectory("not a directory")
            self._require(dnode, cred, _X, "no search permission on the directory")
            entry = self._entry(t, view, d.vol, d.ino, name)
            existing = self._inode(t, view, entry[0], entry[1]) if entry else None
        if entry is not None and existing is not None:
            oid = out.oid(entry[0], entry[1])
            if exclusive is not None:
                if existing.type == FileType.REG and existing.verifier == exclusive:
                    return self._attr(oid, existing)
                raise Exists(f"{name!r} already exists")
            if guarded:
                raise Exists(f"{name!r} already exists")
            if existing.type == FileType.DIR:
                raise IsADirectory(f"{name!r} is a directory")
            if sattr is not None and sattr.size is not None:
                return self.setattr(oid, SetAttr(size=sattr.size), cred)
            return self._attr(oid, existing)
        return self._new_object(dir, name, FileType.REG, mode, cred, sattr, verifier=exclusive)

    def mkdir(
        self,
        dir: ObjectId,
        name: bytes,
        mode: int = 0o755,
        cred: Cred | None = None,
        *,
        sattr: SetAttr | None = None,
    ) -> Attr:
        return self._new_object(dir, name, FileType.DIR, mode, cred, sattr)

    def symlink(
        self,
        dir: ObjectId,
        name: bytes,
        target: bytes,
        cred: Cred | None = None,
        *,
        mode: int = 0o777,
        sattr: SetAttr | None = None,
    ) -> Attr:
        if len(target) > SYMLINK_MAX:
            raise NameTooLong(f"symlink target of {len(target)} bytes; the limit is {SYMLINK_MAX}")
        if not target or b"\0" in target:
            raise InvalidArgument(f"symlink target must be 1-{SYMLINK_MAX} bytes without NUL")
        return self._new_object(dir, name, FileType.LNK, mode, cred, sattr, target=target)

    def mknod(
        self,
        dir: ObjectId,
        name: bytes,
        ftype: FileType,
        mode: int,
        cred: Cred | None = None,
        *,
        rdev: tuple[int, int] = (0, 0),
        sattr: SetAttr | None = None,
    ) -> Attr:
        if ftype not in (FileType.BLK, FileType.CHR, FileType.SOCK, FileType.FIFO):
            raise InvalidArgument(f"mknod cannot make a {ftype.name}")
        if ftype in (FileType.BLK, FileType.CHR) and not (cred is None or cred.is_root):
            raise NotPermitted("only root may create device nodes")
        return self._new_object(dir, name, ftype, mode, cred, sattr, rdev=rdev)

    def readlink(self, oid: ObjectId) -> bytes:
        with self._read() as t:
            _, _, node, _ = self._obj(t, oid)
            if node.type != FileType.LNK:
                raise InvalidArgument("not a symbolic link")
            return node.target

    def _named(
        self, t: lmdb.Transaction, view: _View, d: ObjectId, name: bytes, share_hint: str
    ) -> tuple[int, int, FileType, Inode]:
        """The object an entry of directory `d` names, for removing or renaming it; a share's
        mount point is refused with `share_hint`."""
        entry = self._entry(t, view, d.vol, d.ino, name)
        if entry is None:
            raise NotFound(f"{name!r} does not exist")
        vol, ino, ftype = entry
        if vol >= SHARE_VOL_BASE:
            raise NotPermitted(f"{name!r} is a share; {share_hint}")
        node = self._inode(t, view, vol, ino)
        if node is None:
            raise NotFound(f"{name!r} does not exist")
        return vol, ino, ftype, node

    def _unlink(self, dir: ObjectId, name: bytes, cred: Cred | None, *, want_dir: bool) -> None:
        if name in (b".", b".."):
            raise (InvalidArgument if name == b"." else NotEmpty)(f"cannot remove {name!r}")
        check_name(name)
        with self._write() as t:
            view, d, dnode, _ = self._dir_for_change(t, dir, cred)
            vol, ino, _, node = self._named(t, view, d, name, "remove it with `prism unshare`")
            if want_dir and node.type != FileType.DIR:
                raise NotADirectory(f"{name!r} is not a directory")
            if not want_dir and node.type == FileType.DIR:
                raise IsADirectory(f"{name!r} is a directory; use rmdir")
            if not self._sticky_ok(dnode, node, cred):
                raise PermissionDenied("sticky directory: only the owner may remove this")
            if want_dir and not self._is_empty_dir(t, view, vol, ino):
                raise NotEmpty(f"directory {name!r} is not empty")
            self._drop_entry(t, view, d.vol, d.ino, name)
            now = time.time_ns()
            if node.type == FileType.DIR:
                dnode.nlink = max(2, dnode.nlink - 1)
                self._destroy(t, view, vol, ino, node)
            else:
                node.nlink -= 1
                if node.nlink <= 0:
                    self._destroy(t, view, vol, ino, node)
                else:
                    _lost_link(node, d.vol, d.ino)
                    node.ctime_ns = now
                    self._put_inode(t, view, vol, ino, node)
            dnode.mtime_ns = dnode.ctime_ns = now
            self._put_inode(t, view, d.vol, d.ino, dnode)

    def remove(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> None:
        self._unlink(dir, name, cred, want_dir=False)

    def rmdir(self, dir: ObjectId, name: bytes, cred: Cred | None = None) -> None:
        self._unlink(dir, name, cred, want_dir=True)

    def rename(
        self,
        src_dir: ObjectId,
        src_name: bytes,
        dst_dir: ObjectId,
        dst_name: bytes,
        cred: Cred | None = None,
    ) -> None:
        for name in (src_name, dst_name):
            if name in (b".", b".."):
                raise InvalidArgument("cannot rename '.' or '..'")
            check_name(name)
        if src_dir.ns != dst_dir.ns:
            raise CrossDevice("cannot rename between namespaces")
        with self._write() as t:
            view, sd, sdnode, sout = self._dir_for_change(t, src_dir, cred)
            dview, dd, ddnode, dout = self._dir_for_change(t, dst_dir, cred)
            if (view.id, sout.base) != (dview.id, dout.base):
                raise CrossDevice("cannot rename into or out of a share")
            svol, sino, stype, snode = self._named(t, view, sd, src_name, "it cannot be renamed")
            if not self._sticky_ok(sdnode, snode, cred):
                raise PermissionDenied("sticky directory: only the owner may rename this")
            same_dir = sd == dd
            if same_dir:
                ddnode = sdnode  # one directory: apply every change to one copy
                if src_name == dst_name:
                    return
            if snode.type == FileType.DIR and not same_dir:
                self._refuse_loop(t, view, (svol, sino), dd)
            existing = self._entry(t, view, dd.vol, dd.ino, dst_name)
            if existing is not None and existing[0] >= SHARE_VOL_BASE:
                raise NotPermitted(f"{dst_name!r} is a share; it cannot be replaced")
            if existing is not None and (existing[0], existing[1]) == (svol, sino):
                return  # both names are links to the same object: POSIX says do nothing
            now = time.time_ns()
            if existing is not None:
                enode = self._inode(t, view, existing[0], existing[1])
                if enode is not None:
                    if not self._sticky_ok(ddnode, enode, cred):
                        raise PermissionDenied("sticky directory: cannot replace this entry")
                    if snode.type == FileType.DIR:
                        if enode.type != FileType.DIR:
                            raise NotADirectory(f"{dst_name!r} is not a directory")
                        if not self._is_empty_dir(t, view, existing[0], existing[1]):
                            raise NotEmpty(f"{dst_name!r} is not empty")
                    elif enode.type == FileType.DIR:
                        raise IsADirectory(f"{dst_name!r} is a directory")
                    if enode.type == FileType.DIR:
                        ddnode.nlink -= 1
                        self._destroy(t, view, existing[0], existing[1], enode)
                    else:
                        enode.nlink -= 1
                        if enode.nlink <= 0:
                            self._destroy(t, view, existing[0], existing[1], enode)
                        else:
                            _lost_link(enode, dd.vol, dd.ino)
                            enode.ctime_ns = now
                            self._put_inode(t, view, existing[0], existing[1], enode)
            self._drop_entry(t, view, sd.vol, sd.ino, src_name)
            self._put_entry(t, view, dd.vol, dd.ino, dst_name, (svol, sino, stype))
            snode.ctime_ns = now
            snode.parent_vol, snode.parent_ino = dd.vol, dd.ino
            if snode.type == FileType.DIR and not same_dir:
                ddnode.nlink += 1
                sdnode.nlink -= 1
            self._put_inode(t, view, svol, sino, snode)
            sdnode.mtime_ns = sdnode.ctime_ns = now
            self._put_inode(t, view, sd.vol, sd.ino, sdnode)
            if not same_dir:
                ddnode.mtime_ns = ddnode.ctime_ns = now
                self._put_inode(t, view, dd.vol, dd.ino, ddnode)

    def _refuse_loop(
        self, t: lmdb.Transaction, view: _View, moving: tuple[int, int], dst_dir: ObjectId
    ) -> None:
        vol, ino = dst_dir.vol, dst_dir.ino
        for _ in range(MAX_DEPTH):
            if (vol, ino) == moving:
                raise InvalidArgument("cannot move a directory inside itself")
            if vol == 0 and ino == ROOT_INO:
                return
            node = self._inode(t, view, vol, ino)
            if node is None or (node.parent_vol, node.parent_ino) == (vol, ino):
                return
            vol, ino = node.parent_vol, node.parent_ino

    def link(self, oid: ObjectId, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Attr:
        check_name(name)
        self.segments.require_room(0, self.segments.reserve // 2)
        if oid.ns != dir.ns:
            raise CrossDevice("cannot link across namespaces")
        with self._write() as t:
            view, d, dnode, dout = self._dir_for_change(t, dir, cred)
            oview, loc, node, out = self._obj(t, oid, writable=True)
            if (view.id, dout.base) != (oview.id, out.base):
                raise CrossDevice("cannot link into or out of a share")
            if node.type == FileType.DIR:
                raise IsADirectory("cannot hard-link a directory")
            if node.nlink >= NLINK_MAX:
                raise TooManyLinks(f"the object already has {node.nlink} links")
            if self._entry(t, view, d.vol, d.ino, name) is not None:
                raise Exists(f"{name!r} already exists")
            now = time.time_ns()
            node.nlink += 1
            node.ctime_ns = now
            node.parent_vol, node.parent_ino = d.vol, d.ino
            self._put_inode(t, view, loc.vol, loc.ino, node)
            self._put_entry(t, view, d.vol, d.ino, name, (loc.vol, loc.ino, node.type))
            dnode.mtime_ns = dnode.ctime_ns = now
            self._put_inode(t, view, d.vol, d.ino, dnode)
            return self._attr(oid, node)

    def readdir(
        self, dir: ObjectId, cookie: int = 0, cred: Cred | None = None, *, limit: int = 1000
    ) -> tuple[list[DirEntry], bool]:
        with self._read() as t:
            view, d, dnode, dout = self._obj(t, dir)
            if dnode.type != FileType.DIR:
                raise NotADirectory("not a directory")
            self._require(dnode, cred, _R, "no read permission on the directory")
            after = cookie if cookie >= R.FIRST_COOKIE else 0
            out: list[DirEntry] = []
            for entry in self._list(t, view, d.vol, d.ino, after, dout):
                if dout.base and entry.oid.vol >= SHARE_VOL_SPAN + dout.base:
                    continue  # only the source's first SHARE_VOL_SPAN volumes are shared
                if len(out) >= limit:
                    return out, False
                out.append(entry)
            return out, True

    def readdir_raw(
        self,
        dir: ObjectId,
        cookie: int = 0,
        cred: Cred | None = None,
        *,
        limit: int = 1000,
        attrs: bool = True,
    ) -> tuple[list[tuple[int, bytes, int, int, bytes | None]], bool]:
        """The READDIR/READDIRPLUS fast path: entries after `cookie` as plain tuples
        (cookie, name, vol, ino, inode record or None), read in one transaction, no objects
        built. The inode record's attributes unpack with `records.INODE_ATTRS`."""
        with self._read() as t:
            view, d, dnode, dout = self._obj(t, dir)
            if dnode.type != FileType.DIR:
                raise NotADirectory("not a directory")
            self._require(dnode, cred, _R, "no read permission on the directory")
            after = cookie if cookie >= R.FIRST_COOKIE else 0
            out: list[tuple[int, bytes, int, int, bytes | None]] = []
            base = dout.base
            for c, name, vol, ino, _ in self._list_raw(t, view, d.vol, d.ino, after):
                if base and vol >= SHARE_VOL_SPAN:
                    continue  # only the source's first SHARE_VOL_SPAN volumes are shared
                if len(out) >= limit:
                    return out, False
                record = self._inode_record(t, view, vol, ino) if attrs else None
                out.append((c, name, vol + base, ino, record))
            return out, True


def _lost_link(node: Inode, dvol: int, dino: int) -> None:
    """A non-directory that keeps other links lost the one in directory (dvol, dino): if
    that was its recorded holder (or none was recorded), where it lives is now unknown."""
    if (node.parent_vol, node.parent_ino) == (dvol, dino) or not R.holder_known(node):
        node.parent_vol, node.parent_ino = 0, R.HOLDER_UNKNOWN


def _lock_journal(path: Path, wait: float) -> Journal:
    """Own the journal for this process's lifetime (see `prism.store.journal`)."""
    try:
        return Journal.open(path, wait=wait)
    except JournalBusy:
        raise Busy(
            f"another process (a running `prism serve`?) owns {path}; "
            "stop it first, or give this server its own --data directory"
        ) from None


def _commit_error(exc: BaseException, root: Path) -> BaseException:
    """What a failed LMDB commit means for the caller: NoSpace when the disk is full (LMDB
    reports a short page write as EIO), else the error itself."""
    if isinstance(exc, StoreError):
        return exc
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and isinstance(exc, (OSError, lmdb.Error)):
        st = os.statvfs(root)
        full = "No space" in str(exc) or st.f_bavail * st.f_frsize < metadata_reserve(root) // 2
    if full:
        return NoSpace(
            f"no space left to commit metadata in {root}: the change was refused; remove "
            "files, run `prism gc`, or give the filesystem more room"
        )
    return exc


def _all_zero(data: bytes) -> bool:
    """Whether a chunk is all zeros (stored as a hole); memcmp stops at the first byte set."""
    return data == (ZEROS if len(data) == CHUNK_SIZE else bytes(len(data)))


def charged_bytes(node: Inode) -> int:
    """The data bytes an object counts against its VM's quota: a file's size, a symlink's
    target (both are bytes a VM stores)."""
    return node.size if node.type in (FileType.REG, FileType.LNK) else 0


def _ftype(value: int) -> FileType:
    ftype = R.FILE_TYPES[value] if 0 < value < len(R.FILE_TYPES) else None
    if ftype is None:
        raise Corrupt(f"directory entry with unknown type {value}; run `prism fsck`")
    return ftype


def _is_whole(src: CloneSource) -> bool:
    return src.path.rstrip("/") == "" and src.target.rstrip("/") == ""
