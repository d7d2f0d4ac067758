"""Crash test: SIGKILL a process that is changing the store, at random moments, many times.

The child (`store_crash_child.py`) reports, before and after each atomic operation, the
whole expected state. After each kill the parent reopens the store and requires exactly the
last reported-durable state, or the state of the one operation that was in flight; and, when
the checker exists, an fsck with no errors (debris such as unreferenced segment bytes is
allowed: the docs say a crash can leave it).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prism.store import Store

sys.path.insert(0, str(Path(__file__).parent))
import store_crash_child as child

try:
    from prism.store import check, gc
except ImportError:  # the checker is being written alongside; run without it meanwhile
    check = gc = None  # type: ignore[assignment]

CHILD = Path(__file__).with_name("store_crash_child.py")
REPO = Path(__file__).resolve().parent.parent
KILLS = 25
TIME_BUDGET = 35.0  # seconds per mode; stop killing early rather than overrun


def spawn(data: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(data), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != b"READY\n":
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"child did not start: {line!r}\n{err.decode()}")


def parse(output: bytes) -> list[tuple[str, dict]]:
    """Complete lines only: a line cut short by the kill was never reported."""
    events = []
    for line in output.split(b"\n")[:-1]:
        kind, _, payload = line.partition(b" ")
        events.append((kind.decode(), json.loads(payload)))
    return events


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["commit", "journal"])
def test_sigkill_at_random_moments_loses_nothing_durable(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="prism.store")
    seed = int(os.environ.get("PRISM_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    data = tmp_path / "data"
    setup = spawn(data, "setup")
    _, err = setup.communicate(timeout=30)
    assert setup.returncode == 0, err.decode()
    with Store.open(data) as store:
        durable, _ = child.read_state(store)
    started = time.monotonic()
    total_ops = 0
    in_flight_seen = 0
    for run in range(KILLS):
        if time.monotonic() - started > TIME_BUDGET:
            break
        log = tmp_path / f"run{run}.log"
        proc = spawn(data, str(rng.randrange(1 << 30)), str(log), mode)
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.2))  # sometimes while it opens the store
        else:
            wait_ready(proc)
            time.sleep(rng.uniform(0.02, 0.3))
        proc.send_signal(signal.SIGKILL)
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"child died on its own:\n{err.decode()}"
        pending = None
        for kind, state in parse(log.read_bytes() if log.exists() else b""):
            if kind == "BEGIN":
                pending = state
            else:
                assert kind == "DONE" and state == pending
                durable, pending = state, None
                total_ops += 1
        with Store.open(data) as store:
            actual, _ = child.read_state(store)
            context = f"(seed {seed}, run {run})"
            if actual != durable:
                assert pending is not None, f"durable state lost {context}"
                assert actual == pending, f"store is in neither allowed state {context}"
                in_flight_seen += 1
            durable = actual
            if check is not None:
                report = check.fsck(store)
                assert report.errors == [], f"fsck after a kill {context}: {report.errors}"
    print(
        f"crash test ({mode}): seed {seed}, {total_ops} ops, {in_flight_seen} in-flight ops applied"
    )
    assert total_ops > 0, "the child never completed an operation"
    replays = sum("replayed" in r.getMessage() for r in caplog.records)
    if mode == "journal":
        assert replays > 0, "no kill ever left journal records to replay"
    else:
        assert replays == 0
    with Store.open(data) as store:
        assert child.read_state(store)[0] == durable
        if check is not None:
            gc.gc(store)
            assert check.fsck(store).errors == []
            assert child.read_state(store)[0] == durable
