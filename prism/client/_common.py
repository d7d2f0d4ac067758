"""What the client's path and file layers share: NFS results as OSErrors, fattr3 as stat."""

from __future__ import annotations

import os
import stat
from typing import Any, TypeVar

from prism.nfs import wire as T
from prism.nfs.const import Ftype3, NfsStat3
from prism.nfs.status import errno_for

PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]

_R = TypeVar("_R")

FORMAT_BITS: dict[Ftype3, int] = {
    Ftype3.REG: stat.S_IFREG,
    Ftype3.DIR: stat.S_IFDIR,
    Ftype3.BLK: stat.S_IFBLK,
    Ftype3.CHR: stat.S_IFCHR,
    Ftype3.LNK: stat.S_IFLNK,
    Ftype3.SOCK: stat.S_IFSOCK,
    Ftype3.FIFO: stat.S_IFIFO,
}
"""ftype3 -> the S_IF* bits of st_mode."""
STAT_BLOCK = 512
"""st_blocks counts 512-byte units, as on Linux."""
STAT_BLKSIZE = 128 * 1024
"""st_blksize: the store's chunk size, the size a reader or writer should use."""


def nfs_error(status: NfsStat3, what: str, path: Any = None, path2: Any = None) -> OSError:
    """`OSError(errno, "what: STATUS", path[, path2])`; Python picks the subclass from the
    errno (FileNotFoundError, FileExistsError, PermissionError, ...)."""
    err = errno_for(status)
    message = f"{os.strerror(err)} ({what}: {status.name})"
    if path2 is not None:
        return OSError(err, message, path, None, path2)
    if path is not None:
        return OSError(err, message, path)
    return OSError(err, message)


def check(res: _R, what: str, path: Any = None, path2: Any = None) -> _R:
    """`res` if its status is NFS3_OK, else raise its `nfs_error`."""
    status: NfsStat3 = res.status  # type: ignore[attr-defined]
    if status != NfsStat3.NFS3_OK:
        raise nfs_error(status, what, path, path2)
    return res


def stat_result(attrs: T.Fattr3) -> os.stat_result:
    """fattr3 as `os.stat_result` (st_ino = fileid, st_dev = fsid, the *_ns fields too)."""
    atime, mtime, ctime = attrs.atime.to_ns(), attrs.mtime.to_ns(), attrs.ctime.to_ns()
    return os.stat_result(
        (
            FORMAT_BITS.get(attrs.type, 0) | attrs.mode,
            attrs.fileid,
            attrs.fsid,
            attrs.nlink,
            attrs.uid,
            attrs.gid,
            attrs.size,
            atime // 1_000_000_000,
            mtime // 1_000_000_000,
            ctime // 1_000_000_000,
        ),
        {
            "st_atime": atime / 1e9,
            "st_mtime": mtime / 1e9,
            "st_ctime": ctime / 1e9,
            "st_atime_ns": atime,
            "st_mtime_ns": mtime,
            "st_ctime_ns": ctime,
            "st_blocks": (attrs.used + STAT_BLOCK - 1) // STAT_BLOCK,
            "st_blksize": STAT_BLKSIZE,
            "st_rdev": os.makedev(attrs.rdev.specdata1, attrs.rdev.specdata2),
        },
    )
