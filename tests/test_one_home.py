"""A constant has one home: each value below is written once in `prism`, `rpc` and `vrpc`, as
a named module-level constant, and every other place uses the name.

Not scanned: the files engineers are rewriting (`prism/nfs/types.py`, `prism/nfs/wire/`),
until they adopt `prism.limits`; tests and benchmarks, which may spell wire numbers out on
purpose.

Likewise `prism serve` has one launcher in tests and benchmarks: `tests/server_helpers.py`.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ONE_HOME = {
    "VM-name pattern": "[a-z0-9][a-z0-9_.-]",
    "NLINK_MAX": 65000,
    "NFS_PORT": 2049,
    "MOUNT_PORT": 20048,
    "NFS program": 100003,
    "MOUNT program": 100005,
    "NLM program": 100021,
    "NSM program": 100024,
    "grace seconds": 90.0,
}
NAMED_ONLY = {
    255: "NAME_MAX, MNTNAMLEN, MAX_MACHINENAME, MAX_REFUSAL...",
    100000: "the portmapper program, the store's MAX_DEPTH and SEAL_PROGRESS_EVERY",
}
"""Values several limits share by coincidence: each may have several homes, but is never
written inline."""


@functools.cache
def sources() -> tuple[tuple[str, ast.Module], ...]:
    found = []
    for package in ("prism", "rpc", "vrpc"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found.append((rel, ast.parse(path.read_text(), rel)))
    return tuple(found)


def literals(tree: ast.Module) -> Iterator[tuple[ast.Constant, bool]]:
    """Every constant in `tree`, and whether it is the whole value of a module-level
    assignment (`NAME = value`), i.e. a named constant's home."""
    homes: set[int] = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            homes.add(id(node.value))
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.JoinedStr):
            homes.update(id(v) for v in node.value.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
            yield node, id(node) in homes


def written(value: object, found: ast.Constant) -> bool:
    if isinstance(value, str):
        return isinstance(found.value, str) and value in found.value
    return type(found.value) is type(value) and found.value == value


@pytest.mark.parametrize("what", sorted(ONE_HOME))
def test_each_constant_is_written_once(what: str) -> None:
    value = ONE_HOME[what]
    places = [
        (rel, node.lineno, home)
        for rel, tree in sources()
        for node, home in literals(tree)
        if written(value, node)
    ]
    assert len(places) == 1 and places[0][2], f"{what} ({value!r}) written at {places}"


@pytest.mark.parametrize("value", sorted(NAMED_ONLY))
def test_shared_values_are_never_inline(value: int) -> None:
    inline = [
        (rel, node.lineno)
        for rel, tree in sources()
        for node, home in literals(tree)
        if written(value, node) and not home
    ]
    assert not inline, f"{value} written inline at {inline}: name it"


def docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_one_prism_serve_launcher() -> None:
    """Tests and benchmarks start `prism serve` only through `tests/server_helpers.py`: no
    other argv list holds "serve", and no command template with a `{prism}` placeholder
    runs it (docstrings aside)."""
    launchers = []
    for directory in ("tests", "benchmarks"):
        for path in sorted((ROOT / directory).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path == Path(__file__).resolve():
                continue
            tree = ast.parse(path.read_text(), rel)
            skip = docstrings(tree)
            for node in ast.walk(tree):
                if isinstance(node, (ast.List, ast.Tuple)):
                    words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                    if "serve" in words:
                        launchers.append((rel, node.lineno))
                elif (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and "{prism} serve" in node.value
                    and id(node) not in skip
                ):
                    launchers.append((rel, node.lineno))
    assert {rel for rel, _ in launchers} == {"tests/server_helpers.py"}, launchers
