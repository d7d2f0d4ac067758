"""`prism serve`: start the server on a data directory (and the demo VM with --demo)."""

from __future__ import annotations

import argparse
import errno
import logging
from pathlib import Path

from prism.cli.values import UsageError
from prism.errors import StoreError
from prism.store import Store


def cmd_serve(args: argparse.Namespace) -> int:
    from prism.server import ServeOptions, run_event_loop, serve

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
    )
    if args.async_replies:
        logging.getLogger("prism.server").warning(
            "--async: metadata changes are acknowledged before they are durable; a crash"
            " may lose the last 0.25 s of them"
        )
    try:
        run_event_loop(serve(options))
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
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
