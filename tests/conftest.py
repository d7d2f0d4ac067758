"""Shared fixtures for the server tests: real `prism serve` processes on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_helpers import PrismProcess, running_server


@pytest.fixture
def prism_server(tmp_path: Path) -> Iterator[PrismProcess]:
    """A `prism serve` (no portmapper) on a fresh data dir with VM "vm", for one test.

    Teardown asserts that it stops cleanly on SIGTERM (exit 0, "stopped cleanly").
    """
    with running_server(tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def prism_module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProcess]:
    """Like `prism_server`, shared by the tests of one module (use distinct names)."""
    with running_server(tmp_path_factory.mktemp("prism")) as server:
        yield server
