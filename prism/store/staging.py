"""Staged imports: a tree built out of sight, published in one transaction.

`prism import` builds its tree in a detached directory of the VM (inode `ino` of volume 0,
linked from nowhere; `begin_staging` records it in `meta` under b"stage:"+token as JSON
{ns, ino}), committing in bounded batches, then `publish_staging` links it at its
destination in one transaction. The builder holds DATA/staging/<token>.lock (flock) until it
publishes or discards; a staged tree whose lock is free belongs to a dead import and is
debris, which the next import or gc removes (`reap_stagings`), in bounded steps. Until then
its objects count in the VM's usage, as they did when built.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time

from prism.errors import Exists, InvalidArgument, NotADirectory, NotFound, ReadOnly, Stale
from prism.store import txn
from prism.store.compose import place
from prism.store.layers import SHARE_VOL_BASE, ns_record, view_by_name, view_of
from prism.store.links import moved
from prism.store.names import destroy, new_dir, remove, rmdir
from prism.store.posix import readdir
from prism.store.quota import add_rstat, check_quota, weight
from prism.store.schema import STAGE_PREFIX, STAGING_DIR, Ctx, stage_markers
from prism.store.tree import drop_entry, find_entry, get_inode, list_dir, put_entry, put_inode
from prism.store.types import ROOT_INO, FileType, ObjectId


def begin_staging(ctx: Ctx, vm: str) -> tuple[ObjectId, str, int]:
    """A new detached directory of `vm` to build an import in, invisible to the VM's
    tree until `publish_staging`: (its id, the staging token, the fd of the lock file
    that the caller holds until it publishes or discards). What is built there counts
    against the VM's quota as it is built."""
    directory = ctx.path / STAGING_DIR
    directory.mkdir(exist_ok=True)
    token = secrets.token_hex(8)
    lock = directory / f"{token}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with txn.write(ctx) as t:
            view = view_by_name(ctx, t, vm)
            if view.kind != "vm":
                raise ReadOnly(f"{vm} is a read-only snapshot; import into a VM")
            check_quota(ctx, t, view, 0)
            ino = new_dir(ctx, t, view, 0, ROOT_INO)
            marker = json.dumps({"ns": view.id, "ino": ino}).encode()
            t.put(STAGE_PREFIX + token.encode(), marker, db=ctx.db.meta)
    except BaseException:
        os.close(fd)
        os.unlink(lock)
        raise
    return ObjectId(view.id, 0, ino), token, fd


def publish_staging(ctx: Ctx, token: str, to: str) -> None:
    """Lay the staged tree into its VM at absolute path `to`, in one transaction. A
    missing `to` is made (like `mkdir -p`; O(depth)) and the staged directory becomes
    it; an existing directory receives the staged directory's entries (one that exists
    there is refused: nothing is overwritten) and its attributes, O(top-level entries)."""
    with txn.write(ctx) as t:
        raw = t.get(STAGE_PREFIX + token.encode(), db=ctx.db.meta)
        if raw is None:
            raise NotFound(f"no import staged as {token}")
        marker = json.loads(bytes(raw))
        view = view_of(ctx, t, marker["ns"])
        staged = marker["ino"]
        vol, ino = 0, ROOT_INO
        parts = [p for p in to.split("/") if p]
        while parts:
            node = get_inode(ctx, t, view, vol, ino)
            if node is None or node.type != FileType.DIR:
                raise NotADirectory(f"{view.name}:{to} is not a directory; pick another --to")
            entry = find_entry(ctx, t, view, vol, ino, parts[0].encode())
            if entry is None:
                break
            if entry[0] >= SHARE_VOL_BASE:
                raise InvalidArgument(f"{view.name}:{to} is inside a share; import there")
            vol, ino = entry[0], entry[1]
            parts.pop(0)
        dnode = get_inode(ctx, t, view, vol, ino)
        if dnode is None or dnode.type != FileType.DIR:
            raise NotADirectory(f"{view.name}:{to} is not a directory; pick another --to")
        root = get_inode(ctx, t, view, 0, staged)
        if root is None:
            raise Stale(f"the import staged in {view.name} is gone (rolled back?)")
        if parts:
            for part in parts[:-1]:
                made = new_dir(ctx, t, view, vol, ino)
                place(ctx, t, view, vol, ino, part.encode(), (0, made, FileType.DIR))
                vol, ino = 0, made
            place(ctx, t, view, vol, ino, parts[-1].encode(), (0, staged, FileType.DIR))
        else:
            for item in list(list_dir(ctx, t, view, 0, staged, 0)):
                if find_entry(ctx, t, view, vol, ino, item.name) is not None:
                    raise Exists(
                        f"{view.name}:{to.rstrip('/')}/{item.name.decode(errors='replace')}"
                        " already exists; import into an empty or new directory with --to "
                        "/path (nothing was imported)"
                    )
                target = (item.oid.vol, item.oid.ino, item.type)
                drop_entry(ctx, t, view, 0, staged, item.name)
                put_entry(ctx, t, view, vol, ino, item.name, target)
                child = get_inode(ctx, t, view, item.oid.vol, item.oid.ino)
                assert child is not None
                add_rstat(ctx, view, (vol, ino), weight(child))
                if item.type == FileType.DIR:
                    dnode.nlink += 1
                else:  # its link moves: the hard-link index and holder follow
                    moved(ctx, t, view, *target[:2], child, (0, staged), (vol, ino))
                    if (child.parent_vol, child.parent_ino) != (0, staged):
                        continue
                child.parent_vol, child.parent_ino = vol, ino
                put_inode(ctx, t, view, item.oid.vol, item.oid.ino, child)
            dnode.mode, dnode.uid, dnode.gid = root.mode, root.uid, root.gid
            dnode.atime_ns, dnode.mtime_ns = root.atime_ns, root.mtime_ns
            dnode.ctime_ns = time.time_ns()
            put_inode(ctx, t, view, vol, ino, dnode)
            destroy(ctx, t, view, 0, staged, root)
        t.delete(STAGE_PREFIX + token.encode(), db=ctx.db.meta)
    _unlock_staging(ctx, token)


def discard_staging(ctx: Ctx, token: str, *, step: int = 2000) -> None:
    """Remove a staged tree, committing every `step` removals (the writer lock is never
    held long), then its marker. Dying half way leaves a smaller staged tree, which the
    next `reap_stagings` removes."""
    with txn.read(ctx) as t:
        raw = t.get(STAGE_PREFIX + token.encode(), db=ctx.db.meta)
    if raw is not None:
        marker = json.loads(bytes(raw))
        with contextlib.suppress(Stale):  # the VM was removed or rolled back meanwhile
            _empty_tree(ctx, ObjectId(marker["ns"], 0, marker["ino"]), step)
        with txn.write(ctx) as t:
            view = view_of(ctx, t, marker["ns"]) if ns_record(ctx, t, marker["ns"]) else None
            node = get_inode(ctx, t, view, 0, marker["ino"]) if view is not None else None
            if view is not None and node is not None:
                destroy(ctx, t, view, 0, marker["ino"], node)
            t.delete(STAGE_PREFIX + token.encode(), db=ctx.db.meta)
    _unlock_staging(ctx, token)


def reap_stagings(ctx: Ctx) -> int:
    """Discard what imports that died had staged (their lock file is free); return how
    many there were."""
    dead = [token for token in stagings(ctx) if staging_dead(ctx, token)]
    for token in dead:
        discard_staging(ctx, token)
    return len(dead)


def stagings(ctx: Ctx) -> list[str]:
    with txn.read(ctx) as t:
        return list(stage_markers(ctx, t))


def staging_dead(ctx: Ctx, token: str) -> bool:
    """Whether no live process holds the staging's lock file."""
    try:
        fd = os.open(ctx.path / STAGING_DIR / f"{token}.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _unlock_staging(ctx: Ctx, token: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ctx.path / STAGING_DIR / f"{token}.lock")


def _empty_tree(ctx: Ctx, top: ObjectId, step: int) -> None:
    """Remove everything below directory `top`, depth first, committing every `step`
    removals."""
    stack: list[tuple[ObjectId, ObjectId, bytes]] = [(top, top, b"")]
    ops = 0
    txn.begin_batch(ctx)
    try:
        while stack:
            here, parent, name = stack[-1]
            entries, _ = readdir(ctx, here, limit=step)
            subdirs = [(e.oid, here, e.name) for e in entries if e.type == FileType.DIR]
            if subdirs:
                stack.extend(subdirs)
                continue
            for e in entries:
                remove(ctx, here, e.name)
            if not entries:
                stack.pop()
                if here != top:
                    rmdir(ctx, parent, name)
            ops += len(entries) or 1
            if ops >= step:
                txn.commit(ctx)
                txn.begin_batch(ctx)
                ops = 0
        txn.commit(ctx)
    except BaseException:
        txn.abort(ctx)
        raise
