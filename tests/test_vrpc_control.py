"""vrpc.control: golden bytes, round trips and fuzz of ATTACH / ATTACHED / REFUSED and of
GUEST / GUESTRING."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpc.xdr import XdrError
from vrpc import abi
from vrpc.control import (
    ATTACH_META,
    MAX_MESSAGE,
    Attach,
    Attached,
    GuestOwner,
    GuestRequest,
    GuestRing,
    Refused,
    RefuseStatus,
    decode_attach,
    decode_guest_reply,
    decode_reply,
    decode_request,
    encode_attach,
    encode_attached,
    encode_guest_request,
    encode_guest_ring,
    encode_refused,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


ATTACH_GOLDEN = h(
    "50565241 00000001 00000000"  # "PVRA", ABI 1.0
    " 00000003 77656200"  # vm "web"
    " 00010203 04050607 08090a0b 0c0d0e0f"  # client_id
    " 00000003 746f6b00"  # token "tok"
    " 00000010 00000001"  # want_slots 16, ATTACH_META
)
ATTACHED_GOLDEN = h(
    "5056524f 00000001 00000000"  # "PVRO", ABI 1.0
    " 00000000 00000007"  # channel_id
    " 01020304 05060708"  # boot_id
    " 00000000 01102000"  # ring_size: 16 slots
    " 00000000 00000000"  # meta_size: no table
    " 00000005"  # vm_ns
    " 00000005 01020304 05000000"  # root_fh
    " 00100000 00000001"  # max_io 1 MiB, VRPC_F_FASTPATH
)
REFUSED_GOLDEN = h("50565252 00000001 00000002 6e6f0000")  # ACCES, "no"

ATTACH_MSG = Attach("web", bytes(range(16)), b"tok", 16, ATTACH_META)
ATTACHED_MSG = Attached(7, 0x0102030405060708, abi.ring_size(16), 0, 5, b"\1\2\3\4\5", 1 << 20, 1)
REFUSED_MSG = Refused(RefuseStatus.ACCES, "no")


def test_golden_bytes() -> None:
    assert encode_attach(ATTACH_MSG) == ATTACH_GOLDEN
    assert decode_attach(ATTACH_GOLDEN) == ATTACH_MSG
    assert encode_attached(ATTACHED_MSG) == ATTACHED_GOLDEN
    assert decode_reply(ATTACHED_GOLDEN) == ATTACHED_MSG
    assert ATTACHED_MSG.fd_count == 3
    assert encode_refused(REFUSED_MSG) == REFUSED_GOLDEN
    assert decode_reply(REFUSED_GOLDEN) == REFUSED_MSG


def test_decoders_reject_the_wrong_message_and_trailing_bytes() -> None:
    with pytest.raises(XdrError, match="expected ATTACH"):
        decode_attach(ATTACHED_GOLDEN)
    with pytest.raises(XdrError, match="expected ATTACHED or REFUSED"):
        decode_reply(ATTACH_GOLDEN)
    for good, decode in (
        (ATTACH_GOLDEN, decode_attach),
        (ATTACHED_GOLDEN, decode_reply),
        (REFUSED_GOLDEN, decode_reply),
    ):
        with pytest.raises(XdrError, match="trailing"):
            decode(good + b"\0\0\0\0")
        with pytest.raises(XdrError):
            decode(good[:-4])
    with pytest.raises(XdrError, match="status"):
        decode_reply(h("50565252 00000063 00000000"))
    with pytest.raises(XdrError, match="UTF-8"):
        decode_attach(ATTACH_GOLDEN.replace(h("77656200"), h("ff656200")))
    with pytest.raises(XdrError, match="exceeds"):
        decode_attach(ATTACH_GOLDEN + bytes(MAX_MESSAGE))


def test_encoders_enforce_limits() -> None:
    with pytest.raises(ValueError, match="VM name"):
        encode_attach(Attach("x" * 64, bytes(16)))
    with pytest.raises(ValueError, match="client_id"):
        encode_attach(Attach("web", bytes(15)))
    with pytest.raises(ValueError, match="token"):
        encode_attach(Attach("web", bytes(16), bytes(65)))
    with pytest.raises(ValueError, match="root handle"):
        encode_attached(Attached(1, 1, 1, 0, 1, bytes(65), 1, 0))
    with pytest.raises(ValueError, match="refusal"):
        encode_refused(Refused(RefuseStatus.BUSY, "x" * 256))
    encode_attach(Attach("é" * 31, bytes(16), bytes(64)))  # 62 bytes of UTF-8: fits


u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(max_size=63).filter(lambda s: len(s.encode()) <= 63)
attaches = st.builds(
    Attach, names, st.binary(min_size=16, max_size=16), st.binary(max_size=64), u32, u32, u32, u32
)
attacheds = st.builds(Attached, u64, u64, u64, u64, u32, st.binary(max_size=64), u32, u32, u32, u32)
refuseds = st.builds(
    Refused,
    st.sampled_from(RefuseStatus),
    st.text(max_size=255).filter(lambda s: len(s.encode()) <= 255),
)


@given(attaches)
def test_attach_round_trip(msg: Attach) -> None:
    data = encode_attach(msg)
    assert len(data) <= MAX_MESSAGE
    assert decode_attach(data) == msg


@given(st.one_of(attacheds, refuseds))
def test_reply_round_trip(msg: Attached | Refused) -> None:
    data = encode_attached(msg) if isinstance(msg, Attached) else encode_refused(msg)
    assert len(data) <= MAX_MESSAGE
    assert decode_reply(data) == msg


def _decode_all(data: bytes) -> None:
    for decode in (decode_attach, decode_reply):
        with contextlib.suppress(XdrError):  # the only exception allowed
            decode(data)


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda b: ATTACH_GOLDEN[:4] + b, st.binary(max_size=200)),
        st.builds(lambda b: ATTACHED_GOLDEN[:4] + b, st.binary(max_size=200)),
        st.builds(lambda b: REFUSED_GOLDEN[:4] + b, st.binary(max_size=300)),
    )
)
def test_fuzz_raises_only_xdr_error(data: bytes) -> None:
    _decode_all(data)


@settings(max_examples=300)
@given(
    st.sampled_from([ATTACH_GOLDEN, ATTACHED_GOLDEN, REFUSED_GOLDEN]),
    st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=4),
    st.integers(0, 80),
)
def test_mutations_raise_only_xdr_error(
    good: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(good)
    for at, value in flips:
        data[at % len(data)] = value
    _decode_all(bytes(data[: len(data) - cut % len(data)]))
    _decode_all(bytes(data))


# -- GUEST / GUESTRING (prism vm vrpc-guest) --------------------------------------------------

GUEST_GOLDEN = h(
    "50565247 00000001 00000000 00000003 77656200"  # "PVRG", ABI 1.0, vm "web"
    " 00000001 0000fffe 0000fffd"  # owner SET 65534:65533
)
GUEST_RING_GOLDEN = h(
    "5056524d"  # "PVRM"
    " 00000000 00000009"  # channel_id
    " 00000014 2f646576 2f73686d 2f702f76 6d2d332e 72696e67"  # mem_path "/dev/shm/p/vm-3.ring"
    " 00000000 00800000"  # ring_size 8 MiB
    " 00000004 00000001"  # nslots 4, created
)
GUEST_MSG = GuestRequest("web", owner=GuestOwner.SET, uid=65534, gid=65533)
GUEST_RING_MSG = GuestRing(9, "/dev/shm/p/vm-3.ring", 8 << 20, 4, True)


def test_guest_golden_bytes() -> None:
    assert encode_guest_request(GUEST_MSG) == GUEST_GOLDEN
    assert decode_request(GUEST_GOLDEN) == GUEST_MSG
    assert decode_request(ATTACH_GOLDEN) == ATTACH_MSG  # the server's one decoder of requests
    assert encode_guest_ring(GUEST_RING_MSG) == GUEST_RING_GOLDEN
    assert decode_guest_reply(GUEST_RING_GOLDEN) == GUEST_RING_MSG
    assert decode_guest_reply(REFUSED_GOLDEN) == REFUSED_MSG
    with pytest.raises(XdrError, match="expected GUESTRING or REFUSED"):
        decode_guest_reply(ATTACHED_GOLDEN)
    with pytest.raises(XdrError, match="expected ATTACHED or REFUSED"):
        decode_reply(GUEST_RING_GOLDEN)  # an ATTACH client never takes one for ATTACHED
    for good, decode in ((GUEST_GOLDEN, decode_request), (GUEST_RING_GOLDEN, decode_guest_reply)):
        with pytest.raises(XdrError, match="trailing"):
            decode(good + b"\0\0\0\0")
        with pytest.raises(XdrError):
            decode(good[:-4])


@given(
    st.builds(GuestRequest, names, u32, u32, st.sampled_from(GuestOwner), u32, u32),
    st.builds(GuestRing, u64, names, u64, u32, st.booleans()),
)
def test_guest_round_trip(request: GuestRequest, ring: GuestRing) -> None:
    assert decode_request(encode_guest_request(request)) == request
    assert decode_guest_reply(encode_guest_ring(ring)) == ring


@settings(max_examples=300)
@given(
    st.one_of(
        st.builds(lambda b: GUEST_GOLDEN[:4] + b, st.binary(max_size=120)),
        st.builds(lambda b: GUEST_RING_GOLDEN[:4] + b, st.binary(max_size=120)),
    ),
    st.sampled_from([GUEST_GOLDEN, GUEST_RING_GOLDEN]),
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=4),
)
def test_guest_fuzz_raises_only_xdr_error(
    data: bytes, good: bytes, flips: list[tuple[int, int]]
) -> None:
    mutated = bytearray(good)
    for at, value in flips:
        mutated[at % len(mutated)] = value
    for sample in (data, bytes(mutated)):
        for decode in (decode_request, decode_guest_reply):
            with contextlib.suppress(XdrError):  # the only exception allowed
                decode(sample)
