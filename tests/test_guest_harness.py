"""The QEMU guest boots, has the NFS client loaded, and reaches the host's loopback."""

from __future__ import annotations

import secrets
import socket
import threading

import pytest

from tests.guest.harness import (
    HOST_ADDR,
    GuestTimeout,
    ensure_guest_image,
    run_guest,
)

LISTENER_TIMEOUT_S = 120


class _TokenListener:
    """Accept one connection on 127.0.0.1, read a line, answer ``ack <line>`` and close."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(LISTENER_TIMEOUT_S)
        self.port: int = self._server.getsockname()[1]
        self.received: bytes | None = None
        self.peer: tuple[str, int] | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, self.peer = self._server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(LISTENER_TIMEOUT_S)
            line = conn.makefile("rb").readline()
            self.received = line
            conn.sendall(b"ack " + line)

    def close(self) -> None:
        self._server.close()
        self._thread.join(timeout=5)


@pytest.mark.guest
def test_guest_boots_loads_nfs_and_reaches_host() -> None:
    image = ensure_guest_image()
    token = secrets.token_hex(8)
    listener = _TokenListener()
    script = f"""
echo "kernel=$(uname -r)"
grep -qw nfs /proc/filesystems && echo "fs-nfs=yes"
echo "modules=$(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ,)"
echo "reply=$(echo {token} | nc -w 30 {HOST_ADDR} {listener.port})"
exit 7
"""
    try:
        run = run_guest(script, timeout=120)
    finally:
        listener.close()

    out = run.workload_output
    assert run.exit_code == 7, run.output
    assert f"kernel={image.kernel_release}\n" in out
    assert "fs-nfs=yes\n" in out
    modules = next(line for line in out.splitlines() if line.startswith("modules="))
    for name in ("nfsv3", "nfs", "sunrpc", "lockd", "grace", "nfs_acl", "virtio_net"):
        assert name in modules.removeprefix("modules=").split(","), modules
    assert listener.received == f"{token}\n".encode()
    assert listener.peer is not None and listener.peer[1] >= 1024  # user networking: no resvport
    assert f"reply=ack {token}\n" in out


@pytest.mark.guest
def test_guest_timeout_kills_qemu() -> None:
    with pytest.raises(GuestTimeout):
        run_guest("sleep 600", timeout=1.5)
