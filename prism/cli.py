"""The `prism` and `prism-clone` commands.

Every command takes --data DIR (default $PRISM_DATA, else ./prism-data), works whether or
not `prism serve` runs on the same data (LMDB serialises writers, and the server reads the
namespace table on every call, so changes reach mounted clients at once), prints
human-readable output or --json, and on bad input exits 2 with one line saying what to do.
Each change is one store transaction: it happens completely or not at all.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from prism.errors import Exists, InvalidArgument, NotADirectory, NotFound, StoreError
from prism.limits import VM_NAME_PATTERN
from prism.nfs.const import MOUNT_PORT, NFS_PORT
from prism.nlm.monitor import DEFAULT_GRACE
from prism.store import CloneSource, Store
from prism.store.types import NOBODY, SQUASH_MODES, NamespaceInfo
from rpc.admission import FD_RESERVE, MAX_PER_ADDRESS, RECORD_TIMEOUT
from vrpc.control import MAX_CHANNELS, MAX_CHANNELS_PER_UID
from vrpc.stats import read_stats as read_vrpc_stats

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(\d+)([KMGTP]?)(?:i?B)?", re.IGNORECASE)
SOURCE = re.compile(
    rf"(?P<ns>{VM_NAME_PATTERN})(?:@(?P<snap>{VM_NAME_PATTERN}))?"
    r"(?::(?P<path>[^=]+)(?:=(?P<dest>.+))?)?"
)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


def parse_size(text: str) -> int | None:
    """'512M' -> 512 MiB, '10G', plain bytes, or 'none' -> None."""
    if text.strip().lower() == "none":
        return None
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"invalid size {text!r}: use bytes or a unit like 512M, 10G, or 'none'")
    return int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]


def vm_path(text: str, where: str) -> str:
    """An operator's path inside a VM, normalised; refuses relative paths and paths that
    climb above the VM's root (which would name something outside its tree)."""
    if not text.startswith("/"):
        raise UsageError(f"{where}: path {text!r} must be absolute (start at the VM's root '/')")
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UsageError(
                    f"{where}: path {text!r} is outside the VM's tree ('..' above '/'); "
                    "give a path inside the VM"
                )
            parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def parse_source(text: str) -> CloneSource:
    m = SOURCE.fullmatch(text)
    if not m:
        raise UsageError(
            f"invalid source {text!r}: use VM, VM@SNAP, VM:/path, VM:/path=/dest or "
            "VM@SNAP:/path=/dest"
        )
    path = vm_path(m.group("path") or "/", text)
    dest = vm_path(m.group("dest"), text) if m.group("dest") is not None else None
    return CloneSource(m.group("ns"), m.group("snap"), path, dest)


def _label(src: CloneSource) -> str:
    return src.ns + (f"@{src.snapshot}" if src.snapshot else "") + f":{src.path}"


def check_conflicts(sources: Sequence[CloneSource]) -> None:
    """Refuse a composition in which a later subtree would hide an earlier one entirely.

    Sources laid over '/' merge with what is there (that is how a base VM is overlaid), and
    a subtree may be laid inside an earlier one; but placing a subtree at the same
    destination as an earlier one, or at one of its ancestors, would discard the earlier
    source without a trace, so it is certainly a mistake.
    """
    placed: list[tuple[str, CloneSource]] = []
    for src in sources:
        dest = src.target
        if dest != "/":
            for earlier_dest, earlier in placed:
                if earlier_dest == dest or earlier_dest.startswith(dest + "/"):
                    raise UsageError(
                        f"conflicting sources: {_label(src)} -> {dest} would hide "
                        f"{_label(earlier)} -> {earlier_dest}; drop one or give it another "
                        "destination with =/path"
                    )
            placed.append((dest, src))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def default_data() -> Path:
    return Path(os.environ.get("PRISM_DATA") or "./prism-data")


def _vm(store: Store, name: str, hint: str) -> NamespaceInfo:
    """The VM `name`; a snapshot's name is refused with `hint` saying what to use."""
    info = store.namespace(name)
    if info.kind != "vm":
        raise InvalidArgument(f"{name!r} is a snapshot, not a VM; {hint}")
    return info


def _vm_json(info: NamespaceInfo, usage: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": info.name,
        "kind": info.kind,
        "export": "/" + info.name,
        "clients": list(info.clients),
        "quota": info.quota,
        "readonly": info.readonly,
        "created": info.created_ns // 1_000_000_000,
        "secure": info.export.secure,
        "squash": info.export.squash,
        "anon_uid": info.export.anon_uid,
        "anon_gid": info.export.anon_gid,
        "vrpc_users": list(info.export.vrpc_users),
        "vrpc_groups": list(info.export.vrpc_groups),
        "vrpc_token": bool(info.export.vrpc_token),
    }
    if usage is not None:
        out["logical_bytes"] = usage.logical_bytes
        out["files"] = usage.files
    out["shares"] = [
        {"path": sh.path, "source": f"{sh.source_ns}:{sh.source_path}", "rw": sh.rw}
        for sh in info.shares
    ]
    return out


_VM_PATH = re.compile(rf"(?P<vm>{VM_NAME_PATTERN}):(?P<path>/.*)")


def parse_vm_path(text: str) -> tuple[str, str]:
    """'VM:/path' -> (VM, normalised absolute path)."""
    m = _VM_PATH.fullmatch(text)
    if not m:
        raise UsageError(f"invalid location {text!r}: use VM:/path (an absolute path in a VM)")
    parts: list[str] = []
    for part in m.group("path").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UsageError(f"path {m.group('path')!r} leaves the VM's tree; drop the '..'")
        parts.append(part)
    return m.group("vm"), "/" + "/".join(parts)


def _emit(args: argparse.Namespace, data: Any, text: str | Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text() if callable(text) else text)


# -- commands ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from prism.server import ServeOptions, run_event_loop, serve
    from vrpc.server import ListenError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    data = Path(args.data)
    if args.demo:
        ensure_demo(data)
    options = ServeOptions(
        data=data,
        bind=args.bind,
        nfs_port=args.nfs_port,
        mount_port=args.mount_port,
        portmap_port=args.portmap_port,
        portmap=not args.no_portmap,
        metrics=args.metrics,
        durable_replies=not args.async_replies,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        record_timeout=args.record_timeout,
        nlm_port=args.nlm_port,
        grace=args.grace,
        vrpc=not args.no_vrpc,
        vrpc_socket=Path(args.vrpc) if args.vrpc else None,
        vrpc_max_channels=args.vrpc_max_channels,
    )
    if args.async_replies:
        logging.getLogger("prism.server").warning(
            "--async: metadata changes are acknowledged before they are durable; a crash"
            " may lose the last 0.25 s of them"
        )
    try:
        run_event_loop(serve(options))
    except ListenError as exc:
        raise UsageError(f"cannot start: {exc}") from exc
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            where = f" ({exc.filename})" if exc.filename else ""
            raise UsageError(f"cannot start: {exc.strerror}{where}") from exc
        raise UsageError(
            f"cannot listen ({exc.strerror}): is another NFS server running? "
            "pick other ports with --nfs-port/--mount-port/--nlm-port"
        ) from exc
    return 0


def cmd_locks(args: argparse.Namespace, store: Store) -> int:
    from prism.nlm.monitor import MonitorStateError, read_locks
    from prism.nlm.paths import find_paths

    try:
        table = read_locks(Path(args.data))
    except MonitorStateError as exc:
        raise UsageError(str(exc)) from exc
    rows = [] if table is None else table["locks"]
    if args.vm:
        rows = [r for r in rows if r["vm"] == args.vm]
    for vm in {r["vm"] for r in rows}:
        try:
            ns_id = store.namespace(vm).id
        except StoreError:
            continue
        paths = find_paths(store, ns_id, {r["fileid"] for r in rows if r["vm"] == vm})
        for r in rows:
            if r["vm"] == vm:
                r["path"] = paths.get(r["fileid"])

    def text() -> str:
        if table is None:
            return f"no server is running on {args.data}: no locks are held"
        lines = [f"{'VM':<12} {'CLIENT':<22} {'PATH':<28} {'RANGE':<20} {'TYPE':<13} SINCE"]
        for r in rows:
            if r["kind"] == "share":
                what, kind = "-", f"share a{r['access']}/d{r['deny']}"
            else:
                end = "EOF" if r["length"] == 0 else str(r["start"] + r["length"])
                what = f"{r['start']}-{end}"
                kind = r["type"] + (" (waiting)" if r["kind"] == "waiting" else "")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["since"]))
            client = f"{r['client']} ({r['name']})" if r["name"] else r["client"]
            path = r.get("path") or f"fileid {r['fileid']}"
            lines.append(f"{r['vm']:<12} {client:<22} {path:<28} {what:<20} {kind:<13} {since}")
        if table.get("more"):
            lines.append(f"... and {table['more']} more that the server's table leaves out")
        if table.get("grace_left"):
            lines.append(f"grace period: {table['grace_left']} s left for reclaims")
        return "\n".join(lines)

    _emit(args, rows, text)
    return 0


def ensure_demo(data: Path) -> None:
    """The embedded default: a data directory with a VM 'demo' holding a README."""
    with Store.open(data) as store:
        try:
            store.namespace("demo")
            return
        except StoreError:
            pass
        info = store.create_namespace("demo")
        attr = store.create(info.root, b"README.txt", 0o644)
        store.write(
            attr.oid,
            0,
            b"This is the demo VM of a Prism server. Mount it with\n"
            b"  mount -t nfs -o vers=3,nolock 127.0.0.1:/demo /mnt\n",
        )
        print("prism: created demo VM 'demo' (export /demo, loopback clients)", flush=True)


def _emit_vm(args: argparse.Namespace, store: Store, info: NamespaceInfo, lead: str) -> None:
    """A VM's settings after a change: JSON, or one line starting with `lead`."""
    _emit(
        args,
        _vm_json(info, store.usage(info.name)),
        f"{lead} clients {', '.join(info.clients) or 'loopback only'}, quota "
        f"{human(info.quota) if info.quota is not None else 'none'}",
    )


def cmd_vm_create(args: argparse.Namespace, store: Store) -> int:
    info = store.create_namespace(
        args.name, clients=args.client or [], quota=args.quota, **_export_kwargs(args)
    )
    _emit_vm(args, store, info, f"created VM {info.name}: export /{info.name},")
    return 0


def cmd_vm_list(args: argparse.Namespace, store: Store) -> int:
    vms = store.list_namespaces("vm")
    rows = [_vm_json(vm, store.usage(vm.name)) for vm in vms]

    def text() -> str:
        if not rows:
            return "no VMs; create one with `prism vm create NAME`"
        lines = [f"{'NAME':<24} {'EXPORT':<26} {'CLIENTS':<28} {'QUOTA':>10} {'USED':>10} FILES"]
        for r in rows:
            lines.append(
                f"{r['name']:<24} {r['export']:<26} {','.join(r['clients']) or 'loopback':<28} "
                f"{human(r['quota']) if r['quota'] is not None else 'none':>10} "
                f"{human(r['logical_bytes']):>10} {r['files']}"
            )
        return "\n".join(lines)

    _emit(args, rows, text)
    return 0


def cmd_vm_show(args: argparse.Namespace, store: Store) -> int:
    info = _vm(store, args.name, "use `prism snapshot list VM`")
    data = _vm_json(info, store.usage(info.name))
    data["snapshots"] = [s.name.split("@", 1)[1] for s in store.list_snapshots(info.name)]

    def text() -> str:
        return "\n".join(
            [
                f"name:      {data['name']}",
                f"export:    {data['export']}",
                f"clients:   {', '.join(data['clients']) or 'loopback only'}",
                f"access:    {_access_text(data)}",
                f"quota:     {human(data['quota']) if data['quota'] is not None else 'none'}",
                f"used:      {human(data['logical_bytes'])} in {data['files']} files",
                f"snapshots: {', '.join(data['snapshots']) or '-'}",
                "shares:    "
                + (
                    ", ".join(
                        f"{sh['path']} <- {sh['source']} ({'rw' if sh['rw'] else 'ro'})"
                        for sh in data["shares"]
                    )
                    or "-"
                ),
            ]
        )

    _emit(args, data, text)
    return 0


def _access_text(vm: dict[str, Any]) -> str:
    ports = "privileged ports only (secure)" if vm["secure"] else "any port (insecure)"
    squash = {
        "none": "no squash",
        "root": f"root squashed to {vm['anon_uid']}:{vm['anon_gid']}",
        "all": f"everyone squashed to {vm['anon_uid']}:{vm['anon_gid']}",
    }[vm["squash"]]
    users = [f"uid {u}" for u in vm["vrpc_users"]] + [f"gid {g}" for g in vm["vrpc_groups"]]
    vrpc = ", ".join(users) or "root"
    return f"{ports}, {squash}; VRPC: {vrpc}" + (" or its token" if vm["vrpc_token"] else "")


def _export_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The access options given on the command line (absent ones are left out)."""
    given = {
        "secure": args.secure,
        "squash": args.squash,
        "anon_uid": args.anon_uid,
        "anon_gid": args.anon_gid,
        "vrpc_users": _ids(args.vrpc_user, "user"),
        "vrpc_groups": _ids(args.vrpc_group, "group"),
    }
    return {k: v for k, v in given.items() if v is not None}


def _ids(words: list[str] | None, kind: str) -> list[int] | None:
    """`--vrpc-user`/`--vrpc-group` words: numeric ids or names; `none` alone clears."""
    if words is None:
        return None
    if words == ["none"]:
        return []
    import grp
    import pwd

    ids = []
    for word in words:
        if word.isdigit():
            ids.append(int(word))
            continue
        try:
            ids.append(pwd.getpwnam(word).pw_uid if kind == "user" else grp.getgrnam(word).gr_gid)
        except KeyError:
            raise UsageError(
                f"no local {kind} {word!r}: give a numeric id or a name from this host, or"
                f" `none` alone to clear the list"
            ) from None
    return ids


def cmd_vm_vrpc_token(args: argparse.Namespace, store: Store) -> int:
    token = store.vrpc_token(args.name, rotate=args.rotate)
    _emit(args, {"vm": args.name, "token": token, "rotated": args.rotate}, token)
    return 0


def cmd_share(args: argparse.Namespace, store: Store) -> int:
    src_vm, src_path = parse_vm_path(args.source)
    dst_vm, dst_path = parse_vm_path(args.dest)
    try:
        info = store.share(src_vm, src_path, dst_vm, dst_path, rw=args.rw)
    except (NotFound, NotADirectory) as exc:
        if str(exc).startswith("no "):  # an unknown VM: the message has a hint
            raise
        raise UsageError(
            f"{exc}; share a directory that exists in {src_vm} to a path whose parent "
            f"directory exists in {dst_vm} (nothing was changed)"
        ) from None
    mode = "read-write" if args.rw else "read-only"
    _emit(
        args,
        _vm_json(info),
        f"shared {src_vm}:{src_path} into {dst_vm}:{dst_path} ({mode}, live)",
    )
    return 0


def cmd_unshare(args: argparse.Namespace, store: Store) -> int:
    dst_vm, dst_path = parse_vm_path(args.dest)
    info = store.unshare(dst_vm, dst_path)
    _emit(args, _vm_json(info), f"removed the share at {dst_vm}:{dst_path}")
    return 0


def cmd_vm_set(args: argparse.Namespace, store: Store) -> int:
    kwargs: dict[str, Any] = {}
    if args.client is not None:
        kwargs["clients"] = args.client
    if args.quota is not _UNSET:
        kwargs["quota"] = args.quota
    kwargs |= _export_kwargs(args)
    if not kwargs:
        raise UsageError(
            "nothing to change: give --client CIDR, --quota SIZE, --secure/--insecure, "
            "--squash none|root|all, --anon-uid N, --anon-gid N, --vrpc-user UID... or "
            "--vrpc-group GID..."
        )
    info = store.set_namespace(args.name, **kwargs)
    _emit_vm(args, store, info, f"updated VM {info.name}:")
    return 0


def cmd_vm_rm(args: argparse.Namespace, store: Store) -> int:
    _vm(store, args.name, "use `prism snapshot rm VM SNAP`")
    store.remove_namespace(args.name, force=args.force)
    _emit(args, {"removed": args.name}, f"removed VM {args.name} (run `prism gc` to reclaim space)")
    return 0


def cmd_snapshot_create(args: argparse.Namespace, store: Store) -> int:
    try:
        info = store.snapshot(args.vm, args.snap)
    except Exists:
        raise UsageError(
            f"snapshot {args.vm}@{args.snap} already exists; pick another name or remove it "
            f"with `prism snapshot rm {args.vm} {args.snap}`"
        ) from None
    _emit(args, _vm_json(info), f"created snapshot {info.name} (read-only export /{info.name})")
    return 0


def cmd_snapshot_list(args: argparse.Namespace, store: Store) -> int:
    _vm(store, args.vm, "give the VM's name")
    snaps = store.list_snapshots(args.vm)
    rows = [_vm_json(s) for s in snaps]

    def text() -> str:
        if not rows:
            return f"{args.vm} has no snapshots"
        return "\n".join(
            f"{r['name'].split('@', 1)[1]:<24} export {r['export']:<32} "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['created']))}"
            for r in rows
        )

    _emit(args, rows, text)
    return 0


def cmd_snapshot_rm(args: argparse.Namespace, store: Store) -> int:
    store.remove_snapshot(args.vm, args.snap)
    _emit(args, {"removed": f"{args.vm}@{args.snap}"}, f"removed snapshot {args.vm}@{args.snap}")
    return 0


def cmd_snapshot_rollback(args: argparse.Namespace, store: Store) -> int:
    before = _vm(store, args.vm, "give the VM's name").shares
    after = store.rollback(args.vm, args.snap).shares
    dropped = [sh.path for sh in before if sh not in after]
    data: dict[str, Any] = {"rolled_back": args.vm, "to": args.snap}
    text = f"rolled {args.vm} back to {args.snap}"
    if dropped:
        data["removed_shares"] = dropped
        text += f"; removed the shares at {', '.join(dropped)} (no room for them there now)"
    _emit(args, data, text)
    return 0


def cmd_stats(args: argparse.Namespace, store: Store) -> int:
    vms = store.list_namespaces("vm")
    per_vm = [_vm_json(vm, store.usage(vm.name)) for vm in vms]
    st = store.stats()
    vrpc = read_vrpc_stats(Path(args.data))
    data = {
        "vms": per_vm,
        "store": {
            "logical_bytes": st.logical_bytes,
            "stored_bytes": st.stored_bytes,
            "dedup_ratio": round(st.dedup_ratio, 3),
            "chunk_count": st.chunk_count,
            "segment_bytes": st.segment_bytes,
        },
        "vrpc": vrpc,
    }

    def text() -> str:
        lines = [f"{'VM':<24} {'LOGICAL':>12} {'FILES':>9} {'QUOTA':>10}"]
        for r in per_vm:
            quota = human(r["quota"]) if r["quota"] is not None else "none"
            lines.append(
                f"{r['name']:<24} {human(r['logical_bytes']):>12} {r['files']:>9} {quota:>10}"
            )
        lines += [
            "",
            f"store: logical {human(st.logical_bytes)}, stored {human(st.stored_bytes)} "
            f"in {st.chunk_count} chunks, dedup ratio {st.dedup_ratio:.2f}x, "
            f"segment files {human(st.segment_bytes)}",
        ]
        v = vrpc
        lines.append(
            "vrpc: no server is running with VRPC"
            if v is None
            else f"vrpc: {v['channels']} channels, {v['calls']} calls ({v['fast_path_hits']} on"
            f" the fast path), {v['protocol_errors']} protocol errors, {v['refused']} attaches"
            f" refused, {v['revoked']} channels revoked"
        )
        return "\n".join(lines)

    _emit(args, data, text)
    return 0


def _progress(args: argparse.Namespace) -> Callable[[str], None] | None:
    if getattr(args, "json", False) or not sys.stderr.isatty():
        return None
    return lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)


def cmd_fsck(args: argparse.Namespace, store: Store) -> int:
    from prism.store.check import fsck

    report = fsck(store, repair=args.repair, progress=_progress(args))
    data = {
        "clean": report.clean,
        "errors": report.errors,
        "repaired": report.repaired,
        "damaged": report.damaged,
        "debris": report.debris,
        "checked_objects": report.checked_objects,
        "checked_chunks": report.checked_chunks,
        "checked_records": report.checked_records,
    }

    def text() -> str:
        lines = [f"error: {e}" for e in report.errors[:100]]
        if len(report.errors) > 100:
            lines.append(f"... and {len(report.errors) - 100} more errors")
        lines += [f"repaired: {r}" for r in report.repaired]
        lines += [f"debris: {d}" for d in report.debris]
        verdict = "clean" if report.clean else f"{len(report.errors)} errors"
        if not report.clean and not args.repair:
            verdict += " (run `prism fsck --repair`)"
        lines.append(
            f"fsck: {verdict}; checked {report.checked_objects} objects, "
            f"{report.checked_chunks} chunks"
        )
        return "\n".join(lines)

    _emit(args, data, text)
    return 0 if report.clean or (args.repair and not report.damaged) else 1


def cmd_gc(args: argparse.Namespace, store: Store) -> int:
    from prism.store.gc import gc

    report = gc(store, progress=_progress(args))
    data = dict(vars(report))
    _emit(
        args,
        data,
        f"gc: reclaimed {human(report.bytes_reclaimed)}; dropped {report.layers_dropped} "
        f"layers, merged {report.layers_merged}, freed {report.chunks_freed} chunks, removed "
        f"{report.segments_removed} and compacted {report.segments_compacted} segments",
    )
    return 0


def cmd_import(args: argparse.Namespace, store: Store) -> int:
    from prism.importer import import_tree

    src = Path(args.src)
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory; give the host directory to import")
    to = vm_path(args.to, "--to")
    _vm(store, args.vm, "import into a VM, then take a snapshot")

    def terminated(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt  # unwinds the import, which discards what it staged

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        report = import_tree(
            store, args.vm, src, to, progress=sys.stderr.isatty() and not args.json
        )
    except OSError as exc:
        raise UsageError(
            f"cannot read {exc.filename or src}: {exc.strerror or exc}; nothing was imported"
        ) from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    if report.skipped:
        print(
            f"prism: warning: skipped {len(report.skipped)} entries that changed while being "
            f"imported (not copied): {', '.join(report.skipped[:20])}"
            + (" ..." if len(report.skipped) > 20 else ""),
            file=sys.stderr,
        )
    _emit(
        args,
        vars(report),
        f"imported {report.files} files, {report.dirs} directories, {report.symlinks} symlinks,"
        f" {report.hardlinks} hard links, {report.specials} special files, "
        f"{human(report.bytes)} into {args.vm}:{to} in "
        f"{report.seconds:.1f} s ({report.files / max(report.seconds, 1e-9):.0f} files/s, "
        f"{report.bytes / max(report.seconds, 1e-9) / 1e6:.1f} MB/s)",
    )
    return 0


def cmd_clone(args: argparse.Namespace, store: Store) -> int:
    sources = [parse_source(s) for s in args.sources]
    check_conflicts(sources)
    if args.into and (args.client or args.quota is not None):
        raise UsageError(
            f"--client and --quota apply to a new VM; change {args.new} with `prism vm set`"
        )
    if args.replace and not args.into:
        raise UsageError("--replace applies to --into (laying sources over an existing VM)")
    start = time.perf_counter()
    try:
        info = store.clone(
            args.new,
            sources,
            into=args.into,
            replace=args.replace,
            clients=args.client or [],
            quota=args.quota,
        )
    except (NotFound, NotADirectory) as exc:
        if str(exc).startswith("no "):  # an unknown VM or snapshot: the message has a hint
            raise
        raise UsageError(
            f"{exc}; give paths that exist in the sources and destinations whose parent "
            "directory exists (nothing was changed)"
        ) from None
    elapsed = time.perf_counter() - start
    parts = [
        {
            "source": s.ns + (f"@{s.snapshot}" if s.snapshot else ""),
            "path": s.path,
            "dest": s.target,
        }
        for s in sources
    ]
    data = {
        "vm": _vm_json(info, store.usage(info.name)),
        "composed": parts,
        "seconds": round(elapsed, 6),
    }

    def text() -> str:
        verb = "added to" if args.into else "created"
        lines = [f"{verb} VM {info.name} (export /{info.name}) in {elapsed * 1000:.1f} ms:"]
        lines += [f"  {p['source']}:{p['path']} -> {p['dest']}" for p in parts]
        return "\n".join(lines)

    _emit(args, data, text)
    return 0


# -- argument parsing --------------------------------------------------------------------

_UNSET: Any = object()


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error every Prism command promises (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _size_arg(text: str) -> int | None:
    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def _access_options(p: argparse.ArgumentParser, defaults: str) -> None:
    g = p.add_argument_group(f"client access ({defaults}; see README 'Client access')")
    ports = g.add_mutually_exclusive_group()
    ports.add_argument(
        "--secure",
        dest="secure",
        action="store_const",
        const=True,
        default=None,
        help="answer only calls from privileged source ports (<1024), as knfsd",
    )
    ports.add_argument(
        "--insecure",
        dest="secure",
        action="store_const",
        const=False,
        help="answer calls from any port (unprivileged clients, QEMU user networking)",
    )
    g.add_argument(
        "--squash",
        choices=SQUASH_MODES,
        default=None,
        help="callers mapped to the anonymous ids: none, root (uid/gid 0), or all",
    )
    g.add_argument("--anon-uid", type=int, default=None, metavar="UID", help=f"default {NOBODY}")
    g.add_argument("--anon-gid", type=int, default=None, metavar="GID", help=f"default {NOBODY}")
    for kind, meta in (("user", "UID"), ("group", "GID")):
        g.add_argument(
            f"--vrpc-{kind}",
            action="extend",
            nargs="+",
            default=None,
            metavar=meta,
            help=f"local {kind}s whose processes may attach VRPC channels to the VM (`none`"
            " clears); with no users and no groups, only root and holders of its token may",
        )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (0 or more), not {text!r}")
    return value


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument("--data", default=None, help="data directory ($PRISM_DATA, ./prism-data)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prism", description="Prism NFSv3 server for VMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve MOUNT and NFS over TCP and UDP")
    _common(p, json_flag=False)
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    p.add_argument("--nfs-port", type=int, default=NFS_PORT, help=f"NFS port ({NFS_PORT})")
    p.add_argument("--mount-port", type=int, default=MOUNT_PORT, help=f"MOUNT port ({MOUNT_PORT})")
    p.add_argument("--portmap-port", type=int, default=None)
    p.add_argument("--no-portmap", action="store_true")
    p.add_argument(
        "--async",
        dest="async_replies",
        action="store_true",
        help="like knfsd's 'async' export option: answer metadata changes before they"
        " are on disk (a crash may lose the last 0.25 s of them); writes are answered"
        " UNSTABLE and COMMIT still waits. Faster on slow-fsync disks; off by default",
    )
    p.add_argument("--metrics", default=None, metavar="ADDR:PORT")
    p.add_argument(
        "--max-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="NFS and MOUNT TCP connections in all (default: what the open-file limit allows"
        f" after {FD_RESERVE} for the store); when full, addresses bound to no VM go first",
    )
    p.add_argument(
        "--max-connections-per-address",
        type=_positive_int,
        default=MAX_PER_ADDRESS,
        metavar="N",
        help=f"TCP connections from one client address ({MAX_PER_ADDRESS})",
    )
    p.add_argument(
        "--record-timeout",
        type=_positive_float,
        default=RECORD_TIMEOUT,
        metavar="SECONDS",
        help="close a connection whose half-sent request got no new bytes for this long"
        f" ({RECORD_TIMEOUT:g})",
    )
    p.add_argument(
        "--nlm-port",
        type=int,
        default=0,
        metavar="N",
        help="port of the lock services NLM and NSM (default: an ephemeral port)",
    )
    p.add_argument(
        "--grace",
        type=_seconds,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"after a restart, grant only lock reclaims for this long ({DEFAULT_GRACE:g})",
    )
    vrpc = p.add_mutually_exclusive_group()
    vrpc.add_argument(
        "--vrpc",
        default=None,
        metavar="PATH",
        help="VRPC control socket for local shared-memory clients (default DATA/vrpc.sock,"
        " reachable by the server's user only; see README 'VRPC')",
    )
    vrpc.add_argument("--no-vrpc", action="store_true", help="no VRPC control socket")
    p.add_argument(
        "--vrpc-max-channels",
        type=_positive_int,
        default=MAX_CHANNELS,
        metavar="N",
        help=f"VRPC channels attached at once ({MAX_CHANNELS}; {MAX_CHANNELS_PER_UID} per user)",
    )
    p.add_argument("--demo", action="store_true", help="create VM 'demo' if missing")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_serve, needs_store=False)

    vm = sub.add_parser("vm", help="VM lifecycle").add_subparsers(dest="vm_cmd", required=True)
    p = vm.add_parser("create", help="create a VM filesystem exported at /NAME")
    _common(p)
    p.add_argument("name")
    p.add_argument("--client", action="append", metavar="CIDR")
    p.add_argument("--quota", type=_size_arg, default=None, metavar="SIZE")
    _access_options(p, "default: secure, squash none")
    p.set_defaults(func=cmd_vm_create)
    p = vm.add_parser("list", help="list VMs")
    _common(p)
    p.set_defaults(func=cmd_vm_list)
    p = vm.add_parser("show", help="show one VM")
    _common(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_vm_show)
    p = vm.add_parser("set", help="change a VM's clients, quota or access options")
    _common(p)
    p.add_argument("name")
    p.add_argument("--client", action="append", metavar="CIDR")
    p.add_argument("--quota", type=_size_arg, default=_UNSET, metavar="SIZE")
    _access_options(p, "unchanged unless given")
    p.set_defaults(func=cmd_vm_set)
    p = vm.add_parser("vrpc-token", help="print a VM's VRPC attach token (made at first use)")
    _common(p)
    p.add_argument("name")
    p.add_argument(
        "--rotate",
        action="store_true",
        help="replace it: channels attached with the old one are detached at their next call",
    )
    p.set_defaults(func=cmd_vm_vrpc_token)
    p = vm.add_parser("rm", help="remove a VM and its snapshots")
    _common(p)
    p.add_argument("name")
    p.add_argument(
        "--force", action="store_true", help="also remove the shares other VMs have of it"
    )
    p.set_defaults(func=cmd_vm_rm)

    snap = sub.add_parser("snapshot", help="read-only snapshots").add_subparsers(
        dest="snap_cmd", required=True
    )
    for name, func, with_snap in (
        ("create", cmd_snapshot_create, True),
        ("list", cmd_snapshot_list, False),
        ("rm", cmd_snapshot_rm, True),
        ("rollback", cmd_snapshot_rollback, True),
    ):
        p = snap.add_parser(name)
        _common(p)
        p.add_argument("vm")
        if with_snap:
            p.add_argument("snap")
        p.set_defaults(func=func)

    p = sub.add_parser("locks", help="file locks held through the running server")
    _common(p)
    p.add_argument("vm", nargs="?", help="only this VM's")
    p.set_defaults(func=cmd_locks)
    p = sub.add_parser("stats", help="per-VM and store-wide figures")
    _common(p)
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("fsck", help="verify the store")
    _common(p)
    p.add_argument("--repair", action="store_true")
    p.set_defaults(func=cmd_fsck)
    p = sub.add_parser("gc", help="reclaim unreferenced content")
    _common(p)
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("share", help="show a live view of one VM's subtree inside another")
    _common(p)
    p.add_argument("source", metavar="SRC_VM:/path")
    p.add_argument("dest", metavar="DST_VM:/path")
    p.add_argument("--rw", action="store_true", help="let the destination write (default: ro)")
    p.set_defaults(func=cmd_share)
    p = sub.add_parser("unshare", help="remove a share")
    _common(p)
    p.add_argument("dest", metavar="DST_VM:/path")
    p.set_defaults(func=cmd_unshare)

    p = sub.add_parser("import", help="copy a host directory tree into a VM")
    _common(p)
    p.add_argument("vm")
    p.add_argument("src")
    p.add_argument("--to", default="/", metavar="PATH")
    p.set_defaults(func=cmd_import)
    return parser


def build_clone_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="prism-clone",
        description="Compose a VM filesystem from whole VMs, snapshots or subtrees, instantly.",
        epilog="SOURCE is VM, VM@SNAP, VM:/path, VM:/path=/dest or VM@SNAP:/path=/dest; later "
        "sources are laid over earlier ones.",
    )
    _common(p)
    p.add_argument("new", metavar="NEW")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--client", action="append", metavar="CIDR")
    p.add_argument("--quota", type=_size_arg, default=None, metavar="SIZE")
    p.add_argument("--into", action="store_true", help="add to an existing VM")
    p.add_argument(
        "--replace",
        action="store_true",
        help="with --into: replace destinations that exist (their contents are removed)",
    )
    p.set_defaults(func=cmd_clone)
    return p


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.data is None:
        args.data = str(default_data())
    try:
        if not getattr(args, "needs_store", True):
            return int(args.func(args))
        create = args.func in (cmd_vm_create,)
        with Store.open(args.data, create=create) as store:
            return int(args.func(args, store))
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{prog}: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing half-done was committed", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser(), argv)


def clone_main(argv: Sequence[str] | None = None) -> int:
    return _run(build_clone_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
