"""Record marking for RPC over byte streams (RFC 5531 section 11), sans-IO.

Theory of operation: on a stream, a record (one RPC message) is sent as one or more
fragments. Each fragment is a 4-byte big-endian header followed by its data; the header's
top bit marks the record's last fragment and its low 31 bits give the fragment's length.
Zero-length fragments are legal.

`RecordReader.feed(data)` accepts bytes exactly as they came off the socket (split at any
byte) and returns the records it completed. It copies each data byte once into the record
being assembled (a single-fragment record that arrives in one piece is sliced out directly)
and holds at most 3 bytes of an incomplete fragment header, so buffering is O(bytes) and a
record costs at most `max_record_size` bytes of memory. As soon as a fragment header would
take the record past `max_record_size` it raises `RecordTooLarge`, before any of that
fragment's data is buffered: the transport then closes the connection, since the stream
cannot be resynchronised. `frame(record)` produces the bytes to send.
"""

from __future__ import annotations

import struct

from rpc.errors import RemoteProtocolError

LAST_FRAGMENT = 0x8000_0000
"""Top bit of a fragment header: this fragment ends the record."""
MAX_FRAGMENT_SIZE = 0x7FFF_FFFF
"""Largest length a fragment header can express."""
MAX_RECORD_SIZE = 1024 * 1024 + 64 * 1024
"""Default record limit: an NFS WRITE or READ of 1 MiB plus its RPC and NFS headers."""
UDP_MAX_PAYLOAD = 65507
"""Largest UDP payload over IPv4 (65535 - 20 byte IP header - 8 byte UDP header)."""

_HEADER = struct.Struct(">I")


class RecordTooLarge(RemoteProtocolError):
    """A record's fragments add up to more than the reader's limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"record of at least {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class RecordReader:
    """Reassembles records from a byte stream; see the module docstring."""

    __slots__ = ("_failed", "_frag_left", "_header", "_last", "_record", "max_record_size")

    def __init__(self, max_record_size: int = MAX_RECORD_SIZE) -> None:
        if max_record_size < 0:
            raise ValueError("max_record_size must be >= 0")
        self.max_record_size = max_record_size
        self._header = bytearray()  # 0-3 bytes of an incomplete fragment header
        self._record = bytearray()  # data of the record being assembled
        self._frag_left = -1  # data bytes still due in the current fragment; -1: need header
        self._last = False  # the current fragment ends the record
        self._failed: RecordTooLarge | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete record (headers excluded)."""
        return len(self._record)

    @property
    def in_record(self) -> bool:
        """True when some bytes of an incomplete record have been consumed."""
        return bool(self._header) or self._frag_left >= 0 or bool(self._record)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume `data`; return the records it completed, in order."""
        if self._failed is not None:
            raise self._failed
        with memoryview(data) as view:
            return self._feed(view.cast("B") if view.format != "B" else view)

    def _feed(self, view: memoryview) -> list[bytes]:
        records: list[bytes] = []
        pos, end = 0, len(view)
        while pos < end:
            if self._frag_left < 0:
                if self._header or end - pos < 4:
                    take = min(4 - len(self._header), end - pos)
                    self._header += view[pos : pos + take]
                    pos += take
                    if len(self._header) < 4:
                        break
                    word = _HEADER.unpack(self._header)[0]
                    self._header.clear()
                else:
                    word = _HEADER.unpack_from(view, pos)[0]
                    pos += 4
                self._start_fragment(word)
                if self._frag_left == 0:
                    self._end_fragment(records)
                    continue
                # A whole single-fragment record inside `data`: slice it out with one copy.
                if self._last and not self._record and end - pos >= self._frag_left:
                    records.append(bytes(view[pos : pos + self._frag_left]))
                    pos += self._frag_left
                    self._frag_left = -1
                    continue
            take = min(self._frag_left, end - pos)
            self._record += view[pos : pos + take]
            pos += take
            self._frag_left -= take
            if self._frag_left == 0:
                self._end_fragment(records)
        return records

    def _start_fragment(self, word: int) -> None:
        length = word & MAX_FRAGMENT_SIZE
        total = len(self._record) + length
        if total > self.max_record_size:
            self._failed = RecordTooLarge(total, self.max_record_size)
            self._record = bytearray()
            raise self._failed
        self._last = bool(word & LAST_FRAGMENT)
        self._frag_left = length

    def _end_fragment(self, records: list[bytes]) -> None:
        self._frag_left = -1
        if self._last:
            records.append(bytes(self._record))
            self._record.clear()


def record_marker(length: int, last: bool = True) -> bytes:
    """The 4-byte header of one fragment."""
    if not 0 <= length <= MAX_FRAGMENT_SIZE:
        raise ValueError(f"fragment length {length} out of range")
    return _HEADER.pack(length | (LAST_FRAGMENT if last else 0))


def frame(record: bytes, max_fragment: int = MAX_FRAGMENT_SIZE) -> bytes:
    """Record-mark `record` for a stream, in fragments of at most `max_fragment` bytes."""
    if not 1 <= max_fragment <= MAX_FRAGMENT_SIZE:
        raise ValueError(f"max_fragment must be in 1..{MAX_FRAGMENT_SIZE}")
    n = len(record)
    if n <= max_fragment:
        return _HEADER.pack(n | LAST_FRAGMENT) + record
    parts: list[bytes] = []
    view = memoryview(record)
    for start in range(0, n, max_fragment):
        chunk = view[start : start + max_fragment]
        parts.append(_HEADER.pack(len(chunk) | (LAST_FRAGMENT if start + max_fragment >= n else 0)))
        parts.append(chunk.tobytes())
    return b"".join(parts)
