"""Errors raised by the store, each carrying the POSIX errno that the protocol layers map.

There is exactly one errno -> nfsstat3 mapping (`prism.nfs.status.nfsstat_for`); the store
only ever raises these classes, so every failure reaches the wire as a precise status.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prism.store.types import Attr, ObjectId


class StoreError(Exception):
    """Base class: `errno` says what went wrong in POSIX terms.

    `attrs` holds, by the caller's ObjectId, the attributes of the objects a failing store
    operation had read: it changed nothing, so they are the objects' attributes after the
    failure too (what an NFS reply's wcc and post-operation attributes need)."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)
        self.attrs: dict[ObjectId, Attr] = {}


class NotFound(StoreError):
    """No such file, directory, namespace or snapshot."""

    errno = _errno.ENOENT


class Exists(StoreError):
    """The name is already taken."""

    errno = _errno.EEXIST


class NotADirectory(StoreError):
    """A directory was expected."""

    errno = _errno.ENOTDIR


class IsADirectory(StoreError):
    """The operation does not apply to a directory."""

    errno = _errno.EISDIR


class NotEmpty(StoreError):
    """The directory is not empty."""

    errno = _errno.ENOTEMPTY


class Stale(StoreError):
    """The object was removed, or the handle names an object that no longer exists."""

    errno = _errno.ESTALE


class InvalidName(StoreError):
    """Names must be 1-255 bytes, without '/' or NUL, and not '.' or '..'."""

    errno = _errno.EINVAL


class NameTooLong(StoreError):
    """Names are at most 255 bytes."""

    errno = _errno.ENAMETOOLONG


class InvalidArgument(StoreError):
    """An argument is out of range or inconsistent."""

    errno = _errno.EINVAL


class ReadOnly(StoreError):
    """Snapshots, read-only shares and read-only exports cannot be changed."""

    errno = _errno.EROFS


class QuotaExceeded(StoreError):
    """The namespace's quota would be exceeded; raise it with `prism vm set NAME --quota`."""

    errno = _errno.EDQUOT


class NoSpace(StoreError):
    """The data directory's disk is full."""

    errno = _errno.ENOSPC


class PermissionDenied(StoreError):
    """The caller's uid/gid lacks the permission bits for this operation."""

    errno = _errno.EACCES


class NotPermitted(StoreError):
    """Only the owner (or root) may do this."""

    errno = _errno.EPERM


class CrossDevice(StoreError):
    """The operation would cross from one namespace into another."""

    errno = _errno.EXDEV


class FileTooLarge(StoreError):
    """The offset or size is beyond the largest file Prism stores."""

    errno = _errno.EFBIG


class TooManyLinks(StoreError):
    """The object already has the maximum number of hard links."""

    errno = _errno.EMLINK


class Corrupt(StoreError):
    """The store's metadata or content is damaged; run `prism fsck --repair`."""

    errno = _errno.EIO


class NotSync(StoreError):
    """SETATTR's guard did not match the object's current ctime."""

    errno = _errno.EAGAIN  # mapped specially to NFS3ERR_NOT_SYNC


class Busy(StoreError):
    """Another process holds what this one needs exclusively (e.g. a server's journal)."""

    errno = _errno.EBUSY
