"""The VRPC ring on both backends: a model-based state machine with index wraparound, hostile
clients, poll-mode doorbells, close/hang-up wakeups, and a cross-process stress with no lost
wakeups, for every pairing of a native or Python server with a native or Python client."""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.vrpc_helpers import BACKENDS, PAIRS, Channel, channel
from vrpc import abi, pyring
from vrpc.native import NATIVE_AVAILABLE
from vrpc.ring import RingClosed, RingProtocolError, ServerRing

M32 = 0xFFFFFFFF


def word(ch: Channel, name: str) -> int:
    offset, width = abi.RING_HEADER[name]
    return int.from_bytes(ch.segment.map[offset : offset + width], sys.byteorder)


def put_word(ch: Channel, name: str, value: int) -> None:
    offset, width = abi.RING_HEADER[name]
    ch.segment.map[offset : offset + width] = (value & (2 ** (8 * width) - 1)).to_bytes(
        width, sys.byteorder
    )


def raw_sqe(ch: Channel, entries: int, index: int, slot: int, length: int, flags: int = 0) -> None:
    """What a hostile client does: write an SQE and publish it, bypassing every check."""
    at = abi.SQ_OFFSET + abi.ENTRY_SIZE * (index & (entries - 1))
    ch.segment.map[at : at + 16] = struct.pack("=IIII", slot, length, flags, 0)
    put_word(ch, "sq_tail", index + 1)


# ------------------------------------------------------------------------------- model


class RingMachine(RuleBasedStateMachine):
    """Random submit / drain / complete (with NOREPLY) / reap / arm / disarm against a model."""

    server_backend = "python"
    client_backend = "python"

    def __init__(self) -> None:
        super().__init__()
        self._cm: object = None

    @initialize(
        nslots=st.integers(1, 8),
        extra=st.integers(0, 2),
        first=st.one_of(st.integers(2**32 - 24, 2**32 - 1), st.just(0)),
    )
    def setup(self, nslots: int, extra: int, first: int) -> None:
        self.entries = min(abi.MAX_ENTRIES, abi.default_entries(nslots) << extra)
        cm = channel(
            self.server_backend,
            self.client_backend,
            nslots=nslots,
            entries=self.entries,
            first_index=first,
        )
        self.ch = cm.__enter__()
        self._cm = cm
        self.first = first
        self.free = set(range(nslots))
        self.sq: deque[tuple[int, bytes]] = deque()
        self.running: dict[int, bytes] = {}
        self.cq: deque[tuple[int, bytes, int]] = deque()
        self.idle = False
        self.kicks = 0
        self.counts = {"sq_tail": 0, "sq_head": 0, "cq_tail": 0, "cq_head": 0}

    def teardown(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)  # type: ignore[attr-defined]

    @precondition(lambda self: self.free)
    @rule(data=st.data(), record=st.binary(max_size=300))
    def submit(self, data: st.DataObject, record: bytes) -> None:
        slot = data.draw(st.sampled_from(sorted(self.free)))
        self.ch.client.slot(slot)[: len(record)] = record
        assert self.ch.client.submit(slot, len(record)) == self.idle
        self.kicks += self.idle
        self.free.remove(slot)
        self.sq.append((slot, record))
        self.counts["sq_tail"] += 1

    @precondition(lambda self: len(self.free) < self.ch.server.nslots)
    @rule(data=st.data())
    def submit_busy_slot(self, data: st.DataObject) -> None:
        busy = sorted(set(range(self.ch.server.nslots)) - self.free)
        with pytest.raises(ValueError):
            self.ch.client.submit(data.draw(st.sampled_from(busy)), 0)

    @rule(max_calls=st.integers(1, 10))
    def drain(self, max_calls: int) -> None:
        work = self.ch.server.drain(max_calls)
        expected = [self.sq.popleft() for _ in range(min(max_calls, len(self.sq)))]
        assert work == [(slot, len(record)) for slot, record in expected]
        for slot, record in expected:
            assert self.ch.server.record(slot, len(record)) == record
            self.running[slot] = record
        self.counts["sq_head"] += len(work)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), reply=st.binary(max_size=300), noreply=st.booleans())
    def complete(self, data: st.DataObject, reply: bytes, noreply: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.running)))
        del self.running[slot]
        flags = abi.CQE_NOREPLY if noreply else 0
        reply = b"" if noreply else reply
        assert self.ch.server.complete(slot, reply, flags) is False  # nobody sleeps here
        self.cq.append((slot, reply, flags))
        self.counts["cq_tail"] += 1

    @rule(data=st.data())
    def complete_not_in_flight(self, data: st.DataObject) -> None:
        idle = sorted(set(range(self.ch.server.nslots)) - set(self.running))
        if idle:
            with pytest.raises(ValueError):
                self.ch.server.complete(data.draw(st.sampled_from(idle)), b"x")

    @rule(max_completions=st.integers(1, 10))
    def reap(self, max_completions: int) -> None:
        done = self.ch.client.reap(max_completions)
        expected = [self.cq.popleft() for _ in range(min(max_completions, len(self.cq)))]
        assert done == [(slot, len(reply), flags) for slot, reply, flags in expected]
        for slot, reply, _ in expected:
            assert bytes(self.ch.client.slot(slot)[: len(reply)]) == reply
            self.free.add(slot)
        self.counts["cq_head"] += len(done)

    @rule()
    def arm(self) -> None:
        assert self.ch.server.arm() == bool(self.sq)
        self.idle = True

    @rule()
    def disarm(self) -> None:
        self.ch.server.disarm()
        self.idle = False

    @rule()
    def wait_without_sleeping(self) -> None:
        assert self.ch.client.wait(0) == bool(self.cq)

    @rule()
    def read_kicks(self) -> None:
        if self.kicks:
            assert os.eventfd_read(self.ch.kick) == self.kicks
        else:
            with pytest.raises(BlockingIOError):
                os.eventfd_read(self.ch.kick)
        self.kicks = 0

    @invariant()
    def indices_are_free_running(self) -> None:
        if self._cm is None:
            return
        for name, count in self.counts.items():
            assert word(self.ch, name) == (self.first + count) & M32, name
        assert word(self.ch, "server_flags") == (abi.SERVER_IDLE if self.idle else 0)


def _machine(server: str, client: str) -> type[RingMachine]:
    return type(
        f"RingMachine_{server}_{client}",
        (RingMachine,),
        {"server_backend": server, "client_backend": client},
    )


_native_only = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="vrpc._native is not built")
_SETTINGS = settings(max_examples=30, stateful_step_count=40, deadline=None)
TestRingPython = _machine("python", "python").TestCase
TestRingPython.settings = _SETTINGS
TestRingNative = _native_only(_machine("native", "native").TestCase)
TestRingNative.settings = _SETTINGS
TestRingMixed = _native_only(_machine("native", "python").TestCase)
TestRingMixed.settings = settings(max_examples=10, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------------------- hostile


def _closed_for(ch: Channel, server: ServerRing, *fragments: str) -> None:
    with pytest.raises(RingProtocolError) as info:
        server.drain(64)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert server.error == str(info.value)
    assert word(ch, "server_flags") & abi.SERVER_CLOSED
    assert os.eventfd_read(ch.call) >= 1  # the client was woken to see it
    with pytest.raises(RingProtocolError):
        server.drain(64)  # stays closed
    with pytest.raises(RingClosed):
        ch.client.submit(1, 1)
    with pytest.raises(RingClosed):
        ch.client.reap()


HOSTILE: list[tuple[str, Callable[[Channel, int, int], None], tuple[str, ...]]] = [
    ("overrun", lambda ch, e, h: put_word(ch, "sq_tail", h + e + 1), ("ahead",)),
    ("overrun-far", lambda ch, e, h: put_word(ch, "sq_tail", h + 2**31), ("ahead",)),
    ("tail-behind", lambda ch, e, h: put_word(ch, "sq_tail", h - 1), ("ahead",)),
    ("slot", lambda ch, e, h: raw_sqe(ch, e, h, 4, 10), ("slot 4", "4 slots")),
    ("slot-max", lambda ch, e, h: raw_sqe(ch, e, h, M32, 10), ("slot 4294967295",)),
    ("len", lambda ch, e, h: raw_sqe(ch, e, h, 1, abi.SLOT_SIZE + 1), ("length",)),
    ("len-max", lambda ch, e, h: raw_sqe(ch, e, h, 1, M32), ("length 4294967295",)),
    ("flags", lambda ch, e, h: raw_sqe(ch, e, h, 1, 8, 4), ("flags 0x4",)),
    ("slot-in-flight", lambda ch, e, h: raw_sqe(ch, e, h, 0, 8), ("slot 0", "in flight")),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_sqe_is_a_protocol_error(name: str, case: tuple) -> None:
    _, scribble, fragments = case
    with channel(name, "python", nslots=4, first_index=2**32 - 1) as ch:
        ch.client.slot(0)[:4] = b"call"
        ch.client.submit(0, 4)
        assert ch.server.drain(64) == [(0, 4)]  # slot 0 is now in flight
        scribble(ch, 4, word(ch, "sq_tail"))
        _closed_for(ch, ch.server, *fragments)
        with pytest.raises(RingClosed):  # the in-flight call finishes; its reply is dropped
            ch.server.complete(0, b"reply")
        assert word(ch, "cq_tail") == 2**32 - 1


_SCRIBBLED = (
    "entries", "nslots", "slot_size", "cq_offset", "slot_offset", "sq_head", "cq_tail",
    "server_flags",
)  # fmt: skip
_WORD = st.one_of(
    st.integers(0, 8), st.sampled_from([abi.SLOT_SIZE, abi.SLOT_SIZE + 1, M32]), st.integers(0, M32)
)


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(
    sqes=st.lists(st.tuples(_WORD, _WORD, st.one_of(st.just(0), _WORD)), max_size=4),
    tail=st.one_of(st.integers(0, 6), st.integers(0, M32)),
    geometry=st.lists(_WORD, min_size=8, max_size=8),
)
def test_garbage_never_escapes_the_channel(
    name: str, sqes: list[tuple[int, int, int]], tail: int, geometry: list[int]
) -> None:
    """Random SQEs, tail, header geometry and server-owned words: valid work or a protocol
    error, never an out-of-bounds access (the server uses only its private copies, R5)."""
    with channel(name, "python", nslots=4) as ch:
        for index, (slot, length, flags) in enumerate(sqes):
            raw_sqe(ch, 4, index, slot, length, flags)
        for field, value in zip(_SCRIBBLED, geometry, strict=True):
            put_word(ch, field, value)
        put_word(ch, "sq_tail", tail)
        try:
            work = ch.server.drain(64)
        except RingProtocolError:
            assert ch.server.error
            return
        assert len({slot for slot, _ in work}) == len(work) <= 4
        for slot, length in work:
            assert 0 <= slot < 4 and 0 <= length <= abi.SLOT_SIZE
            assert len(ch.server.record(slot, length)) == length
            ch.server.complete(slot, b"r" * min(length, abi.SLOT_SIZE))
        if work:
            assert word(ch, "cq_tail") == len(work)  # rewritten from the private index


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_completion_is_a_protocol_error_for_the_client(name: str) -> None:
    for slot, length, flags in (
        (9, 0, 0),
        (1, 0, 0),
        (0, abi.SLOT_SIZE + 1, 0),
        (0, 0, 8),
        (0, 5, 1),
    ):
        with channel("python", name, nslots=4) as ch:
            ch.client.submit(0, 0)
            at = abi.SQ_OFFSET + abi.ENTRY_SIZE * 4  # the CQ follows 4 SQ entries
            ch.segment.map[at : at + 16] = struct.pack("=IIII", slot, length, flags, 0)
            put_word(ch, "cq_tail", 1)
            with pytest.raises(RingProtocolError):
                ch.client.reap()


# ------------------------------------------------------------------------------- wakeups


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        start = time.monotonic()
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the test thread
            result.append(exc)
        result.append(time.monotonic() - start)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_sleeping_client_is_woken(server: str, client: str) -> None:
    with channel(server, client) as ch:
        ch.client.submit(2, 0)
        ch.server.drain(4)
        thread, result = _in_thread(lambda: ch.client.wait(2.0))
        time.sleep(0.05)
        woke = ch.server.complete(2, b"ok")
        thread.join(10)
        assert result[0] is True and result[1] < 2.0
        assert woke  # the client announced that it sleeps
        assert ch.client.reap() == [(2, 2, 0)]


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_pump_turns(server: str, client: str) -> None:
    """One pump turn consumes the kick, hands back records, spends at most its budget, and
    arms (SERVER_IDLE) only with nothing left (races with the client: the stress below)."""
    with channel(server, client) as ch:
        for slot in (0, 1, 2):
            assert not ch.client.submit(slot, slot)  # the server is not idle yet: no kick
        os.eventfd_write(ch.kick, 1)
        work, armed = ch.server.pump(2, ch.kick)
        assert work == [(0, 0), (1, 1)] and not armed  # the budget is spent: call again
        with pytest.raises(BlockingIOError):
            os.eventfd_read(ch.kick)  # consumed
        assert not word(ch, "server_flags") & abi.SERVER_IDLE
        work, armed = ch.server.pump(8)
        assert work == [(2, 2)] and not armed  # records for Python first
        work, armed = ch.server.pump(8)
        assert work == [] and armed
        assert word(ch, "server_flags") & abi.SERVER_IDLE
        assert ch.client.submit(3, 3)  # armed: the client kicks
        work, armed = ch.server.pump(8, ch.kick)
        assert work == [(3, 3)] and not armed


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_call_one(server: str, client: str) -> None:
    """`call_one` submits, sleeps and reaps in one step; it refuses while another slot is in
    flight, and a wait that ends first leaves the slot in flight for `reap` and `wait`."""
    with channel(server, client) as ch:
        ch.client.slot(1)[:3] = b"abc"
        thread, result = _in_thread(lambda: ch.client.call_one(1, 3, 5.0))
        time.sleep(0.05)
        work, _ = ch.server.pump(4, ch.kick)
        assert work == [(1, 3)] and ch.server.record(1, 3) == b"abc"
        assert ch.server.complete(1, b"reply")  # the client slept: woken
        thread.join(10)
        assert result[0] == (5, 0) and bytes(ch.client.slot(1)[:5]) == b"reply"
        assert ch.client.call_one(2, 0, 0.05) is None  # nobody answers: the wait ends first
        with pytest.raises(ValueError):
            ch.client.call_one(3, 0, 0.05)  # slot 2 is still in flight
        ch.server.pump(4, ch.kick)
        ch.server.complete(2, b"", abi.CQE_NOREPLY)
        assert ch.client.wait(1.0) and ch.client.reap() == [(2, 0, abi.CQE_NOREPLY)]
        ch.server.close()
        with pytest.raises(RingClosed):
            ch.client.call_one(0, 0, 1.0)
    a, b = socket.socketpair()
    with channel(server, client) as ch, a, b:
        # a server killed -9 never sets SERVER_CLOSED: its control socket hangs up
        thread, result = _in_thread(lambda: ch.client.call_one(0, 0, 10.0, a.fileno()))
        time.sleep(0.05)
        b.close()
        thread.join(10)
        assert isinstance(result[0], RingClosed) and result[1] < 5.0, result


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_close_and_hangup_wake_the_client(server: str, client: str) -> None:
    with channel(server, client) as ch:
        thread, result = _in_thread(lambda: ch.client.wait(2.0))
        time.sleep(0.05)
        ch.server.close()
        thread.join(10)
        assert isinstance(result[0], RingClosed) and result[1] < 1.0
    with channel(server, client) as ch:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        thread, result = _in_thread(lambda: ch.client.wait(2.0, extra_fd=mine.fileno()))
        time.sleep(0.05)
        theirs.close()  # the server process died: its end of the control socket hangs up
        thread.join(10)
        mine.close()
        assert isinstance(result[0], RingClosed) and result[1] < 1.0
    with channel(server, client) as ch:
        start = time.monotonic()
        assert ch.client.wait(0.05) is False
        assert 0.04 <= time.monotonic() - start < 1.0


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_poll_mode_doorbell(server: str, client: str) -> None:
    with channel(server, client, doorbell=abi.DOORBELL_POLL) as ch:
        for i in range(20):
            ch.client.slot(i % 4)[:1] = bytes([i])
            ch.client.submit(i % 4, 1)
            work = ch.server.drain(4)
            thread, result = _in_thread(lambda: ch.client.wait(2.0))
            time.sleep(0.002)
            reply = memoryview(bytearray(ch.server.record(*work[0]) * 3))  # any buffer works
            assert ch.server.complete(work[0][0], reply) is False
            thread.join(10)
            assert result[0] is True
            assert ch.client.reap() == [(i % 4, 3, 0)]
        with pytest.raises(BlockingIOError):  # no eventfd was written in poll mode
            os.eventfd_read(ch.call)


# ------------------------------------------------------------------------------- whole words

_INDEX_WORDS = ("sq_tail", "sq_head", "cq_tail", "cq_head")


def _watch(segment_map: object, first: int, calls: int, stop: object, ready: int) -> str | None:
    """The watcher process: load the index and flag words, whole, until `stop[0]` is set.

    A word is published with one store, so every value seen must be one the owner really
    wrote: indices only move forward (mod 2^32) within [first, first + calls], flags stay
    within their known bits. A store done in parts (a byte at a time, or `struct.pack_into`,
    which zeroes the word before writing it) shows up as a value out of that order."""
    with memoryview(segment_map) as whole:  # type: ignore[arg-type]
        words = whole[: abi.SLOT_OFFSET].cast("I")
    try:
        at = [abi.RING_HEADER[name][0] // 4 for name in _INDEX_WORDS]
        flags_at = [abi.RING_HEADER[name][0] // 4 for name in ("server_flags", "client_flags")]
        known = abi.SERVER_IDLE | abi.SERVER_CLOSED | abi.CLIENT_WAITING
        last = [first] * len(at)
        os.write(ready, b"r")
        while not stop[0]:  # type: ignore[index]
            for _ in range(256):
                for k, i in enumerate(at):
                    value = words[i]
                    if (value - last[k]) & M32 >= 2**31 or (value - first) & M32 > calls:
                        return f"{_INDEX_WORDS[k]} read {value} after {last[k]} (first {first})"
                    last[k] = value
                for i in flags_at:
                    if words[i] & ~known:
                        return f"a flags word read {words[i]:#x}"
        return None
    finally:
        words.release()


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_shared_words_are_never_seen_partly_written(server: str, client: str) -> None:
    """Another process never sees an index word torn or transiently zeroed (across the wrap).

    The cross-process stress hit this class only now and then (a Python client's sq_tail read
    as 0 by the server: an SQ overrun); here a watcher process reads the words as fast as it
    can for a second while this process runs both ends of the ring."""
    calls, seconds = 10**6, 1.0
    first = 2**32 - 3000
    with channel(server, client, nslots=1, first_index=first) as ch:
        stop_map = mmap.mmap(-1, 4096)
        stop = memoryview(stop_map).cast("I")
        ready_r, ready_w = os.pipe()
        pid, report_r = _fork_child(  # the watcher
            lambda: _watch(ch.client_map, first, calls, stop, ready_w)
        )
        os.close(ready_w)
        try:
            assert os.read(ready_r, 1) == b"r"
            deadline = time.monotonic() + seconds
            i = 0
            while i < calls and (i % 256 or time.monotonic() < deadline):
                ch.client.submit(0, i % 7)
                if i % 3 == 0:
                    ch.server.arm()
                    ch.server.disarm()
                assert ch.server.drain(4) == [(0, i % 7)]
                ch.server.complete(0, b"x" * (i % 5))
                assert ch.client.reap() == [(0, i % 5, 0)]
                i += 1
            assert i > 3000  # the indices wrapped
        finally:
            stop[0] = 1
            status, report = _child_outcome(pid, report_r)
            os.close(ready_r)
            stop.release()
            stop_map.close()
        assert status == 0, report
        assert report == ""


def test_python_backend_stores_each_word_at_once() -> None:
    """The mechanism, deterministically: a `HeaderWords` store converts the value first and then
    replaces the old word in one store, so no reader can see anything in between (the value's
    `__index__` runs where `struct.pack_into` would already have zeroed the word). And the
    Python backend does not use `struct` on the segment at all."""
    buf = mmap.mmap(-1, abi.ring_size(1))
    words = pyring.HeaderWords(buf)
    try:
        at = abi.RING_HEADER["sq_tail"][0] // 4
        words.u32[at] = 0xFFFFFEFF
        seen: list[int] = []

        class Index:
            def __index__(self) -> int:
                seen.append(words.u32[at])
                return 0xFFFFFF00

        words.u32[at] = Index()  # type: ignore[call-overload]
        assert seen == [0xFFFFFEFF]
        assert words.u32[at] == 0xFFFFFF00
        assert int.from_bytes(buf[128:132], sys.byteorder) == 0xFFFFFF00
        assert words.get("sq_tail") == 0xFFFFFF00
    finally:
        words.release()
        buf.close()
    assert not hasattr(pyring, "struct")


# ------------------------------------------------------------------------------- stress

_HEAD = struct.Struct(">II")


def _serve(server: ServerRing, kick: int, seed: int, pumped: bool = False) -> str | None:
    """The server process: sleep on the kick fd, drain, verify, answer; None when told to stop.
    `pumped`: each turn is one `pump` (kick, disarm, drain, rearm), as `prism serve` does."""
    rng = random.Random(seed)
    poller = select.poll()
    poller.register(kick, select.POLLIN)
    pending = server.arm()
    while True:
        if not pending:
            if not poller.poll(5000):
                return "server: no kick within 5 s (lost wakeup)"
            if not pumped:
                with contextlib.suppress(BlockingIOError):  # a stale kick was already read
                    os.eventfd_read(kick)
        if not pumped:
            server.disarm()
        first = True
        while True:
            if pumped:
                work, armed = server.pump(rng.randrange(1, 33), kick if first else -1)
                first = False
            else:
                work = server.drain(32)
            for slot, length in work:
                record = server.record(slot, length)
                if length == 0:
                    server.complete(slot, b"")
                    return None
                seq, crc = _HEAD.unpack_from(record)
                payload = record[_HEAD.size :]
                if zlib.crc32(payload) != crc:
                    return f"server: record {seq} is corrupt"
                if rng.random() < 0.01:
                    time.sleep(rng.random() * 1e-3)
                if rng.random() < 0.02:
                    server.complete(slot, b"", abi.CQE_NOREPLY)
                else:
                    server.complete(
                        slot, _HEAD.pack(seq, zlib.crc32(payload[::-1])) + payload[::-1]
                    )
            if pumped:
                if armed:
                    pending = False
                    break
                continue
            if not work:
                if server.arm():
                    server.disarm()
                    continue
                pending = False
                break


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.8:
        return rng.randrange(0, 256)
    if r < 0.995:
        return rng.randrange(256, 16384)
    return rng.randrange(16384, abi.SLOT_SIZE - _HEAD.size + 1)


def _reap_child(pid: int, grace: float = 10.0) -> int:
    """The child's exit status; a child still running after `grace` seconds is killed."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _fork_child(check: Callable[[], str | None]) -> tuple[int, int]:
    """Run `check` in a forked child; (its pid, the read end of its report pipe). The child
    reports `check`'s error (or its traceback) and exits 1, or reports nothing and exits 0."""
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(report_r)
            error = check()
            os.write(report_w, (error or "").encode())
            code = 0 if error is None else 1
        except BaseException:
            os.write(report_w, traceback.format_exc().encode()[-2000:])
        finally:
            os._exit(code)
    os.close(report_w)
    return pid, report_r


def _child_outcome(pid: int, report_r: int) -> tuple[int, str]:
    """The exit status and report of a `_fork_child` child (see `_reap_child`)."""
    status = _reap_child(pid)
    report = os.read(report_r, 4096).decode()
    os.close(report_r)
    return status, report


def _stress(server_backend: str, client_backend: str, total: int, pumped: bool = False) -> float:
    """`pumped`: the server turns with `pump`, and the client makes a third of its calls with
    `call_one` (submit, wait and reap in one step) whenever nothing else is in flight."""
    nslots = 8
    with channel(server_backend, client_backend, nslots=nslots, first_index=2**32 - 1000) as ch:
        pid, report_r = _fork_child(  # the server process
            lambda: _serve(ch.server, ch.kick, seed=total, pumped=pumped)
        )
        rng = random.Random(total)
        client = ch.client
        free = list(range(nslots))
        inflight: dict[int, tuple[int, bytes, float]] = {}
        done = submitted = 0
        worst = 0.0
        try:
            while done < total:
                if pumped and not inflight and rng.random() < 0.33:
                    slot = free.pop()
                    payload = rng.randbytes(_size(rng))
                    record = _HEAD.pack(submitted, zlib.crc32(payload)) + payload
                    client.slot(slot)[: len(record)] = record
                    started = time.monotonic()
                    got = client.call_one(slot, len(record), 1.0)
                    assert got is not None, f"lost wakeup: no completion within 1 s ({done} done)"
                    worst = max(worst, time.monotonic() - started)
                    length, flags = got
                    if flags & abi.CQE_NOREPLY:  # the slot is free again: resent below
                        free.append(slot)
                        continue
                    reply = bytes(client.slot(slot)[:length])
                    assert reply == _HEAD.pack(submitted, zlib.crc32(payload[::-1])) + payload[::-1]
                    free.append(slot)
                    submitted += 1
                    done += 1
                    continue
                while free and submitted < total and (not inflight or rng.random() < 0.6):
                    slot = free.pop()
                    payload = rng.randbytes(_size(rng))
                    record = _HEAD.pack(submitted, zlib.crc32(payload)) + payload
                    client.slot(slot)[: len(record)] = record
                    inflight[slot] = (submitted, payload, time.monotonic())
                    client.submit(slot, len(record))
                    submitted += 1
                if rng.random() < 0.02:
                    time.sleep(rng.random() * 200e-6)
                assert client.wait(1.0), f"lost wakeup: no completion within 1 s ({done} done)"
                for slot, length, flags in client.reap():
                    seq, payload, started = inflight.pop(slot)
                    took = time.monotonic() - started
                    assert took < 1.0, f"round trip {seq} took {took:.3f} s: a lost wakeup"
                    worst = max(worst, took)
                    if flags & abi.CQE_NOREPLY:  # resend, as an RPC client retransmits
                        record = _HEAD.pack(seq, zlib.crc32(payload)) + payload
                        inflight[slot] = (seq, payload, started)
                        client.submit(slot, len(record))
                        continue
                    reply = bytes(client.slot(slot)[:length])
                    assert reply == _HEAD.pack(seq, zlib.crc32(payload[::-1])) + payload[::-1]
                    free.append(slot)
                    done += 1
            client.submit(free[0], 0)  # stop
            assert client.wait(5.0)
            client.reap()
        finally:
            status, report = _child_outcome(pid, report_r)
        assert status == 0, report
        assert report == ""
        assert worst < 1.0, f"a round trip took {worst:.3f} s"
        return worst


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_cross_process_stress(server: str, client: str) -> None:
    total = 20000 if server == client == "native" else 3000
    _stress(server, client, total)


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_cross_process_stress_pump_and_call_one(server: str, client: str) -> None:
    """The same stress through the one-step paths `prism serve` and `VrpcChannel.call` use."""
    total = 20000 if server == client == "native" else 3000
    _stress(server, client, total, pumped=True)
