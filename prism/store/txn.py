"""Transactions of the store: batches, durable points, journal replay, and the order in
which a change reaches the disk.

Crash ordering. Content first, then metadata: new chunk bytes are appended to this process's
segment, the segment is fdatasync'd (and its directory fsync'd when the file is new), and only
then does the LMDB transaction that references them commit (LMDB commits with fsync, so a
commit is atomic and durable, even across a power cut). After any crash the store opens
cleanly; the only possible debris is segment bytes no committed chunk names, which `gc`
removes and `fsck` reports. Group commit: `begin_batch` runs many operations in one LMDB
transaction (each in a nested transaction, so a failing one changes nothing) that shares one
fdatasync + one commit.

The journal (`prism.store.journal`, `DATA/meta/journal`). A store opened with `journal=True`
(the server) makes a batch durable without committing it: `make_durable` fdatasyncs the
segment, then appends the key/value changes made since the last durable point to the journal
and fdatasyncs that; `commit` is then a checkpoint that also retires the journal's records
(it bumps meta b"journal_gen" in the same LMDB transaction). Whoever opens or writes the
store after the journal's owner died replays its records first (`begin_write`).

Locks, always taken in this order: the journal's `flock` (its owner holds it for its lifetime;
an operator command only tries it, inside its write transaction, to replay a dead owner's
records) -> the store's write lock (`prism.store.writelock`: flocks on DATA/meta and DATA) ->
LMDB's writer mutex. Every top-level write transaction takes the write lock first and drops it
when it ends, so no process ever waits inside LMDB for another's writer: the server only tries
the lock (`try_begin_batch`) and lets its writes wait asynchronously while reads, which never
wait for a writer, go on; an operator command waits for it, and commits its batches in
bounded steps (`prism import`: every COMMIT_EVERY_SECONDS; `prism gc`: every
`gc.STEP_SECONDS` or `gc.STEP_RECORDS`, or one layer fold or segment compaction) so that the
server's writes wait little.

A full disk. Content appends leave `segments.metadata_reserve()` bytes free, and new names half
of it, so checkpoints and REMOVE keep working once data or names have filled the disk. If a
checkpoint fails anyway (something else filled the filesystem), the journal keeps its records
and the batch is reopened from LMDB plus those records: nothing acknowledged is lost, calls
waiting for that checkpoint fail with NoSpace, and the owner retries later. The owner starts
on a full disk the same way: a dead owner's records it cannot checkpoint stay in the journal
and in its open batch.

Upgrade: a format-1 store (values without seals) is sealed in place, in one transaction, by
the first process that opens it (`upgrade`, with progress in the log); a server of an older
Prism must be stopped first.

Every transaction a room gets from here is sealed (`prism.store.sealed`): values are sealed
on write and verified on read, so a record whose bytes changed on disk is refused (`Corrupt`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import lmdb

from prism.errors import Busy, Corrupt, NoSpace, StoreError
from prism.store import records as R
from prism.store.journal import (
    DELETE,
    PUT,
    Change,
    Journal,
    JournalBusy,
    decode_changes,
    encode_changes,
)
from prism.store.schema import FORMAT_VERSION, JOURNAL_GEN, Ctx, get_meta
from prism.store.sealed import SealedTxn, seal, seal_all
from prism.store.segments import metadata_reserve

WRITE_LOCK_WAIT = 120.0
"""How long a process waits for the store's write lock before giving up with Busy."""
log = logging.getLogger("prism.store")


class _ReadTxn:
    """Context manager for reads; a plain class because it runs on every call. Inside
    `reading`, the first one opens the read transaction the others then share."""

    __slots__ = ("_ctx", "_txn")

    def __init__(self, ctx: Ctx) -> None:
        self._ctx = ctx
        self._txn: lmdb.Transaction | None = None

    def __enter__(self) -> lmdb.Transaction:
        ctx = self._ctx
        if ctx.batch is not None:
            return ctx.batch
        if ctx.reading is not None:
            return ctx.reading
        raw = ctx.env.begin(buffers=False)
        t = cast(lmdb.Transaction, SealedTxn(raw, ctx.db.index))
        if ctx.sharing:
            ctx.reading = t  # (`reading` ends it)
        else:
            self._txn = raw
        return t

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


def _raw(txn: lmdb.Transaction | None) -> lmdb.Transaction | None:
    """The LMDB transaction under a sealed one (LMDB nests only its own)."""
    return cast(SealedTxn, txn).raw if txn is not None else None


def begin_batch(ctx: Ctx) -> None:
    if ctx.batch is None:
        ctx.batch = begin_write(ctx)


def try_begin_batch(ctx: Ctx) -> bool:
    """`begin_batch()` if the write lock is free now; False, at once, while another
    process holds or waits for it (the server retries without blocking its loop)."""
    if ctx.batch is None:
        if not ctx.write_lock.try_acquire():
            return False
        begin_batch(ctx)
    return True


def commit(ctx: Ctx) -> None:
    """Commit the open batch to LMDB with fsync (with a journal: a checkpoint)."""
    if ctx.batch is None:
        return
    batch, ctx.batch = ctx.batch, None
    journal = ctx.journal
    if journal is None:
        durable_commit(ctx, batch)
        return
    next_gen = journal.generation + 1
    try:
        _fold(ctx, batch)
        batch.put(JOURNAL_GEN, R.U64.pack(next_gen), db=ctx.db.meta)
        ctx.segments.sync()
        batch.commit()
    except BaseException as exc:
        # The batch is gone, but the journal (untouched: records are only retired by a
        # commit that succeeded) still holds everything acknowledged from it: reopen the
        # batch from there, keeping the write lock meanwhile (nobody may write on top of
        # a state that lacks those records), so nothing acknowledged is lost and the
        # journal stays the durable copy until a later checkpoint succeeds.
        forget_layers(ctx)
        batch.abort()
        ctx.writer = None
        batch_lost(ctx)
        reopen_batch(ctx)
        raise _commit_error(exc, ctx.path) from exc
    ctx.writer = None
    ctx.write_lock.release()
    ctx.journaled.clear()
    journal.start(next_gen)
    ctx.segments.roll_if_full()


def make_durable(ctx: Ctx) -> None:
    """Make every operation of the open batch durable: append its changes to the journal
    and fdatasync it (content first), or commit the batch when there is no journal or
    no room in it. Group commit: one call covers every operation since the last."""
    journal = ctx.journal
    if ctx.batch is None:
        return
    if journal is None:
        commit(ctx)
        return
    hooks = ctx.rstat_hooks
    record = hooks.persist() if hooks is not None else None
    if record is not None:  # the batch's deferred statistics, durable with its data: only
        # in the journal (the batch keeps them in memory until its commit folds them)
        ctx.journaled.append((PUT, ctx.db.index[ctx.db.meta], *record))
        ctx.rstat_keys.append(record[0])
    if not ctx.journaled:
        ctx.segments.sync()
        return
    payload = encode_changes(ctx.journaled)
    if len(payload) > journal.room():
        commit(ctx)
        return
    ctx.segments.sync()
    try:
        journal.append(payload)
        journal.sync()
    except (OSError, NoSpace) as exc:  # checkpoint instead (or fail there)
        log.warning("journal write failed (%s); committing the batch instead", exc)
        commit(ctx)
        return
    ctx.journaled.clear()


def durable_commit(ctx: Ctx, txn: lmdb.Transaction) -> None:
    """Content first (fdatasync the segment), then the metadata that names it, with the
    recursive statistics deferred to this commit folded in (`quota.fold`)."""
    try:
        _fold(ctx, txn)
        ctx.segments.sync()
        txn.commit()
    except BaseException as exc:
        _forget_rstats(ctx)
        aborted(ctx, txn)
        error = _commit_error(exc, ctx.path)
        if error is exc:
            raise
        raise error from exc
    ctx.writer = None
    ctx.write_lock.release()
    _end_epoch(ctx)
    ctx.segments.roll_if_full()


def abort(ctx: Ctx) -> None:
    if ctx.batch is not None:
        batch, ctx.batch = ctx.batch, None
        _lose(ctx, batch)


def _lose(ctx: Ctx, batch: lmdb.Transaction) -> None:
    """Abort the batch `batch` and forget everything it held."""
    ctx.journaled.clear()
    _forget_rstats(ctx)
    aborted(ctx, batch)
    batch_lost(ctx)


def _fold(ctx: Ctx, t: lmdb.Transaction) -> None:
    """Store the recursive statistics deferred to `t`'s commit (`quota.fold`)."""
    if ctx.rstat_hooks is not None:
        ctx.rstat_hooks.fold(t)


RSTAT_COMPACT = 1 << 16
"""Bytes of pending entries (`Ctx.rstat_pending`) past which those that may be merged
are: a long batch holds one difference per directory, not one per operation."""


def compact_rstats(ctx: Ctx, upto: int) -> None:
    """Merge the first `upto` bytes of pending entries (in the journal already, or with no
    journal to put them in) into `Ctx.rstat_batch`, one difference per directory."""
    pending, merged = ctx.rstat_pending, ctx.rstat_batch
    for ns, vol, ino, unknown, nbytes, objects in R.RSTAT_ENTRY.iter_unpack(pending[:upto]):
        merge_delta(merged, (ns, vol, ino), None if unknown else (nbytes, objects))
    del pending[:upto]
    ctx.rstat_journaled = max(0, ctx.rstat_journaled - upto)


def merge_delta(
    into: dict[Any, tuple[int, int] | None], key: Any, change: tuple[int, int] | None
) -> None:
    """Add one directory's difference (bytes, objects) to `into`; None (its figures became
    unknown) absorbs every difference."""
    if change is None:
        into[key] = None
    elif key not in into:
        into[key] = change
    elif (have := into[key]) is not None:
        into[key] = (have[0] + change[0], have[1] + change[1])


def _forget_rstats(ctx: Ctx) -> None:
    ctx.rstat_pending, ctx.rstat_journaled = bytearray(), 0
    ctx.rstat_batch, ctx.rstat_keys = {}, []


def aborted(ctx: Ctx, txn: lmdb.Transaction) -> None:
    """Abort `txn` and forget what it may have taught the caches: they are keyed by layer
    id, and an aborted transaction hands its layer ids out again (they come from a counter
    in LMDB), so nothing cached for them may outlive it."""
    forget_layers(ctx)
    txn.abort()
    if txn is ctx.writer:
        ctx.writer = None
        ctx.write_lock.release()
        _end_epoch(ctx)


def forget_layers(ctx: Ctx) -> None:
    """Drop what is cached by layer id (after an abort, or gc moving records)."""
    ctx.paths.clear()
    ctx.import_maps.clear()


@contextlib.contextmanager
def write(ctx: Ctx) -> Iterator[lmdb.Transaction]:
    if ctx.batch is not None:
        child = sealed(ctx, ctx.env.begin(write=True, parent=_raw(ctx.batch)))
        recorder = None if ctx.journal is None else _Recorder(child, ctx.db.index)
        # (the operation's statistics are appended to `pending`; a `quota.fold` inside
        # replaces these tables: all given back, less the operation's, if it aborts)
        pending, mark = ctx.rstat_pending, len(ctx.rstat_pending)
        folded_from = ctx.rstat_journaled, ctx.rstat_batch, ctx.rstat_keys
        try:
            yield child if recorder is None else cast(lmdb.Transaction, recorder)
        except BaseException:
            ctx.events.clear()
            del pending[mark:]
            ctx.rstat_pending = pending
            ctx.rstat_journaled, ctx.rstat_batch, ctx.rstat_keys = folded_from
            aborted(ctx, child)
            raise
        child.commit()
        if recorder is not None:
            ctx.journaled += recorder.changes
        elif len(ctx.rstat_pending) > RSTAT_COMPACT:  # (no journal to keep them for)
            compact_rstats(ctx, len(ctx.rstat_pending))
        deliver(ctx)
        return
    txn = begin_write(ctx)
    mark = len(ctx.rstat_pending)
    try:
        yield txn
    except BaseException:
        ctx.events.clear()
        del ctx.rstat_pending[mark:]
        aborted(ctx, txn)
        raise
    durable_commit(ctx, txn)
    deliver(ctx)


def deliver(ctx: Ctx) -> None:
    """Tell the observer what the nested transaction that just committed changed, before
    control returns to the caller (so before any other call runs); a failed operation
    tells it nothing. An observer that fails must not fail the operation: it is told the
    batch was lost instead (VRPC then invalidates every table)."""
    events, ctx.events = ctx.events, []
    observer = ctx.observer
    if observer is None or not events:
        return
    try:
        for kind, *args in events:
            getattr(observer, kind)(*args)
    except Exception:
        log.exception("store observer failed; invalidating what it observes")
        batch_lost(ctx)


def batch_lost(ctx: Ctx) -> None:
    """The observer's view of the open batch is void (it was aborted or reopened)."""
    ctx.events.clear()
    if ctx.observer is not None:
        ctx.observer.batch_lost()


def _end_epoch(ctx: Ctx) -> None:
    """After a top-level write transaction committed or aborted (`prism.store.epoch`)."""
    if ctx.epoch_begun is not None:
        begun, ctx.epoch_begun = ctx.epoch_begun, None
        ctx.epoch.end(begun)


def begin_write(ctx: Ctx) -> lmdb.Transaction:
    """A top-level write transaction. A process that does not own the journal first
    checks whether its owner died with changes pending, and if so replays them in this
    transaction (holding LMDB's writer lock, so nobody writes in between). Takes the
    store's write lock first (`prism.store.writelock`), waiting up to WRITE_LOCK_WAIT."""
    if ctx.broken is not None:
        raise Corrupt(
            f"the store could not reload its journal after a failed commit "
            f"({ctx.broken}); restart the server, which replays it"
        )
    ctx.write_lock.acquire(WRITE_LOCK_WAIT)
    try:
        txn = ctx.writer = sealed(ctx, ctx.env.begin(write=True))
    except BaseException:
        ctx.write_lock.release()
        raise
    if ctx.epoch is not None:  # holding LMDB's writer lock: no other writer is in progress
        if ctx.journal is None:
            ctx.epoch_begun = ctx.epoch.begin()
        else:
            ctx.epoch.repair()  # a non-owner died between begin and end
    if ctx.journal is None and ctx.journal_path.exists():
        try:
            orphan = Journal.open(ctx.journal_path)
        except JournalBusy:
            return txn  # its owner is alive
        except BaseException:
            aborted(ctx, txn)
            raise
        try:
            generation, applied = apply_journal(ctx, txn, orphan)
            if applied:  # retired by this transaction's commit
                txn.put(JOURNAL_GEN, R.U64.pack(generation + 1), db=ctx.db.meta)
                log.warning("replayed %d journal records left by a stopped server", applied)
        except BaseException:
            aborted(ctx, txn)
            raise
        finally:
            orphan.close()
    return txn


def upgrade(ctx: Ctx) -> None:
    """Seal every record of a format-1 store, in one transaction (before any journal
    replay, which seals what it replays). A live server of an older Prism must not
    see its records change: while one owns the journal, refuse."""
    with ctx.env.begin() as t:
        version = t.get(b"format", db=ctx.db.meta)
    if version is None or len(version) != R.U32.size or R.U32.unpack(version)[0] != 1:
        return
    if ctx.journal is None and ctx.journal_path.exists():  # (a server owns it already)
        try:
            Journal.open(ctx.journal_path).close()
        except JournalBusy:
            raise Busy(
                f"{ctx.path} is served by an older Prism that owns {ctx.journal_path}; "
                "stop it, then run any prism command to upgrade the store"
            ) from None
    ctx.write_lock.acquire(WRITE_LOCK_WAIT)
    txn = ctx.env.begin(write=True)
    try:
        version = txn.get(b"format", db=ctx.db.meta)
        if version is not None and len(version) == R.U32.size:  # nobody upgraded meanwhile
            log.warning("upgrading %s to format 2: sealing every record", ctx.path)
            count = seal_all(
                txn,
                ctx.db.all,
                lambda n: log.warning("upgrade: sealed %d records so far", n),
            )
            txn.put(
                b"format",
                seal(ctx.db.index[ctx.db.meta], b"format", R.U32.pack(FORMAT_VERSION)),
                db=ctx.db.meta,
            )
            log.warning("upgrade done: sealed %d records", count)
        txn.commit()
    except BaseException:
        txn.abort()
        raise
    finally:
        ctx.write_lock.release()


def resume_journal(ctx: Ctx) -> None:
    """Take up the records a dead owner left: apply them to a batch and checkpoint it.
    On a full disk the checkpoint fails; the batch then stays open (the journal is its
    durable copy) so that the server still starts and clients can remove files."""
    applied = reopen_batch(ctx)
    if not applied:
        return
    log.warning("replayed %d journal records left by a stopped server", applied)
    try:
        commit(ctx)
    except NoSpace as exc:
        log.warning("%s; serving them from the journal until a checkpoint succeeds", exc)


def reopen_batch(ctx: Ctx) -> int:
    """Open the batch as LMDB plus the journal's records, exactly what was acknowledged
    (changes not yet journaled are dropped, and the write verifier changes so that
    clients resend their UNSTABLE writes); return the number of records."""
    journal = ctx.journal
    assert journal is not None and ctx.batch is None
    ctx.journaled.clear()
    _forget_rstats(ctx)  # (the journal holds what was persisted of them: replayed below)
    ctx.boot_id = secrets.randbits(63) | 1
    try:
        txn = begin_write(ctx)
    except BaseException as exc:
        ctx.broken = exc
        raise
    try:
        _, applied = apply_journal(ctx, txn, journal)
    except BaseException as exc:
        # Keep the write lock until this process exits: another writer must not commit
        # on top of a state that lacks the journal's records (it replays them first once
        # the journal's owner is gone).
        forget_layers(ctx)
        txn.abort()
        ctx.writer = None
        ctx.broken = exc
        raise
    if applied:
        ctx.batch = txn
    else:
        aborted(ctx, txn)
    return applied


def apply_journal(ctx: Ctx, txn: lmdb.Transaction, journal: Journal) -> tuple[int, int]:
    """Apply the records of the current generation to `txn`, leaving them in place
    (the commit that retires them bumps the generation); return (generation, records).
    The journal's next append goes after them."""
    generation = get_meta(ctx, txn, JOURNAL_GEN)
    payloads = journal.recover(generation)
    for payload in payloads:
        for kind, index, key, value in decode_changes(payload):
            if index >= len(ctx.db.all):
                raise Corrupt(f"{journal.path} names an unknown database {index}")
            db = ctx.db.all[index]
            if kind == PUT:
                txn.put(key, value, db=db)
            else:
                txn.delete(key, db=db)
    if payloads:
        forget_layers(ctx)
    return generation, len(payloads)


def sealed(ctx: Ctx, raw: lmdb.Transaction) -> lmdb.Transaction:
    """`raw` behind the one seam that seals and verifies every value (`sealed`)."""
    return cast(lmdb.Transaction, SealedTxn(raw, ctx.db.index))


def read_own(ctx: Ctx) -> lmdb.Transaction:
    """A read-only transaction of the caller's own (to abort), values verified."""
    return sealed(ctx, ctx.env.begin(buffers=False))


def read(ctx: Ctx) -> _ReadTxn:
    """A read transaction (the open batch, when there is one, so reads see its writes; else
    the call's shared one, when `reading` opened it)."""
    return _ReadTxn(ctx)


class _SharedRead:
    """Context manager: every `read` inside it, with no batch open, shares one read
    transaction (one snapshot, one LMDB begin), opened by the first of them (a call that
    reads nothing opens none); a plain class because it runs on every call."""

    __slots__ = ("_ctx", "_outer")

    def __init__(self, ctx: Ctx) -> None:
        self._ctx = ctx
        self._outer = False

    def __enter__(self) -> None:
        ctx = self._ctx
        self._outer = not ctx.sharing
        ctx.sharing = True

    def __exit__(self, *exc: object) -> None:
        ctx = self._ctx
        if self._outer:
            ctx.sharing = False
            shared, ctx.reading = ctx.reading, None
            if shared is not None:
                ctx.ns_read.clear()
                cast(SealedTxn, shared).raw.abort()


def reading(ctx: Ctx) -> _SharedRead:
    """One read transaction for all the reads of a read-only operation made of several
    store calls (an NFS call: its handle's export, then the object), as one transaction
    would: inside it, `read` hands out that transaction (or the batch, when one is open)."""
    return _SharedRead(ctx)


def lock_journal(path: Path, wait: float) -> Journal:
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
