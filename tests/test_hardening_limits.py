"""Issue #10 item 17: the server's limits on unbounded XDR fields are answered with NFS
statuses (RFC 1813), not GARBAGE_ARGS, and out-of-range values are refused, not mangled.

Against a live `prism serve` over TCP and UDP: names of 256+ bytes and symlink targets over
4096 bytes get NFS3ERR_NAMETOOLONG from every procedure that takes them; READ and READDIR
counts up to 2^32-1 get replies clamped to the server's maximum; a READDIR cookie no entry
was ever given (2^64-1) gets NFS3ERR_BAD_COOKIE; an nfstime3 with nseconds >= 10^9 gets
NFS3ERR_INVAL and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from prism.nfs.client import NfsClient
from prism.nfs.const import MAX_NAME, MAX_PATH, MAX_READ, NfsStat3, StableHow, TimeHow
from prism.nfs.wire import NfsFh3, NfsTime3, Sattr3
from prism.store.types import FileType
from tests.server_helpers import PrismProcess, running_server

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
LONG = b"n" * (MAX_NAME + 1)
TOOLONG = NfsStat3.NFS3ERR_NAMETOOLONG


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrismProcess]:
    with running_server(tmp_path_factory.mktemp("limits")) as srv:
        root = srv.mount("/vm")
        with srv.nfs_client() as c:
            box = c.mkdir(root, "box").obj
            assert box is not None
            file = c.create(box, "file").obj
            assert file is not None
            for half in range(2):  # 2 MiB
                c.write(file, half << 20, bytes(range(256)) * 4096)
            for i in range(300):
                c.create(box, f"entry-{i:04d}")
        yield srv


@pytest.fixture(params=["tcp", "udp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client(server: PrismProcess, transport: str) -> Iterator[NfsClient]:
    with server.nfs_client(transport) as c:
        yield c


def handles(c: NfsClient, server: PrismProcess) -> tuple[NfsFh3, NfsFh3]:
    box = c.walk(server.mount("/vm"), "box")
    return box, c.walk(box, "file")


@pytest.mark.parametrize("length", [MAX_NAME + 1, 1000, 8000])
def test_long_names_get_nametoolong(
    client: NfsClient, server: PrismProcess, transport: str, length: int
) -> None:
    c = client
    if transport == "udp" and length > 4000:
        pytest.skip("a datagram holds smaller calls")
    box, file = handles(c, server)
    name = b"n" * length
    assert c.lookup(box, name).status == TOOLONG
    assert c.create(box, name).status == TOOLONG
    assert c.mkdir(box, name).status == TOOLONG
    assert c.symlink(box, name, b"target").status == TOOLONG
    assert c.mknod(box, name, FileType.FIFO).status == TOOLONG
    assert c.link(file, box, name).status == TOOLONG
    assert c.rename(box, "file", box, name).status == TOOLONG
    assert c.rename(box, name, box, "other").status == TOOLONG
    assert c.remove(box, name).status == TOOLONG
    assert c.rmdir(box, name).status == TOOLONG
    # The failure carries its RFC body: the directory's wcc_data.
    res = c.create(box, name)
    assert res.dir_wcc.after is not None and res.dir_wcc.after.type == FileType.DIR
    assert c.lookup(box, "file").status == NfsStat3.NFS3_OK  # nothing was renamed


def test_a_name_of_the_limit_works(client: NfsClient, server: PrismProcess, transport: str) -> None:
    box, _ = handles(client, server)
    name = (b"m" * MAX_NAME + transport.encode())[-MAX_NAME:]
    assert client.create(box, name).status == NfsStat3.NFS3_OK
    assert client.lookup(box, name).status == NfsStat3.NFS3_OK
    assert client.remove(box, name).status == NfsStat3.NFS3_OK


def test_long_symlink_target_gets_nametoolong(server: PrismProcess) -> None:
    with server.nfs_client() as c:
        box, _ = handles(c, server)
        assert c.symlink(box, "long", b"t" * (MAX_PATH + 1)).status == TOOLONG
        assert c.symlink(box, "huge", b"t" * 100_000).status == TOOLONG
        res = c.symlink(box, "max", b"t" * MAX_PATH)
        assert res.status == NfsStat3.NFS3_OK and res.obj is not None
        assert c.readlink(res.obj).data == b"t" * MAX_PATH


@pytest.mark.parametrize("count", [MAX_READ + 1, 1 << 31, U32_MAX])
def test_read_count_is_clamped(
    client: NfsClient, server: PrismProcess, transport: str, count: int
) -> None:
    _, file = handles(client, server)
    res = client.read(file, 0, count)
    limit = 32 * 1024 if transport == "udp" else MAX_READ
    assert res.status == NfsStat3.NFS3_OK
    assert len(res.data) == limit and not res.eof
    assert res.data == (bytes(range(256)) * 8192)[:limit]


@pytest.mark.parametrize("count", [(1 << 20) + 1, U32_MAX])
def test_readdir_counts_are_clamped(
    client: NfsClient, server: PrismProcess, transport: str, count: int
) -> None:
    box, _ = handles(client, server)
    res = client.readdir(box, count=count)
    assert res.status == NfsStat3.NFS3_OK
    names = {e.name for e in res.entries}
    plus = client.readdirplus(box, dircount=count, maxcount=count)
    assert plus.status == NfsStat3.NFS3_OK
    if transport == "tcp":
        assert res.eof and plus.eof
        assert {b"entry-%04d" % i for i in range(300)} <= names
    else:
        assert len(names) > 100  # a datagram's worth


@pytest.mark.parametrize("cookie", [U64_MAX, U64_MAX - 1, 1 << 63])
def test_cookie_never_issued_gets_bad_cookie(
    client: NfsClient, server: PrismProcess, cookie: int
) -> None:
    box, _ = handles(client, server)
    assert client.readdir(box, cookie=cookie).status == NfsStat3.NFS3ERR_BAD_COOKIE
    assert client.readdirplus(box, cookie=cookie).status == NfsStat3.NFS3ERR_BAD_COOKIE
    # every cookie the server hands out still resumes a listing
    first = client.readdir(box, count=1024)
    last = first.entries[-1].cookie
    assert client.readdir(box, cookie=last).status == NfsStat3.NFS3_OK


BAD_TIME = NfsTime3(U32_MAX, U32_MAX)


def test_nanoseconds_of_a_second_or_more_get_inval(server: PrismProcess) -> None:
    with server.nfs_client() as c:
        box, file = handles(c, server)
        before = c.getattr(file).obj_attributes
        assert before is not None
        for sattr in (
            Sattr3(mtime=BAD_TIME),
            Sattr3(atime=NfsTime3(5, 1_000_000_000)),
            Sattr3(mode=0o600, mtime=NfsTime3(5, 1_000_000_000)),
        ):
            res = c.setattr(file, sattr)
            assert res.status == NfsStat3.NFS3ERR_INVAL
            assert res.obj_wcc.after is not None  # the failure carries wcc_data
        after = c.getattr(file).obj_attributes
        assert after is not None
        assert (after.mtime, after.atime, after.mode) == (before.mtime, before.atime, before.mode)
        bad = Sattr3(mtime=BAD_TIME)
        assert c.create(box, "t-create", bad).status == NfsStat3.NFS3ERR_INVAL
        assert c.mkdir(box, "t-mkdir", bad).status == NfsStat3.NFS3ERR_INVAL
        assert c.symlink(box, "t-link", b"x", bad).status == NfsStat3.NFS3ERR_INVAL
        assert c.mknod(box, "t-fifo", FileType.FIFO, bad).status == NfsStat3.NFS3ERR_INVAL
        for name in ("t-create", "t-mkdir", "t-link", "t-fifo"):
            assert c.lookup(box, name).status == NfsStat3.NFS3ERR_NOENT
        # the largest valid time is stored exactly
        top = NfsTime3(U32_MAX, 999_999_999)
        assert c.setattr(file, Sattr3(mtime=top, atime=TimeHow.DONT_CHANGE)).status == 0
        got = c.getattr(file).obj_attributes
        assert got is not None and got.mtime == top


def test_oversized_write_is_a_short_write(server: PrismProcess) -> None:
    """WRITE data is opaque<> too: beyond wtmax the server writes what it takes (knfsd)."""
    with server.nfs_client() as c:
        box, _ = handles(c, server)
        fh = c.create(box, "big-write").obj
        assert fh is not None
        data = b"w" * ((1 << 20) + 8192)
        res = c.write(fh, 0, data, StableHow.FILE_SYNC)
        assert res.status == NfsStat3.NFS3_OK and res.count == 1 << 20
        attrs = c.getattr(fh).obj_attributes
        assert attrs is not None and attrs.size == 1 << 20
