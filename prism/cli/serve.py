"""`prism serve`: start the server on a data directory (and the demo VM with --demo), tell a
service manager when it is ready (`prism.cli.systemd`), and reload on SIGHUP."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from prism.cli.systemd import configure_logging, monotonic_usec, sd_notify
from prism.cli.values import UsageError
from prism.errors import StoreError
from prism.store import Store

if TYPE_CHECKING:
    from prism.server import ServeOptions

log = logging.getLogger("prism.serve")


def serve_options(args: argparse.Namespace) -> ServeOptions:
    from prism.server import ServeOptions

    return ServeOptions(
        data=Path(args.data),
        bind=args.bind,
        nfs_port=args.nfs_port,
        mount_port=args.mount_port,
        portmap_port=args.portmap_port,
        portmap=not args.no_portmap,
        metrics=args.metrics,
        durable_replies=not args.async_replies,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        read_cache_mb=args.read_cache_mb,
        record_timeout=args.record_timeout,
        nlm_port=args.nlm_port,
        grace=args.grace,
        vrpc=not args.no_vrpc,
        vrpc_socket=Path(args.vrpc) if args.vrpc else None,
        vrpc_max_channels=args.vrpc_max_channels,
    )


def log_level(args: argparse.Namespace) -> str:
    return "debug" if args.verbose else str(args.log_level)


class Service:
    """The server's side of the service manager: readiness, and SIGHUP, which reads the
    command line and config file again, applies what can change while serving (log level,
    log file, reopened either way) and names what needs a restart."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.argv: list[str] = args.argv
        self.reparse: Callable[[list[str]], argparse.Namespace] = args.reparse
        self.running = serve_options(args)

    def ready(self, status: str) -> None:
        sd_notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def stopping(self) -> None:
        sd_notify("STOPPING=1")

    def reload(self) -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
        try:
            new = self.reparse(self.argv)
            configure_logging(log_level(new), new.log_file)
        except (UsageError, OSError) as exc:
            log.error("reload failed, still serving with the previous settings: %s", exc)
            sd_notify("READY=1")
            return
        after = serve_options(new)
        pending = [
            f.name for f in fields(after) if getattr(self.running, f.name) != getattr(after, f.name)
        ]
        log.info(
            "reloaded %s: log level %s, logging to %s",
            new.config_file or "(no config file)",
            log_level(new),
            new.log_file or "stderr",
        )
        if pending:
            log.warning(
                "changed settings need a restart to apply (systemctl restart prism): %s",
                ", ".join(pending),
            )
        sd_notify("READY=1")


def _check_addresses(options: ServeOptions) -> None:
    """Refuse, before anything starts, an address this host does not have."""
    wanted = [("--bind", options.bind)]
    if options.metrics:
        host = options.metrics.rpartition(":")[0].removeprefix("[").removesuffix("]")
        wanted.append(("--metrics", host or "0.0.0.0"))
    for flag, addr in wanted:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, 0))
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                raise UsageError(
                    f"{flag} {addr}: this host has no such address; give one of its "
                    "addresses (see `ip -br addr`), or 0.0.0.0 for all of them"
                ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from prism.server import run_event_loop, serve
    from vrpc.server import ListenError

    try:
        configure_logging(log_level(args), args.log_file)
    except OSError as exc:
        raise UsageError(
            f"cannot open --log-file {args.log_file}: {exc.strerror}; give a file in an existing"
            " directory the server may write, or leave --log-file out to log to stderr"
        ) from None
    options = serve_options(args)
    _check_addresses(options)
    if args.demo:
        ensure_demo(options.data)
    if args.async_replies:
        logging.getLogger("prism.server").warning(
            "--async: metadata changes are acknowledged before they are durable; a crash"
            " may lose the last 0.25 s of them"
        )
    try:
        run_event_loop(serve(options, Service(args)))
    except ListenError as exc:
        raise UsageError(f"cannot start: {exc}") from exc
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
            where = f" ({exc.filename})" if exc.filename else ""
            raise UsageError(f"cannot start: {exc.strerror}{where}") from exc
        raise UsageError(
            f"cannot listen ({exc.strerror}): is another NFS server running? "
            "pick other ports with --nfs-port/--mount-port/--nlm-port"
        ) from exc
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
