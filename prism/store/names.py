"""The operations that change names: create, mkdir, symlink, mknod, link, remove, rmdir and
rename, and what happens to an object when its last name goes.

Each runs in one write transaction (`txn.write`; in a batch, a nested one, so a failing
operation changes nothing) and returns the new object's attributes and its directories'
attributes before and after (`api.Made`, `api.Wcc`, `api.Renamed`); a failure carries the
directories' attributes on the error (`posix.unchanged_on_failure`). Names never cross
between a share and its surroundings (rename and link across them are EXDEV), and a share's
mount point is removed only by `prism unshare`.

Link counts: a directory has 2 + its subdirectories; a non-directory, its directory entries
(at most NLINK_MAX), and while it has more than one, the hard-link index (`links`) records in
which directories they are (link, unlink, rename keep it in the same transaction). When the
last link goes, `destroy` releases the object's records and content (its top layer's chunk
map) and its usage. New names keep half of the metadata reserve free
(`segments.require_room`), so that REMOVE still works on a full disk. A non-directory left
with one link holds in that link's directory; one that keeps several after losing the one it
was last placed by no longer knows its holding directory (`links.unlinked`).
"""

from __future__ import annotations

import time

import lmdb

from prism.errors import (
    CrossDevice,
    Exists,
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    PermissionDenied,
    TooManyLinks,
)
from prism.limits import NLINK_MAX
from prism.store import txn
from prism.store.api import Made, Renamed, Wcc
from prism.store.content import drop_top_chunks
from prism.store.layers import SHARE_VOL_BASE, Out, View
from prism.store.links import linked, moved, unlinked
from prism.store.perms import MAY_EXEC, MAY_WRITE, require, sticky_ok
from prism.store.posix import apply_sattr, set_attributes, unchanged_on_failure
from prism.store.quota import (
    add_rstat,
    add_usage,
    charged_bytes,
    check_quota,
    empty_rstat,
    left_dir,
    negate,
    weight,
)
from prism.store.records import Inode
from prism.store.schema import Ctx
from prism.store.tree import (
    MAX_DEPTH,
    alloc_ino,
    check_name,
    drop_entry,
    drop_inode,
    find_entry,
    get_inode,
    is_empty_dir,
    locate,
    note_move,
    put_entry,
    put_inode,
    require_writable,
    to_attr,
)
from prism.store.types import (
    MAX_FILE_SIZE,
    ROOT_INO,
    SYMLINK_MAX,
    Cred,
    FileType,
    ObjectId,
    SetAttr,
)


def destroy(ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, node: Inode) -> None:
    """The last link is gone: release the object's own records. Only the top layer's
    chunk-map records go (O(chunks written since the last freeze), never O(file size)): the
    inode's whiteout shadows every chunk-map record of it below the top, since a file's
    chunks are only ever read through its live inode and an inode number is never given out
    again in a namespace. gc's fold drops the shadowed records (`gc._fold`)."""
    if node.type == FileType.REG:
        drop_top_chunks(ctx, t, view.top, vol, ino, 0)
    add_usage(ctx, t, view, -charged_bytes(node), -1)
    drop_inode(ctx, t, view, vol, ino)


def new_dir(ctx: Ctx, t: lmdb.Transaction, view: View, pvol: int, pino: int) -> int:
    """A new empty directory object (root-owned, 0755) whose '..' is (pvol, pino); the
    caller links it."""
    ino = alloc_ino(ctx, t, view)
    now = time.time_ns()
    node = Inode(FileType.DIR, 0o755, 2, 0, 0, 0, 0, 0, now, now, now, pvol, pino)
    put_inode(ctx, t, view, 0, ino, empty_rstat(node))
    add_usage(ctx, t, view, 0, 1)
    return ino


def _require_dir_change(view: View, out: Out, dnode: Inode, cred: Cred | None) -> None:
    """A change of directory `dnode`'s entries is allowed."""
    require_writable(view, out)
    if dnode.type != FileType.DIR:
        raise NotADirectory("not a directory")
    require(dnode, cred, MAY_WRITE | MAY_EXEC, "no write permission on the directory")


def _new_object(
    ctx: Ctx,
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
) -> Made:
    check_name(name)
    ctx.segments.require_room(0, ctx.segments.reserve // 2)
    with txn.write(ctx) as t:
        view, d, dnode, out = locate(ctx, t, dir)
        before = to_attr(dir, dnode)
        with unchanged_on_failure(dir, before):
            _require_dir_change(view, out, dnode, cred)
            if find_entry(ctx, t, view, d.vol, d.ino, name) is not None:
                raise Exists(f"{name!r} already exists")
            check_quota(ctx, t, view, len(target))
            ino = alloc_ino(ctx, t, view)
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
            apply_sattr(
                ctx,
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
                check_quota(ctx, t, view, size)
                node.size = size
            if node_type == FileType.DIR:
                empty_rstat(node)
            put_inode(ctx, t, view, 0, ino, node)
            put_entry(ctx, t, view, d.vol, d.ino, name, (0, ino, node_type))
            if node_type == FileType.DIR:
                dnode.nlink += 1
            dnode.mtime_ns = dnode.ctime_ns = now
            put_inode(ctx, t, view, d.vol, d.ino, dnode)
            add_usage(ctx, t, view, charged_bytes(node), 1)
            add_rstat(ctx, view, (d.vol, d.ino), weight(node))
        return Made(to_attr(out.oid(0, ino), node), Wcc(before, to_attr(dir, dnode)))


def create(
    ctx: Ctx,
    dir: ObjectId,
    name: bytes,
    mode: int = 0o644,
    cred: Cred | None = None,
    *,
    exclusive: bytes | None = None,
    guarded: bool = False,
    sattr: SetAttr | None = None,
) -> Made:
    """A new regular file, or (unchecked, or an exclusive retry) the one already there. A
    read-only namespace refuses every create, even of a name that exists."""
    check_name(name)
    resize: tuple[ObjectId, int] | None = None  # an unchecked create of an existing file
    with txn.read(ctx) as t:
        view, d, dnode, out = locate(ctx, t, dir)
        dir_attr = to_attr(dir, dnode)
        with unchanged_on_failure(dir, dir_attr):
            require_writable(view, out)
            if dnode.type != FileType.DIR:
                raise NotADirectory("not a directory")
            require(dnode, cred, MAY_EXEC, "no search permission on the directory")
            entry = find_entry(ctx, t, view, d.vol, d.ino, name)
            existing = get_inode(ctx, t, view, entry[0], entry[1]) if entry else None
            if entry is not None and existing is not None:
                oid = out.oid(entry[0], entry[1])
                if exclusive is not None:
                    if existing.type == FileType.REG and existing.verifier == exclusive:
                        return Made(to_attr(oid, existing), Wcc(dir_attr, dir_attr))
                    raise Exists(f"{name!r} already exists")
                if guarded:
                    raise Exists(f"{name!r} already exists")
                if existing.type == FileType.DIR:
                    raise IsADirectory(f"{name!r} is a directory")
                if sattr is None or sattr.size is None:
                    return Made(to_attr(oid, existing), Wcc(dir_attr, dir_attr))
                resize = (oid, sattr.size)
    if resize is None:
        return _new_object(ctx, dir, name, FileType.REG, mode, cred, sattr, verifier=exclusive)
    with unchanged_on_failure(dir, dir_attr):  # the size asked for: a SETATTR of the file
        resized = set_attributes(ctx, resize[0], SetAttr(size=resize[1]), cred)
    return Made(resized.after, Wcc(dir_attr, dir_attr))


def mkdir(
    ctx: Ctx,
    dir: ObjectId,
    name: bytes,
    mode: int = 0o755,
    cred: Cred | None = None,
    *,
    sattr: SetAttr | None = None,
) -> Made:
    return _new_object(ctx, dir, name, FileType.DIR, mode, cred, sattr)


def symlink(
    ctx: Ctx,
    dir: ObjectId,
    name: bytes,
    target: bytes,
    cred: Cred | None = None,
    *,
    mode: int = 0o777,
    sattr: SetAttr | None = None,
) -> Made:
    if len(target) > SYMLINK_MAX:
        raise NameTooLong(f"symlink target of {len(target)} bytes; the limit is {SYMLINK_MAX}")
    if not target or b"\0" in target:
        raise InvalidArgument(f"symlink target must be 1-{SYMLINK_MAX} bytes without NUL")
    return _new_object(ctx, dir, name, FileType.LNK, mode, cred, sattr, target=target)


def mknod(
    ctx: Ctx,
    dir: ObjectId,
    name: bytes,
    ftype: FileType,
    mode: int,
    cred: Cred | None = None,
    *,
    rdev: tuple[int, int] = (0, 0),
    sattr: SetAttr | None = None,
) -> Made:
    if ftype not in (FileType.BLK, FileType.CHR, FileType.SOCK, FileType.FIFO):
        raise InvalidArgument(f"mknod cannot make a {ftype.name}")
    if ftype in (FileType.BLK, FileType.CHR) and not (cred is None or cred.is_root):
        raise NotPermitted("only root may create device nodes")
    return _new_object(ctx, dir, name, ftype, mode, cred, sattr, rdev=rdev)


def _named(
    ctx: Ctx, t: lmdb.Transaction, view: View, d: ObjectId, name: bytes, share_hint: str
) -> tuple[int, int, FileType, Inode]:
    """The object an entry of directory `d` names, for removing or renaming it; a share's
    mount point is refused with `share_hint`."""
    entry = find_entry(ctx, t, view, d.vol, d.ino, name)
    if entry is None:
        raise NotFound(f"{name!r} does not exist")
    vol, ino, ftype = entry
    if vol >= SHARE_VOL_BASE:
        raise NotPermitted(f"{name!r} is a share; {share_hint}")
    node = get_inode(ctx, t, view, vol, ino)
    if node is None:
        raise NotFound(f"{name!r} does not exist")
    return vol, ino, ftype, node


def _unlink(ctx: Ctx, dir: ObjectId, name: bytes, cred: Cred | None, *, want_dir: bool) -> Wcc:
    if name in (b".", b".."):
        raise (InvalidArgument if name == b"." else NotEmpty)(f"cannot remove {name!r}")
    check_name(name)
    with txn.write(ctx) as t:
        view, d, dnode, out = locate(ctx, t, dir)
        before = to_attr(dir, dnode)
        with unchanged_on_failure(dir, before):
            _require_dir_change(view, out, dnode, cred)
            vol, ino, _, node = _named(ctx, t, view, d, name, "remove it with `prism unshare`")
            if want_dir and node.type != FileType.DIR:
                raise NotADirectory(f"{name!r} is not a directory")
            if not want_dir and node.type == FileType.DIR:
                raise IsADirectory(f"{name!r} is a directory; use rmdir")
            if not sticky_ok(dnode, node, cred):
                raise PermissionDenied("sticky directory: only the owner may remove this")
            if want_dir and not is_empty_dir(ctx, t, view, vol, ino):
                raise NotEmpty(f"directory {name!r} is not empty")
            drop_entry(ctx, t, view, d.vol, d.ino, name)
            now = time.time_ns()
            gone = weight(node)
            if node.type == FileType.DIR:
                dnode.nlink = max(2, dnode.nlink - 1)
                destroy(ctx, t, view, vol, ino, node)
            else:
                node.nlink -= 1
                if node.nlink <= 0:
                    destroy(ctx, t, view, vol, ino, node)
                else:
                    unlinked(ctx, t, view, vol, ino, node, (d.vol, d.ino))
                    node.ctime_ns = now
                    put_inode(ctx, t, view, vol, ino, node)
            dnode.mtime_ns = dnode.ctime_ns = now
            put_inode(ctx, t, view, d.vol, d.ino, dnode)
            left_dir(ctx, view, node, gone, (d.vol, d.ino))
        return Wcc(before, to_attr(dir, dnode))


def remove(ctx: Ctx, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Wcc:
    return _unlink(ctx, dir, name, cred, want_dir=False)


def rmdir(ctx: Ctx, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Wcc:
    return _unlink(ctx, dir, name, cred, want_dir=True)


def rename(
    ctx: Ctx,
    src_dir: ObjectId,
    src_name: bytes,
    dst_dir: ObjectId,
    dst_name: bytes,
    cred: Cred | None = None,
) -> Renamed:
    for name in (src_name, dst_name):
        if name in (b".", b".."):
            raise InvalidArgument("cannot rename '.' or '..'")
        check_name(name)
    if src_dir.ns != dst_dir.ns:
        raise CrossDevice("cannot rename between namespaces")
    with txn.write(ctx) as t:
        view, sd, sdnode, sout = locate(ctx, t, src_dir)
        src_before = to_attr(src_dir, sdnode)
        with unchanged_on_failure(src_dir, src_before):
            dview, dd, ddnode, dout = locate(ctx, t, dst_dir)
            dst_before = to_attr(dst_dir, ddnode)
            with unchanged_on_failure(dst_dir, dst_before):
                _require_dir_change(view, sout, sdnode, cred)
                _require_dir_change(dview, dout, ddnode, cred)
                if (view.id, sout.base) != (dview.id, dout.base):
                    raise CrossDevice("cannot rename into or out of a share")
                if sd == dd:
                    ddnode = sdnode  # one directory: apply every change to one copy
                _move(ctx, t, view, (sd, sdnode), src_name, (dd, ddnode), dst_name, cred)
        return Renamed(
            Wcc(src_before, to_attr(src_dir, sdnode)), Wcc(dst_before, to_attr(dst_dir, ddnode))
        )


def _move(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    src: tuple[ObjectId, Inode],
    src_name: bytes,
    dst: tuple[ObjectId, Inode],
    dst_name: bytes,
    cred: Cred | None,
) -> None:
    """Rename's changes: entry `src_name` of directory `src` becomes `dst_name` of `dst`
    (each a located directory and its inode, one inode when they are one directory)."""
    (sd, sdnode), (dd, ddnode) = src, dst
    svol, sino, stype, snode = _named(ctx, t, view, sd, src_name, "it cannot be renamed")
    if not sticky_ok(sdnode, snode, cred):
        raise PermissionDenied("sticky directory: only the owner may rename this")
    same_dir = sd == dd
    if same_dir and src_name == dst_name:
        return
    if snode.type == FileType.DIR and not same_dir:
        _refuse_loop(ctx, t, view, (svol, sino), dd)
    existing = find_entry(ctx, t, view, dd.vol, dd.ino, dst_name)
    if existing is not None and existing[0] >= SHARE_VOL_BASE:
        raise NotPermitted(f"{dst_name!r} is a share; it cannot be replaced")
    if existing is not None and (existing[0], existing[1]) == (svol, sino):
        return  # both names are links to the same object: POSIX says do nothing
    if not same_dir:
        note_move(ctx, t, view, (svol, sino, stype), (sd.vol, sd.ino), (dd.vol, dd.ino))
    now = time.time_ns()
    moving = weight(snode)
    if existing is not None:
        enode = get_inode(ctx, t, view, existing[0], existing[1])
        if enode is not None:
            replaced = weight(enode)
            if not sticky_ok(ddnode, enode, cred):
                raise PermissionDenied("sticky directory: cannot replace this entry")
            if snode.type == FileType.DIR:
                if enode.type != FileType.DIR:
                    raise NotADirectory(f"{dst_name!r} is not a directory")
                if not is_empty_dir(ctx, t, view, existing[0], existing[1]):
                    raise NotEmpty(f"{dst_name!r} is not empty")
            elif enode.type == FileType.DIR:
                raise IsADirectory(f"{dst_name!r} is a directory")
            if enode.type == FileType.DIR:
                ddnode.nlink -= 1
                destroy(ctx, t, view, existing[0], existing[1], enode)
            else:
                enode.nlink -= 1
                if enode.nlink <= 0:
                    destroy(ctx, t, view, existing[0], existing[1], enode)
                else:
                    unlinked(ctx, t, view, existing[0], existing[1], enode, (dd.vol, dd.ino))
                    enode.ctime_ns = now
                    put_inode(ctx, t, view, existing[0], existing[1], enode)
            left_dir(ctx, view, enode, replaced, (dd.vol, dd.ino))
    drop_entry(ctx, t, view, sd.vol, sd.ino, src_name)
    put_entry(ctx, t, view, dd.vol, dd.ino, dst_name, (svol, sino, stype))
    snode.ctime_ns = now
    if snode.type != FileType.DIR:
        moved(ctx, t, view, svol, sino, snode, (sd.vol, sd.ino), (dd.vol, dd.ino))
    snode.parent_vol, snode.parent_ino = dd.vol, dd.ino
    if snode.type == FileType.DIR and not same_dir:
        ddnode.nlink += 1
        sdnode.nlink -= 1
    put_inode(ctx, t, view, svol, sino, snode)
    sdnode.mtime_ns = sdnode.ctime_ns = now
    put_inode(ctx, t, view, sd.vol, sd.ino, sdnode)
    if not same_dir:
        ddnode.mtime_ns = ddnode.ctime_ns = now
        put_inode(ctx, t, view, dd.vol, dd.ino, ddnode)
        add_rstat(ctx, view, (sd.vol, sd.ino), negate(moving))
        add_rstat(ctx, view, (dd.vol, dd.ino), moving)


def _refuse_loop(
    ctx: Ctx, t: lmdb.Transaction, view: View, moving: tuple[int, int], dst_dir: ObjectId
) -> None:
    vol, ino = dst_dir.vol, dst_dir.ino
    for _ in range(MAX_DEPTH):
        if (vol, ino) == moving:
            raise InvalidArgument("cannot move a directory inside itself")
        if vol == 0 and ino == ROOT_INO:
            return
        node = get_inode(ctx, t, view, vol, ino)
        if node is None or (node.parent_vol, node.parent_ino) == (vol, ino):
            return
        vol, ino = node.parent_vol, node.parent_ino


def link(ctx: Ctx, oid: ObjectId, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Made:
    check_name(name)
    ctx.segments.require_room(0, ctx.segments.reserve // 2)
    if oid.ns != dir.ns:
        raise CrossDevice("cannot link across namespaces")
    with txn.write(ctx) as t:
        oview, loc, node, out = locate(ctx, t, oid)
        with unchanged_on_failure(oid, to_attr(oid, node)):
            view, d, dnode, dout = locate(ctx, t, dir)
            before = to_attr(dir, dnode)
            with unchanged_on_failure(dir, before):
                _require_dir_change(view, dout, dnode, cred)
                require_writable(oview, out)
                if (view.id, dout.base) != (oview.id, out.base):
                    raise CrossDevice("cannot link into or out of a share")
                if node.type == FileType.DIR:
                    raise IsADirectory("cannot hard-link a directory")
                if node.nlink >= NLINK_MAX:
                    raise TooManyLinks(f"the object already has {node.nlink} links")
                if find_entry(ctx, t, view, d.vol, d.ino, name) is not None:
                    raise Exists(f"{name!r} already exists")
                note_move(ctx, t, view, (loc.vol, loc.ino, node.type), None, (d.vol, d.ino))
                linked(ctx, t, view, loc.vol, loc.ino, node, (d.vol, d.ino))
                if node.nlink == 1:  # from now on the hard-link index counts it
                    add_rstat(ctx, view, (node.parent_vol, node.parent_ino), negate(weight(node)))
                now = time.time_ns()
                node.nlink += 1
                node.ctime_ns = now
                node.parent_vol, node.parent_ino = d.vol, d.ino
                put_inode(ctx, t, view, loc.vol, loc.ino, node)
                put_entry(ctx, t, view, d.vol, d.ino, name, (loc.vol, loc.ino, node.type))
                dnode.mtime_ns = dnode.ctime_ns = now
                put_inode(ctx, t, view, d.vol, d.ino, dnode)
        return Made(to_attr(oid, node), Wcc(before, to_attr(dir, dnode)))
