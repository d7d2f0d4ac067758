"""A real QEMU guest (TCG) mounts its VM over the VRPC ring: ivshmem-plain over the ring's file
on tmpfs, poll-mode doorbells, the static C client `native/guest/prism-vrpc-guest.c`.

`prism vm vrpc-guest vm --json` gives the QEMU options; the guest finds PCI 1af4:1110 in sysfs,
maps its BAR 2 and runs MNT, NULL, GETATTR, CREATE, WRITE, READ back and READDIR over the
ring, then tries to MNT another VM (refused: the channel is bound to `vm`). The host checks
the guest's result lines and reads the file through a normal TCP NFS client of the same VM.
One boot; the host-side twin of this test, without QEMU, is `tests/test_vrpc_guest.py`.

Then the server dies under a running guest: with the guest client writing and reading back
over the ring, the server is killed (SIGKILL) and started again on the same data directory;
the same guest, QEMU not restarted, carries on (the server adopts the ring file, the client
sees the reset and resends its call), then writes and reads more; TCP reads it all back.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.nfs.const import MountStat3
from tests.guest.harness import GuestSession, run_guest
from tests.guest.vrpc_guest import (
    GUEST_BYTES,
    fnv1a,
    guest_client,
    pattern,
    read_all,
    results,
)
from tests.server_helpers import PrismProcess, new_data_dir, prism_cli
from vrpc.guestrings import ring_dir

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

BOOT_TIMEOUT = 120.0  # TCG boots in a few seconds; the calls are milliseconds each

WORKLOAD = """
set -e
echo "R t0=$(cat /proc/uptime)"
/bin/prism-vrpc-guest run /vm from-guest.bin
echo "R t1=$(cat /proc/uptime)"
/bin/prism-vrpc-guest mnt /other
"""


@contextlib.contextmanager
def _rings_removed(data: Path) -> Iterator[None]:
    """The guest rings of the server on `data` (files on tmpfs that outlive it) go after."""
    try:
        yield
    finally:
        shutil.rmtree(ring_dir(data), ignore_errors=True)


def test_guest_mounts_its_vm_over_ivshmem(tmp_path: Path) -> None:
    client = guest_client()
    data = new_data_dir(tmp_path / "data", ["vm", "other"])
    with PrismProcess(data, tmp_path / "logs") as server, _rings_removed(data):
        ring = json.loads(server.cli("vm", "vrpc-guest", "vm", "--json").stdout)
        run = run_guest(
            WORKLOAD,
            timeout=BOOT_TIMEOUT,
            files={"/bin/prism-vrpc-guest": client.read_bytes()},
            qemu_args=ring["qemu_args"],
        )
        out = run.workload_output
        assert run.exit_code == 0, out
        r = results(out)
        assert len(r["device"]) == 2, out  # found the ivshmem PCI device (1af4:1110) both times
        assert r["channel"][0] == str(ring["channel"]), out
        want = fnv1a(pattern(GUEST_BYTES))
        assert r["mnt"] == ["0", str(int(MountStat3.MNT3ERR_ACCES))], out
        assert r["null"] == ["ok"] and r["root_type"] == ["2"] and r["create"] == ["0"], out
        assert r["written"] == [str(GUEST_BYTES)] and r["write_sum"] == [want], out
        assert r["read"] == [str(GUEST_BYTES)] and r["read_sum"] == [want], out
        assert "from-guest.bin" in r["entry"], out
        assert "PRISM-VRPC-GUEST ok" in out
        with server.nfs_client() as nfs:  # the same bytes through TCP
            fh = nfs.lookup(server.mount("/vm"), b"from-guest.bin").object
            assert nfs.read(fh, 0, GUEST_BYTES + 100).data == pattern(GUEST_BYTES)
        print(f"guest run: {run.elapsed:.1f} s\n{out}")
    fsck = prism_cli(data, "fsck", "--json")
    assert '"clean": true' in fsck.stdout, fsck.stdout


SOAK_SECONDS = 25  # the guest's soak: the kill comes ~2 s in, the server is back ~3 s later
SOAK_CHUNK = 4096  # (what the C client's soak writes per round)


def test_guest_carries_on_after_the_server_is_killed(tmp_path: Path) -> None:
    client = guest_client()
    data = new_data_dir(tmp_path / "data", ["vm"])
    with PrismProcess(data, tmp_path / "logs") as server, _rings_removed(data):
        ring = json.loads(server.cli("vm", "vrpc-guest", "vm", "--json").stdout)
        with GuestSession(
            files={"/bin/prism-vrpc-guest": client.read_bytes()}, qemu_args=ring["qemu_args"]
        ) as guest:
            before = results(guest.check("/bin/prism-vrpc-guest run /vm before.bin"))
            want = fnv1a(pattern(GUEST_BYTES))
            assert before["read_sum"] == [want] and before["channel"] == [str(ring["channel"])]
            guest.check(
                f"/bin/prism-vrpc-guest soak /vm soak.bin {SOAK_SECONDS} >/tmp/soak.out 2>&1 &"
                " soak_pid=$!"
            )
            deadline = time.monotonic() + 30
            while "R soaking=1" not in guest.check("cat /tmp/soak.out"):
                assert time.monotonic() < deadline, guest.check("cat /tmp/soak.out")
                time.sleep(0.2)
            time.sleep(2)
            server.kill()
            time.sleep(1)
            server.start()
            waited = guest.run('wait "$soak_pid"; cat /tmp/soak.out', timeout=SOAK_SECONDS + 90)
            r = results(waited.output)
            assert "PRISM-VRPC-GUEST ok" in waited.output, waited.output
            assert r.get("reset"), waited.output  # it saw the reset and resent its call
            rounds = int(r["soak_rounds"][0])
            soaked = pattern(rounds * SOAK_CHUNK)
            assert r["soak_sum"] == [fnv1a(soaked)], waited.output
            after = results(guest.check("/bin/prism-vrpc-guest run /vm after.bin"))
            assert after["read_sum"] == [want] and after["written"] == [str(GUEST_BYTES)]
            print(f"guest: {rounds} soak rounds, resets {r['reset']}\n{waited.output}")
        with server.nfs_client() as nfs:  # all of it through TCP
            root = server.mount("/vm")
            for name, expected in (
                (b"before.bin", pattern(GUEST_BYTES)),
                (b"soak.bin", soaked),
                (b"after.bin", pattern(GUEST_BYTES)),
            ):
                fh = nfs.lookup(root, name).object
                assert read_all(nfs, fh) == expected, name
        assert "adopted from the last run (reset)" in server.stderr()
    fsck = prism_cli(data, "fsck", "--json")
    assert '"clean": true' in fsck.stdout, fsck.stdout
