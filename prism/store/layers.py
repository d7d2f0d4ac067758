"""Namespaces and their layer chains: namespace records, layers, volumes, share routing.

Layers (copy-on-write and instant clone). A namespace's metadata is a chain of layers: its
mutable *top* layer, then frozen ancestors. A read walks the chain top-down and takes the
first record it meets for a key (a whiteout meaning "gone"); a write always goes to the top.
Snapshot and clone *freeze* the source's top (it becomes the shared parent) and give the
source and the clone fresh empty tops: O(1), independent of the tree's size. Rollback points
a namespace's top at a fresh layer over the snapshot's. A frozen layer is never written again;
`gc` drops layers no namespace reaches and releases what they referenced.

Volumes (composition). Objects are named (namespace, volume, inode). Volume 0 is the
namespace's own lineage. Grafting a subtree of another namespace (`compose.clone` with a
path) *imports* the source's frozen layer: every volume of the source gets a new volume number
here (the layer record's `vols`: volume -> [source layer, source volume, import id]), whose
records live in this namespace's layers and fall back to the source's frozen chain, with
volume numbers in fallen-back directory entries translated through the import's map
(`imports`). So a composition of subtrees from several VMs is O(number of volumes), not
O(files). `chain` is that walk: for (top layer, volume), the (layer, volume there,
translation) triples to search, top-down.

A graft imports only the source volumes its subtree can reach, found without walking files
(`graft.reached_volumes`, O(imports x depth)): volume 0 (the lineage: new objects are
made there, under any directory), and each earlier import whose `roots` (the objects it
was grafted as, in this namespace's numbering) lie below the grafted directory or above it,
or that is `escaped`. An import escapes when a rename or link puts one of its objects
outside the subtrees at its roots (`tree.note_move`); from then on every graft imports it.
An import written before roots were recorded counts as escaped.

Shares (`compose.share`). A share is a live mount of another VM's directory: an entry of the
destination's tree names a share volume (SHARE_VOL_BASE and up), routed through the
destination record's `shares` to the source VM's live namespace (`routed`): share k's objects
are the source's volumes 0..SHARE_VOL_SPAN-1 seen as base+v. Whether an object is still
inside the shared directory is `tree.below_share_root`'s question.

A namespace record (`ns` database) is a JSON object parsed once per distinct stored bytes
(`schema.parsed`): callers never change a record they read, they copy it to write a new one.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import lmdb

from prism.errors import Corrupt, Exists, InvalidArgument, NotFound, Stale
from prism.limits import VM_NAME_MAX, VM_NAME_PATTERN
from prism.store import records as R
from prism.store import txn
from prism.store.schema import (
    NS_KEY,
    PARSED_CACHE_SIZE,
    Ctx,
    intact_records,
    next_counter,
    parsed,
)
from prism.store.sealed import SealedCursor
from prism.store.types import (
    NOBODY,
    ROOT_INO,
    SQUASH_MODES,
    Export,
    NamespaceInfo,
    ObjectId,
    ShareInfo,
)

MAX_VOLUMES = 0x8000
"""Volumes 1..0x7fff hold composed-in subtrees; 0x8000 and up are reserved for shares."""
SHARE_VOL_BASE = 0x8000
SHARE_VOL_SPAN = 0x40
"""A share of another VM's subtree appears as volumes base..base+SPAN-1: the source's
volume v is seen as base + v (so fileids stay unique inside the namespace)."""
SHARE_SLOTS = (0x10000 - SHARE_VOL_BASE) // SHARE_VOL_SPAN
"""Slots are handed out round-robin and never straight back: a handle into a removed share
stays stale until SHARE_SLOTS more shares have been made in that VM."""
VM_NAME = re.compile(VM_NAME_PATTERN)
SNAP_NAME = VM_NAME
UNCHANGED: Any = object()
"""`set_namespace`'s default for the quota, which None would set to unlimited."""
log = logging.getLogger("prism.store")

LINKS_COMPLETE = "links"
"""Layer record field: true when the hard-link index (`prism.store.links`) holds every
hard link of the lineage (layers made before it lack the field)."""

PathEntry = tuple[int, int, dict[int, int] | None]
"""(layer, volume as numbered in that layer, volume translation into the viewer's numbering)"""


@dataclass(slots=True)
class View:
    """A namespace as one operation sees it."""

    id: int
    name: str
    kind: str
    top: int
    readonly: bool
    quota: int | None
    record: dict[str, Any]


class Out(NamedTuple):
    """Maps a routed operation's local (vol, ino) back to the caller's ObjectId. (A
    NamedTuple: immutable, and three times cheaper to make than a frozen dataclass; every
    operation makes one.)"""

    ns: int
    base: int = 0

    def oid(self, vol: int, ino: int) -> ObjectId:
        return ObjectId(self.ns, vol + self.base, ino)


def export_options(rec: dict[str, Any]) -> Export:
    """A VM record's access options (missing fields: see the `ns` database in `schema`)."""
    return Export(
        tuple(rec.get("clients", ())),
        rec.get("secure", False),
        rec.get("squash", "none"),
        rec.get("anon_uid", NOBODY),
        rec.get("anon_gid", NOBODY),
        rec["id"],
        tuple(rec.get("vrpc_users", ())),
        tuple(rec.get("vrpc_groups", ())),
        rec.get("vrpc_token", ""),
        rec.get("read_only", False),
    )


def set_export_options(
    rec: dict[str, Any],
    secure: bool | None,
    squash: str | None,
    anon_uid: int | None,
    anon_gid: int | None,
    vrpc_users: Sequence[int] | None = None,
    vrpc_groups: Sequence[int] | None = None,
    read_only: bool | None = None,
) -> None:
    """Change the given access options of VM record `rec` in place."""
    if squash is not None and squash not in SQUASH_MODES:
        raise InvalidArgument(f"invalid squash {squash!r}: use one of {', '.join(SQUASH_MODES)}")
    ids = [("anon uid", anon_uid), ("anon gid", anon_gid)]
    ids += [("VRPC user", v) for v in vrpc_users or ()]
    ids += [("VRPC group", v) for v in vrpc_groups or ()]
    for what, value in ids:
        if value is not None and not 0 <= value < 1 << 32:
            raise InvalidArgument(f"invalid {what} {value}: use 0 to 4294967295")
    changes: dict[str, Any] = {
        "secure": secure,
        "squash": squash,
        "anon_uid": anon_uid,
        "anon_gid": anon_gid,
        "vrpc_users": None if vrpc_users is None else sorted(set(vrpc_users)),
        "vrpc_groups": None if vrpc_groups is None else sorted(set(vrpc_groups)),
        "read_only": read_only,
    }
    rec.update((key, value) for key, value in changes.items() if value is not None)


def check_vm_name(name: str) -> None:
    if not VM_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid VM name {name!r}: use 1-{VM_NAME_MAX} of a-z 0-9 _ . - starting with a "
            "letter or digit"
        )


def parse_clients(clients: Sequence[str]) -> tuple[str, ...]:
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


def ns_record(ctx: Ctx, t: lmdb.Transaction, ns_id: int) -> dict[str, Any] | None:
    shared = t is ctx.reading  # a snapshot: what it read once stays so (an NFS call reads
    if shared and ns_id in ctx.ns_read:  # its VM's record for the export, then the view)
        return ctx.ns_read[ns_id]
    raw = t.get(NS_KEY.pack(ns_id), db=ctx.db.ns)
    rec = None if raw is None else parsed(ctx.ns_cache, bytes(raw))
    if shared:
        ctx.ns_read[ns_id] = rec
    return rec


def view_of(ctx: Ctx, t: lmdb.Transaction, ns_id: int) -> View:
    rec = ns_record(ctx, t, ns_id)
    if rec is None:
        raise Stale(f"namespace {ns_id} no longer exists")
    return View(
        ns_id,
        rec["name"],
        rec["kind"],
        rec["top"],
        rec["kind"] == "snapshot",
        rec.get("quota"),
        rec,
    )


def view_by_name(ctx: Ctx, t: lmdb.Transaction, name: str) -> View:
    raw = t.get(name.encode(), db=ctx.db.names)
    if raw is None:
        what = "snapshot" if "@" in name else "VM"
        for key, rec in t.cursor(db=ctx.db.ns):  # the names index is derived from these
            if parsed(ctx.ns_cache, bytes(rec))["name"] == name:
                raise Corrupt(
                    f"the names index has lost {what} {name!r} (namespace "
                    f"{NS_KEY.unpack(key)[0]}); run `prism fsck --repair` to rebuild it"
                )
        where = f"prism snapshot list {name.split('@')[0]}" if "@" in name else "prism vm list"
        raise NotFound(f"no {what} named {name!r}; see `{where}`")
    return view_of(ctx, t, R.U32.unpack(raw)[0])


def put_ns(ctx: Ctx, t: lmdb.Transaction, rec: dict[str, Any]) -> None:
    t.put(NS_KEY.pack(rec["id"]), json.dumps(rec, sort_keys=True).encode(), db=ctx.db.ns)


def _layer_raw(ctx: Ctx, t: lmdb.Transaction, layer: int) -> bytes:
    raw = t.get(R.U64.pack(layer), db=ctx.db.layers)
    if raw is None:
        raise Corrupt(f"layer {layer} is missing; run `prism fsck --repair`")
    return bytes(raw)


def load_layer(ctx: Ctx, t: lmdb.Transaction, layer: int) -> dict[str, Any]:
    """A layer record of the caller's own, to change and put back."""
    return json.loads(_layer_raw(ctx, t, layer))


def cached_layer(ctx: Ctx, t: lmdb.Transaction, layer: int) -> dict[str, Any]:
    """A layer record for reading only, parsed once per distinct stored bytes."""
    return parsed(ctx.layer_cache, _layer_raw(ctx, t, layer))


def put_layer(ctx: Ctx, t: lmdb.Transaction, layer: int, rec: dict[str, Any]) -> None:
    t.put(R.U64.pack(layer), json.dumps(rec, sort_keys=True).encode(), db=ctx.db.layers)


def new_layer(ctx: Ctx, t: lmdb.Transaction, parent: int, like: dict[str, Any] | None) -> int:
    layer = next_counter(ctx, t, b"layer_next")
    rec = {
        "parent": parent,
        "vols": dict(like["vols"]) if like else {},
        "imports": dict(like["imports"]) if like else {},
        "next_vol": like["next_vol"] if like else 1,
        "next_import": like["next_import"] if like else 1,
        LINKS_COMPLETE: bool(like.get(LINKS_COMPLETE)) if like else True,
    }
    put_layer(ctx, t, layer, rec)
    return layer


def _layer_is_empty(ctx: Ctx, t: lmdb.Transaction, layer: int) -> bool:
    prefix = R.layer_prefix(layer)
    for db in (ctx.db.inodes, ctx.db.dirents, ctx.db.cmap, ctx.db.links):
        cur = t.cursor(db=db)
        if cur.set_range(prefix) and bytes(cur.key()).startswith(prefix):
            return False
    rec = load_layer(ctx, t, layer)
    if rec["parent"] == 0:
        return False
    parent = load_layer(ctx, t, rec["parent"])
    return rec["vols"] == parent["vols"]


def freeze(ctx: Ctx, t: lmdb.Transaction, view: View) -> int:
    """Make the namespace's current state an immutable layer; return its id. O(1)."""
    if view.kind == "snapshot":
        return view.top
    if _layer_is_empty(ctx, t, view.top):
        return int(load_layer(ctx, t, view.top)["parent"])
    frozen = view.top
    view.top = new_layer(ctx, t, frozen, load_layer(ctx, t, frozen))
    view.record = dict(view.record, top=view.top)
    put_ns(ctx, t, view.record)
    return frozen


def chain(ctx: Ctx, t: lmdb.Transaction, top: int, vol: int) -> tuple[PathEntry, ...]:
    """The layers to search, top-down, for records of `vol` in a view whose top is `top`."""
    cached = ctx.paths.get((top, vol))
    if cached is not None:
        return cached
    top_rec = cached_layer(ctx, t, top)
    out: list[PathEntry] = []
    layer = top
    while layer:
        out.append((layer, vol, None))
        layer = top_rec["parent"] if layer == top else cached_layer(ctx, t, layer)["parent"]
    source = top_rec["vols"].get(str(vol))
    if source is not None:
        src_layer, src_vol, imp = source
        mapping = ctx.import_maps.get((top, imp))
        if mapping is None:  # an import's map never changes once made
            raw_map = top_rec["imports"][str(imp)]["map"]
            mapping = ctx.import_maps[(top, imp)] = {int(k): v for k, v in raw_map.items()}
        for layer2, vol2, xl2 in chain(ctx, t, src_layer, src_vol):
            composed = mapping if xl2 is None else {s: mapping.get(d, d) for s, d in xl2.items()}
            out.append((layer2, vol2, composed))
    result = tuple(out)
    if vol == 0 or source is not None:
        if len(ctx.paths) > 65536:
            ctx.paths.clear()
        ctx.paths[(top, vol)] = result
    return result


def imports_at(rec: dict[str, Any], places: set[tuple[int, int]]) -> set[str]:
    """The imports of layer record `rec` grafted at one of `places` (see "Volumes")."""
    return {
        imp
        for imp, info in rec["imports"].items()
        if any(tuple(r) in places for r in info.get("roots", ()))
    }


def mark_escaped(ctx: Ctx, t: lmdb.Transaction, top: int, imports: list[str]) -> None:
    """Mark imports of the top layer `top` escaped (see "Volumes")."""
    rec = load_layer(ctx, t, top)
    for imp in imports:
        rec["imports"][imp]["escaped"] = True
    put_layer(ctx, t, top, rec)


def share_of(view: View, vol: int) -> dict[str, Any]:
    for share in view.record.get("shares", ()):
        if share["base"] <= vol < share["base"] + SHARE_VOL_SPAN:
            return share
    raise Stale(f"the share this object was reached through is gone from {view.name}")


def routed(ctx: Ctx, t: lmdb.Transaction, view: View, vol: int) -> tuple[View, int, int]:
    """Where a volume's objects live: (view of the owner, its volume, base offset).
    Share volumes lead into the source VM's live namespace."""
    if vol < SHARE_VOL_BASE:
        return view, vol, 0
    share = share_of(view, vol)
    target = view_of(ctx, t, share["src"])
    if not share["rw"]:
        target.readonly = True
        target.name = f"{view.name}:{share['path']} (a read-only share of {target.name})"
    return target, vol - share["base"], share["base"]


def ns_info(ctx: Ctx, t: lmdb.Transaction, rec: dict[str, Any]) -> NamespaceInfo:
    clients = rec.get("clients", [])
    quota = rec.get("quota")
    export = export_options(rec)
    if rec["kind"] == "snapshot":
        parent = ns_record(ctx, t, rec["of"])
        if parent is not None:
            clients = parent.get("clients", [])
            export = export_options(parent)
    shares = []
    for share in rec.get("shares", ()):
        source = ns_record(ctx, t, share["src"])
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


def make_ns(
    ctx: Ctx,
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
    if t.get(name.encode(), db=ctx.db.names) is not None:
        raise Exists(f"{name!r} already exists; pick another name or remove it first")
    ns_id = next_counter(ctx, t, b"ns_next")
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
        set_export_options(rec, True, "none", NOBODY, NOBODY)
    put_ns(ctx, t, rec)
    t.put(name.encode(), NS_KEY.pack(ns_id), db=ctx.db.names)
    if next_ino is not None:
        t.put(b"ino" + NS_KEY.pack(ns_id), R.U64.pack(next_ino), db=ctx.db.meta)
    return rec


def namespace(ctx: Ctx, name: str) -> NamespaceInfo:
    with txn.read(ctx) as t:
        return ns_info(ctx, t, view_by_name(ctx, t, name).record)


def export_of(ctx: Ctx, ns_id: int) -> Export:
    """How a namespace may be reached (a snapshot as its VM); Stale if gone. The per-call
    fast path of the NFS server's access checks."""
    with txn.read(ctx) as t:
        rec = ns_record(ctx, t, ns_id)
        if rec is None:
            raise Stale(f"namespace {ns_id} no longer exists")
        if rec["kind"] == "snapshot":
            rec = ns_record(ctx, t, rec["of"]) or rec
        cached = ctx.exports.get(id(rec))
        if cached is not None and cached[0] is rec:  # (holding rec keeps its id unique)
            return cached[1]
        if len(ctx.exports) > PARSED_CACHE_SIZE:
            ctx.exports.clear()
        export = export_options(rec)
        ctx.exports[id(rec)] = (rec, export)
        return export


def namespace_by_id(ctx: Ctx, ns_id: int) -> NamespaceInfo:
    with txn.read(ctx) as t:
        rec = ns_record(ctx, t, ns_id)
        if rec is None:
            raise Stale(f"namespace {ns_id} no longer exists")
        return ns_info(ctx, t, rec)


def list_namespaces(ctx: Ctx, kind: str | None = None) -> list[NamespaceInfo]:
    with txn.read(ctx) as t:
        out = []
        cur = cast(SealedCursor, t.cursor(db=ctx.db.ns))
        for _, raw in cur.intact():
            rec = json.loads(bytes(raw))
            if kind is None or rec["kind"] == kind:
                out.append(ns_info(ctx, t, rec))
        for key in cur.damaged:  # the others stay listed and served
            log.error("namespace record %s is damaged, not served; run `prism fsck`", key.hex())
        return sorted(out, key=lambda info: info.name)


def set_namespace(
    ctx: Ctx,
    name: str,
    *,
    clients: tuple[str, ...] | list[str] | None = None,
    quota: Any = UNCHANGED,
    secure: bool | None = None,
    squash: str | None = None,
    anon_uid: int | None = None,
    anon_gid: int | None = None,
    vrpc_users: Sequence[int] | None = None,
    vrpc_groups: Sequence[int] | None = None,
    read_only: bool | None = None,
    add_clients: Sequence[str] = (),
    remove_clients: Sequence[str] = (),
) -> NamespaceInfo:
    """Change the options given in one transaction: `clients` replaces the list, then
    `add_clients` are added (once each) and `remove_clients` removed (each must be there)."""
    with txn.write(ctx) as t:
        view = view_by_name(ctx, t, name)
        if view.kind != "vm":
            raise InvalidArgument(f"{name!r} is a snapshot; change its VM instead")
        rec = dict(view.record)
        listed = list(parse_clients(clients) if clients is not None else rec.get("clients", []))
        listed += [c for c in dict.fromkeys(parse_clients(add_clients)) if c not in listed]
        for spec in parse_clients(remove_clients):
            if spec not in listed:
                have = ", ".join(listed) or "none: loopback only"
                raise InvalidArgument(
                    f"{spec} is not among {name}'s clients ({have}); nothing was changed"
                )
            listed.remove(spec)
        rec["clients"] = listed
        if quota is not UNCHANGED:
            if quota is not None and quota < 0:
                raise InvalidArgument("quota must be positive")
            rec["quota"] = quota
        set_export_options(
            rec, secure, squash, anon_uid, anon_gid, vrpc_users, vrpc_groups, read_only
        )
        put_ns(ctx, t, rec)
        return ns_info(ctx, t, rec)


def rename_namespace(ctx: Ctx, old: str, new: str) -> NamespaceInfo:
    """Rename VM `old` (and its snapshots, `old@s` -> `new@s`) in one transaction. Only the
    names change: records, handles, shares, tokens and quotas are keyed by namespace id."""
    check_vm_name(new)
    with txn.write(ctx) as t:
        view = view_by_name(ctx, t, old)
        if view.kind != "vm":
            raise InvalidArgument(f"{old!r} is a snapshot; rename its VM instead")
        if t.get(new.encode(), db=ctx.db.names) is not None:
            raise Exists(f"{new!r} already exists; pick another name or remove it first")
        records = [view.record] + [
            rec
            for _, raw in t.cursor(db=ctx.db.ns)
            if (rec := json.loads(bytes(raw)))["kind"] == "snapshot" and rec["of"] == view.id
        ]
        for rec in records:
            name = new + rec["name"][len(old) :]  # "old@snap" -> "new@snap"
            t.delete(rec["name"].encode(), db=ctx.db.names)
            t.put(name.encode(), NS_KEY.pack(rec["id"]), db=ctx.db.names)
            put_ns(ctx, t, dict(rec, name=name))
        return ns_info(ctx, t, dict(view.record, name=new))


def vrpc_token(ctx: Ctx, name: str, *, rotate: bool = False) -> str:
    """VM `name`'s VRPC attach token, made at first use; `rotate` replaces it, so every
    channel attached with the old one is detached at its next call."""
    with txn.write(ctx) as t:
        view = view_by_name(ctx, t, name)
        if view.kind != "vm":
            raise InvalidArgument(f"{name!r} is a snapshot; its VM's token attaches to it")
        token: str = view.record.get("vrpc_token", "")
        if rotate or not token:
            token = "pvt1-" + secrets.token_urlsafe(24)
            put_ns(ctx, t, dict(view.record, vrpc_token=token))
        return token


def shares_from(ctx: Ctx, t: lmdb.Transaction, src: int) -> list[tuple[dict, dict]]:
    """(destination namespace record, share) of every share whose source is `src`."""
    out = []
    for _, raw in t.cursor(db=ctx.db.ns):
        rec = json.loads(bytes(raw))
        out += [(rec, sh) for sh in rec.get("shares", ()) if sh["src"] == src]
    return out


def all_layers(ctx: Ctx, t: lmdb.Transaction, *, tolerant: bool = False) -> dict[int, dict]:
    """Every layer record, by id (`tolerant`: the intact ones, for fsck)."""
    records = intact_records(t, ctx.db.layers) if tolerant else t.cursor(db=ctx.db.layers)
    return {R.U64.unpack(k)[0]: json.loads(bytes(v)) for k, v in records}


def reachable_layers(
    ctx: Ctx, t: lmdb.Transaction, layers: dict[int, dict], *, tolerant: bool = False
) -> set[int]:
    """The layers of `layers` some namespace reaches: its top, their parents and the
    layers their volumes import, transitively."""
    records = intact_records(t, ctx.db.ns) if tolerant else t.cursor(db=ctx.db.ns)
    stack = [json.loads(bytes(v))["top"] for _, v in records]
    seen: set[int] = set()
    while stack:
        layer = stack.pop()
        if layer in seen or layer not in layers:
            continue
        seen.add(layer)
        rec = layers[layer]
        if rec["parent"]:
            stack.append(rec["parent"])
        stack.extend(src[0] for src in rec["vols"].values())
    return seen
