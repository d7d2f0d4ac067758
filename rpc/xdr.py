"""XDR (RFC 4506) encoding and decoding, with no I/O.

Theory of operation: a `Packer` appends big-endian 4-byte-aligned items to a buffer; an
`Unpacker` walks a bytes-like object and raises `XdrError` (and only `XdrError`) on any
malformed input: truncation, bad padding, a length larger than the bytes left or than the
caller's declared maximum, or an out-of-range boolean. Decoders built on top of it therefore
turn hostile input into one well-defined error that the RPC layer maps to GARBAGE_ARGS.
"""

from __future__ import annotations

import struct

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")

_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")
"""Padding of n bytes, by n."""


class XdrError(ValueError):
    """The peer sent bytes that are not valid XDR for the expected type."""


class Packer:
    """Append-only XDR encoder."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def pack_uint(self, value: int) -> None:
        self._parts.append(_U32.pack(value))

    def pack_int(self, value: int) -> None:
        self._parts.append(_I32.pack(value))

    def pack_enum(self, value: int) -> None:
        self._parts.append(_I32.pack(value))

    def pack_bool(self, value: bool) -> None:
        self._parts.append(_U32.pack(1 if value else 0))

    def pack_uhyper(self, value: int) -> None:
        self._parts.append(_U64.pack(value))

    def pack_hyper(self, value: int) -> None:
        self._parts.append(_I64.pack(value))

    def pack_fopaque(self, size: int, data: bytes) -> None:
        """Fixed-length opaque: exactly `size` bytes plus padding."""
        if len(data) != size:
            raise ValueError(f"fixed opaque needs {size} bytes, got {len(data)}")
        self._parts.append(bytes(data))
        self._parts.append(_PAD[size & 3])

    def pack_opaque(self, data: bytes) -> None:
        """Variable-length opaque: length, bytes, padding."""
        n = len(data)
        self._parts.append(_U32.pack(n))
        self._parts.append(bytes(data))
        self._parts.append(_PAD[n & 3])

    pack_string = pack_opaque

    def pack_raw(self, data: bytes) -> None:
        """Append already-encoded XDR bytes (must be 4-byte aligned)."""
        self._parts.append(bytes(data))

    def get_buffer(self) -> bytes:
        return b"".join(self._parts)


class Unpacker:
    """Bounds-checked XDR decoder over an immutable buffer."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self._data = data
        self._pos = pos

    @property
    def position(self) -> int:
        return self._pos

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise XdrError(f"truncated: need {n} bytes at offset {self._pos}")
        chunk = bytes(self._data[self._pos : end])
        self._pos = end
        return chunk

    def unpack_uint(self) -> int:
        pos = self._pos
        if pos + 4 > len(self._data):
            raise XdrError(f"truncated: need 4 bytes at offset {pos}")
        self._pos = pos + 4
        return _U32.unpack_from(self._data, pos)[0]

    def unpack_int(self) -> int:
        pos = self._pos
        if pos + 4 > len(self._data):
            raise XdrError(f"truncated: need 4 bytes at offset {pos}")
        self._pos = pos + 4
        return _I32.unpack_from(self._data, pos)[0]

    unpack_enum = unpack_int

    def unpack_bool(self) -> bool:
        value = self.unpack_uint()
        if value > 1:
            raise XdrError(f"boolean must be 0 or 1, got {value}")
        return value == 1

    def unpack_uhyper(self) -> int:
        pos = self._pos
        if pos + 8 > len(self._data):
            raise XdrError(f"truncated: need 8 bytes at offset {pos}")
        self._pos = pos + 8
        return _U64.unpack_from(self._data, pos)[0]

    def unpack_hyper(self) -> int:
        pos = self._pos
        if pos + 8 > len(self._data):
            raise XdrError(f"truncated: need 8 bytes at offset {pos}")
        self._pos = pos + 8
        return _I64.unpack_from(self._data, pos)[0]

    def _skip_padding(self, n: int) -> None:
        pad = (-n) & 3
        if pad and self._take(pad) != b"\0" * pad:
            raise XdrError("non-zero XDR padding")

    def unpack_fopaque(self, size: int) -> bytes:
        data = self._take(size)
        self._skip_padding(size)
        return data

    def unpack_opaque(self, max_len: int | None = None) -> bytes:
        # (one method, no helpers: every handle, name and payload is an opaque)
        buf, pos = self._data, self._pos
        size = len(buf)
        if pos + 4 > size:
            raise XdrError(f"truncated: need 4 bytes at offset {pos}")
        n = _U32.unpack_from(buf, pos)[0]
        if max_len is not None and n > max_len:
            raise XdrError(f"opaque of {n} bytes exceeds the limit of {max_len}")
        start = pos + 4
        end = start + n
        if end > size:
            raise XdrError(f"opaque of {n} bytes is longer than the {size - start} left")
        padded = (end + 3) & ~3
        if padded != end:
            if padded > size:
                raise XdrError(f"truncated: need {padded - end} bytes at offset {end}")
            if buf[end:padded] != _ZEROS[padded - end]:
                raise XdrError("non-zero XDR padding")
        self._pos = padded
        return bytes(buf[start:end])

    unpack_string = unpack_opaque

    def unpack_array_length(self, max_len: int) -> int:
        n = self.unpack_uint()
        if n > max_len:
            raise XdrError(f"array of {n} items exceeds the limit of {max_len}")
        return n

    def rest(self) -> bytes:
        """All bytes not yet consumed (e.g. procedure arguments after an RPC header)."""
        data = bytes(self._data[self._pos :])
        self._pos = len(self._data)
        return data

    def done(self) -> None:
        """Raise unless every byte was consumed."""
        if self._pos != len(self._data):
            raise XdrError(f"{len(self._data) - self._pos} unexpected trailing bytes")
