"""NLM and NSM codecs (`prism.nlm.types`): golden bytes, round trips, bounded fuzzing.

The golden encodings are written out field by field from the XDR of the XNFS specification
(nlm4_lockargs with 64-bit offsets, nlm_lockargs with 32-bit ones, nlm4_testres's DENIED arm,
stat_chge), so a codec that swaps, widens or drops a field fails here. Random bytes must only
ever produce `XdrError`, the error the dispatcher turns into GARBAGE_ARGS.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.nlm import types as nlm_types
from prism.nlm.types import (
    LM_MAXSTRLEN,
    MAXNETOBJ_SZ,
    CancArgs,
    LockArgs,
    Mon,
    MyId,
    NlmHolder,
    NlmLock,
    NlmProc,
    NlmShare,
    NlmStat,
    Notify,
    Res,
    ShareArgs,
    ShareRes,
    SmStatRes,
    StatChge,
    UnlockArgs,
    decode,
    encode,
)
from rpc.xdr import XdrError

NlmTestArgs, NlmTestRes = nlm_types.TestArgs, nlm_types.TestRes


def xdr_opaque(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)


LOCK = NlmLock("guest1", b"\x01" * 31, b"owner", 4242, 1 << 40, 4096)
LOCK32 = NlmLock("guest1", b"\x01" * 31, b"owner", 4242, 1 << 20, 4096)


def test_lockargs_v4_golden() -> None:
    args = LockArgs(b"ck", True, True, LOCK, False, 7)
    want = (
        xdr_opaque(b"ck")
        + struct.pack(">II", 1, 1)  # block, exclusive
        + xdr_opaque(b"guest1")
        + xdr_opaque(b"\x01" * 31)
        + xdr_opaque(b"owner")
        + struct.pack(">I", 4242)
        + struct.pack(">QQ", 1 << 40, 4096)  # 64-bit offset and length
        + struct.pack(">Ii", 0, 7)  # reclaim, state
    )
    assert encode(args, wide=True) == want
    assert decode(LockArgs, want, wide=True) == args


def test_lockargs_v1_is_32_bit() -> None:
    lock = NlmLock("g", b"fh", b"o", 1, 100, 0)
    args = LockArgs(b"", False, False, lock, True, -1)
    want = (
        xdr_opaque(b"")
        + struct.pack(">II", 0, 0)
        + xdr_opaque(b"g")
        + xdr_opaque(b"fh")
        + xdr_opaque(b"o")
        + struct.pack(">III", 1, 100, 0)
        + struct.pack(">Ii", 1, -1)
    )
    assert encode(args, wide=False) == want
    assert decode(LockArgs, want, wide=False) == args
    with pytest.raises(XdrError):  # a v4 decoder reading v1 bytes runs out
        decode(LockArgs, want, wide=True)


def test_testres_denied_carries_the_holder() -> None:
    res = NlmTestRes(b"c", NlmStat.DENIED, NlmHolder(True, 9, b"oh", 0, 0))
    want = (
        xdr_opaque(b"c")
        + struct.pack(">I", 1)
        + struct.pack(">II", 1, 9)
        + xdr_opaque(b"oh")
        + struct.pack(">QQ", 0, 0)
    )
    assert encode(res) == want
    assert decode(NlmTestRes, want) == res
    granted = NlmTestRes(b"c", NlmStat.GRANTED)
    assert encode(granted) == xdr_opaque(b"c") + struct.pack(">I", 0)


def test_nsm_golden() -> None:
    assert encode(StatChge("10.0.0.1", 3)) == xdr_opaque(b"10.0.0.1") + struct.pack(">i", 3)
    mon = Mon("client", MyId("server", 100021, 4, 16), bytes(range(16)))
    want = (
        xdr_opaque(b"client")
        + xdr_opaque(b"server")
        + struct.pack(">iii", 100021, 4, 16)
        + bytes(range(16))
    )
    assert encode(mon) == want
    assert decode(Mon, want) == mon


VALUES = [
    NlmTestArgs(b"c", True, LOCK32),
    LockArgs(b"c", False, True, LOCK32, True, 3),
    CancArgs(b"c", True, False, LOCK32),
    UnlockArgs(b"c", LOCK32),
    Res(b"c", NlmStat.BLOCKED),
    NlmTestRes(b"c", NlmStat.DENIED, NlmHolder(False, 1, b"", 5, 6)),
    ShareArgs(b"c", NlmShare("g", b"fh", b"oh", 2, 3), False),
    ShareRes(b"c", NlmStat.GRANTED, 0),
    Notify("g", 5),
    SmStatRes(0, 5),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("wide", [True, False])
def test_round_trip_and_truncation(value: object, wide: bool) -> None:
    data = encode(value, wide)  # type: ignore[arg-type]
    assert decode(type(value), data, wide) == value or isinstance(value, SmStatRes)
    for cut in range(len(data)):
        with pytest.raises(XdrError):
            decode(type(value), data[:cut], wide)
    with pytest.raises(XdrError):
        decode(type(value), data + b"\0\0\0\0", wide)


def test_limits() -> None:
    too_long = NlmLock("x" * (LM_MAXSTRLEN + 1), b"", b"", 0, 0, 0)
    with pytest.raises(XdrError, match="limit"):
        decode(NlmTestArgs, encode(NlmTestArgs(b"", False, too_long)))
    big_oh = NlmLock("x", b"", b"o" * (MAXNETOBJ_SZ + 1), 0, 0, 0)
    with pytest.raises(XdrError, match="limit"):
        decode(NlmTestArgs, encode(NlmTestArgs(b"", False, big_oh)))
    with pytest.raises(XdrError):
        decode(Res, xdr_opaque(b"") + struct.pack(">I", 77))  # no such status
    bad_share = encode(ShareArgs(b"", NlmShare("g", b"", b"", 0, 0), False))
    bad_share = bad_share.replace(
        struct.pack(">II", 0, 0) + struct.pack(">I", 0), struct.pack(">III", 9, 0, 0), 1
    )
    with pytest.raises(XdrError):
        decode(ShareArgs, bad_share)


ARG_TYPES = [
    NlmTestArgs,
    LockArgs,
    CancArgs,
    UnlockArgs,
    ShareArgs,
    Notify,
    Mon,
    StatChge,
    NlmTestRes,
]


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200), kind=st.sampled_from(ARG_TYPES), wide=st.booleans())
def test_fuzz_only_xdr_errors(data: bytes, kind: type, wide: bool) -> None:
    with contextlib.suppress(XdrError):
        decode(kind, data, wide)


@settings(max_examples=200, deadline=None)
@given(
    base=st.sampled_from(VALUES[:4]),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
)
def test_fuzz_mutated_valid_messages(base: object, flips: list[tuple[int, int]]) -> None:
    data = bytearray(encode(base))  # type: ignore[arg-type]
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    with contextlib.suppress(XdrError):
        decode(type(base), bytes(data))


@given(st.binary(max_size=40), st.sampled_from(list(NlmStat)), st.booleans())
def test_nlm_status_reads_the_status_after_any_cookie(
    cookie: bytes, stat: NlmStat, wide: bool
) -> None:
    """`nlm_status` (the dispatcher's error count) finds the status behind a cookie of any
    length (netobj padding included) in every result that has one; GRANTED and the void
    results are no error."""
    want = None if stat == NlmStat.GRANTED else stat.name
    holder = NlmHolder(True, 7, b"owner", 0, 10) if stat == NlmStat.DENIED else None
    for result in (
        Res(cookie, stat),
        nlm_types.TestRes(cookie, stat, holder),
        ShareRes(cookie, stat, 7),
    ):
        assert nlm_types.nlm_status(NlmProc.LOCK, encode(result, wide)) == want
    assert nlm_types.nlm_status(NlmProc.LOCK_MSG, b"") is None
