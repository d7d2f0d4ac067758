"""The one mapping from store errors (POSIX errno) to NFSv3 and MOUNTv3 status codes, and back
(`errno_for`, for clients)."""

from __future__ import annotations

import errno

from prism.errors import NotSync, StoreError
from prism.nfs.const import MountStat3, NfsStat3

_NFS: dict[int, NfsStat3] = {
    errno.EPERM: NfsStat3.NFS3ERR_PERM,
    errno.ENOENT: NfsStat3.NFS3ERR_NOENT,
    errno.EIO: NfsStat3.NFS3ERR_IO,
    errno.EACCES: NfsStat3.NFS3ERR_ACCES,
    errno.EEXIST: NfsStat3.NFS3ERR_EXIST,
    errno.EXDEV: NfsStat3.NFS3ERR_XDEV,
    errno.ENOTDIR: NfsStat3.NFS3ERR_NOTDIR,
    errno.EISDIR: NfsStat3.NFS3ERR_ISDIR,
    errno.EINVAL: NfsStat3.NFS3ERR_INVAL,
    errno.EFBIG: NfsStat3.NFS3ERR_FBIG,
    errno.ENOSPC: NfsStat3.NFS3ERR_NOSPC,
    errno.EROFS: NfsStat3.NFS3ERR_ROFS,
    errno.EMLINK: NfsStat3.NFS3ERR_MLINK,
    errno.ENAMETOOLONG: NfsStat3.NFS3ERR_NAMETOOLONG,
    errno.ENOTEMPTY: NfsStat3.NFS3ERR_NOTEMPTY,
    errno.EDQUOT: NfsStat3.NFS3ERR_DQUOT,
    errno.ESTALE: NfsStat3.NFS3ERR_STALE,
    errno.EOPNOTSUPP: NfsStat3.NFS3ERR_NOTSUPP,
}

_MOUNT: dict[int, MountStat3] = {
    errno.EPERM: MountStat3.MNT3ERR_PERM,
    errno.ENOENT: MountStat3.MNT3ERR_NOENT,
    errno.EIO: MountStat3.MNT3ERR_IO,
    errno.EACCES: MountStat3.MNT3ERR_ACCES,
    errno.ENOTDIR: MountStat3.MNT3ERR_NOTDIR,
    errno.EINVAL: MountStat3.MNT3ERR_INVAL,
    errno.ENAMETOOLONG: MountStat3.MNT3ERR_NAMETOOLONG,
    errno.ESTALE: MountStat3.MNT3ERR_NOENT,
}


_ERRNO: dict[NfsStat3, int] = {stat: err for err, stat in _NFS.items()} | {
    NfsStat3.NFS3ERR_NXIO: errno.ENXIO,
    NfsStat3.NFS3ERR_NODEV: errno.ENODEV,
    NfsStat3.NFS3ERR_REMOTE: errno.EREMOTE,
    NfsStat3.NFS3ERR_BADHANDLE: errno.ESTALE,
    NfsStat3.NFS3ERR_NOT_SYNC: errno.EIO,
    NfsStat3.NFS3ERR_BAD_COOKIE: errno.EIO,
    NfsStat3.NFS3ERR_TOOSMALL: errno.EINVAL,
    NfsStat3.NFS3ERR_SERVERFAULT: errno.EREMOTEIO,
    NfsStat3.NFS3ERR_BADTYPE: errno.EINVAL,
    NfsStat3.NFS3ERR_JUKEBOX: errno.EAGAIN,
}
"""The client's direction: the errno an NFSv3 status stands for (the inverse of the table
above, plus the statuses no store error produces)."""


def errno_for(status: NfsStat3) -> int:
    """The POSIX errno a client reports for a failed NFSv3 call (EIO for unknown codes)."""
    return _ERRNO.get(status, errno.EIO)


def nfsstat_for(exc: StoreError) -> NfsStat3:
    if isinstance(exc, NotSync):
        return NfsStat3.NFS3ERR_NOT_SYNC
    return _NFS.get(exc.errno, NfsStat3.NFS3ERR_SERVERFAULT)


def mountstat_for(exc: StoreError) -> MountStat3:
    return _MOUNT.get(exc.errno, MountStat3.MNT3ERR_SERVERFAULT)
