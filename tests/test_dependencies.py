"""pyproject.toml's runtime dependencies are what `prism`, `rpc` and `vrpc` import, no more and
no less; what only tests use (pyroute2 for the network namespaces) is in the `test` extra,
which scripts/setup.sh (and so .ci/run) installs."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"prism", "rpc", "vrpc"}


def requirement_names(specs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0].lower() for spec in specs}


def third_party_imports(*packages: str) -> set[str]:
    found: set[str] = set()
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - FIRST_PARTY - set(sys.stdlib_module_names) - {"__future__"}


def test_runtime_dependencies_are_what_the_product_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = requirement_names(project["dependencies"])
    assert runtime == third_party_imports("prism", "rpc", "vrpc")
    assert "pyroute2" in third_party_imports("tests")
    assert "pyroute2" in requirement_names(project["optional-dependencies"]["test"])
    assert "'.[test]'" in (ROOT / "scripts" / "setup.sh").read_text()
    assert "scripts/setup.sh" in (ROOT / ".ci" / "run").read_text()
