"""Issue #10 item 6: privileged-port check (`--secure`) and squashing, per VM.

The reproduction: an unprivileged local process (here libnfs's nfs-cat run as uid 65534,
and our own client on an ordinary source port) sending AUTH_SYS uid 0 read a root-owned
0600 file and changed its owner. A new VM is `secure`: MNT from an unprivileged port is
MNT3ERR_ACCES and every NFS call with a handle is NFS3ERR_PERM (knfsd's answers), while
root clients (our client and libnfs bind a privileged port as root) work unchanged.
`--squash root|all` maps callers to the anonymous ids for permission checks and new
objects, and AUTH_NONE callers are always anonymous. A VM record written before these
options existed keeps the access it had (insecure, squash none). Everything runs against
a real `prism serve`, and `prism vm set` takes effect on the running server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nfs.const import MOUNT_PROGRAM, MOUNT_V3, NFS_PROGRAM, NFS_V3, MountStat3, NfsStat3
from prism.nfs.wire import NfsFh3, Sattr3
from prism.store.schema import DB_NAMES
from prism.store.sealed import open_value, seal
from rpc.client import RpcClient
from tests.op_helpers import PrismServe, nfs_put, prism, prism_json

SECRET = b"root's eyes only\n"
NOBODY = 65534


def unprivileged(server: PrismServe, uid: int = 0, gid: int = 0) -> NfsClient:
    """Our client calling from an ordinary (>= 1024) source port, as a non-root process."""
    rpc = RpcClient(
        "127.0.0.1", server.nfs_port, NFS_PROGRAM, NFS_V3, cred=auth_sys(uid, gid).to_opaque()
    )
    assert rpc.local_address[1] >= 1024
    return NfsClient(rpc=rpc)


def unprivileged_mnt(server: PrismServe, export: str) -> MountStat3:
    rpc = RpcClient("127.0.0.1", server.mount_port, MOUNT_PROGRAM, MOUNT_V3)
    with MountClient(rpc=rpc) as m:
        return m.mnt_raw(export).status


def nfs_cat_as_nobody(server: PrismServe, path: str) -> subprocess.CompletedProcess[bytes]:
    """libnfs's nfs-cat run as uid 65534 (so from an unprivileged port), claiming uid 0."""
    url = server.url("127.0.0.1", path) + "&uid=0&gid=0"
    return subprocess.run(
        ["nfs-cat", url], user=NOBODY, group=NOBODY, capture_output=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServe]:
    data = tmp_path_factory.mktemp("client-access") / "data"
    prism(data, "vm", "create", "vm")
    with PrismServe(data) as srv:
        yield srv


@pytest.fixture(scope="module")
def secret(server: PrismServe) -> Iterator[tuple[NfsClient, NfsFh3, NfsFh3]]:
    """(root client, root handle, handle of /secret: root-owned 0600)."""
    c, root = server.mount("/vm")
    fh = nfs_put(c, root, "secret", SECRET)
    assert c.setattr(fh, Sattr3(mode=0o600, uid=0, gid=0)).ok
    assert c.setattr(root, Sattr3(mode=0o777)).ok
    try:
        yield c, root, fh
    finally:
        c.close()


def owner(c: NfsClient, fh: NfsFh3) -> tuple[int, int, int]:
    a = c.getattr(fh).obj_attributes
    assert a is not None
    return a.uid, a.gid, a.mode


def test_new_vms_are_secure_and_unsquashed(server: PrismServe) -> None:
    shown = prism_json(server.data, "vm", "show", "vm")
    assert (shown["secure"], shown["squash"]) == (True, "none")
    assert (shown["anon_uid"], shown["anon_gid"]) == (NOBODY, NOBODY)
    text = prism(server.data, "vm", "show", "vm")
    assert "access:    privileged ports only (secure), no squash" in text


@pytest.mark.skipif(not shutil.which("nfs-cat"), reason="libnfs-utils is not installed")
def test_unprivileged_process_claiming_root_is_refused(server: PrismServe, secret: Any) -> None:
    c, root, fh = secret
    proc = nfs_cat_as_nobody(server, "/vm/secret")
    assert proc.returncode != 0 and SECRET not in proc.stdout
    # the same tool run as root binds a privileged port, and is served
    as_root = subprocess.run(
        ["nfs-cat", server.url("127.0.0.1", "/vm/secret")], capture_output=True, timeout=60
    )
    assert as_root.returncode == 0 and as_root.stdout == SECRET

    assert unprivileged_mnt(server, "/vm") == MountStat3.MNT3ERR_ACCES
    with unprivileged(server) as u:  # a handle it got somehow: still refused
        assert u.getattr(fh).status == NfsStat3.NFS3ERR_PERM
        assert u.read(fh, 0, 100).status == NfsStat3.NFS3ERR_PERM
        assert u.setattr(fh, Sattr3(uid=NOBODY)).status == NfsStat3.NFS3ERR_PERM
        assert u.create(root, "planted").status == NfsStat3.NFS3ERR_PERM
    assert owner(c, fh) == (0, 0, 0o600)
    assert c.read_all(fh) == SECRET
    assert "unprivileged port" in server.log()

    # --insecure (QEMU user networking, unprivileged clients) opens it at once
    prism(server.data, "vm", "set", "vm", "--insecure")
    try:
        assert unprivileged_mnt(server, "/vm") == MountStat3.MNT3_OK
        with unprivileged(server) as u:
            assert u.read_all(fh) == SECRET
    finally:
        prism(server.data, "vm", "set", "vm", "--secure")
    with unprivileged(server) as u:
        assert u.getattr(fh).status == NfsStat3.NFS3ERR_PERM


def test_root_squash(server: PrismServe, secret: Any) -> None:
    c, root, fh = secret
    prism(server.data, "vm", "set", "vm", "--squash", "root")
    try:
        with NfsClient("127.0.0.1", server.nfs_port, cred=auth_sys(0, 0)) as r:
            assert r.read(fh, 0, 100).status == NfsStat3.NFS3ERR_ACCES
            assert r.setattr(fh, Sattr3(uid=1000)).status == NfsStat3.NFS3ERR_PERM
            made = r.create(root, "by-squashed-root", Sattr3(mode=0o644))
            assert made.ok and made.obj_attributes is not None
            a = made.obj_attributes
            assert (a.uid, a.gid) == (NOBODY, NOBODY)
        # group 0 is squashed too; other callers are who they say
        with NfsClient("127.0.0.1", server.nfs_port, cred=auth_sys(1000, 0, (0, 5))) as u:
            made = u.create(root, "by-user", Sattr3(mode=0o644))
            assert made.ok and made.obj_attributes is not None
            assert (made.obj_attributes.uid, made.obj_attributes.gid) == (1000, NOBODY)
        assert owner(c, fh) == (0, 0, 0o600)
    finally:
        prism(server.data, "vm", "set", "vm", "--squash", "none")
    assert c.read_all(fh) == SECRET  # root again once unsquashed


def test_all_squash_with_chosen_anonymous_ids(server: PrismServe, secret: Any) -> None:
    _, root, _ = secret
    out = prism_json(
        server.data, "vm", "set", "vm", "--squash", "all", "--anon-uid", "4321", "--anon-gid", "99"
    )
    assert (out["squash"], out["anon_uid"], out["anon_gid"]) == ("all", 4321, 99)
    try:
        with NfsClient("127.0.0.1", server.nfs_port, cred=auth_sys(1000, 1000)) as u:
            made = u.create(root, "by-anyone", Sattr3(mode=0o644))
            assert made.ok and made.obj_attributes is not None
            assert (made.obj_attributes.uid, made.obj_attributes.gid) == (4321, 99)
    finally:
        prism(server.data, "vm", "set", "vm", "--squash", "none", "--anon-uid", str(NOBODY))
        prism(server.data, "vm", "set", "vm", "--anon-gid", str(NOBODY))


def test_auth_none_is_anonymous(server: PrismServe, secret: Any) -> None:
    _, root, fh = secret
    with NfsClient("127.0.0.1", server.nfs_port) as anon:  # AUTH_NONE
        assert anon.read(fh, 0, 100).status == NfsStat3.NFS3ERR_ACCES
        made = anon.create(root, "by-auth-none")
        assert made.ok and made.obj_attributes is not None
        assert (made.obj_attributes.uid, made.obj_attributes.gid) == (NOBODY, NOBODY)


def test_create_takes_the_options(tmp_path: Path) -> None:
    data = tmp_path / "data"
    made = prism_json(
        data, "vm", "create", "web", "--insecure", "--squash", "root", "--anon-gid", "100"
    )
    assert (made["secure"], made["squash"], made["anon_uid"], made["anon_gid"]) == (
        False,
        "root",
        NOBODY,
        100,
    )
    assert prism_json(data, "vm", "list")[0]["squash"] == "root"


def test_records_from_before_the_options_keep_their_access(tmp_path: Path) -> None:
    """A VM record written by an older Prism has none of the fields: it stays reachable from
    any port, unsquashed, as it always was."""
    data = tmp_path / "data"
    prism(data, "vm", "create", "old")
    env = lmdb.open(str(data / "meta"), max_dbs=16)
    ns = env.open_db(b"ns")
    with env.begin(write=True) as t:
        index = DB_NAMES.index("ns")
        for key, raw in list(t.cursor(db=ns)):
            rec = json.loads(open_value(index, key, raw))
            for field in ("secure", "squash", "anon_uid", "anon_gid"):
                rec.pop(field)
            t.put(key, seal(index, key, json.dumps(rec, sort_keys=True).encode()), db=ns)
    env.close()
    shown = prism_json(data, "vm", "show", "old")
    assert (shown["secure"], shown["squash"]) == (False, "none")
    with PrismServe(data) as srv:
        assert unprivileged_mnt(srv, "/old") == MountStat3.MNT3_OK
        c, root = srv.mount("/old")
        with c:
            fh = nfs_put(c, root, "f", b"x")
            assert c.setattr(fh, Sattr3(mode=0o600)).ok
        with unprivileged(srv) as u:
            assert u.read_all(fh) == b"x"  # uid 0 from any port, as before
