"""Open files of `prism.client`: a raw NFS file under the standard `io` buffers.

Theory of operation: `RawFile` is an `io.RawIOBase` over one file handle and a position:
`readinto` is one READ of at most rtmax bytes, `write` one WRITE of at most wtmax bytes,
`seek(0, SEEK_END)` and append mode ask GETATTR for the size. `open_file` stacks the usual
`io` objects on it (`BufferedReader`, `BufferedWriter`, `BufferedRandom`, `TextIOWrapper`,
subclassed only to add `stat()` and to make `flush()` reach the server).

Writes are UNSTABLE: the server may answer before the data is on disk, and keeps it only
until it restarts. `RawFile` therefore keeps a copy of every byte written since the last
COMMIT (at most `commit_limit` bytes, beyond which it commits first) with the write
verifier the server returned. `flush()` and `close()` COMMIT; when COMMIT's verifier (or a
later WRITE's) differs from the one the data was written under, the server restarted and may
have lost it, so the kept data is written again and committed again: the NFSv3 contract
that the Linux client follows. `truncate` commits first, so a resend never writes past a
new end of file. Invariant: after a successful `flush()` nothing is kept, and everything
written through this file is on the server's disk.
"""

from __future__ import annotations

import errno
import io
import os
from typing import Any

from prism.client._common import check, stat_result
from prism.nfs import wire as T
from prism.nfs.client import NfsClient
from prism.nfs.const import StableHow

DEFAULT_BUFFER_SIZE = 128 * 1024
"""Buffer size of buffered files (the store's chunk size)."""
DEFAULT_COMMIT_LIMIT = 64 * 1024 * 1024
"""Uncommitted bytes a file keeps for resending before it commits on its own."""
MAX_RESEND_ROUNDS = 5
"""Verifier changes tolerated during one commit before giving up with EIO."""
TEXT_ENCODING = "utf-8"
"""Text mode's default encoding (not the host's locale: the files live on the server)."""


class RawFile(io.RawIOBase):
    """Unbuffered binary I/O on one NFS file handle (what `open(..., buffering=0)` returns)."""

    def __init__(
        self,
        nfs: NfsClient,
        fh: T.NfsFh3,
        name: Any,
        mode: str,
        *,
        readable: bool,
        writable: bool,
        append: bool,
        rtmax: int,
        wtmax: int,
        commit_limit: int = DEFAULT_COMMIT_LIMIT,
    ) -> None:
        super().__init__()
        self.handle = fh
        """The file's NFS handle (for `Client.nfs`)."""
        self.name = name
        self.mode = mode
        self.resends = 0
        """How many times kept data was written again after a server restart."""
        self._nfs = nfs
        self._readable = readable
        self._writable = writable
        self._append = append
        self._rtmax = rtmax
        self._wtmax = wtmax
        self._commit_limit = commit_limit
        self._pos = 0
        self._kept: list[tuple[int, bytes]] = []  # (offset, data) written since last COMMIT
        self._kept_bytes = 0
        self._verf: bytes | None = None  # the verifier `_kept` was written under

    # -- capabilities -----------------------------------------------------------------------

    def readable(self) -> bool:
        self._checkClosed()  # type: ignore[attr-defined]
        return self._readable

    def writable(self) -> bool:
        self._checkClosed()  # type: ignore[attr-defined]
        return self._writable

    def seekable(self) -> bool:
        self._checkClosed()  # type: ignore[attr-defined]
        return True

    def _need(self, readable: bool) -> None:
        self._checkClosed()  # type: ignore[attr-defined]
        if not (self._readable if readable else self._writable):
            raise io.UnsupportedOperation("not readable" if readable else "not writable")

    # -- reading ----------------------------------------------------------------------------

    def readinto(self, buffer: Any) -> int:
        self._need(readable=True)
        view = memoryview(buffer).cast("B")
        res = self._nfs.read(self.handle, self._pos, min(len(view), self._rtmax))
        check(res, "READ", self.name)
        n = len(res.data)
        if n > len(view):
            raise OSError(errno.EIO, "the server returned more than asked for", self.name)
        view[:n] = res.data
        self._pos += n
        return n

    def readall(self) -> bytes:
        self._need(readable=True)
        parts = []
        while True:
            res = check(self._nfs.read(self.handle, self._pos, self._rtmax), "READ", self.name)
            parts.append(res.data)
            self._pos += len(res.data)
            if res.eof or not res.data:
                return b"".join(parts)

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: Any) -> int:
        self._need(readable=False)
        view = memoryview(data).cast("B")
        if not view:
            return 0
        if self._append:
            self._pos = self._size()
        chunk = bytes(view[: self._wtmax])
        count = self._write_kept(self._pos, chunk)
        self._pos += count
        return count

    def _write_kept(self, offset: int, chunk: bytes) -> int:
        """One UNSTABLE WRITE whose data is kept until COMMIT; returns the bytes written."""
        res = self._nfs.write(self.handle, offset, chunk, StableHow.UNSTABLE)
        check(res, "WRITE", self.name)
        if res.count == 0:
            raise OSError(errno.EIO, "the server wrote 0 bytes", self.name)
        kept_before = bool(self._kept)
        if res.committed == StableHow.UNSTABLE or kept_before:
            self._kept.append((offset, chunk[: res.count]))
            self._kept_bytes += res.count
            if not kept_before:
                self._verf = res.verf
            elif res.verf != self._verf:
                self._resend()  # the server restarted since the kept writes: send them all
        if self._kept_bytes > self._commit_limit:
            self._commit()
        return res.count

    def _resend(self) -> None:
        """Write every kept chunk again under one verifier (retried if it changes again)."""
        for _ in range(MAX_RESEND_ROUNDS):
            self.resends += 1
            verf = self._write_all_kept()
            if verf is not None:
                self._verf = verf
                return
        raise OSError(errno.EIO, "the server kept restarting while data was resent", self.name)

    def _write_all_kept(self) -> bytes | None:
        """The verifier all kept data was written under, or None if it changed midway."""
        verf: bytes | None = None
        for offset, data in self._kept:
            done = 0
            while done < len(data):
                res = self._nfs.write(self.handle, offset + done, data[done:], StableHow.UNSTABLE)
                check(res, "WRITE", self.name)
                if res.count == 0:
                    raise OSError(errno.EIO, "the server wrote 0 bytes", self.name)
                if verf is not None and res.verf != verf:
                    return None
                verf = res.verf
                done += res.count
        return verf

    def _commit(self) -> None:
        for _ in range(MAX_RESEND_ROUNDS):
            if not self._kept:
                return
            res = check(self._nfs.commit(self.handle), "COMMIT", self.name)
            if res.verf == self._verf:
                self._kept.clear()
                self._kept_bytes = 0
                self._verf = None
                return
            self._resend()
        raise OSError(errno.EIO, "the server kept restarting while data was committed", self.name)

    def flush(self) -> None:
        """COMMIT what was written (resending it if the server restarted meanwhile)."""
        self._checkClosed()  # type: ignore[attr-defined]
        self._commit()

    # -- position and size ------------------------------------------------------------------

    def _attrs(self) -> T.Fattr3:
        res = check(self._nfs.getattr(self.handle), "GETATTR", self.name)
        assert res.obj_attributes is not None
        return res.obj_attributes

    def _size(self) -> int:
        return self._attrs().size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        if whence == os.SEEK_SET:
            base = 0
        elif whence == os.SEEK_CUR:
            base = self._pos
        elif whence == os.SEEK_END:
            base = self._size()
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position", self.name)
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        self._checkClosed()  # type: ignore[attr-defined]
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        self._need(readable=False)
        size = self._pos if size is None else size
        if size < 0:
            raise OSError(errno.EINVAL, "negative size", self.name)
        self._commit()
        check(self._nfs.setattr(self.handle, T.Sattr3(size=size)), "SETATTR", self.name)
        return size

    def stat(self) -> os.stat_result:
        """The file's attributes, by handle (GETATTR)."""
        self._checkClosed()  # type: ignore[attr-defined]
        return stat_result(self._attrs())


class _Stat:
    """Adds `stat()` and `handle` to a buffered file."""

    def _raw(self) -> RawFile:
        raw: RawFile = getattr(self, "raw")  # noqa: B009 (the io base class defines it)
        return raw

    def _push(self) -> None:
        """Hand buffered writes to the raw file (without committing them)."""

    def stat(self) -> os.stat_result:
        """The file's attributes by handle, after sending what is buffered."""
        self._push()
        return self._raw().stat()

    @property
    def handle(self) -> T.NfsFh3:
        return self._raw().handle


class BufferedReader(_Stat, io.BufferedReader):
    pass


class BufferedWriter(_Stat, io.BufferedWriter):
    """`flush()` sends the buffer and COMMITs it."""

    def _push(self) -> None:
        io.BufferedWriter.flush(self)

    def flush(self) -> None:
        super().flush()
        self._raw().flush()


class BufferedRandom(_Stat, io.BufferedRandom):
    """`flush()` sends the buffer and COMMITs it."""

    def _push(self) -> None:
        io.BufferedRandom.flush(self)

    def flush(self) -> None:
        super().flush()
        self._raw().flush()


class TextFile(io.TextIOWrapper):
    """A text file; `stat()` by handle."""

    def stat(self) -> os.stat_result:
        self.flush()
        stat: os.stat_result = self.buffer.stat()  # type: ignore[attr-defined]
        return stat

    @property
    def handle(self) -> T.NfsFh3:
        handle: T.NfsFh3 = self.buffer.handle  # type: ignore[attr-defined]
        return handle


def parse_mode(mode: str) -> tuple[str, bool, bool]:
    """(one of "rwax", "+" given, binary) for an `open` mode; ValueError as `open` raises."""
    chars = set(mode)
    kinds = chars & set("rwax")
    if (
        len(chars) != len(mode)
        or not chars <= set("rwaxbt+")
        or len(kinds) != 1
        or {"b", "t"} <= chars
    ):
        raise ValueError(f"invalid mode: {mode!r}")
    return kinds.pop(), "+" in chars, "b" in chars


def wrap(
    raw: RawFile,
    binary: bool,
    buffering: int,
    encoding: str | None,
    errors: str | None,
    newline: str | None,
) -> Any:
    """The `io` stack `open` returns over `raw`."""
    if buffering == 0:
        if not binary:
            raise ValueError("can't have unbuffered text I/O")
        return raw
    line_buffering = buffering == 1 and not binary
    size = DEFAULT_BUFFER_SIZE if buffering in (-1, 1) else buffering
    buffered: io.BufferedIOBase
    if raw.readable() and raw.writable():
        buffered = BufferedRandom(raw, size)
    elif raw.writable():
        buffered = BufferedWriter(raw, size)
    else:
        buffered = BufferedReader(raw, size)
    if binary:
        return buffered
    return TextFile(
        buffered,
        encoding or TEXT_ENCODING,
        errors,
        newline,
        line_buffering=line_buffering,
    )
