"""rpc.message: golden bytes written by hand from the RFC 5531 layout, decode errors, fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rpc.message import (
    NULL_AUTH,
    AcceptedReply,
    AcceptStat,
    AuthErrorReply,
    AuthFlavor,
    AuthStat,
    AuthSys,
    BadCredential,
    CallHeader,
    NotACall,
    OpaqueAuth,
    ProgMismatchReply,
    RpcDecodeError,
    RpcMismatchReply,
    RpcVersionMismatch,
    UndecodableReply,
    decode_call,
    decode_reply,
    encode_accepted,
    encode_auth_error,
    encode_call,
    encode_prog_mismatch,
    encode_rejected_rpc_mismatch,
    encode_reply,
)
from rpc.xdr import Unpacker, XdrError


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# NULL call to NFS (100003 = 0x186a3) v3, AUTH_NONE credential and verifier.
NULL_CALL = h("""
    0badcafe 00000000 00000002 000186a3 00000003 00000000
    00000000 00000000
    00000000 00000000
""")

# MOUNT (100005) v3 MNT "/exp" with AUTH_SYS: stamp 0x05f5e100, machinename "vm1",
# uid 1000, gid 100, gids [100, 27].
AUTH_SYS_BODY = h("05f5e100 00000003 766d3100 000003e8 00000064 00000002 00000064 0000001b")
MNT_CALL = (
    h("00000001 00000000 00000002 000186a5 00000003 00000001")
    + h("00000001 00000020")
    + AUTH_SYS_BODY
    + h("00000000 00000000")
    + h("00000004 2f657870")
)

ACCEPTED_HEAD = "0badcafe 00000001 00000000 00000000 00000000 "  # xid REPLY MSG_ACCEPTED verf


# --------------------------------------------------------------------------- golden calls


def test_null_call_golden() -> None:
    assert encode_call(0x0BADCAFE, 100003, 3, 0) == NULL_CALL
    header, args = decode_call(NULL_CALL)
    assert header == CallHeader(0x0BADCAFE, 100003, 3, 0, NULL_AUTH, NULL_AUTH, None)
    assert args == b""


def test_auth_sys_call_golden() -> None:
    cred = AuthSys(0x05F5E100, b"vm1", 1000, 100, (100, 27))
    assert cred.pack() == AUTH_SYS_BODY
    assert AuthSys.unpack(AUTH_SYS_BODY) == cred
    assert encode_call(1, 100005, 3, 1, h("00000004 2f657870"), cred.to_opaque()) == MNT_CALL
    header, args = decode_call(MNT_CALL)
    assert header.cred == OpaqueAuth(AuthFlavor.AUTH_SYS, AUTH_SYS_BODY)
    assert header.auth_sys == cred
    assert (header.xid, header.prog, header.vers, header.proc) == (1, 100005, 3, 1)
    assert args == b"\x00\x00\x00\x04/exp"


# --------------------------------------------------------------------------- golden replies

GOLDEN_REPLIES = [
    (encode_accepted(0x0BADCAFE, AcceptStat.SUCCESS, h("00000000")), ACCEPTED_HEAD + "0 00000000"),
    (encode_accepted(0x0BADCAFE, AcceptStat.PROG_UNAVAIL), ACCEPTED_HEAD + "00000001"),
    (encode_prog_mismatch(0x0BADCAFE, 2, 3), ACCEPTED_HEAD + "00000002 00000002 00000003"),
    (encode_accepted(0x0BADCAFE, AcceptStat.PROC_UNAVAIL), ACCEPTED_HEAD + "00000003"),
    (encode_accepted(0x0BADCAFE, AcceptStat.GARBAGE_ARGS), ACCEPTED_HEAD + "00000004"),
    (encode_accepted(0x0BADCAFE, AcceptStat.SYSTEM_ERR), ACCEPTED_HEAD + "00000005"),
    # xid REPLY MSG_DENIED RPC_MISMATCH low high
    (encode_rejected_rpc_mismatch(0x0BADCAFE), "0badcafe 00000001 00000001 00000000 2 2"),
    # xid REPLY MSG_DENIED AUTH_ERROR auth_stat
    (
        encode_auth_error(0x0BADCAFE, AuthStat.AUTH_BADCRED),
        "0badcafe 00000001 00000001 00000001 00000001",
    ),
    (
        encode_auth_error(0x0BADCAFE, AuthStat.AUTH_TOOWEAK),
        "0badcafe 00000001 00000001 00000001 00000005",
    ),
]


def _words(text: str) -> bytes:
    """Hex words; short ones like '2' are zero-padded to 8 digits."""
    return b"".join(bytes.fromhex(word.rjust(8, "0")) for word in text.split())


@pytest.mark.parametrize(("encoded", "expected"), GOLDEN_REPLIES)
def test_reply_golden(encoded: bytes, expected: str) -> None:
    assert encoded == _words(expected)


def test_reply_golden_with_verifier() -> None:
    verf = OpaqueAuth(AuthFlavor.AUTH_SYS, b"ab")
    expected = _words("0badcafe 00000001 00000000 00000001 00000002 61620000 00000000")
    assert encode_accepted(0x0BADCAFE, AcceptStat.SUCCESS, b"", verf) == expected
    assert decode_reply(expected) == AcceptedReply(0x0BADCAFE, AcceptStat.SUCCESS, b"", verf)


def test_decode_golden_replies() -> None:
    xid = 0x0BADCAFE
    assert decode_reply(_words(ACCEPTED_HEAD + "0 0000002a")) == AcceptedReply(
        xid, AcceptStat.SUCCESS, h("0000002a")
    )
    assert decode_reply(_words(ACCEPTED_HEAD + "2 1 3")) == ProgMismatchReply(xid, 1, 3)
    assert decode_reply(_words(ACCEPTED_HEAD + "4")) == AcceptedReply(xid, AcceptStat.GARBAGE_ARGS)
    assert decode_reply(_words("0badcafe 1 1 0 2 2")) == RpcMismatchReply(xid, 2, 2)
    assert decode_reply(_words("0badcafe 1 1 1 3")) == AuthErrorReply(xid, AuthStat.AUTH_BADVERF)


@pytest.mark.parametrize(
    "record",
    [
        "0badcafe 0 0 0 0 0",  # a CALL
        ACCEPTED_HEAD,  # no accept_stat
        ACCEPTED_HEAD + "6",  # unknown accept_stat
        ACCEPTED_HEAD + "2 1",  # truncated mismatch info
        ACCEPTED_HEAD + "3 0",  # trailing bytes after PROC_UNAVAIL
        "0badcafe 1 2",  # unknown reply_stat
        "0badcafe 1 1 7",  # unknown reject_stat
        "0badcafe 1 1 1 63",  # unknown auth_stat
    ],
)
def test_decode_reply_rejects(record: str) -> None:
    with pytest.raises(UndecodableReply):
        decode_reply(_words(record))


def test_encoders_refuse_misuse() -> None:
    with pytest.raises(ValueError):
        encode_accepted(1, AcceptStat.PROG_MISMATCH)
    with pytest.raises(ValueError):
        encode_accepted(1, AcceptStat.SYSTEM_ERR, b"body")
    with pytest.raises(ValueError):
        AuthSys(0, b"x" * 256, 0, 0).pack()
    with pytest.raises(ValueError):
        AuthSys(0, b"x", 0, 0, tuple(range(17))).pack()
    with pytest.raises(ValueError):
        encode_call(1, 2, 3, 4, cred=OpaqueAuth(1, bytes(401)))


# --------------------------------------------------------------------------- decode_call errors


def _call_head(xid: int = 7, mtype: int = 0, rpcvers: int = 2) -> bytes:
    return _words(f"{xid:08x} {mtype} {rpcvers} 186a3 3 0")


def test_not_a_call_is_dropped() -> None:
    with pytest.raises(NotACall) as info:
        decode_call(encode_accepted(7))
    assert info.value.reply is None
    assert info.value.xid == 7


@pytest.mark.parametrize("record", [b"", b"\x00\x00\x00", h("00000007 00000000"), h("07" * 23)])
def test_short_records_are_dropped(record: bytes) -> None:
    with pytest.raises(RpcDecodeError) as info:
        decode_call(record)
    assert info.value.reply is None


def test_rpc_version_mismatch_answers_2_2() -> None:
    for record in (_call_head(rpcvers=3) + h("0 0 0 0"), _words("00000007 0 3")):
        with pytest.raises(RpcVersionMismatch) as info:
            decode_call(record)
        assert info.value.reply == _words("00000007 1 1 0 2 2")


@pytest.mark.parametrize(
    ("tail", "stat"),
    [
        ("", AuthStat.AUTH_BADCRED),  # no credential at all
        ("0 00000191", AuthStat.AUTH_BADCRED),  # cred body of 401 bytes
        ("0 00000008 00000000", AuthStat.AUTH_BADCRED),  # cred body truncated
        ("1 00000004 00000000", AuthStat.AUTH_BADCRED),  # AUTH_SYS body truncated
        # AUTH_SYS with 17 gids
        ("1 00000054 0 0 0 0 11" + " 0" * 17 + " 0 0", AuthStat.AUTH_BADCRED),
        # AUTH_SYS with trailing bytes inside the body
        ("1 00000018 0 0 0 0 0 9 0 0", AuthStat.AUTH_BADCRED),
        ("0 0", AuthStat.AUTH_BADVERF),  # no verifier
        ("0 0 0 00000200", AuthStat.AUTH_BADVERF),  # verifier of 512 bytes
    ],
)
def test_bad_credentials_answer_auth_error(tail: str, stat: AuthStat) -> None:
    with pytest.raises(BadCredential) as info:
        decode_call(_call_head() + _words(tail))
    assert info.value.stat == stat
    assert info.value.reply == _words(f"00000007 1 1 1 {stat:x}")


def test_unknown_flavor_decodes() -> None:
    """Flavor policy belongs to the dispatcher; the decoder keeps the opaque_auth."""
    header, args = decode_call(_call_head() + _words("6 4 deadbeef 0 0 1"))
    assert header.cred == OpaqueAuth(6, h("deadbeef"))
    assert header.auth_sys is None
    assert args == h("00000001")


def test_decoded_credentials_are_reused_only_for_the_same_bytes() -> None:
    """decode_call remembers decoded credentials and verifiers: a call carrying the same
    credential with another verifier, or a broken one, is decoded as itself."""
    cred = AuthSys(1, b"host", 1000, 100, (100, 4)).to_opaque()
    verf = OpaqueAuth(7, h("0102030405060708"))
    first, _ = decode_call(encode_call(1, 100003, 3, 1, h("00000001"), cred))
    second, args = decode_call(encode_call(2, 100003, 3, 4, h("00000002"), cred, verf))
    assert first.verf == NULL_AUTH and first.auth_sys is not None
    assert second == CallHeader(2, 100003, 3, 4, cred, verf, first.auth_sys)
    assert args == h("00000002")
    broken = encode_call(3, 100003, 3, 1, b"", cred)[:-8] + _words("0 00000200")
    with pytest.raises(BadCredential) as info:
        decode_call(broken)
    assert info.value.stat == AuthStat.AUTH_BADVERF


@pytest.mark.parametrize("view", [bytes, memoryview])
def test_opaques_decode_with_their_padding_checked(view: type) -> None:
    u = Unpacker(view(_words("3 61626300 0") + h("00000004") + b"wxyz"))
    assert (u.unpack_opaque(3), u.unpack_opaque(), u.unpack_opaque(4)) == (b"abc", b"", b"wxyz")
    u.done()
    for data, error in [
        ("000000", "truncated: need 4 bytes at offset 0"),
        ("00000003 616263", "truncated: need 1 bytes at offset 7"),
        ("00000003 61626301", "non-zero XDR padding"),
        ("00000005 61626300", "opaque of 5 bytes is longer than the 4 left"),
        ("00000009", "opaque of 9 bytes exceeds the limit of 8"),
    ]:
        with pytest.raises(XdrError, match=error):
            Unpacker(view(h(data))).unpack_opaque(8)


# --------------------------------------------------------------------------- properties

u32s = st.integers(0, 0xFFFF_FFFF)
auth_sys = st.builds(
    AuthSys,
    u32s,
    st.binary(max_size=255),
    u32s,
    u32s,
    st.lists(u32s, max_size=16).map(tuple),
)
opaque_auth = st.builds(OpaqueAuth, u32s, st.binary(max_size=400))
accept_errors = st.sampled_from(
    [
        AcceptStat.PROG_UNAVAIL,
        AcceptStat.PROC_UNAVAIL,
        AcceptStat.GARBAGE_ARGS,
        AcceptStat.SYSTEM_ERR,
    ]
)
replies = st.one_of(
    st.builds(
        AcceptedReply, u32s, st.just(AcceptStat.SUCCESS), st.binary(max_size=64), opaque_auth
    ),
    st.builds(AcceptedReply, u32s, accept_errors, st.just(b""), opaque_auth),
    st.builds(ProgMismatchReply, u32s, u32s, u32s, opaque_auth),
    st.builds(RpcMismatchReply, u32s, u32s, u32s),
    st.builds(AuthErrorReply, u32s, st.sampled_from(AuthStat)),
)


@given(auth_sys)
def test_auth_sys_round_trip(cred: AuthSys) -> None:
    assert AuthSys.unpack(cred.pack()) == cred
    assert len(cred.to_opaque().body) <= 400


@given(replies)
def test_reply_round_trip(reply: AcceptedReply) -> None:
    assert decode_reply(encode_reply(reply)) == reply


@given(u32s, u32s, u32s, u32s, st.binary(max_size=64), auth_sys, opaque_auth)
def test_call_round_trip(
    xid: int, prog: int, vers: int, proc: int, args: bytes, cred: AuthSys, verf: OpaqueAuth
) -> None:
    header, decoded_args = decode_call(
        encode_call(xid, prog, vers, proc, args, cred.to_opaque(), verf)
    )
    assert header == CallHeader(xid, prog, vers, proc, cred.to_opaque(), verf, cred)
    assert decoded_args == args


# Random bytes, and random bytes behind a plausible header so the fuzzing reaches the
# credential, the AUTH_SYS body and the verifier.
call_like = st.one_of(
    st.binary(max_size=128),
    st.builds(lambda xid, tail: _call_head(xid) + tail, u32s, st.binary(max_size=128)),
    st.builds(
        lambda xid, n, tail: _call_head(xid) + _words(f"1 {n:x}") + tail,
        u32s,
        st.integers(0, 512),
        st.binary(max_size=128),
    ),
)


@given(call_like)
def test_decode_call_raises_only_its_own_errors(record: bytes) -> None:
    try:
        decode_call(record)
    except RpcDecodeError as exc:
        if exc.reply is not None:
            reply = decode_reply(exc.reply)
            assert isinstance(reply, RpcMismatchReply | AuthErrorReply)
            assert reply.xid == exc.xid


@given(st.one_of(st.binary(max_size=96), st.builds(lambda t: _words("1 1") + t, st.binary())))
def test_decode_reply_raises_only_its_own_errors(record: bytes) -> None:
    with contextlib.suppress(UndecodableReply):
        decode_reply(record)


@given(st.binary(max_size=400))
def test_auth_sys_unpack_raises_only_xdr_error(data: bytes) -> None:
    with contextlib.suppress(XdrError):
        AuthSys.unpack(data)
