"""The status monitor's files (`prism.nlm.monitor`): state numbers, the monitored list,
private permissions, damaged files refused with a message, and `read_locks` ignoring a table
whose server is gone (as after a crash)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prism.nlm.monitor import Monitor, MonitorStateError, read_locks


def test_state_moves_to_the_next_odd_number_and_clients_persist(tmp_path: Path) -> None:
    m = Monitor(tmp_path)
    assert m.restart() == 1
    assert m.add("10.0.0.1", "guest1") and not m.add("10.0.0.1", "guest1")
    m2 = Monitor(tmp_path)  # as a restarted server reads it
    assert m2.state == 1 and list(m2.clients) == ["10.0.0.1"]
    assert m2.clients["10.0.0.1"].name == "guest1"
    assert m2.restart() == 3
    (tmp_path / "nlm" / "state").write_text("4\n")  # an even number (another implementation's)
    assert Monitor(tmp_path).restart() == 7
    m2.forget(["10.0.0.1", "10.9.9.9"])
    assert Monitor(tmp_path).clients == {}
    assert (tmp_path / "nlm").stat().st_mode & 0o777 == 0o700
    for name in ("state", "monitored"):
        assert (tmp_path / "nlm" / name).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "nlm").iterdir()) == ["monitored", "state"]


def test_damaged_files_are_refused_with_what_to_do(tmp_path: Path) -> None:
    Monitor(tmp_path).add("10.0.0.1", "g")
    (tmp_path / "nlm" / "monitored").write_text("{not json")
    with pytest.raises(MonitorStateError, match="remove that directory"):
        Monitor(tmp_path)


def test_read_locks_ignores_a_table_whose_server_is_gone(tmp_path: Path) -> None:
    assert read_locks(tmp_path) is None
    (tmp_path / "nlm").mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    table = {"pid": int(dead.stdout), "state": 1, "grace_left": 0, "locks": [{"vm": "a"}]}
    (tmp_path / "nlm" / "locks.json").write_text(json.dumps(table))
    assert read_locks(tmp_path) is None
    table["pid"] = os.getpid()
    (tmp_path / "nlm" / "locks.json").write_text(json.dumps(table))
    assert read_locks(tmp_path) == table


def test_concurrent_changes_from_threads_all_land(tmp_path: Path) -> None:
    """The server adds and forgets clients from worker threads at once (a LOCK's record
    while a restart notice's forget runs): no write may fail or be lost."""
    m = Monitor(tmp_path)
    m.add("keep", "k")

    def churn(i: int) -> None:
        for j in range(30):
            m.add(f"10.{i}.0.{j}", "g")
            m.forget([f"10.{i}.0.{j}"])
        m.add(f"10.{i}.1.1", "g")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(churn, range(8)))
    want = {"keep", *(f"10.{i}.1.1" for i in range(8))}
    assert set(m.clients) == want
    assert set(Monitor(tmp_path).clients) == want
