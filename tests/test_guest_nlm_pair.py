"""File locking between two Linux guests, each a client of its own, through `prism share`.

Two QEMU guests on a `GuestLan` (tap devices in a network namespace, addresses 10.77.0.11
and .12, hostnames guest1 and guest2) mount the stock way, no `nolock`, with rpcbind and
rpc.statd running: guest 1 mounts `SERVER:/a`, guest 2 `SERVER:/b`, and `prism share
a:/shared b:/shared --rw` puts one directory in both. The server runs in the namespace
with its own portmapper and a short `--grace`; the test process reaches it over the
namespace's veth (its NLM client is a third client, bound to VM a). The pair is booted once
for the module (TCG: boot and setup take some seconds per guest) and the tests run in order:

* contention, for fcntl and for flock: guest 2's non-blocking attempts fail with EAGAIN
  while guest 1 holds the lock, and its blocking attempt returns within `GRANT_BOUND`
  seconds of guest 1's release, which only the server's GRANTED callback can do (the
  kernel's own retry of a blocked LOCK comes after 30 s); a blocking attempt killed while
  it waits is cancelled (the kernel's CANCEL) and leaves nothing held;
* server restart (clean, and kill -9): SM_NOTIFY reaches guest 1's statd and its kernel
  reclaims its lock within the grace period; meanwhile a new lock is refused (the test's
  client gets DENIED_GRACE_PERIOD; guest 2's kernel keeps retrying until grace ends), after
  grace the test's client is granted, and guest 2 finds the reclaimed lock held; guest 2's
  wait, begun before the restart, is taken up again after grace and granted at the release;
* a guest that vanishes (QEMU killed) while holding a lock: `prism locks` keeps showing its
  lock while guest 1 waits for it; when the guest boots again (its /var/lib/nfs carried
  over, as a disk would) its sm-notify tells the server, which releases the lock and grants
  it to guest 1 by GRANTED callback.

Timings are printed (`-s`) and bounded by the assertions.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from prism.nlm.client import NlmClient
from prism.nlm.types import NlmStat
from tests.guest.harness import GuestSession, start_all
from tests.guest.lan import SERVER_ADDR, GuestLan
from tests.guest.locking import LOCK_SETUP, NFS_STATE_DIR, NFS_STATE_TAR, lock_files, missing_tools
from tests.netns import require_netns
from tests.server_helpers import PrismProcess, prism_cli

pytestmark = [
    pytest.mark.guest,
    pytest.mark.netns,
    pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools())),
]

GRACE = 20.0
GRANT_BOUND = 5.0
"""Seconds from the holder's release to the waiter's return: a GRANTED callback takes well
under one; without it the waiter's kernel asks again only after 30 s."""
WAIT_BEFORE_RELEASE = 3.0
"""Seconds a blocking attempt is left waiting before the holder releases."""
POLL = 0.2
VMS = ("a", "b")
FILES = ("fcntl", "flock", "cancel", "reclaim", "other", "vanish")
EAGAIN_EXIT = 11  # lockf's exit status when a non-blocking attempt finds the lock taken


def timing(what: str, seconds: float) -> None:
    print(f"\n[timing] {what}: {seconds:.2f} s", file=sys.stderr)


@dataclass
class Pair:
    lan: GuestLan
    server: PrismProcess
    guests: tuple[GuestSession, GuestSession]
    setups: tuple[str, str]

    def locks(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(self.server.cli("locks", "--json").stdout)
        return rows

    def nlm_port(self) -> int:
        return int(self.server.ready_line.split(" nlm ")[1].split()[0])

    def address(self, i: int) -> str:
        return self.lan.guest_net(i).address


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll `check` until true; seconds it took. Fails after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(POLL)
    return time.monotonic() - started


def hold(guest: GuestSession, path: str, *flags: str) -> None:
    """Start a process in `guest` that takes a lock on `path` and holds it until killed."""
    opts = " ".join(flags)
    guest.check(f"lockf {opts} {path} 3600 > /tmp/hold.out 2>&1 & echo $! > /tmp/hold.pid")
    wait_for(f"{guest.name} locks {path}", lambda: "locked" in guest.check("cat /tmp/hold.out"), 30)


def release(guest: GuestSession) -> None:
    """End the holder started by `hold` (its exit releases the lock)."""
    guest.check("kill $(cat /tmp/hold.pid); wait $(cat /tmp/hold.pid); true")


def start_waiter(guest: GuestSession, path: str, *flags: str) -> None:
    opts = " ".join(flags)
    guest.check(f"lockf {opts} {path} > /tmp/wait.out 2>&1 & echo $! > /tmp/wait.pid")


def waiter_done(guest: GuestSession) -> bool:
    return guest.run("kill -0 $(cat /tmp/wait.pid) 2>/dev/null").exit_code != 0


def join_waiter(guest: GuestSession, timeout: float) -> str:
    """Wait for the waiter to return; its exit status and output."""
    return guest.check("wait $(cat /tmp/wait.pid); echo rc=$?; cat /tmp/wait.out", timeout=timeout)


def rows_for(pair: Pair, path: str, client: str | None = None) -> list[tuple[str, str, str]]:
    return [
        (row["kind"], row["client"], row["type"])
        for row in pair.locks()
        if row.get("path") == path and (client is None or row["client"] == client)
    ]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    require_netns()
    tmp = tmp_path_factory.mktemp("pair")
    with GuestLan(2) as lan:
        data = tmp / "data"
        data.mkdir()
        test_client = f"{lan.host.gateway}/32"
        for i, vm in enumerate(VMS):
            prism_cli(data, "vm", "create", vm, "--client", f"{lan.guest_net(i).address}/32",
                      "--client", test_client)  # fmt: skip
        seed = tmp / "seed"
        (seed / "shared").mkdir(parents=True)
        for name in FILES:
            (seed / "shared" / name).write_bytes(b"")
            (seed / "shared" / name).chmod(0o666)
        (seed / "shared").chmod(0o777)
        prism_cli(data, "import", "a", str(seed), "--to", "/")
        prism_cli(data, "share", "a:/shared", "b:/shared", "--rw")
        server = PrismProcess(
            data,
            tmp / "logs",
            portmap=True,
            portmap_port=111,
            bind="0.0.0.0",
            wrap=lan.command([]),
            address=lan.host.address,
            extra_args=["--grace", str(GRACE)],
        )
        server.start()
        guests: list[GuestSession] = []
        setups: list[str] = []
        try:
            for i, vm in enumerate(VMS):
                net = lan.guest_net(i)
                hosts = f"127.0.0.1 localhost\n{net.address} {net.hostname}\n"
                guests.append(
                    GuestSession(files=lock_files(tmp, hosts), net=net, name=net.hostname)
                )
                setups.append(
                    f"{LOCK_SETUP}\nmkdir -p /mnt\nmount -t nfs -o vers=3 {SERVER_ADDR}:/{vm} /mnt"
                )
            started = time.monotonic()
            start_all(guests)
            for g in guests:
                timing(f"{g.name} boot (TCG)", g.boot_seconds)
            for g, setup in zip(guests, setups, strict=True):
                g.check(setup)
            timing("both guests booted, daemons started, mounted", time.monotonic() - started)
            yield Pair(lan, server, (guests[0], guests[1]), (setups[0], setups[1]))
        finally:
            for g in guests:
                g.close()
            server.close()


@pytest.mark.parametrize("kind", ["fcntl", "flock"])
def test_contention_between_guests(pair: Pair, kind: str) -> None:
    g1, g2 = pair.guests
    path = f"/mnt/shared/{kind}"
    flags = ("-b",) if kind == "flock" else ()
    hold(g1, path, *flags)
    assert rows_for(pair, f"/shared/{kind}") == [("lock", pair.address(0), "write")]

    assert g2.run(f"lockf -n {' '.join(flags)} {path}").exit_code == EAGAIN_EXIT
    assert g2.run(f"lockf -n -s {' '.join(flags)} {path}").exit_code == EAGAIN_EXIT

    start_waiter(g2, path, *flags)
    time.sleep(WAIT_BEFORE_RELEASE)
    assert not waiter_done(g2), "the blocking attempt returned while guest 1 held the lock"
    assert ("waiting", pair.address(1), "write") in rows_for(pair, f"/shared/{kind}")

    release(g1)
    released = time.monotonic()
    out = join_waiter(g2, timeout=60)
    delay = time.monotonic() - released
    timing(f"{kind}: guest 2's blocking lock returned after guest 1's release", delay)
    assert "rc=0" in out and "locked" in out, out
    assert delay < GRANT_BOUND
    # The waiter took the lock and exited, which released it: nothing is left.
    wait_for("no locks left", lambda: not rows_for(pair, f"/shared/{kind}"), 10)


def test_killed_wait_is_cancelled(pair: Pair) -> None:
    g1, g2 = pair.guests
    hold(g1, "/mnt/shared/cancel")
    start_waiter(g2, "/mnt/shared/cancel")
    waiting = ("waiting", pair.address(1), "write")
    wait_for("guest 2 waits", lambda: waiting in rows_for(pair, "/shared/cancel"), 10)
    g2.check("kill $(cat /tmp/wait.pid); wait $(cat /tmp/wait.pid); true")
    gone = wait_for(
        "guest 2's wait cancelled", lambda: waiting not in rows_for(pair, "/shared/cancel"), 10
    )
    timing("guest 2's killed wait was cancelled at the server", gone)
    release(g1)
    wait_for("no locks left", lambda: not rows_for(pair, "/shared/cancel"), 10)
    assert g1.run("lockf -n /mnt/shared/cancel").exit_code == 0


@pytest.mark.parametrize("crash", [False, True], ids=["stop", "kill-9"])
def test_server_restart_reclaim_and_grace(pair: Pair, crash: bool) -> None:
    g1, g2 = pair.guests
    hold(g1, "/mnt/shared/reclaim")
    start_waiter(g2, "/mnt/shared/reclaim")
    waiting = ("waiting", pair.address(1), "write")
    wait_for("guest 2 waits", lambda: waiting in rows_for(pair, "/shared/reclaim"), 10)
    with pair.server.mount_client() as m:
        root, _ = m.mnt("/a")
    with pair.server.nfs_client() as c:
        shared = c.lookup(root, "shared").object
        assert shared is not None
        other = c.lookup(shared, "other").object
        assert other is not None

    pair.server.restart(crash=crash)
    restarted = time.monotonic()
    reclaimed = wait_for(
        "guest 1 reclaims its lock",
        lambda: ("lock", pair.address(0), "write") in rows_for(pair, "/shared/reclaim"),
        GRACE,
    )
    timing("guest 1 reclaimed its lock after the restart", reclaimed)
    assert json.loads((pair.server.data / "nlm" / "locks.json").read_text())["grace_left"] > 0
    monitored = json.loads((pair.server.data / "nlm" / "monitored").read_text())["clients"]
    assert monitored[pair.address(0)]["name"] == "guest1"  # a crash now would notify it again

    with NlmClient(
        pair.server.address, pair.nlm_port(), caller_name="test", reserved_port=True
    ) as nlm:
        lock = nlm.alock(other.data, svid=7)
        assert nlm.lock(lock).stat == NlmStat.DENIED_GRACE_PERIOD
        # Guest 2's kernel is refused too and retries every 5 s until grace ends; then it
        # finds guest 1's reclaimed lock.
        attempt = g2.run("lockf -n /mnt/shared/reclaim", timeout=GRACE + 60)
        waited = time.monotonic() - restarted
        timing("guest 2's non-blocking attempt during grace returned", attempt.elapsed)
        assert attempt.exit_code == EAGAIN_EXIT, attempt.output
        assert waited >= GRACE - 1
        assert nlm.lock(lock).stat == NlmStat.GRANTED
        assert nlm.unlock(lock).stat == NlmStat.GRANTED
    wait_for("guest 2 waits again", lambda: waiting in rows_for(pair, "/shared/reclaim"), 10)
    assert not waiter_done(g2)
    release(g1)
    released = time.monotonic()
    out = join_waiter(g2, timeout=60)
    timing(
        "guest 2's wait from before the restart returned after the release",
        time.monotonic() - released,
    )
    assert "rc=0" in out and "locked" in out, out
    assert time.monotonic() - released < GRANT_BOUND
    wait_for("no locks left", lambda: not rows_for(pair, "/shared/reclaim"), 10)


def test_vanished_guest_keeps_locks_until_it_reboots_and_notifies(pair: Pair) -> None:
    g1, g2 = pair.guests
    hold(g2, "/mnt/shared/vanish")
    saved = g2.check(f"tar cf - -C {NFS_STATE_DIR} state sm | base64")
    start_waiter(g1, "/mnt/shared/vanish")
    wait_for(
        "guest 1 waits",
        lambda: ("waiting", pair.address(0), "write") in rows_for(pair, "/shared/vanish"),
        10,
    )

    g2.kill()
    time.sleep(WAIT_BEFORE_RELEASE)
    rows = rows_for(pair, "/shared/vanish")
    assert ("lock", pair.address(1), "write") in rows, rows
    table = pair.server.cli("locks").stdout  # what an operator reads
    assert any(pair.address(1) in line and "/shared/vanish" in line for line in table.splitlines())
    assert not waiter_done(g1)

    booted = time.monotonic()
    g2.start(files={NFS_STATE_TAR: base64.b64decode(saved)})
    timing("guest 2 rebooted", time.monotonic() - booted)
    notified = time.monotonic()
    g2.check(pair.setups[1])  # ... and its sm-notify tells the server
    out = join_waiter(g1, timeout=60)
    timing(
        "guest 1's blocked lock was granted after guest 2's sm-notify", time.monotonic() - notified
    )
    assert "rc=0" in out and "locked" in out, out
    assert not [r for r in rows_for(pair, "/shared/vanish") if r[1] == pair.address(1)]
    assert f"{pair.address(1)} (guest2) restarted" in pair.server.stderr()
