"""File locking through a real `prism serve`: NLM and NSM from two client hosts.

Two network namespaces (tests/netns.py) stand for two guests, each running a stand-in of a
guest's lock stack (tests/nlm_helpers.py: portmapper on port 111, NLM callback service,
status monitor). VM `src` is bound to guest A, VM `dst` to guest B, and `prism share
src:/shared dst:/shared --rw` lets both see one file: they must contend for its locks,
each through its own VM's handle. VM `copy`, a clone of `src` (the same content,
deduplicated), must not. Checked: conflicts and TEST's holder, a blocked LOCK granted by a
GRANTED callback when the holder unlocks, NLM v1 over UDP, handle and address checks, `prism
locks`, the release of a rebooted client's locks on SM_NOTIFY, and a restart: SM_NOTIFY to
the clients, the grace period refusing new locks and granting reclaims, then normal service.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from prism.nfs.const import NfsStat3
from prism.nfs.wire import Sattr3
from prism.nlm import types as nlm_types
from prism.nlm.client import NlmClient
from prism.nlm.service import SNAPSHOT_DELAY
from prism.nlm.types import LockArgs, NlmProc, NlmStat, Res, decode
from rpc.portmap import pmap_dump
from tests.netns import TestHosts, require_netns
from tests.nlm_helpers import LockClientHost
from tests.op_helpers import PrismServe, prism, run_clone
from tests.server_helpers import free_port, running_server

pytestmark = pytest.mark.netns

GRACE = 4.0


class World:
    def __init__(self, data: Any, hosts: TestHosts) -> None:
        self.data = data
        self.ports = [free_port("0.0.0.0") for _ in range(3)]
        self.metrics_port = free_port()
        self.server = self._serve()
        self.a = LockClientHost(hosts[0], *self.ports).start()
        self.b = LockClientHost(hosts[1], *self.ports).start()

    def _serve(self) -> PrismServe:
        nfs, mount, nlm = self.ports
        extra = ("--nfs-port", str(nfs), "--mount-port", str(mount), "--nlm-port", str(nlm))
        metrics = ("--metrics", f"127.0.0.1:{self.metrics_port}")
        return PrismServe(self.data, *extra, *metrics, "--grace", str(GRACE)).start()

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("prism_lock")
        }

    def restart(self) -> float:
        self.server.stop()
        self.server = self._serve()
        return time.monotonic()

    def locks(self, *args: str) -> list[dict[str, Any]]:
        time.sleep(2 * SNAPSHOT_DELAY)  # the server's table may be this old
        out: list[dict[str, Any]] = json.loads(prism(self.data, "locks", "--json", *args))
        return out

    def close(self) -> None:
        self.a.close()
        self.b.close()
        self.server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_netns()
    data = tmp_path_factory.mktemp("nlm") / "data"
    with TestHosts(2) as hosts:
        a, b = hosts
        prism(data, "vm", "create", "src", "--client", f"{a.address}/32")
        prism(data, "vm", "create", "dst", "--client", f"{b.address}/32")
        # the shared directory and its file, made through NFS from loopback before binding
        prism(data, "vm", "create", "setup")
        world = World(data, hosts)
        try:
            setup_files(world)
            yield world
        finally:
            world.close()


def setup_files(world: World) -> None:
    srv = world.server
    prism(world.data, "vm", "set", "src", "--client", "127.0.0.1/32")
    c, root = srv.mount("/src")
    with c:
        made = c.mkdir(root, "shared", Sattr3(mode=0o777))
        assert made.ok and made.obj is not None
        f = c.create(made.obj, "db", Sattr3(mode=0o666, size=0))
        assert f.ok and f.obj is not None
        c.write_all(f.obj, b"x" * 4096)
    prism(world.data, "vm", "set", "src", "--client", f"{world.a.address}/32")
    prism(world.data, "share", "src:/shared", "dst:/shared", "--rw")
    ok = run_clone(world.data, "copy", "src", "--client", f"{world.a.address}/32")
    assert ok.returncode == 0, ok.stderr


def test_two_guests_contend_through_a_share_and_a_blocked_lock_is_granted(world: World) -> None:
    a, b = world.a, world.b
    fh_a = a.handle("/src", "shared/db")
    fh_b = b.handle("/dst", "shared/db")
    assert fh_a != fh_b  # two VMs' handles ...
    na, nb = a.nlm(), b.nlm()
    lock_a = na.alock(fh_a, 0, 0, svid=100)  # whole file
    assert na.lock(lock_a).stat == NlmStat.GRANTED
    # ... one object: B is refused, and TEST names A's lock
    lock_b = nb.alock(fh_b, 10, 20, svid=200)
    assert nb.lock(lock_b).stat == NlmStat.DENIED
    held = nb.test(lock_b)
    assert held.stat == NlmStat.DENIED and held.holder is not None
    assert (held.holder.svid, held.holder.exclusive, held.holder.length) == (100, True, 0)
    # a shared (read) lock conflicts with the write lock too; v1 over UDP, 32-bit offsets
    with b.nlm(vers=1, transport="udp") as old:
        assert old.lock(old.alock(fh_b, 0, 1, svid=201), exclusive=False).stat == NlmStat.DENIED
    # the clone holds the same bytes (deduplicated) but is another object: no contention
    fh_copy = a.handle("/copy", "shared/db")
    assert na.lock(na.alock(fh_copy, svid=300)).stat == NlmStat.GRANTED

    rows = world.locks("src")
    assert [(r["client"], r["path"], r["type"], r["start"], r["length"]) for r in rows] == [
        (a.address, "/shared/db", "write", 0, 0)
    ]
    text = prism(world.data, "locks")
    assert a.address in text and "/shared/db" in text and "0-EOF" in text
    assert world.locks("copy")[0]["svid"] == 300

    # B blocks; A unlocks; the server calls B back with GRANTED
    assert nb.lock(lock_b, block=True).stat == NlmStat.BLOCKED
    assert [r["kind"] for r in world.locks("src")] == ["lock", "waiting"]
    released = time.monotonic()
    assert na.unlock(lock_a).stat == NlmStat.GRANTED
    b.wait_for(lambda: len(b.granted) == 1, timeout=10)
    waited = time.monotonic() - released
    assert b.granted[0].alock == lock_b and waited < 5, waited
    held = na.test(na.alock(fh_a, 15, 1, svid=100))
    assert held.stat == NlmStat.DENIED and held.holder is not None
    assert held.holder.svid == 200 and (held.holder.offset, held.holder.length) == (10, 20)
    m = world.metrics()
    assert m["prism_locks_held"] == 2 and m["prism_lock_waits_granted_total"] >= 1
    assert 0 < m["prism_lock_wait_seconds_total"] < 10
    assert nb.unlock(lock_b).stat == NlmStat.GRANTED
    assert na.unlock(na.alock(fh_copy, svid=300)).stat == NlmStat.GRANTED
    assert world.locks() == []
    assert world.metrics()["prism_locks_held"] == 0


def test_a_grant_the_client_declines_goes_to_the_next_waiter(world: World) -> None:
    a, b = world.a, world.b
    fh_a, fh_b = a.handle("/src", "shared/db"), b.handle("/dst", "shared/db")
    na, nb = a.nlm(), b.nlm()
    holder, waiter_a = na.alock(fh_a, svid=1), na.alock(fh_a, svid=2)
    waiter_b = nb.alock(fh_b, svid=3)
    assert na.lock(holder).stat == NlmStat.GRANTED
    assert nb.lock(waiter_b, block=True).stat == NlmStat.BLOCKED  # first in line
    assert na.lock(waiter_a, block=True).stat == NlmStat.BLOCKED
    b.answer = NlmStat.DENIED  # B's process gave up meanwhile: it declines the grant
    granted_a, granted_b = len(a.granted), len(b.granted)
    try:
        assert na.unlock(holder).stat == NlmStat.GRANTED
        b.wait_for(lambda: len(b.granted) > granted_b)
        a.wait_for(lambda: len(a.granted) > granted_a)  # so the lock went on to A
    finally:
        b.answer = NlmStat.GRANTED
    assert a.granted[-1].alock == waiter_a
    assert [(r["client"], r["svid"]) for r in world.locks("src")] == [(a.address, 2)]
    assert na.unlock(waiter_a).stat == NlmStat.GRANTED


def test_msg_forms_answer_through_the_clients_res_procedures(world: World) -> None:
    a, b = world.a, world.b
    fh_a, fh_b = a.handle("/src", "shared/db"), b.handle("/dst", "shared/db")
    na, nb = a.nlm(), b.nlm()
    assert na.lock(na.alock(fh_a, 0, 10, svid=5)).stat == NlmStat.GRANTED
    before = len(b.results)
    lock_b = nb.alock(fh_b, 5, 1, svid=6)
    assert nb.call(NlmProc.LOCK_MSG, LockArgs(b"msg1", False, True, lock_b, False, 1)) == b""
    assert nb.call(NlmProc.TEST_MSG, nlm_types.TestArgs(b"msg2", True, lock_b)) == b""
    b.wait_for(lambda: len(b.results) >= before + 2)
    got = dict(b.results[before:])
    assert decode(Res, got[NlmProc.LOCK_RES]) == Res(b"msg1", NlmStat.DENIED)
    test_res = decode(nlm_types.TestRes, got[NlmProc.TEST_RES])
    assert test_res.stat == NlmStat.DENIED and test_res.holder is not None
    assert test_res.holder.svid == 5
    assert na.unlock(na.alock(fh_a, 0, 10, svid=5)).stat == NlmStat.GRANTED


def test_free_all_releases_the_callers_locks(world: World) -> None:
    a, b = world.a, world.b
    fh_a, fh_b = a.handle("/src", "shared/db"), b.handle("/dst", "shared/db")
    na, nb = a.nlm(), b.nlm()
    assert na.lock(na.alock(fh_a, svid=11)).stat == NlmStat.GRANTED
    nb.free_all()  # B's FREE_ALL frees B's locks only
    assert nb.lock(nb.alock(fh_b, svid=12)).stat == NlmStat.DENIED
    na.free_all()
    assert nb.lock(nb.alock(fh_b, svid=12)).stat == NlmStat.GRANTED
    assert nb.unlock(nb.alock(fh_b, svid=12)).stat == NlmStat.GRANTED


def test_lock_calls_get_the_nfs_handle_and_address_checks(world: World) -> None:
    a, b = world.a, world.b
    fh_b = b.handle("/dst", "shared/db")
    na = a.nlm()
    # A is not bound to dst: its handle does not work for A, as it would not over NFS
    assert na.lock(na.alock(fh_b)).stat == NlmStat.FAILED
    assert na.test(na.alock(fh_b)).stat == NlmStat.FAILED
    forged = bytearray(fh_b)
    forged[-1] ^= 1
    assert na.lock(na.alock(bytes(forged))).stat == NlmStat.STALE_FH
    with a.nlm(vers=3) as v3:  # v3 knows no STALE_FH: plain DENIED
        assert v3.lock(v3.alock(bytes(forged))).stat == NlmStat.DENIED
    # and from an address bound to nothing at all (loopback)
    with NlmClient("127.0.0.1", world.ports[2]) as local:
        assert local.lock(local.alock(fh_b)).stat == NlmStat.FAILED
    assert world.locks() == []


def test_share_reservations(world: World) -> None:
    a, b = world.a, world.b
    fh_a, fh_b = a.handle("/src", "shared/db"), b.handle("/dst", "shared/db")
    na, nb = a.nlm(), b.nlm()
    assert na.share(fh_a, access=3, deny=2).stat == NlmStat.GRANTED  # rw, deny write
    assert nb.share(fh_b, access=1, deny=0).stat == NlmStat.GRANTED  # a reader is fine
    assert nb.share(fh_b, access=2, deny=0, oh=b"w").stat == NlmStat.DENIED
    assert na.unshare(fh_a).stat == NlmStat.GRANTED
    assert nb.share(fh_b, access=2, deny=0, oh=b"w").stat == NlmStat.GRANTED
    nb.unshare(fh_b)
    nb.unshare(fh_b, oh=b"w")
    assert world.locks() == []


def test_a_rebooted_client_loses_its_locks_when_it_notifies(world: World) -> None:
    a, b = world.a, world.b
    fh_a, fh_b = a.handle("/src", "shared/db"), b.handle("/dst", "shared/db")
    na, nb = a.nlm(), b.nlm()
    assert na.lock(na.alock(fh_a, 0, 100, svid=7)).stat == NlmStat.GRANTED
    assert nb.lock(nb.alock(fh_b, 50, 10, svid=8)).stat == NlmStat.DENIED
    # A vanishes without unlocking: `prism locks` still shows its lock ...
    assert [r["client"] for r in world.locks()] == [a.address]
    # ... until A comes back and its status monitor says so
    with a.nsm() as nsm:
        nsm.notify(a.host.name, 3)
    assert nb.lock(nb.alock(fh_b, 50, 10, svid=8)).stat == NlmStat.GRANTED
    assert [r["client"] for r in world.locks()] == [b.address]
    assert nb.unlock(nb.alock(fh_b, 50, 10, svid=8)).stat == NlmStat.GRANTED


def test_restart_notifies_clients_and_grace_admits_only_reclaims(world: World) -> None:
    a, b = world.a, world.b
    fh_a, fh_b = a.handle("/src", "shared/db"), b.handle("/dst", "shared/db")
    with a.nlm() as na:
        assert na.lock(na.alock(fh_a, svid=9)).stat == NlmStat.GRANTED
    state = int((world.data / "nlm" / "state").read_text())
    before = len(a.notified)
    started = world.restart()
    assert re.search(r" nlm \d+ ", world.server.log())
    a.wait_for(lambda: len(a.notified) > before, timeout=10)
    assert a.notified[-1].state == state + 2  # the server's new NSM state
    assert (world.data / "nlm" / "state").stat().st_mode & 0o777 == 0o600
    na, nb = a.nlm(), b.nlm()
    lock_b = nb.alock(fh_b, svid=10)
    assert nb.lock(lock_b).stat == NlmStat.DENIED_GRACE_PERIOD  # nothing new in grace
    assert nb.test(lock_b).stat == NlmStat.DENIED_GRACE_PERIOD
    assert na.lock(na.alock(fh_a, svid=9), reclaim=True).stat == NlmStat.GRANTED
    assert time.monotonic() - started < GRACE, "the test was too slow to see the grace period"
    time.sleep(max(0.0, started + GRACE + 0.5 - time.monotonic()))
    assert nb.lock(lock_b).stat == NlmStat.DENIED  # after grace: A's reclaimed lock holds
    assert na.unlock(na.alock(fh_a, svid=9)).stat == NlmStat.GRANTED
    assert nb.lock(lock_b).stat == NlmStat.GRANTED
    assert nb.unlock(lock_b).stat == NlmStat.GRANTED


def test_nfs_still_serves_beside_locks(world: World) -> None:
    c, root = world.server.mount("/setup")
    with c:
        assert c.getattr(root).status == NfsStat3.NFS3_OK


def test_a_grant_nobody_can_be_told_of_is_released_after_bounded_retries(world: World) -> None:
    """Loopback (bound to VM `setup`) runs no NLM service here: the GRANTED callback fails,
    CALLBACK_ATTEMPTS times, and the lock is released rather than held for nobody."""
    c, root = world.server.mount("/setup")
    with c:
        made = c.create(root, "lonely", Sattr3(mode=0o666))
        assert made.ok and made.obj is not None
        fh = made.obj.data
    failed = world.metrics()["prism_lock_callbacks_failed_total"]
    with NlmClient("127.0.0.1", world.ports[2]) as n:
        assert n.lock(n.alock(fh, svid=1)).stat == NlmStat.GRANTED
        assert n.lock(n.alock(fh, svid=2), block=True).stat == NlmStat.BLOCKED
        assert n.unlock(n.alock(fh, svid=1)).stat == NlmStat.GRANTED
        # granted, being told
        assert [(r["svid"], r["path"]) for r in world.locks("setup")] == [(2, "/lonely")]
        deadline = time.monotonic() + 30
        while world.locks("setup") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert world.locks("setup") == []
    assert world.metrics()["prism_lock_callbacks_failed_total"] == failed + 1


def test_a_pending_grant_is_settled_by_a_repeated_lock_or_released_by_cancel(
    world: World,
) -> None:
    """While the server still tries to tell a client (loopback: nobody answers) that its
    blocked lock was granted, the client's repeated LOCK takes it for good, and a CANCEL
    leaves nothing held."""
    c, root = world.server.mount("/setup")
    with c:
        made = c.create(root, "pending", Sattr3(mode=0o666))
        assert made.ok and made.obj is not None
        fh = made.obj.data
    with NlmClient("127.0.0.1", world.ports[2]) as n:
        holder, waiter = n.alock(fh, 0, 10, svid=1), n.alock(fh, 0, 10, svid=2)
        assert n.lock(holder).stat == NlmStat.GRANTED
        assert n.lock(waiter, block=True).stat == NlmStat.BLOCKED
        assert n.unlock(holder).stat == NlmStat.GRANTED  # granted; the callback is failing
        assert n.cancel(waiter).stat == NlmStat.GRANTED
        assert world.locks("setup") == []  # at once, not after the callback gives up
        assert n.lock(holder).stat == NlmStat.GRANTED
        assert n.lock(waiter, block=True).stat == NlmStat.BLOCKED
        assert n.unlock(holder).stat == NlmStat.GRANTED
        assert n.lock(waiter, block=True).stat == NlmStat.GRANTED  # the client repeats it
        time.sleep(9)  # longer than every callback attempt takes
        assert [r["svid"] for r in world.locks("setup")] == [2]  # still held: settled
        assert n.unlock(waiter).stat == NlmStat.GRANTED


def test_both_programs_are_registered_with_the_portmapper(tmp_path: Any) -> None:
    """What `rpcinfo -p` shows: NLM v1, v3, v4 and NSM v1 on --nlm-port, TCP and UDP."""
    nlm_port = free_port()
    with running_server(
        tmp_path, portmap=True, portmap_port=free_port(), extra_args=("--nlm-port", str(nlm_port))
    ) as srv:
        assert srv.portmap_port is not None
        table = {(m.prog, m.vers, m.prot): m.port for m in pmap_dump("127.0.0.1", srv.portmap_port)}
    for prog, vers in ((100021, 1), (100021, 3), (100021, 4), (100024, 1)):
        for prot in (6, 17):
            assert table[(prog, vers, prot)] == nlm_port
