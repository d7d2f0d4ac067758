"""What a guest needs for NFS file locking: rpcbind, rpc.statd and sm-notify, and `lockf`.

The daemons are the host's Debian binaries (rpcbind, nfs-common) with the libraries they
load, copied into the guest's initramfs (`harness.host_programs`); `lockf` is a static
fcntl/flock tool built from lockf.c. `LOCK_SETUP` starts them the way a booting Debian
does (rpcbind, rpc-statd, then rpc-statd-notify: statd 2.6 no longer runs sm-notify
itself): sm-notify tells every server in /var/lib/nfs/sm that this client restarted (none
on a first boot; a test that reboots a guest carries the directory over, as a disk would).
Their messages go to busybox syslogd's ring buffer: `logread` in the guest shows them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.guest.harness import host_programs

DAEMONS = ("/usr/sbin/rpcbind", "/usr/sbin/rpc.statd", "/usr/sbin/sm-notify")
LOCKF_SOURCE = Path(__file__).with_name("lockf.c")
#: The status monitor's directory, and where a reboot finds its saved copy (a tar).
NFS_STATE_DIR = "/var/lib/nfs"
NFS_STATE_TAR = "/nfs-state.tar"
ETC_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    "_rpc:x:100:65534::/run/rpcbind:/bin/false\n"
    "statd:x:101:65534::/var/lib/nfs:/bin/false\n"
)
LOCK_SETUP = f"""
syslogd -C256
mkdir -p {NFS_STATE_DIR}/sm {NFS_STATE_DIR}/sm.bak /run/rpcbind
if [ -f {NFS_STATE_TAR} ]; then tar xf {NFS_STATE_TAR} -C {NFS_STATE_DIR}; fi
chown -R statd {NFS_STATE_DIR}
rpcbind -w
rpc.statd
sm-notify
"""


def missing_tools() -> str | None:
    """Why guests cannot run the lock stack here (for pytest.skip), or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed"
    if not all(Path(p).exists() for p in DAEMONS):
        return "rpcbind and nfs-common not installed"
    if shutil.which("gcc") is None:
        return "gcc is needed to build lockf"
    return None


def build_lockf(tmp: Path) -> bytes:
    out = tmp / "lockf"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(LOCKF_SOURCE)], check=True)
    return out.read_bytes()


def lock_files(tmp: Path, hosts: str = "127.0.0.1 localhost prism-guest\n") -> dict[str, bytes]:
    """The `files` a guest needs for locking: daemons, `lockf`, users, RPC config."""
    files = host_programs(DAEMONS)
    files["/bin/lockf"] = build_lockf(tmp)
    files["/etc/passwd"] = ETC_PASSWD.encode()
    files["/etc/hosts"] = hosts.encode()
    for etc in ("/etc/netconfig", "/etc/rpc", "/etc/protocols", "/etc/services"):
        files[etc] = Path(etc).read_bytes()  # libtirpc's transports, RPC program names
    files["/etc/nsswitch.conf"] = b"passwd: files\ngroup: files\nhosts: files\n"
    return files
