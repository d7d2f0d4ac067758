"""Issue #14, per-VM export options, against a live `prism serve` over real sockets.

`prism vm set --read-only` bites on the next call: every modifying NFS procedure (and
COMMIT, as knfsd) answers NFS3ERR_ROFS and changes nothing, ACCESS stops granting the write
bits, MNT, reads and listings still work, shared NLM locks are granted and exclusive ones
refused (NLM4_ROFS), and `--read-write` lets writes in again. `--add-client`,
`--remove-client` and `--client none` rebind a running server at once (loopback source
addresses, and a network namespace for a caller outside loopback). Over TCP, UDP and VRPC.
`prism vm rename` keeps handles working; MOUNT EXPORT shows two callers (`showmount -e` and
our client) each its own exports with their options.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nfs.const import (
    ACCESS3_DELETE,
    ACCESS3_EXTEND,
    ACCESS3_LOOKUP,
    ACCESS3_MODIFY,
    ACCESS3_READ,
    Ftype3,
    NfsStat3,
)
from prism.nfs.wire import Sattr3
from prism.nlm.client import NlmClient
from prism.nlm.types import NlmProc, NlmStat
from tests.netns import TestHosts, require_netns
from tests.op_helpers import run_clone
from tests.server_helpers import HOST, PrismProcess, dump_host, prism_cli

ROFS = NfsStat3.NFS3ERR_ROFS
OK = NfsStat3.NFS3_OK


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProcess]:
    path = tmp_path_factory.mktemp("exportopts")
    data = path / "data"
    data.mkdir()
    prism_cli(data, "vm", "create", "vm")
    prism_cli(data, "vm", "create", "pair", "--client", "127.0.0.2", "--insecure")
    with PrismProcess(data, path / "logs", extra_args=("--grace", "0")) as srv:
        yield srv


def _tree(nfs: NfsClient, root: bytes) -> dict[str, object]:
    out: dict[str, object] = {}
    for e in nfs.listdir(root):
        name = e.name.decode()
        if name in (".", ".."):
            continue
        out[name] = e.name_attributes.size if e.name_attributes else None
    return out


@pytest.mark.parametrize("transport", ["tcp", "udp", "vrpc"])
def test_read_only_refuses_every_change_and_bites_at_once(
    server: PrismProcess, transport: str
) -> None:
    root = server.mount("/vm")
    with server.nfs_client(transport) as nfs:
        d = f"d-{transport}"
        top = nfs.mkdir(root, d).obj
        assert top is not None
        f = nfs.create(top, "file").obj
        assert f is not None
        nfs.write_all(f, b"hello")
        nfs.mkdir(top, "sub")
        nfs.symlink(top, "link", "file")
        before = _tree(nfs, top)

        server.cli("vm", "set", "vm", "--read-only")
        try:
            # the next call, on the handles the client already holds
            res = nfs.write(f, 0, b"X")
            assert res.status == ROFS
            assert res.file_wcc.after is not None  # the failure body still tells the file
            assert nfs.setattr(f, Sattr3(size=0)).status == ROFS
            assert nfs.setattr(f, Sattr3(mode=0o600)).status == ROFS
            assert nfs.create(top, "new").status == ROFS
            assert nfs.mkdir(top, "newdir").status == ROFS
            assert nfs.symlink(top, "l2", "x").status == ROFS
            assert nfs.mknod(top, "fifo", Ftype3.FIFO).status == ROFS
            assert nfs.remove(top, "file").status == ROFS
            assert nfs.rmdir(top, "sub").status == ROFS
            assert nfs.rename(top, "file", top, "moved").status == ROFS
            assert nfs.link(f, top, "hard").status == ROFS
            assert nfs.commit(f).status == ROFS
            # reading, listing and mounting go on
            assert nfs.read_all(f) == b"hello"
            assert nfs.lookup(top, "file").status == OK
            assert nfs.getattr(f).status == OK
            assert _tree(nfs, top) == before
            everything = ACCESS3_READ | ACCESS3_LOOKUP | ACCESS3_MODIFY | ACCESS3_EXTEND
            granted = nfs.access(f, everything | ACCESS3_DELETE).access
            assert granted & ACCESS3_READ
            assert not granted & (ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE)
            assert server.mount("/vm") == root
        finally:
            server.cli("vm", "set", "vm", "--read-write")
        assert nfs.write(f, 0, b"J").status == OK
        assert nfs.read_all(f) == b"Jello"
        assert nfs.access(f, ACCESS3_MODIFY).access & ACCESS3_MODIFY


def test_read_only_nlm_grants_shared_refuses_exclusive(server: PrismProcess) -> None:
    """As knfsd, which opens the file for writing to lock it exclusively: a read-only
    export grants shared locks; exclusive ones (LOCK, TEST) get NLM4_ROFS (v4), DENIED
    (v1); a lock held from before the switch can still be unlocked."""
    root = server.mount("/vm")
    with server.nfs_client() as nfs:
        fh = nfs.create(root, "locked").obj
        assert fh is not None
    held = NlmClient(HOST, server.nfs_port, caller_name="before")
    early = held.alock(fh.data, 100, 10)
    assert held.lock(early, True, proc=NlmProc.NM_LOCK).stat == NlmStat.GRANTED
    server.cli("vm", "set", "vm", "--read-only")
    try:
        with held:
            assert held.unlock(early).stat == NlmStat.GRANTED
        with NlmClient(HOST, server.nfs_port, caller_name="ro") as nlm:
            lock = nlm.alock(fh.data)
            assert nlm.lock(lock, False, proc=NlmProc.NM_LOCK).stat == NlmStat.GRANTED
            assert nlm.unlock(lock).stat == NlmStat.GRANTED
            assert nlm.lock(lock, True, proc=NlmProc.NM_LOCK).stat == NlmStat.ROFS
            assert nlm.test(lock, True).stat == NlmStat.ROFS
            assert nlm.test(lock, False).stat == NlmStat.GRANTED
        with NlmClient(HOST, server.nfs_port, vers=1, caller_name="ro1") as nlm1:
            lock = nlm1.alock(fh.data)
            assert nlm1.lock(lock, True).stat == NlmStat.DENIED
    finally:
        server.cli("vm", "set", "vm", "--read-write")
    with NlmClient(HOST, server.nfs_port, caller_name="rw") as nlm:
        lock = nlm.alock(fh.data)
        assert nlm.lock(lock, True, proc=NlmProc.NM_LOCK).stat == NlmStat.GRANTED
        assert nlm.unlock(lock).stat == NlmStat.GRANTED


def _mnt_status(srv: PrismProcess, source: str) -> int:
    with MountClient(HOST, srv.mount_port, cred=auth_sys(), source=(source, 0)) as m:
        return int(m.mnt_raw("/pair").status)


def test_add_remove_client_and_none_rebind_a_running_server(server: PrismProcess) -> None:
    assert _mnt_status(server, "127.0.0.2") == 0
    assert _mnt_status(server, "127.0.0.3") != 0
    with MountClient(HOST, server.mount_port, cred=auth_sys(), source=("127.0.0.2", 0)) as m:
        fh, _ = m.mnt("/pair")
    nfs2 = NfsClient(HOST, server.nfs_port, cred=auth_sys(), source=("127.0.0.2", 0))
    nfs3 = NfsClient(HOST, server.nfs_port, cred=auth_sys(), source=("127.0.0.3", 0))
    with nfs2, nfs3:
        assert nfs2.getattr(fh).status == OK
        assert nfs3.getattr(fh).status == NfsStat3.NFS3ERR_ACCES

        server.cli("vm", "set", "pair", "--add-client", "127.0.0.3/32")
        assert nfs3.getattr(fh).status == OK  # the next call of a connected client
        assert _mnt_status(server, "127.0.0.3") == 0

        server.cli("vm", "set", "pair", "--remove-client", "127.0.0.2")
        assert nfs2.getattr(fh).status == NfsStat3.NFS3ERR_ACCES
        assert nfs3.getattr(fh).status == OK
        shown = json.loads(server.cli("vm", "show", "pair", "--json").stdout)
        assert shown["clients"] == ["127.0.0.3/32"]

        server.cli("vm", "set", "pair", "--client", "none")
        shown = json.loads(server.cli("vm", "show", "pair", "--json").stdout)
        assert shown["clients"] == []  # loopback only, which 127.0.0.2 and .3 are part of
        assert _mnt_status(server, "127.0.0.2") == 0
    server.cli("vm", "set", "pair", "--client", "127.0.0.2")


PROBE = """
import json, sys
from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nfs.wire import NfsFh3

gateway, mount_port, nfs_port, fh = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with MountClient(gateway, mount_port, cred=auth_sys()) as m:
    res = m.mnt_raw("/far")
out = {"mnt": res.status.name, "fh": res.fhandle.data.hex() if res.ok else None}
if fh != "-":
    with NfsClient(gateway, nfs_port, cred=auth_sys()) as c:
        out["getattr"] = c.getattr(NfsFh3(bytes.fromhex(fh))).status.name
print(json.dumps(out))
"""


def test_client_none_sends_a_remote_caller_back_out(tmp_path: Path) -> None:
    """A caller with a real non-loopback address (a network namespace): admitted by
    `--add-client`, refused again on its next call after `--client none`."""
    require_netns()
    data = tmp_path / "data"
    prism_cli(data, "vm", "create", "far")
    with TestHosts(1) as hosts, PrismProcess(data, tmp_path / "logs", bind="0.0.0.0") as srv:
        host = hosts[0]

        def probe(fh: str = "-") -> dict[str, str]:
            argv = [host.gateway, str(srv.mount_port), str(srv.nfs_port), fh]
            return dict(json.loads(host.python(PROBE, *argv).stdout))

        assert probe()["mnt"] == "MNT3ERR_ACCES"
        srv.cli("vm", "set", "far", "--add-client", host.address)
        first = probe()
        assert first["mnt"] == "MNT3_OK"
        assert probe(first["fh"])["getattr"] == "NFS3_OK"
        srv.cli("vm", "set", "far", "--client", "none")
        assert probe(first["fh"]) == {
            "mnt": "MNT3ERR_ACCES",
            "fh": None,
            "getattr": "NFS3ERR_ACCES",
        }


def test_client_list_errors_change_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prism_cli(data, "vm", "create", "web", "--client", "10.0.0.0/24")
    bad = prism_cli(data, "vm", "set", "web", "--remove-client", "10.9.0.0/24", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "prism: error: 10.9.0.0/24 is not among web's clients (10.0.0.0/24); nothing was changed"
    ]
    mixed = prism_cli(
        data, "vm", "set", "web", "--client", "none", "--client", "10.1.0.0/16", check=False
    )
    assert mixed.returncode != 0 and "--client none stands alone" in mixed.stderr
    garbage = prism_cli(data, "vm", "set", "web", "--add-client", "10.0.0.300", check=False)
    assert "invalid client address '10.0.0.300'" in garbage.stderr
    shown = json.loads(prism_cli(data, "vm", "show", "web", "--json").stdout)
    assert shown["clients"] == ["10.0.0.0/24"]
    # adding twice lists once; create takes --read-only and `--client none`
    prism_cli(data, "vm", "set", "web", "--add-client", "10.0.0.0/24", "--add-client", "::1")
    shown = json.loads(prism_cli(data, "vm", "show", "web", "--json").stdout)
    assert shown["clients"] == ["10.0.0.0/24", "::1/128"]
    prism_cli(data, "vm", "create", "cold", "--read-only", "--client", "none")
    assert (
        json.loads(run_clone(data, "warm", "cold", "--client", "none", "--json").stdout)["vm"][
            "clients"
        ]
        == []
    )
    cold = json.loads(prism_cli(data, "vm", "show", "cold", "--json").stdout)
    assert (cold["clients"], cold["readonly"], cold["options"]) == (
        [],
        True,
        "ro,secure,no_root_squash",
    )
    text = prism_cli(data, "vm", "show", "cold").stdout
    assert "options:   ro,secure,no_root_squash" in text
    listed = prism_cli(data, "vm", "list", "-H", "-o", "name,options").stdout.splitlines()
    assert listed == [  # a clone takes new-VM options, not its source's
        "cold\tro,secure,no_root_squash",
        "warm\trw,secure,no_root_squash",
        "web\trw,secure,no_root_squash",
    ]


def test_rename_keeps_handles_and_moves_everything(tmp_path: Path) -> None:
    """`prism vm rename` under a running server: a client's handles from before go on
    reading and writing, the export is /NEW (and /NEW@SNAP), and shares, token, quota and
    options follow; a taken or invalid NEW is refused in one line, changing nothing."""
    data = tmp_path / "data"
    prism_cli(data, "vm", "create", "old", "--quota", "1G", "--anon-uid", "1234")
    prism_cli(data, "vm", "create", "other")
    with PrismProcess(data, tmp_path / "logs") as srv:
        root = srv.mount("/old")
        with srv.nfs_client() as nfs:
            d = nfs.mkdir(root, "shared").obj
            f = nfs.create(d, "f").obj
            assert d is not None and f is not None
            nfs.write_all(f, b"before")
            srv.cli("snapshot", "create", "old", "mon")
            srv.cli("share", "old:/shared", "other:/from-old", "--rw")
            token = srv.cli("vm", "vrpc-token", "old").stdout.strip()
            snap_root = srv.mount("/old@mon")

            for taken, why in (("other", "'other' already exists"), ("Bad/x", "invalid VM")):
                bad = srv.cli("vm", "rename", "old", taken, check=False)
                assert bad.returncode != 0 and "Traceback" not in bad.stderr
                (line,) = bad.stderr.strip().splitlines()
                assert why in line, line
            snap = srv.cli("vm", "rename", "old@mon", "new", check=False)
            assert "is a snapshot" in snap.stderr

            out = srv.cli("vm", "rename", "old", "new").stdout
            assert out.startswith("renamed VM old to new: export /new")
            # the handles the client holds keep working, both ways
            assert nfs.read_all(f) == b"before"
            assert nfs.write(f, 0, b"AFTER!").status == OK
            assert nfs.create(root, "made-after").status == OK
            assert nfs.getattr(snap_root).status == OK
        with srv.mount_client() as m:
            assert m.mnt_raw("/old").status != 0
            assert m.mnt_raw("/old@mon").status != 0
            assert m.mnt("/new")[0] == root
            assert m.mnt("/new@mon")[0] == snap_root
        with srv.nfs_client() as nfs:
            other = srv.mount("/other")
            via_share = nfs.walk(other, "from-old/f")
            assert nfs.read_all(via_share) == b"AFTER!"

    shown = json.loads(prism_cli(data, "vm", "show", "new", "--json").stdout)
    assert (shown["name"], shown["export"], shown["quota"], shown["anon_uid"]) == (
        "new",
        "/new",
        1 << 30,
        1234,
    )
    assert shown["snapshots"] == ["mon"]
    assert prism_cli(data, "vm", "vrpc-token", "new").stdout.strip() == token
    other_shares = json.loads(prism_cli(data, "vm", "show", "other", "--json").stdout)["shares"]
    assert other_shares == [{"path": "/from-old", "source": "new:/shared", "rw": True}]
    names = [vm["name"] for vm in json.loads(prism_cli(data, "vm", "list", "--json").stdout)]
    assert names == ["new", "other"]
    assert "clean" in prism_cli(data, "fsck").stdout


def test_dump_shows_mounts_under_the_current_names_and_forgets_removed_vms(
    tmp_path: Path,
) -> None:
    """MOUNT DUMP renders each mount under its VM's export path of the moment: after `prism
    vm rename` the new one (snapshots too), after `prism vm rm` none; UMNT of the path a
    client mounted before the rename, or of the path DUMP shows now, forgets the entry."""
    data = tmp_path / "data"
    prism_cli(data, "vm", "create", "old")
    prism_cli(data, "vm", "create", "gone")
    with PrismProcess(data, tmp_path / "logs") as srv:
        root = srv.mount("/old")
        with srv.nfs_client(vm="old") as nfs:
            assert nfs.mkdir(root, "sub").status == OK
        srv.cli("snapshot", "create", "old", "mon")
        with srv.mount_client(vm="old") as m:
            me = dump_host(m)
            for path in ("/old", "//old/./sub/", "/old@mon", "/gone"):
                m.mnt(path)

            def mine() -> set[bytes]:
                return {d for h, d in m.dump() if h == me}

            assert mine() == {b"/old", b"/old/sub", b"/old@mon", b"/gone"}
            srv.cli("vm", "rename", "old", "new")
            assert mine() == {b"/new", b"/new/sub", b"/new@mon", b"/gone"}
            srv.cli("vm", "rm", "gone")
            assert mine() == {b"/new", b"/new/sub", b"/new@mon"}
            srv.cli("vm", "create", "gone")  # a new VM of that name is not the removed one
            assert mine() == {b"/new", b"/new/sub", b"/new@mon"}

            m.umnt("/old/sub")  # the path it mounted, before the rename
            assert mine() == {b"/new", b"/new@mon"}
            m.umnt("/new@mon")  # the path DUMP shows now
            assert mine() == {b"/new"}
            m.mnt("/new")  # mounted again under the new name: one entry shown, two kept
            assert mine() == {b"/new"}
            m.umnt("/old")
            assert mine() == {b"/new"}
            m.umnt("/new")
            assert mine() == set()


def test_export_shows_each_caller_its_exports_with_options(tmp_path: Path) -> None:
    """MOUNT EXPORT from two addresses, by `showmount -e` and by Prism's own client: the
    server runs inside a network namespace with its own portmapper on port 111, and is
    asked from inside (loopback) and from the host (the namespace's gateway address)."""
    require_netns()
    if shutil.which("showmount") is None:
        pytest.skip("showmount (nfs-common) is not installed")
    data = tmp_path / "data"
    with TestHosts(1) as hosts:
        host = hosts[0]
        prism_cli(data, "vm", "create", "near", "--read-only")  # loopback only
        prism_cli(data, "vm", "create", "far", "--client", host.gateway, "--insecure")
        prism_cli(data, "vm", "set", "far", "--squash", "root", "--anon-uid", "7")
        prism_cli(data, "vm", "create", "both", "--client", "127.0.0.0/8")
        prism_cli(data, "vm", "set", "both", "--add-client", f"{host.gateway}/32")
        prism_cli(data, "snapshot", "create", "far", "s1")
        srv = PrismProcess(
            data,
            tmp_path / "logs",
            bind="0.0.0.0",
            portmap=True,
            wrap=host.command([]),
            address=host.address,
        )
        with srv:
            inside = {
                b"/near": (  # no clients: loopback, both families
                    b"127.0.0.0/8(ro,secure,no_root_squash)",
                    b"::1/128(ro,secure,no_root_squash)",
                ),
                b"/both": (
                    b"127.0.0.0/8(rw,secure,no_root_squash)",
                    f"{host.gateway}/32(rw,secure,no_root_squash)".encode(),
                ),
            }
            far = f"{host.gateway}/32(rw,insecure,root_squash,anonuid=7,anongid=65534)"
            outside = {
                b"/far": (far.encode(),),
                b"/far@s1": (far.replace("rw,", "ro,").encode(),),
                b"/both": inside[b"/both"],
            }
            with MountClient(host.address, srv.mount_port, cred=auth_sys()) as m:
                assert dict(m.export()) == outside
            got = host.python(
                "import json, sys; from prism.nfs.client import MountClient\n"
                "with MountClient('127.0.0.1', int(sys.argv[1])) as m:\n"
                "    print(json.dumps({p.decode(): [g.decode() for g in gs]"
                " for p, gs in m.export()}))",
                str(srv.mount_port),
            ).stdout
            assert json.loads(got) == {
                path.decode(): [g.decode() for g in groups] for path, groups in inside.items()
            }

            def showmount(argv: list[str]) -> dict[str, str]:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
                lines = out.stdout.strip().splitlines()[1:]  # after "Export list for ..."
                return dict(line.split(None, 1) for line in lines)

            assert showmount(["showmount", "-e", host.address]) == {
                path.decode(): ",".join(g.decode() for g in groups)
                for path, groups in outside.items()
            }
