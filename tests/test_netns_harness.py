"""The network-namespace harness itself: real, distinct source addresses per test host."""

from __future__ import annotations

import errno
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, netns

from tests.netns import TestHosts, python_env, require_netns

pytestmark = pytest.mark.netns

CLIENT = """
import json, socket, sys
gateway, port, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with socket.create_connection((gateway, port), timeout=10) as s:
    s.sendall(label.encode() + b"\\n")
    print(json.dumps({"sockname": s.getsockname()[0], "echo": s.makefile().readline()}))
"""


@pytest.fixture
def hosts() -> Iterator[TestHosts]:
    require_netns()
    with TestHosts(2) as test_hosts:
        yield test_hosts


def host_link_names() -> set[str]:
    with IPRoute() as ipr:
        return {link.get("IFLA_IFNAME") for link in ipr.get_links()}


def host_addresses() -> set[str]:
    with IPRoute() as ipr:
        return {a.get("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)}


def test_hosts_have_distinct_addresses(hosts: TestHosts) -> None:
    a, b = hosts
    assert len({a.name, b.name}) == 2
    assert len({a.address, b.address, a.gateway, b.gateway}) == 4
    for host in hosts:
        out = host.run(["ip", "-4", "-o", "addr", "show"]).stdout
        assert f"{host.ifname}    inet {host.address}/{host.prefixlen}" in out
        assert "lo    inet 127.0.0.1/8" in out
        assert host.gateway not in out  # the gateway lives on the host side
        assert host.gateway in host_addresses()
        # the repo is importable inside the namespace
        assert host.python("import tests.netns as m; print(m.__name__)").stdout == "tests.netns\n"


def test_server_sees_each_hosts_own_source_address(hosts: TestHosts) -> None:
    seen: dict[str, str] = {}
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(10)
    port = server.getsockname()[1]

    def serve() -> None:
        for _ in range(len(hosts)):
            conn, (peer, _port) = server.accept()
            with conn:
                label = conn.makefile().readline().strip()
                seen[label] = peer
                conn.sendall(f"{peer}\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        replies = {
            host.name: json.loads(host.python(CLIENT, host.gateway, str(port), host.name).stdout)
            for host in hosts
        }
    finally:
        thread.join(timeout=10)
        server.close()

    assert seen == {host.name: host.address for host in hosts}
    for host in hosts:
        assert replies[host.name] == {"sockname": host.address, "echo": f"{host.address}\n"}


def test_host_cannot_reach_another_host(hosts: TestHosts) -> None:
    a, b = hosts
    probe = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 2049), timeout=5).close()
    print(0)
except OSError as exc:
    print(exc.errno)
"""
    assert int(a.python(probe, b.address).stdout) == errno.ENETUNREACH
    assert int(b.python(probe, a.address).stdout) == errno.ENETUNREACH


def test_failed_command_reports_its_output(hosts: TestHosts) -> None:
    with pytest.raises(subprocess.CalledProcessError, match="boom"):
        hosts[0].python("import sys; sys.exit('boom')")
    assert hosts[0].run(["false"], check=False).returncode == 1


def test_cleanup_leaves_nothing_even_after_failure() -> None:
    require_netns()
    names: list[str] = []
    links: list[str] = []
    with pytest.raises(RuntimeError, match="test body failed"), TestHosts(3) as test_hosts:
        names = [h.name for h in test_hosts]
        links = [h.host_ifname for h in test_hosts]
        assert set(names) <= set(netns.listnetns())
        raise RuntimeError("test body failed")
    assert len(names) == 3
    assert not set(names) & set(netns.listnetns())
    assert not set(links) & host_link_names()  # their gateway addresses went with them


def test_crashed_run_is_swept_but_live_run_is_not() -> None:
    require_netns()
    other_run = """
import sys
from tests.netns import TestHosts
with TestHosts(1) as hosts:
    print(hosts[0].name, hosts[0].host_ifname, hosts[0].address, flush=True)
    sys.stdin.readline()
"""
    child = subprocess.Popen(
        [sys.executable, "-c", other_run],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    try:
        assert child.stdout is not None
        name, link, address = child.stdout.readline().split()
        with TestHosts(1) as mine:  # sweeps, but the child still holds its lock
            assert name in netns.listnetns()
            assert mine[0].address != address
        child.send_signal(signal.SIGKILL)  # crash: no cleanup runs in the child
        child.wait(timeout=10)
        assert name in netns.listnetns()
        with TestHosts(1):
            assert name not in netns.listnetns()
            assert link not in host_link_names()
    finally:
        child.kill()
        child.wait(timeout=10)
