"""The status an encoded NFSv3 or MOUNTv3 result carries, for the dispatcher's error counts
(`rpc.server.StatusOf`).

Every NFSv3 result but NULL's (which is empty) opens with its nfsstat3 (RFC 1813: each
`*3res` is a union switched on it); of MOUNTv3's, only MNT's carries one (mountstat3, first).
Reading the first word of the encoded results is all it takes, and nothing when it is OK.
"""

from __future__ import annotations

from prism.nfs.const import Mount3Proc, MountStat3, NfsStat3

_OK = bytes(4)
_NFS_NAMES = {int(s): s.name for s in NfsStat3}
_MOUNT_NAMES = {int(s): s.name for s in MountStat3}


def _first_word(body: bytes, names: dict[int, str]) -> str | None:
    if body.startswith(_OK) or len(body) < 4:
        return None
    code = int.from_bytes(body[:4], "big")
    return names.get(code, str(code))


def nfs_status(proc: int, body: bytes) -> str | None:
    """NFS3ERR_... of a failed NFSv3 result, else None."""
    return _first_word(body, _NFS_NAMES)


def mount_status(proc: int, body: bytes) -> str | None:
    """MNT3ERR_... of a refused MNT, else None."""
    return _first_word(body, _MOUNT_NAMES) if proc == Mount3Proc.MNT else None
