"""Permission rules, pure functions of an inode and a caller's credentials.

The mode bits of owner, group or others apply, whichever class the caller is in first (as
POSIX). Root may do anything except execute a non-directory that has no execute bit for
anyone; the store's own callers (`cred=None`) may do anything. File data: the owner may
always read and write (as knfsd's owner override). A sticky directory lets only root, its
owner and an entry's owner remove or rename that entry. A read-only namespace (a snapshot,
a read-only share) grants no modifying access.
"""

from __future__ import annotations

from prism.errors import PermissionDenied
from prism.store.records import Inode
from prism.store.types import (
    ACCESS_DELETE,
    ACCESS_EXECUTE,
    ACCESS_EXTEND,
    ACCESS_LOOKUP,
    ACCESS_MODIFY,
    ACCESS_READ,
    Cred,
    FileType,
)

MAY_READ, MAY_WRITE, MAY_EXEC = 4, 2, 1
"""The rwx bits of a mode's class, as `may` takes them."""


def may(node: Inode, cred: Cred | None, want: int) -> bool:
    if cred is None or cred.is_root:
        if want & MAY_EXEC and node.type != FileType.DIR:
            return bool(node.mode & 0o111) or cred is None
        return True
    if cred.uid == node.uid:
        bits = node.mode >> 6
    elif cred.in_group(node.gid):
        bits = node.mode >> 3
    else:
        bits = node.mode
    return bits & want == want


def require(node: Inode, cred: Cred | None, want: int, what: str) -> None:
    if not may(node, cred, want):
        raise PermissionDenied(f"permission denied: {what}")


def require_data(node: Inode, cred: Cred | None, want: int) -> None:
    """Read/write of file data: the owner may always (as knfsd's owner override)."""
    if cred is not None and cred.uid == node.uid:
        return
    require(node, cred, want, "file mode forbids this")


def sticky_ok(dnode: Inode, node: Inode, cred: Cred | None) -> bool:
    if cred is None or cred.is_root or not dnode.mode & 0o1000:
        return True
    return cred.uid in (dnode.uid, node.uid)


def granted(node: Inode, cred: Cred | None, mask: int, *, readonly: bool) -> int:
    """The NFS ACCESS bits of `mask` the caller holds on `node`."""
    r, w, x = (may(node, cred, bit) for bit in (MAY_READ, MAY_WRITE, MAY_EXEC))
    if node.type == FileType.DIR:
        bits = (ACCESS_READ if r else 0) | (ACCESS_LOOKUP if x else 0)
        if w and x:
            bits |= ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
    else:
        bits = (ACCESS_READ if r else 0) | (ACCESS_EXECUTE if x else 0)
        if w:
            bits |= ACCESS_MODIFY | ACCESS_EXTEND
    if readonly:
        bits &= ~(ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE)
    return bits & mask
