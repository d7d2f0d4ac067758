"""Helpers for the VRPC tests: both ring backends, a channel's two ends in one process, and
channels of a real `prism serve` (NFS clients over them, children that drop root)."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prism.nfs.client import MountClient, NfsClient, auth_sys
from prism.nfs.const import MOUNT_PROGRAM, MOUNT_V3, NFS_PROGRAM, NFS_V3
from vrpc import abi
from vrpc.client import VrpcChannel
from vrpc.native import NATIVE_AVAILABLE, backend
from vrpc.ring import ClientRing, Segment, ServerRing, eventfd, map_segment, new_segment

NATIVE_REQUIRED = os.environ.get("PRISM_REQUIRE_NATIVE") == "1"
_skip_native = pytest.mark.skipif(
    not NATIVE_AVAILABLE and not NATIVE_REQUIRED,
    reason="vrpc._native is not built (no compiler at install time)",
)
BACKENDS = [pytest.param("native", marks=_skip_native), "python"]
PAIRS = [
    pytest.param(s, c, marks=_skip_native if "native" in (s, c) else (), id=f"srv_{s}-cli_{c}")
    for s in ("native", "python")
    for c in ("native", "python")
]


@dataclass
class Channel:
    """Both ends of one ring in this process; the client maps the memfd on its own."""

    segment: Segment
    client_map: object
    kick: int
    call: int
    server: ServerRing
    client: ClientRing


@contextmanager
def channel(
    server_backend: str,
    client_backend: str,
    *,
    nslots: int = 4,
    entries: int = 0,
    first_index: int = 0,
    doorbell: int = abi.DOORBELL_EVENTFD,
) -> Iterator[Channel]:
    segment = new_segment(nslots)
    kick, call = eventfd(), eventfd()
    server = backend(server_backend).server(
        segment.map,
        nslots=nslots,
        entries=entries,
        doorbell=doorbell,
        call_fd=call,
        first_index=first_index,
        boot_id=0xB007,
        channel_id=42,
    )
    client_map = map_segment(segment.fd)
    client = backend(client_backend).client(client_map, kick_fd=kick, call_fd=call)
    try:
        yield Channel(segment, client_map, kick, call, server, client)
    finally:
        client.release()
        server.release()
        client_map.close()
        segment.close()
        os.close(kick)
        os.close(call)


# -- a real server's channels ----------------------------------------------------------------


def reachable_dir() -> Path:
    """A fresh directory every local user can traverse (`prism serve --vrpc DIR/vrpc.sock`
    for tests whose children drop privileges: the data directory is the server's alone)."""
    path = Path(tempfile.mkdtemp(prefix="prism-vrpc-"))
    path.chmod(0o755)
    return path


def socket_of(ready_line: str) -> Path:
    m = re.search(r"vrpc (?P<path>\S+),", ready_line)
    assert m, f"the ready line names no VRPC socket: {ready_line!r}"
    return Path(m["path"])


def nfs_over(ch: VrpcChannel, cred: Any = None) -> NfsClient:
    """An NfsClient whose calls travel over channel `ch` (root by default)."""
    return NfsClient(rpc=ch.rpc(NFS_PROGRAM, NFS_V3, cred if cred is not None else auth_sys()))


def mount_over(ch: VrpcChannel, cred: Any = None) -> MountClient:
    return MountClient(
        rpc=ch.rpc(MOUNT_PROGRAM, MOUNT_V3, cred if cred is not None else auth_sys())
    )


def as_user(
    fn: Callable[[], Any], uid: int, gid: int, groups: Sequence[int] = (), timeout: float = 30
) -> Any:
    """`fn()` run in a forked child that has dropped root for uid/gid/groups; its return
    value comes back pickled, and an exception it raised is raised here."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                result: tuple[str, Any] = ("ok", fn())
            except BaseException as exc:
                result = ("raised", exc)
            with os.fdopen(wfd, "wb") as out:
                pickle.dump(result, out)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child failed before reporting"
    kind, value = pickle.loads(data)
    if kind == "raised":
        raise value
    return value
