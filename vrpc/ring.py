"""What both ring backends share: errors, the ring interface, and ring segments (sealed memfds).

A channel's ring lives in one memfd that the server creates, sizes, maps and seals
(`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) before passing it to the client, so no client
can shrink the mapping under the server (SIGBUS). The server side (`ServerRing`) keeps private
copies of every index it owns and validates every word the client writes; the client side
(`ClientRing`) submits records written into slots and sleeps on its call eventfd. Two backends
implement the same interface: `vrpc.native` (C via cffi, `native/vrpc_ring.c`) and
`vrpc.pyring` (mmap + struct + eventfd); `vrpc.native.backend()` picks one.

Errors say whose fault they are: `RingProtocolError` means the peer broke the ring protocol
(the server closes only that channel), `RingClosed` that the channel is gone (reattach),
`RingOpenError` that a segment cannot be used at all (`errno` says why), and `ValueError` that
the local caller misused the API (a slot it does not own, a record longer than a slot).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Protocol

from vrpc import abi


class RingProtocolError(Exception):
    """The peer broke the ring protocol; close this channel, and only this one."""


class RingClosed(Exception):
    """The channel is closed (the server stopped or closed it): reattach."""


class RingOpenError(Exception):
    """A ring segment cannot be used: bad magic, another major ABI, inconsistent geometry."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def open_error(err: int) -> RingOpenError:
    if err == errno.EBADMSG:
        return RingOpenError(err, "not a VRPC ring segment (bad magic): attach again")
    if err == errno.EPROTONOSUPPORT:
        return RingOpenError(
            err,
            f"the server speaks another VRPC ABI major version (this client: {abi.ABI_MAJOR})"
            ": upgrade the client or the server so that they match",
        )
    return RingOpenError(err, "the ring segment's geometry is inconsistent: refusing to map it")


def geometry_error(nslots: int, entries: int, size: int, doorbell: int) -> ValueError:
    """A server ring asked for a geometry no ring can have (the local caller's mistake)."""
    return ValueError(
        f"bad ring geometry: {nslots} slots, {entries} entries, {size} bytes, doorbell {doorbell}"
    )


def check_result(result: int, what: str) -> int:
    """Turn a negative errno from a ring function into the matching exception."""
    if result >= 0:
        return result
    err = -result
    if err == errno.EPIPE:
        raise RingClosed(f"{what}: the VRPC channel is closed")
    if err == errno.EPROTO:
        raise RingProtocolError(f"{what}: the peer broke the ring protocol")
    if err in (errno.EINVAL, errno.EBUSY):
        raise ValueError(f"{what}: {os.strerror(err)}")
    raise OSError(err, f"{what}: {os.strerror(err)}")


class ServerRing(Protocol):
    """The server's end of one channel (single-threaded: the event loop)."""

    nslots: int

    def drain(self, max_calls: int) -> list[tuple[int, int]]:
        """Consume up to `max_calls` SQEs: `(slot, len)` pairs, their slots now in flight.

        Raises `RingProtocolError` (the ring is closed, `error` says why) or `RingClosed`."""
        ...

    def record(self, slot: int, length: int) -> bytes:
        """The one private copy of a drained record (R2): validate and parse only this."""
        ...

    def complete(self, slot: int, reply: bytes | memoryview, flags: int = 0) -> bool:
        """Answer an in-flight slot with `reply` (b"" with `CQE_NOREPLY`); True if the client
        was woken. Raises `RingClosed` (the reply is dropped) or `ValueError` (misuse)."""
        ...

    def arm(self) -> bool:
        """Announce sleep (SERVER_IDLE); True if work arrived meanwhile: drain again."""
        ...

    def pump(self, max_calls: int, kick_fd: int = -1) -> tuple[list[tuple[int, int]], bool]:
        """One turn of the channel's pump: consume the kick (`kick_fd` >= 0), disarm, and
        drain, rearming (R4) while nothing is left, until records for Python turn up or
        `max_calls` SQEs were consumed. `(work for Python, armed)`: armed means asleep with
        nothing left; else call again once `work` is dispatched. Raises as `drain`."""
        ...

    def disarm(self) -> None: ...

    def close(self) -> None:
        """Mark the channel closed and wake the client."""
        ...

    def retire(self) -> None:
        """Close it for good (SERVER_GONE too: no server resets this ring again)."""
        ...

    @property
    def error(self) -> str | None:
        """Why the ring was closed for a protocol error, else None."""
        ...

    def release(self) -> None:
        """Drop every reference into the mapping so that it can be unmapped."""
        ...


class ClientRing(Protocol):
    """The client's end of one channel (single-threaded)."""

    nslots: int
    features: int
    boot_id: int
    channel_id: int

    def slot(self, slot: int) -> memoryview:
        """The writable bytes of `slot` (write the call here, read the reply from here)."""
        ...

    def submit(self, slot: int, length: int) -> bool:
        """Publish the call in `slot`; True if the server had to be kicked."""
        ...

    def reap(self, max_completions: int = abi.MAX_SLOTS) -> list[tuple[int, int, int]]:
        """Completed `(slot, len, flags)`; raises `RingClosed` when closed with none left."""
        ...

    def wait(self, timeout: float | None = None, extra_fd: int = -1) -> bool:
        """Sleep until a completion is ready (True) or `timeout` seconds pass (False); raises
        `RingClosed` if the server closed the channel or `extra_fd` hung up or became readable."""
        ...

    def call_one(
        self, slot: int, length: int, timeout: float, extra_fd: int = -1
    ) -> tuple[int, int] | None:
        """With no other slot in flight: `submit`, then `reap` and `wait` until the call's
        completion is there: `(len, flags)`, or None if the wait ended first (the slot stays
        in flight: go on with `reap` and `wait`). Raises as `submit`, `reap` and `wait`."""
        ...

    def release(self) -> None: ...


def slot_view(segment: memoryview, nslots: int, slot: int) -> memoryview:
    """Slot `slot` of a ring segment of `nslots` slots (a client's `ClientRing.slot`)."""
    if not 0 <= slot < nslots:
        raise ValueError(f"slot {slot} does not exist (0..{nslots - 1})")
    start = abi.SLOT_OFFSET + slot * abi.SLOT_SIZE
    return segment[start : start + abi.SLOT_SIZE]


class Backend(Protocol):
    name: str

    def server(
        self,
        buf: mmap.mmap,
        *,
        nslots: int,
        entries: int = 0,
        doorbell: int = abi.DOORBELL_EVENTFD,
        features: int = 0,
        boot_id: int = 0,
        channel_id: int = 0,
        call_fd: int = -1,
        first_index: int = 0,
    ) -> ServerRing: ...

    def client(self, buf: mmap.mmap, *, kick_fd: int, call_fd: int) -> ClientRing: ...


@dataclass(frozen=True, slots=True)
class Segment:
    """A mapped ring segment: `fd` is the memfd to pass to the client."""

    fd: int
    map: mmap.mmap

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def new_segment(nslots: int, name: str = "prism-vrpc", size: int = 0) -> Segment:
    """A zeroed, mapped, sealed memfd for a ring of `nslots` slots (server side), of `size`
    bytes when given (at least the ring's)."""
    size = max(size, abi.ring_size(nslots))
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
        buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return Segment(fd, buf)


def map_segment(fd: int) -> mmap.mmap:
    """Map a ring segment received from the server (client side), whole."""
    size = os.fstat(fd).st_size
    if size < abi.SLOT_OFFSET:
        raise open_error(errno.EINVAL)
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def eventfd() -> int:
    """A non-blocking close-on-exec eventfd (kick or call doorbell)."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
