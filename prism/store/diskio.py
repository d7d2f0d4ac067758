"""File writes shared by the content segments and the journal.

A full disk (or quota) is reported as `NoSpace`, with what could not be written and what to
do, so the NFS layer answers NFS3ERR_NOSPC; a new file's name becomes durable only with an
fsync of its directory.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from prism.errors import NoSpace

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
"""Modes of every directory and file of a store: only the server's user may read them
(`meta/data.mdb` holds the file-handle MAC key)."""


def pwrite_all(fd: int, data: bytes, offset: int, what: object) -> None:
    """Write all of `data` at `offset` in one call; NoSpace naming `what` (a path, formatted
    only on failure) if the disk is full or the write comes up short."""
    try:
        written = os.pwrite(fd, data, offset)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space left for {what}: free disk space") from exc
        raise
    if written != len(data):
        raise NoSpace(f"short write to {what}")


def fsync_directory(path: Path) -> None:
    """Make the names in directory `path` (a file just created there) durable."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
