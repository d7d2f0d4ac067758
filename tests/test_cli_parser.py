"""The command line itself: help for everything, --version, --data on either side of the
subcommand, shell completion generated from the parser (run in a real bash), and the
scriptable `prism vm list` (-H, -p, -o) with columns as wide as their content.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prism
from prism.cli.completion import bash_script, zsh_script
from prism.cli.parser import build_clone_parser, build_parser
from tests.op_helpers import env, ok, prism_json, run_clone, run_prism


def walk(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str, str, str | None]]:
    """(command path, option or positional or subcommand, its help) for the whole tree."""
    out: list[tuple[str, str, str | None]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                out.append((path, f"subcommand {name}", helps.get(name)))
                out += walk(child, f"{path} {name}".strip())
        else:
            name = "/".join(action.option_strings) or f"positional {action.dest}"
            out.append((path, name, action.help))
    return out


@pytest.mark.parametrize("build", [build_parser, build_clone_parser])
def test_every_option_and_subcommand_has_help(build: object) -> None:
    entries = walk(build())  # type: ignore[operator]
    assert len(entries) > 60 or build is build_clone_parser
    missing = [
        f"{path or '(top)'}: {name}"
        for path, name, text in entries
        if not text or text == argparse.SUPPRESS
    ]
    assert not missing, missing


def test_version() -> None:
    for proc in (run_prism(None, "--version"), run_clone(None, "--version")):
        assert ok(proc).strip() == f"prism {prism.__version__}"


def test_data_before_or_after_the_subcommand(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run_prism(None, "--data", str(a), "vm", "create", "first"))
    ok(run_prism(None, "vm", "create", "second", "--data", str(b)))
    assert [v["name"] for v in prism_json(a, "vm", "list")] == ["first"]
    before = ok(run_prism(None, "--data", str(b), "vm", "list", "--json"))
    assert '"second"' in before
    # both given: the one nearer the command wins, as a subcommand's option should
    assert (
        ok(run_prism(None, "--data", str(b), "vm", "list", "--data", str(a))).split()[6] == "first"
    )


# -- completion ------------------------------------------------------------------------------


def complete(script: str, line: str) -> list[str]:
    """What bash offers after typing `line` (the last word is the one being completed)."""
    words = line.split(" ")
    program = (
        script
        + f'\nprism() {{ {sys.executable} -m prism "$@"; }}'  # VM names come from prism
        + "\nCOMP_WORDS=("
        + " ".join(f"'{w}'" for w in words)
        + f")\nCOMP_CWORD={len(words) - 1}\n_prism\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    out = subprocess.run(
        ["bash", "--norc", "-c", program], capture_output=True, text=True, check=True, env=env()
    )
    return [w for w in out.stdout.splitlines() if w]


def test_bash_completion_follows_the_parser(tmp_path: Path) -> None:
    script = ok(run_prism(None, "completion", "bash"))
    assert script == bash_script(build_parser())
    assert set(complete(script, "prism ")) >= {"serve", "vm", "snapshot", "completion", "import"}
    assert complete(script, "prism vm c") == ["create"]
    assert complete(script, "prism sn") == ["snapshot"]
    assert set(complete(script, "prism snapshot ")) == {"create", "list", "rm", "rollback"}
    assert "--max-connections-per-address" in complete(script, "prism serve --max")
    assert complete(script, "prism vm create web --sq") == ["--squash"]
    assert complete(script, "prism vm create web --squash ") == ["none", "root", "all"]
    assert complete(script, "prism serve --log-level w") == ["warning"]
    # an option's value is skipped when finding the command: 'vm' here is a directory
    assert complete(script, "prism --data vm sn") == ["snapshot"]
    (tmp_path / "prism.toml").write_text("")
    assert complete(script, f"prism serve --config {tmp_path}/pri") == [f"{tmp_path}/prism.toml"]
    assert complete(script, "prism completion ") == ["bash", "zsh"]

    # a VM argument completes to the VMs of the store named on the line
    data = tmp_path / "data"
    for vm in ("web1", "web2", "db"):
        ok(run_prism(data, "vm", "create", vm))
    assert complete(script, f"prism --data {data} vm show w") == ["web1", "web2"]
    assert complete(script, f"prism snapshot create --data {data} ") == ["db", "web1", "web2"]
    assert complete(script, f"prism snapshot create --data {data} db ") == []  # SNAP: new
    assert complete(script, f"prism vm create --data {data} ") == []  # a new name


def test_zsh_completion_covers_the_parser() -> None:
    script = ok(run_prism(None, "completion", "zsh"))
    assert script == zsh_script(build_parser())
    assert script.startswith("#compdef prism\n")
    assert "'vm create') reply=(" in script and "'--squash:callers mapped" in script
    assert "'vm create|--squash') reply=(none root all)" in script
    assert "'serve|--config') reply=(@files)" in script
    assert "'vm show' | 'vm set' | " in script and "| 'vm rm' |" in script  # a VM comes first


# The completion system's builtins, stood in for so that zsh -f can run _prism: each prints
# the candidates it was given (the real ones filter them by the typed prefix).
ZSH_HARNESS = """
compdef() {{ : }}
_describe() {{ local name=$4; print -l -- ${{${{(P)name}}%%:*}} }}
compadd() {{ local name=$2; print -l -- ${{(P)name}} }}
_files() {{ print FILES }}
prism() {{ {python} -m prism "$@" }}
t() {{ words=("$@"); CURRENT=${{#words}}; PREFIX=${{words[-1]}}; _prism }}
t {line}
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (scripts/setup.sh)")
def test_zsh_completion_runs(tmp_path: Path) -> None:
    script = tmp_path / "_prism"
    script.write_text(zsh_script(build_parser()))
    subprocess.run(["zsh", "-n", str(script)], check=True)
    data = tmp_path / "data"
    ok(run_prism(data, "vm", "create", "web"))

    def offered(line: str) -> list[str]:
        harness = f"source {script}\n" + ZSH_HARNESS.format(python=sys.executable, line=line)
        out = subprocess.run(
            ["zsh", "-f", "-c", harness], capture_output=True, text=True, check=True, env=env()
        )
        return out.stdout.split()

    assert {"serve", "vm", "snapshot", "completion"} <= set(offered("prism ''"))
    assert set(offered("prism vm c")) >= {"create", "list", "show", "set", "rm"}
    assert offered("prism vm create web --squash ''") == ["none", "root", "all"]
    assert offered("prism serve --config ''") == ["FILES"]
    assert "--max-connections-per-address" in offered("prism serve --ma")
    assert offered(f"prism --data {data} vm show ''") == ["web"]


# -- vm list ---------------------------------------------------------------------------------


def test_vm_list_columns_fit_and_scripted_output(tmp_path: Path) -> None:
    data = tmp_path / "data"
    long_name = "a-very-long-vm-name-that-is-wider-than-any-default-column-x"
    cidrs = [f"10.{i}.0.0/16" for i in range(8)]
    ok(run_prism(data, "vm", "create", long_name, *[a for c in cidrs for a in ("--client", c)]))
    ok(run_prism(data, "vm", "create", "db", "--quota", "10G"))

    lines = ok(run_prism(data, "vm", "list")).splitlines()
    header = lines[0]
    assert header.split() == ["NAME", "EXPORT", "CLIENTS", "QUOTA", "USED", "FILES"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows[long_name].split()[2] == ",".join(cidrs)  # nothing cut or run together
    # columns line up: each header word starts where its column starts in every row
    clients_at, quota_end = header.index("CLIENTS"), header.index("QUOTA") + len("QUOTA")
    for line in rows.values():
        assert line[clients_at - 2 : clients_at] == "  " and line[clients_at] != " "
        assert line[quota_end - 1] != " " and line[quota_end : quota_end + 2] == "  "

    scripted = ok(run_prism(data, "vm", "list", "-H", "-p", "-o", "name,quota,clients,secure"))
    assert scripted.splitlines() == [
        f"{long_name}\t-\t{','.join(cidrs)}\tsecure",
        f"db\t{10 << 30}\tloopback\tsecure",
    ]
    assert ok(run_prism(data, "vm", "list", "-H", "-o", "quota")).splitlines() == [
        "none",
        "10.0 GiB",
    ]
    bad = run_prism(data, "vm", "list", "-o", "name,colour")
    assert bad.returncode == 2 and "unknown field 'colour': choose from name," in bad.stderr
    empty = tmp_path / "empty"
    ok(run_prism(empty, "vm", "create", "x"))
    ok(run_prism(empty, "vm", "rm", "x"))
    assert ok(run_prism(empty, "vm", "list", "-H")) == ""
