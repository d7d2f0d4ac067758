"""`Client`: the file API of `prism.client` over NFSv3 procedures (see the package docstring)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prism.client._common import PathLike, check, nfs_error, stat_result
from prism.client._file import RawFile, parse_mode, wrap
from prism.client._transport import RpcCallerFor, Transport
from prism.nfs import wire as T
from prism.nfs.client import MountClient, MountError, NfsClient
from prism.nfs.const import (
    ACCESS3_EXTEND,
    ACCESS3_MODIFY,
    ACCESS3_READ,
    MOUNT_PROGRAM,
    MOUNT_V3,
    NFS3_COOKIEVERFSIZE,
    NFS_PROGRAM,
    NFS_V3,
    CreateMode,
    Ftype3,
    MountStat3,
    NfsStat3,
    TimeHow,
)

MAXSYMLINKS = 40
"""Symbolic links followed in one path before ELOOP (Linux's limit)."""
READDIR_MAXCOUNT = 64 * 1024
"""Bytes of directory entries asked for per READDIRPLUS."""
STATVFS_FRSIZE = 4096
_MOUNT_HINTS = {
    MountStat3.MNT3ERR_NOENT: "; `prism vm list` shows the VMs",
    MountStat3.MNT3ERR_ACCES: (
        "; the VM must list this client's address (`prism vm set VM --client CIDR`) and,"
        " unless it is --insecure, calls must come from a privileged port (run as root)"
    ),
}


@dataclass(frozen=True, slots=True)
class _Found:
    """Where a path led: the directory holding the last name, and the object, if any."""

    dir: T.NfsFh3 | None  # None for the root itself
    name: bytes
    fh: T.NfsFh3 | None  # None: the last name does not exist (its directory does)
    attrs: T.Fattr3 | None


def _split(path: PathLike) -> tuple[list[bytes], bool]:
    """The components of `path` (absolute within the VM; "." dropped, ".." kept for the server
    to resolve) and whether it must name a directory (a trailing "/")."""
    raw = os.fsencode(path)
    if not raw:
        raise FileNotFoundError(errno.ENOENT, "empty path", os.fspath(path))
    parts = [part for part in raw.split(b"/") if part and part != b"."]
    return parts, raw.endswith(b"/") or raw.endswith(b"/.") or raw == b"."


def _same_kind(like: Any, name: bytes) -> Any:
    """`name` as str or bytes, whichever `like` is (as `os.listdir` does)."""
    return name if isinstance(os.fspath(like), bytes) else os.fsdecode(name)


def _dirname(path: PathLike) -> Any:
    where = os.fspath(path)
    if isinstance(where, bytes):
        return os.path.dirname(where.rstrip(b"/"))
    return os.path.dirname(where.rstrip("/"))


def _join(top: Any, name: Any) -> Any:
    top = os.fspath(top)
    sep: Any = b"/" if isinstance(top, bytes) else "/"
    return top + name if top.endswith(sep) else top + sep + name


class DirEntry:
    """An entry of `Client.scandir`, like `os.DirEntry`: the attributes came with the listing
    (READDIRPLUS), so `is_dir()`, `is_file()` and `stat()` cost no call, except through a
    symbolic link."""

    __slots__ = ("_attrs", "_client", "_fh", "name", "path")

    def __init__(self, client: Client, top: Any, entry: T.EntryPlus3) -> None:
        self.name = _same_kind(top, entry.name)
        self.path = _join(top, self.name)
        self._client = client
        self._attrs = entry.name_attributes
        self._fh = entry.name_handle

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"

    def __fspath__(self) -> Any:
        return self.path

    def _lstat(self) -> T.Fattr3:
        if self._attrs is None:
            if self._fh is not None:
                res = check(self._client.nfs.getattr(self._fh), "GETATTR", self.path)
                self._attrs = res.obj_attributes
            else:
                self._attrs = self._client._find(self.path, follow=False).attrs
        assert self._attrs is not None
        return self._attrs

    def inode(self) -> int:
        return self._lstat().fileid

    def is_symlink(self) -> bool:
        return self._lstat().type == Ftype3.LNK

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if follow_symlinks and self.is_symlink():
            return self._client.stat(self.path)
        return stat_result(self._lstat())

    def _is(self, kind: int, follow_symlinks: bool) -> bool:
        try:
            return stat.S_IFMT(self.stat(follow_symlinks=follow_symlinks).st_mode) == kind
        except (FileNotFoundError, NotADirectoryError):
            return False

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._is(stat.S_IFDIR, follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._is(stat.S_IFREG, follow_symlinks)


class ScandirIterator(Iterator[DirEntry]):
    """What `Client.scandir` returns: an iterator of `DirEntry` with `close()` and `with`."""

    def __init__(self, entries: list[DirEntry]) -> None:
        self._entries = iter(entries)

    def __next__(self) -> DirEntry:
        return next(self._entries)

    def close(self) -> None:
        self._entries = iter(())

    def __enter__(self) -> ScandirIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to one VM's filesystem; made by `prism.client.connect`."""

    def __init__(
        self,
        transport: Transport,
        reason: str,
        export: str,
        *,
        umask: int,
        commit_limit: int,
    ) -> None:
        self._transport = transport
        self.transport: str = transport.name
        """"tcp" or "vrpc"."""
        self.transport_reason = reason
        """Why this transport was chosen."""
        self.export = export
        self.umask = umask
        self._commit_limit = commit_limit
        self.nfs = NfsClient(rpc=RpcCallerFor(transport, NFS_PROGRAM, NFS_V3))
        """`prism.nfs.client.NfsClient` over the same transport: every NFSv3 procedure by
        handle, returning the typed results (no exceptions for NFS errors)."""
        try:
            mount = MountClient(rpc=RpcCallerFor(transport, MOUNT_PROGRAM, MOUNT_V3))
            self.root, _ = mount.mnt(export)
            """The root handle of the VM (from MNT)."""
            info = check(self.nfs.fsinfo(self.root), "FSINFO", "/")
        except MountError as exc:
            transport.close()
            err = int(exc.status) if exc.status < MountStat3.MNT3ERR_NOTSUPP else errno.EIO
            message = f"the server refused to mount {export} ({exc.status.name})"
            raise OSError(err, message + _MOUNT_HINTS.get(exc.status, ""), export) from None
        except BaseException:
            transport.close()
            raise
        self.rtmax = info.rtmax
        self.wtmax = info.wtmax

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<prism.client.Client {self.export} over {self.transport}>"

    # -- path resolution --------------------------------------------------------------------

    def _getattr(self, fh: T.NfsFh3, path: Any) -> T.Fattr3:
        attrs = check(self.nfs.getattr(fh), "GETATTR", path).obj_attributes
        assert attrs is not None
        return attrs

    def _find(self, path: PathLike, *, follow: bool = True) -> _Found:
        """Resolve `path` component by component (LOOKUP), following symbolic links in every
        directory part and, with `follow`, in the last one. A missing last name gives
        `fh=None` (its directory exists); any other failure raises."""
        parts, must_be_dir = _split(path)
        shown = os.fspath(path)
        todo = parts[::-1]
        where, name, fh, attrs = self.root, b"", self.root, None
        links = 0
        while todo:
            name = todo.pop()
            last = not todo
            res = self.nfs.lookup(where, name)
            if res.status == NfsStat3.NFS3ERR_NOENT and last:
                return _Found(where, name, None, None)
            check(res, "LOOKUP", shown)
            assert res.object is not None
            fh = res.object
            attrs = res.obj_attributes or self._getattr(fh, shown)
            if attrs.type == Ftype3.LNK and (not last or follow or must_be_dir):
                links += 1
                if links > MAXSYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), shown)
                target = check(self.nfs.readlink(fh), "READLINK", shown).data
                if target.startswith(b"/"):
                    where = self.root
                more, _ = _split(target) if target else ([], False)
                todo.extend(more[::-1])
                if not todo:  # the link leads to `where` itself
                    fh, attrs, name = where, None, b""
                continue
            if not last:
                if attrs.type != Ftype3.DIR:
                    raise nfs_error(NfsStat3.NFS3ERR_NOTDIR, "LOOKUP", shown)
                where = fh
        if attrs is None:
            attrs = self._getattr(fh, shown)
        if must_be_dir and attrs.type != Ftype3.DIR:
            raise nfs_error(NfsStat3.NFS3ERR_NOTDIR, "LOOKUP", shown)
        return _Found(None if fh == self.root or not name else where, name, fh, attrs)

    def _existing(self, path: PathLike, *, follow: bool = True) -> _Found:
        found = self._find(path, follow=follow)
        if found.fh is None:
            raise nfs_error(NfsStat3.NFS3ERR_NOENT, "LOOKUP", os.fspath(path))
        return found

    def _parent(self, path: PathLike) -> tuple[T.NfsFh3, bytes]:
        """The directory that holds the last name of `path`, and that name (not followed)."""
        found = self._find(path, follow=False)
        if found.dir is None:
            busy = os.strerror(errno.EBUSY)
            message = f"{busy} (the VM's root cannot be created, removed or renamed)"
            raise OSError(errno.EBUSY, message, os.fspath(path))
        return found.dir, found.name

    def handle(self, path: PathLike, *, follow_symlinks: bool = True) -> T.NfsFh3:
        """The NFS handle of `path` (for `.nfs`)."""
        fh = self._existing(path, follow=follow_symlinks).fh
        assert fh is not None
        return fh

    # -- attributes -------------------------------------------------------------------------

    def stat(self, path: PathLike, *, follow_symlinks: bool = True) -> os.stat_result:
        attrs = self._existing(path, follow=follow_symlinks).attrs
        assert attrs is not None
        return stat_result(attrs)

    def lstat(self, path: PathLike) -> os.stat_result:
        return self.stat(path, follow_symlinks=False)

    def _test(self, path: PathLike, kind: int | None, follow: bool = True) -> bool:
        """As `os.path.exists`: False for any OSError except a lost or slow server."""
        try:
            st = self.stat(path, follow_symlinks=follow)
        except (ConnectionError, TimeoutError):
            raise
        except OSError:
            return False
        return kind is None or stat.S_IFMT(st.st_mode) == kind

    def exists(self, path: PathLike) -> bool:
        return self._test(path, None)

    def isdir(self, path: PathLike) -> bool:
        return self._test(path, stat.S_IFDIR)

    def isfile(self, path: PathLike) -> bool:
        return self._test(path, stat.S_IFREG)

    def islink(self, path: PathLike) -> bool:
        return self._test(path, stat.S_IFLNK, follow=False)

    def _setattr(self, path: PathLike, sattr: T.Sattr3, follow: bool) -> None:
        fh = self._existing(path, follow=follow).fh
        assert fh is not None
        check(self.nfs.setattr(fh, sattr), "SETATTR", os.fspath(path))

    def chmod(self, path: PathLike, mode: int, *, follow_symlinks: bool = True) -> None:
        self._setattr(path, T.Sattr3(mode=mode & 0o7777), follow_symlinks)

    def chown(self, path: PathLike, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """As `os.chown`: -1 leaves the uid or gid as it is."""
        sattr = T.Sattr3(uid=None if uid == -1 else uid, gid=None if gid == -1 else gid)
        self._setattr(path, sattr, follow_symlinks)

    def utime(
        self,
        path: PathLike,
        times: tuple[float, float] | None = None,
        *,
        ns: tuple[int, int] | None = None,
        follow_symlinks: bool = True,
    ) -> None:
        """As `os.utime`: (atime, mtime) in seconds or `ns=`; neither sets the server's now."""
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        sattr: T.Sattr3
        if times is None and ns is None:
            now = TimeHow.SET_TO_SERVER_TIME
            sattr = T.Sattr3(atime=now, mtime=now)
        else:
            if ns is None:
                assert times is not None
                ns = (round(times[0] * 1e9), round(times[1] * 1e9))
            a_ns, m_ns = ns
            sattr = T.Sattr3(atime=T.NfsTime3.from_ns(a_ns), mtime=T.NfsTime3.from_ns(m_ns))
        self._setattr(path, sattr, follow_symlinks)

    def truncate(self, path: PathLike, length: int) -> None:
        if length < 0:
            raise OSError(errno.EINVAL, "negative length", os.fspath(path))
        self._setattr(path, T.Sattr3(size=length), True)

    def statvfs(self, path: PathLike = "/") -> os.statvfs_result:
        fh = self.handle(path)
        where = os.fspath(path)
        fs = check(self.nfs.fsstat(fh), "FSSTAT", where)
        conf = check(self.nfs.pathconf(fh), "PATHCONF", where)
        size = STATVFS_FRSIZE
        return os.statvfs_result(
            (
                size,
                size,
                fs.tbytes // size,
                fs.fbytes // size,
                fs.abytes // size,
                fs.tfiles,
                fs.ffiles,
                fs.afiles,
                0,
                conf.name_max,
            )
        )

    # -- directories ------------------------------------------------------------------------

    def _entries(self, path: PathLike) -> Iterator[T.EntryPlus3]:
        fh = self.handle(path)
        cookie, verf = 0, bytes(NFS3_COOKIEVERFSIZE)
        while True:
            res = self.nfs.readdirplus(fh, cookie, verf, READDIR_MAXCOUNT, READDIR_MAXCOUNT)
            check(res, "READDIRPLUS", os.fspath(path))
            for entry in res.entries:
                if entry.name not in (b".", b".."):
                    yield entry
            if res.eof or not res.entries:
                return
            cookie, verf = res.entries[-1].cookie, res.cookieverf

    def listdir(self, path: PathLike = "/") -> list[Any]:
        """Names in the directory (not "." and ".."), str or bytes as `path` is."""
        return [_same_kind(path, entry.name) for entry in self._entries(path)]

    def scandir(self, path: PathLike = "/") -> ScandirIterator:
        """`DirEntry`s of the directory, attributes included (READDIRPLUS); also a context
        manager, as `os.scandir`'s iterator is."""
        return ScandirIterator([DirEntry(self, path, entry) for entry in self._entries(path)])

    def walk(
        self,
        top: PathLike = "/",
        topdown: bool = True,
        onerror: Callable[[OSError], Any] | None = None,
        followlinks: bool = False,
    ) -> Iterator[tuple[Any, list[Any], list[Any]]]:
        """As `os.walk`: (dirpath, dirnames, filenames) for each directory under `top`."""
        try:
            entries = list(self.scandir(top))
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            return
        dirs: list[Any] = []
        files: list[Any] = []
        links = set()
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry.name)
            if is_dir and entry.is_symlink():
                links.add(entry.name)
        if topdown:
            yield os.fspath(top), dirs, files
        for name in dirs:
            if followlinks or name not in links:
                yield from self.walk(_join(top, name), topdown, onerror, followlinks)
        if not topdown:
            yield os.fspath(top), dirs, files

    def mkdir(
        self, path: PathLike, mode: int = 0o777, *, parents: bool = False, exist_ok: bool = False
    ) -> None:
        """As `os.mkdir` (the umask applies), or with `parents`/`exist_ok` as pathlib's."""
        try:
            where, name = self._parent(path)
        except FileNotFoundError:
            if not parents:
                raise
            self.mkdir(_dirname(path), mode, parents=True, exist_ok=True)
            where, name = self._parent(path)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            if exist_ok:  # the VM's root, which exists
                return
            raise nfs_error(NfsStat3.NFS3ERR_EXIST, "MKDIR", os.fspath(path)) from None
        attrs = T.Sattr3(mode=mode & 0o7777 & ~self.umask)
        res = self.nfs.mkdir(where, name, attrs)
        if res.status == NfsStat3.NFS3ERR_EXIST and exist_ok and self.isdir(path):
            return
        check(res, "MKDIR", os.fspath(path))

    def makedirs(self, path: PathLike, mode: int = 0o777, exist_ok: bool = False) -> None:
        self.mkdir(path, mode, parents=True, exist_ok=exist_ok)

    def rmdir(self, path: PathLike) -> None:
        where, name = self._parent(path)
        check(self.nfs.rmdir(where, name), "RMDIR", os.fspath(path))

    def remove(self, path: PathLike) -> None:
        where, name = self._parent(path)
        check(self.nfs.remove(where, name), "REMOVE", os.fspath(path))

    unlink = remove

    def rename(self, src: PathLike, dst: PathLike) -> None:
        """Atomically move `src` to `dst`, replacing what `dst` names (as on POSIX)."""
        src_dir, src_name = self._parent(src)
        dst_dir, dst_name = self._parent(dst)
        res = self.nfs.rename(src_dir, src_name, dst_dir, dst_name)
        check(res, "RENAME", os.fspath(src), os.fspath(dst))

    replace = rename

    def symlink(self, target: PathLike, path: PathLike) -> None:
        """Create `path`, a symbolic link holding `target` (as `os.symlink(target, path)`)."""
        where, name = self._parent(path)
        res = self.nfs.symlink(where, name, os.fsencode(target))
        check(res, "SYMLINK", os.fspath(target), os.fspath(path))

    def readlink(self, path: PathLike) -> Any:
        fh = self._existing(path, follow=False).fh
        assert fh is not None
        res = self.nfs.readlink(fh)
        return _same_kind(path, check(res, "READLINK", os.fspath(path)).data)

    def link(self, src: PathLike, dst: PathLike, *, follow_symlinks: bool = True) -> None:
        """Create `dst`, a hard link to `src`."""
        fh = self._existing(src, follow=follow_symlinks).fh
        assert fh is not None
        where, name = self._parent(dst)
        check(self.nfs.link(fh, where, name), "LINK", os.fspath(src), os.fspath(dst))

    # -- files ------------------------------------------------------------------------------

    def open(
        self,
        path: PathLike,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """As the built-in `open`: a `BufferedReader`/`BufferedWriter`/`BufferedRandom`, a
        `TextIOWrapper` (UTF-8 unless `encoding`), or with `buffering=0` the raw file; each
        also has `stat()` and `handle`. New files get mode 0o666 less the client's umask."""
        kind, plus, binary = parse_mode(mode)
        if binary and (encoding or errors or newline is not None):
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        where = os.fspath(path)
        found = self._find(path, follow=kind != "x")
        fh = found.fh
        if kind == "x" and fh is not None:
            raise nfs_error(NfsStat3.NFS3ERR_EXIST, "CREATE", where)
        if fh is None:
            if kind == "r" or found.dir is None:
                raise nfs_error(NfsStat3.NFS3ERR_NOENT, "LOOKUP", where)
            how = CreateMode.GUARDED if kind == "x" else CreateMode.UNCHECKED
            attrs = T.Sattr3(mode=0o666 & ~self.umask, size=0 if kind == "w" else None)
            res = check(self.nfs.create(found.dir, found.name, attrs, how), "CREATE", where)
            fh = res.obj or self.handle(path)
        else:
            assert found.attrs is not None
            if found.attrs.type == Ftype3.DIR:
                raise nfs_error(NfsStat3.NFS3ERR_ISDIR, "open", where)
            want = ACCESS3_READ if kind == "r" or plus else 0
            want |= ACCESS3_MODIFY | ACCESS3_EXTEND if kind != "r" or plus else 0
            granted = check(self.nfs.access(fh, want), "ACCESS", where).access
            if granted & want != want:
                raise nfs_error(NfsStat3.NFS3ERR_ACCES, "ACCESS", where)
            if kind == "w" and found.attrs.size:
                check(self.nfs.setattr(fh, T.Sattr3(size=0)), "SETATTR", where)
        raw = RawFile(
            self.nfs,
            fh,
            where,
            f"{kind}b{'+' if plus else ''}",
            readable=kind == "r" or plus,
            writable=kind != "r" or plus,
            append=kind == "a",
            rtmax=self.rtmax,
            wtmax=self.wtmax,
            commit_limit=self._commit_limit,
        )
        if kind == "a":
            raw.seek(0, os.SEEK_END)
        try:
            f = wrap(raw, binary, buffering, encoding, errors, newline)
        except BaseException:
            raw.close()
            raise
        if not binary:
            f.mode = mode  # as the built-in open's text files say
        return f

    def read_bytes(self, path: PathLike) -> bytes:
        with self.open(path, "rb", buffering=0) as f:
            data: bytes = f.readall()
            return data

    def write_bytes(self, path: PathLike, data: Any) -> int:
        """Write `data` to the file (created or truncated) and commit it; returns its size."""
        view = memoryview(data)
        with self.open(path, "wb", buffering=0) as f:
            done = 0
            while done < view.nbytes:
                done += f.write(view[done:])
        return view.nbytes

    def read_text(
        self, path: PathLike, encoding: str | None = None, errors: str | None = None
    ) -> str:
        with self.open(path, "r", encoding=encoding, errors=errors) as f:
            text: str = f.read()
            return text

    def write_text(
        self,
        path: PathLike,
        data: str,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> int:
        if not isinstance(data, str):
            raise TypeError(f"data must be str, not {type(data).__name__}")
        with self.open(path, "w", encoding=encoding, errors=errors, newline=newline) as f:
            return int(f.write(data))
