"""One interface to the ring, two backends: C via cffi (`vrpc._native`) or pure Python.

`BACKEND` is "native" when the C module was built at install (`setup.py`'s `cffi_modules`),
else "python"; `PRISM_VRPC_BACKEND=python` forces the pure-Python one. `backend(name)` returns
either explicitly (tests run every ring test on both), and `ring_backend` is the default one.
Each backend's `server(buf, ...)` and `client(buf, ...)` build the two ends of a channel over a
mapped ring segment (`vrpc.ring.new_segment` / `map_segment`) and behave identically,
exceptions included (`vrpc.ring`'s docstring says which means what).
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import struct
import time
from typing import Any

from vrpc import abi
from vrpc.pyring import PythonBackend
from vrpc.ring import (
    Backend,
    RingProtocolError,
    check_result,
    geometry_error,
    open_error,
    slot_view,
)

_native: Any
try:
    from vrpc import _native  # type: ignore[attr-defined,no-redef]
except ImportError:  # not built: no compiler at install time
    _native = None

NATIVE_AVAILABLE = _native is not None
_WORK = struct.Struct("=II")  # struct vrpc_work: slot, len
_CQE = struct.Struct("=IIII")  # struct vrpc_cqe: slot, len, flags, reserved
_forced = os.environ.get("PRISM_VRPC_BACKEND", "")
BACKEND = "native" if NATIVE_AVAILABLE and _forced != "python" else "python"


class NativeServerRing:
    """Server side of one channel over `vrpc_srv_*`; see `vrpc.ring.ServerRing`."""

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
        ffi, lib = _native.ffi, _native.lib
        entries = entries or abi.default_entries(max(nslots, 1))
        self._buf = buf
        self._ptr = ffi.from_buffer("char[]", buf, require_writable=True)
        self._srv = ffi.new("struct vrpc_srv *")
        self._work = ffi.new("struct vrpc_work[]", abi.MAX_SLOTS)
        self._work_view = memoryview(ffi.buffer(self._work))
        result = lib.vrpc_srv_init(
            self._srv, self._ptr, len(buf), nslots, entries, doorbell, features,
            boot_id, channel_id, call_fd, first_index & 0xFFFFFFFF,
        )  # fmt: skip
        if result < 0:
            ffi.release(self._ptr)
            raise geometry_error(nslots, entries, len(buf), doorbell)
        self.nslots = nslots
        self._entries = entries
        self._fast = ffi.new("struct vrpc_fast_stats *")
        self._state = ffi.new("uint32_t *")

    def drain_fast(self, max_calls: int, meta: Any) -> list[tuple[int, int]]:
        """`drain`, answering in C the GETATTR hits of table `meta` (a `struct vrpc_meta *`,
        `vrpc.meta.NativeMetaWriter.cdata`) and NULL calls; the rest, for Python."""
        n = _native.lib.vrpc_srv_drain_fast(
            self._srv, meta, self._work, min(max_calls, abi.MAX_SLOTS), self._fast
        )
        if n == -errno.EPROTO:
            raise RingProtocolError(self.error)
        check_result(n, "drain")
        return list(_WORK.iter_unpack(self._work_view[: _WORK.size * n])) if n else []

    @property
    def fast_stats(self) -> tuple[int, int, int, int]:
        """(SQEs drained by drain_fast, GETATTR and NULL answered in C, their nanoseconds)."""
        st = self._fast
        return int(st.drained), int(st.getattr), int(st.null), int(st.ns)

    @property
    def calls(self) -> int:
        return int(self._srv.calls)

    @property
    def error(self) -> str | None:
        srv = self._srv
        if not srv.error:
            return None
        return abi.describe_error(
            srv.error, srv.error_index, srv.error_value, self.nslots, self._entries
        )

    def drain(self, max_calls: int) -> list[tuple[int, int]]:
        n = _native.lib.vrpc_srv_drain(self._srv, self._work, min(max_calls, abi.MAX_SLOTS))
        if n == -errno.EPROTO:
            raise RingProtocolError(self.error)
        check_result(n, "drain")
        return list(_WORK.iter_unpack(self._work_view[: _WORK.size * n])) if n else []

    def pump(
        self, max_calls: int, kick_fd: int = -1, meta: Any = None
    ) -> tuple[list[tuple[int, int]], bool]:
        """`ServerRing.pump` in one C call; with `meta` (a `struct vrpc_meta *`), GETATTR hits
        and NULL are answered in C as in `drain_fast` (`fast_stats` counts them)."""
        ffi = _native.ffi
        n = _native.lib.vrpc_srv_pump(
            self._srv, meta if meta else ffi.NULL, meta is not None, kick_fd, self._work,
            min(max_calls, abi.MAX_SLOTS), self._fast, self._state,
        )  # fmt: skip
        if n == -errno.EPROTO:
            raise RingProtocolError(self.error)
        check_result(n, "pump")
        work = list(_WORK.iter_unpack(self._work_view[: _WORK.size * n])) if n else []
        return work, self._state[0] == abi.PUMP_ARMED

    def record(self, slot: int, length: int) -> bytes:
        if not 0 <= slot < self.nslots or not self._srv.inflight >> slot & 1:
            raise ValueError(f"slot {slot} is not in flight")
        if not 0 <= length <= abi.SLOT_SIZE:
            raise ValueError(f"a record of {length} bytes does not fit a slot")
        start = abi.SLOT_OFFSET + slot * abi.SLOT_SIZE
        return self._buf[start : start + length]

    def complete(self, slot: int, reply: bytes | memoryview, flags: int = 0) -> bool:
        # cffi passes bytes without a copy; other buffers need a view.
        data = reply if isinstance(reply, bytes) else _native.ffi.from_buffer(reply)
        result = _native.lib.vrpc_srv_complete(self._srv, slot, data, len(reply), flags)
        return check_result(result, "complete") == 1

    def arm(self) -> bool:
        return bool(_native.lib.vrpc_srv_arm(self._srv))

    def disarm(self) -> None:
        _native.lib.vrpc_srv_disarm(self._srv)

    def close(self) -> None:
        _native.lib.vrpc_srv_close(self._srv)

    def retire(self) -> None:
        _native.lib.vrpc_srv_retire(self._srv)

    def release(self) -> None:
        _native.ffi.release(self._ptr)


class NativeClientRing:
    """Client side of one channel over `vrpc_cli_*`; see `vrpc.ring.ClientRing`."""

    def __init__(self, buf: mmap.mmap, *, kick_fd: int, call_fd: int) -> None:
        ffi, lib = _native.ffi, _native.lib
        self._buf = buf
        self._ptr = ffi.from_buffer("char[]", buf, require_writable=True)
        self._cli = ffi.new("struct vrpc_cli *")
        self._cqes = ffi.new("struct vrpc_cqe[]", abi.MAX_SLOTS)
        self._cqe_view = memoryview(ffi.buffer(self._cqes))
        result = lib.vrpc_cli_open(self._cli, self._ptr, len(buf), kick_fd, call_fd)
        if result < 0:
            ffi.release(self._ptr)
            raise open_error(-result)
        cli = self._cli
        self.nslots = int(cli.nslots)
        self.features = int(cli.features)
        self.boot_id = int(cli.boot_id)
        self.channel_id = int(cli.channel_id)
        self._view = memoryview(buf)

    def slot(self, slot: int) -> memoryview:
        return slot_view(self._view, self.nslots, slot)

    def submit(self, slot: int, length: int) -> bool:
        if not 0 <= slot < 2**32 or not 0 <= length < 2**32:
            raise ValueError(f"submit: slot {slot} or length {length} out of range")
        return check_result(_native.lib.vrpc_cli_submit(self._cli, slot, length), "submit") == 1

    def reap(self, max_completions: int = abi.MAX_SLOTS) -> list[tuple[int, int, int]]:
        n = _native.lib.vrpc_cli_reap(self._cli, self._cqes, min(max_completions, abi.MAX_SLOTS))
        if n == -errno.EPROTO:
            raise RingProtocolError("reap: the server wrote a bad completion")
        check_result(n, "reap")
        return [cqe[:3] for cqe in _CQE.iter_unpack(self._cqe_view[: _CQE.size * n])]

    def wait(self, timeout: float | None = None, extra_fd: int = -1) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = (
                -1 if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
            )
            result = _native.lib.vrpc_cli_wait(self._cli, left, extra_fd)
            if result != -errno.EINTR:
                return check_result(result, "wait") == 1
            # EINTR: Python runs its signal handlers (which may raise) before the next try.

    def call_one(
        self, slot: int, length: int, timeout: float, extra_fd: int = -1
    ) -> tuple[int, int] | None:
        if not 0 <= slot < 2**32 or not 0 <= length < 2**32:
            raise ValueError(f"call: slot {slot} or length {length} out of range")
        cqe = self._cqes
        wait_ms = max(0, math.ceil(timeout * 1000))
        result = _native.lib.vrpc_cli_call(self._cli, slot, length, wait_ms, extra_fd, cqe)
        if result == 1:
            return int(cqe[0].len), int(cqe[0].flags)
        if result == -errno.EPROTO:
            raise RingProtocolError("call: the server wrote a bad completion")
        check_result(result, "call")
        return None  # the wait ended first (timeout or a signal): the slot is in flight

    def release(self) -> None:
        self._view.release()
        _native.ffi.release(self._ptr)


class NativeBackend:
    name = "native"
    server = NativeServerRing
    client = NativeClientRing


def backend(name: str | None = None) -> Backend:
    """The ring backend called `name` ("native" or "python"), default `BACKEND`."""
    name = name or BACKEND
    if name == "python":
        return PythonBackend()
    if name == "native":
        if not NATIVE_AVAILABLE:
            raise RuntimeError(
                "the native VRPC module vrpc._native is not built: install gcc and the Python "
                "headers (python3-dev), then reinstall Prism (pip install .)"
            )
        return NativeBackend()
    raise ValueError(f"unknown VRPC backend {name!r}: use 'native' or 'python'")


ring_backend = backend()
