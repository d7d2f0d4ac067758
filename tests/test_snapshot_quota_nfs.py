"""Snapshots and quotas through an NFS client while `prism serve` runs, changed with the
operator commands underneath it: a snapshot is a read-only export, a rollback is visible to
the mounted client, a quota refuses the write that would exceed it (changing nothing), FSSTAT
reports the quota as the filesystem's size, and a raised quota lets a client that is writing
continue without a remount.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.nfs.client import MountClient, NfsClient
from prism.nfs.const import MountStat3, NfsStat3
from prism.nfs.wire import NfsFh3, Sattr3
from tests.op_helpers import PrismServe, nfs_get, nfs_mkdirs, nfs_put, nfs_tree, prism, prism_json

MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServe]:
    data = tmp_path_factory.mktemp("snapquota") / "data"
    prism(data, "vm", "create", "seed")
    with PrismServe(data) as srv:
        yield srv


def test_snapshot_export_is_read_only_and_rollback_is_live(server: PrismServe) -> None:
    data = server.data
    prism(server.data, "vm", "create", "snapvm")
    c, root = server.mount("/snapvm")
    with c:
        nfs_mkdirs(c, root, "etc")
        nfs_put(c, root, "etc/config", b"version 1\n")
        prism(data, "snapshot", "create", "snapvm", "v1")  # taken while mounted

        # after the snapshot: change, add and remove through the live mount
        nfs_put(c, root, "etc/config", b"version 2, longer\n")
        nfs_put(c, root, "added-later", b"new\n")
        live = nfs_tree(c, root)

        with MountClient("127.0.0.1", server.mount_port) as m:
            assert m.mnt_raw("/snapvm@nope").status == MountStat3.MNT3ERR_NOENT
            exports = dict(m.export())
        # the same clients, read-only
        ro = tuple(g.replace(b"(rw,", b"(ro,") for g in exports[b"/snapvm"])
        assert exports[b"/snapvm@v1"] == ro and b"(ro," not in exports[b"/snapvm"][0]
        s, sroot = server.mount("/snapvm@v1")
        with s:
            assert nfs_tree(s, sroot) == {"etc": "<dir>", "etc/config": b"version 1\n"}
            fh = s.walk(sroot, "etc/config")
            etc = s.walk(sroot, "etc")
            assert s.write(fh, 0, b"X").status == NfsStat3.NFS3ERR_ROFS
            assert s.setattr(fh, Sattr3(size=0)).status == NfsStat3.NFS3ERR_ROFS
            assert s.setattr(fh, Sattr3(mode=0o777)).status == NfsStat3.NFS3ERR_ROFS
            assert s.create(etc, "new").status == NfsStat3.NFS3ERR_ROFS
            assert s.mkdir(etc, "d").status == NfsStat3.NFS3ERR_ROFS
            assert s.symlink(etc, "l", "x").status == NfsStat3.NFS3ERR_ROFS
            assert s.remove(etc, "config").status == NfsStat3.NFS3ERR_ROFS
            assert s.rename(etc, "config", etc, "c2").status == NfsStat3.NFS3ERR_ROFS
            assert s.link(fh, sroot, "hard").status == NfsStat3.NFS3ERR_ROFS
            assert nfs_tree(s, sroot) == {"etc": "<dir>", "etc/config": b"version 1\n"}
            assert nfs_tree(c, root) == live  # and the VM kept its changes

            # rollback underneath the mounted client: re-looking up from the root handle
            # shows the snapshot's tree, without a remount
            prism(data, "snapshot", "rollback", "snapvm", "v1")
            assert nfs_tree(c, root) == {"etc": "<dir>", "etc/config": b"version 1\n"}
            assert c.lookup(root, "added-later").status == NfsStat3.NFS3ERR_NOENT
            # the VM is writable again after the rollback; the snapshot is not affected
            nfs_put(c, root, "etc/config", b"version 3\n")
            assert nfs_get(s, sroot, "etc/config") == b"version 1\n"

        prism(data, "snapshot", "rm", "snapvm", "v1")
        with MountClient("127.0.0.1", server.mount_port) as m:
            assert m.mnt_raw("/snapvm@v1").status == MountStat3.MNT3ERR_NOENT
        assert nfs_get(c, root, "etc/config") == b"version 3\n"


def size(c: NfsClient, fh: NfsFh3) -> int:
    attr = c.getattr(fh).obj_attributes
    assert attr is not None
    return attr.size


def usage(data: Path, vm: str) -> int:
    return int(prism_json(data, "vm", "show", vm)["logical_bytes"])


def test_quota_refuses_and_is_raised_live(server: PrismServe) -> None:
    data = server.data
    prism(data, "vm", "create", "quotavm", "--quota", "1M")
    c, root = server.mount("/quotavm")
    with c:
        st = c.fsstat(root)
        assert st.ok and st.tbytes == 1 * MiB and st.fbytes <= MiB and st.abytes <= MiB

        fh = nfs_put(c, root, "file", b"a" * (768 * 1024))
        assert usage(data, "quotavm") == 768 * 1024
        assert c.fsstat(root).fbytes == 256 * 1024

        # a write that would exceed the quota fails and changes nothing
        before = c.getattr(fh).obj_attributes
        res = c.write(fh, 768 * 1024, b"b" * (300 * 1024))
        assert res.status == NfsStat3.NFS3ERR_DQUOT
        assert c.getattr(fh).obj_attributes == before  # size, mtime, ctime: all unchanged
        assert before is not None and before.size == 768 * 1024
        assert usage(data, "quotavm") == 768 * 1024
        # so does growing it with SETATTR, or a new file's write
        assert c.setattr(fh, Sattr3(size=2 * MiB)).status == NfsStat3.NFS3ERR_DQUOT
        other = c.create(root, "other", Sattr3(mode=0o644)).obj
        assert other is not None
        assert c.write(other, 0, b"c" * (300 * 1024)).status == NfsStat3.NFS3ERR_DQUOT
        assert size(c, other) == 0
        assert c.read_all(fh) == b"a" * (768 * 1024)
        # a write that fits still succeeds
        assert c.write(fh, 768 * 1024, b"b" * 1024).ok

        # a client keeps writing 64 KiB blocks, retrying on DQUOT; raise the quota under it
        statuses: list[NfsStat3] = []
        stop = threading.Event()
        target = 4 * MiB
        block = b"w" * (64 * 1024)

        def writer() -> None:
            offset = size(c, fh)
            while not stop.is_set() and offset < target:
                r = c.write(fh, offset, block[: target - offset])
                statuses.append(r.status)
                if r.ok:
                    offset += r.count
                else:
                    time.sleep(0.01)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while NfsStat3.NFS3ERR_DQUOT not in statuses and time.monotonic() < deadline:
                time.sleep(0.01)
            assert NfsStat3.NFS3ERR_DQUOT in statuses, "the writer never hit the quota"
            assert usage(data, "quotavm") <= MiB
            prism(data, "vm", "set", "quotavm", "--quota", "20M")
            thread.join(timeout=30)
            assert not thread.is_alive(), "the writer did not get through after the raise"
        finally:
            stop.set()
        first_refusal = statuses.index(NfsStat3.NFS3ERR_DQUOT)
        assert (
            statuses[-1] == NfsStat3.NFS3_OK
            and statuses[:first_refusal] == [NfsStat3.NFS3_OK] * first_refusal
        )
        assert size(c, fh) == target
        assert c.fsstat(root).tbytes == 20 * MiB
        assert usage(data, "quotavm") == target

        # lowering it below what is stored refuses growth, and `none` lifts it
        prism(data, "vm", "set", "quotavm", "--quota", "1M")
        assert c.write(fh, target, block).status == NfsStat3.NFS3ERR_DQUOT
        # and a create in a full VM fails too, creating nothing
        for made in (c.create(root, "more"), c.mkdir(root, "dir"), c.symlink(root, "l", "t")):
            assert made.status == NfsStat3.NFS3ERR_DQUOT
        assert sorted(e.name for e in c.listdir(root)) == [b".", b"..", b"file", b"other"]
        prism(data, "vm", "set", "quotavm", "--quota", "none")
        assert c.write(fh, target, block).ok
        assert c.fsstat(root).tbytes > 20 * MiB  # the disk's size again
