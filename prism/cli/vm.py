"""VM commands: lifecycle (`prism vm`), snapshots, shares, and composition (`prism-clone`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from prism.cli.output import emit, human, vm_json
from prism.cli.values import UsageError, check_conflicts, parse_source, parse_vm_path
from prism.errors import Exists, InvalidArgument, NotADirectory, NotFound
from prism.store import Store
from prism.store.types import NamespaceInfo

UNSET: Any = object()
"""The default of an option whose absence means "leave unchanged" (None is a value)."""


def vm_info(store: Store, name: str, hint: str) -> NamespaceInfo:
    """The VM `name`; a snapshot's name is refused with `hint` saying what to use."""
    info = store.namespace(name)
    if info.kind != "vm":
        raise InvalidArgument(f"{name!r} is a snapshot, not a VM; {hint}")
    return info


def emit_vm(args: argparse.Namespace, store: Store, info: NamespaceInfo, lead: str) -> None:
    """A VM's settings after a change: JSON, or one line starting with `lead`."""
    emit(
        args,
        vm_json(info, store.usage(info.name)),
        f"{lead} clients {', '.join(info.clients) or 'loopback only'}, quota "
        f"{human(info.quota) if info.quota is not None else 'none'}"
        + (", read-only" if info.export.read_only else ""),
    )


def _clients(given: list[str] | None) -> list[str] | None:
    """`--client` words: CIDRs, or `none` alone for loopback only."""
    if given is None or "none" not in given:
        return given
    if given != ["none"]:
        raise UsageError("--client none stands alone (loopback only); drop the other CIDRs")
    return []


def cmd_vm_create(args: argparse.Namespace, store: Store) -> int:
    info = store.create_namespace(
        args.name, clients=_clients(args.client) or [], quota=args.quota, **_export_kwargs(args)
    )
    emit_vm(args, store, info, f"created VM {info.name}: export /{info.name},")
    return 0


VM_LIST_FIELDS = (
    *("name", "export", "clients", "quota", "used", "files", "secure", "squash", "options"),
)
_DEFAULT_FIELDS = VM_LIST_FIELDS[:6]
_NUMERIC = frozenset({"quota", "used", "files"})


def _list_cell(vm: dict[str, Any], field: str, parsable: bool) -> str:
    if field == "clients":
        return ",".join(vm["clients"]) or "loopback"
    if field in ("quota", "used"):
        n = vm["quota"] if field == "quota" else vm["logical_bytes"]
        if n is None:
            return "-" if parsable else "none"
        return str(n) if parsable else human(n)
    if field == "secure":
        return "secure" if vm["secure"] else "insecure"
    return str(vm[field])


def cmd_vm_list(args: argparse.Namespace, store: Store) -> int:
    """A table whose columns are as wide as their widest cell; -H (no header, one tab
    between fields), -p (exact numbers) and -o FIELD,... as `zfs list` has them."""
    vms = store.list_namespaces("vm")
    rows = [vm_json(vm, store.usage(vm.name)) for vm in vms]
    fields = args.fields or list(_DEFAULT_FIELDS)

    def text() -> str:
        cells = [[_list_cell(r, f, args.parsable) for f in fields] for r in rows]
        if args.scripted:
            return "\n".join("\t".join(row) for row in cells)
        if not rows:
            return "no VMs; create one with `prism vm create NAME`"
        header = [f.upper() for f in fields]
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(fields))]
        lines = []
        for row in [header, *cells]:
            padded = [
                cell.rjust(w) if f in _NUMERIC else cell.ljust(w)
                for cell, w, f in zip(row, widths, fields, strict=True)
            ]
            lines.append("  ".join(padded).rstrip())
        return "\n".join(lines)

    if args.scripted and not rows and not args.json:
        return 0
    emit(args, rows, text)
    return 0


def cmd_vm_show(args: argparse.Namespace, store: Store) -> int:
    info = vm_info(store, args.name, "use `prism snapshot list VM`")
    data = vm_json(info, store.usage(info.name))
    snaps = store.list_snapshots(info.name)
    data["snapshots"] = [s.name.split("@", 1)[1] for s in snaps]
    data |= _space(args, store, info, snaps)

    def text() -> str:
        return "\n".join(
            [
                f"name:      {data['name']}",
                f"export:    {data['export']}",
                f"clients:   {', '.join(data['clients']) or 'loopback only'}",
                f"options:   {data['options']}",
                f"access:    {_access_text(data)}",
                f"quota:     {human(data['quota']) if data['quota'] is not None else 'none'}",
                f"used:      {human(data['logical_bytes'])} in {data['files']} files, "
                f"unique {human(data['unique_bytes'])}",
                "snapshots: "
                + (
                    ", ".join(
                        f"{s['name']} (used {human(s['used_bytes'])}, unique "
                        f"{human(s['unique_bytes'])})"
                        for s in data["snapshot_space"]
                    )
                    or "-"
                ),
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

    emit(args, data, text)
    return 0


def _space(
    args: argparse.Namespace, store: Store, info: NamespaceInfo, snaps: list[NamespaceInfo]
) -> dict[str, Any]:
    """used_bytes (what its quota counts) and unique_bytes (what removing it, then gc,
    frees) of the VM (with its snapshots, as `prism vm rm` removes them) and of each
    snapshot."""
    from prism.cli.output import progress_printer
    from prism.store.gc import unique_bytes

    groups = [[info.name, *(s.name for s in snaps)], *([s.name] for s in snaps)]
    vm_unique, *snap_unique = unique_bytes(store, groups, progress=progress_printer(args))
    return {
        "used_bytes": store.usage(info.name).logical_bytes,
        "unique_bytes": vm_unique,
        "snapshot_space": [
            {
                "name": s.name.split("@", 1)[1],
                "used_bytes": store.usage(s.name).logical_bytes,
                "unique_bytes": unique,
            }
            for s, unique in zip(snaps, snap_unique, strict=True)
        ],
    }


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
        "read_only": args.read_only,
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
    emit(args, {"vm": args.name, "token": token, "rotated": args.rotate}, token)
    return 0


def _owner(spec: str) -> tuple[int, int]:
    """`--owner USER[:GROUP]` (names or numbers; GROUP defaults to USER's own group)."""
    import grp
    import pwd

    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        if not user.isdigit():
            raise UsageError(f"no user named {user!r}: give --owner USER[:GROUP]") from None
        uid, gid = int(user), int(user)
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UsageError(f"no group named {group!r}: give --owner USER[:GROUP]") from None
    return uid, gid


def cmd_vm_vrpc_guest(args: argparse.Namespace) -> int:
    import os
    import shlex
    import socket

    from rpc.xdr import XdrError
    from vrpc.control import (
        MAX_MESSAGE,
        GuestOwner,
        GuestRequest,
        Refused,
        decode_guest_reply,
        encode_guest_request,
    )
    from vrpc.server import default_socket

    path = Path(args.vrpc) if args.vrpc else default_socket(Path(args.data))
    request = GuestRequest(args.name)
    if args.owner == "none":
        request = GuestRequest(args.name, owner=GuestOwner.CLEAR)
    elif args.owner is not None:
        uid, gid = _owner(args.owner)
        request = GuestRequest(args.name, owner=GuestOwner.SET, uid=uid, gid=gid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        try:
            sock.connect(str(path))
            sock.send(encode_guest_request(request))
            answer = decode_guest_reply(sock.recv(MAX_MESSAGE))
        except (OSError, XdrError) as exc:
            raise UsageError(
                f"no answer from a Prism server's VRPC control socket {path}: {exc}; is"
                " `prism serve` running with VRPC? (give its `--vrpc PATH` here too)"
            ) from None
    if isinstance(answer, Refused):
        raise UsageError(f"the server refused a guest channel for {args.name}: {answer.message}")
    qemu = answer.qemu_args(args.name)
    try:
        st = os.stat(answer.mem_path)
        owner: dict[str, int] | None = {"uid": st.st_uid, "gid": st.st_gid}
    except OSError:
        owner = None
    emit(
        args,
        {
            "vm": args.name,
            "channel": answer.channel_id,
            "created": answer.created,
            "mem_path": answer.mem_path,
            "owner": owner,
            "size": answer.ring_size,
            "slots": answer.nslots,
            "qemu_args": qemu,
        },
        " ".join(shlex.quote(a) for a in qemu),
    )
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
    emit(
        args,
        vm_json(info),
        f"shared {src_vm}:{src_path} into {dst_vm}:{dst_path} ({mode}, live)",
    )
    return 0


def cmd_unshare(args: argparse.Namespace, store: Store) -> int:
    dst_vm, dst_path = parse_vm_path(args.dest)
    info = store.unshare(dst_vm, dst_path)
    emit(args, vm_json(info), f"removed the share at {dst_vm}:{dst_path}")
    return 0


def cmd_vm_set(args: argparse.Namespace, store: Store) -> int:
    kwargs: dict[str, Any] = {}
    if args.client is not None:
        kwargs["clients"] = _clients(args.client)
    if args.add_client:
        kwargs["add_clients"] = args.add_client
    if args.remove_client:
        kwargs["remove_clients"] = args.remove_client
    if args.quota is not UNSET:
        kwargs["quota"] = args.quota
    kwargs |= _export_kwargs(args)
    if not kwargs:
        raise UsageError(
            "nothing to change: give --client CIDR, --quota SIZE, --secure/--insecure, "
            "--read-only/--read-write, --add-client CIDR, --remove-client CIDR, --client none, "
            "--squash none|root|all, --anon-uid N, --anon-gid N, --vrpc-user UID... or "
            "--vrpc-group GID..."
        )
    info = store.set_namespace(args.name, **kwargs)
    emit_vm(args, store, info, f"updated VM {info.name}:")
    return 0


def cmd_vm_rename(args: argparse.Namespace, store: Store) -> int:
    try:
        info = store.rename_namespace(args.old, args.new)
    except Exists:
        raise UsageError(
            f"{args.new!r} already exists: pick another name, or remove it first with "
            f"`prism vm rm {args.new}` (nothing was changed)"
        ) from None
    emit(
        args,
        vm_json(info, store.usage(info.name)),
        f"renamed VM {args.old} to {info.name}: export /{info.name} (snapshots, shares, "
        "token and quota follow; clients' file handles keep working)",
    )
    return 0


def cmd_vm_rm(args: argparse.Namespace, store: Store) -> int:
    vm_info(store, args.name, "use `prism snapshot rm VM SNAP`")
    store.remove_namespace(args.name, force=args.force)
    emit(args, {"removed": args.name}, f"removed VM {args.name} (run `prism gc` to reclaim space)")
    return 0


def cmd_snapshot_create(args: argparse.Namespace, store: Store) -> int:
    try:
        info = store.snapshot(args.vm, args.snap)
    except Exists:
        raise UsageError(
            f"snapshot {args.vm}@{args.snap} already exists; pick another name or remove it "
            f"with `prism snapshot rm {args.vm} {args.snap}`"
        ) from None
    emit(args, vm_json(info), f"created snapshot {info.name} (read-only export /{info.name})")
    return 0


def cmd_snapshot_list(args: argparse.Namespace, store: Store) -> int:
    vm_info(store, args.vm, "give the VM's name")
    snaps = store.list_snapshots(args.vm)
    rows = [vm_json(s) for s in snaps]

    def text() -> str:
        if not rows:
            return f"{args.vm} has no snapshots"
        return "\n".join(
            f"{r['name'].split('@', 1)[1]:<24} export {r['export']:<32} "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['created']))}"
            for r in rows
        )

    emit(args, rows, text)
    return 0


def cmd_snapshot_rm(args: argparse.Namespace, store: Store) -> int:
    store.remove_snapshot(args.vm, args.snap)
    emit(args, {"removed": f"{args.vm}@{args.snap}"}, f"removed snapshot {args.vm}@{args.snap}")
    return 0


def cmd_snapshot_rollback(args: argparse.Namespace, store: Store) -> int:
    before = vm_info(store, args.vm, "give the VM's name").shares
    after = store.rollback(args.vm, args.snap).shares
    dropped = [sh.path for sh in before if sh not in after]
    data: dict[str, Any] = {"rolled_back": args.vm, "to": args.snap}
    text = f"rolled {args.vm} back to {args.snap}"
    if dropped:
        data["removed_shares"] = dropped
        text += f"; removed the shares at {', '.join(dropped)} (no room for them there now)"
    emit(args, data, text)
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
            clients=_clients(args.client) or [],
            quota=args.quota,
        )
    except (NotFound, NotADirectory) as exc:
        if str(exc).startswith("no "):  # an unknown VM or snapshot: the message has a hint
            raise
        raise UsageError(
            f"{exc}; give paths that exist in the sources and destinations whose parent "
            "directory exists (nothing was changed)"
        ) from None
    except Exists as exc:
        if args.into:
            raise
        raise UsageError(
            f"{exc}, or add the sources to that VM with `prism-clone {args.new} ... --into`"
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
        "vm": vm_json(info, store.usage(info.name)),
        "composed": parts,
        "seconds": round(elapsed, 6),
    }

    def text() -> str:
        verb = "added to" if args.into else "created"
        lines = [f"{verb} VM {info.name} (export /{info.name}) in {elapsed * 1000:.1f} ms:"]
        lines += [f"  {p['source']}:{p['path']} -> {p['dest']}" for p in parts]
        return "\n".join(lines)

    emit(args, data, text)
    return 0
