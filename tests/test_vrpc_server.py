"""VRPC against a real `prism serve`: the control socket, channels bound to one VM, who may
attach (peer credentials, tokens), revocation, limits, and the accounting.

One server serves the module, its control socket in a directory every user can reach (the
data directory is the server's alone), so that children that drop root can attach too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.nfs.client import NfsFh3  # (the wire types, wherever the client takes them from)
from prism.nfs.const import MountStat3, NfsStat3, StableHow
from rpc.client import GarbageArgsError
from tests.server_helpers import REPO_ROOT, PrismProcess, new_data_dir
from tests.vrpc_helpers import (
    as_user,
    mount_over,
    nfs_over,
    reachable_dir,
    socket_of,
)
from vrpc import abi
from vrpc.client import AttachRefused, ServerGone, VrpcChannel
from vrpc.control import MAX_CHANNELS_PER_UID, MAX_MESSAGE, RefuseStatus, decode_reply
from vrpc.native import BACKEND
from vrpc.server import ATTACH_TIMEOUT, MAX_PENDING

MiB = 1 << 20
UNLISTED, LISTED, GROUP_MEMBER, GROUP = 1002, 1001, 1003, 2000


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProcess]:
    base = tmp_path_factory.mktemp("vrpc-server")
    data = new_data_dir(base / "data", ["vm", "other"])
    sockdir = reachable_dir()
    server = PrismProcess(
        data,
        base / "logs",
        extra_args=["--vrpc", str(sockdir / "vrpc.sock"), "--metrics", "127.0.0.1:0"],
    )
    with server:
        yield server
    shutil.rmtree(sockdir, ignore_errors=True)


def sock(srv: PrismProcess) -> Path:
    return socket_of(srv.ready_line)


def attach(srv: PrismProcess, vm: str = "vm", **kw: object) -> VrpcChannel:
    return VrpcChannel.attach(sock(srv), vm, **kw)  # type: ignore[arg-type]


def metrics(srv: PrismProcess) -> dict[str, float]:
    m = re.search(r"metrics :(\d+)", srv.ready_line)
    assert m, srv.ready_line
    with urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith(("prism_vrpc", "prism_rpc_calls_total", "prism_vm_calls_total")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def refused(fn: object) -> tuple[str, str]:
    """(status name, message) of the AttachRefused that `fn()` raises."""
    with pytest.raises(AttachRefused) as info:
        fn()  # type: ignore[operator]
    return info.value.status.name, info.value.message


def workdir(srv: PrismProcess, name: str) -> NfsFh3:
    with srv.nfs_client() as tcp:
        res = tcp.mkdir(srv.mount("/vm"), name)
        assert res.ok, res.status
        assert res.obj is not None
        return res.obj


# -- the socket and the calls ----------------------------------------------------------------


def test_ready_line_names_a_socket_anyone_may_reach(srv: PrismProcess) -> None:
    path = sock(srv)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666  # peer credentials decide, not the mode


def test_default_socket_is_in_the_data_directory_and_no_vrpc_means_none(
    tmp_path: Path,
) -> None:
    data = new_data_dir(tmp_path / "data")
    with PrismProcess(data, tmp_path / "logs") as server:
        assert socket_of(server.ready_line) == data / "vrpc.sock"
        with VrpcChannel.attach(data / "vrpc.sock", "vm") as ch:
            assert nfs_over(ch).getattr(ch.root_fh).ok
    assert not (data / "vrpc.sock").exists()  # removed at a clean stop
    with PrismProcess(data, tmp_path / "logs2", extra_args=["--no-vrpc"]) as server:
        assert "no vrpc" in server.ready_line
        assert not (data / "vrpc.sock").exists()


def _serve_fails(data: Path, vrpc: str) -> str:
    """Start `prism serve --vrpc VRPC` on `data`; it must exit 2 at once: its stderr."""
    launcher = PrismProcess(data, data.parent / "logs", nfs_port=0, mount_port=0)
    argv = [*launcher.argv(), "--vrpc", vrpc]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stderr


def test_a_socket_in_use_or_a_bad_path_is_refused_with_a_hint(
    srv: PrismProcess, tmp_path: Path
) -> None:
    data = new_data_dir(tmp_path / "data")
    err = _serve_fails(data, str(sock(srv)))  # another data directory, the same socket
    assert "another server listens for VRPC" in err and "--no-vrpc" in err
    with attach(srv) as ch:  # the running server kept its socket
        assert nfs_over(ch).getattr(ch.root_fh).ok
    err = _serve_fails(data, str(tmp_path / "missing" / "vrpc.sock"))
    assert "cannot listen for VRPC on" in err and "missing" in err
    (tmp_path / "file").write_text("not a socket")
    assert "is not a socket" in _serve_fails(data, str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "not a socket"


def test_nfs_calls_over_vrpc_answer_as_over_tcp(srv: PrismProcess) -> None:
    wd = workdir(srv, "same-answers")
    root = srv.mount("/vm")
    payload = os.urandom(MiB)
    with attach(srv) as ch, srv.nfs_client() as tcp:
        assert ch.root_fh == root.data  # ATTACHED carries the VM's root handle
        vr = nfs_over(ch)
        vr.null()
        assert vr.getattr(root) == tcp.getattr(root)
        created = vr.create(wd, "f")
        assert created.ok and created.obj is not None
        fh = created.obj
        assert vr.lookup(wd, "f") == tcp.lookup(wd, "f")
        assert vr.lookup(wd, "f").object == fh
        wrote = vr.write(fh, 0, payload, StableHow.FILE_SYNC)
        assert wrote.ok and wrote.count == MiB, wrote.status
        assert tcp.write(fh, MiB, payload[::-1], StableHow.FILE_SYNC).ok
        for offset, want in ((0, payload), (MiB, payload[::-1])):
            over_vrpc, over_tcp = vr.read(fh, offset, MiB), tcp.read(fh, offset, MiB)
            assert over_vrpc.ok and over_vrpc.data == want
            assert (over_vrpc.data, over_vrpc.eof) == (over_tcp.data, over_tcp.eof)
        assert vr.getattr(fh) == tcp.getattr(fh)
        attrs = vr.getattr(fh).obj_attributes
        assert attrs is not None and attrs.size == 2 * MiB
        assert vr.lookup(wd, "missing").status == tcp.lookup(wd, "missing").status
        with pytest.raises(GarbageArgsError):  # RPC-level errors are answered, not fatal
            ch.rpc(100003, 3).call(1, b"\x00\x00\x00\x05junk")
        assert vr.getattr(fh).ok  # the channel lives on


def test_a_channel_reaches_its_vm_its_snapshots_and_shares_only(srv: PrismProcess) -> None:
    srv.cli("snapshot", "create", "vm", "s1")
    with srv.nfs_client() as tcp:
        other_root = srv.mount("/other")
        assert tcp.mkdir(other_root, "shared").ok
    srv.cli("share", "other:/shared", "vm:/from-other", "--rw")
    with attach(srv) as ch, attach(srv, "other") as other_ch:
        vr, mnt = nfs_over(ch), mount_over(ch)
        assert vr.getattr(other_root).status == NfsStat3.NFS3ERR_ACCES
        assert mnt.mnt_raw("/other").status == MountStat3.MNT3ERR_ACCES
        snap_root, _ = mnt.mnt("/vm@s1")
        assert vr.getattr(snap_root).ok
        assert sorted(path for path, _ in mnt.export()) == [b"/vm", b"/vm@s1"]
        through_share = vr.lookup(ch.root_fh, "from-other")
        assert through_share.ok and through_share.object is not None
        made = vr.create(through_share.object, "via-share")
        assert made.ok, made.status
        # the other VM's channel sees the file in its own tree, not through vm's handles
        theirs = nfs_over(other_ch)
        shared = theirs.lookup(other_ch.root_fh, "shared")
        assert shared.ok and shared.object is not None
        assert theirs.lookup(shared.object, "via-share").ok
        assert theirs.getattr(through_share.object).status == NfsStat3.NFS3ERR_ACCES
        assert theirs.getattr(ch.root_fh).status == NfsStat3.NFS3ERR_ACCES
        assert theirs.getattr(snap_root).status == NfsStat3.NFS3ERR_ACCES
    srv.cli("unshare", "vm:/from-other")


# -- who may attach -------------------------------------------------------------------------


def test_attach_refusals_say_why(srv: PrismProcess) -> None:
    status, message = refused(lambda: attach(srv, "nosuch"))
    assert status == "NOENT" and "nosuch" in message
    srv.cli("snapshot", "create", "vm", "refusal-snap")
    status, message = refused(lambda: attach(srv, "vm@refusal-snap"))
    assert status == "NOENT" and "snapshot" in message
    status, message = refused(lambda: attach(srv, abi_major=abi.ABI_MAJOR + 1))
    assert status == "ABI" and "ABI" in message
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.settimeout(5)
        raw.connect(str(sock(srv)))
        raw.send(b"\x00garbage, not an ATTACH")
        answer = decode_reply(raw.recv(MAX_MESSAGE))
        assert answer.status == RefuseStatus.INVAL  # type: ignore[union-attr]


def _attach_and_getattr(path: Path, vm: str, token: str = "") -> str:
    """Run in a child: attach, GETATTR the root; "ok" or the refusal's status."""
    try:
        with VrpcChannel.attach(path, vm, token=token) as ch:
            res = nfs_over(ch).getattr(ch.root_fh)
            return "ok" if res.ok else res.status.name
    except AttachRefused as exc:
        return exc.status.name


def test_peer_credentials_decide_who_attaches(srv: PrismProcess) -> None:
    srv.cli("vm", "create", "guarded", "--vrpc-user", str(LISTED), "--vrpc-group", str(GROUP))
    path = sock(srv)
    run = lambda: _attach_and_getattr(path, "guarded")  # noqa: E731
    assert as_user(run, LISTED, LISTED) == "ok"
    assert as_user(run, UNLISTED, UNLISTED) == "ACCES"
    assert as_user(run, GROUP_MEMBER, GROUP_MEMBER, groups=[GROUP]) == "ok"  # supplementary
    assert as_user(run, GROUP_MEMBER, GROUP) == "ok"  # primary
    assert run() == "ACCES"  # root is not listed: a VM that lists principals means them
    # a VM with none admits root only (`vm`), as no --client means loopback only
    assert as_user(lambda: _attach_and_getattr(path, "vm"), UNLISTED, UNLISTED) == "ACCES"
    shown = json.loads(srv.cli("vm", "show", "guarded", "--json").stdout)
    assert (shown["vrpc_users"], shown["vrpc_groups"]) == ([LISTED], [GROUP])
    srv.cli("vm", "set", "guarded", "--vrpc-user", "none", "--vrpc-group", "none")
    assert as_user(run, LISTED, LISTED) == "ACCES"
    assert run() == "ok"


def test_principals_take_names_and_none_clears(srv: PrismProcess) -> None:
    made = json.loads(srv.cli("vm", "create", "named", "--vrpc-user", "root", "--json").stdout)
    assert made["vrpc_users"] == [0]
    assert "VRPC: uid 0" in srv.cli("vm", "show", "named").stdout
    bad = srv.cli("vm", "set", "named", "--vrpc-group", "no-such-group-here", check=False)
    assert bad.returncode == 2 and "no local group 'no-such-group-here'" in bad.stderr
    shown = json.loads(srv.cli("vm", "set", "named", "--vrpc-user", "none", "--json").stdout)
    assert shown["vrpc_users"] == []


def test_changing_principals_detaches_a_live_channel_at_its_next_call(
    srv: PrismProcess,
) -> None:
    srv.cli("vm", "create", "rebound", "--vrpc-user", "0")
    with attach(srv, "rebound") as ch:
        vr = nfs_over(ch)
        assert vr.getattr(ch.root_fh).ok
        before = metrics(srv)["prism_vrpc_revoked_total"]
        srv.cli("vm", "set", "rebound", "--vrpc-user", str(LISTED))
        with pytest.raises(ServerGone, match="principals changed"):
            vr.getattr(ch.root_fh)
    assert metrics(srv)["prism_vrpc_revoked_total"] == before + 1
    assert refused(lambda: attach(srv, "rebound"))[0] == "ACCES"


def test_tokens_admit_and_rotation_detaches(srv: PrismProcess) -> None:
    srv.cli("vm", "create", "tok", "--vrpc-user", str(LISTED))
    token = json.loads(srv.cli("vm", "vrpc-token", "tok", "--json").stdout)["token"]
    assert srv.cli("vm", "vrpc-token", "tok").stdout.strip() == token  # stable until rotated
    assert refused(lambda: attach(srv, "tok"))[0] == "ACCES"
    status, message = refused(lambda: attach(srv, "tok", token=token[:-1] + "x"))
    assert status == "ACCES" and "token" in message
    path = sock(srv)
    assert as_user(lambda: _attach_and_getattr(path, "tok", token), UNLISTED, UNLISTED) == "ok"
    # a bad token is refused even for a listed user: a peer that presents one lives by it
    assert as_user(lambda: _attach_and_getattr(path, "tok", "pvt1-x"), LISTED, LISTED) == "ACCES"
    with attach(srv, "tok", token=token) as live:
        vr = nfs_over(live)
        assert vr.getattr(live.root_fh).ok
        rotated = srv.cli("vm", "vrpc-token", "tok", "--rotate").stdout.strip()
        assert rotated != token
        with pytest.raises(ServerGone, match="token was rotated"):
            vr.getattr(live.root_fh)
    assert refused(lambda: attach(srv, "tok", token=token))[0] == "ACCES"
    with attach(srv, "tok", token=rotated) as ch:
        assert nfs_over(ch).getattr(ch.root_fh).ok


def test_channels_per_user_are_bounded_and_freed(srv: PrismProcess) -> None:
    channels = []
    try:
        for _ in range(MAX_CHANNELS_PER_UID):
            channels.append(attach(srv, slots=1))
        status, message = refused(lambda: attach(srv, slots=1))
        assert status == "BUSY" and "uid 0" in message
        # another user still attaches: the bound is per user
        srv.cli("vm", "set", "other", "--vrpc-user", str(LISTED))
        path = sock(srv)
        assert as_user(lambda: _attach_and_getattr(path, "other"), LISTED, LISTED) == "ok"
    finally:
        for ch in channels:
            ch.close()
        srv.cli("vm", "set", "other", "--vrpc-user", "none")
    deadline = time.monotonic() + 10
    while metrics(srv)["prism_vrpc_channels"] and time.monotonic() < deadline:
        time.sleep(0.05)
    with attach(srv) as ch:
        assert nfs_over(ch).getattr(ch.root_fh).ok


def test_channels_in_all_are_bounded(tmp_path: Path) -> None:
    data = new_data_dir(tmp_path / "data")
    with PrismProcess(data, tmp_path / "logs", extra_args=["--vrpc-max-channels", "2"]) as s:
        path = socket_of(s.ready_line)
        with VrpcChannel.attach(path, "vm") as a, VrpcChannel.attach(path, "vm") as b:
            with pytest.raises(AttachRefused) as info:
                VrpcChannel.attach(path, "vm")
            assert info.value.status == RefuseStatus.BUSY
            assert nfs_over(a).getattr(a.root_fh).ok and nfs_over(b).getattr(b.root_fh).ok
        with VrpcChannel.attach(path, "vm") as c:  # the closed ones were freed
            assert nfs_over(c).getattr(c.root_fh).ok


def test_connections_that_never_attach_are_bounded_and_timed_out(srv: PrismProcess) -> None:
    idle = []
    try:
        for _ in range(MAX_PENDING):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.connect(str(sock(srv)))
            idle.append(conn)
        time.sleep(0.5)  # (the server accepts them)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as extra:
            extra.settimeout(1)  # well within ATTACH_TIMEOUT
            extra.connect(str(sock(srv)))
            assert extra.recv(MAX_MESSAGE) == b""  # closed at once: too many waiting
        for conn in idle:  # each is closed once its ATTACH_TIMEOUT has passed
            conn.settimeout(ATTACH_TIMEOUT + 5)
            assert conn.recv(MAX_MESSAGE) == b""
    finally:
        for conn in idle:
            conn.close()
    with attach(srv) as ch:
        assert nfs_over(ch).getattr(ch.root_fh).ok


# -- accounting ------------------------------------------------------------------------------


def test_stats_and_metrics_count_vrpc(srv: PrismProcess) -> None:
    before = metrics(srv)
    with attach(srv) as ch:
        vr = nfs_over(ch)
        for _ in range(10):
            assert vr.getattr(ch.root_fh).ok
        now = metrics(srv)
        getattrs = 'prism_rpc_calls_total{proc="GETATTR",program="nfs",version="3"}'
        assert now[getattrs] >= before.get(getattrs, 0) + 10  # the same statistics as TCP's
        of_vm = 'prism_vm_calls_total{proc="GETATTR",vm="vm"}'  # the fast path's included
        assert now[of_vm] >= before.get(of_vm, 0) + 10
        assert now["prism_vrpc_channels"] == before["prism_vrpc_channels"] + 1
        # the first GETATTR publishes the root's attributes; the C fast path answers the rest
        python, fast = (
            'prism_vrpc_calls_total{path="python"}',
            'prism_vrpc_calls_total{path="fast"}',
        )
        assert now[python] >= before[python] + 1
        assert now[python] + now[fast] >= before[python] + before[fast] + 10
        if BACKEND == "native":  # (the server runs the same code, so the same backend)
            assert now[fast] >= before[fast] + 9
        deadline = time.monotonic() + 5
        while True:  # `prism stats` reads what the server writes out once a second
            shown = json.loads(srv.cli("stats", "--json").stdout)["vrpc"]
            if shown and shown["calls"] >= now[python] and shown["fast_path_hits"] >= now[fast]:
                break
            assert time.monotonic() < deadline, shown
            time.sleep(0.2)
        assert shown["channels"] >= 1
        assert "protocol_errors" in shown
        assert "vrpc: " in srv.cli("stats").stdout
