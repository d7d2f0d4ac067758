"""Issue #10 item 7: attributes given at creation obey SETATTR's ownership rules.

Through a real `prism serve`, a uid 1000 client (groups 1000 and 50) in a world-writable
directory asks CREATE, MKDIR, SYMLINK and MKNOD for uid 0 with mode 04755, or gid 0 with
02755: each is refused with NFS3ERR_PERM and leaves nothing behind, exactly as the same
change by SETATTR would be. What SETATTR allows still works at creation: the caller's own
setuid bit, a group of the caller's. A setgid bit for a group the caller is not in is
dropped (a file made in a setgid root-group directory with 02755 comes out 0755), as Linux
does for chmod.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prism.nfs.client import NfsClient, auth_sys
from prism.nfs.const import NfsStat3
from prism.nfs.wire import NfsFh3, Sattr3
from prism.store.types import FileType
from tests.op_helpers import PrismServe, prism

USER, GROUP, OTHER_GROUP = 1000, 1000, 50


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismServe]:
    data: Path = tmp_path_factory.mktemp("create-attrs") / "data"
    prism(data, "vm", "create", "vm")
    with PrismServe(data) as srv:
        yield srv


@pytest.fixture(scope="module")
def dirs(server: PrismServe) -> Iterator[tuple[NfsClient, NfsFh3, NfsFh3, NfsFh3]]:
    """(user client, /tmp 0777 root-owned, /sgid 02777 root:0, root client's /tmp)."""
    root_c, root = server.mount("/vm")
    made = {}
    for name, mode in (("tmp", 0o777), ("sgid", 0o2777)):
        res = root_c.mkdir(root, name, Sattr3(mode=mode))
        assert res.ok and res.obj is not None, res.status
        assert root_c.setattr(res.obj, Sattr3(mode=mode)).ok
        made[name] = res.obj

    user = NfsClient("127.0.0.1", server.nfs_port, cred=auth_sys(USER, GROUP, (GROUP, OTHER_GROUP)))
    try:
        yield user, made["tmp"], made["sgid"], root_c
    finally:
        user.close()
        root_c.close()


def makers(c: NfsClient) -> dict[str, Callable[[NfsFh3, str, Sattr3], Any]]:
    return {
        "create": lambda d, n, a: c.create(d, n, a),
        "mkdir": lambda d, n, a: c.mkdir(d, n, a),
        "symlink": lambda d, n, a: c.symlink(d, n, "target", a),
        "mknod": lambda d, n, a: c.mknod(d, n, FileType.FIFO, a),
    }


@pytest.mark.parametrize("proc", ["create", "mkdir", "symlink", "mknod"])
@pytest.mark.parametrize(
    "asked",
    [Sattr3(mode=0o4755, uid=0), Sattr3(mode=0o2755, gid=0), Sattr3(uid=0, gid=0)],
    ids=["setuid-root", "setgid-group0", "chown-root"],
)
def test_creating_as_someone_else_is_refused(dirs: Any, proc: str, asked: Sattr3) -> None:
    user, tmp, _, _ = dirs
    name = f"{proc}-{asked.uid}-{asked.gid}-{asked.mode}"
    res = makers(user)[proc](tmp, name, asked)
    assert res.status == NfsStat3.NFS3ERR_PERM, (proc, res.status, res)
    assert user.lookup(tmp, name).status == NfsStat3.NFS3ERR_NOENT  # nothing left behind


@pytest.mark.parametrize("proc", ["create", "mkdir", "mknod"])
def test_what_setattr_allows_works_at_creation(dirs: Any, proc: str) -> None:
    user, tmp, _, _ = dirs
    asked = Sattr3(mode=0o4755, uid=USER, gid=OTHER_GROUP)
    res = makers(user)[proc](tmp, f"ok-{proc}", asked)
    assert res.ok and res.obj_attributes is not None, res.status
    a = res.obj_attributes
    assert (a.uid, a.gid, a.mode) == (USER, OTHER_GROUP, 0o4755)


@pytest.mark.parametrize("proc", ["create", "mkdir", "mknod"])
def test_setgid_for_a_foreign_group_is_dropped(dirs: Any, proc: str) -> None:
    user, _, sgid, _ = dirs
    res = makers(user)[proc](sgid, f"inherit-{proc}", Sattr3(mode=0o2755))
    assert res.ok and res.obj_attributes is not None, res.status
    a = res.obj_attributes
    assert (a.uid, a.gid, a.mode) == (USER, 0, 0o755)  # group inherited, setgid not


def test_setattr_follows_the_same_setgid_rule(dirs: Any) -> None:
    user, tmp, _, root_c = dirs
    res = user.create(tmp, "chmod-me", Sattr3(mode=0o644))
    assert res.ok and res.obj is not None
    assert root_c.setattr(res.obj, Sattr3(gid=0)).ok
    assert user.setattr(res.obj, Sattr3(mode=0o2755)).ok
    attrs = user.getattr(res.obj).obj_attributes
    assert attrs is not None and attrs.mode == 0o755
