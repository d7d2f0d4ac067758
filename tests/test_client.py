"""`prism.client` against a real `prism serve`: every method, io conformance, errors with
errno and path, permissions by uid/gid, and server restarts with files open, each over both
transports (TCP and the VRPC ring: the `transport` fixture); how "auto" chooses.

One server serves most of the module; each test works in its own directory, named after
the test (and transport). Restart tests get a server of their own.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import shutil
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from prism.client import DEFAULT_VRPC_SOCKET, Client, DirEntry, TransportUnavailable, connect
from prism.client._transport import (
    NFS_PORT,
    RecordTransport,
    Target,
    is_local_host,
    open_transport,
    parse_url,
    tcp_transport,
)
from prism.nfs import wire as T
from prism.nfs.client import auth_sys, connect_rpc
from prism.nfs.const import (
    ACCESS3_READ,
    MOUNT_PROGRAM,
    NFS_PROGRAM,
    CreateMode,
    Nfs3Proc,
    NfsStat3,
    StableHow,
)
from prism.store.types import FileType
from rpc.client import raise_for_reply
from rpc.message import decode_reply, encode_call
from rpc.record import RecordReader, frame
from tests.server_helpers import PrismProcess, free_port, running_server
from vrpc.client import ServerGone

USER, OTHER, GROUP = 1000, 2000, 3000
CRED = auth_sys(0, 0).to_opaque()


def url_of(server: PrismProcess, vm: str = "vm") -> str:
    return f"nfs://127.0.0.1:{server.nfs_port}/{vm}?mountport={server.mount_port}"


@pytest.fixture(scope="module")
def server(prism_module_server: PrismProcess) -> PrismProcess:
    return prism_module_server


@pytest.fixture(params=["tcp", "vrpc"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def open_client(server: PrismProcess, transport: str, **kw: Any) -> Client:
    """`connect` to VM "vm" of `server` over `transport`, asked for by name."""
    client = connect(url_of(server), transport=transport, vrpc_socket=server.vrpc_socket(), **kw)
    assert client.transport == transport
    return client


@pytest.fixture
def c(server: PrismProcess, transport: str) -> Iterator[Client]:
    """A root client (uid 0, gid 0) over each transport."""
    with open_client(server, transport, uid=0, gid=0, timeout=30) as client:
        yield client


@pytest.fixture
def d(c: Client, request: pytest.FixtureRequest) -> str:
    """A fresh world-writable directory for this test, e.g. "/test_stat"."""
    path = "/" + request.node.name.replace("[", "_").replace("]", "")
    c.mkdir(path, 0o777)
    c.chmod(path, 0o777)
    return path


def ok(res: Any) -> Any:
    assert res.status == NfsStat3.NFS3_OK, f"{type(res).__name__}: {res.status.name}"
    return res


# -- connecting ---------------------------------------------------------------------------


def test_url_parsing() -> None:
    assert parse_url("nfs://127.0.0.1/web") == Target("127.0.0.1", "/web", NFS_PORT, 0)
    assert parse_url("nfs://h:1234/web/?mountport=20048") == Target("h", "/web", 1234, 20048)
    assert parse_url("nfs://[::1]/a%40b?nfsport=7&mountport=8") == Target("::1", "/a@b", 7, 8)
    for bad in (
        "http://h/vm",
        "nfs:///vm",
        "nfs://h/",
        "nfs://h/vm?mountport=x",
        "nfs://h/vm?port=1",
        "nfs://h/vm?mountport=70000",
        "nfs://h:99999/vm",
    ):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_auto_takes_vrpc_from_a_local_server(
    server: PrismProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, there = url_of(server), server.vrpc_socket()
    with connect(url, vrpc_socket=there) as c:
        assert (c.transport, c.transport_reason) == ("vrpc", f"local server, attached at {there}")
        c.write_text("/auto-vrpc", "over the ring")
    monkeypatch.setenv("PRISM_VRPC_SOCKET", str(there))
    with connect(url) as c:
        assert c.transport == "vrpc" and c.read_text("/auto-vrpc") == "over the ring"
    with connect(url, transport="vrpc") as c:
        assert (c.transport, c.transport_reason) == ("vrpc", f"asked for, at {there}")
    with connect(url, transport="tcp") as c:
        assert (c.transport, c.transport_reason) == ("tcp", "asked for")
    with pytest.raises(ValueError, match="transport must be one of"):
        connect(url, transport="udp")


def test_auto_says_why_it_took_tcp(
    server: PrismProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, there = url_of(server), server.vrpc_socket()
    # No socket: where the client looked (the default path, the environment, the argument).
    monkeypatch.delenv("PRISM_VRPC_SOCKET", raising=False)
    with connect(url) as c:
        assert (c.transport, c.transport_reason) == (
            "tcp",
            f"no VRPC socket at {DEFAULT_VRPC_SOCKET}",
        )
    monkeypatch.setenv("PRISM_VRPC_SOCKET", str(tmp_path / "env.sock"))
    with connect(url) as c:
        assert c.transport_reason == f"no VRPC socket at {tmp_path / 'env.sock'}"
    with connect(url, vrpc_socket=tmp_path / "arg.sock") as c:  # the argument wins
        assert c.transport_reason == f"no VRPC socket at {tmp_path / 'arg.sock'}"
    with pytest.raises(TransportUnavailable, match="no VRPC socket at") as exc:
        connect(url, transport="vrpc", vrpc_socket=tmp_path / "arg.sock")
    assert exc.value.errno == errno.EPROTONOSUPPORT
    # A socket file nobody listens on.
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as bound:
        bound.bind(str(dead))
        with connect(url, vrpc_socket=dead) as c:
            assert c.transport == "tcp"
            assert c.transport_reason == (
                f"VRPC at {dead} unavailable: no server listens on {dead} (is prism serve running?)"
            )
    # The server refuses to attach (a token that is not the VM's).
    with connect(url, vrpc_socket=there, token="pvt1-vm-0-notthetoken") as c:
        assert c.transport == "tcp"
        assert c.transport_reason.startswith(
            f"VRPC at {there} unavailable: the server refused to attach VM 'vm': "
        )
    with pytest.raises(TransportUnavailable, match="refused to attach VM 'vm'"):
        connect(url, transport="vrpc", vrpc_socket=there, token="pvt1-vm-0-notthetoken")
    # A host that is not this one: TCP without trying the socket.
    remote = Target("192.0.2.1", "/vm", 2049, 20048)
    chosen, reason = open_transport(
        remote, auth_sys(0, 0), transport="auto", vrpc_socket=there, token=None, timeout=5
    )
    chosen.close()
    assert (chosen.name, reason) == (
        "tcp",
        "192.0.2.1 is not this host, VRPC serves local clients only",
    )


def test_auto_never_takes_another_servers_socket(
    server: PrismProcess, prism_server: PrismProcess
) -> None:
    """The socket attaches, but belongs to another server with a VM of the same name: its
    root handle differs from the URL's server's, so "auto" keeps to TCP (the URL's server)."""
    other = prism_server
    with connect(url_of(other), uid=0, gid=0, vrpc_socket=server.vrpc_socket()) as c:
        assert c.transport == "tcp"
        assert c.transport_reason == (
            f"VRPC at {server.vrpc_socket()} belongs to another server: the root handles of "
            f"/vm differ from 127.0.0.1:{other.nfs_port}'s"
        )
        c.write_text("/where", "the URL's server")
    with connect(url_of(other), uid=0, gid=0, vrpc_socket=other.vrpc_socket()) as c:
        assert c.transport == "vrpc" and c.read_text("/where") == "the URL's server"
    with open_client(server, "tcp") as c:
        assert not c.exists("/where")


def test_is_local_host() -> None:
    assert is_local_host("127.0.0.1") and is_local_host("localhost")
    assert is_local_host(socket.gethostname())
    assert not is_local_host("192.0.2.1")  # TEST-NET-1: never this host (only bind() is tried)
    assert not is_local_host("no-such-host.invalid")


def test_connect_errors(server: PrismProcess) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        connect(url_of(server, "nosuchvm"))
    assert exc.value.filename == "/nosuchvm"
    assert "prism vm list" in str(exc.value)
    server.cli("vm", "create", "fenced", "--client", "192.0.2.0/24")  # not loopback
    with pytest.raises(PermissionError) as denied:
        connect(url_of(server, "fenced"))
    assert denied.value.filename == "/fenced" and "--client CIDR" in str(denied.value)
    # Nothing listening: refused at once, not retried for `timeout` seconds.
    port = server.nfs_port + 1 if server.nfs_port + 1 != server.mount_port else server.nfs_port + 2
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(f"nfs://127.0.0.1:{server.nfs_port}/vm?mountport={port}", timeout=30)
    assert time.monotonic() - started < 5


def test_the_mount_port_comes_from_the_portmapper(tmp_path: Path) -> None:
    """Without ?mountport= the client asks the portmapper on HOST (here Prism's own, on a
    port of the test's choosing) and says how to do without one when there is none."""
    pmap = free_port()
    with running_server(tmp_path, portmap=True, portmap_port=pmap) as server:
        target = Target("127.0.0.1", "/vm", server.nfs_port, 0, pmap)
        transport = tcp_transport(target, auth_sys(0, 0), timeout=30)
        with Client(transport, "test", "/vm", umask=0o022, commit_limit=1 << 20) as c:
            c.write_text("/found", "through the portmapper")
            assert c.read_text("/found") == "through the portmapper"
        nowhere = Target("127.0.0.1", "/vm", server.nfs_port, 0, free_port())
        transport = tcp_transport(nowhere, auth_sys(0, 0), timeout=30)
        with pytest.raises(ConnectionRefusedError, match=r"\?mountport=N"):
            Client(transport, "test", "/vm", umask=0o022, commit_limit=1 << 20)


# -- attributes -----------------------------------------------------------------------------


def test_stat_lstat_exists_isdir_isfile(c: Client, d: str) -> None:
    c.write_bytes(f"{d}/f", b"12345")
    c.mkdir(f"{d}/sub")
    c.symlink("f", f"{d}/lf")
    c.symlink("sub", f"{d}/ld")
    c.symlink("nowhere", f"{d}/dangling")
    st = c.stat(f"{d}/f")
    assert isinstance(st, os.stat_result)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 5 and st.st_nlink == 1
    assert st.st_ino == c.nfs.getattr(c.handle(f"{d}/f")).obj_attributes.fileid
    assert st.st_mtime_ns // 1_000_000_000 == st[stat.ST_MTIME] == int(st.st_mtime)
    assert stat.S_ISDIR(c.stat(f"{d}/sub").st_mode)
    assert c.stat(f"{d}/lf").st_ino == st.st_ino  # followed
    assert stat.S_ISLNK(c.lstat(f"{d}/lf").st_mode)
    assert c.lstat(f"{d}/lf").st_size == len("f")
    assert stat.S_ISDIR(c.stat(f"{d}/ld/").st_mode)
    assert c.stat(f"{d}/sub/../f").st_ino == st.st_ino  # ".." by the server
    assert c.stat(d.encode() + b"/f").st_ino == st.st_ino  # bytes paths
    assert c.stat(PurePosixPath(d) / "f").st_ino == st.st_ino  # and path-like objects
    with pytest.raises(FileNotFoundError) as exc:
        c.stat(PurePosixPath(d) / "none" / "x")
    assert exc.value.filename == f"{d}/none/x"
    assert "f" in c.listdir(PurePosixPath(d))
    assert c.exists(f"{d}/f") and c.exists(f"{d}/sub") and c.exists(f"{d}/lf")
    assert not c.exists(f"{d}/dangling") and not c.exists(f"{d}/none")
    assert not c.exists(f"{d}/f/x")
    assert c.isfile(f"{d}/f") and c.isfile(f"{d}/lf") and not c.isfile(f"{d}/sub")
    assert c.isdir(f"{d}/sub") and c.isdir(f"{d}/ld") and not c.isdir(f"{d}/f")
    assert c.islink(f"{d}/dangling") and not c.islink(f"{d}/f")
    assert c.isdir("/") and c.stat("/").st_ino == c.stat("/..").st_ino


def test_symlink_loops_and_absolute_targets(c: Client, d: str) -> None:
    c.symlink("loop2", f"{d}/loop1")
    c.symlink("loop1", f"{d}/loop2")
    with pytest.raises(OSError) as exc:
        c.stat(f"{d}/loop1")
    assert (exc.value.errno, exc.value.filename) == (errno.ELOOP, f"{d}/loop1")
    c.write_text(f"{d}/target", "absolute")
    c.symlink(f"{d}/target", f"{d}/abs")  # absolute within the VM
    c.symlink("/", f"{d}/root")
    assert c.read_text(f"{d}/abs") == "absolute"
    assert c.stat(f"{d}/root").st_ino == c.stat("/").st_ino
    assert d.lstrip("/") in c.listdir(f"{d}/root/")


def test_chmod_chown_utime_truncate_statvfs(c: Client, d: str) -> None:
    f = f"{d}/f"
    c.write_bytes(f, b"0123456789")
    c.chmod(f, 0o640)
    assert stat.S_IMODE(c.stat(f).st_mode) == 0o640
    c.chown(f, USER, GROUP)
    assert (c.stat(f).st_uid, c.stat(f).st_gid) == (USER, GROUP)
    c.chown(f, -1, 0)
    assert (c.stat(f).st_uid, c.stat(f).st_gid) == (USER, 0)
    c.utime(f, ns=(1_000_000_123, 2_000_000_456))
    st = c.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    c.utime(f, (5.5, 7.25))
    assert (c.stat(f).st_atime_ns, c.stat(f).st_mtime_ns) == (5_500_000_000, 7_250_000_000)
    before = time.time()
    c.utime(f)  # the server's now
    assert c.stat(f).st_mtime >= before - 5
    c.truncate(f, 4)
    assert c.read_bytes(f) == b"0123"
    c.truncate(f, 6)
    assert c.read_bytes(f) == b"0123\0\0"
    c.symlink("f", f"{d}/l")
    c.chmod(f"{d}/l", 0o600)  # follows the link
    assert stat.S_IMODE(c.stat(f).st_mode) == 0o600
    vfs = c.statvfs(d)
    assert isinstance(vfs, os.statvfs_result)
    assert vfs.f_frsize > 0 and 0 < vfs.f_bavail <= vfs.f_blocks and vfs.f_namemax == 255


# -- directories ------------------------------------------------------------------------------


def test_mkdir_makedirs_rmdir_listdir_scandir(c: Client, d: str) -> None:
    c.mkdir(f"{d}/a", 0o750)
    assert stat.S_IMODE(c.stat(f"{d}/a").st_mode) == 0o750  # umask 022 leaves it
    c.mkdir(f"{d}/b", 0o777)
    assert stat.S_IMODE(c.stat(f"{d}/b").st_mode) == 0o755  # umask 022 applied
    c.makedirs(f"{d}/x/y/z")
    c.makedirs(f"{d}/x/y/z", exist_ok=True)
    c.mkdir(f"{d}/x/y", exist_ok=True)
    c.mkdir(f"{d}/p/q/", parents=True)
    with pytest.raises(FileExistsError):
        c.makedirs(f"{d}/x/y/z")
    c.write_bytes(f"{d}/file", b"x")
    with pytest.raises(FileExistsError):
        c.mkdir(f"{d}/file", exist_ok=True)  # exists, but not as a directory
    assert sorted(c.listdir(d)) == ["a", "b", "file", "p", "x"]
    assert sorted(c.listdir(d.encode())) == [b"a", b"b", b"file", b"p", b"x"]
    with c.scandir(d) as it:
        entries = {e.name: e for e in it}
    assert all(isinstance(e, DirEntry) for e in entries.values())
    assert entries["a"].is_dir() and not entries["a"].is_file()
    assert entries["file"].is_file() and entries["file"].path == f"{d}/file"
    assert entries["file"].inode() == c.stat(f"{d}/file").st_ino
    assert entries["file"].stat().st_size == 1 and os.fspath(entries["file"]) == f"{d}/file"
    c.rmdir(f"{d}/x/y/z")
    assert c.listdir(f"{d}/x/y") == []
    with pytest.raises(OSError) as exc:
        c.rmdir(f"{d}/x")
    assert (exc.value.errno, exc.value.filename) == (errno.ENOTEMPTY, f"{d}/x")
    many = [f"n{i:04d}" for i in range(600)]  # several READDIRPLUS pages
    c.mkdir(f"{d}/many")
    for name in many:
        c.nfs.create(c.handle(f"{d}/many"), name)
    assert sorted(c.listdir(f"{d}/many")) == many


def test_remove_rename_replace_symlink_readlink_link(c: Client, d: str) -> None:
    c.write_bytes(f"{d}/a", b"A")
    c.write_bytes(f"{d}/b", b"B")
    c.rename(f"{d}/a", f"{d}/b")  # replaces, as on POSIX
    assert c.read_bytes(f"{d}/b") == b"A" and not c.exists(f"{d}/a")
    c.mkdir(f"{d}/sub")
    c.replace(f"{d}/b", f"{d}/sub/c")
    assert c.listdir(d) == ["sub"] and c.read_bytes(f"{d}/sub/c") == b"A"
    c.symlink("sub/c", f"{d}/s")
    assert c.readlink(f"{d}/s") == "sub/c" and c.readlink(f"{d}/s".encode()) == b"sub/c"
    c.link(f"{d}/sub/c", f"{d}/hard")
    assert c.stat(f"{d}/hard").st_ino == c.stat(f"{d}/sub/c").st_ino
    assert c.stat(f"{d}/hard").st_nlink == 2
    c.link(f"{d}/s", f"{d}/hard2")  # follows the symlink, as os.link does by default
    assert c.stat(f"{d}/hard2").st_nlink == 3
    c.link(f"{d}/s", f"{d}/hardlink", follow_symlinks=False)
    assert c.readlink(f"{d}/hardlink") == "sub/c"
    c.remove(f"{d}/hard")
    c.unlink(f"{d}/hard2")
    assert c.stat(f"{d}/sub/c").st_nlink == 1
    c.unlink(f"{d}/s")  # the link, not its target
    assert c.exists(f"{d}/sub/c")


def test_walk_over_a_tree_made_by_another_client(server: PrismProcess, c: Client, d: str) -> None:
    expected: dict[str, tuple[set[str], set[str]]] = {}
    with server.nfs_client() as other:  # the project's NfsClient on its own connection
        top = other.walk(server.mount("/vm"), d)
        todo = [(d, top, 3)]
        while todo:
            path, fh, depth = todo.pop()
            dirs = {f"dir{i}" for i in range(depth)}
            files = {f"file{i}.txt" for i in range(depth + 1)}
            expected[path] = (dirs, files)
            for name in files:
                ok(other.write(ok(other.create(fh, name)).obj, 0, name.encode()))
            for name in dirs:
                todo.append((f"{path}/{name}", ok(other.mkdir(fh, name)).obj, depth - 1))
        ok(other.symlink(top, "link-to-dir0", b"dir0"))
    expected[d][0].add("link-to-dir0")  # listed as a directory, not walked into
    walked = {path: (set(dirs), set(files)) for path, dirs, files in c.walk(d)}
    assert walked == expected
    order = [path for path, _, _ in c.walk(d, topdown=False)]
    assert order[-1] == d and set(order) == set(expected)
    assert len(order) == 1 + 3 + 3 * 2 + 3 * 2 * 1  # 16 directories
    followed = [path for path, _, _ in c.walk(d, followlinks=True)]
    assert f"{d}/link-to-dir0" in followed
    pruned = []
    for path, dirs, _ in c.walk(d):
        pruned.append(path)
        dirs[:] = [name for name in dirs if name != "dir2"]
    assert not any("dir2" in path for path in pruned)
    for dirpath, _, files in c.walk(d):
        for name in files:
            assert c.read_text(f"{dirpath}/{name}") == name
    errors: list[OSError] = []
    assert list(c.walk(f"{d}/missing", onerror=errors.append)) == []
    assert isinstance(errors[0], FileNotFoundError)


# -- files ------------------------------------------------------------------------------------


def test_binary_modes(c: Client, d: str) -> None:
    p = f"{d}/f"
    with c.open(p, "wb") as f:
        assert isinstance(f, io.BufferedWriter) and f.writable() and not f.readable()
        assert f.write(b"hello ") == 6 and f.tell() == 6
        f.write(memoryview(b"world"))
        assert f.name == p and f.mode == "wb"
        assert f.stat().st_size == 11  # by handle, after what was buffered
    with c.open(p, "rb") as f:
        assert isinstance(f, io.BufferedReader)
        assert f.read(5) == b"hello" and f.tell() == 5
        buf = bytearray(3)
        assert f.readinto(buf) == 3 and buf == b" wo"
        assert f.seek(-2, os.SEEK_END) == 9 and f.read() == b"ld"
        assert f.read() == b"" and f.stat().st_size == 11
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
    with c.open(p, "ab") as f:
        assert f.tell() == 11
        f.write(b"!")
    with c.open(p, "r+b") as f:
        assert isinstance(f, io.BufferedRandom)
        f.seek(6)
        f.write(b"W")
        f.seek(0)
        assert f.read() == b"hello World!"
        f.truncate(5)
        assert f.tell() == 12 and f.stat().st_size == 5
    with c.open(p, "w+b") as f:
        assert f.read() == b""  # truncated
        f.write(b"new")
        f.seek(0)
        assert f.read() == b"new"
    with pytest.raises(FileExistsError) as exc:
        c.open(p, "xb")
    assert exc.value.filename == p
    with c.open(f"{d}/x", "xb") as f:
        f.write(b"exclusive")
    with c.open(f"{d}/x", "rb", buffering=0) as raw:
        assert isinstance(raw, io.RawIOBase)
        assert raw.read(4) == b"excl" and raw.readall() == b"usive"
        assert raw.stat().st_size == 9
    with c.open(f"{d}/x", "ab", buffering=0) as raw:
        raw.seek(0)
        raw.write(b"+")  # append mode writes at the end wherever the position is
    assert c.read_bytes(f"{d}/x") == b"exclusive+"
    f = c.open(p, "rb")
    f.close()
    with pytest.raises(ValueError):
        f.read()
    for bad in ("rw", "rr", "bt", "q", "r+b+", ""):
        with pytest.raises(ValueError):
            c.open(p, bad)
    with pytest.raises(ValueError):
        c.open(p, "rb", encoding="utf-8")
    with pytest.raises(ValueError):
        c.open(p, "r", buffering=0)


def test_text_modes(c: Client, d: str) -> None:
    p = f"{d}/t.txt"
    with c.open(p, "w") as f:
        assert isinstance(f, io.TextIOWrapper) and f.mode == "w" and f.encoding == "utf-8"
        f.write("zwölf\n")
        f.writelines(["two\n", "three\r\n"])
        print("four", file=f)
        assert f.stat().st_size == len("zwölf\ntwo\nthree\r\nfour\n".encode())
    with c.open(p) as f:
        assert f.readline() == "zwölf\n"
        assert list(f) == ["two\n", "three\n", "four\n"]  # universal newlines
    with c.open(p, newline="") as f:
        assert f.read().splitlines(keepends=True)[2] == "three\r\n"
    with c.open(p, "a") as f:
        f.write("five\n")
    with c.open(p, "r+") as f:
        assert f.read().endswith("four\nfive\n")
        f.write("six\n")
    assert c.read_text(p).splitlines()[-1] == "six"
    with c.open(p, "w", encoding="latin-1") as f:
        f.write("zwölf")
    assert c.read_bytes(p) == "zwölf".encode("latin-1")
    assert c.read_text(p, encoding="latin-1") == "zwölf"
    with pytest.raises(UnicodeDecodeError):
        c.read_text(p)
    assert c.read_text(p, errors="replace") == "zw\ufffdlf"
    with pytest.raises(FileExistsError):
        c.open(p, "x")
    assert c.write_text(f"{d}/n.txt", "a\nb\n", newline="\r\n") == 4
    assert c.read_bytes(f"{d}/n.txt") == b"a\r\nb\r\n"
    with pytest.raises(TypeError):
        c.write_text(p, b"bytes")  # type: ignore[arg-type]


def test_io_conformance(c: Client, d: str) -> None:
    source = b"".join(f"line {i}\n".encode() for i in range(20_000))
    c.write_bytes(f"{d}/src", source)
    with c.open(f"{d}/src", "rb") as src, c.open(f"{d}/dst", "wb") as dst:
        shutil.copyfileobj(src, dst, 50_000)
    assert c.read_bytes(f"{d}/dst") == source
    local = io.BytesIO()
    with c.open(f"{d}/src", "rb") as src:
        shutil.copyfileobj(src, local)
        assert src.peek(1) == b""
    assert local.getvalue() == source
    with c.open(f"{d}/src", "rb") as raw_binary:
        lines = list(io.TextIOWrapper(raw_binary, encoding="ascii"))
    assert len(lines) == 20_000 and lines[-1] == "line 19999\n"
    with c.open(f"{d}/src", "rb", buffering=0) as raw:
        reader = io.BufferedReader(raw, 4096)  # any io stack works on the raw file
        assert reader.readline() == b"line 0\n" and reader.readlines()[-1] == b"line 19999\n"
    with c.open(f"{d}/src") as text:
        assert sum(1 for _ in text) == 20_000
    with c.open(f"{d}/src", "rb") as f:
        assert isinstance(f, io.BufferedIOBase) and f.seekable()
        assert f.readlines(20) == [b"line 0\n", b"line 1\n", b"line 2\n"]
    with c.open(f"{d}/copy", "w") as out, c.open(f"{d}/src") as text:
        out.writelines(text)
    assert c.read_bytes(f"{d}/copy") == source


def test_read_write_bytes_and_text(c: Client, d: str) -> None:
    assert c.write_bytes(f"{d}/b", b"bytes") == 5 and c.read_bytes(f"{d}/b") == b"bytes"
    assert c.write_bytes(f"{d}/b", bytearray(b"xy")) == 2 and c.read_bytes(f"{d}/b") == b"xy"
    assert c.write_text(f"{d}/t", "tëxt") == 4 and c.read_text(f"{d}/t") == "tëxt"
    assert c.write_bytes(f"{d}/empty", b"") == 0 and c.read_bytes(f"{d}/empty") == b""


def test_big_file_round_trip(server: PrismProcess, c: Client, d: str) -> None:
    data = os.urandom(4 << 20)
    c.write_bytes(f"{d}/big", data)
    assert c.read_bytes(f"{d}/big") == data
    with server.nfs_client() as other:  # what the server holds, through another client
        assert other.read_all(c.handle(f"{d}/big")) == data
    with c.open(f"{d}/big", "r+b") as f:
        f.seek(3 << 20)
        f.write(b"\xff" * 100)
        f.seek(0)
        got = f.read()
    assert got == data[: 3 << 20] + b"\xff" * 100 + data[(3 << 20) + 100 :]
    with c.open(f"{d}/big2", "wb") as f:
        for i in range(0, len(data), 4096):
            f.write(data[i : i + 4096])  # small writes, buffered
    assert c.read_bytes(f"{d}/big2") == data


# -- errors ----------------------------------------------------------------------------------


def test_errors_carry_errno_and_paths(c: Client, d: str) -> None:
    c.write_bytes(f"{d}/f", b"x")
    c.mkdir(f"{d}/dir")
    c.write_bytes(f"{d}/dir/inner", b"y")
    f, dr, inner, none = f"{d}/f", f"{d}/dir", f"{d}/dir/inner", f"{d}/none"
    cases: list[tuple[Any, type[OSError], int, str, str | None]] = [
        (lambda: c.stat(none), FileNotFoundError, errno.ENOENT, none, None),
        (lambda: c.stat(f + "/x"), NotADirectoryError, errno.ENOTDIR, f + "/x", None),
        (lambda: c.stat(f + "/"), NotADirectoryError, errno.ENOTDIR, f + "/", None),
        (lambda: c.open(none), FileNotFoundError, errno.ENOENT, none, None),
        (lambda: c.open(none + "/f", "w"), FileNotFoundError, errno.ENOENT, none + "/f", None),
        (lambda: c.open(dr), IsADirectoryError, errno.EISDIR, dr, None),
        (lambda: c.open(dr, "w"), IsADirectoryError, errno.EISDIR, dr, None),
        (lambda: c.open(f, "x"), FileExistsError, errno.EEXIST, f, None),
        (lambda: c.mkdir(f), FileExistsError, errno.EEXIST, f, None),
        (lambda: c.mkdir(none + "/b"), FileNotFoundError, errno.ENOENT, none + "/b", None),
        (lambda: c.rmdir(dr), OSError, errno.ENOTEMPTY, dr, None),
        (lambda: c.rmdir(f), NotADirectoryError, errno.ENOTDIR, f, None),
        (lambda: c.remove(none), FileNotFoundError, errno.ENOENT, none, None),
        (lambda: c.listdir(f), NotADirectoryError, errno.ENOTDIR, f, None),
        (lambda: c.readlink(f), OSError, errno.EINVAL, f, None),
        (lambda: c.read_bytes(dr), IsADirectoryError, errno.EISDIR, dr, None),
        (lambda: c.rmdir("/"), OSError, errno.EBUSY, "/", None),
        (lambda: c.mkdir("/"), FileExistsError, errno.EEXIST, "/", None),
        (lambda: c.chmod(none, 0), FileNotFoundError, errno.ENOENT, none, None),
        (lambda: c.truncate(dr, 0), IsADirectoryError, errno.EISDIR, dr, None),
        (lambda: c.rename(none, f), FileNotFoundError, errno.ENOENT, none, f),
        (lambda: c.rename(f, dr), IsADirectoryError, errno.EISDIR, f, dr),
        (lambda: c.link(f, inner), FileExistsError, errno.EEXIST, f, inner),
        (lambda: c.link(dr, none), IsADirectoryError, errno.EISDIR, dr, none),
        (lambda: c.symlink("t", f), FileExistsError, errno.EEXIST, "t", f),
    ]
    for call, kind, err, path, path2 in cases:
        with pytest.raises(OSError) as exc:
            call()
        where = f"{path!r}, {path2!r}"
        assert type(exc.value) is kind, f"{where}: {exc.value!r}"
        assert exc.value.errno == err, f"{where}: {exc.value!r}"
        assert (exc.value.filename, exc.value.filename2) == (path, path2), where
        assert exc.value.strerror and os.strerror(err) in exc.value.strerror
        assert path in str(exc.value)
    # I/O on an open file whose object is gone names the file too
    c.write_bytes(f"{d}/gone", b"data")
    reader, writer = c.open(f"{d}/gone", "rb"), c.open(f"{d}/gone", "ab", buffering=0)
    c.remove(f"{d}/gone")
    for call in (reader.read, lambda: writer.write(b"x"), reader.stat):
        with pytest.raises(OSError) as exc:
            call()
        assert (exc.value.errno, exc.value.filename) == (errno.ESTALE, f"{d}/gone")
    reader.close()
    writer.close()


def test_permissions_follow_uid_and_gid(
    server: PrismProcess, transport: str, c: Client, d: str
) -> None:
    c.write_bytes(f"{d}/mine", b"secret")
    c.chown(f"{d}/mine", USER, GROUP)
    c.chmod(f"{d}/mine", 0o640)
    c.makedirs(f"{d}/closed/sub", 0o755)
    with (
        open_client(server, transport, uid=USER, gid=USER) as user,
        open_client(server, transport, uid=OTHER, gid=OTHER) as other,
    ):
        assert user.read_bytes(f"{d}/mine") == b"secret"
        with user.open(f"{d}/mine", "ab") as f:
            f.write(b"!")
        with pytest.raises(PermissionError) as exc:
            other.read_bytes(f"{d}/mine")
        assert (exc.value.errno, exc.value.filename) == (errno.EACCES, f"{d}/mine")
        with pytest.raises(PermissionError):
            other.open(f"{d}/mine", "ab")
        with pytest.raises(PermissionError):
            other.chmod(f"{d}/mine", 0o777)  # not the owner
        with pytest.raises(PermissionError):
            user.write_bytes(f"{d}/closed/new", b"x")  # root's directory, 0o755
        with pytest.raises(PermissionError):
            user.rmdir(f"{d}/closed/sub")
        user.write_bytes(f"{d}/by-user", b"u")
        st = user.stat(f"{d}/by-user")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, 0o644)
    with open_client(server, transport, uid=OTHER, gid=OTHER, groups=[GROUP]) as member:
        assert member.read_bytes(f"{d}/mine") == b"secret!"  # through the group
        with pytest.raises(PermissionError):
            member.open(f"{d}/mine", "r+b")
    with open_client(server, transport, uid=OTHER, gid=OTHER, umask=0o077) as private:
        private.write_bytes(f"{d}/private", b"p")
        private.mkdir(f"{d}/private-dir")
        assert stat.S_IMODE(private.stat(f"{d}/private").st_mode) == 0o600
        assert stat.S_IMODE(private.stat(f"{d}/private-dir").st_mode) == 0o700


# -- the NFS procedures by handle --------------------------------------------------------------


def test_every_nfs_procedure_by_handle(c: Client, d: str) -> None:
    nfs, top = c.nfs, c.handle(d)
    done: set[Nfs3Proc] = set()

    def call(proc: Nfs3Proc, res: Any) -> Any:
        done.add(proc)
        return ok(res)

    nfs.null()
    done.add(Nfs3Proc.NULL)
    f = call(Nfs3Proc.CREATE, nfs.create(top, "f", T.Sattr3(mode=0o644), CreateMode.GUARDED)).obj
    assert f == c.handle(f"{d}/f")
    w = call(Nfs3Proc.WRITE, nfs.write(f, 0, b"by handle", StableHow.UNSTABLE))
    assert call(Nfs3Proc.COMMIT, nfs.commit(f)).verf == w.verf
    assert call(Nfs3Proc.READ, nfs.read(f, 0, 100)).data == b"by handle"
    assert call(Nfs3Proc.GETATTR, nfs.getattr(f)).obj_attributes.size == 9
    call(Nfs3Proc.SETATTR, nfs.setattr(f, T.Sattr3(size=2)))
    assert call(Nfs3Proc.LOOKUP, nfs.lookup(top, "f")).object == f
    assert call(Nfs3Proc.ACCESS, nfs.access(f, ACCESS3_READ)).access & ACCESS3_READ
    sub = call(Nfs3Proc.MKDIR, nfs.mkdir(top, "sub")).obj
    s = call(Nfs3Proc.SYMLINK, nfs.symlink(top, "s", "f")).obj
    assert call(Nfs3Proc.READLINK, nfs.readlink(s)).data == b"f"
    call(Nfs3Proc.MKNOD, nfs.mknod(top, "fifo", FileType.FIFO))
    assert stat.S_ISFIFO(c.lstat(f"{d}/fifo").st_mode)
    call(Nfs3Proc.LINK, nfs.link(f, sub, "hard"))
    call(Nfs3Proc.RENAME, nfs.rename(sub, "hard", top, "moved"))
    names = {e.name for e in call(Nfs3Proc.READDIR, nfs.readdir(top)).entries}
    assert {b"f", b"sub", b"s", b"fifo", b"moved"} <= names
    assert len(call(Nfs3Proc.READDIRPLUS, nfs.readdirplus(top)).entries) == len(names)
    call(Nfs3Proc.REMOVE, nfs.remove(top, "moved"))
    call(Nfs3Proc.RMDIR, nfs.rmdir(top, "sub"))
    assert call(Nfs3Proc.FSSTAT, nfs.fsstat(c.root)).tbytes > 0
    assert call(Nfs3Proc.FSINFO, nfs.fsinfo(c.root)).wtmax == c.wtmax
    assert call(Nfs3Proc.PATHCONF, nfs.pathconf(c.root)).name_max == 255
    assert done == set(Nfs3Proc)
    with c.open(f"{d}/f", "rb") as fobj:
        assert fobj.handle == f
    assert nfs.getattr(b"garbage handle").status in (
        NfsStat3.NFS3ERR_BADHANDLE,
        NfsStat3.NFS3ERR_STALE,
    )


class Spy:
    """Passes every call through to the real transport and records (prog, proc, args)."""

    def __init__(self, caller: Any) -> None:
        self.caller = caller
        self.calls: list[tuple[int, bytes]] = []

    def call(self, proc: int, args: bytes) -> bytes:
        self.calls.append((proc, args))
        return bytes(self.caller.call(proc, args))

    def procs(self) -> list[Nfs3Proc]:
        return [Nfs3Proc(proc) for proc, _ in self.calls]


def test_writes_are_unstable_and_committed_on_flush_and_close(
    server: PrismProcess, transport: str
) -> None:
    with open_client(server, transport, uid=0, gid=0, commit_limit=1 << 20) as c:
        c.mkdir("/unstable", exist_ok=True)
        spy = Spy(c.nfs._rpc)
        c.nfs._rpc = spy  # the same connection, observed
        with c.open("/unstable/f", "wb") as f:
            start = len(spy.calls)
            f.write(b"a" * 1000)
            assert spy.procs()[start:] == []  # buffered
            f.flush()
            assert spy.procs()[start:] == [Nfs3Proc.WRITE, Nfs3Proc.COMMIT]
            f.flush()  # nothing new: no call
            assert len(spy.calls) == start + 2
            f.write(os.urandom(3 << 20))  # past commit_limit: commits on its own
            assert Nfs3Proc.COMMIT in spy.procs()[start + 2 :]
            before_close = len(spy.calls)
        assert spy.procs()[before_close:][-1] == Nfs3Proc.COMMIT  # close commits the rest
        writes = [
            T.decode_args(Nfs3Proc.WRITE, args)
            for proc, args in spy.calls
            if proc == Nfs3Proc.WRITE
        ]
        assert len(writes) >= 4
        assert writes and all(w.stable == StableHow.UNSTABLE for w in writes)


def test_a_client_can_be_shared_by_threads(c: Client, d: str) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            data = os.urandom(100_000 + i)
            for round_ in range(5):
                c.write_bytes(f"{d}/t{i}-{round_}", data)
                assert c.read_bytes(f"{d}/t{i}-{round_}") == data
                assert c.stat(f"{d}/t{i}-{round_}").st_size == len(data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(c.listdir(d)) == 30


# -- server restarts -------------------------------------------------------------------------


def test_reconnects_after_a_restart_with_the_same_handles(
    prism_server: PrismProcess, transport: str
) -> None:
    server = prism_server
    with open_client(server, transport, uid=0, gid=0, timeout=60) as c:
        c.write_bytes("/f", b"0123456789" * 1000)
        fh = c.handle("/f")
        reader = c.open("/f", "rb", buffering=0)
        assert reader.read(10) == b"0123456789"
        server.restart()
        assert reader.read(5) == b"01234"  # same handle, same position, new connection
        assert c.handle("/f") == fh and c.listdir("/") == ["f"]
        server.restart(crash=True)
        assert c.stat("/f").st_size == 10_000
        reader.close()
        assert c._transport.reconnects >= 2  # type: ignore[attr-defined]


def test_a_file_open_for_writing_survives_a_restart(
    prism_server: PrismProcess, transport: str
) -> None:
    server = prism_server
    data = os.urandom(3 << 20)
    with open_client(server, transport, uid=0, gid=0, timeout=60) as c:
        f = c.open("/f", "wb")
        f.write(data[: 1 << 20])
        server.restart()  # clean: the verifier changes all the same
        f.write(data[1 << 20 :])
        f.close()
        assert f.raw.resends >= 1
        assert c.read_bytes("/f") == data


def test_unstable_data_the_server_lost_is_resent(
    prism_server: PrismProcess, transport: str, tmp_path: Path
) -> None:
    """A server that restarts may lose what it answered UNSTABLE: the client sees the new
    write verifier at COMMIT and writes its copy again. The loss is made certain by putting
    back the data directory as it was before the writes (as a power cut would)."""
    server = prism_server
    data = os.urandom(3 << 20)
    with open_client(server, transport, uid=0, gid=0, timeout=60) as c:
        f = c.open("/f", "wb")
        text = c.open("/t", "w")
        server.stop()
        shutil.copytree(server.data, tmp_path / "before")
        server.start()
        f.write(data)  # written through, UNSTABLE, not committed
        text.write("line one\n" * 1000)  # buffered: sent at close, after the loss
        with server.nfs_client() as other:
            assert ok(other.getattr(f.handle)).obj_attributes.size == len(data)
        server.kill()
        shutil.rmtree(server.data)
        shutil.copytree(tmp_path / "before", server.data)
        server.start()
        with server.nfs_client() as other:
            assert ok(other.getattr(f.handle)).obj_attributes.size == 0  # lost
        f.close()  # COMMIT: another verifier, so everything is written again
        text.close()
        assert f.raw.resends == 1
        assert c.read_bytes("/f") == data
        assert c.read_text("/t") == "line one\n" * 1000
    server.stop()
    fsck = server.cli("fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_server_that_stays_down_times_out(prism_server: PrismProcess, transport: str) -> None:
    server = prism_server
    c = open_client(server, transport, uid=0, gid=0, timeout=2)
    c.write_bytes("/f", b"x")
    server.kill()
    started = time.monotonic()
    with pytest.raises(TimeoutError) as exc:
        c.stat("/f")
    assert 1.5 < time.monotonic() - started < 10
    peer = "127.0.0.1 over tcp" if transport == "tcp" else f"VRPC {server.vrpc_socket()} over vrpc"
    assert f"no reply from {peer} in 2 s" in str(exc.value)
    assert "(the link failed: " in str(exc.value)  # why the server went, then why it stays
    if transport == "vrpc":
        assert "the server closed the channel (it stopped or died); reconnecting: " in str(
            exc.value
        )
        assert f"no server listens on {server.vrpc_socket()}" in str(exc.value)
    c.close()
    with pytest.raises(ValueError):
        c.stat("/f")
    server.start()


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9"])
def test_a_call_asleep_on_the_ring_wakes_when_the_server_ends_and_goes_on(
    prism_server: PrismProcess, how: str
) -> None:
    """A durable CREATE waits for the store's write lock (held here); the server ends: the
    client's channel wakes within a second with the reason, the transport keeps reattaching,
    and once the server is back the call completes unaided, on the same client."""
    server = prism_server
    with open_client(server, "vrpc", uid=0, gid=0, timeout=60) as c:
        c.write_bytes("/before", b"x")
        lock = os.open(server.data / "meta", os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)
        done: list[BaseException | None] = []

        def create() -> None:
            try:
                c.write_bytes("/asleep", b"made across the restart")
                done.append(None)
            except BaseException as exc:
                done.append(exc)

        sleeper = threading.Thread(target=create)
        sleeper.start()
        time.sleep(0.5)
        assert not done and c._transport.last_failure is None  # type: ignore[attr-defined]
        assert server.proc is not None
        sent = time.monotonic()
        if how == "SIGTERM":
            server.proc.send_signal(signal.SIGTERM)
        else:
            server.kill()
        while c._transport.last_failure is None:  # type: ignore[attr-defined]
            assert time.monotonic() - sent < 1.0, f"{how}: the client slept on"
            time.sleep(0.01)
        failure = c._transport.last_failure  # type: ignore[attr-defined]
        assert isinstance(failure, ServerGone)
        assert ("stopping" if how == "SIGTERM" else "stopped or died") in str(failure)
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        if how == "SIGTERM":
            server.stop()
        assert not done or done == [None]
        server.start()
        sleeper.join(30)
        assert done == [None]
        assert c.read_bytes("/asleep") == b"made across the restart"
        assert c.transport == "vrpc" and c._transport.reconnects >= 1  # type: ignore[attr-defined]


def test_every_channel_of_a_vrpc_client_is_one_client_to_the_drc(server: PrismProcess) -> None:
    """The channels a VRPC transport attaches (at start, and after each failure) carry one
    client id, so a CREATE resent with its xid on a new channel (its reply lost with the
    old one) gets the server's cached reply, not EEXIST; a client of its own does not."""
    with open_client(server, "vrpc", uid=0, gid=0) as c:
        c.mkdir("/drc", exist_ok=True)
        top = c.handle("/drc")
        transport: Any = c._transport
        args = T.encode_args(
            Nfs3Proc.CREATE,
            T.CreateArgs(T.DirOpArgs3(top, b"once"), CreateMode.GUARDED, T.Sattr3(mode=0o600)),
        )
        record = encode_call(0x5EED, NFS_PROGRAM, 3, Nfs3Proc.CREATE, args, CRED)
        first, again = transport._connect(10), transport._connect(10)
        try:
            answer = first.call(record, 10)
            first.close()  # the channel ends: as if its reply had been lost with it
            assert again.call(record, 10) == answer  # the same xid on another channel: cached
            assert T.decode_result(Nfs3Proc.CREATE, raise_for_reply(decode_reply(answer))).ok
        finally:
            again.close()
        with open_client(server, "vrpc", uid=0, gid=0) as other:
            res = other._transport.call(NFS_PROGRAM, 3, Nfs3Proc.CREATE, args)  # type: ignore[attr-defined]
            assert T.decode_result(Nfs3Proc.CREATE, res).status == NfsStat3.NFS3ERR_EXIST


# -- the transport seam ----------------------------------------------------------------------


def test_a_client_over_any_link(server: PrismProcess) -> None:
    """`RecordTransport` over `Link`s is the seam a VRPC channel plugs into: anything that
    sends a CALL record and returns its REPLY record. Here, raw TCP connections of our own;
    when the server restarts, the transport opens a new link and resends."""
    opened: list[RawLink] = []

    class RawLink:
        def __init__(self) -> None:
            self.conns = {
                NFS_PROGRAM: connect_rpc("127.0.0.1", server.nfs_port, NFS_PROGRAM, 3),
                MOUNT_PROGRAM: connect_rpc("127.0.0.1", server.mount_port, MOUNT_PROGRAM, 3),
            }
            self.progs: list[int] = []
            opened.append(self)

        def call(self, record: bytes, timeout: float) -> bytes:
            prog = struct.unpack_from(">I", record, 12)[0]
            self.progs.append(prog)
            self.conns[prog].send_raw(record)
            return self.conns[prog].recv_record(timeout)

        def close(self) -> None:
            for conn in self.conns.values():
                conn.close()

    transport = RecordTransport("raw", lambda timeout: RawLink(), auth_sys(0, 0), timeout=30)
    with Client(transport, "a test", "/vm", umask=0o022, commit_limit=1 << 20) as c:
        assert (c.transport, c.transport_reason) == ("raw", "a test")
        c.mkdir("/links", exist_ok=True)
        c.write_text("/links/f", "over a link")
        assert c.read_text("/links/f") == "over a link"
        server.restart()
        assert c.listdir("/links") == ["f"]
    assert len(opened) == 2 and transport.reconnects == 1
    assert opened[0].progs[0] == MOUNT_PROGRAM and set(opened[0].progs) == {
        MOUNT_PROGRAM,
        NFS_PROGRAM,
    }
    assert all(conn.sock.fileno() == -1 for link in opened for conn in link.conns.values())


def test_an_undecodable_reply_is_an_io_error() -> None:
    """A peer that answers with garbage (right xid, not a reply) gets EIO, not a crash."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                reader = RecordReader()
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    for record in reader.feed(data):
                        conn.sendall(frame(record[:4] + b"\0\0\0\7 not a reply"))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        transport = tcp_transport(Target("127.0.0.1", "/vm", port, port), auth_sys(), timeout=5)
        with pytest.raises(OSError) as exc:
            transport.call(NFS_PROGRAM, 3, 0, b"")
        assert exc.value.errno == errno.EIO and "undecodable reply" in str(exc.value)
        transport.close()
        thread.join(5)
