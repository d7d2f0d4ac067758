"""rpc.record: record marking (RFC 5531 section 11)."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rpc.record import (
    MAX_FRAGMENTS,
    MAX_RECORD_SIZE,
    RecordReader,
    RecordStreamError,
    RecordTooLarge,
    TooManyFragments,
    frame,
    record_marker,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def test_limits() -> None:
    assert MAX_RECORD_SIZE >= 1024 * 1024 + 200  # a 1 MiB NFS WRITE plus headers fits


def test_frame_golden() -> None:
    assert frame(b"abcd") == h("80000004 61626364")
    assert frame(b"") == h("80000000")
    assert frame(b"abcdef", max_fragment=4) == h("00000004 61626364 80000002 6566")
    assert frame(b"abcdefgh", max_fragment=4) == h("00000004 61626364 80000004 65666768")
    assert record_marker(5, last=False) == h("00000005")
    with pytest.raises(ValueError):
        frame(b"x", max_fragment=0)


def test_single_record() -> None:
    assert RecordReader().feed(h("80000004 61626364")) == [b"abcd"]


def test_multi_fragment_with_zero_length_fragments() -> None:
    stream = h("00000000 00000003 616263 00000000 80000002 6465")
    assert RecordReader().feed(stream) == [b"abcde"]


def test_empty_record() -> None:
    assert RecordReader().feed(h("80000000 80000001 7a")) == [b"", b"z"]


def test_several_records_in_one_feed_and_a_partial_tail() -> None:
    reader = RecordReader()
    stream = frame(b"one") + frame(b"two", max_fragment=2) + frame(b"three")
    assert reader.feed(stream + h("8000")) == [b"one", b"two", b"three"]
    assert reader.in_record
    assert reader.feed(h("0001 21")) == [b"!"]
    assert not reader.in_record


def test_byte_by_byte() -> None:
    records = [b"alpha", b"", b"b" * 37, bytes(range(256))]
    stream = b"".join(frame(r, max_fragment=7) for r in records)
    reader = RecordReader()
    out: list[bytes] = []
    for i in range(len(stream)):
        out.extend(reader.feed(stream[i : i + 1]))
    assert out == records
    assert reader.buffered == 0


def test_accepts_bytearray_and_memoryview() -> None:
    data = bytearray(frame(b"xyz"))
    assert RecordReader().feed(data) == [b"xyz"]
    data += b"more"  # the reader must not hold an export of the caller's buffer
    assert RecordReader().feed(memoryview(frame(b"q"))) == [b"q"]


def test_record_of_exactly_the_limit() -> None:
    reader = RecordReader(max_record_size=10)
    assert reader.feed(frame(b"0123456789", max_fragment=3)) == [b"0123456789"]


def test_one_whole_record_per_read() -> None:
    """A read holding exactly one whole single-fragment record (the usual case, taken
    without the general parse) obeys the same limits and leaves the reader ready."""
    reader = RecordReader(max_record_size=10)
    assert reader.receive(frame(b"0123456789"), 1) == ([b"0123456789"], 14)
    assert reader.receive(memoryview(frame(b"")), None) == ([b""], 4)
    assert reader.receive(frame(b"abc"), 0) == ([], 0)  # no budget: nothing parsed
    assert not reader.in_record
    words = memoryview(frame(b"wxyz")).cast("I")  # items of 4 bytes: still bytes read
    assert reader.feed(words) == [b"wxyz"]
    with pytest.raises(RecordTooLarge) as info:
        reader.feed(frame(b"0123456789a"))
    assert info.value.records == [] and info.value.size == 11


def test_too_large_is_raised_from_the_header_alone() -> None:
    reader = RecordReader(max_record_size=1000)
    with pytest.raises(RecordTooLarge) as info:
        reader.feed(h("800003e9"))  # 1001 bytes declared, none sent
    assert info.value.size == 1001 and info.value.limit == 1000
    assert reader.buffered == 0
    with pytest.raises(RecordTooLarge):  # the stream cannot be resynchronised
        reader.feed(frame(b"ok"))


def test_too_large_across_fragments() -> None:
    reader = RecordReader(max_record_size=1000)
    assert reader.feed(h("000001f4") + bytes(500)) == []  # 500 bytes, not last
    assert reader.buffered == 500
    with pytest.raises(RecordTooLarge):
        reader.feed(h("800001f5"))  # 501 more: 1001 in all


def test_huge_declared_size_with_default_limit() -> None:
    with pytest.raises(RecordTooLarge):
        RecordReader().feed(h("ffffffff"))


def test_buffering_is_linear() -> None:
    """8 MiB in 512-byte pieces: quadratic re-slicing would copy tens of GiB here."""
    size = 8 * 1024 * 1024
    stream = frame(bytes(size), max_fragment=1024 * 1024)
    reader = RecordReader(max_record_size=size)
    start = time.perf_counter()
    out: list[bytes] = []
    view = memoryview(stream)
    for i in range(0, len(stream), 512):
        out.extend(reader.feed(view[i : i + 512]))
    assert time.perf_counter() - start < 5.0
    assert len(out) == 1 and len(out[0]) == size


def test_fragments_per_record_are_bounded() -> None:
    assert MAX_FRAGMENTS >= 17  # libtirpc sends a 1 MiB WRITE in 17 fragments of 64 KiB
    reader = RecordReader(max_fragments=4)
    assert reader.feed(frame(b"abcd", max_fragment=1)) == [b"abcd"]  # 4 fragments: fine
    assert reader.feed(h("00000000") * 3 + h("80000001 7a")) == [b"z"]  # empty ones count
    with pytest.raises(TooManyFragments):
        reader.feed(h("00000000") * 5)  # endless empty fragments end at the limit
    with pytest.raises(TooManyFragments):
        reader.feed(frame(b"ok"))


def test_records_before_a_break_are_kept() -> None:
    reader = RecordReader(max_record_size=100)
    with pytest.raises(RecordStreamError) as info:
        reader.feed(frame(b"one") + frame(b"two") + b"GET / HTTP/1.1\r\n")
    assert info.value.records == [b"one", b"two"]
    with pytest.raises(RecordStreamError) as info:
        reader.feed(frame(b"three"))
    assert info.value.records == []


def test_receive_parses_at_most_its_budget_of_headers() -> None:
    stream = h("00000000") * 10 + h("80000001 21") + frame(b"xyz")
    reader = RecordReader()
    records, used = reader.receive(stream, 4)
    assert (records, used) == ([], 16)
    records, used = reader.receive(memoryview(stream)[16:], 7)
    assert records == [b"!"] and used == len(stream) - 16 - len(frame(b"xyz"))
    assert reader.receive(frame(b"xyz"), 1) == ([b"xyz"], len(frame(b"xyz")))


@given(
    st.lists(st.binary(max_size=50), max_size=8),
    st.integers(1, 7),
    st.integers(1, 5),
)
def test_receive_in_budgets_equals_feed(
    records: list[bytes], max_fragment: int, budget: int
) -> None:
    stream = memoryview(b"".join(frame(r, max_fragment=max_fragment) for r in records))
    reader = RecordReader()
    out: list[bytes] = []
    while stream:
        got, used = reader.receive(stream, budget)
        assert used > 0
        out += got
        stream = stream[used:]
    assert out == records


@given(st.binary(max_size=512), st.integers(0, 2000), st.integers(1, 8))
def test_random_bytes_raise_only_stream_errors(data: bytes, limit: int, fragments: int) -> None:
    reader = RecordReader(max_record_size=limit, max_fragments=fragments)
    try:
        for record in reader.feed(data):
            assert len(record) <= limit
    except (RecordTooLarge, TooManyFragments) as exc:
        assert all(len(r) <= limit for r in exc.records)


@given(
    st.lists(st.binary(max_size=300), max_size=8),
    st.integers(1, 64),
    st.lists(st.integers(0, 4000), max_size=20),
)
def test_round_trip_split_anywhere(
    records: list[bytes], max_fragment: int, cuts: list[int]
) -> None:
    stream = b"".join(frame(r, max_fragment=max_fragment) for r in records)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    reader = RecordReader(max_record_size=300)
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out.extend(reader.feed(stream[a:b]))
    assert out == records
    assert not reader.in_record
