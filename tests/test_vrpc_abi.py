"""The VRPC ABI: native/vrpc.h as compiled (cffi) == vrpc/abi.py == the design; open() checks."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from rpc.record import MAX_RECORD_SIZE
from tests.vrpc_helpers import BACKENDS, NATIVE_REQUIRED
from vrpc import abi
from vrpc._build import cdef_text
from vrpc.native import NATIVE_AVAILABLE, backend
from vrpc.ring import RingOpenError, eventfd, map_segment, new_segment

HEADER = Path(__file__).resolve().parent.parent / "native" / "vrpc.h"
native: Any
try:
    from vrpc import _native as native  # type: ignore[attr-defined,no-redef]
except ImportError:
    native = None
# Under PRISM_REQUIRE_NATIVE=1 a missing module fails these tests instead of skipping them.
needs_native = pytest.mark.skipif(
    native is None and not NATIVE_REQUIRED, reason="vrpc._native is not built"
)

# Numbers stated in the design (section 4.1 / 7.2), independent of both implementations.
DESIGN = {
    ("struct vrpc_ring_header", "abi_major"): 8,
    ("struct vrpc_ring_header", "segment_size"): 16,
    ("struct vrpc_ring_header", "entries"): 48,
    ("struct vrpc_ring_header", "features"): 68,
    ("struct vrpc_ring_header", "sq_tail"): 128,
    ("struct vrpc_ring_header", "client_flags"): 132,
    ("struct vrpc_ring_header", "sq_head"): 192,
    ("struct vrpc_ring_header", "server_flags"): 196,
    ("struct vrpc_ring_header", "cq_tail"): 256,
    ("struct vrpc_ring_header", "cq_head"): 320,
    ("struct vrpc_meta_header", "table_epoch"): 128,
    ("struct vrpc_epoch_file", "begun"): 64,
    ("struct vrpc_epoch_file", "ended"): 128,
}


def test_native_module_is_built_when_required() -> None:
    if NATIVE_REQUIRED:
        assert NATIVE_AVAILABLE, "PRISM_REQUIRE_NATIVE=1 but vrpc._native did not build"
    elif not NATIVE_AVAILABLE:
        pytest.skip("vrpc._native is not built")
    assert backend("native").name == "native"


def test_cdef_slice_has_only_what_cffi_accepts() -> None:
    text = cdef_text(HEADER)
    directives = [line.strip() for line in text.splitlines() if line.strip().startswith("#")]
    assert directives
    assert all(re.fullmatch(r"#define VRPC_\w+\s+(0x[0-9A-F]+|\d+)", d) for d in directives)


def test_design_offsets() -> None:
    for (struct_name, field), offset in DESIGN.items():
        assert abi.STRUCTS[struct_name][field][0] == offset
    assert abi.SIZES["struct vrpc_ring_header"] == abi.HEADER_SIZE == 4096
    assert abi.SIZES["struct vrpc_attr_entry"] == 128
    assert abi.ENTRY_SIZE * abi.MAX_ENTRIES * 2 <= abi.HEADER_SIZE  # SQ + CQ fit one page
    assert abi.RING_MAGIC.to_bytes(8, "little") == b"PRISMVR1"
    assert abi.META_MAGIC.to_bytes(8, "little") == b"PRISMMT1"
    assert abi.EPOCH_MAGIC.to_bytes(8, "little") == b"PRISMEP1"
    assert abi.ring_size(16) == 8192 + 16 * abi.SLOT_SIZE
    assert abi.SLOT_SIZE == MAX_RECORD_SIZE  # a slot holds any record the RPC core accepts


@needs_native
def test_compiled_layout_matches_python_mirror() -> None:
    assert native is not None
    ffi = native.ffi
    for struct_name, fields in abi.STRUCTS.items():
        assert ffi.sizeof(struct_name) == abi.SIZES[struct_name], struct_name
        for field, (offset, size) in fields.items():
            assert ffi.offsetof(struct_name, field) == offset, (struct_name, field)
            assert (
                ffi.sizeof(ffi.typeof(struct_name).fields[_index(struct_name, field)][1].type)
                == size
            )


def _index(struct_name: str, field: str) -> int:
    assert native is not None
    names = [name for name, _ in native.ffi.typeof(struct_name).fields]
    return names.index(field)


@needs_native
def test_compiled_constants_match_python_mirror() -> None:
    assert native is not None
    names = re.findall(r"#define VRPC_(\w+)", cdef_text(HEADER))
    assert len(names) > 20
    for name in names:
        assert getattr(native.lib, f"VRPC_{name}") == getattr(abi, name), name
    for nslots in (0, 1, 16, 64, 65):
        expected = abi.ring_size(nslots) if 1 <= nslots <= 64 else 0
        assert native.lib.vrpc_ring_size(nslots) == expected


def test_segment_is_sealed() -> None:
    segment = new_segment(1)
    try:
        seals = fcntl.fcntl(segment.fd, fcntl.F_GET_SEALS)
        assert (
            seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        )
        for size in (4096, abi.ring_size(2)):
            with pytest.raises(PermissionError):
                os.ftruncate(segment.fd, size)
    finally:
        segment.close()


def _words(buf: mmap.mmap, **fields: int) -> None:
    for name, value in fields.items():
        offset, width = abi.RING_HEADER[name]
        buf[offset : offset + width] = value.to_bytes(width, sys.byteorder)


GEOMETRY_BREAKS = [
    {"header_size": 2048},
    {"segment_size": abi.ring_size(2) + 4096},
    {"sq_offset": 0},
    {"cq_offset": 4096 + 16 * 8},
    {"entries": 3},
    {"entries": 1},  # fewer than nslots
    {"entries": 256, "cq_offset": 4096 + 16 * 256},  # SQ and CQ overflow their page
    {"nslots": 0},
    {"nslots": 65},
    {"nslots": 3},  # more slots than the segment holds
    {"slot_offset": 4096},
    {"slot_size": 4096},
    {"doorbell": 0},
    {"doorbell": 3},
]


@pytest.mark.parametrize("name", BACKENDS)
def test_open_refuses_bad_segments(name: str) -> None:
    ring = backend(name)
    segment = new_segment(2)
    kick, call = eventfd(), eventfd()
    client_map = map_segment(segment.fd)
    try:

        def fresh() -> None:
            backend("python").server(segment.map, nslots=2, call_fd=call).release()

        def refused(expect: int) -> RingOpenError:
            with pytest.raises(RingOpenError) as info:
                ring.client(client_map, kick_fd=kick, call_fd=call)
            assert info.value.errno == expect
            return info.value

        fresh()
        ring.client(client_map, kick_fd=kick, call_fd=call).release()
        with pytest.raises(RingOpenError) as info:  # eventfd doorbells need both fds
            ring.client(client_map, kick_fd=-1, call_fd=call)
        assert info.value.errno == errno.EINVAL

        _words(segment.map, magic=abi.RING_MAGIC ^ 1)
        assert "magic" in str(refused(errno.EBADMSG))
        fresh()
        _words(segment.map, abi_major=abi.ABI_MAJOR + 1)
        assert "ABI" in str(refused(errno.EPROTONOSUPPORT))
        fresh()
        _words(segment.map, abi_minor=abi.ABI_MINOR + 1)  # a newer minor is compatible
        ring.client(client_map, kick_fd=kick, call_fd=call).release()
        for breaks in GEOMETRY_BREAKS:
            fresh()
            _words(segment.map, **breaks)
            assert "geometry" in str(refused(errno.EINVAL)), breaks
    finally:
        client_map.close()
        segment.close()
        os.close(kick)
        os.close(call)


@pytest.mark.parametrize("name", BACKENDS)
def test_server_init_refuses_bad_geometry(name: str) -> None:
    segment = new_segment(2)
    try:
        ring = backend(name)
        for kwargs in (
            {"nslots": 3},  # larger than the segment
            {"nslots": 0},
            {"nslots": 2, "entries": 3},
            {"nslots": 2, "entries": 1},
            {"nslots": 2, "entries": 256},
            {"nslots": 2, "doorbell": 9},
        ):
            with pytest.raises(ValueError, match="geometry"):
                ring.server(segment.map, **kwargs)
    finally:
        segment.close()
