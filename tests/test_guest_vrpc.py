"""A real QEMU guest (TCG) mounts its VM over the VRPC ring: ivshmem-plain over the server's
sealed memfd, poll-mode doorbells, the static C client `native/guest/prism-vrpc-guest.c`.

`prism vm vrpc-guest vm --json` gives the QEMU options; the guest finds PCI 1af4:1110 in sysfs,
maps its BAR 2 and runs MNT, NULL, GETATTR, CREATE, WRITE, READ back and READDIR over the
ring, then tries to MNT another VM (refused: the channel is bound to `vm`). The host checks
the guest's result lines and reads the file through a normal TCP NFS client of the same VM.
One boot; the host-side twin of this test, without QEMU, is `tests/test_vrpc_guest.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from prism.nfs.const import MountStat3
from tests.guest.harness import run_guest
from tests.guest.vrpc_guest import GUEST_BYTES, fnv1a, guest_client, pattern, results
from tests.server_helpers import PrismProcess, new_data_dir, prism_cli

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


def test_guest_mounts_its_vm_over_ivshmem(tmp_path: Path) -> None:
    client = guest_client()
    data = new_data_dir(tmp_path / "data", ["vm", "other"])
    with PrismProcess(data, tmp_path / "logs") as server:
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
