"""The `prism` and `prism-clone` commands.

Every command takes --data DIR, before or after the subcommand (default $PRISM_DATA, else
`data` in the config file, else ./prism-data), works whether or
not `prism serve` runs on the same data (LMDB serialises writers, and the server reads the
namespace table on every call, so changes reach mounted clients at once), prints
human-readable output or --json, and on bad input exits 2 with one line on stderr saying
what to do (with --json, that line is a JSON object: error, command, exit_status).
Each change is one store transaction: it happens completely or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from prism.cli.config import apply_config, configured_data, subparser
from prism.cli.parser import ParseError, build_clone_parser, build_parser
from prism.cli.values import UsageError
from prism.cli.vm import cmd_vm_create
from prism.errors import StoreError
from prism.store import Store

__all__ = ["build_clone_parser", "build_parser", "clone_main", "main", "parse_command_line"]


def default_data() -> Path:
    """Where the store is when --data is not given: $PRISM_DATA, else the config file's
    `data` (`prism.cli.config`), else ./prism-data."""
    env = os.environ.get("PRISM_DATA")
    return Path(env or configured_data(subparser(build_parser(), "serve")) or "./prism-data")


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """`prism ARGV` parsed; for `serve`, completed from its config file (`prism.cli.config`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv)
    if args.command == "serve":
        args.config_file = apply_config(args, argv, parser, build_parser())
        args.reparse = parse_command_line  # SIGHUP reads the command line and config again
    return args


def _fail(prog: str, message: str, status: int, as_json: bool) -> int:
    """The one line every failure prints on stderr: text, or with --json a JSON object."""
    if as_json:
        line = json.dumps({"error": message, "command": prog, "exit_status": status})
    else:
        line = f"{prog}: error: {message}"
    print(line, file=sys.stderr)
    return status


def _missing_store(data: Path) -> str:
    return (
        f"no Prism store at {data.absolute()}: give the data directory with --data DIR or "
        "$PRISM_DATA, or create one with `prism vm create NAME`"
    )


def _run(
    parse: Callable[[Sequence[str]], argparse.Namespace], prog: str, argv: Sequence[str] | None
) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        args = parse(argv)
    except ParseError as exc:
        return _fail(exc.prog, str(exc), 2, as_json)
    except UsageError as exc:
        return _fail(prog, str(exc), 2, as_json)
    try:
        if getattr(args, "data", None) is None:
            args.data = str(default_data())
        if not getattr(args, "needs_store", True):
            return int(args.func(args))
        create = args.func in (cmd_vm_create,)
        if not create and not (Path(args.data) / "meta").exists():
            raise UsageError(_missing_store(Path(args.data)))
        try:
            store = Store.open(args.data, create=create)
        except OSError as exc:  # the directory itself: absent parent, not a directory...
            raise UsageError(
                f"cannot open the Prism store at {Path(args.data).absolute()}: "
                f"{exc.strerror or exc}; give --data DIR or $PRISM_DATA a directory this "
                "user may create and write"
            ) from None
        with store:
            return int(args.func(args, store))
    except (UsageError, StoreError) as exc:
        return _fail(prog, str(exc), 2, as_json)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(prog, f"{where}{exc.strerror or exc}", 1, as_json)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted; nothing half-done was committed", 130, as_json)


def main(argv: Sequence[str] | None = None) -> int:
    return _run(parse_command_line, "prism", argv)


def clone_main(argv: Sequence[str] | None = None) -> int:
    return _run(build_clone_parser().parse_args, "prism-clone", argv)
