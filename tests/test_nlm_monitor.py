"""The status monitor's files (`prism.nlm.monitor`): state numbers, the monitored list,
private permissions, damaged files refused with a message, and `read_locks` ignoring a table
whose server is gone (as after a crash); and that the lock service never drops from that
list a client that holds a lock."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import pytest

import prism.nlm.service as service_module
from prism.nlm.locks import END, Owner
from prism.nlm.monitor import Monitor, MonitorStateError, read_locks
from prism.nlm.service import NlmService


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


class _HeldForget(Monitor):
    """A Monitor whose `forget` waits, in its worker thread, until the test lets it go."""

    def __init__(self, data: Path) -> None:
        super().__init__(data)
        self.forgetting = threading.Event()
        self.go = threading.Event()

    def forget(self, addresses: Iterable[str]) -> None:
        self.forgetting.set()
        self.go.wait(10)
        super().forget(addresses)


@pytest.mark.parametrize("forgetter", ["restart notice", "full list"])
def test_a_client_locking_while_it_is_being_forgotten_stays_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forgetter: str
) -> None:
    """The server forgets recorded clients that hold nothing: one that answered its restart
    notice, or every idle one when the list is full and a new client comes. A real client
    reclaims right after answering; if a LOCK finds the client still recorded and is
    granted while such a forget is being written, the forget must not land, or a crash then
    would leave a lock holder that nobody notifies."""
    host = "10.0.0.7"
    Monitor(tmp_path).add(host, "guest")  # it held a lock before the restart
    if forgetter == "full list":
        Monitor(tmp_path).add("10.0.0.8", "idle")
        monkeypatch.setattr(service_module, "MAX_CLIENTS", 2)
    monitor = _HeldForget(tmp_path)
    service = NlmService(cast(Any, None), monitor, grace=0, callback=lambda *a: b"")

    async def scenario() -> None:
        if forgetter == "restart notice":
            await service.start()  # notifies the client; it answers at once
        else:
            newcomer = asyncio.ensure_future(service._monitor("10.0.0.9", "new"))
        assert await asyncio.to_thread(monitor.forgetting.wait, 10)

        async def lock() -> None:  # what LOCK does: record the client, then grant
            await service._monitor(host, "guest")
            service.manager.lock("file", Owner(host, 1, b"o"), 0, END, True, now=0.0)

        locking = asyncio.ensure_future(lock())
        await asyncio.sleep(0.2)
        monitor.go.set()
        await locking
        if forgetter == "full list":
            await newcomer
        await service.stop()

    asyncio.run(scenario())
    assert host in service.manager.clients()
    assert host in Monitor(tmp_path).clients  # on disk: a crash now still notifies it
