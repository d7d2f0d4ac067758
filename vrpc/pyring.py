"""The pure-Python ring backend: the same functions as `native/vrpc_ring.c`, in mmap + memoryview.

It exists as the reference the C code is tested against (every ring test runs on both) and as
the fallback when the C module could not be built. It follows the same rules R1-R7
(`native/README.md`) word for word: the server keeps private copies of the indices and flags
it owns, validates each SQE it loads once, and sleepers and wakers use the flag / full fence /
reload handshake of R4.

Memory ordering from Python: every shared word is read or written as one item of a typed
memoryview of the segment (`HeaderWords`: `memoryview.cast("H" / "I" / "Q")`), on its natural
alignment, which CPython does with a single fixed-size memcpy: one load or one store. Never with
`struct.pack_into`: it clears the destination (`memset(0)`) before it converts and stores the
value, so a peer process can read a published index or flag word as 0 in between (a tail of 0
is an SQ overrun to the server; that was the intermittent cross-process failure). Reads go
through the same views so that no word is ever assembled from parts. CPython gives no fences, so
`full_fence()` acquires and releases a lock: its atomic read-modify-write is a full barrier
on x86 (a `lock`-prefixed instruction), which is what R4's seq_cst fence needs; loads are not
reordered with loads nor stores with stores on x86, which covers R1's acquire and release.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import select
import threading
import time

from vrpc import abi
from vrpc.ring import RingClosed, RingProtocolError, geometry_error, open_error, slot_view

_M32 = 0xFFFFFFFF


def _word(name: str) -> int:
    """The index of the u32 header word `name` in `HeaderWords.u32`."""
    offset, width = abi.RING_HEADER[name]
    assert width == 4 and offset % 4 == 0
    return offset // 4


_SQ_TAIL, _CLIENT_FLAGS = _word("sq_tail"), _word("client_flags")
_SQ_HEAD, _SERVER_FLAGS = _word("sq_head"), _word("server_flags")
_CQ_TAIL, _CQ_HEAD = _word("cq_tail"), _word("cq_head")
_MAGIC = abi.RING_HEADER["magic"][0] // 8  # in HeaderWords.u64
_SQ_WORD = abi.SQ_OFFSET // 4  # SQ entry i is u32 words _SQ_WORD + 4 * i .. + 3
_ENTRY_WORDS = abi.ENTRY_SIZE // 4
_CQE_KNOWN_FLAGS = abi.CQE_NOREPLY | abi.CQE_FAST
_fence_lock = threading.Lock()


def full_fence() -> None:
    """A seq_cst fence between a store and a later load (R4), see the module docstring."""
    _fence_lock.acquire()
    _fence_lock.release()


class HeaderWords:
    """Whole-word views of a segment's header and queues, `[0, SLOT_OFFSET)`.

    `u32[i]` is the u32 at byte `4 * i` (likewise `u16`, `u64`). Reading or assigning an item
    is one aligned load or store of the whole word (the mapping is page-aligned); see the
    module docstring for why `struct.pack_into` must not touch shared words.
    """

    __slots__ = ("u16", "u32", "u64")

    def __init__(self, buf: mmap.mmap) -> None:
        with memoryview(buf) as whole:
            area = whole[: abi.SLOT_OFFSET]
            self.u16 = area.cast("H")
            self.u32 = area.cast("I")
            self.u64 = area.cast("Q")
            area.release()
        assert self.u16.itemsize == 2 and self.u32.itemsize == 4 and self.u64.itemsize == 8

    def get(self, name: str) -> int:
        """Header field `name` (geometry), by its ABI width."""
        offset, width = abi.RING_HEADER[name]
        return int(self._view(width)[offset // width])

    def put(self, name: str, value: int) -> None:
        offset, width = abi.RING_HEADER[name]
        self._view(width)[offset // width] = value

    def _view(self, width: int) -> memoryview:
        return {2: self.u16, 4: self.u32, 8: self.u64}[width]

    def release(self) -> None:
        self.u16.release()
        self.u32.release()
        self.u64.release()


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _ring_bell(fd: int) -> None:
    # BlockingIOError: the counter is already non-zero, so the peer wakes anyway.
    if fd >= 0:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(fd, 1)


class PyServerRing:
    """Server side of one channel; see `vrpc.ring.ServerRing`."""

    def __init__(
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
    ) -> None:
        entries = entries or abi.default_entries(max(nslots, 1))
        size = len(buf)
        if (
            not 1 <= nslots <= abi.MAX_SLOTS
            or size < abi.ring_size(nslots)
            or size % 4096
            or not _pow2(entries)
            or not nslots <= entries <= abi.MAX_ENTRIES
            or doorbell not in (abi.DOORBELL_EVENTFD, abi.DOORBELL_POLL)
        ):
            raise geometry_error(nslots, entries, size, doorbell)
        self._buf = buf
        self.nslots = nslots
        self._entries = entries
        self._mask = entries - 1
        self._cq = abi.SQ_OFFSET + abi.ENTRY_SIZE * entries
        first_index &= _M32
        buf[0 : abi.SLOT_OFFSET] = bytes(abi.SLOT_OFFSET)
        words = self._words = HeaderWords(buf)
        self._w = words.u32
        for name, value in (
            ("abi_major", abi.ABI_MAJOR),
            ("abi_minor", abi.ABI_MINOR),
            ("header_size", abi.HEADER_SIZE),
            ("segment_size", size),
            ("boot_id", boot_id),
            ("channel_id", channel_id),
            ("sq_offset", abi.SQ_OFFSET),
            ("cq_offset", self._cq),
            ("entries", entries),
            ("nslots", nslots),
            ("slot_offset", abi.SLOT_OFFSET),
            ("slot_size", abi.SLOT_SIZE),
            ("doorbell", doorbell),
            ("features", features),
            ("sq_tail", first_index),
            ("sq_head", first_index),
            ("cq_tail", first_index),
            ("cq_head", first_index),
        ):
            words.put(name, value)
        words.u64[_MAGIC] = abi.RING_MAGIC  # last: the client checks it first
        self._head = first_index
        self._cq_tail = first_index
        self._flags = 0
        self._inflight = 0
        self._call_fd = call_fd if doorbell == abi.DOORBELL_EVENTFD else -1
        self._error: tuple[int, int, int] | None = None
        self.calls = 0

    @property
    def error(self) -> str | None:
        if self._error is None:
            return None
        return abi.describe_error(*self._error, self.nslots, self._entries)

    def _protocol_error(self, code: int, index: int, value: int) -> RingProtocolError:
        self._error = (code, index, value)
        self.close()
        return RingProtocolError(self.error)

    def drain(self, max_calls: int) -> list[tuple[int, int]]:
        if self._error is not None:
            raise RingProtocolError(self.error)
        if self._flags & abi.SERVER_CLOSED:
            raise RingClosed("drain: the VRPC channel is closed")
        w, head = self._w, self._head
        tail = w[_SQ_TAIL]
        if (tail - head) & _M32 > self._entries:
            raise self._protocol_error(abi.ERR_SQ_OVERRUN, head, tail)
        work: list[tuple[int, int]] = []
        while head != tail and len(work) < max_calls:
            at = _SQ_WORD + _ENTRY_WORDS * (head & self._mask)
            slot, length, flags = w[at], w[at + 1], w[at + 2]
            if flags:
                raise self._protocol_error(abi.ERR_SQE_FLAGS, head, flags)
            if slot >= self.nslots:
                raise self._protocol_error(abi.ERR_SQE_SLOT, head, slot)
            if length > abi.SLOT_SIZE:
                raise self._protocol_error(abi.ERR_SQE_LEN, head, length)
            if self._inflight >> slot & 1:
                raise self._protocol_error(abi.ERR_SLOT_BUSY, head, slot)
            self._inflight |= 1 << slot
            work.append((slot, length))
            head = (head + 1) & _M32
        self.calls += len(work)
        self._head = head
        w[_SQ_HEAD] = head
        return work

    def record(self, slot: int, length: int) -> bytes:
        if not 0 <= slot < self.nslots or not self._inflight >> slot & 1:
            raise ValueError(f"slot {slot} is not in flight")
        if not 0 <= length <= abi.SLOT_SIZE:
            raise ValueError(f"a record of {length} bytes does not fit a slot")
        start = abi.SLOT_OFFSET + slot * abi.SLOT_SIZE
        return self._buf[start : start + length]

    def complete(self, slot: int, reply: bytes | memoryview, flags: int = 0) -> bool:
        length = len(reply)
        if (
            not 0 <= slot < self.nslots
            or not self._inflight >> slot & 1
            or length > abi.SLOT_SIZE
            or flags & ~_CQE_KNOWN_FLAGS
        ):
            raise ValueError(f"complete: slot {slot} is not in flight or the reply is invalid")
        self._inflight &= ~(1 << slot)
        if self._flags & abi.SERVER_CLOSED:
            raise RingClosed("complete: the VRPC channel is closed; reply dropped")
        w = self._w
        start = abi.SLOT_OFFSET + slot * abi.SLOT_SIZE
        self._buf[start : start + length] = reply
        at = (self._cq + abi.ENTRY_SIZE * (self._cq_tail & self._mask)) // 4
        w[at], w[at + 1], w[at + 2], w[at + 3] = slot, length, flags, 0
        self._cq_tail = (self._cq_tail + 1) & _M32
        w[_CQ_TAIL] = self._cq_tail
        full_fence()
        if w[_CLIENT_FLAGS] & abi.CLIENT_WAITING:
            _ring_bell(self._call_fd)
            return True
        return False

    def arm(self) -> bool:
        if self._flags & abi.SERVER_CLOSED:
            return False
        self._flags |= abi.SERVER_IDLE
        self._w[_SERVER_FLAGS] = self._flags
        full_fence()
        return bool(self._w[_SQ_TAIL] != self._head)

    def disarm(self) -> None:
        self._flags &= ~abi.SERVER_IDLE
        self._w[_SERVER_FLAGS] = self._flags

    def pump(self, max_calls: int, kick_fd: int = -1) -> tuple[list[tuple[int, int]], bool]:
        if kick_fd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(kick_fd)
        self.disarm()
        while True:
            work = self.drain(max_calls)
            if work or max_calls <= 0:
                return work, False
            if not self.arm():
                return work, True
            self.disarm()

    def close(self, flags: int = abi.SERVER_CLOSED) -> None:
        self._flags |= flags
        self._w[_SERVER_FLAGS] = self._flags
        full_fence()
        _ring_bell(self._call_fd)

    def retire(self) -> None:
        self.close(abi.SERVER_CLOSED | abi.SERVER_GONE)

    def release(self) -> None:
        self._words.release()


class PyClientRing:
    """Client side of one channel; see `vrpc.ring.ClientRing`."""

    def __init__(self, buf: mmap.mmap, *, kick_fd: int, call_fd: int) -> None:
        size = len(buf)
        if size < abi.SLOT_OFFSET:
            raise open_error(errno.EINVAL)
        words = HeaderWords(buf)
        try:
            g = self._geometry(words, size, kick_fd, call_fd)
        except BaseException:
            words.release()
            raise
        self._words = words
        self._w = words.u32
        self._buf = buf
        self._view = memoryview(buf)
        self.nslots = g["nslots"]
        self.features = g["features"]
        self.boot_id = g["boot_id"]
        self.channel_id = g["channel_id"]
        self._entries = g["entries"]
        self._mask = self._entries - 1
        self._cq = g["cq_offset"]
        self._tail = g["sq_tail"]
        self._head = g["cq_head"]
        self._inflight = 0
        polling = g["doorbell"] == abi.DOORBELL_POLL
        self._kick_fd = -1 if polling else kick_fd
        self._call_fd = -1 if polling else call_fd
        self._poll: tuple[int, select.poll] | None = None

    @staticmethod
    def _geometry(words: HeaderWords, size: int, kick_fd: int, call_fd: int) -> dict[str, int]:
        """The header's fields, loaded once into a dict and validated there (R2)."""
        if words.u64[_MAGIC] != abi.RING_MAGIC:
            raise open_error(errno.EBADMSG)
        if words.get("abi_major") != abi.ABI_MAJOR:
            raise open_error(errno.EPROTONOSUPPORT)
        g = {name: words.get(name) for name in abi.RING_HEADER}
        nslots, entries, doorbell = g["nslots"], g["entries"], g["doorbell"]
        if (
            g["header_size"] != abi.HEADER_SIZE
            or g["segment_size"] != size
            or not 1 <= nslots <= abi.MAX_SLOTS
            or size < abi.ring_size(nslots)
            or g["sq_offset"] != abi.SQ_OFFSET
            or not _pow2(entries)
            or not nslots <= entries <= abi.MAX_ENTRIES
            or g["cq_offset"] != abi.SQ_OFFSET + abi.ENTRY_SIZE * entries
            or g["slot_offset"] != abi.SLOT_OFFSET
            or g["slot_size"] != abi.SLOT_SIZE
            or doorbell not in (abi.DOORBELL_EVENTFD, abi.DOORBELL_POLL)
            or (doorbell == abi.DOORBELL_EVENTFD and (kick_fd < 0 or call_fd < 0))
        ):
            raise open_error(errno.EINVAL)
        return g

    def slot(self, slot: int) -> memoryview:
        return slot_view(self._view, self.nslots, slot)

    def _closed(self) -> bool:
        return bool(self._w[_SERVER_FLAGS] & abi.SERVER_CLOSED)

    def _ready(self) -> bool:
        return bool(self._w[_CQ_TAIL] != self._head)

    def submit(self, slot: int, length: int) -> bool:
        if self._closed():
            raise RingClosed("submit: the VRPC channel is closed")
        if not 0 <= slot < self.nslots or not 0 <= length <= abi.SLOT_SIZE:
            raise ValueError(f"submit: slot {slot} or length {length} out of range")
        if self._inflight >> slot & 1:
            raise ValueError(f"submit: slot {slot} is already in flight")
        self._inflight |= 1 << slot
        w = self._w
        at = _SQ_WORD + _ENTRY_WORDS * (self._tail & self._mask)
        w[at], w[at + 1], w[at + 2], w[at + 3] = slot, length, 0, 0
        self._tail = (self._tail + 1) & _M32
        w[_SQ_TAIL] = self._tail
        full_fence()
        if w[_SERVER_FLAGS] & abi.SERVER_IDLE:
            _ring_bell(self._kick_fd)
            return True
        return False

    def reap(self, max_completions: int = abi.MAX_SLOTS) -> list[tuple[int, int, int]]:
        w, head = self._w, self._head
        tail = w[_CQ_TAIL]
        if (tail - head) & _M32 > self._entries:
            raise RingProtocolError(f"reap: cq_tail {tail} runs {tail - head} ahead of {head}")
        done: list[tuple[int, int, int]] = []
        while head != tail and len(done) < max_completions:
            at = (self._cq + abi.ENTRY_SIZE * (head & self._mask)) // 4
            slot, length, flags = w[at], w[at + 1], w[at + 2]
            if (
                slot >= self.nslots
                or not self._inflight >> slot & 1
                or length > abi.SLOT_SIZE
                or flags & ~_CQE_KNOWN_FLAGS
                or (flags & abi.CQE_NOREPLY and length)
            ):
                raise RingProtocolError(
                    f"reap: bad completion (slot {slot}, len {length}, flags {flags:#x})"
                )
            self._inflight &= ~(1 << slot)
            done.append((slot, length, flags))
            head = (head + 1) & _M32
        self._head = head
        w[_CQ_HEAD] = head
        if not done and self._closed():
            raise RingClosed("reap: the VRPC channel is closed")
        return done

    def _poller(self, extra_fd: int) -> select.poll:
        if self._poll is None or self._poll[0] != extra_fd:
            poller = select.poll()
            poller.register(self._call_fd, select.POLLIN)
            if extra_fd >= 0:
                poller.register(extra_fd, select.POLLIN)
            self._poll = (extra_fd, poller)
        return self._poll[1]

    def wait(self, timeout: float | None = None, extra_fd: int = -1) -> bool:
        if self._ready():
            return True
        if self._closed():
            raise RingClosed("wait: the VRPC channel is closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._call_fd < 0:
            return self._wait_polling(deadline)
        poller = self._poller(extra_fd)
        w = self._w
        while True:
            w[_CLIENT_FLAGS] = abi.CLIENT_WAITING
            full_fence()
            if self._ready() or self._closed():
                w[_CLIENT_FLAGS] = 0
                if self._ready():
                    return True
                raise RingClosed("wait: the VRPC channel is closed")
            left = (
                -1 if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
            )
            try:
                events = poller.poll(left)
            finally:
                w[_CLIENT_FLAGS] = 0
            hangup = False
            for fd, ev in events:
                if fd == self._call_fd and ev & select.POLLIN:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                if fd == extra_fd or ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    hangup = True
            if self._ready():
                return True
            if hangup or self._closed():
                raise RingClosed("wait: the VRPC channel is closed")
            if not events or (deadline is not None and time.monotonic() >= deadline):
                return False

    def call_one(
        self, slot: int, length: int, timeout: float, extra_fd: int = -1
    ) -> tuple[int, int] | None:
        if self._inflight:
            raise ValueError("call_one: another slot is in flight")
        self.submit(slot, length)
        deadline = time.monotonic() + timeout
        while True:
            done = self.reap(1)
            if done:
                return done[0][1:]
            if not self.wait(max(0.0, deadline - time.monotonic()), extra_fd):
                return None

    def _wait_polling(self, deadline: float | None) -> bool:
        pause = 0.0
        while True:
            if self._ready():
                return True
            if self._closed():
                raise RingClosed("wait: the VRPC channel is closed")
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(max(pause * 2, 20e-6), 1e-3)

    def release(self) -> None:
        self._view.release()
        self._words.release()


class PythonBackend:
    name = "python"
    server = PyServerRing
    client = PyClientRing
