"""Record marking for RPC over byte streams (RFC 5531 section 11), sans-IO.

Theory of operation: on a stream, a record (one RPC message) is sent as one or more
fragments. Each fragment is a 4-byte big-endian header followed by its data; the header's
top bit marks the record's last fragment and its low 31 bits give the fragment's length.
Zero-length fragments are legal.

`RecordReader.feed(data)` accepts bytes exactly as they came off the socket (split at any
byte) and returns the records it completed. It copies each data byte once into the record
being assembled (a single-fragment record that arrives in one piece is sliced out directly,
and a read that is exactly one such record, the usual case, before any other work) and
holds at most 3 bytes of an incomplete fragment header, so buffering is O(bytes) and a
record costs at most `max_record_size` bytes of memory. Work is O(bytes + fragments), and a
record may have at most `max_fragments` fragments, so a peer cannot make the reader spin on
empty or 1-byte fragments. `receive(data, max_fragments)` is the same with a budget: it
parses at most that many fragment headers and says how many bytes it consumed, so that a
transport can bound the work one connection gets per turn of its event loop.

The stream breaks as soon as a fragment header would take the record past
`max_record_size` (before any of that fragment's data is buffered) or past `max_fragments`:
the reader raises a `RecordStreamError` whose `records` are the records completed before
the break (their calls deserve replies), and raises it again on every later call. The
transport then stops reading that connection, since the stream cannot be resynchronised.
`frame(record)` produces the bytes to send.
"""

from __future__ import annotations

import struct
from typing import NoReturn

from rpc.errors import RemoteProtocolError

LAST_FRAGMENT = 0x8000_0000
"""Top bit of a fragment header: this fragment ends the record."""
MAX_FRAGMENT_SIZE = 0x7FFF_FFFF
"""Largest length a fragment header can express."""
MAX_RECORD_SIZE = 1024 * 1024 + 64 * 1024
"""Default record limit: an NFS WRITE or READ of 1 MiB plus its RPC and NFS headers."""
MAX_FRAGMENTS = 1024
"""Default limit on fragments per record. Clients send one fragment per record (Linux) or
one per 64 KiB (libtirpc: 17 for a 1 MiB WRITE); the limit bounds the headers a peer can
make the reader parse for one record (empty fragments carry no data)."""
UDP_MAX_PAYLOAD = 65507
"""Largest UDP payload over IPv4 (65535 - 20 byte IP header - 8 byte UDP header)."""

_HEADER = struct.Struct(">I")


class RecordStreamError(RemoteProtocolError):
    """The peer broke record marking; the stream cannot be resynchronised.

    `records` holds the records that the failing call completed before the break."""

    records: list[bytes]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.records = []


class RecordTooLarge(RecordStreamError):
    """A record's fragments add up to more than the reader's limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"record of at least {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class TooManyFragments(RecordStreamError):
    """A record has more fragments than the reader's limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"record of more than {limit} fragments")
        self.limit = limit


class RecordReader:
    """Reassembles records from a byte stream; see the module docstring."""

    __slots__ = (
        "_failed",
        "_frag_left",
        "_fragments",
        "_header",
        "_last",
        "_record",
        "max_fragments",
        "max_record_size",
    )

    def __init__(
        self, max_record_size: int = MAX_RECORD_SIZE, max_fragments: int = MAX_FRAGMENTS
    ) -> None:
        if max_record_size < 0:
            raise ValueError("max_record_size must be >= 0")
        if max_fragments < 1:
            raise ValueError("max_fragments must be >= 1")
        self.max_record_size = max_record_size
        self.max_fragments = max_fragments
        self._header = bytearray()  # 0-3 bytes of an incomplete fragment header
        self._record = bytearray()  # data of the record being assembled
        self._frag_left = -1  # data bytes still due in the current fragment; -1: need header
        self._fragments = 0  # fragments of the record being assembled, so far
        self._last = False  # the current fragment ends the record
        self._failed: RecordStreamError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete record (headers excluded)."""
        return len(self._record)

    @property
    def in_record(self) -> bool:
        """True when some bytes of an incomplete record have been consumed."""
        return bool(self._header) or self._frag_left >= 0 or self._fragments > 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume all of `data`; return the records it completed, in order."""
        return self.receive(data)[0]

    def receive(
        self, data: bytes | bytearray | memoryview, max_fragments: int | None = None
    ) -> tuple[list[bytes], int]:
        """Consume `data`, parsing at most `max_fragments` fragment headers (None: no
        limit); return the records completed and the number of bytes consumed. Bytes not
        consumed are to be passed again, first, to the next call."""
        if self._failed is not None:
            self._failed.records = []
            raise self._failed
        if self._frag_left < 0 and not self._fragments and not self._header:
            # The usual read: exactly one whole single-fragment record.
            n = len(data)
            if (
                n >= 4
                and max_fragments != 0
                and _HEADER.unpack_from(data)[0] == (n - 4) | LAST_FRAGMENT
                and n - 4 <= self.max_record_size
                and (type(data) is not memoryview or data.itemsize == 1)
            ):
                return [bytes(data[4:])], n
        records: list[bytes] = []
        with memoryview(data) as view:
            try:
                used = self._feed(
                    view.cast("B") if view.format != "B" else view,
                    records,
                    -1 if max_fragments is None else max_fragments,
                )
            except RecordStreamError as exc:
                exc.records = records
                raise
        return records, used

    def _feed(self, view: memoryview, records: list[bytes], budget: int) -> int:
        pos, end = 0, len(view)
        while pos < end:
            if self._frag_left < 0:
                if budget == 0:
                    break
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
                budget -= 1
                self._start_fragment(word)
                if self._frag_left == 0:
                    self._end_fragment(records)
                    continue
                # A whole single-fragment record inside `data`: slice it out with one copy.
                if self._last and not self._record and end - pos >= self._frag_left:
                    records.append(bytes(view[pos : pos + self._frag_left]))
                    pos += self._frag_left
                    self._frag_left = -1
                    self._fragments = 0
                    continue
            take = min(self._frag_left, end - pos)
            self._record += view[pos : pos + take]
            pos += take
            self._frag_left -= take
            if self._frag_left == 0:
                self._end_fragment(records)
        return pos

    def _start_fragment(self, word: int) -> None:
        length = word & MAX_FRAGMENT_SIZE
        total = len(self._record) + length
        if total > self.max_record_size:
            self._fail(RecordTooLarge(total, self.max_record_size))
        self._fragments += 1
        if self._fragments > self.max_fragments:
            self._fail(TooManyFragments(self.max_fragments))
        self._last = bool(word & LAST_FRAGMENT)
        self._frag_left = length

    def _fail(self, exc: RecordStreamError) -> NoReturn:
        self._failed = exc
        self._record = bytearray()
        raise exc

    def _end_fragment(self, records: list[bytes]) -> None:
        self._frag_left = -1
        if self._last:
            records.append(bytes(self._record))
            self._record.clear()
            self._fragments = 0


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
