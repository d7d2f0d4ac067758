"""The store's rooms (`prism.store.store`'s docstring names them): each is a module that
opens with what it is responsible for, stays under ~700 lines, reaches other rooms only
through their public names, and imports only the rooms below it (data flows downward)."""

from __future__ import annotations

import ast
from pathlib import Path

STORE = Path(__file__).resolve().parent.parent / "prism" / "store"
ROOMS = [
    "schema",
    "txn",
    "layers",
    "tree",
    "links",
    "content",
    "quota",
    "perms",
    "posix",
    "names",
    "graft",
    "compose",
    "staging",
    "store",
    "check",
    "gc",
]
"""Bottom up: a room may import the rooms before it, never one after it."""
SUPPORT = {
    "records",
    "types",
    "sealed",
    "segments",
    "journal",
    "diskio",
    "writelock",
    "api",
    "epoch",
}
"""Modules under the rooms (formats, files, locks, the contract's types), importable by all."""
MAX_LINES = 700


def imported_rooms(tree: ast.Module) -> dict[str, set[str]]:
    """Room -> the names imported from it (a module imported whole: {"*"})."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "prism.store":
                for alias in node.names:
                    out.setdefault(alias.name, set()).add("*")
            elif node.module.startswith("prism.store."):
                room = node.module.removeprefix("prism.store.")
                out.setdefault(room, set()).update(a.name for a in node.names)
    return out


def test_every_module_is_a_room_or_support() -> None:
    modules = {p.stem for p in STORE.glob("*.py")} - {"__init__", "executor"}
    assert modules == set(ROOMS) | SUPPORT


def test_rooms_are_small_and_say_what_they_hold() -> None:
    for room in ROOMS:
        source = (STORE / f"{room}.py").read_text()
        assert len(source.splitlines()) <= MAX_LINES, f"{room}.py is two rooms"
        doc = ast.get_docstring(ast.parse(source))
        assert doc and len(doc.splitlines()) > 3, f"{room}.py has no theory of operation"


def test_data_flows_downward_through_public_names() -> None:
    for position, room in enumerate(ROOMS):
        tree = ast.parse((STORE / f"{room}.py").read_text())
        for other, names in imported_rooms(tree).items():
            assert other in SUPPORT or other in ROOMS[:position], f"{room} imports {other}"
            private = sorted(n for n in names if n.startswith("_"))
            assert not private, f"{room} imports private names of {other}: {private}"
        for node in ast.walk(tree):  # no reaching into another object's private members
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                owner = node.value
                assert isinstance(owner, ast.Name) and owner.id in ("self", "cls"), (
                    f"{room}.py:{node.lineno} reaches into .{node.attr}"
                )
