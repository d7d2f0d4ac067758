"""The per-object operations that change no names: attributes, lookup, access, read, write,
readlink, readdir (`names` makes, links, moves and removes names).

Each operation resolves its handle and does all its work in one transaction (`txn.read`
or `txn.write`; in a batch, a nested transaction, so a failing operation changes nothing),
and returns what its caller's reply needs from that same transaction (`api`: attributes
before and after a change, with the data read, the target, the access granted). A failing
operation raises with the attributes it had read on the error (`unchanged_on_failure`,
`StoreError.attrs`). Objects reached through a share are the source VM's own (`tree.locate`
routes them, the caller's ids map back through `layers.Out`).
"""

from __future__ import annotations

import time

import lmdb

from prism.errors import (
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotFound,
    NotPermitted,
    NotSync,
    PermissionDenied,
    StoreError,
)
from prism.store import records as R
from prism.store import txn
from prism.store.api import (
    Access,
    Found,
    Listing,
    Mountable,
    RawEntry,
    Read,
    Target,
    Wcc,
)
from prism.store.content import read_range, truncate, write_range
from prism.store.layers import SHARE_VOL_SPAN, Out, View, ns_info, share_of, view_by_name, view_of
from prism.store.perms import (
    MAY_EXEC,
    MAY_READ,
    MAY_WRITE,
    granted,
    may,
    require,
    require_data,
)
from prism.store.quota import add_rstat, add_usage, check_quota
from prism.store.records import Inode
from prism.store.schema import Ctx
from prism.store.tree import (
    check_name,
    find_entry,
    get_inode,
    inode_record,
    list_dir,
    list_raw,
    locate,
    put_inode,
    require_writable,
    resolve_path,
    to_attr,
)
from prism.store.types import (
    MAX_FILE_SIZE,
    NOW,
    ROOT_INO,
    Attr,
    Cred,
    DirEntry,
    FileType,
    ObjectId,
    SetAttr,
)


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


def lookup_in(ctx: Ctx, dir: ObjectId, name: bytes, cred: Cred | None = None) -> Found:
    """`name` in directory `dir`, and the directory's attributes (NFS LOOKUP returns both)."""
    with txn.read(ctx) as t:
        view, d, dnode, out = locate(ctx, t, dir)
        dir_attr = to_attr(dir, dnode)
        with unchanged_on_failure(dir, dir_attr):
            if dnode.type != FileType.DIR:
                raise NotADirectory("lookup in something that is not a directory")
            require(dnode, cred, MAY_EXEC, "no search permission on the directory")
            if name == b".":
                return Found(dir_attr, dir_attr)
            if name == b"..":
                return Found(_parent(ctx, t, dir, d, dnode, out, dir_attr), dir_attr)
            check_name(name)
            entry = find_entry(ctx, t, view, d.vol, d.ino, name)
            if entry is None or (out.base and entry[0] >= SHARE_VOL_SPAN):
                raise NotFound(f"{name!r} does not exist")
            node = get_inode(ctx, t, view, entry[0], entry[1])
            if node is None:
                raise NotFound(f"{name!r} does not exist")
            return Found(to_attr(out.oid(entry[0], entry[1]), node), dir_attr)


def _parent(
    ctx: Ctx, t: lmdb.Transaction, dir: ObjectId, d: ObjectId, dnode: Inode, out: Out, attr: Attr
) -> Attr:
    """The attributes of directory `dir`'s '..' (`d`, `dnode`, `out`: as `locate` gave them;
    `attr`: its own attributes): the root's is itself, a share root's is its mount point's
    directory."""
    if out.base:
        share = share_of(view_of(ctx, t, dir.ns), dir.vol)
        if [d.vol, d.ino] == share["root"]:  # leave the share for its mount point
            parent = ObjectId(dir.ns, *share["at"])
            return to_attr(parent, locate(ctx, t, parent)[2])
    elif d.vol == 0 and d.ino == ROOT_INO:
        return attr
    parent = out.oid(dnode.parent_vol, dnode.parent_ino)
    return to_attr(parent, locate(ctx, t, parent)[2])


def resolve(ctx: Ctx, ns_id: int, path: str) -> Attr:
    with txn.read(ctx) as t:
        view = view_of(ctx, t, ns_id)
        vol, ino, node = resolve_path(ctx, t, view, path, f"{view.name}:{path}")
        return to_attr(ObjectId(ns_id, vol, ino), node)


def mountable(ctx: Ctx, name: str, path: str) -> Mountable:
    with txn.read(ctx) as t:
        view = view_by_name(ctx, t, name)
        info = ns_info(ctx, t, view.record)
        try:
            vol, ino, node = resolve_path(ctx, t, view, path, f"{view.name}:{path}")
        except StoreError as exc:
            return Mountable(info, None, exc)
        return Mountable(info, to_attr(ObjectId(view.id, vol, ino), node), None)


def access(ctx: Ctx, oid: ObjectId, cred: Cred | None, mask: int) -> Access:
    with txn.read(ctx) as t:
        view, _, node, _ = locate(ctx, t, oid)
    return Access(granted(node, cred, mask, readonly=view.readonly), to_attr(oid, node))


def set_attributes(
    ctx: Ctx,
    oid: ObjectId,
    sattr: SetAttr,
    cred: Cred | None = None,
    *,
    guard_ctime_ns: int | None = None,
) -> Wcc:
    with txn.write(ctx) as t:
        view, loc, node, out = locate(ctx, t, oid)
        before = to_attr(oid, node)
        with unchanged_on_failure(oid, before):
            require_writable(view, out)
            if guard_ctime_ns is not None and node.ctime_ns != guard_ctime_ns:
                raise NotSync("the object changed since the client looked (ctime guard)")
            apply_sattr(ctx, t, view, loc, node, sattr, cred, new=False)
            put_inode(ctx, t, view, loc.vol, loc.ino, node)
        return Wcc(before, to_attr(oid, node))


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
            if node.nlink == 1 and not new:  # (a new object counts once it is linked)
                holder = (node.parent_vol, node.parent_ino)
                add_rstat(ctx, view, holder, (sattr.size - node.size, 0))
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


def read_attr(ctx: Ctx, oid: ObjectId, offset: int, count: int, cred: Cred | None = None) -> Read:
    """Up to `count` bytes from `offset`, and the file's attributes (NFS READ)."""
    if offset < 0 or count < 0:
        raise InvalidArgument("negative offset or count")
    with txn.read(ctx) as t:
        view, loc, node, _ = locate(ctx, t, oid)
        attr = to_attr(oid, node)
        with unchanged_on_failure(oid, attr):
            if node.type == FileType.DIR:
                raise IsADirectory("cannot read a directory as a file")
            if node.type != FileType.REG:
                raise InvalidArgument("only regular files can be read")
            require_data(node, cred, MAY_READ)
            if offset >= node.size or count == 0:
                return Read(b"", offset >= node.size, attr)
            end = min(node.size, offset + count)
            data = read_range(ctx, t, view, loc.vol, loc.ino, offset, end)
            return Read(data, end == node.size, attr)


def write(ctx: Ctx, oid: ObjectId, offset: int, data: bytes, cred: Cred | None = None) -> Wcc:
    if offset < 0:
        raise InvalidArgument("negative offset")
    end = offset + len(data)
    if end > MAX_FILE_SIZE:
        raise FileTooLarge(f"write past {MAX_FILE_SIZE} bytes")
    with txn.write(ctx) as t:
        view, loc, node, out = locate(ctx, t, oid)
        before = to_attr(oid, node)
        with unchanged_on_failure(oid, before):
            require_writable(view, out)
            if node.type == FileType.DIR:
                raise IsADirectory("cannot write to a directory")
            if node.type != FileType.REG:
                raise InvalidArgument("only regular files can be written")
            require_data(node, cred, MAY_WRITE)
            # An empty write (NFS WRITE with count 0) never changes the size, whatever
            # `offset`.
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
                if node.nlink == 1:
                    add_rstat(ctx, view, (node.parent_vol, node.parent_ino), (grow, 0))
        return Wcc(before, to_attr(oid, node))


class unchanged_on_failure:
    """A StoreError leaving the block carries `attr` as `oid`'s attributes: the failing
    operation changes nothing, so they hold after it as before (see `StoreError.attrs`).
    A plain class, not a generator: it runs on every operation."""

    __slots__ = ("attr", "oid")

    def __init__(self, oid: ObjectId, attr: Attr) -> None:
        self.oid = oid
        self.attr = attr

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, StoreError):
            exc.attrs.setdefault(self.oid, self.attr)


def readlink(ctx: Ctx, oid: ObjectId) -> Target:
    with txn.read(ctx) as t:
        _, _, node, _ = locate(ctx, t, oid)
        attr = to_attr(oid, node)
        if node.type != FileType.LNK:
            error = InvalidArgument("not a symbolic link")
            error.attrs[oid] = attr
            raise error
        return Target(node.target, attr)


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
    parent: bool = False,
) -> Listing:
    """The READDIR/READDIRPLUS fast path: entries after `cookie` as plain tuples (no objects
    built), with the directory's attributes and, if `parent`, its parent's, all read in one
    transaction."""
    with txn.read(ctx) as t:
        view, d, dnode, dout = locate(ctx, t, dir)
        dir_attr = to_attr(dir, dnode)
        with unchanged_on_failure(dir, dir_attr):
            if dnode.type != FileType.DIR:
                raise NotADirectory("not a directory")
            require(dnode, cred, MAY_READ, "no read permission on the directory")
            up = _parent(ctx, t, dir, d, dnode, dout, dir_attr) if parent else None
            after = cookie if cookie >= R.FIRST_COOKIE else 0
            out: list[RawEntry] = []
            base = dout.base
            for c, name, vol, ino, _ in list_raw(ctx, t, view, d.vol, d.ino, after):
                if base and vol >= SHARE_VOL_SPAN:
                    continue  # only the source's first SHARE_VOL_SPAN volumes are shared
                if len(out) >= limit:
                    return Listing(out, False, dir_attr, up)
                record = inode_record(ctx, t, view, vol, ino) if attrs else None
                out.append((c, name, vol + base, ino, record))
            return Listing(out, True, dir_attr, up)
