"""NFSv3 and MOUNTv3 protocol constants (RFC 1813), as IntEnums and named limits.

Theory of operation: everything a decoder checks or a dispatcher switches on is named here,
once. Wire enums are `IntEnum`s so a decoded value is both an int (packs unchanged) and a
self-describing member; a value outside the enum is invalid XDR and `prism.nfs.wire` turns
it into `XdrError`. Nothing here depends on the store: ftype3 is the wire's own `Ftype3`,
whose values the store's `FileType` shares (`prism.nfs.convert` maps between them).
"""

from __future__ import annotations

from enum import IntEnum

from prism.limits import NAME_MAX, SYMLINK_MAX

# --- programs -------------------------------------------------------------------------------

NFS_PROGRAM = 100003
NFS_V3 = 3
MOUNT_PROGRAM = 100005
MOUNT_V3 = 3
NFS_PORT = 2049
"""NFS's registered port (IANA "nfs"): `prism serve --nfs-port`'s default."""
MOUNT_PORT = 20048
"""mountd's registered port (IANA "mountd"): `prism serve --mount-port`'s default."""

# --- sizes and limits -----------------------------------------------------------------------

NFS3_FHSIZE = 64
"""Largest NFSv3 file handle (nfs_fh3 and MOUNT's fhandle3), bytes."""
NFS3_COOKIEVERFSIZE = 8
NFS3_CREATEVERFSIZE = 8
NFS3_WRITEVERFSIZE = 8

MAX_NAME = NAME_MAX
"""Longest name a directory holds (bytes; PATHCONF name_max): longer filename3s (unbounded
in XDR) get NFS3ERR_NAMETOOLONG."""
MAX_PATH = SYMLINK_MAX
"""Longest symlink target (bytes): longer nfspath3s get NFS3ERR_NAMETOOLONG."""
MAX_READ = 1 << 20
"""Largest READ served, and FSINFO rtmax: a larger count gets a reply of at most this."""
MAX_WRITE = 1 << 20
"""Largest WRITE taken, and FSINFO wtmax: of more data, this much is written (the reply's
count says so, as knfsd does)."""
MAX_READDIR = 1 << 20
"""Largest READDIR / READDIRPLUS reply: a larger count or maxcount is clamped to it."""
MAX_AUTH_FLAVORS = 16
"""Longest auth_flavors<> list a MOUNT client accepts from a server."""

MNTPATHLEN = 1024
"""Longest MOUNT dirpath (bytes)."""
MNTNAMLEN = 255
"""Longest MOUNT name (host or group, bytes)."""

# --- procedures -----------------------------------------------------------------------------


class Nfs3Proc(IntEnum):
    NULL = 0
    GETATTR = 1
    SETATTR = 2
    LOOKUP = 3
    ACCESS = 4
    READLINK = 5
    READ = 6
    WRITE = 7
    CREATE = 8
    MKDIR = 9
    SYMLINK = 10
    MKNOD = 11
    REMOVE = 12
    RMDIR = 13
    RENAME = 14
    LINK = 15
    READDIR = 16
    READDIRPLUS = 17
    FSSTAT = 18
    FSINFO = 19
    PATHCONF = 20
    COMMIT = 21


class Mount3Proc(IntEnum):
    NULL = 0
    MNT = 1
    DUMP = 2
    UMNT = 3
    UMNTALL = 4
    EXPORT = 5


# --- status codes ---------------------------------------------------------------------------


class NfsStat3(IntEnum):
    NFS3_OK = 0
    NFS3ERR_PERM = 1
    NFS3ERR_NOENT = 2
    NFS3ERR_IO = 5
    NFS3ERR_NXIO = 6
    NFS3ERR_ACCES = 13
    NFS3ERR_EXIST = 17
    NFS3ERR_XDEV = 18
    NFS3ERR_NODEV = 19
    NFS3ERR_NOTDIR = 20
    NFS3ERR_ISDIR = 21
    NFS3ERR_INVAL = 22
    NFS3ERR_FBIG = 27
    NFS3ERR_NOSPC = 28
    NFS3ERR_ROFS = 30
    NFS3ERR_MLINK = 31
    NFS3ERR_NAMETOOLONG = 63
    NFS3ERR_NOTEMPTY = 66
    NFS3ERR_DQUOT = 69
    NFS3ERR_STALE = 70
    NFS3ERR_REMOTE = 71
    NFS3ERR_BADHANDLE = 10001
    NFS3ERR_NOT_SYNC = 10002
    NFS3ERR_BAD_COOKIE = 10003
    NFS3ERR_NOTSUPP = 10004
    NFS3ERR_TOOSMALL = 10005
    NFS3ERR_SERVERFAULT = 10006
    NFS3ERR_BADTYPE = 10007
    NFS3ERR_JUKEBOX = 10008


class MountStat3(IntEnum):
    MNT3_OK = 0
    MNT3ERR_PERM = 1
    MNT3ERR_NOENT = 2
    MNT3ERR_IO = 5
    MNT3ERR_ACCES = 13
    MNT3ERR_NOTDIR = 20
    MNT3ERR_INVAL = 22
    MNT3ERR_NAMETOOLONG = 63
    MNT3ERR_NOTSUPP = 10004
    MNT3ERR_SERVERFAULT = 10006


# --- other wire enums -----------------------------------------------------------------------


class Ftype3(IntEnum):
    """ftype3: NF3REG=1 .. NF3FIFO=7."""

    REG = 1
    DIR = 2
    BLK = 3
    CHR = 4
    LNK = 5
    SOCK = 6
    FIFO = 7


class StableHow(IntEnum):
    UNSTABLE = 0
    DATA_SYNC = 1
    FILE_SYNC = 2


class CreateMode(IntEnum):
    UNCHECKED = 0
    GUARDED = 1
    EXCLUSIVE = 2


class TimeHow(IntEnum):
    DONT_CHANGE = 0
    SET_TO_SERVER_TIME = 1
    SET_TO_CLIENT_TIME = 2


class AuthFlavor(IntEnum):
    """RPC auth flavors as MOUNT's auth_flavors list names them."""

    AUTH_NONE = 0
    AUTH_SYS = 1


# --- bit masks ------------------------------------------------------------------------------

ACCESS3_READ = 0x0001
ACCESS3_LOOKUP = 0x0002
ACCESS3_MODIFY = 0x0004
ACCESS3_EXTEND = 0x0008
ACCESS3_DELETE = 0x0010
ACCESS3_EXECUTE = 0x0020
ACCESS3_ALL = 0x003F

FSF3_LINK = 0x0001
FSF3_SYMLINK = 0x0002
FSF3_HOMOGENEOUS = 0x0008
FSF3_CANSETTIME = 0x0010
