"""Namespace lifecycle: create and remove VMs, snapshot, rollback, clone and graft
(composition), share and unshare.

Snapshot and clone freeze the source's top layer (`layers.freeze`) and give the result a
fresh top over it: O(1). A snapshot records its VM's next inode number, so that a whole clone
of it continues volume 0's numbering (new objects never reuse the snapshot's inodes).
Rollback points the VM's top at a fresh layer over the snapshot's. A graft (clone with a
path, or `into` an existing VM) imports the volumes of the source's frozen layer that its
subtree can reach as new volumes of the destination, records the objects it grafts as the
import's roots, gives each hard-linked object it copies the count of the links it copies
(all three in `graft`, none walking the subtree's files), and binds the subtree's root with
`place`, which releases whatever the name held as `rm -r` would (`_release`). A whole clone,
snapshot or rollback copies its source's usage record as it is (`quota.copy_usage`). A graft
adds to the VM's usage what it places, from the grafted directory's recursive statistics
(`quota`), plus the hard-linked objects it copies (which no directory's figures count:
`graft.count_links` visits them anyway): O(1) in the files grafted. Every lifecycle change
first folds the statistics still pending (`quota.fold`), so the layer it freezes or reads
holds exact figures. A graft of a subtree without figures (a store older than them) or from
a lineage older than the hard-link index marks the VM's usage unknown: the next reader
measures it once (`quota.get_usage`). With a quota, a composition that does not fit is
refused.

A share is a live mount, not content. A snapshot is a frozen view and a clone a copy, so
neither carries shares: where a share was mounted they show an empty directory (`unmount`,
made in their own top layer; a snapshot of a VM with shares gets a private top over the
frozen layer). A rollback keeps the VM's shares, mounted again where the rolled-back tree has
room (`_remount`). A VM that others share from cannot be removed until those shares are
(`remove_namespace(force=True)` removes them first); fsck repairs dangling mount points that
older versions left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import lmdb

from prism.errors import (
    Busy,
    Corrupt,
    Exists,
    InvalidArgument,
    NotADirectory,
    NotFound,
    NotPermitted,
    QuotaExceeded,
)
from prism.store import links, txn
from prism.store import records as R
from prism.store.graft import count_links, import_volumes, reached_volumes
from prism.store.layers import (
    SHARE_SLOTS,
    SHARE_VOL_BASE,
    SHARE_VOL_SPAN,
    SNAP_NAME,
    View,
    check_vm_name,
    freeze,
    load_layer,
    make_ns,
    new_layer,
    ns_info,
    parse_clients,
    put_ns,
    set_export_options,
    shares_from,
    view_by_name,
    view_of,
)
from prism.store.links import unlinked
from prism.store.names import destroy, new_dir
from prism.store.quota import (
    add_rstat,
    add_usage,
    copy_usage,
    empty_rstat,
    fold,
    get_usage,
    negate,
    rstat,
    set_usage,
    weight,
)
from prism.store.records import Inode
from prism.store.schema import NS_KEY, Ctx, get_meta
from prism.store.tree import (
    check_name,
    drop_entry,
    find_entry,
    get_inode,
    is_below,
    is_empty_dir,
    list_dir,
    put_entry,
    put_inode,
    resolve_path,
)
from prism.store.types import ROOT_INO, CloneSource, FileType, NamespaceInfo


def create_namespace(
    ctx: Ctx,
    name: str,
    *,
    clients: tuple[str, ...] | list[str] = (),
    quota: int | None = None,
    secure: bool | None = None,
    squash: str | None = None,
    anon_uid: int | None = None,
    anon_gid: int | None = None,
    vrpc_users: Sequence[int] | None = None,
    vrpc_groups: Sequence[int] | None = None,
    read_only: bool | None = None,
) -> NamespaceInfo:
    """A new VM; access options not given take the new-VM defaults (secure, squash
    none, anonymous 65534:65534, VRPC for root only, read-write)."""
    check_vm_name(name)
    clients = parse_clients(clients)
    if quota is not None and quota < 0:
        raise InvalidArgument("quota must be positive")
    with txn.write(ctx) as t:
        top = new_layer(ctx, t, 0, None)
        rec = make_ns(ctx, t, name, "vm", top, clients=clients, quota=quota)
        set_export_options(
            rec, secure, squash, anon_uid, anon_gid, vrpc_users, vrpc_groups, read_only
        )
        put_ns(ctx, t, rec)
        now = time.time_ns()
        root = Inode(FileType.DIR, 0o755, 2, 0, 0, 0, 0, 0, now, now, now, 0, ROOT_INO)
        t.put(R.inode_key(top, 0, ROOT_INO), empty_rstat(root).pack(), db=ctx.db.inodes)
        set_usage(ctx, t, rec["id"], 0, 1, True)
        return ns_info(ctx, t, rec)


def remove_namespace(ctx: Ctx, name: str, *, force: bool = False) -> None:
    """Remove a namespace (a VM with its snapshots). A VM that others share from is
    refused, naming them, unless `force`, which removes those shares first."""
    with txn.write(ctx) as t:
        fold(ctx, t)
        view = view_by_name(ctx, t, name)
        dependants = shares_from(ctx, t, view.id) if view.kind == "vm" else []
        if dependants and not force:
            where = ", ".join(f"{rec['name']}:{sh['path']}" for rec, sh in dependants)
            raise Busy(
                f"{name} is shared into {where}; remove those shares with `prism unshare`,"
                f" or remove {name} and its shares with `prism vm rm {name} --force`"
            )
        for rec, sh in dependants:
            drop_share(ctx, t, view_of(ctx, t, rec["id"]), sh)
        doomed = [view.record]
        if view.kind == "vm":
            doomed += [
                json.loads(bytes(raw))
                for _, raw in t.cursor(db=ctx.db.ns)
                if json.loads(bytes(raw)).get("of") == view.id
            ]
        for rec in doomed:
            key = NS_KEY.pack(rec["id"])
            t.delete(key, db=ctx.db.ns)
            t.delete(key, db=ctx.db.usage)
            t.delete(b"ino" + key, db=ctx.db.meta)
            t.delete(rec["name"].encode(), db=ctx.db.names)


def snapshot(ctx: Ctx, name: str, snap: str) -> NamespaceInfo:
    if not SNAP_NAME.fullmatch(snap):
        raise InvalidArgument(f"invalid snapshot name {snap!r}: use a-z 0-9 _ . -")
    with txn.write(ctx) as t:
        fold(ctx, t)
        view = view_by_name(ctx, t, name)
        if view.kind != "vm":
            raise InvalidArgument(f"{name!r} is a snapshot already")
        full = f"{name}@{snap}"
        if t.get(full.encode(), db=ctx.db.names) is not None:
            raise Exists(f"snapshot {full!r} already exists")
        frozen = freeze(ctx, t, view)
        # A whole clone of the snapshot continues volume 0's numbering from here, so that
        # its new objects never take inode numbers the snapshot's objects hold.
        next_ino = get_meta(ctx, t, b"ino" + NS_KEY.pack(view.id)) or ROOT_INO + 1
        mounts = view.record.get("shares", ())
        top = new_layer(ctx, t, frozen, load_layer(ctx, t, frozen)) if mounts else frozen
        rec = make_ns(ctx, t, full, "snapshot", top, of=view.id, next_ino=next_ino)
        copy_usage(ctx, t, view.id, rec["id"])
        snap_view = view_of(ctx, t, rec["id"])
        for share in mounts:
            unmount(ctx, t, snap_view, share["at"][0], share["at"][1], share["name"].encode())
        return ns_info(ctx, t, rec)


def rollback(ctx: Ctx, name: str, snap: str) -> NamespaceInfo:
    with txn.write(ctx) as t:
        fold(ctx, t)
        view = view_by_name(ctx, t, name)
        if view.kind != "vm":
            raise InvalidArgument(f"{name!r} is not a VM")
        snapshot = view_by_name(ctx, t, f"{name}@{snap}")
        view.top = new_layer(ctx, t, snapshot.top, load_layer(ctx, t, snapshot.top))
        view.record = dict(view.record, top=view.top)
        copy_usage(ctx, t, snapshot.id, view.id)
        # Shares are the VM's, not its content's: each is mounted again at its place,
        # and dropped when the rolled-back tree has no room for it there.
        kept = [sh for sh in view.record.get("shares", ()) if _remount(ctx, t, view, sh)]
        view.record["shares"] = kept
        put_ns(ctx, t, view.record)
        return ns_info(ctx, t, view.record)


def clone(
    ctx: Ctx,
    new: str,
    sources: list[CloneSource],
    *,
    into: bool = False,
    replace: bool = False,
    clients: tuple[str, ...] | list[str] = (),
    quota: int | None = None,
) -> NamespaceInfo:
    """Compose `new` from sources laid over each other; O(number of sources) (plus one
    walk of the result when a source predates recursive statistics and the result has a
    quota, which it must fit in).

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
    with txn.write(ctx) as t:
        fold(ctx, t)
        frozen: dict[int, int] = {}
        layers: list[tuple[int, View]] = []
        for src in sources:
            name = src.ns if src.snapshot is None else f"{src.ns}@{src.snapshot}"
            sview = view_by_name(ctx, t, name)
            if sview.id not in frozen:
                frozen[sview.id] = freeze(ctx, t, sview)
            layers.append((frozen[sview.id], sview))
        rest = list(zip(sources, layers, strict=True))
        before = 0
        if into:
            view = view_by_name(ctx, t, new)
            if view.kind != "vm":
                raise InvalidArgument(f"cannot clone into snapshot {new!r}")
            if view.quota is not None:
                before = get_usage(ctx, t, view)[0]
        elif _is_whole(sources[0]):
            layer, sview = layers[0]
            top = new_layer(ctx, t, layer, load_layer(ctx, t, layer))
            next_ino = get_meta(ctx, t, b"ino" + NS_KEY.pack(sview.id)) or ROOT_INO + 1
            rec = make_ns(ctx, t, new, "vm", top, clients=clients, quota=quota, next_ino=next_ino)
            copy_usage(ctx, t, sview.id, rec["id"])
            view = view_of(ctx, t, rec["id"])
            for share in sview.record.get("shares", ()):
                pvol, pino = share["at"]
                unmount(ctx, t, view, pvol, pino, share["name"].encode())
            rest = rest[1:]
        else:
            top = new_layer(ctx, t, 0, None)
            rec = make_ns(ctx, t, new, "vm", top, clients=clients, quota=quota)
            now = time.time_ns()
            root = Inode(FileType.DIR, 0o755, 2, 0, 0, 0, 0, 0, now, now, now, 0, ROOT_INO)
            t.put(R.inode_key(top, 0, ROOT_INO), empty_rstat(root).pack(), db=ctx.db.inodes)
            set_usage(ctx, t, rec["id"], 0, 1, True)
            view = view_of(ctx, t, rec["id"])
        exact = True
        for src, (layer, sview) in rest:
            exact &= _graft(ctx, t, view, src, layer, sview, replace=replace or not into)
        if not exact:  # a source without figures: measured when first needed
            set_usage(ctx, t, view.id, 0, 0, False)
        if view.quota is not None:
            after = get_usage(ctx, t, view)[0]
            if after > view.quota:
                raise QuotaExceeded(
                    f"{new} would hold {after} bytes, over its quota of {view.quota} bytes "
                    f"(this clone needs {after - before} bytes, {after - view.quota} more "
                    f"than the quota allows); raise it with `prism vm set {new} --quota "
                    "SIZE` (nothing was changed)"
                )
        return ns_info(ctx, t, view.record)


def _graft(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    src: CloneSource,
    layer: int,
    sview: View,
    *,
    replace: bool,
) -> bool:
    """Lay `src` over `view` and add what it placed to the VM's usage (O(1) from the
    grafted directories' figures, plus the hard-linked objects it copies); False when
    that is unknown (a source older than the figures or the hard-link index)."""
    label = f"{sview.name}:{src.path}"
    source_view = View(sview.id, sview.name, "snapshot", layer, True, None, sview.record)
    svol, sino, snode = resolve_path(ctx, t, source_view, src.path, label)
    if svol >= SHARE_VOL_BASE:
        raise InvalidArgument(
            f"{label} is inside a share; compose from the VM it is shared from instead"
        )
    if src.target == "/" and snode.type != FileType.DIR:
        raise NotADirectory(f"{label} is not a directory and cannot become '/'")
    reach = reached_volumes(ctx, t, source_view, svol, sino)
    entries = list(list_dir(ctx, t, source_view, svol, sino, 0)) if src.target == "/" else []
    roots = [(e.oid.vol, e.oid.ino) for e in entries if e.oid.vol < SHARE_VOL_BASE]
    vol_map = import_volumes(ctx, t, view, layer, reach, roots or [(svol, sino)])
    exact = links.complete(ctx, t, layer)
    added: list[tuple[int, int] | None] = []
    if exact:
        at_root = src.target == "/"
        top = (svol, sino, snode.type)
        added += count_links(ctx, t, view, source_view, top, vol_map, at_root)
    target = (vol_map.get(svol, svol), sino, snode.type)
    if src.target == "/":
        for entry in entries:
            if not replace:
                _refuse_existing(ctx, t, view, 0, ROOT_INO, entry.name, "/", label)
            moved = (vol_map.get(entry.oid.vol, entry.oid.vol), entry.oid.ino, entry.type)
            if moved[0] >= SHARE_VOL_BASE:  # a share's mount point: an empty directory
                moved = (0, new_dir(ctx, t, view, 0, ROOT_INO), FileType.DIR)
                place(ctx, t, view, 0, ROOT_INO, entry.name, moved)  # (new_dir counted it)
                continue
            added.append(place(ctx, t, view, 0, ROOT_INO, entry.name, moved))
    else:
        parent, _, leaf = src.target.rstrip("/").rpartition("/")
        pvol, pino, pnode = resolve_path(
            ctx, t, view, parent or "/", f"{view.name}:{parent or '/'}"
        )
        if pnode.type != FileType.DIR:
            raise NotADirectory(f"{view.name}:{parent} is not a directory")
        if not replace:
            _refuse_existing(ctx, t, view, pvol, pino, leaf.encode(), parent + "/", label)
        added.append(place(ctx, t, view, pvol, pino, leaf.encode(), target))
    # The source's shares mounted inside the subtree become empty directories here.
    for share in sview.record.get("shares", ()):
        avol, aino = share["at"]
        if src.target == "/" and (avol, aino) == (svol, sino):
            continue  # placed above
        if is_below(ctx, t, source_view, (avol, aino), (svol, sino)):
            unmount(ctx, t, view, vol_map.get(avol, avol), aino, share["name"].encode())
    if not exact or None in added:
        return False
    add_usage(ctx, t, view, sum(a[0] for a in added if a), sum(a[1] for a in added if a))
    return True


def unmount(ctx: Ctx, t: lmdb.Transaction, view: View, pvol: int, pino: int, name: bytes):
    """Turn the share mount point `name` of directory (pvol, pino) into an empty
    directory, in `view`'s top layer: what a snapshot, clone or repair shows where a
    share was mounted (as a filesystem snapshot shows a mount point). The parent's link
    count is unchanged (the share counted as a subdirectory)."""
    entry = find_entry(ctx, t, view, pvol, pino, name)
    if entry is None or entry[0] < SHARE_VOL_BASE:
        return
    ino = new_dir(ctx, t, view, pvol, pino)
    put_entry(ctx, t, view, pvol, pino, name, (0, ino, FileType.DIR))
    add_rstat(ctx, view, (pvol, pino), (0, 1))


def _remount(ctx: Ctx, t: lmdb.Transaction, view: View, share: dict[str, Any]) -> bool:
    """Mount `share` at its place again after the VM's tree changed under it (a
    rollback): over nothing, an empty directory or a stale mount. False when its place
    is gone or holds something else (the caller then drops the share)."""
    pvol, pino = share["at"]
    name = share["name"].encode()
    pnode = get_inode(ctx, t, view, pvol, pino)
    if pnode is None or pnode.type != FileType.DIR:
        return False
    target = (share["base"] + share["root"][0], share["root"][1], FileType.DIR)
    entry = find_entry(ctx, t, view, pvol, pino, name)
    if entry is not None and entry[:2] == target[:2]:
        return True
    if entry is None:
        pnode.nlink += 1
        put_inode(ctx, t, view, pvol, pino, pnode)
    elif entry[0] < SHARE_VOL_BASE:
        node = get_inode(ctx, t, view, entry[0], entry[1])
        if node is not None:
            if node.type != FileType.DIR or not is_empty_dir(ctx, t, view, *entry[:2]):
                return False
            destroy(ctx, t, view, entry[0], entry[1], node)
            add_rstat(ctx, view, (pvol, pino), negate(rstat(node)))  # (a share is not counted)
    put_entry(ctx, t, view, pvol, pino, name, target)
    return True


def _refuse_existing(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    pvol: int,
    pino: int,
    name: bytes,
    where: str,
    label: str,
) -> None:
    """Refuse to lay `label` over an existing entry of an existing VM."""
    if find_entry(ctx, t, view, pvol, pino, name) is not None:
        path = f"{view.name}:{where.rstrip('/')}/{name.decode(errors='replace')}"
        raise Exists(
            f"{path} already exists; add --replace to replace it (and everything in it) "
            f"with {label} (nothing was changed)"
        )


def place(
    ctx: Ctx,
    t: lmdb.Transaction,
    view: View,
    pvol: int,
    pino: int,
    name: bytes,
    target: tuple[int, int, FileType],
) -> tuple[int, int] | None:
    """Bind `name` in a directory to `target`, replacing whatever was there; the
    directory's figures (and those above) gain the target's weight, which is returned
    (None: unknown)."""
    check_name(name)
    pnode = get_inode(ctx, t, view, pvol, pino)
    assert pnode is not None
    old = find_entry(ctx, t, view, pvol, pino, name)
    if old is not None and old[0] >= SHARE_VOL_BASE:
        raise NotPermitted(
            f"{name.decode(errors='replace')!r} in {view.name} is a share; "
            "remove it with `prism unshare` first"
        )
    if old is not None and (old[0], old[1]) == target[:2]:
        return (0, 0)  # already bound to this very object (the same source grafted again)
    if old is not None:
        if old[2] == FileType.DIR:
            pnode.nlink -= 1
        onode = get_inode(ctx, t, view, old[0], old[1])
        if onode is not None:
            add_rstat(ctx, view, (pvol, pino), negate(weight(onode)))
        for vol, ino in dict.fromkeys(_release(ctx, t, view, old[0], old[1], (pvol, pino))):
            left = get_inode(ctx, t, view, vol, ino)  # down to one link: counted there
            if left is not None and left.nlink == 1:
                add_rstat(ctx, view, (left.parent_vol, left.parent_ino), weight(left))
    put_entry(ctx, t, view, pvol, pino, name, target)
    node = get_inode(ctx, t, view, target[0], target[1])
    if node is None:
        raise Corrupt("grafted object is missing")
    node.parent_vol, node.parent_ino = pvol, pino
    put_inode(ctx, t, view, target[0], target[1], node)
    if target[2] == FileType.DIR:
        pnode.nlink += 1
    pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
    put_inode(ctx, t, view, pvol, pino, pnode)
    added = weight(node)
    add_rstat(ctx, view, (pvol, pino), added)
    return added


def _release(
    ctx: Ctx, t: lmdb.Transaction, view: View, vol: int, ino: int, d: tuple[int, int]
) -> list[tuple[int, int]]:
    """An entry of directory `d` naming (vol, ino) was replaced: drop one link, as `rm -r`
    would. A replaced directory's whole subtree goes (a file in it linked elsewhere loses
    one link), and an object whose last link goes releases its chunks (`posix.destroy`).
    Returns the objects that kept links (the caller counts those left with one)."""
    survivors: list[tuple[int, int]] = []
    stack = [(vol, ino, d)]
    while stack:
        vol, ino, d = stack.pop()
        if vol >= SHARE_VOL_BASE:
            continue  # objects seen through a share belong to its source VM
        node = get_inode(ctx, t, view, vol, ino)
        if node is None:
            continue
        if node.type == FileType.DIR:
            for entry in list(list_dir(ctx, t, view, vol, ino, 0)):
                if entry.oid.vol >= SHARE_VOL_BASE:  # its share would be left dangling
                    raise NotPermitted(
                        f"{entry.name.decode(errors='replace')!r} in {view.name} is a share "
                        "inside what would be replaced; remove it with `prism unshare` first"
                    )
                drop_entry(ctx, t, view, vol, ino, entry.name)
                stack.append((entry.oid.vol, entry.oid.ino, (vol, ino)))
            destroy(ctx, t, view, vol, ino, node)
            continue
        node.nlink -= 1
        if node.nlink <= 0:
            destroy(ctx, t, view, vol, ino, node)
        else:
            unlinked(ctx, t, view, vol, ino, node, d)
            node.ctime_ns = time.time_ns()
            put_inode(ctx, t, view, vol, ino, node)
            survivors.append((vol, ino))
    return survivors


def share(
    ctx: Ctx, src: str, src_path: str, dst: str, dst_path: str, *, rw: bool = False
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
    with txn.write(ctx) as t:
        sview = view_by_name(ctx, t, src)
        dview = view_by_name(ctx, t, dst)
        for v in (sview, dview):
            if v.kind != "vm":
                raise InvalidArgument(f"{v.name!r} is a snapshot; shares join VMs")
        if sview.id == dview.id:
            raise InvalidArgument("a VM cannot share into itself; use a symlink")
        svol, sino, snode = resolve_path(ctx, t, sview, src_path, f"{src}:{src_path}")
        if snode.type != FileType.DIR:
            raise NotADirectory(f"{src}:{src_path} is not a directory")
        if svol >= SHARE_VOL_BASE:
            raise InvalidArgument(f"{src}:{src_path} is inside a share; share its source")
        parent, _, leaf = dst_path.rstrip("/").rpartition("/")
        if not leaf:
            raise InvalidArgument("the share's mount point cannot be '/'")
        pvol, pino, pnode = resolve_path(ctx, t, dview, parent or "/", f"{dst}:{parent or '/'}")
        if pnode.type != FileType.DIR:
            raise NotADirectory(f"{dst}:{parent} is not a directory")
        if pvol >= SHARE_VOL_BASE:
            raise InvalidArgument(f"{dst}:{dst_path} is inside a share")
        name = leaf.encode()
        check_name(name)
        if load_layer(ctx, t, sview.top)["next_vol"] > SHARE_VOL_SPAN:
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
        existing = find_entry(ctx, t, dview, pvol, pino, name)
        if existing is not None:
            enode = get_inode(ctx, t, dview, existing[0], existing[1])
            if (
                enode is None
                or enode.type != FileType.DIR
                or existing[0] >= SHARE_VOL_BASE
                or not is_empty_dir(ctx, t, dview, existing[0], existing[1])
            ):
                raise Exists(
                    f"{dst}:{dst_path} exists and is not an empty directory; "
                    "pick another mount point"
                )
            drop_entry(ctx, t, dview, pvol, pino, name)
            destroy(ctx, t, dview, existing[0], existing[1], enode)
            add_rstat(ctx, dview, (pvol, pino), negate(rstat(enode)))  # (shares not counted)
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
        put_ns(ctx, t, rec)
        put_entry(ctx, t, dview, pvol, pino, name, (base + svol, sino, FileType.DIR))
        pnode.nlink += 1
        pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
        put_inode(ctx, t, dview, pvol, pino, pnode)
        return ns_info(ctx, t, rec)


def unshare(ctx: Ctx, dst: str, dst_path: str) -> NamespaceInfo:
    """Remove the share mounted at `dst:dst_path` (its mount point goes with it)."""
    with txn.write(ctx) as t:
        dview = view_by_name(ctx, t, dst)
        norm = "/" + "/".join(p for p in dst_path.split("/") if p)
        shares = list(dview.record.get("shares", ()))
        share = next((sh for sh in shares if sh["path"] == norm), None)
        if share is None:
            raise NotFound(f"no share at {dst}:{norm}; see `prism vm show {dst}`")
        return ns_info(ctx, t, drop_share(ctx, t, dview, share))


def drop_share(ctx: Ctx, t: lmdb.Transaction, dview: View, share: dict[str, Any]) -> dict:
    """Remove `share` and its mount point from `dview`; return the new record."""
    pvol, pino = share["at"]
    name = share["name"].encode()
    entry = find_entry(ctx, t, dview, pvol, pino, name)
    if entry is not None and entry[0] >= SHARE_VOL_BASE:
        drop_entry(ctx, t, dview, pvol, pino, name)
        pnode = get_inode(ctx, t, dview, pvol, pino)
        if pnode is not None:
            pnode.nlink -= 1
            pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
            put_inode(ctx, t, dview, pvol, pino, pnode)
    rec = dict(dview.record)
    rec["shares"] = [sh for sh in rec.get("shares", ()) if sh != share]
    put_ns(ctx, t, rec)
    dview.record = rec
    return rec


def _is_whole(src: CloneSource) -> bool:
    return src.path.rstrip("/") == "" and src.target.rstrip("/") == ""
