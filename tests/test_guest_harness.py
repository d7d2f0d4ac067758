"""The QEMU guest boots, has the NFS client loaded, and reaches the host's loopback; guests on
a GuestLan have addresses of their own."""

from __future__ import annotations

import base64
import secrets
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.guest.harness import (
    HOST_ADDR,
    GuestSession,
    GuestTimeout,
    ensure_guest_image,
    run_guest,
    start_all,
)
from tests.guest.lan import SERVER_ADDR, GuestLan
from tests.netns import require_netns

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


ECHO_PEER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
srv.settimeout(120)
print(srv.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    conn, peer = srv.accept()
    with conn:
        conn.sendall(peer[0].encode() + b"\\n")
"""
CALL_GUEST = """
import socket, sys
import time
deadline = time.monotonic() + 10
while True:  # the guest's listener was started in the background: it may not listen yet
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
with s:
    s.sendall(sys.argv[3].encode() + b"\\n")
"""


@pytest.mark.guest
@pytest.mark.netns
def test_tap_guests_are_distinct_clients_the_server_can_call() -> None:
    """Two guests on a GuestLan: a server in the namespace sees each at its own address, and
    can open connections to each (what NLM callbacks need); commands run in a session."""
    require_netns()
    with GuestLan(2) as lan:
        nets = [lan.guest_net(i) for i in range(2)]
        echo = lan.host.popen(
            [sys.executable, "-c", ECHO_PEER, SERVER_ADDR, "2"], stdout=subprocess.PIPE
        )
        guests = [GuestSession(net=net, name=net.hostname) for net in nets]
        try:
            assert echo.stdout is not None
            port = int(echo.stdout.readline())
            start_all(guests)
            for g, net in zip(guests, nets, strict=True):
                assert g.check("hostname").strip() == net.hostname
                seen = g.check(f"echo hi | nc -w 10 {SERVER_ADDR} {port}").strip()
                assert seen == net.address
                token = secrets.token_hex(8)
                # the listener reads no stdin (a session's stdin never closes) and the token is
                # awaited on the file, not on nc's exit, which busybox may delay
                g.check("nc -l -p 7777 < /dev/null > /tmp/got 2>&1 & echo $! > /tmp/nc.pid")
                lan.host.python(CALL_GUEST, net.address, "7777", token, timeout=30)
                got = g.check(
                    "for i in $(seq 200); do [ -s /tmp/got ] && break; sleep 0.1; done; "
                    "kill $(cat /tmp/nc.pid) 2>/dev/null; cat /tmp/got"
                )
                assert got.strip() == token
                assert g.run("exit_code_is_kept() { return 3; }; exit_code_is_kept").exit_code == 3
        finally:
            for g in guests:
                g.close()
            echo.kill()
            echo.wait()


@pytest.mark.guest
def test_session_answers_in_order_and_powers_off_after_its_lifetime() -> None:
    """A command that times out does not hand its late answer to the next one; a session
    outliving its test process does not leave QEMU running for ever."""
    with GuestSession(lifetime=15, name="short") as g:
        assert g.check("echo up") == "up\n"
        with pytest.raises(GuestTimeout):
            g.run("sleep 3; echo late", timeout=1)
        assert g.check("echo next") == "next\n"
        deadline = time.monotonic() + 120
        while g.running and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not g.running
        assert "PRISM-GUEST-LIFETIME-OVER" in g.console


@pytest.mark.guest
def test_a_command_line_that_lost_its_start_is_not_run_and_is_sent_again() -> None:
    """ash's ``read`` drops the part of a line it had read when a signal interrupts it (a
    background job ending while the next command arrives): what is left of the line must not
    run, and the command it was must still be answered."""
    with GuestSession(name="garbled") as g:
        assert g.check("rm -f /tmp/ran; echo ready") == "ready\n"
        remnant = b"7 " + base64.b64encode(b"touch /tmp/ran") + b"\n"  # tag and start lost
        g.send_raw_line_for_test(remnant)
        assert g.check("echo next") == "next\n"
        assert g.garbled_lines == 1
        assert g.run("test -e /tmp/ran").exit_code == 1
