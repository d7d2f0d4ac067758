"""The Linux kernel's NFS client, in a QEMU guest, against a real `prism serve`.

Boot 1 mounts with explicit ports (no portmapper) and runs a workload: write and read back
with checksums after dropping the page cache, append, truncate, rename, hard links,
symlinks, chmod/chown, a FIFO, a directory of 3,000 entries, `rm -rf`, `df`. Boot 2 restarts
the server with a portmapper (our own on port 111, or the system rpcbind if one answers
there) and mounts the plain way, `mount -t nfs -o vers=3,nolock 10.0.2.2:/vm /mnt`; it finds
boot 1's files, removes the big directory and writes one more file. The host checks every
result line the guest printed and reads what the guest wrote through its own client.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from prism.nfs.client import NfsClient
from prism.nfs.const import MOUNT_PROGRAM, MOUNT_V3, NFS_PROGRAM, NFS_V3, NfsStat3
from prism.nfs.wire import NfsFh3
from prism.store.types import FileType
from rpc.portmap import PMAP_PORT, pmap_getport, rpcbind_answers
from tests.guest.harness import HOST_ADDR, GuestRun, nfs_mount_command, run_guest
from tests.server_helpers import PrismProcess, new_data_dir, port_listening

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]

BOOT_TIMEOUT = 150.0  # TCG boots in ~4 s; the 3,000 creates dominate
MANY = 3000
QUOTA_KIB = 1024 * 1024  # `vm set vm --quota 1G`: what df must report as the size
IPPROTO_TCP = 6

WORKLOAD_1 = """
set -e
{mount}
echo "R mounted=yes"
cd /mnt
mkdir work
cd work
dd if=/dev/urandom of=rand.bin bs=65536 count=48 2>/dev/null
echo "R sum_rand=$(sha256sum rand.bin | cut -d' ' -f1)"
printf 'line one\\n' > text.txt
printf 'line two\\n' >> text.txt
sync
echo 3 > /proc/sys/vm/drop_caches
echo "R sum_rand_cold=$(sha256sum rand.bin | cut -d' ' -f1)"
echo "R text=$(tr '\\n' '|' < text.txt)"
cp rand.bin trunc.bin
truncate -s 100000 trunc.bin
truncate -s 200000 trunc.bin
echo "R trunc_size=$(stat -c %s trunc.bin)"
echo "R sum_trunc=$(sha256sum trunc.bin | cut -d' ' -f1)"
mv text.txt renamed.txt
test ! -e text.txt
ln renamed.txt hard.txt
echo "R links=$(stat -c %h renamed.txt)"
ln -s renamed.txt sym.txt
echo "R symlink=$(readlink sym.txt)"
echo "R via_symlink=$(head -n 1 sym.txt)"
chmod 0640 renamed.txt
chown 1234:5678 renamed.txt
echo "R perms=$(stat -c '%a %u %g' renamed.txt)"
mkfifo fifo
echo "R fifo=$(stat -c %F fifo)"
mkdir -p tree/a/b/c
echo x > tree/a/b/c/f
ln -s ../b tree/a/l
rm -rf tree
echo "R tree_gone=$(test -e tree && echo no || echo yes)"
mkdir many
cd many
i=0
while [ $i -lt {many} ]; do : > f$i; i=$((i + 1)); done
cd ..
echo "R many=$(ls many | wc -l)"
echo 3 > /proc/sys/vm/drop_caches
echo "R many_cold=$(ls many | wc -l)"
sync
echo "R df=$(df -P -k /mnt | tail -n 1)"
cd /
umount /mnt
echo "R umounted=yes"
"""

WORKLOAD_2 = """
set -e
mkdir -p /mnt
mount -t nfs -o vers=3,nolock {host}:/vm /mnt
echo "R mounted=yes"
echo "R sum_rand=$(sha256sum /mnt/work/rand.bin | cut -d' ' -f1)"
echo "R many=$(ls /mnt/work/many | wc -l)"
rm -rf /mnt/work/many
echo "R many_gone=$(test -e /mnt/work/many && echo no || echo yes)"
printf 'written in boot two\\n' > /mnt/work/boot2.txt
echo "R df=$(df -P -k /mnt | tail -n 1)"
umount /mnt
echo "R umounted=yes"
"""


def results(run: GuestRun) -> dict[str, str]:
    """The guest's "R key=value" lines; asserts the workload ran to the end."""
    out = {}
    for line in run.workload_output.splitlines():
        if line.startswith("R ") and "=" in line:
            key, _, value = line[2:].partition("=")
            out[key] = value.strip()
    assert run.exit_code == 0, f"workload failed ({run.exit_code}):\n{run.workload_output}"
    assert out.get("umounted") == "yes", run.workload_output
    return out


def parse_df(line: str) -> tuple[str, int, int, int]:
    """`df -P -k` row: (filesystem, size KiB, used KiB, available KiB)."""
    fields = line.split()
    assert len(fields) == 6, f"unexpected df line {line!r}"
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ok(res: Any) -> Any:
    assert res.status == NfsStat3.NFS3_OK, res.status.name
    return res


def check_boot_1(r: dict[str, str], nfs: NfsClient, root: NfsFh3) -> None:
    assert r["mounted"] == "yes"
    assert r["sum_rand"] == r["sum_rand_cold"]
    assert r["text"] == "line one|line two|"
    assert r["trunc_size"] == "200000"
    assert r["links"] == "2"
    assert r["symlink"] == "renamed.txt"
    assert r["via_symlink"] == "line one"
    assert r["perms"] == "640 1234 5678"
    assert r["fifo"] == "fifo"
    assert r["tree_gone"] == "yes"
    assert r["many"] == r["many_cold"] == str(MANY)
    fs, size, used, avail = parse_df(r["df"])
    assert fs == f"{HOST_ADDR}:/vm"
    assert size == QUOTA_KIB
    assert used >= 3 * 1024  # rand.bin and trunc.bin
    assert abs(size - used - avail) <= 1

    # What the guest wrote, as the host sees it.
    work = nfs.walk(root, "work")
    rand = nfs.read_all(nfs.walk(work, "rand.bin"), chunk=1 << 20)
    assert len(rand) == 48 * 65536
    assert sha256(rand) == r["sum_rand"]
    trunc = nfs.read_all(nfs.walk(work, "trunc.bin"))
    assert trunc == rand[:100000] + bytes(100000)
    assert sha256(trunc) == r["sum_trunc"]
    renamed = nfs.walk(work, "renamed.txt")
    assert nfs.read_all(renamed) == b"line one\nline two\n"
    attrs = ok(nfs.getattr(renamed)).obj_attributes
    assert (attrs.mode, attrs.uid, attrs.gid, attrs.nlink) == (0o640, 1234, 5678, 2)
    assert ok(nfs.getattr(nfs.walk(work, "hard.txt"))).obj_attributes.fileid == attrs.fileid
    assert ok(nfs.readlink(ok(nfs.lookup(work, "sym.txt")).object)).data == b"renamed.txt"
    assert ok(nfs.lookup(work, "fifo")).obj_attributes.type == FileType.FIFO
    assert nfs.lookup(work, "text.txt").status == NfsStat3.NFS3ERR_NOENT
    assert nfs.lookup(work, "tree").status == NfsStat3.NFS3ERR_NOENT
    many = {e.name for e in nfs.listdir(nfs.walk(work, "many"))} - {b".", b".."}
    assert many == {f"f{i}".encode() for i in range(MANY)}


def portmap_mode() -> tuple[bool, int | None] | None:
    """How boot 2's server finds a portmapper: (True, None) to register with the system
    rpcbind answering on 127.0.0.1:111, (True, 111) to be the portmapper, or None if
    something else holds the port."""
    if rpcbind_answers("127.0.0.1", PMAP_PORT):
        return True, None
    if port_listening(PMAP_PORT):
        return None
    return True, PMAP_PORT


def test_linux_client_workload_and_portmapper_mount(tmp_path: Path) -> None:
    data = new_data_dir(tmp_path / "data")
    server = PrismProcess(data, tmp_path / "logs")
    # QEMU's user network connects for the guest from an unprivileged host port.
    server.cli("vm", "set", "vm", "--quota", "1G", "--insecure")

    # Boot 1: explicit ports, no portmapper.
    server.start()
    try:
        mount = nfs_mount_command(
            nfs_port=server.nfs_port, mount_port=server.mount_port, export="/vm"
        )
        run = run_guest(WORKLOAD_1.format(mount=mount, many=MANY), timeout=BOOT_TIMEOUT)
        r = results(run)
        root = server.mount("/vm")
        with server.nfs_client() as nfs:
            check_boot_1(r, nfs, root)
    finally:
        server.stop()

    # Boot 2: the same data, a portmapper, the plain mount command.
    mode = portmap_mode()
    if mode is None:
        pytest.skip("127.0.0.1:111 is taken by something that is not a portmapper")
    server.portmap, server.portmap_port = mode
    server.start()
    try:
        expect = "rpcbind" if mode[1] is None else f"portmap {PMAP_PORT}"
        assert expect in server.ready_line, server.ready_line
        assert pmap_getport("127.0.0.1", NFS_PROGRAM, NFS_V3, IPPROTO_TCP) == server.nfs_port
        mount_port = pmap_getport("127.0.0.1", MOUNT_PROGRAM, MOUNT_V3, IPPROTO_TCP)
        assert mount_port == server.mount_port
        run = run_guest(WORKLOAD_2.format(host=HOST_ADDR), timeout=BOOT_TIMEOUT)
        r2 = results(run)
        assert r2["mounted"] == "yes"
        assert r2["sum_rand"] == r["sum_rand"]
        assert r2["many"] == str(MANY)
        assert r2["many_gone"] == "yes"
        assert parse_df(r2["df"])[1] == QUOTA_KIB
        root = server.mount("/vm")
        with server.nfs_client() as nfs:
            work = nfs.walk(root, "work")
            assert nfs.read_all(nfs.walk(work, "boot2.txt")) == b"written in boot two\n"
            assert nfs.lookup(work, "many").status == NfsStat3.NFS3ERR_NOENT
    finally:
        server.stop()

    # Shutdown unregistered: our portmapper is gone, or rpcbind no longer maps NFS.
    if mode[1] is None:
        assert pmap_getport("127.0.0.1", NFS_PROGRAM, NFS_V3, IPPROTO_TCP) == 0
        assert pmap_getport("127.0.0.1", MOUNT_PROGRAM, MOUNT_V3, IPPROTO_TCP) == 0
    else:
        assert not rpcbind_answers("127.0.0.1", PMAP_PORT)
