"""Address binding and isolation with real, distinct source addresses.

Two network namespaces (tests/netns.py) stand for VMs A and B, each with its own address.
VM filesystems `vma` and `vmb` are bound to those addresses, and `prism serve` listens on
0.0.0.0 in the root namespace. Clients run inside the namespaces (our NFS client, and libnfs'
nfs-ls as an external one) and connect to the host-side gateway address, so the server sees
each namespace's own address. Each reaches its own VM and is refused everywhere else: by
MOUNT, and by NFS with a handle copied from the other namespace or forged. Loopback reaches
neither. Rebinding with `prism vm set` takes effect while the server runs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nfs.const import MountStat3, NfsStat3
from prism.nfs.wire import NfsFh3
from tests.netns import NamespaceHost, TestHosts, require_netns
from tests.op_helpers import PrismServe, prism

pytestmark = pytest.mark.netns

CLIENT = """
import json, sys
from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nfs.wire import NfsFh3

gateway, mount_port, nfs_port, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


def use(fh):
    with NfsClient(gateway, nfs_port, cred=auth_sys()) as c:
        made = c.create(fh, "from-" + label)
        return {
            "getattr": c.getattr(fh).status.name,
            "readdirplus": c.readdirplus(fh).status.name,
            "lookup": c.lookup(fh, "hello").status.name,
            "fsstat": c.fsstat(fh).status.name,
            "create": made.status.name,
            "write": c.write(made.obj, 0, b"hi").status.name if made.ok else None,
        }


out = {}
for arg in sys.argv[5:]:
    kind, _, value = arg.partition("=")
    if kind in ("mnt", "mnt-udp"):
        transport = "udp" if kind == "mnt-udp" else "tcp"
        with MountClient(gateway, mount_port, transport=transport) as m:
            res = m.mnt_raw(value)
        entry = {"status": res.status.name}
        if res.ok:
            entry["fh"] = res.fhandle.data.hex()
            entry["use"] = use(res.fhandle)
        out[arg] = entry
    elif kind == "fh":
        out[arg] = use(NfsFh3(bytes.fromhex(value)))
print(json.dumps(out))
"""

REFUSED = {"NFS3ERR_ACCES", "NFS3ERR_STALE", "NFS3ERR_BADHANDLE", "NFS3ERR_PERM"}
ALL_OK = {
    "getattr": "NFS3_OK",
    "readdirplus": "NFS3_OK",
    "lookup": "NFS3ERR_NOENT",
    "fsstat": "NFS3_OK",
    "create": "NFS3_OK",
    "write": "NFS3_OK",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestHosts, PrismServe]]:
    require_netns()
    data = tmp_path_factory.mktemp("isolation") / "data"
    with TestHosts(2) as hosts:
        a, b = hosts
        prism(data, "vm", "create", "vma", "--client", f"{a.address}/32")
        prism(data, "vm", "create", "vmb", "--client", f"{b.address}/32")
        with PrismServe(data) as server:
            yield hosts, server


def client(host: NamespaceHost, server: PrismServe, *ops: str) -> dict[str, Any]:
    """Run our NFS client inside `host`'s namespace; one result per operation."""
    ports = (str(server.mount_port), str(server.nfs_port))
    proc = host.python(CLIENT, host.gateway, *ports, host.name, *ops)
    return json.loads(proc.stdout)


def assert_refused(result: dict[str, Any]) -> None:
    for proc, status in result.items():
        assert status in REFUSED or status is None, f"{proc} succeeded: {result}"
    assert result["write"] is None  # nothing was created to write to


def forge(handle: bytes, ns_from: bytes) -> bytes:
    """`handle` re-pointed at the namespace named in `ns_from` (version u8 | ns u32 | ...)."""
    return handle[:1] + ns_from[1:5] + handle[5:]


def test_each_vm_reaches_only_its_own_export(world: tuple[TestHosts, PrismServe]) -> None:
    (a, b), server = world
    ra = client(a, server, "mnt=/vma", "mnt=/vmb", "mnt-udp=/vma", "mnt-udp=/vmb")
    assert ra["mnt=/vma"]["status"] == "MNT3_OK" and ra["mnt=/vma"]["use"] == ALL_OK
    assert ra["mnt-udp=/vma"]["status"] == "MNT3_OK"
    assert ra["mnt=/vmb"] == {"status": "MNT3ERR_ACCES"}
    assert ra["mnt-udp=/vmb"] == {"status": "MNT3ERR_ACCES"}
    rb = client(b, server, "mnt=/vmb", "mnt=/vma", "mnt=/vma/", "mnt=/vma@none")
    assert rb["mnt=/vmb"]["status"] == "MNT3_OK" and rb["mnt=/vmb"]["use"] == ALL_OK
    assert rb["mnt=/vma"] == {"status": "MNT3ERR_ACCES"}
    assert rb["mnt=/vma/"] == {"status": "MNT3ERR_ACCES"}
    assert rb["mnt=/vma@none"]["status"] != "MNT3_OK"

    # handles: copied from the other namespace, or forged, are refused
    fh_a = bytes.fromhex(ra["mnt=/vma"]["fh"])
    fh_b = bytes.fromhex(rb["mnt=/vmb"]["fh"])
    forged_into_b = forge(fh_a, fh_b)  # A's handle re-pointed at vmb (MAC no longer fits)
    forged_into_a = forge(fh_b, fh_a)
    spliced = fh_b[:15] + fh_a[15:]  # vmb's body with a MAC taken from vma's handle
    rb = client(b, server, f"fh={fh_a.hex()}", f"fh={forged_into_a.hex()}")
    assert_refused(rb[f"fh={fh_a.hex()}"])
    assert_refused(rb[f"fh={forged_into_a.hex()}"])
    ra = client(a, server, f"fh={fh_b.hex()}", f"fh={forged_into_b.hex()}", f"fh={spliced.hex()}")
    for result in ra.values():
        assert_refused(result)

    # loopback (the root namespace's 127.0.0.1) reaches neither VM, with any handle
    with MountClient("127.0.0.1", server.mount_port) as m:
        assert m.mnt_raw("/vma").status == MountStat3.MNT3ERR_ACCES
        assert m.mnt_raw("/vmb").status == MountStat3.MNT3ERR_ACCES
    with NfsClient("127.0.0.1", server.nfs_port, cred=auth_sys()) as c:
        for fh in (fh_a, fh_b, forged_into_a, spliced):
            assert c.getattr(NfsFh3(fh)).status in (
                NfsStat3.NFS3ERR_ACCES,
                NfsStat3.NFS3ERR_BADHANDLE,
            )
            assert c.create(NfsFh3(fh), "loopback").status != NfsStat3.NFS3_OK
    # nor does the root namespace from the gateway's own address
    with MountClient(a.gateway, server.mount_port, source=(a.gateway, 0)) as m:
        assert m.mnt_raw("/vma").status == MountStat3.MNT3ERR_ACCES


@pytest.mark.skipif(shutil.which("nfs-ls") is None, reason="needs nfs-ls (libnfs-utils)")
def test_external_client_in_a_namespace(world: tuple[TestHosts, PrismServe]) -> None:
    (a, b), server = world
    client(a, server, "mnt=/vma")  # makes /from-<a.name>
    listing = a.run(["nfs-ls", server.url(a.gateway, "/vma")]).stdout
    assert f"from-{a.name}" in listing
    refused = b.run(["nfs-ls", server.url(b.gateway, "/vma")], check=False)
    assert refused.returncode != 0 and "MNT3ERR_ACCES" in refused.stdout + refused.stderr
    assert b.run(["nfs-ls", server.url(b.gateway, "/vmb")]).returncode == 0


def test_rebinding_takes_effect_without_restart(world: tuple[TestHosts, PrismServe]) -> None:
    (a, b), server = world
    before = client(b, server, "mnt=/vmb")["mnt=/vmb"]
    assert before["status"] == "MNT3_OK"
    prism(server.data, "vm", "set", "vmb", "--client", f"{a.address}/32")
    try:
        ra = client(a, server, "mnt=/vmb")
        assert ra["mnt=/vmb"]["status"] == "MNT3_OK" and ra["mnt=/vmb"]["use"] == ALL_OK
        # B lost vmb: MOUNT refuses it and so does every NFS call with B's earlier handle
        rb = client(b, server, "mnt=/vmb", f"fh={before['fh']}")
        assert rb["mnt=/vmb"] == {"status": "MNT3ERR_ACCES"}
        assert_refused(rb[f"fh={before['fh']}"])
    finally:
        prism(server.data, "vm", "set", "vmb", "--client", f"{b.address}/32")
