"""Shared fixtures: real `prism serve` processes on free ports, and a small real filesystem."""

from __future__ import annotations

import os
import subprocess
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


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs of its own (a test may grow it with `mount -o remount,size=...`),
    unmounted after the test; skipped unless root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
