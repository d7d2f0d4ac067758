"""A fast synchronous NFSv3 client for the benchmarks: libnfs through cffi (ABI mode).

Theory of operation
-------------------
libnfs does the whole NFS/MOUNT client in C; we load the shared library Debian ships
(``libnfs13``, soname ``libnfs.so.13``, libnfs 4.0 on Debian 12) with ``ffi.dlopen`` and
declare only the synchronous calls we use.  No compiler is needed.  cffi releases the GIL
around every C call, and each call is one or more RPCs on one TCP connection, so the Python
side costs a few microseconds per operation: it is not the bottleneck next to a server
round trip.  Large reads and writes are split by libnfs into READ/WRITE calls of the size
the server announced in FSINFO (``read_max``/``write_max``).

libnfs 4.0 has no ``nfs_set_nfsport``/``nfs_set_mountport``: ports are given as URL
arguments (``nfs://host/export?nfsport=P&mountport=M``) parsed by ``nfs_parse_url_dir``,
which stores them in the context; ``nfs_mount`` then talks to those ports directly and never
asks a portmapper.

Every failing call raises ``OSError(errno, "<op> <path>: <libnfs error text>")``.
One ``NfsClient`` is one libnfs context: use it from one thread at a time.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import quote

from cffi import FFI

#: Sonames tried in order (Debian 12 ships libnfs 4.0.0 as libnfs.so.13).
LIBNFS_SONAMES = ("libnfs.so.13", "libnfs.so.14", "libnfs.so.16", "libnfs.so")

#: The subset of /usr/include/nfsc/libnfs.h (libnfs 4.0) that we call.  Layouts of the
#: structs must match the header exactly (ABI mode has no compiler to check them).
CDEF = """
struct nfs_context;
struct nfsfh;
struct nfsdir;

struct nfs_url {
    char *server;
    char *path;
    char *file;
};

struct nfs_stat_64 {
    uint64_t nfs_dev;
    uint64_t nfs_ino;
    uint64_t nfs_mode;
    uint64_t nfs_nlink;
    uint64_t nfs_uid;
    uint64_t nfs_gid;
    uint64_t nfs_rdev;
    uint64_t nfs_size;
    uint64_t nfs_blksize;
    uint64_t nfs_blocks;
    uint64_t nfs_atime;
    uint64_t nfs_mtime;
    uint64_t nfs_ctime;
    uint64_t nfs_atime_nsec;
    uint64_t nfs_mtime_nsec;
    uint64_t nfs_ctime_nsec;
    uint64_t nfs_used;
};

struct timeval {
    long tv_sec;
    long tv_usec;
};

struct nfsdirent {
    struct nfsdirent *next;
    char *name;
    uint64_t inode;
    uint32_t type;
    uint32_t mode;
    uint64_t size;
    struct timeval atime;
    struct timeval mtime;
    struct timeval ctime;
    uint32_t uid;
    uint32_t gid;
    uint32_t nlink;
    uint64_t dev;
    uint64_t rdev;
    uint64_t blksize;
    uint64_t blocks;
    uint64_t used;
    uint32_t atime_nsec;
    uint32_t mtime_nsec;
    uint32_t ctime_nsec;
};

struct nfs_context *nfs_init_context(void);
void nfs_destroy_context(struct nfs_context *nfs);
char *nfs_get_error(struct nfs_context *nfs);

struct nfs_url *nfs_parse_url_dir(struct nfs_context *nfs, const char *url);
void nfs_destroy_url(struct nfs_url *url);

int nfs_set_version(struct nfs_context *nfs, int version);
void nfs_set_uid(struct nfs_context *nfs, int uid);
void nfs_set_gid(struct nfs_context *nfs, int gid);
void nfs_set_dircache(struct nfs_context *nfs, int enabled);
void nfs_set_autoreconnect(struct nfs_context *nfs, int num_retries);
void nfs_set_timeout(struct nfs_context *nfs, int milliseconds);
uint64_t nfs_get_readmax(struct nfs_context *nfs);
uint64_t nfs_get_writemax(struct nfs_context *nfs);

int nfs_mount(struct nfs_context *nfs, const char *server, const char *exportname);
int nfs_umount(struct nfs_context *nfs);

int nfs_open(struct nfs_context *nfs, const char *path, int flags, struct nfsfh **nfsfh);
int nfs_creat(struct nfs_context *nfs, const char *path, int mode, struct nfsfh **nfsfh);
int nfs_close(struct nfs_context *nfs, struct nfsfh *nfsfh);
int nfs_pread(struct nfs_context *nfs, struct nfsfh *nfsfh,
              uint64_t offset, uint64_t count, char *buf);
int nfs_pwrite(struct nfs_context *nfs, struct nfsfh *nfsfh,
               uint64_t offset, uint64_t count, const char *buf);
int nfs_fsync(struct nfs_context *nfs, struct nfsfh *nfsfh);
int nfs_stat64(struct nfs_context *nfs, const char *path, struct nfs_stat_64 *st);
int nfs_fstat64(struct nfs_context *nfs, struct nfsfh *nfsfh, struct nfs_stat_64 *st);

int nfs_mkdir(struct nfs_context *nfs, const char *path);
int nfs_mkdir2(struct nfs_context *nfs, const char *path, int mode);
int nfs_rmdir(struct nfs_context *nfs, const char *path);
int nfs_unlink(struct nfs_context *nfs, const char *path);
int nfs_opendir(struct nfs_context *nfs, const char *path, struct nfsdir **nfsdir);
struct nfsdirent *nfs_readdir(struct nfs_context *nfs, struct nfsdir *nfsdir);
void nfs_closedir(struct nfs_context *nfs, struct nfsdir *nfsdir);
"""

NFS_V3 = 3

ffi = FFI()
ffi.cdef(CDEF)


def _load() -> tuple[Any, str]:
    errors = []
    for soname in LIBNFS_SONAMES:
        try:
            return ffi.dlopen(soname), soname
        except OSError as exc:
            errors.append(f"{soname}: {exc}")
    raise OSError(
        "cannot load libnfs (run `bash benchmarks/setup.sh`, which installs libnfs13): "
        + "; ".join(errors)
    )


lib, LIBNFS_SONAME = _load()


@dataclass(frozen=True, slots=True)
class NfsStat:
    """The attributes libnfs returns for stat/fstat (a subset of fattr3)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    used: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def _from_c(cls, st: Any) -> NfsStat:
        return cls(
            ino=st.nfs_ino,
            mode=st.nfs_mode,
            nlink=st.nfs_nlink,
            uid=st.nfs_uid,
            gid=st.nfs_gid,
            size=st.nfs_size,
            used=st.nfs_used,
            mtime_ns=st.nfs_mtime * 1_000_000_000 + st.nfs_mtime_nsec,
            ctime_ns=st.nfs_ctime * 1_000_000_000 + st.nfs_ctime_nsec,
        )


class NfsClient:
    """One mounted NFSv3 export (one libnfs context, one TCP connection).

    ``nfs_port``/``mount_port`` bypass the portmapper; leave both ``None`` to ask rpcbind on
    port 111.  ``dircache`` is off by default so that every stat/readdir reaches the server.
    """

    def __init__(
        self,
        host: str,
        export: str,
        *,
        nfs_port: int | None = None,
        mount_port: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        timeout_ms: int | None = 30_000,
        dircache: bool = False,
    ) -> None:
        self._ctx: Any = None
        ctx = lib.nfs_init_context()
        if ctx == ffi.NULL:
            raise OSError("nfs_init_context failed")
        self._ctx = ctx
        self.host = host
        self.export = export
        self._options: dict[str, Any] = {
            "nfs_port": nfs_port,
            "mount_port": mount_port,
            "uid": uid,
            "gid": gid,
            "timeout_ms": timeout_ms,
            "dircache": dircache,
        }
        try:
            self._configure(**self._options)
            self._mount()
        except BaseException:
            lib.nfs_destroy_context(ctx)
            self._ctx = None
            raise

    def _configure(
        self,
        nfs_port: int | None,
        mount_port: int | None,
        uid: int | None,
        gid: int | None,
        timeout_ms: int | None,
        dircache: bool,
    ) -> None:
        ctx = self._ctx
        args = []
        if nfs_port is not None:
            args.append(f"nfsport={int(nfs_port)}")
        if mount_port is not None:
            args.append(f"mountport={int(mount_port)}")
        if args:
            # The only way to set ports in libnfs 4.0: URL arguments update the context.
            url_text = f"nfs://{self.host}{quote(self.export)}?{'&'.join(args)}"
            url = lib.nfs_parse_url_dir(ctx, url_text.encode())
            if url == ffi.NULL:
                raise OSError(f"nfs_parse_url_dir {url_text}: {self._error()}")
            lib.nfs_destroy_url(url)
        self._check(lib.nfs_set_version(ctx, NFS_V3), "nfs_set_version", "")
        if uid is not None:
            lib.nfs_set_uid(ctx, uid)
        if gid is not None:
            lib.nfs_set_gid(ctx, gid)
        if timeout_ms is not None:
            lib.nfs_set_timeout(ctx, timeout_ms)
        lib.nfs_set_dircache(ctx, 1 if dircache else 0)
        lib.nfs_set_autoreconnect(ctx, 0)

    def _mount(self) -> None:
        rc = lib.nfs_mount(self._ctx, self.host.encode(), self.export.encode())
        self._check(rc, "mount", f"{self.host}:{self.export}")

    # -- plumbing -----------------------------------------------------------------------

    @property
    def ctx(self) -> Any:
        if self._ctx is None:
            raise ValueError("NfsClient is closed")
        return self._ctx

    def _error(self) -> str:
        if self._ctx is None:
            return "no context"
        msg = lib.nfs_get_error(self._ctx)
        return ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else "unknown error"

    def _check(self, rc: int, op: str, path: str) -> int:
        if rc < 0:
            err = -rc
            raise OSError(err, f"{op} {path}: {self._error()} ({os.strerror(err)})".strip())
        return rc

    def connect_again(self) -> NfsClient:
        """A second, independent client (own connection and mount) with these options."""
        return NfsClient(self.host, self.export, **self._options)

    def close(self) -> None:
        if self._ctx is not None:
            lib.nfs_destroy_context(self._ctx)
            self._ctx = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @property
    def read_max(self) -> int:
        """Largest READ the server accepts (FSINFO rtmax as negotiated by libnfs)."""
        return int(lib.nfs_get_readmax(self.ctx))

    @property
    def write_max(self) -> int:
        return int(lib.nfs_get_writemax(self.ctx))

    # -- files --------------------------------------------------------------------------

    def open(self, path: str, flags: int = os.O_RDONLY) -> NfsFile:
        fh = ffi.new("struct nfsfh **")
        self._check(lib.nfs_open(self.ctx, os.fsencode(path), flags, fh), "open", path)
        return NfsFile(self, fh[0], path)

    def creat(self, path: str, mode: int = 0o644) -> NfsFile:
        """Create (or truncate) a regular file and open it for writing."""
        fh = ffi.new("struct nfsfh **")
        self._check(lib.nfs_creat(self.ctx, os.fsencode(path), mode, fh), "creat", path)
        return NfsFile(self, fh[0], path)

    def stat(self, path: str) -> NfsStat:
        st = ffi.new("struct nfs_stat_64 *")
        self._check(lib.nfs_stat64(self.ctx, os.fsencode(path), st), "stat", path)
        return NfsStat._from_c(st)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._check(lib.nfs_mkdir2(self.ctx, os.fsencode(path), mode), "mkdir", path)

    def rmdir(self, path: str) -> None:
        self._check(lib.nfs_rmdir(self.ctx, os.fsencode(path)), "rmdir", path)

    def unlink(self, path: str) -> None:
        self._check(lib.nfs_unlink(self.ctx, os.fsencode(path)), "unlink", path)

    def listdir(self, path: str) -> list[str]:
        """Names in a directory, without "." and ".." (libnfs reads it all in opendir)."""
        ctx = self.ctx
        dirp = ffi.new("struct nfsdir **")
        self._check(lib.nfs_opendir(ctx, os.fsencode(path), dirp), "opendir", path)
        names = []
        try:
            while True:
                ent = lib.nfs_readdir(ctx, dirp[0])
                if ent == ffi.NULL:
                    break
                name = ffi.string(ent.name)
                if name not in (b".", b".."):
                    names.append(os.fsdecode(name))
        finally:
            lib.nfs_closedir(ctx, dirp[0])
        return names


class NfsFile:
    """An open file handle on an ``NfsClient``."""

    __slots__ = ("_client", "_ctx", "_fh", "path")

    def __init__(self, client: NfsClient, fh: Any, path: str) -> None:
        self._client = client
        self._ctx = client.ctx
        self._fh = fh
        self.path = path

    def pread_into(self, buf: Any, offset: int) -> int:
        """Read up to ``len(buf)`` bytes at ``offset`` into a writable buffer; returns count.

        ``buf`` may be a bytearray, a writable memoryview or a cffi ``char[]``.
        """
        if isinstance(buf, ffi.CData):
            cbuf, count = buf, ffi.sizeof(buf)
        else:
            cbuf = ffi.from_buffer(buf, require_writable=True)
            count = len(cbuf)
        rc = lib.nfs_pread(self._ctx, self._fh, offset, count, cbuf)
        return self._client._check(rc, "pread", self.path)

    def pread(self, count: int, offset: int) -> bytes:
        buf = ffi.new("char[]", count)
        n = self.pread_into(buf, offset)
        return ffi.buffer(buf, n)[:]

    def pwrite(self, data: Any, offset: int) -> int:
        """Write all of ``data`` (any bytes-like object) at ``offset``."""
        cbuf = ffi.from_buffer(data)
        total = len(cbuf)
        done = 0
        while done < total:
            rc = lib.nfs_pwrite(self._ctx, self._fh, offset + done, total - done, cbuf + done)
            n = self._client._check(rc, "pwrite", self.path)
            if n == 0:
                raise OSError(0, f"pwrite {self.path}: server wrote 0 bytes")
            done += n
        return total

    def fsync(self) -> None:
        self._client._check(lib.nfs_fsync(self._ctx, self._fh), "fsync", self.path)

    def fstat(self) -> NfsStat:
        st = ffi.new("struct nfs_stat_64 *")
        self._client._check(lib.nfs_fstat64(self._ctx, self._fh, st), "fstat", self.path)
        return NfsStat._from_c(st)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            self._client._check(lib.nfs_close(self._ctx, fh), "close", self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def try_mount(
    host: str, export: str, nfs_port: int, mount_port: int, *, timeout_ms: int = 2000
) -> str | None:
    """Mount, stat the root, unmount; returns None on success or what went wrong."""
    for what, port in (("MOUNT", mount_port), ("NFS", nfs_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_ms / 1000)
            if s.connect_ex((host, port)) != 0:
                return f"nothing accepts TCP connections on {host}:{port} ({what})"
    try:
        with NfsClient(
            host, export, nfs_port=nfs_port, mount_port=mount_port, timeout_ms=timeout_ms
        ) as client:
            client.stat("/")
    except OSError as exc:
        return str(exc)
    return None
