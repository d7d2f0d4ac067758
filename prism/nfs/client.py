"""A synchronous NFSv3 / MOUNTv3 client for tests and tools.

Theory of operation: each method builds the procedure's argument dataclass, encodes it with
`prism.nfs.wire`, sends it through an RPC caller (by default `rpc.client.RpcClient`, over
TCP or UDP) and decodes the reply into the procedure's result dataclass. Per-procedure
methods never raise on NFS errors: a result carries `.status` (and `.ok`), so tests can check
the exact status and failure body. RPC-level failures (timeouts, PROG_UNAVAIL, GARBAGE_ARGS,
...) are whatever the RPC client raises; a malformed reply body raises `XdrError`. Run as
root, it calls from a privileged source port (as the kernel client and libnfs do), which
`secure` VMs require.

The convenience helpers (`walk`, `write_all`, `read_all`, `listdir`, `MountClient.mnt`) do
raise: `NfsError` / `MountError`, carrying the status.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TYPE_CHECKING, Any, Protocol

from prism.nfs.const import (
    ACCESS3_ALL,
    MAX_READ,
    MOUNT_PROGRAM,
    MOUNT_V3,
    NFS3_COOKIEVERFSIZE,
    NFS3_CREATEVERFSIZE,
    NFS_PROGRAM,
    NFS_V3,
    CreateMode,
    Ftype3,
    Mount3Proc,
    MountStat3,
    Nfs3Proc,
    NfsStat3,
    StableHow,
)
from prism.nfs.wire import (
    SATTR_EMPTY,
    VOID,
    AccessArgs,
    AccessRes,
    CommitArgs,
    CommitRes,
    CreateArgs,
    CreateRes,
    DirOpArgs3,
    DirPath,
    EntryPlus3,
    Exports,
    FsinfoArgs,
    FsinfoRes,
    FsstatArgs,
    FsstatRes,
    GetattrArgs,
    GetattrRes,
    LinkArgs,
    LinkRes,
    LookupArgs,
    LookupRes,
    MkdirArgs,
    MkdirRes,
    MknodArgs,
    MknodRes,
    MountList,
    MountRes,
    NfsFh3,
    NfsTime3,
    PathconfArgs,
    PathconfRes,
    ReadArgs,
    ReaddirArgs,
    ReaddirplusArgs,
    ReaddirplusRes,
    ReaddirRes,
    ReadlinkArgs,
    ReadlinkRes,
    ReadRes,
    RemoveArgs,
    RemoveRes,
    RenameArgs,
    RenameRes,
    RmdirArgs,
    RmdirRes,
    Sattr3,
    SetattrArgs,
    SetattrRes,
    SpecData3,
    SymlinkArgs,
    SymlinkRes,
    WriteArgs,
    WriteRes,
    decode_mount_result,
    decode_result,
    encode_args,
    encode_mount_args,
)

if TYPE_CHECKING:
    from rpc.client import RpcClient

FhLike = NfsFh3 | bytes
NameLike = bytes | str

DEFAULT_TIMEOUT = 10.0
DEFAULT_IO_SIZE = 64 * 1024


class RpcCaller(Protocol):
    """What the clients need from an RPC client: one blocking call per procedure."""

    def call(self, proc: int, args: bytes) -> bytes: ...


class NfsError(Exception):
    """An NFS procedure a helper relied on failed with `status`."""

    def __init__(self, proc: Nfs3Proc, status: NfsStat3, detail: str = "") -> None:
        super().__init__(f"{proc.name} failed: {status.name}" + (f" ({detail})" if detail else ""))
        self.proc = proc
        self.status = status


class MountError(Exception):
    """MNT failed with `status`."""

    def __init__(self, status: MountStat3, path: bytes) -> None:
        super().__init__(f"MNT {path!r} failed: {status.name}")
        self.status = status
        self.path = path


def auth_sys(
    uid: int = 0,
    gid: int = 0,
    gids: tuple[int, ...] | list[int] = (),
    machinename: bytes | str | None = None,
    stamp: int | None = None,
) -> Any:
    """An `rpc.message.AuthSys` credential (uid 0 / gid 0 = root) for the `cred` arguments."""
    from rpc.message import MAX_MACHINENAME, AuthSys

    if machinename is None:
        machinename = socket.gethostname().encode()[:MAX_MACHINENAME]
    if isinstance(machinename, str):
        machinename = machinename.encode()
    if stamp is None:
        stamp = int.from_bytes(os.urandom(4), "big")
    return AuthSys(stamp=stamp, machinename=machinename, uid=uid, gid=gid, gids=tuple(gids))


def _fh(fh: FhLike) -> NfsFh3:
    return fh if isinstance(fh, NfsFh3) else NfsFh3(bytes(fh))


def _name(name: NameLike) -> bytes:
    return os.fsencode(name)


def connect_rpc(
    host: str,
    port: int,
    prog: int,
    vers: int,
    transport: str = "tcp",
    cred: Any = None,
    source: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> RpcClient:
    """An `rpc.client.RpcClient` for prog/vers; as root, bound to a privileged source port."""
    from rpc.client import RpcClient

    kwargs: dict[str, Any] = {"transport": transport, "cred": cred, "timeout": timeout}
    if source is not None:
        kwargs["source"] = source
    if transport != "unix" and os.geteuid() == 0:
        # As the Linux kernel client and libnfs do when they can: servers that are `secure`
        # (knfsd's default, and new Prism VMs) answer privileged source ports only.
        try:
            return RpcClient(host, port, prog, vers, reserved_port=True, **kwargs)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:  # every reserved port busy: use any port
                raise
    return RpcClient(host, port, prog, vers, **kwargs)


class _Base:
    """Connects to `PROGRAM`/`VERSION`; `rpc` injects any `RpcCaller` (no network then)."""

    PROGRAM: int
    VERSION: int
    _rpc: RpcCaller

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        transport: str = "tcp",
        cred: Any = None,
        source: Any = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        rpc: RpcCaller | None = None,
    ) -> None:
        if rpc is None:
            prog, vers = self.PROGRAM, self.VERSION
            rpc = connect_rpc(host, port, prog, vers, transport, cred, source, timeout)
        self._rpc = rpc

    def close(self) -> None:
        close = getattr(self._rpc, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MountClient(_Base):
    """MOUNTv3 client. `rpc` injects any `RpcCaller` (no network is opened then)."""

    PROGRAM, VERSION = MOUNT_PROGRAM, MOUNT_V3

    def _call(self, proc: Mount3Proc, args: Any) -> Any:
        return decode_mount_result(proc, self._rpc.call(proc, encode_mount_args(proc, args)))

    def null(self) -> None:
        self._call(Mount3Proc.NULL, VOID)

    def mnt_raw(self, path: NameLike) -> MountRes:
        """MNT, returning the result whatever its status."""
        res: MountRes = self._call(Mount3Proc.MNT, DirPath(_name(path)))
        return res

    def mnt(self, path: NameLike) -> tuple[NfsFh3, tuple[int, ...]]:
        """MNT: the root handle of `path` and the auth flavors the server accepts."""
        res = self.mnt_raw(path)
        if not res.ok or res.fhandle is None:
            raise MountError(res.status, _name(path))
        return res.fhandle, res.auth_flavors

    def umnt(self, path: NameLike) -> None:
        self._call(Mount3Proc.UMNT, DirPath(_name(path)))

    def umntall(self) -> None:
        self._call(Mount3Proc.UMNTALL, VOID)

    def export(self) -> list[tuple[bytes, tuple[bytes, ...]]]:
        """EXPORT: (directory, groups) for every export."""
        res: Exports = self._call(Mount3Proc.EXPORT, VOID)
        return [(node.dir, node.groups) for node in res.entries]

    def dump(self) -> list[tuple[bytes, bytes]]:
        """DUMP: (hostname, directory) for every mount the server remembers."""
        res: MountList = self._call(Mount3Proc.DUMP, VOID)
        return [(body.hostname, body.directory) for body in res.entries]


class NfsClient(_Base):
    """NFSv3 client: one method per procedure, each returning the typed result."""

    PROGRAM, VERSION = NFS_PROGRAM, NFS_V3

    def call(self, proc: Nfs3Proc, args: Any) -> Any:
        """Send any procedure's argument dataclass; returns its result dataclass."""
        return decode_result(proc, self._rpc.call(proc, encode_args(proc, args)))

    # --- one method per procedure --------------------------------------------------------

    def null(self) -> None:
        self.call(Nfs3Proc.NULL, VOID)

    def getattr(self, fh: FhLike) -> GetattrRes:
        res: GetattrRes = self.call(Nfs3Proc.GETATTR, GetattrArgs(_fh(fh)))
        return res

    def setattr(self, fh: FhLike, attributes: Sattr3, guard: NfsTime3 | None = None) -> SetattrRes:
        res: SetattrRes = self.call(Nfs3Proc.SETATTR, SetattrArgs(_fh(fh), attributes, guard))
        return res

    def lookup(self, dir_fh: FhLike, name: NameLike) -> LookupRes:
        res: LookupRes = self.call(
            Nfs3Proc.LOOKUP, LookupArgs(DirOpArgs3(_fh(dir_fh), _name(name)))
        )
        return res

    def access(self, fh: FhLike, access: int = ACCESS3_ALL) -> AccessRes:
        res: AccessRes = self.call(Nfs3Proc.ACCESS, AccessArgs(_fh(fh), access))
        return res

    def readlink(self, fh: FhLike) -> ReadlinkRes:
        res: ReadlinkRes = self.call(Nfs3Proc.READLINK, ReadlinkArgs(_fh(fh)))
        return res

    def read(self, fh: FhLike, offset: int, count: int) -> ReadRes:
        res: ReadRes = self.call(Nfs3Proc.READ, ReadArgs(_fh(fh), offset, count))
        return res

    def write(
        self,
        fh: FhLike,
        offset: int,
        data: bytes,
        stable: StableHow = StableHow.FILE_SYNC,
    ) -> WriteRes:
        res: WriteRes = self.call(Nfs3Proc.WRITE, WriteArgs(_fh(fh), offset, stable, data))
        return res

    def create(
        self,
        dir_fh: FhLike,
        name: NameLike,
        attributes: Sattr3 = SATTR_EMPTY,
        mode: CreateMode = CreateMode.UNCHECKED,
        verf: bytes | None = None,
    ) -> CreateRes:
        """CREATE; for EXCLUSIVE, `verf` defaults to 8 random bytes."""
        where = DirOpArgs3(_fh(dir_fh), _name(name))
        if mode == CreateMode.EXCLUSIVE:
            args = CreateArgs(where, mode, verf=verf or os.urandom(NFS3_CREATEVERFSIZE))
        else:
            args = CreateArgs(where, mode, obj_attributes=attributes)
        res: CreateRes = self.call(Nfs3Proc.CREATE, args)
        return res

    def mkdir(self, dir_fh: FhLike, name: NameLike, attributes: Sattr3 = SATTR_EMPTY) -> MkdirRes:
        res: MkdirRes = self.call(
            Nfs3Proc.MKDIR, MkdirArgs(DirOpArgs3(_fh(dir_fh), _name(name)), attributes)
        )
        return res

    def symlink(
        self,
        dir_fh: FhLike,
        name: NameLike,
        target: NameLike,
        attributes: Sattr3 = SATTR_EMPTY,
    ) -> SymlinkRes:
        args = SymlinkArgs(DirOpArgs3(_fh(dir_fh), _name(name)), attributes, _name(target))
        res: SymlinkRes = self.call(Nfs3Proc.SYMLINK, args)
        return res

    def mknod(
        self,
        dir_fh: FhLike,
        name: NameLike,
        type: Ftype3,
        attributes: Sattr3 = SATTR_EMPTY,
        spec: SpecData3 | None = None,
    ) -> MknodRes:
        """MKNOD; `spec` (major, minor) applies to CHR/BLK only."""
        where = DirOpArgs3(_fh(dir_fh), _name(name))
        if type in (Ftype3.CHR, Ftype3.BLK):
            args = MknodArgs(where, type, attributes, spec or SpecData3())
        elif type in (Ftype3.SOCK, Ftype3.FIFO):
            args = MknodArgs(where, type, attributes)
        else:
            args = MknodArgs(where, type)
        res: MknodRes = self.call(Nfs3Proc.MKNOD, args)
        return res

    def remove(self, dir_fh: FhLike, name: NameLike) -> RemoveRes:
        res: RemoveRes = self.call(
            Nfs3Proc.REMOVE, RemoveArgs(DirOpArgs3(_fh(dir_fh), _name(name)))
        )
        return res

    def rmdir(self, dir_fh: FhLike, name: NameLike) -> RmdirRes:
        res: RmdirRes = self.call(Nfs3Proc.RMDIR, RmdirArgs(DirOpArgs3(_fh(dir_fh), _name(name))))
        return res

    def rename(
        self, from_dir: FhLike, from_name: NameLike, to_dir: FhLike, to_name: NameLike
    ) -> RenameRes:
        args = RenameArgs(
            DirOpArgs3(_fh(from_dir), _name(from_name)), DirOpArgs3(_fh(to_dir), _name(to_name))
        )
        res: RenameRes = self.call(Nfs3Proc.RENAME, args)
        return res

    def link(self, fh: FhLike, dir_fh: FhLike, name: NameLike) -> LinkRes:
        args = LinkArgs(_fh(fh), DirOpArgs3(_fh(dir_fh), _name(name)))
        res: LinkRes = self.call(Nfs3Proc.LINK, args)
        return res

    def readdir(
        self,
        dir_fh: FhLike,
        cookie: int = 0,
        cookieverf: bytes = bytes(NFS3_COOKIEVERFSIZE),
        count: int = 8192,
    ) -> ReaddirRes:
        args = ReaddirArgs(_fh(dir_fh), cookie, cookieverf, count)
        res: ReaddirRes = self.call(Nfs3Proc.READDIR, args)
        return res

    def readdirplus(
        self,
        dir_fh: FhLike,
        cookie: int = 0,
        cookieverf: bytes = bytes(NFS3_COOKIEVERFSIZE),
        dircount: int = 8192,
        maxcount: int = 65536,
    ) -> ReaddirplusRes:
        args = ReaddirplusArgs(_fh(dir_fh), cookie, cookieverf, dircount, maxcount)
        res: ReaddirplusRes = self.call(Nfs3Proc.READDIRPLUS, args)
        return res

    def fsstat(self, fh: FhLike) -> FsstatRes:
        res: FsstatRes = self.call(Nfs3Proc.FSSTAT, FsstatArgs(_fh(fh)))
        return res

    def fsinfo(self, fh: FhLike) -> FsinfoRes:
        res: FsinfoRes = self.call(Nfs3Proc.FSINFO, FsinfoArgs(_fh(fh)))
        return res

    def pathconf(self, fh: FhLike) -> PathconfRes:
        res: PathconfRes = self.call(Nfs3Proc.PATHCONF, PathconfArgs(_fh(fh)))
        return res

    def commit(self, fh: FhLike, offset: int = 0, count: int = 0) -> CommitRes:
        res: CommitRes = self.call(Nfs3Proc.COMMIT, CommitArgs(_fh(fh), offset, count))
        return res

    # --- helpers (these raise NfsError) ------------------------------------------------

    def walk(self, root_fh: FhLike, path: NameLike) -> NfsFh3:
        """LOOKUP each component of a relative path ("a/b/c"); empty components are skipped."""
        fh = _fh(root_fh)
        for part in _name(path).split(b"/"):
            if not part:
                continue
            res = self.lookup(fh, part)
            if not res.ok or res.object is None:
                raise NfsError(Nfs3Proc.LOOKUP, res.status, part.decode(errors="replace"))
            fh = res.object
        return fh

    def write_all(
        self,
        fh: FhLike,
        data: bytes,
        offset: int = 0,
        stable: StableHow = StableHow.FILE_SYNC,
        chunk: int = DEFAULT_IO_SIZE,
    ) -> int:
        """WRITE all of `data` at `offset` in chunks, following short writes; returns bytes."""
        handle = _fh(fh)
        view = memoryview(data)
        done = 0
        while done < len(view):
            res = self.write(handle, offset + done, bytes(view[done : done + chunk]), stable)
            if not res.ok:
                raise NfsError(Nfs3Proc.WRITE, res.status)
            if res.count == 0:
                raise NfsError(Nfs3Proc.WRITE, NfsStat3.NFS3ERR_IO, "server wrote 0 bytes")
            done += res.count
        if stable == StableHow.UNSTABLE and data:
            res_c = self.commit(handle, offset, len(data))
            if not res_c.ok:
                raise NfsError(Nfs3Proc.COMMIT, res_c.status)
        return done

    def read_all(
        self, fh: FhLike, offset: int = 0, chunk: int = DEFAULT_IO_SIZE, limit: int | None = None
    ) -> bytes:
        """READ from `offset` until EOF (or `limit` bytes)."""
        handle = _fh(fh)
        chunk = min(chunk, MAX_READ)
        parts: list[bytes] = []
        got = 0
        while limit is None or got < limit:
            want = chunk if limit is None else min(chunk, limit - got)
            res = self.read(handle, offset + got, want)
            if not res.ok:
                raise NfsError(Nfs3Proc.READ, res.status)
            parts.append(res.data)
            got += len(res.data)
            if res.eof or not res.data:
                break
        return b"".join(parts)

    def listdir(self, dir_fh: FhLike, maxcount: int = 65536) -> list[EntryPlus3]:
        """Every entry of a directory (including "." and ".."), via READDIRPLUS."""
        handle = _fh(dir_fh)
        entries: list[EntryPlus3] = []
        cookie, verf = 0, bytes(NFS3_COOKIEVERFSIZE)
        while True:
            res = self.readdirplus(handle, cookie, verf, maxcount, maxcount)
            if not res.ok:
                raise NfsError(Nfs3Proc.READDIRPLUS, res.status)
            entries.extend(res.entries)
            if res.eof or not res.entries:
                return entries
            cookie, verf = res.entries[-1].cookie, res.cookieverf
