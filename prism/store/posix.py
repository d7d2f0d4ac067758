"""The per-object operations (what NFS procedures ask of one namespace): attributes, lookup,
access, read, write, create, link, rename, remove, readdir.

Each operation resolves its handles and does all its work in one transaction (`txn.read` or
`txn.write`; in a batch, a nested transaction, so a failing operation changes nothing), and
returns the attributes its reply needs from that same transaction. Objects reached through a
share are the source VM's own (`tree.locate` routes them, the caller's ids map back through
`layers.Out`); an operation never crosses between a share and its surroundings (rename and
link across them are EXDEV).

Link counts: a directory has 2 + its subdirectories; a non-directory, its directory entries
(at most NLINK_MAX). When the last link goes, `destroy` releases the object's records and
content (`content.truncate`) and its usage. New names keep half of the metadata reserve free
(`segments.require_room`), so that REMOVE still works on a full disk.
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
    NotSync,
    PermissionDenied,
    TooManyLinks,
)
from prism.store import records as R
from prism.store import txn
from prism.store.content import read_range, truncate, write_range
from prism.store.layers import SHARE_VOL_BASE, SHARE_VOL_SPAN, Out, View, share_of, view_of
from prism.store.perms import (
    MAY_EXEC,
    MAY_READ,
    MAY_WRITE,
    granted,
    may,
    require,
    require_data,
    sticky_ok,
)
from prism.store.quota import add_usage, charged_bytes, check_quota
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
    inode_record,
    is_empty_dir,
    list_dir,
    list_raw,
    locate,
    lost_link,
    put_entry,
    put_inode,
    resolve_path,
    to_attr,
)
from prism.store.types import (
    MAX_FILE_SIZE,
    NOW,
    ROOT_INO,
    SYMLINK_MAX,
    Attr,
    Cred,
    DirEntry,
    FileType,
    ObjectId,
    SetAttr,
)

NLINK_MAX = 65000


def destroy(ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, node: Inode) -> None:
    """The last link is gone: release the object's own records."""
    if node.type == FileType.REG:
        truncate(ctx, t, view, vol, ino, node.size, 0)
    add_usage(ctx, t, view, -charged_bytes(node), -1)
    drop_inode(ctx, t, view, vol, ino)


def new_dir(ctx: Ctx, t: lmdb.Transaction, view: View, pvol: int, pino: int) -> int:
    """A new empty directory object (root-owned, 0755) whose '..' is (pvol, pino); the
    caller links it."""
    ino = alloc_ino(ctx, t, view)
    now = time.time_ns()
    node = Inode(FileType.DIR, 0o755, 2, 0, 0, 0, 0, 0, now, now, now, pvol, pino)
    put_inode(ctx, t, view, 0, ino, node)
    add_usage(ctx, t, view, 0, 1)
    return ino


def root(ctx: Ctx, ns_id: int) -> ObjectId:
    with txn.read(ctx) as t:
        view_of(ctx, t, ns_id)
    return ObjectId(ns_id, 0, ROOT_INO)


def attributes(ctx: Ctx, oid: ObjectId) -> Attr:
    with txn.read(ctx) as t:
        _, _, node, _ = locate(ctx, t, oid)
        return to_attr(oid, node)


def identity(ctx: Ctx, oid: ObjectId) -> ObjectId:
    """The object's own identity: the same for every handle that names it (a share's
    handles name objects of its source VM). What byte-range locks are held on."""
    with txn.read(ctx) as t:
        return locate(ctx, t, oid)[1]


def lookup_in(ctx: Ctx, dir: ObjectId, name: bytes, cred: Cred | None = None) -> tuple[Attr, Attr]:
    """`lookup`, plus the directory's attributes read in the same transaction (NFS
    LOOKUP returns both)."""
    with txn.read(ctx) as t:
        view, d, dnode, out = locate(ctx, t, dir)
        if dnode.type != FileType.DIR:
            raise NotADirectory("lookup in something that is not a directory")
        require(dnode, cred, MAY_EXEC, "no search permission on the directory")
        dir_attr = to_attr(dir, dnode)
        if name == b".":
            return dir_attr, dir_attr
        if name == b"..":
            if out.base:
                share = share_of(view_of(ctx, t, dir.ns), dir.vol)
                if [d.vol, d.ino] == share["root"]:  # leave the share for its mount point
                    parent = ObjectId(dir.ns, *share["at"])
                    return to_attr(parent, locate(ctx, t, parent)[2]), dir_attr
            elif d.vol == 0 and d.ino == ROOT_INO:
                return dir_attr, dir_attr
            parent = out.oid(dnode.parent_vol, dnode.parent_ino)
            return to_attr(parent, locate(ctx, t, parent)[2]), dir_attr
        check_name(name)
        entry = find_entry(ctx, t, view, d.vol, d.ino, name)
        if entry is None or (out.base and entry[0] >= SHARE_VOL_SPAN):
            raise NotFound(f"{name!r} does not exist")
        node = get_inode(ctx, t, view, entry[0], entry[1])
        if node is None:
            raise NotFound(f"{name!r} does not exist")
        return to_attr(out.oid(entry[0], entry[1]), node), dir_attr


def resolve(ctx: Ctx, ns_id: int, path: str) -> Attr:
    with txn.read(ctx) as t:
        view = view_of(ctx, t, ns_id)
        vol, ino, node = resolve_path(ctx, t, view, path, f"{view.name}:{path}")
        return to_attr(ObjectId(ns_id, vol, ino), node)


def access(ctx: Ctx, oid: ObjectId, cred: Cred | None, mask: int) -> int:
    with txn.read(ctx) as t:
        view, _, node, _ = locate(ctx, t, oid)
    return granted(node, cred, mask, readonly=view.readonly)


def set_attributes(
    ctx: Ctx,
    oid: ObjectId,
    sattr: SetAttr,
    cred: Cred | None = None,
    *,
    guard_ctime_ns: int | None = None,
) -> Attr:
    with txn.write(ctx) as t:
        view, loc, node, _ = locate(ctx, t, oid, writable=True)
        if guard_ctime_ns is not None and node.ctime_ns != guard_ctime_ns:
            raise NotSync("the object changed since the client looked (ctime guard)")
        apply_sattr(ctx, t, view, loc, node, sattr, cred, new=False)
        put_inode(ctx, t, view, loc.vol, loc.ino, node)
        return to_attr(oid, node)


def apply_sattr(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
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
            require_data(node, cred, MAY_WRITE)
        if sattr.size != node.size:
            if sattr.size > node.size:
                check_quota(ctx, t, view, sattr.size - node.size)
            truncate(ctx, t, view, oid.vol, oid.ino, node.size, sattr.size)
            add_usage(ctx, t, view, sattr.size - node.size, 0)
            node.size = sattr.size
            node.mtime_ns = now
        changed = True
    for field in ("atime_ns", "mtime_ns"):
        value = getattr(sattr, field)
        if value is None:
            continue
        if value == NOW:
            if not is_owner and not may(node, cred, MAY_WRITE):
                raise PermissionDenied("need write permission to touch the times")
            value = now
        elif not is_owner:
            raise NotPermitted("only the owner may set explicit times")
        setattr(node, field, value)
        changed = True
    if changed:
        node.ctime_ns = now


def read_attr(
    ctx: Ctx, oid: ObjectId, offset: int, count: int, cred: Cred | None = None
) -> tuple[bytes, bool, Attr]:
    """`read` plus the file's attributes, from the same transaction (NFS READ)."""
    if offset < 0 or count < 0:
        raise InvalidArgument("negative offset or count")
    with txn.read(ctx) as t:
        view, loc, node, _ = locate(ctx, t, oid)
        if node.type == FileType.DIR:
            raise IsADirectory("cannot read a directory as a file")
        if node.type != FileType.REG:
            raise InvalidArgument("only regular files can be read")
        require_data(node, cred, MAY_READ)
        attr = to_attr(oid, node)
        if offset >= node.size or count == 0:
            return b"", offset >= node.size, attr
        end = min(node.size, offset + count)
        data = read_range(ctx, t, view, loc.vol, loc.ino, offset, end)
        return data, end == node.size, attr


def write(ctx: Ctx, oid: ObjectId, offset: int, data: bytes, cred: Cred | None = None) -> Attr:
    if offset < 0:
        raise InvalidArgument("negative offset")
    end = offset + len(data)
    if end > MAX_FILE_SIZE:
        raise FileTooLarge(f"write past {MAX_FILE_SIZE} bytes")
    with txn.write(ctx) as t:
        view, loc, node, _ = locate(ctx, t, oid, writable=True)
        if node.type == FileType.DIR:
            raise IsADirectory("cannot write to a directory")
        if node.type != FileType.REG:
            raise InvalidArgument("only regular files can be written")
        require_data(node, cred, MAY_WRITE)
        # An empty write (NFS WRITE with count 0) never changes the size, whatever `offset`.
        new_size = max(node.size, end) if data else node.size
        grow = new_size - node.size
        if grow:
            check_quota(ctx, t, view, grow)
        if data:
            write_range(ctx, t, view, loc.vol, loc.ino, offset, data, new_size)
        node.size = new_size
        node.mtime_ns = node.ctime_ns = time.time_ns()
        if node.mode & 0o6000 and cred is not None and not cred.is_root:
            node.mode &= ~0o6000
        put_inode(ctx, t, view, loc.vol, loc.ino, node)
        if grow:
            add_usage(ctx, t, view, grow, 0)
        return to_attr(oid, node)


def _dir_for_change(
    ctx: Ctx, t: lmdb.Transaction, dir: ObjectId, cred: Cred | None
) -> tuple[View, ObjectId, Inode, Out]:
    view, d, dnode, out = locate(ctx, t, dir, writable=True)
    if dnode.type != FileType.DIR:
        raise NotADirectory("not a directory")
    require(dnode, cred, MAY_WRITE | MAY_EXEC, "no write permission on the directory")
    return view, d, dnode, out


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
) -> Attr:
    check_name(name)
    ctx.segments.require_room(0, ctx.segments.reserve // 2)
    with txn.write(ctx) as t:
        view, d, dnode, out = _dir_for_change(ctx, t, dir, cred)
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
        put_inode(ctx, t, view, 0, ino, node)
        put_entry(ctx, t, view, d.vol, d.ino, name, (0, ino, node_type))
        if node_type == FileType.DIR:
            dnode.nlink += 1
        dnode.mtime_ns = dnode.ctime_ns = now
        put_inode(ctx, t, view, d.vol, d.ino, dnode)
        add_usage(ctx, t, view, charged_bytes(node), 1)
        return to_attr(out.oid(0, ino), node)


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
) -> Attr:
    check_name(name)
    with txn.read(ctx) as t:
        view, d, dnode, out = locate(ctx, t, dir)
        if dnode.type != FileType.DIR:
            raise NotADirectory("not a directory")
        require(dnode, cred, MAY_EXEC, "no search permission on the directory")
        entry = find_entry(ctx, t, view, d.vol, d.ino, name)
        existing = get_inode(ctx, t, view, entry[0], entry[1]) if entry else None
    if entry is not None and existing is not None:
        oid = out.oid(entry[0], entry[1])
        if exclusive is not None:
            if existing.type == FileType.REG and existing.verifier == exclusive:
                return to_attr(oid, existing)
            raise Exists(f"{name!r} already exists")
        if guarded:
            raise Exists(f"{name!r} already exists")
        if existing.type == FileType.DIR:
            raise IsADirectory(f"{name!r} is a directory")
        if sattr is not None and sattr.size is not None:
            return set_attributes(ctx, oid, SetAttr(size=sattr.size), cred)
        return to_attr(oid, existing)
    return _new_object(ctx, dir, name, FileType.REG, mode, cred, sattr, verifier=exclusive)


def mkdir(
    ctx: Ctx,
    dir: ObjectId,
    name: bytes,
    mode: int = 0o755,
    cred: Cred | None = None,
    *,
    sattr: SetAttr | None = None,
) -> Attr:
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
) -> Attr:
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
) -> Attr:
    if ftype not in (FileType.BLK, FileType.CHR, FileType.SOCK, FileType.FIFO):
        raise InvalidArgument(f"mknod cannot make a {ftype.name}")
    if ftype in (FileType.BLK, FileType.CHR) and not (cred is None or cred.is_root):
        raise NotPermitted("only root may create device nodes")
    return _new_object(ctx, dir, name, ftype, mode, cred, sattr, rdev=rdev)


def readlink(ctx: Ctx, oid: ObjectId) -> bytes:
    with txn.read(ctx) as t:
        _, _, node, _ = locate(ctx, t, oid)
        if node.type != FileType.LNK:
            raise InvalidArgument("not a symbolic link")
        return node.target


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


def _unlink(ctx: Ctx, dir: ObjectId, name: bytes, cred: Cred | None, *, want_dir: bool) -> None:
    if name in (b".", b".."):
        raise (InvalidArgument if name == b"." else NotEmpty)(f"cannot remove {name!r}")
    check_name(name)
    with txn.write(ctx) as t:
        view, d, dnode, _ = _dir_for_change(ctx, t, dir, cred)
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
        if node.type == FileType.DIR:
            dnode.nlink = max(2, dnode.nlink - 1)
            destroy(ctx, t, view, vol, ino, node)
        else:
            node.nlink -= 1
            if node.nlink <= 0:
                destroy(ctx, t, view, vol, ino, node)
            else:
                lost_link(node, d.vol, d.ino)
                node.ctime_ns = now
                put_inode(ctx, t, view, vol, ino, node)
        dnode.mtime_ns = dnode.ctime_ns = now
        put_inode(ctx, t, view, d.vol, d.ino, dnode)


def remove(ctx: Ctx, dir: ObjectId, name: bytes, cred: Cred | None = None) -> None:
    _unlink(ctx, dir, name, cred, want_dir=False)


def rmdir(ctx: Ctx, dir: ObjectId, name: bytes, cred: Cred | None = None) -> None:
    _unlink(ctx, dir, name, cred, want_dir=True)


def rename(
    ctx: Ctx,
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
    with txn.write(ctx) as t:
        view, sd, sdnode, sout = _dir_for_change(ctx, t, src_dir, cred)
        dview, dd, ddnode, dout = _dir_for_change(ctx, t, dst_dir, cred)
        if (view.id, sout.base) != (dview.id, dout.base):
            raise CrossDevice("cannot rename into or out of a share")
        svol, sino, stype, snode = _named(ctx, t, view, sd, src_name, "it cannot be renamed")
        if not sticky_ok(sdnode, snode, cred):
            raise PermissionDenied("sticky directory: only the owner may rename this")
        same_dir = sd == dd
        if same_dir:
            ddnode = sdnode  # one directory: apply every change to one copy
            if src_name == dst_name:
                return
        if snode.type == FileType.DIR and not same_dir:
            _refuse_loop(ctx, t, view, (svol, sino), dd)
        existing = find_entry(ctx, t, view, dd.vol, dd.ino, dst_name)
        if existing is not None and existing[0] >= SHARE_VOL_BASE:
            raise NotPermitted(f"{dst_name!r} is a share; it cannot be replaced")
        if existing is not None and (existing[0], existing[1]) == (svol, sino):
            return  # both names are links to the same object: POSIX says do nothing
        now = time.time_ns()
        if existing is not None:
            enode = get_inode(ctx, t, view, existing[0], existing[1])
            if enode is not None:
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
                        lost_link(enode, dd.vol, dd.ino)
                        enode.ctime_ns = now
                        put_inode(ctx, t, view, existing[0], existing[1], enode)
        drop_entry(ctx, t, view, sd.vol, sd.ino, src_name)
        put_entry(ctx, t, view, dd.vol, dd.ino, dst_name, (svol, sino, stype))
        snode.ctime_ns = now
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


def link(ctx: Ctx, oid: ObjectId, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Attr:
    check_name(name)
    ctx.segments.require_room(0, ctx.segments.reserve // 2)
    if oid.ns != dir.ns:
        raise CrossDevice("cannot link across namespaces")
    with txn.write(ctx) as t:
        view, d, dnode, dout = _dir_for_change(ctx, t, dir, cred)
        oview, loc, node, out = locate(ctx, t, oid, writable=True)
        if (view.id, dout.base) != (oview.id, out.base):
            raise CrossDevice("cannot link into or out of a share")
        if node.type == FileType.DIR:
            raise IsADirectory("cannot hard-link a directory")
        if node.nlink >= NLINK_MAX:
            raise TooManyLinks(f"the object already has {node.nlink} links")
        if find_entry(ctx, t, view, d.vol, d.ino, name) is not None:
            raise Exists(f"{name!r} already exists")
        now = time.time_ns()
        node.nlink += 1
        node.ctime_ns = now
        node.parent_vol, node.parent_ino = d.vol, d.ino
        put_inode(ctx, t, view, loc.vol, loc.ino, node)
        put_entry(ctx, t, view, d.vol, d.ino, name, (loc.vol, loc.ino, node.type))
        dnode.mtime_ns = dnode.ctime_ns = now
        put_inode(ctx, t, view, d.vol, d.ino, dnode)
        return to_attr(oid, node)


def readdir(
    ctx: Ctx, dir: ObjectId, cookie: int = 0, cred: Cred | None = None, *, limit: int = 1000
) -> tuple[list[DirEntry], bool]:
    with txn.read(ctx) as t:
        view, d, dnode, dout = locate(ctx, t, dir)
        if dnode.type != FileType.DIR:
            raise NotADirectory("not a directory")
        require(dnode, cred, MAY_READ, "no read permission on the directory")
        after = cookie if cookie >= R.FIRST_COOKIE else 0
        out: list[DirEntry] = []
        for entry in list_dir(ctx, t, view, d.vol, d.ino, after, dout):
            if dout.base and entry.oid.vol >= SHARE_VOL_SPAN + dout.base:
                continue  # only the source's first SHARE_VOL_SPAN volumes are shared
            if len(out) >= limit:
                return out, False
            out.append(entry)
        return out, True


def readdir_raw(
    ctx: Ctx,
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
    with txn.read(ctx) as t:
        view, d, dnode, dout = locate(ctx, t, dir)
        if dnode.type != FileType.DIR:
            raise NotADirectory("not a directory")
        require(dnode, cred, MAY_READ, "no read permission on the directory")
        after = cookie if cookie >= R.FIRST_COOKIE else 0
        out: list[tuple[int, bytes, int, int, bytes | None]] = []
        base = dout.base
        for c, name, vol, ino, _ in list_raw(ctx, t, view, d.vol, d.ino, after):
            if base and vol >= SHARE_VOL_SPAN:
                continue  # only the source's first SHARE_VOL_SPAN volumes are shared
            if len(out) >= limit:
                return out, False
            record = inode_record(ctx, t, view, vol, ino) if attrs else None
            out.append((c, name, vol + base, ino, record))
        return out, True
