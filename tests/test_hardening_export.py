"""Issue #10 item 19: MOUNT EXPORT lists only what the caller may mount.

Before, any address got every VM and its client ranges. Against a live `prism serve`, from
several loopback source addresses over TCP and UDP: each sees its own VMs (and their
snapshots), an address bound to no VM sees nothing, and a rebinding shows at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prism.nfs.client import MountClient, auth_sys
from tests.server_helpers import HOST, PrismProcess, prism_cli


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProcess]:
    path = tmp_path_factory.mktemp("export")
    data = path / "data"
    data.mkdir()
    prism_cli(data, "vm", "create", "alpha", "--client", "127.0.0.2/32")
    prism_cli(data, "vm", "create", "beta", "--client", "127.0.0.3/32", "--client", "10.9.0.0/16")
    prism_cli(data, "vm", "create", "gamma", "--client", "10.8.0.0/16")
    prism_cli(data, "vm", "create", "wide", "--client", "127.0.0.0/30")
    prism_cli(data, "snapshot", "create", "alpha", "monday")
    with PrismProcess(data, path / "logs") as srv:
        yield srv


RW, RO = b"(rw,secure,no_root_squash)", b"(ro,secure,no_root_squash)"
"""Each group is a CIDR with the export's options (issue #14), as `exportfs -v` prints."""


def exports(srv: PrismProcess, source: str, transport: str) -> dict[bytes, tuple[bytes, ...]]:
    with MountClient(HOST, srv.mount_port, transport, cred=auth_sys(), source=(source, 0)) as m:
        return dict(m.export())


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_export_lists_only_what_the_caller_may_mount(server: PrismProcess, transport: str) -> None:
    assert exports(server, "127.0.0.2", transport) == {
        b"/alpha": (b"127.0.0.2/32" + RW,),
        b"/alpha@monday": (b"127.0.0.2/32" + RO,),
        b"/wide": (b"127.0.0.0/30" + RW,),
    }
    assert exports(server, "127.0.0.3", transport) == {
        b"/beta": (b"127.0.0.3/32" + RW, b"10.9.0.0/16" + RW),
        b"/wide": (b"127.0.0.0/30" + RW,),
    }
    assert exports(server, "127.0.0.9", transport) == {}  # bound to no VM: nothing


def test_rebinding_shows_at_once(server: PrismProcess) -> None:
    assert b"/gamma" not in exports(server, "127.0.0.9", "tcp")
    server.cli("vm", "set", "gamma", "--client", "127.0.0.9/32")
    try:
        assert exports(server, "127.0.0.9", "tcp") == {b"/gamma": (b"127.0.0.9/32" + RW,)}
        with MountClient(HOST, server.mount_port, cred=auth_sys(), source=("127.0.0.9", 0)) as m:
            m.mnt("/gamma")  # what EXPORT shows can be mounted
    finally:
        server.cli("vm", "set", "gamma", "--client", "10.8.0.0/16")
    assert exports(server, "127.0.0.9", "tcp") == {}
