"""The `prism serve` config file: TOML whose keys are serve's long option names.

    # /etc/prism/prism.toml
    data = "/var/lib/prism"
    nfs-port = 2049
    metrics = "127.0.0.1:9100"
    log-level = "warning"
    async = false

The file is `--config PATH`, else $PRISM_CONFIG, else /etc/prism/prism.toml when it exists.
Its `data` is also where every other command finds the store when neither --data nor
$PRISM_DATA is given, so `prism vm list` on the server's host needs no flag.

A value is checked by the same parser function as its option (a port's range, an address),
a flag takes true/false, and a key that is no serve option is an error naming it. Of
options that exclude each other (--vrpc PATH / --no-vrpc) the file may set one, and one
given on the command line overrides the file's choice. Precedence, highest first: the
command line (and $PRISM_DATA for `data`), the file, the option's default. The keys are
derived from the serve parser, so every serve option is configurable.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prism.cli.values import UsageError

DEFAULT_CONFIG = Path("/etc/prism/prism.toml")


def default_config() -> Path:
    """$PRISM_CONFIG, else /etc/prism/prism.toml (read only when it exists)."""
    return Path(os.environ.get("PRISM_CONFIG") or DEFAULT_CONFIG)


NOT_CONFIGURABLE = frozenset({"help", "config"})


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subcommand parser `name` of `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]  # type: ignore[no-any-return]
    raise KeyError(name)


def config_options(serve: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> the serve option it sets (a key is the option's long name)."""
    out: dict[str, argparse.Action] = {}
    for action in serve._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and longs[0][2:] not in NOT_CONFIGURABLE:
            out[longs[0][2:]] = action
    return out


def _value(path: Path, key: str, action: argparse.Action, raw: Any) -> Any:
    where = f"{path}: {key}"
    if action.nargs == 0:  # a flag
        if not isinstance(raw, bool):
            raise UsageError(f"{where} is a flag: write {key} = true or {key} = false")
        return raw if action.const is not False else not raw
    if isinstance(raw, bool | dict | list):
        raise UsageError(f"{where}: expected a value like {action.metavar or 'TEXT'}, not {raw!r}")
    text = str(raw)
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UsageError(f"{where}: {raw!r} is not one of {choices}")
    return value


def read_config(path: Path, serve: argparse.ArgumentParser) -> dict[str, Any]:
    """The file's settings as {dest: value}, each checked as its option would be."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}; fix the file") from None
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    options = config_options(serve)
    settings: dict[str, Any] = {}
    for key, raw in doc.items():
        action = options.get(key)
        if action is None:
            near = difflib.get_close_matches(key.replace("_", "-"), options, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise UsageError(
                f"{path}: unknown key {key!r}; {hint}the keys are `prism serve`'s long options"
                " without '--' (see `prism serve --help`)"
            )
        settings[action.dest] = _value(path, key, action, raw)
    for group in exclusive_groups(serve):
        both = [f"{k}" for k, a in options.items() if a in group and a.dest in settings]
        if len(both) > 1:
            raise UsageError(f"{path}: {' and '.join(both)} exclude each other; keep one")
    return settings


def exclusive_groups(parser: argparse.ArgumentParser) -> list[list[argparse.Action]]:
    """The parser's sets of options of which only one may be given (--vrpc / --no-vrpc)."""
    return [list(g._group_actions) for g in parser._mutually_exclusive_groups]


def given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests `argv` sets explicitly. `parser` must be a fresh parser (its defaults are
    suppressed here, so that only what the command line gives remains)."""
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
        p._defaults.clear()
    return set(vars(parser.parse_args(argv)))


def apply_config(
    args: argparse.Namespace,
    argv: Sequence[str],
    parser: argparse.ArgumentParser,
    fresh: argparse.ArgumentParser,
) -> Path | None:
    """Fill `args` (parsed from `argv` by `parser`) with the config file's settings where the
    command line left an option unset. `fresh` is an unused copy of `parser`. Returns the
    file read, or None when there is none."""
    path = Path(args.config) if args.config else default_config()
    if args.config is None and not path.exists():
        return None
    settings = read_config(path, subparser(parser, "serve"))
    given = given_on_command_line(fresh, argv)
    if os.environ.get("PRISM_DATA"):
        given.add("data")  # the environment is the caller's choice too, as for every command
    for group in exclusive_groups(subparser(parser, "serve")):
        if any(a.dest in given for a in group):  # the command line chose one of them
            given |= {a.dest for a in group}
    for dest, value in settings.items():
        if dest not in given:
            setattr(args, dest, value)
    return path


def configured_data(serve: argparse.ArgumentParser) -> str | None:
    """The default config file's `data`, for commands other than serve; None without one."""
    path = default_config()
    if not path.exists():
        return None
    data = read_config(path, serve).get("data")
    return None if data is None else str(data)
