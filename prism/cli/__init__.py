"""The `prism` and `prism-clone` commands.

Every command takes --data DIR (default $PRISM_DATA, else ./prism-data), works whether or
not `prism serve` runs on the same data (LMDB serialises writers, and the server reads the
namespace table on every call, so changes reach mounted clients at once), prints
human-readable output or --json, and on bad input exits 2 with one line saying what to do.
Each change is one store transaction: it happens completely or not at all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prism.cli.parser import build_clone_parser, build_parser
from prism.cli.values import UsageError, default_data
from prism.cli.vm import cmd_vm_create
from prism.errors import StoreError
from prism.store import Store

__all__ = ["build_clone_parser", "build_parser", "clone_main", "main"]


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
