"""The tree of a namespace: inodes, directory entries, whiteouts and merged listings.

An object is (volume, inode) inside a namespace; its record (`records.Inode`) and its
directory's entries live in layers (`layers.chain`): the first record met top-down wins, a
whiteout (b"") means "removed in this layer". Writes go to the top layer only, and a removal
writes a whiteout only when a lower layer still holds a live record (`lower_has`), else it
deletes. A directory listing merges the entries of every layer of the chain in cookie order
(a cookie is fixed when an entry is made, so listings resume where they stopped); a
single-layer directory is read straight, with no merge.

Each object records the directory that holds it (its parent fields: '..' of a directory; for
another object the directory it was last made, renamed or linked into). Share checks walk
these: every access through a share volume first walks the object's holding directories and
must meet the share's root before the source's root, else the object is STALE there
(`below_share_root`); the root's '..' is the directory holding the mount point. A
non-directory written before holders were recorded (parent fields 0) counts as inside until
it is next renamed, linked or unlinked; a hard-linked file counts where its holder is.

`locate` turns a caller's ObjectId into (owner's view, local id, inode, way back): the one
place where share routing, staleness and read-only checks meet.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Any, cast

import lmdb

from prism.errors import (
    Corrupt,
    InvalidArgument,
    InvalidName,
    NameTooLong,
    NotADirectory,
    NotFound,
    ReadOnly,
    Stale,
)
from prism.store import records as R
from prism.store.layers import (
    SHARE_VOL_BASE,
    SHARE_VOL_SPAN,
    Out,
    PathEntry,
    View,
    cached_layer,
    chain,
    imports_at,
    mark_escaped,
    routed,
    share_of,
    view_of,
)
from prism.store.records import Inode
from prism.store.schema import NS_KEY, Ctx, next_counter
from prism.store.types import INO_BITS, NAME_MAX, ROOT_INO, Attr, DirEntry, FileType, ObjectId

MAX_DEPTH = 100000
"""Directories walked up from an object before giving up (no real tree is this deep)."""


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


def below_share_root(
    ctx: Ctx,
    t: lmdb.Transaction,
    share: dict[str, Any],
    src: View,
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
        holder = _holder(ctx, t, src, pvol, pino)
        if holder is None or holder[0] != FileType.DIR:
            return False
        vol, ino = pvol, pino
        kind, pvol, pino = holder
    return False


def _holder(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int
) -> tuple[int, int, int] | None:
    """(type, holder vol, holder ino) of an object of the view's own volumes, as
    `_inode` would give them, unpacking nothing else (share checks walk these)."""
    for layer, v, xl in chain(ctx, t, view.top, vol):
        raw = t.get(R.inode_key(layer, v, ino), db=ctx.db.inodes)
        if raw is not None:
            if not raw:
                return None
            kind, pvol, pino = R.holder_of(raw)
            if xl is not None and pino not in (R.HOLDER_UNRECORDED, R.HOLDER_UNKNOWN):
                pvol = xl.get(pvol, pvol)
            return kind, pvol, pino
    return None


def get_inode(ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int) -> Inode | None:
    if vol >= SHARE_VOL_BASE:
        target, local, base = routed(ctx, t, view, vol)
        node = get_inode(ctx, t, target, local, ino)
        if node is not None and R.holder_known(node):
            share = share_of(view, vol)
            if [local, ino] == share["root"]:
                node.parent_vol, node.parent_ino = share["at"]
            else:
                node.parent_vol += base
        return node
    for layer, v, xl in chain(ctx, t, view.top, vol):
        raw = t.get(R.inode_key(layer, v, ino), db=ctx.db.inodes)
        if raw is not None:
            if not raw:
                return None
            node = Inode.unpack(raw)
            if xl is not None and R.holder_known(node):
                node.parent_vol = xl.get(node.parent_vol, node.parent_vol)
            return node
    return None


def inode_record(ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int) -> bytes | None:
    """The stored inode record, for readers of its attributes only (a directory's parent
    fields are not translated into the view's volumes, as `_inode` does)."""
    if vol >= SHARE_VOL_BASE:
        node = get_inode(ctx, t, view, vol, ino)
        return node.pack() if node is not None else None
    for layer, v, _ in chain(ctx, t, view.top, vol):
        raw = t.get(R.inode_key(layer, v, ino), db=ctx.db.inodes)
        if raw is not None:
            return cast(bytes, raw) or None
    return None


def put_inode(ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, node: Inode) -> None:
    packed = node.pack()
    t.put(R.inode_key(view.top, vol, ino), packed, db=ctx.db.inodes)
    if ctx.observer is not None:  # delivered at the nested commit (`txn.write`)
        ctx.events.append(("inode_written", view.id, vol, ino, packed))


def lower_has(
    t: lmdb.Transaction, path: tuple[PathEntry, ...], db: Any, make: Callable[[int, int], bytes]
) -> bool:
    """Whether a layer below the top holds a live record (so a whiteout is needed)."""
    for layer, v, _ in path[1:]:
        raw = t.get(make(layer, v), db=db)
        if raw is not None:
            return bool(raw)
    return False


def drop_inode(ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int) -> None:
    path = chain(ctx, t, view.top, vol)
    key = R.inode_key(view.top, vol, ino)
    if lower_has(t, path, ctx.db.inodes, lambda layer, v: R.inode_key(layer, v, ino)):
        t.put(key, R.WHITEOUT, db=ctx.db.inodes)
    else:
        t.delete(key, db=ctx.db.inodes)
    if ctx.observer is not None:
        ctx.events.append(("inode_dropped", view.id, vol, ino))


def locate(
    ctx: Ctx, t: lmdb.Transaction, oid: ObjectId, *, writable: bool = False
) -> tuple[View, ObjectId, Inode, Out]:
    """Resolve an identity: (owner's view, the object's local id there, its inode, the
    map back to the caller's ids). Local and caller ids differ only inside a share."""
    outer = view_of(ctx, t, oid.ns)
    view, vol, base = routed(ctx, t, outer, oid.vol)
    node = get_inode(ctx, t, view, vol, oid.ino)
    if node is None:
        raise Stale(f"object {oid.fileid} in {outer.name} no longer exists")
    if base:
        share = share_of(outer, oid.vol)
        if not below_share_root(ctx, t, share, view, vol, oid.ino, node):
            raise Stale(
                f"object {oid.fileid} is no longer inside {outer.name}:{share['path']} "
                "(its source VM moved it out of the shared directory)"
            )
    out = Out(outer.id, base)
    if writable:
        require_writable(view, out)
    return view, ObjectId(view.id, vol, oid.ino) if base else oid, node, out


def require_writable(view: View, out: Out) -> None:
    """Refuse changes in a snapshot or through a read-only share."""
    if view.readonly:
        raise ReadOnly(
            f"{view.name} is read-only" if out.base else f"{view.name} is a read-only snapshot"
        )


def to_attr(oid: ObjectId, node: Inode) -> Attr:
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


def alloc_ino(ctx: Ctx, t: lmdb.Transaction, view: View) -> int:
    ino = next_counter(ctx, t, b"ino" + NS_KEY.pack(view.id), start=ROOT_INO + 1)
    if ino >= 1 << INO_BITS:
        raise InvalidArgument("namespace ran out of inode numbers")
    return ino


def find_entry(
    ctx: Ctx, t: lmdb.Transaction, view: View, dvol: int, dino: int, name: bytes
) -> tuple[int, int, FileType] | None:
    if dvol >= SHARE_VOL_BASE:
        target, local, base = routed(ctx, t, view, dvol)
        found = find_entry(ctx, t, target, local, dino, name)
        if found is None or found[0] >= SHARE_VOL_SPAN:
            return None  # (volumes added to the source later are not shared)
        return found[0] + base, found[1], found[2]
    for layer, v, xl in chain(ctx, t, view.top, dvol):
        raw = t.get(R.dirent_key(layer, v, dino, name), db=ctx.db.dirents)
        if raw is not None:
            if not raw:
                return None
            vol, ino, ftype = R.DIRENT_VAL.unpack(raw)
            if xl is not None:
                vol = xl.get(vol, vol)
            return vol, ino, FileType(ftype)
    return None


def put_entry(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    dvol: int,
    dino: int,
    name: bytes,
    target: tuple[int, int, FileType],
) -> None:
    t.put(
        R.dirent_key(view.top, dvol, dino, name),
        R.DIRENT_VAL.pack(target[0], target[1], int(target[2])),
        db=ctx.db.dirents,
    )
    if ctx.observer is not None:
        ctx.events.append(("dirents_changed", view.id, dvol, dino))


def drop_entry(ctx: Ctx, t: lmdb.Transaction, view: View, dvol: int, dino: int, name: bytes):
    path = chain(ctx, t, view.top, dvol)
    key = R.dirent_key(view.top, dvol, dino, name)
    if lower_has(t, path, ctx.db.dirents, lambda layer, v: R.dirent_key(layer, v, dino, name)):
        t.put(key, R.WHITEOUT, db=ctx.db.dirents)
    else:
        t.delete(key, db=ctx.db.dirents)
    if ctx.observer is not None:
        ctx.events.append(("dirents_changed", view.id, dvol, dino))


def _scan_layer_dir(
    ctx: Ctx, t: lmdb.Transaction, prefix: bytes, after: int, prio: int, xl: dict[int, int] | None
) -> Iterator[tuple[int, bytes, int, bytes, dict[int, int] | None]]:
    cur = t.cursor(db=ctx.db.dirents)
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


def list_raw(
    ctx: Ctx, t: lmdb.Transaction, view: View, dvol: int, dino: int, after: int
) -> Iterator[tuple[int, bytes, int, int, int]]:
    """Live entries after cookie `after`, merged over the layers, in cookie order:
    (cookie, name, vol, ino, type value), volumes in the view's numbering."""
    if dvol >= SHARE_VOL_BASE:
        target, local, base = routed(ctx, t, view, dvol)
        for cookie, name, vol, ino, ftype in list_raw(ctx, t, target, local, dino, after):
            if vol < SHARE_VOL_SPAN:
                yield cookie, name, vol + base, ino, ftype
        return
    path = chain(ctx, t, view.top, dvol)
    if len(path) == 1:  # one layer: no merge needed, whiteouts cannot occur
        layer, v, _ = path[0]
        prefix = R.dirent_prefix(layer, v, dino)
        cur = t.cursor(db=ctx.db.dirents)
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
        _scan_layer_dir(ctx, t, R.dirent_prefix(layer, v, dino), after, prio, xl)
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


def list_dir(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    dvol: int,
    dino: int,
    after: int,
    out: Out | None = None,
) -> Iterator[DirEntry]:
    out = out or Out(view.id)
    for cookie, name, vol, ino, ftype in list_raw(ctx, t, view, dvol, dino, after):
        yield DirEntry(name, out.oid(vol, ino), file_type(ftype), cookie)


def is_empty_dir(ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int) -> bool:
    return next(list_dir(ctx, t, view, vol, ino, 0), None) is None


def is_below(
    ctx: Ctx, t: lmdb.Transaction, view: View, node: tuple[int, int], top: tuple[int, int]
) -> bool:
    """Whether directory `node` is `top` or inside it (walking '..' up; O(depth))."""
    vol, ino = node
    for _ in range(MAX_DEPTH):
        if (vol, ino) == top:
            return True
        found = get_inode(ctx, t, view, vol, ino)
        if found is None or (vol, ino) == (0, ROOT_INO):
            return False
        vol, ino = found.parent_vol, found.parent_ino
    return False


def ancestors(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int
) -> set[tuple[int, int]] | None:
    """(vol, ino) and the directories above it up to the root, walking '..' (a
    non-directory's first step is its holder); None when the way up is not known (a
    holder lost or unrecorded, a broken chain); empty when the object is gone. O(depth)."""
    out: set[tuple[int, int]] = set()
    for _ in range(MAX_DEPTH):
        if (vol, ino) == (0, ROOT_INO):
            out.add((vol, ino))
            return out
        node = get_inode(ctx, t, view, vol, ino)
        if node is None and not out:
            return out
        out.add((vol, ino))
        if node is None or not R.holder_known(node):
            return None
        up = (node.parent_vol, node.parent_ino)
        if up in out or up[0] >= SHARE_VOL_BASE:
            return None
        vol, ino = up
    return None


def note_move(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    obj: tuple[int, int, FileType],
    src: tuple[int, int] | None,
    dst: tuple[int, int],
) -> None:
    """Keep the imports' `escaped` flags (see "Volumes" in `layers`): object `obj` is
    renamed out of directory `src`, or (src None) gains a link, into directory `dst`. An
    import whose objects may now lie outside the subtrees it was grafted at is marked
    escaped, so that every later graft from this VM imports it. O(depth), and nothing
    for a VM with no imports."""
    rec = cached_layer(ctx, t, view.top)
    if not rec["imports"]:
        return
    vol, ino, ftype = obj
    if ftype == FileType.DIR and src is not None:
        # The directory carries whatever lies below it: every import whose subtree
        # held it must still hold it.
        inside = ancestors(ctx, t, view, *src)
        suspects = set(rec["imports"]) if inside is None else imports_at(rec, inside)
    else:
        source = rec["vols"].get(str(vol))
        if source is None:
            return  # volume 0 is imported by every graft
        suspects = {str(source[2])}
    if not suspects:
        return
    above = ancestors(ctx, t, view, *dst) or set()
    if src is not None:
        above.add((vol, ino))  # a root that moves moves its subtree along
    escaped = [
        imp
        for imp in suspects
        if not rec["imports"][imp].get("escaped")
        and not any(tuple(r) in above for r in rec["imports"][imp].get("roots", ()))
    ]
    if escaped:
        mark_escaped(ctx, t, view.top, escaped)


def resolve_path(
    ctx: Ctx, t: lmdb.Transaction, view: View, path: str, label: str
) -> tuple[int, int, Inode]:
    vol, ino = 0, ROOT_INO
    node = get_inode(ctx, t, view, vol, ino)
    if node is None:
        raise Corrupt(f"{view.name} has no root directory; run `prism fsck --repair`")
    for part in [p for p in path.split("/") if p and p != "."]:
        if node.type != FileType.DIR:
            raise NotADirectory(f"{label}: a component of the path is not a directory")
        if part == "..":
            vol, ino = node.parent_vol, node.parent_ino
        else:
            entry = find_entry(ctx, t, view, vol, ino, part.encode())
            if entry is None:
                raise NotFound(f"{label} does not exist")
            vol, ino = entry[0], entry[1]
        found = get_inode(ctx, t, view, vol, ino)
        if found is None:
            raise NotFound(f"{label} does not exist")
        node = found
    return vol, ino, node


def file_type(value: int) -> FileType:
    ftype = R.FILE_TYPES[value] if 0 < value < len(R.FILE_TYPES) else None
    if ftype is None:
        raise Corrupt(f"directory entry with unknown type {value}; run `prism fsck`")
    return ftype
