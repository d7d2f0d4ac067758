"""The command line: the `prism` and `prism-clone` parsers, and the argument types that turn
an operator's text into values (each refusing bad input in one line)."""

from __future__ import annotations

import argparse
from typing import NoReturn

from prism.cli.serve import cmd_serve
from prism.cli.storage import cmd_fsck, cmd_gc, cmd_import, cmd_locks, cmd_stats
from prism.cli.values import UsageError, parse_size
from prism.cli.vm import (
    UNSET,
    cmd_clone,
    cmd_share,
    cmd_snapshot_create,
    cmd_snapshot_list,
    cmd_snapshot_rm,
    cmd_snapshot_rollback,
    cmd_unshare,
    cmd_vm_create,
    cmd_vm_list,
    cmd_vm_rm,
    cmd_vm_set,
    cmd_vm_show,
)
from prism.store.types import SQUASH_MODES
from rpc.admission import FD_RESERVE, MAX_PER_ADDRESS, RECORD_TIMEOUT


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
    g.add_argument("--anon-uid", type=int, default=None, metavar="UID", help="default 65534")
    g.add_argument("--anon-gid", type=int, default=None, metavar="GID", help="default 65534")


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
    p.add_argument("--nfs-port", type=int, default=2049)
    p.add_argument("--mount-port", type=int, default=20048)
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
        default=90.0,
        metavar="SECONDS",
        help="after a restart, grant only lock reclaims for this long (90)",
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
    p.add_argument("--quota", type=_size_arg, default=UNSET, metavar="SIZE")
    _access_options(p, "unchanged unless given")
    p.set_defaults(func=cmd_vm_set)
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
