"""The command line: the `prism` and `prism-clone` parsers, and the argument types that turn
an operator's text into values (each refusing bad input in one line).

Every option and subcommand carries help text (a test walks the tree); shell completion
(`prism completion`) and the serve config file's keys (`prism.cli.config`) are derived from
these parsers, so an option added here is completable and configurable with no other change.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import NoReturn

import prism
from prism.cli.completion import bash_script, zsh_script
from prism.cli.serve import cmd_serve
from prism.cli.storage import cmd_fsck, cmd_gc, cmd_import, cmd_locks, cmd_stats
from prism.cli.values import UsageError, parse_size
from prism.cli.vm import (
    UNSET,
    VM_LIST_FIELDS,
    cmd_clone,
    cmd_share,
    cmd_snapshot_create,
    cmd_snapshot_list,
    cmd_snapshot_rm,
    cmd_snapshot_rollback,
    cmd_unshare,
    cmd_vm_create,
    cmd_vm_list,
    cmd_vm_rename,
    cmd_vm_rm,
    cmd_vm_set,
    cmd_vm_show,
    cmd_vm_vrpc_guest,
    cmd_vm_vrpc_token,
)
from prism.importer import PROGRESS_INTERVAL_SECONDS, Exclude
from prism.limits import READ_CACHE_MB
from prism.nfs.const import MOUNT_PORT, NFS_PORT
from prism.nlm.monitor import DEFAULT_GRACE
from prism.store.types import NOBODY, SQUASH_MODES
from rpc.admission import FD_RESERVE, MAX_PER_ADDRESS, RECORD_TIMEOUT
from vrpc.control import MAX_CHANNELS, MAX_CHANNELS_PER_UID

LOG_LEVELS = ("debug", "info", "warning", "error")


class ParseError(UsageError):
    """The command line could not be parsed; `prog` is the (sub)command that refused it."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message}; see `{prog} --help`")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error every Prism command promises (no usage dump); the
    error is raised so that the caller prints it as text or, with --json, as JSON."""

    def error(self, message: str) -> NoReturn:
        raise ParseError(self.prog, message)


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


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number (0 or more), not {text!r}")
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
    writes = g.add_mutually_exclusive_group()
    writes.add_argument(
        "--read-only",
        dest="read_only",
        action="store_const",
        const=True,
        default=None,
        help="answer every call that would change the VM with NFS3ERR_ROFS (knfsd's ro);"
        " mounting and reading still work",
    )
    writes.add_argument(
        "--read-write",
        dest="read_only",
        action="store_const",
        const=False,
        help="let clients change the VM again (knfsd's rw)",
    )
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
    g.add_argument(
        "--anon-uid", type=int, default=None, metavar="UID", help=f"anonymous uid ({NOBODY})"
    )
    g.add_argument(
        "--anon-gid", type=int, default=None, metavar="GID", help=f"anonymous gid ({NOBODY})"
    )
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


def _exclude(text: str) -> Exclude:
    try:
        return Exclude.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"port {text!r} is out of range: give 1-65535, or 0 for any free port"
        )
    return value


def _address(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address: give one of this host's addresses "
            "(see `ip -br addr`), or 0.0.0.0 for all of them"
        ) from None
    return text


def _listen(text: str) -> str:
    """ADDR:PORT (ADDR may be empty for every address, [v6]:PORT for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no address: give ADDR:PORT, e.g. 127.0.0.1:{text} for this host "
            f"only or 0.0.0.0:{text} for every address"
        )
    _port(port)
    if host:
        _address(host.removeprefix("[").removesuffix("]"))
    return text


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    # SUPPRESS: absent unless given, so `prism --data D CMD` is not overwritten here
    p.add_argument("--data", default=argparse.SUPPRESS, metavar="DIR", help=DATA_HELP)
    if json_flag:
        p.add_argument(
            "--json", action="store_true", help="machine-readable output (errors too, on stderr)"
        )


DATA_HELP = (
    "data directory (default: $PRISM_DATA, else `data` in $PRISM_CONFIG or"
    " /etc/prism/prism.toml, else ./prism-data)"
)


def _serve_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve MOUNT, NFS and file locking over TCP and UDP",
        description="Serve the data directory's VMs. Every option can also be set in the"
        " config file (--config, $PRISM_CONFIG or /etc/prism/prism.toml): its keys are the long"
        " option names,"
        " e.g. nfs-port = 2049; options given here override it. SIGHUP reloads the config"
        " (log level, log file) and reopens the log file.",
    )
    _common(p, json_flag=False)
    p.add_argument(
        "--config",
        default=None,
        metavar="PATH",
        help="TOML file of serve options (default: $PRISM_CONFIG, else /etc/prism/prism.toml"
        " if it exists)",
    )
    p.add_argument(
        "--bind",
        type=_address,
        default="0.0.0.0",
        metavar="ADDR",
        help="address to listen on (0.0.0.0: all)",
    )
    p.add_argument(
        "--nfs-port",
        type=_port,
        default=NFS_PORT,
        metavar="N",
        help=f"NFS port ({NFS_PORT}; 0: any)",
    )
    p.add_argument(
        "--mount-port",
        type=_port,
        default=MOUNT_PORT,
        metavar="N",
        help=f"MOUNT port ({MOUNT_PORT}; 0: any)",
    )
    p.add_argument(
        "--portmap-port",
        type=_port,
        default=None,
        metavar="N",
        help="answer the portmapper here when no system rpcbind runs (default: 111)",
    )
    p.add_argument(
        "--no-portmap",
        action="store_true",
        help="neither register with rpcbind nor answer the portmapper ourselves",
    )
    p.add_argument(
        "--async",
        dest="async_replies",
        action="store_true",
        help="like knfsd's 'async' export option: answer metadata changes before they"
        " are on disk (a crash may lose the last 0.25 s of them); writes are answered"
        " UNSTABLE and COMMIT still waits. Faster on slow-fsync disks; off by default",
    )
    p.add_argument(
        "--metrics",
        type=_listen,
        default=None,
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (off by default)",
    )
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
        "--read-cache-mb",
        type=_whole_number,
        default=READ_CACHE_MB,
        metavar="N",
        help=f"MiB of verified file content kept in memory for small reads ({READ_CACHE_MB};"
        " 0: none): a chunk read once is then served without a disk read or a hash check",
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
        type=_port,
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
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="least severe log messages written (info); reloaded on SIGHUP",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages (--log-level debug)"
    )
    p.add_argument(
        "--log-file",
        default=None,
        metavar="PATH",
        help="append log messages here instead of stderr; reopened on SIGHUP (logrotate)",
    )
    p.set_defaults(func=cmd_serve, needs_store=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prism",
        description="Prism: an NFSv3 server for VMs, over a deduplicating copy-on-write store.",
        epilog="Run `prism COMMAND --help` for a command's options.",
    )
    parser.add_argument(
        "--version", action="version", version=f"prism {prism.__version__}", help="show version"
    )
    parser.add_argument("--data", default=argparse.SUPPRESS, metavar="DIR", help=DATA_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)

    vm = sub.add_parser("vm", help="create, list, show, change and remove VMs")
    vms = vm.add_subparsers(dest="vm_cmd", required=True, metavar="VM_COMMAND")
    p = vms.add_parser("create", help="create a VM filesystem exported at /NAME")
    _common(p)
    p.add_argument("name", help="the VM's name (a-z 0-9 _ . -, 1-63 characters)")
    p.add_argument("--client", action="append", metavar="CIDR", help=CLIENT_HELP)
    p.add_argument(
        "--quota", type=_size_arg, default=None, metavar="SIZE", help="e.g. 10G (default: none)"
    )
    _access_options(p, "default: read-write, secure, squash none")
    p.set_defaults(func=cmd_vm_create)
    p = vms.add_parser("list", help="list VMs")
    _common(p)
    p.add_argument(
        "-H",
        dest="scripted",
        action="store_true",
        help="scripted mode: no header, fields separated by one tab",
    )
    p.add_argument(
        "-p",
        dest="parsable",
        action="store_true",
        help="exact numbers (bytes, 'none' as -) instead of human-readable sizes",
    )
    p.add_argument(
        "-o",
        dest="fields",
        type=_fields,
        default=None,
        metavar="FIELD,...",
        help=f"columns to show, from {','.join(VM_LIST_FIELDS)} (default: "
        "name,export,clients,quota,used,files)",
    )
    p.set_defaults(func=cmd_vm_list)
    p = vms.add_parser(
        "show",
        help="show one VM's settings, usage, snapshots and shares",
        description="Show a VM's settings, shares, and the space of it and each snapshot. "
        "USED: the bytes of its files and symlink targets (what its quota counts; shared "
        "and deduplicated bytes count in full). UNIQUE: the stored bytes that only it "
        "references, which removing it (`prism vm rm`, which takes its snapshots; `prism "
        "snapshot rm` for a snapshot) and running `prism gc` would free. Unique bytes "
        "are counted from chunk refcounts over the chunk maps of the layers only it holds "
        "(not a walk of every file), which takes a while for a large VM with no snapshot "
        "or clone; on a terminal the progress is shown.",
    )
    _common(p)
    p.add_argument("name", help="the VM")
    p.set_defaults(func=cmd_vm_show)
    p = vms.add_parser("set", help="change a VM's clients, quota or access options")
    _common(p)
    p.add_argument("name", help="the VM")
    p.add_argument(
        "--client",
        action="append",
        metavar="CIDR",
        help=CLIENT_HELP + "; replaces the list (`none`: back to loopback only)",
    )
    p.add_argument(
        "--add-client",
        action="append",
        metavar="CIDR",
        help="add a client address range to the list (repeatable)",
    )
    p.add_argument(
        "--remove-client",
        action="append",
        metavar="CIDR",
        help="remove a client address range from the list (repeatable; must be listed)",
    )
    p.add_argument(
        "--quota", type=_size_arg, default=UNSET, metavar="SIZE", help="e.g. 10G, or none"
    )
    _access_options(p, "unchanged unless given")
    p.set_defaults(func=cmd_vm_set)
    p = vms.add_parser(
        "rename",
        help="rename a VM and its snapshots (export /NEW; clients' file handles keep working)",
    )
    _common(p)
    p.add_argument("old", metavar="OLD", help="the VM")
    p.add_argument("new", metavar="NEW", help="its new name (a-z 0-9 _ . -, 1-63 characters)")
    p.set_defaults(func=cmd_vm_rename)
    p = vms.add_parser("vrpc-token", help="print a VM's VRPC attach token (made at first use)")
    _common(p)
    p.add_argument("name", help="the VM")
    p.add_argument(
        "--rotate",
        action="store_true",
        help="replace it: channels attached with the old one are detached at their next call",
    )
    p.set_defaults(func=cmd_vm_vrpc_token)
    p = vms.add_parser(
        "vrpc-guest",
        help="print the QEMU arguments giving a guest its VM's VRPC ring (ivshmem-plain)",
        description="Ask the running server for NAME's guest channel (made at first use, bound"
        " to NAME: whoever holds its memory speaks for NAME only) and print the QEMU options"
        " that map it into a guest as PCI device 1af4:1110: the ring's file on tmpfs, which"
        " keeps its path across server restarts. Root or the server's user only; QEMU must"
        " run as either to open it.",
    )
    _common(p)
    p.add_argument("name", help="the VM")
    p.add_argument(
        "--vrpc", metavar="PATH", help="the server's VRPC control socket (default DATA/vrpc.sock)"
    )
    p.add_argument(
        "--owner",
        metavar="USER[:GROUP]",
        help="give the ring's file to the user QEMU runs as (e.g. libvirt-qemu; root only;"
        " kept across restarts; `none` gives it back to the server's user). That user can"
        " shrink the file and crash the server: give it to that VM's QEMU user only",
    )
    p.set_defaults(func=cmd_vm_vrpc_guest, needs_store=False)
    p = vms.add_parser("rm", help="remove a VM and its snapshots")
    _common(p)
    p.add_argument("name", help="the VM")
    p.add_argument(
        "--force", action="store_true", help="also remove the shares other VMs have of it"
    )
    p.set_defaults(func=cmd_vm_rm)

    snap = sub.add_parser("snapshot", help="read-only snapshots of a VM, exported at /VM@SNAP")
    snaps = snap.add_subparsers(dest="snap_cmd", required=True, metavar="SNAPSHOT_COMMAND")
    for name, func, with_snap, what in (
        ("create", cmd_snapshot_create, True, "take a read-only snapshot of a VM"),
        ("list", cmd_snapshot_list, False, "list a VM's snapshots"),
        ("rm", cmd_snapshot_rm, True, "remove a snapshot"),
        ("rollback", cmd_snapshot_rollback, True, "return a VM to a snapshot"),
    ):
        p = snaps.add_parser(name, help=what)
        _common(p)
        p.add_argument("vm", help="the VM")
        if with_snap:
            p.add_argument("snap", help="the snapshot's name (without VM@)")
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
    p.add_argument(
        "--repair",
        action="store_true",
        help="restore damaged chunks from other copies, remove debris, rebuild indexes",
    )
    p.set_defaults(func=cmd_fsck)
    p = sub.add_parser("gc", help="reclaim unreferenced content")
    _common(p)
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("share", help="show a live view of one VM's subtree inside another")
    _common(p)
    p.add_argument("source", metavar="SRC_VM:/path", help="the directory to share")
    p.add_argument("dest", metavar="DST_VM:/path", help="where it appears (parent must exist)")
    p.add_argument("--rw", action="store_true", help="let the destination write (default: ro)")
    p.set_defaults(func=cmd_share)
    p = sub.add_parser("unshare", help="remove a share")
    _common(p)
    p.add_argument("dest", metavar="DST_VM:/path", help="where the share appears")
    p.set_defaults(func=cmd_unshare)

    p = sub.add_parser(
        "import",
        help="copy a host directory tree into a VM",
        description="Copy a host directory tree into a VM, all or nothing, deduplicating as it"
        " goes. A pre-scan counts what is to copy, so the progress shows a percentage and an"
        " ETA: a bar on a terminal, else one line on stderr every --progress-interval seconds.",
    )
    _common(p)
    p.add_argument("vm", help="the VM to fill")
    p.add_argument("src", help="the host directory to copy")
    p.add_argument("--to", default="/", metavar="PATH", help="where in the VM (default: its root)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        type=_exclude,
        metavar="PATTERN",
        help="leave out what PATTERN matches (repeatable; shell wildcards * ? [...]). Like tar"
        " and rsync: a PATTERN without '/' matches entry NAMES at any depth ('*.log', '.cache');"
        " one with '/' matches the PATH from SRC's top, * never matching '/' ('/var/cache',"
        " 'home/*/.cache'; the leading '/' is optional); a trailing '/' matches directories"
        " only. An excluded directory is not entered",
    )
    p.add_argument(
        "--one-file-system",
        action="store_true",
        help="stay on SRC's filesystem: enter no mount point (another device, as cp -x and"
        " rsync -x see it, or a bind mount that /proc/self/mountinfo names); a mounted"
        " directory becomes an empty one, a mounted file is left out",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="only count what would be imported (entries and bytes) and say whether it fits"
        " the VM's quota; nothing is written",
    )
    p.add_argument(
        "--progress-interval",
        type=_seconds,
        default=PROGRESS_INTERVAL_SECONDS,
        metavar="SECONDS",
        help="when stderr is not a terminal (or with --json), print a progress line every"
        f" SECONDS (default: {PROGRESS_INTERVAL_SECONDS:g}; 0: none)",
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("completion", help="print a shell completion script")
    p.add_argument(
        "shell",
        choices=("bash", "zsh"),
        help="bash: `source <(prism completion bash)`; zsh: put it in $fpath as _prism",
    )
    p.set_defaults(func=cmd_completion, needs_store=False)
    return parser


CLIENT_HELP = "client addresses allowed to mount it (repeatable; default, or `none`: loopback only)"


def _fields(text: str) -> list[str]:
    fields = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in fields if f not in VM_LIST_FIELDS]
    if unknown or not fields:
        raise argparse.ArgumentTypeError(
            f"unknown field {', '.join(unknown) or text!r}: choose from " + ",".join(VM_LIST_FIELDS)
        )
    return fields


def build_clone_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="prism-clone",
        description="Compose a VM filesystem from whole VMs, snapshots or subtrees, instantly.",
        epilog="SOURCE is VM, VM@SNAP, VM:/path, VM:/path=/dest or VM@SNAP:/path=/dest; later "
        "sources are laid over earlier ones.",
    )
    p.add_argument(
        "--version", action="version", version=f"prism {prism.__version__}", help="show version"
    )
    _common(p)
    p.add_argument("new", metavar="NEW", help="the VM to create (or add to, with --into)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="what to lay in it, in order")
    p.add_argument("--client", action="append", metavar="CIDR", help=CLIENT_HELP)
    p.add_argument(
        "--quota", type=_size_arg, default=None, metavar="SIZE", help="e.g. 10G (default: none)"
    )
    p.add_argument("--into", action="store_true", help="add to an existing VM")
    p.add_argument(
        "--replace",
        action="store_true",
        help="with --into: replace destinations that exist (their contents are removed)",
    )
    p.set_defaults(func=cmd_clone)
    return p


def cmd_completion(args: argparse.Namespace) -> int:
    script = bash_script if args.shell == "bash" else zsh_script
    print(script(build_parser()), end="")
    return 0
