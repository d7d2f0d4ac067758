"""The hard-link index: where each link of a multiply-linked object lives.

A non-directory's inode counts its links but names one holding directory only (see
`records.Inode`). A graft must give each object it copies the count of the links it copies,
without walking the subtree; this index answers that from the few objects that have more
than one link (`graft.count_links`, O(hard-linked objects x depth)).

Records (`links` database), kept in layers like inodes and entries (`layers.chain`: the
first record met top-down wins, b"" is a whiteout; volume numbers of records fallen back
from an import are translated through its map)::

    layer u64 | vol u16 | ino u64 | dir vol u16 | dir ino u64 -> links of the object in
    that directory u32

Invariant, in a lineage whose layers say so (`COMPLETE`): every non-directory whose nlink is
2 or more has one record per directory holding its links, counting them, and no other
object has records. `names.link`, `_unlink`, `rename`, `staging` and `compose` keep it in
the same transaction as the entries (`linked`, `unlinked`, `moved`). When an object's links
fall to one, its record goes and its holder is set to the directory of the link left, so the
holder of a singly-linked object is always its directory.

A lineage begun before the index (layers without `COMPLETE`) never gets it: grafts from it
keep their objects' source nlink, as they always did, and a VM composed from it is
incomplete too. A link made to an object whose holder is unknown (written by an older Prism)
marks the lineage incomplete.
"""

from __future__ import annotations

import struct

import lmdb

from prism.store import records as R
from prism.store.layers import LINKS_COMPLETE as COMPLETE
from prism.store.layers import View, cached_layer, chain, load_layer, put_layer
from prism.store.records import Inode
from prism.store.schema import Ctx

LINK_KEY = struct.Struct(">QHQHQ")
_SUFFIX = struct.Struct(">QHQ")  # ino | dir vol | dir ino
_COUNT = R.U32

Dirs = dict[tuple[int, int], int]
"""(dir vol, dir ino) -> links of one object there."""


def complete(ctx: Ctx, t: lmdb.Transaction, top: int) -> bool:
    return bool(cached_layer(ctx, t, top).get(COMPLETE))


def mark_incomplete(ctx: Ctx, t: lmdb.Transaction, top: int) -> None:
    rec = load_layer(ctx, t, top)
    if rec.get(COMPLETE):
        rec[COMPLETE] = False
        put_layer(ctx, t, top, rec)


def indexed(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int | None = None
) -> dict[int, Dirs]:
    """The index's records for volume `vol` (or its object `ino`) as `view` sees them:
    {ino: {(dir vol, dir ino): links}}. O(records of the volume in its chain)."""
    seen: set[tuple[int, int, int]] = set()
    out: dict[int, Dirs] = {}
    for layer, v, xl in chain(ctx, t, view.top, vol):
        prefix = R.INODE_KEY.pack(layer, v, ino or 0)[: 10 if ino is None else 18]
        cur = t.cursor(db=ctx.db.links)
        if not cur.set_range(prefix):
            continue
        for key, value in cur:
            key = bytes(key)
            if not key.startswith(prefix):
                break
            obj, dvol, dino = _SUFFIX.unpack_from(key, 10)
            if xl is not None:
                dvol = xl.get(dvol, dvol)
            if (obj, dvol, dino) in seen:
                continue
            seen.add((obj, dvol, dino))
            if value:
                out.setdefault(obj, {})[(dvol, dino)] = _COUNT.unpack(value)[0]
    return out


def put(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, d: tuple[int, int], n: int
) -> None:
    """Set the object's links in directory `d` to `n` (0: none) in the top layer."""
    key = LINK_KEY.pack(view.top, vol, ino, *d)
    if n > 0:
        t.put(key, _COUNT.pack(n), db=ctx.db.links)
        return
    # Lower layers number directories their own way: any lower layer may hold the record.
    if len(chain(ctx, t, view.top, vol)) > 1:
        t.put(key, R.WHITEOUT, db=ctx.db.links)
    else:
        t.delete(key, db=ctx.db.links)


def linked(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, node: Inode, d: tuple[int, int]
) -> None:
    """`node` (nlink before the new link) gains a link in directory `d`."""
    if node.nlink == 1:
        if not R.holder_known(node):
            mark_incomplete(ctx, t, view.top)
            return
        dirs: Dirs = {(node.parent_vol, node.parent_ino): 1}
    else:
        dirs = indexed(ctx, t, view, vol, ino).get(ino, {})
    for where in {*dirs, d}:
        before = dirs.get(where, 0)
        after = before + (where == d)
        if node.nlink == 1 or after != before:
            put(ctx, t, view, vol, ino, where, after)


def unlinked(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, node: Inode, d: tuple[int, int]
) -> None:
    """`node` (nlink already decreased, still linked) lost a link in directory `d`; fix
    its holder: the directory of its last link, or unknown when that link was the holder."""
    dirs = indexed(ctx, t, view, vol, ino).get(ino, {})
    if d in dirs:
        dirs[d] -= 1
        put(ctx, t, view, vol, ino, d, dirs[d])
    left = [where for where, n in dirs.items() if n > 0]
    if node.nlink == 1 and len(left) == 1 and dirs[left[0]] == 1:
        put(ctx, t, view, vol, ino, left[0], 0)
        node.parent_vol, node.parent_ino = left[0]
    elif (node.parent_vol, node.parent_ino) == d or not R.holder_known(node):
        node.parent_vol, node.parent_ino = 0, R.HOLDER_UNKNOWN


def moved(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    vol: int,
    ino: int,
    node: Inode,
    src: tuple[int, int],
    dst: tuple[int, int],
) -> None:
    """A link of `node` moves from directory `src` to `dst` (rename)."""
    if node.nlink < 2 or src == dst:
        return
    dirs = indexed(ctx, t, view, vol, ino).get(ino, {})
    put(ctx, t, view, vol, ino, src, dirs.get(src, 0) - 1)
    put(ctx, t, view, vol, ino, dst, dirs.get(dst, 0) + 1)
