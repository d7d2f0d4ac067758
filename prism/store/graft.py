"""What a graft reaches of its source, found without walking the files it copies.

A graft (`compose`) copies a subtree of a frozen source view into a VM. Two questions about
that subtree are answered here from records whose number does not grow with its files:

* which source volumes it can reach (`reached_volumes`, O(imports x depth)): volume 0, its
  own, and each earlier import whose roots lie above or below it, or that escaped (see
  "Volumes" in `layers`); `import_volumes` gives those fresh volumes in the destination and
  records the new import's roots;
* how many links of each hard-linked object it copies (`count_links`, O(hard-linked objects
  x depth), from the hard-link index `links`): where the subtree cuts a link group, the
  copy's nlink, holder and index records are rewritten in the destination's top layer.

`count_links` also answers what the hard-linked objects add to the destination's usage: no
directory's recursive statistics count an object with several links (`quota`), so the
copies left with several are returned for the usage, and those the cut leaves with one
join their directory's figures. The rest of the usage comes from the grafted directory's
figures (`compose`).
"""

from __future__ import annotations

import lmdb

from prism.errors import InvalidArgument
from prism.store import links
from prism.store.layers import (
    LINKS_COMPLETE,
    MAX_VOLUMES,
    View,
    cached_layer,
    load_layer,
    put_layer,
)
from prism.store.quota import add_rstat, charged_bytes
from prism.store.schema import Ctx
from prism.store.tree import MAX_DEPTH, ancestors, get_inode, put_inode
from prism.store.types import ROOT_INO, FileType


def reached_volumes(ctx: Ctx, t: lmdb.Transaction, sview: View, svol: int, sino: int) -> set[int]:
    """The volumes of frozen view `sview` that a graft of its object (svol, sino) can
    reach, without walking files: volume 0, the object's own, and every volume of each
    import grafted above or below it, or escaped (see "Volumes" in `layers`).
    O(imports x depth)."""
    rec = cached_layer(ctx, t, sview.top)
    by_import: dict[str, list[int]] = {}
    for vol, source in rec["vols"].items():
        by_import.setdefault(str(source[2]), []).append(int(vol))
    above = ancestors(ctx, t, sview, svol, sino)
    out = {0, svol}
    for imp, vols in by_import.items():
        info = rec["imports"].get(imp, {})
        roots = [tuple(r) for r in info.get("roots", ())]
        if (
            info.get("escaped")
            or not roots
            or svol in vols
            or above is None
            or any(r in above for r in roots)
            or any(_below(ctx, t, sview, r, (svol, sino)) for r in roots)
        ):
            out.update(vols)
    return out


def count_links(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    sview: View,
    top: tuple[int, int, FileType],
    vol_map: dict[int, int],
    at_root: bool,
) -> list[tuple[int, int]]:
    """Give each multiply-linked object that a graft of `top` (in frozen `sview`) copies
    the nlink of the links it copies, and a holder among them; and make the destination's
    hard-link index say where those links are (the source's records, seen through the
    import, name directories the graft does not copy). Visits only the indexed objects of
    the imported volumes: O(hard-linked objects x depth). With `at_root`, the entries of
    `top` land in the destination's root.

    Returns what those copies add to the usage: the ones `place` does not count (see the
    module docstring); those left with one link join their directory's figures here."""
    usage: list[tuple[int, int]] = []
    tvol, tino, ttype = top
    inside: dict[tuple[int, int], bool] = {(tvol, tino): ttype == FileType.DIR}

    def below(d: tuple[int, int]) -> bool:  # memoized: each directory is walked once
        path: list[tuple[int, int]] = []
        while d not in inside:
            node = get_inode(ctx, t, sview, *d)
            if node is None or d == (0, ROOT_INO) or len(path) >= MAX_DEPTH:
                inside[d] = False
                break
            path.append(d)
            d = (node.parent_vol, node.parent_ino)
        inside.update(dict.fromkeys(path, inside[d]))
        return inside[d]

    def seen(d: tuple[int, int]) -> tuple[int, int]:  # as the import shows it
        return vol_map.get(d[0], d[0]), d[1]

    def dest(d: tuple[int, int]) -> tuple[int, int]:  # where the graft puts it
        return (0, ROOT_INO) if at_root and d == (tvol, tino) else seen(d)

    for svol, vol in vol_map.items():
        for ino, dirs in links.indexed(ctx, t, sview, svol).items():
            copied = {d: n for d, n in dirs.items() if below(d)}
            count = sum(copied.values()) + ((svol, ino) == (tvol, tino))
            want = {dest(d): n for d, n in copied.items()} if count > 1 else {}
            for d, n in dirs.items():
                if want.get(seen(d)) != n:
                    links.put(ctx, t, view, vol, ino, seen(d), 0)
            for d, n in want.items():
                if d not in map(seen, dirs):
                    links.put(ctx, t, view, vol, ino, d, n)
            node = get_inode(ctx, t, sview, svol, ino) if count else None
            if node is None:
                continue
            holder = (node.parent_vol, node.parent_ino)
            if holder not in copied and copied:
                holder = min(copied)
            if count > 1:
                usage.append((charged_bytes(node), 1))
            elif copied and not (at_root and holder == (tvol, tino)):  # (else `place` does)
                usage.append((charged_bytes(node), 1))
                add_rstat(ctx, view, dest(holder), usage[-1])
            same = (node.parent_vol, node.parent_ino) == holder
            if node.nlink == count and same and dest(holder) == seen(holder):
                continue  # nothing cut: what the import shows is right
            node.nlink = count
            if copied:
                node.parent_vol, node.parent_ino = dest(holder)
            put_inode(ctx, t, view, vol, ino, node)
    return usage


def _below(
    ctx: Ctx, t: lmdb.Transaction, view: View, node: tuple[int, int], top: tuple[int, int]
) -> bool:
    """Whether `node` lies in the subtree at `top`, or may (its way up is not known)."""
    up = ancestors(ctx, t, view, *node)
    return up is None or top in up


def import_volumes(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    layer: int,
    vols: set[int],
    roots: list[tuple[int, int]],
) -> dict[int, int]:
    """Give the volumes `vols` of frozen `layer` fresh volumes here (one import per
    graft), and record the import's `roots`: the objects grafted (source numbering).

    Each graft is a copy, so it never shares volumes with an earlier import of the same
    layer: two grafts of one source (at two places, or one over the other) name distinct
    objects, so a write through one never shows through the other and replacing one never
    deletes what the other names. O(volumes imported)."""
    top = load_layer(ctx, t, view.top)
    imp_id = top["next_import"]
    mapping: dict[int, int] = {}
    for svol in sorted(vols):
        vol = top["next_vol"]
        if vol >= MAX_VOLUMES:
            raise InvalidArgument("too many composed volumes in this VM")
        top["next_vol"] = vol + 1
        mapping[svol] = vol
        top["vols"][str(vol)] = [layer, svol, imp_id]
    top["imports"][str(imp_id)] = {
        "layer": layer,
        "map": {str(k): v for k, v in mapping.items()},
        "roots": [[mapping.get(v, v), i] for v, i in roots],
    }
    top["next_import"] = imp_id + 1
    if not cached_layer(ctx, t, layer).get(LINKS_COMPLETE):
        top[LINKS_COMPLETE] = False  # its objects' links are not indexed (`links`)
    put_layer(ctx, t, view.top, top)
    return mapping
