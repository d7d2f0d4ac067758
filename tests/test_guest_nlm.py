"""File locking with the Linux kernel's NFS client, mounted the stock way: no `nolock`.

The guest gains rpcbind and rpc.statd (the host's Debian binaries and the libraries they
load, copied into its initramfs) and `lockf`, a static fcntl/flock tool built from
tests/guest/lockf.c. It mounts `mount -t nfs -o vers=3 10.0.2.2:/vm /mnt`, finding every
port (NFS, MOUNT, and the kernel lockd's NLM) through the server's portmapper. The other
lock holder is this test, through the project's NLM client:

* a file the host holds: the guest's non-blocking fcntl write and read locks and its flock
  fail with EAGAIN; a free file locks at once, both ways;
* a blocking fcntl lock on a file the host holds returns once the host unlocks. (QEMU's
  user networking lets no call reach the guest, so the server's GRANTED callback cannot;
  the guest's lockd repeats its blocked LOCK every 30 s and gets it then.)
* a lock the guest holds is seen by the host's TEST and listed by `prism locks`.

QEMU user networking puts every guest behind the host's 127.0.0.1, so here one guest plus
the host client is the widest test: two such guests would be one NLM client. Guests with
addresses of their own, which the server can call back, are in test_guest_nlm_pair.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from prism.nfs.wire import Sattr3
from prism.nlm.client import NlmClient
from prism.nlm.types import NlmStat
from prism.nlm.types import TestRes as NlmTestRes
from rpc.portmap import PMAP_PORT, rpcbind_answers
from tests.guest.harness import HOST_ADDR, GuestRun, run_guest
from tests.guest.locking import lock_files, missing_tools
from tests.server_helpers import PrismProcess, new_data_dir, port_listening, prism_cli

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools())),
]

BOOT_TIMEOUT = 240.0
BLOCKED_BOUND = 45  # seconds: Linux repeats a blocked LOCK every 30 s

WORKLOAD = f"""
mkdir -p /var/lib/nfs/sm /var/lib/nfs/sm.bak /run/rpcbind
chown -R statd /var/lib/nfs
rpcbind -w || echo "R rpcbind=failed"
rpc.statd --no-notify || echo "R statd=failed"
mount -t nfs -o vers=3 {HOST_ADDR}:/vm /mnt && echo "R mounted=yes"
lockf -n /mnt/held; echo "R held_fcntl=$?"
lockf -n -s /mnt/held; echo "R held_fcntl_read=$?"
lockf -n -b /mnt/held; echo "R held_flock=$?"
lockf -n /mnt/free >/dev/null; echo "R free_fcntl=$?"
lockf -n -b /mnt/free >/dev/null; echo "R free_flock=$?"
echo "R waiting=yes"
t0=$(date +%s)
lockf /mnt/later >/dev/null
echo "R later=$? $(( $(date +%s) - t0 ))"
lockf /mnt/mine 30 >/dev/null &
sleep 3
echo "R mine=held"
wait
"""


def results(run: GuestRun) -> dict[str, str]:
    found = dict(re.findall(r"^R (\w+)=(.*)$", run.workload_output, re.MULTILINE))
    assert "rpcbind" not in found and "statd" not in found, run.workload_output
    return found


def test_kernel_client_locks_without_nolock(tmp_path: Path) -> None:
    if rpcbind_answers("127.0.0.1", PMAP_PORT):
        mode: tuple[bool, int | None] = (True, None)
    elif port_listening(PMAP_PORT):
        pytest.skip("127.0.0.1:111 is taken by something that is not a portmapper")
    else:
        mode = (True, PMAP_PORT)
    data = new_data_dir(tmp_path / "data")
    prism_cli(data, "vm", "set", "vm", "--insecure")  # QEMU's user networking: ordinary ports
    server = PrismProcess(data, tmp_path / "logs", portmap=mode[0], portmap_port=mode[1])
    server.start()
    nlm_port = int(server.ready_line.split(" nlm ")[1].split()[0])
    files = lock_files(tmp_path)
    console = tmp_path / "console.log"
    try:
        root = server.mount("/vm")
        with server.nfs_client() as c:
            fh = {}
            for name in ("held", "free", "later", "mine"):
                made = c.create(root, name, Sattr3(mode=0o666))
                assert made.ok and made.obj is not None
                fh[name] = made.obj.data
        with NlmClient("127.0.0.1", nlm_port, caller_name="host") as host:
            held, later = host.alock(fh["held"], svid=1), host.alock(fh["later"], svid=2)
            assert host.lock(held).stat == NlmStat.GRANTED
            assert host.lock(later).stat == NlmStat.GRANTED
            outcome: dict[str, GuestRun] = {}
            boot = threading.Thread(
                target=lambda: outcome.setdefault(
                    "run",
                    run_guest(WORKLOAD, timeout=BOOT_TIMEOUT, files=files, console_log=console),
                )
            )
            boot.start()
            released = False
            tests: list[NlmTestRes] = []
            tables: list[list[dict[str, Any]]] = []
            while boot.is_alive():
                text = console.read_text(errors="replace") if console.exists() else ""
                if "R waiting=yes" in text and not released:
                    time.sleep(2)
                    assert host.unlock(later).stat == NlmStat.GRANTED
                    released = True
                if "R mine=held" in text and not tests:
                    tests.append(host.test(host.alock(fh["mine"], svid=3)))
                    tables.append(json.loads(server.cli("locks", "--json").stdout))
                time.sleep(0.3)
            boot.join()
        r = results(outcome["run"])
    finally:
        server.stop()
    assert r["mounted"] == "yes"
    assert (r["held_fcntl"], r["held_fcntl_read"], r["held_flock"]) == ("11", "11", "11")
    assert (r["free_fcntl"], r["free_flock"]) == ("0", "0")
    status, waited = r["later"].split()
    assert status == "0" and int(waited) <= BLOCKED_BOUND, r["later"]
    [test] = tests
    assert test.stat == NlmStat.DENIED and test.holder is not None
    assert test.holder.oh != b"o"  # the guest's lock, not one of ours
    rows = [row for row in tables[0] if row["path"] == "/mine"]
    assert [(row["client"], row["type"], row["length"]) for row in rows] == [
        ("127.0.0.1", "write", 0)  # (QEMU's user networking: the guest comes from loopback)
    ]
