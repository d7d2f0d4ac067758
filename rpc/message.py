"""ONC-RPC v2 messages (RFC 5531), sans-IO.

Theory of operation: a record (one complete RPC message, already unframed by `rpc.record`)
is either a CALL or a REPLY:

    rpc_msg   = xid, msg_type, body
    CALL      = rpcvers(=2), prog, vers, proc, cred: opaque_auth, verf: opaque_auth, args...
    REPLY     = MSG_ACCEPTED verf accept_stat [results | low high]
              | MSG_DENIED   (RPC_MISMATCH low high | AUTH_ERROR auth_stat)
    opaque_auth = flavor, opaque body<400>

Server side, `decode_call` turns a record into a `CallHeader` plus the still-encoded
procedure arguments. When the header itself is bad it raises a `RpcDecodeError` subclass
that already carries the right answer: `RpcVersionMismatch` (reply RPC_MISMATCH 2..2),
`BadCredential` (reply AUTH_ERROR with AUTH_BADCRED or AUTH_BADVERF), or
`UndecodableCall` / `NotACall` (no reply is possible: `reply is None`, drop the record; a
stream transport closes the connection, as Linux's sunrpc does). The `encode_*` functions
build every reply kind. Client side, `encode_call` and `decode_reply` are the mirror
image; `decode_reply` returns one of four frozen reply types (`Reply`).

Decoders raise only `XdrError` (bodies such as `AuthSys.unpack`) or `RpcDecodeError`
(whole messages), never anything else, whatever bytes they are given.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from rpc.errors import RemoteProtocolError
from rpc.xdr import Packer, Unpacker, XdrError

RPC_VERSION = 2
"""The only ONC-RPC protocol version (`rpcvers`)."""
MAX_AUTH_BYTES = 400
"""opaque_auth bodies are at most 400 bytes (RFC 5531 section 8.2)."""
MAX_MACHINENAME = 255
"""authsys_parms.machinename<255>."""
MAX_AUTH_SYS_GIDS = 16
"""authsys_parms.gids<16>."""


class MsgType(IntEnum):
    CALL = 0
    REPLY = 1


class ReplyStat(IntEnum):
    MSG_ACCEPTED = 0
    MSG_DENIED = 1


class AcceptStat(IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


class RejectStat(IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class AuthStat(IntEnum):
    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5
    AUTH_INVALIDRESP = 6
    AUTH_FAILED = 7
    AUTH_KERB_GENERIC = 8
    AUTH_TIMEEXPIRE = 9
    AUTH_TKT_FILE = 10
    AUTH_DECODE = 11
    AUTH_NET_ADDR = 12
    RPCSEC_GSS_CREDPROBLEM = 13
    RPCSEC_GSS_CTXPROBLEM = 14


class AuthFlavor(IntEnum):
    AUTH_NONE = 0
    AUTH_SYS = 1
    AUTH_SHORT = 2
    AUTH_DH = 3
    RPCSEC_GSS = 6


# --------------------------------------------------------------------------- errors


class RpcDecodeError(RemoteProtocolError):
    """A record is not a message we can act on.

    `xid` is the transaction id when it could be read; `reply` is the complete reply record
    to send back, or None when no reply is possible (drop it).
    """

    def __init__(self, message: str, *, xid: int | None = None, reply: bytes | None = None):
        super().__init__(message)
        self.xid = xid
        self.reply = reply


class UndecodableCall(RpcDecodeError):
    """The call header is truncated or malformed before the credential: drop it."""


class NotACall(RpcDecodeError):
    """The record is a REPLY (or an unknown msg_type) sent to a server: drop it."""


class RpcVersionMismatch(RpcDecodeError):
    """rpcvers is not 2: answer MSG_DENIED / RPC_MISMATCH (low=2, high=2)."""

    def __init__(self, xid: int, rpcvers: int) -> None:
        super().__init__(
            f"RPC version {rpcvers} is not supported (only {RPC_VERSION})",
            xid=xid,
            reply=encode_rejected_rpc_mismatch(xid),
        )
        self.rpcvers = rpcvers


class BadCredential(RpcDecodeError):
    """The credential or verifier is malformed: answer MSG_DENIED / AUTH_ERROR."""

    def __init__(self, xid: int, stat: AuthStat, detail: str) -> None:
        super().__init__(f"{stat.name}: {detail}", xid=xid, reply=encode_auth_error(xid, stat))
        self.stat = stat


class UndecodableReply(RpcDecodeError):
    """A record received by a client is not a valid RPC reply."""


# --------------------------------------------------------------------------- wire types


@dataclass(frozen=True, slots=True)
class OpaqueAuth:
    """opaque_auth: a flavor (any uint, not only the known `AuthFlavor`s) and its body."""

    flavor: int
    body: bytes = b""

    def pack(self, p: Packer) -> None:
        if len(self.body) > MAX_AUTH_BYTES:
            raise ValueError(f"auth body of {len(self.body)} bytes exceeds {MAX_AUTH_BYTES}")
        p.pack_uint(self.flavor)
        p.pack_opaque(self.body)

    @classmethod
    def unpack(cls, u: Unpacker) -> OpaqueAuth:
        flavor = u.unpack_uint()
        return cls(flavor, u.unpack_opaque(MAX_AUTH_BYTES))


NULL_AUTH = OpaqueAuth(AuthFlavor.AUTH_NONE, b"")
"""AUTH_NONE with an empty body: the verifier of every reply Prism sends."""


@dataclass(frozen=True, slots=True)
class AuthSys:
    """authsys_parms, the AUTH_SYS (AUTH_UNIX) credential body."""

    stamp: int
    machinename: bytes
    uid: int
    gid: int
    gids: tuple[int, ...] = ()

    def pack(self) -> bytes:
        if len(self.machinename) > MAX_MACHINENAME:
            raise ValueError(f"machinename exceeds {MAX_MACHINENAME} bytes")
        if len(self.gids) > MAX_AUTH_SYS_GIDS:
            raise ValueError(f"AUTH_SYS carries at most {MAX_AUTH_SYS_GIDS} gids")
        p = Packer()
        p.pack_uint(self.stamp)
        p.pack_string(self.machinename)
        p.pack_uint(self.uid)
        p.pack_uint(self.gid)
        p.pack_uint(len(self.gids))
        for gid in self.gids:
            p.pack_uint(gid)
        return p.get_buffer()

    @classmethod
    def unpack(cls, data: bytes) -> AuthSys:
        """Decode a credential body; raises only `XdrError` (including on trailing bytes)."""
        u = Unpacker(data)
        stamp = u.unpack_uint()
        machinename = u.unpack_string(MAX_MACHINENAME)
        uid = u.unpack_uint()
        gid = u.unpack_uint()
        n = u.unpack_array_length(MAX_AUTH_SYS_GIDS)
        gids = tuple(u.unpack_uint() for _ in range(n))
        u.done()
        return cls(stamp, machinename, uid, gid, gids)

    def to_opaque(self) -> OpaqueAuth:
        return OpaqueAuth(AuthFlavor.AUTH_SYS, self.pack())


class CallHeader(NamedTuple):
    """The header of a CALL. `auth_sys` is the decoded cred body when flavor is AUTH_SYS.
    (A NamedTuple, immutable like the frozen dataclasses here but built in a third of their
    time: the server decodes one per call.)"""

    xid: int
    prog: int
    vers: int
    proc: int
    cred: OpaqueAuth = NULL_AUTH
    verf: OpaqueAuth = NULL_AUTH
    auth_sys: AuthSys | None = None


@dataclass(frozen=True, slots=True)
class AcceptedReply:
    """MSG_ACCEPTED with any accept_stat but PROG_MISMATCH; `body` holds SUCCESS results."""

    xid: int
    stat: AcceptStat
    body: bytes = b""
    verf: OpaqueAuth = NULL_AUTH


@dataclass(frozen=True, slots=True)
class ProgMismatchReply:
    """MSG_ACCEPTED / PROG_MISMATCH: the program exists in versions low..high only."""

    xid: int
    low: int
    high: int
    verf: OpaqueAuth = NULL_AUTH


@dataclass(frozen=True, slots=True)
class RpcMismatchReply:
    """MSG_DENIED / RPC_MISMATCH: the server speaks ONC-RPC versions low..high."""

    xid: int
    low: int = RPC_VERSION
    high: int = RPC_VERSION


@dataclass(frozen=True, slots=True)
class AuthErrorReply:
    """MSG_DENIED / AUTH_ERROR."""

    xid: int
    stat: AuthStat


Reply = AcceptedReply | ProgMismatchReply | RpcMismatchReply | AuthErrorReply

# --------------------------------------------------------------------------- decoding

_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")
_U32x3 = struct.Struct(">III")
_U32x6 = struct.Struct(">IIIIII")
_U32x5 = struct.Struct(">IIIII")


def peek_xid(record: bytes) -> int | None:
    """The xid of any RPC message, or None if the record is shorter than 4 bytes."""
    return _U32.unpack_from(record)[0] if len(record) >= 4 else None


_AUTH_CACHE: dict[bytes, tuple[OpaqueAuth, OpaqueAuth, AuthSys | None]] = {}
_AUTH_CACHE_SIZE = 4096


def _auth_end(record: bytes, n: int) -> int:
    """Where the credential and verifier of a CALL end, by their length words; 0 when the
    record is too short to hold them."""
    if n < 32:
        return 0
    verf = 32 + ((_U32.unpack_from(record, 28)[0] + 3) & ~3)
    if verf + 8 > n:
        return 0
    end = verf + 8 + ((_U32.unpack_from(record, verf + 4)[0] + 3) & ~3)
    return end if end <= n else 0


def decode_call(record: bytes) -> tuple[CallHeader, bytes]:
    """Decode a CALL record into its header and the still-encoded arguments.

    Raises a `RpcDecodeError` subclass (see the module docstring) and nothing else.
    """
    n = len(record)
    if n < 24:
        xid = peek_xid(record)
        if n >= 8 and _U32.unpack_from(record, 4)[0] != MsgType.CALL:
            raise NotACall("msg_type is not CALL", xid=xid)
        if n >= 12 and (rpcvers := _U32.unpack_from(record, 8)[0]) != RPC_VERSION:
            raise RpcVersionMismatch(_U32.unpack_from(record)[0], rpcvers)
        raise UndecodableCall(f"record of {n} bytes is too short", xid=xid)
    xid, mtype, rpcvers, prog, vers, proc = _U32x6.unpack_from(record)
    if mtype != MsgType.CALL:
        raise NotACall(f"msg_type {mtype} where a CALL was expected", xid=xid)
    if rpcvers != RPC_VERSION:
        raise RpcVersionMismatch(xid, rpcvers)
    # Clients send the same credential and verifier on every call: decode each distinct
    # pair once. A key is exactly the bytes a decoding succeeded on, so a hit is that result.
    end = _auth_end(record, n)
    known = _AUTH_CACHE.get(bytes(record[24:end])) if end else None
    if known is None:
        known, end = _decode_auth(record, xid)
        if len(_AUTH_CACHE) >= _AUTH_CACHE_SIZE:
            _AUTH_CACHE.clear()
        _AUTH_CACHE[bytes(record[24:end])] = known
    cred, verf, auth_sys = known
    return CallHeader(xid, prog, vers, proc, cred, verf, auth_sys), bytes(record[end:])


def _decode_auth(
    record: bytes, xid: int
) -> tuple[tuple[OpaqueAuth, OpaqueAuth, AuthSys | None], int]:
    """The credential, verifier and AUTH_SYS body of a CALL, and where they end."""
    u = Unpacker(record, 24)
    try:
        cred = OpaqueAuth.unpack(u)
    except XdrError as exc:
        raise BadCredential(xid, AuthStat.AUTH_BADCRED, f"credential: {exc}") from None
    auth_sys = None
    if cred.flavor == AuthFlavor.AUTH_SYS:
        try:
            auth_sys = AuthSys.unpack(cred.body)
        except XdrError as exc:
            raise BadCredential(xid, AuthStat.AUTH_BADCRED, f"AUTH_SYS body: {exc}") from None
    try:
        verf = OpaqueAuth.unpack(u)
    except XdrError as exc:
        raise BadCredential(xid, AuthStat.AUTH_BADVERF, f"verifier: {exc}") from None
    return (cred, verf, auth_sys), u.position


def decode_reply(record: bytes) -> Reply:
    """Decode a REPLY record; raises `UndecodableReply` and nothing else."""
    try:
        return _decode_reply(Unpacker(record))
    except XdrError as exc:
        raise UndecodableReply(f"malformed reply: {exc}", xid=peek_xid(record)) from None
    except ValueError as exc:  # an IntEnum given a value outside the table
        raise UndecodableReply(f"malformed reply: {exc}", xid=peek_xid(record)) from None


def _decode_reply(u: Unpacker) -> Reply:
    xid = u.unpack_uint()
    if u.unpack_uint() != MsgType.REPLY:
        raise XdrError("not a REPLY")
    reply_stat = ReplyStat(u.unpack_uint())
    if reply_stat == ReplyStat.MSG_ACCEPTED:
        verf = OpaqueAuth.unpack(u)
        stat = AcceptStat(u.unpack_uint())
        if stat == AcceptStat.SUCCESS:
            return AcceptedReply(xid, stat, u.rest(), verf)
        if stat == AcceptStat.PROG_MISMATCH:
            low, high = u.unpack_uint(), u.unpack_uint()
            u.done()
            return ProgMismatchReply(xid, low, high, verf)
        u.done()
        return AcceptedReply(xid, stat, b"", verf)
    reject = RejectStat(u.unpack_uint())
    if reject == RejectStat.RPC_MISMATCH:
        low, high = u.unpack_uint(), u.unpack_uint()
        u.done()
        return RpcMismatchReply(xid, low, high)
    auth_stat = AuthStat(u.unpack_uint())
    u.done()
    return AuthErrorReply(xid, auth_stat)


# --------------------------------------------------------------------------- encoding


def encode_call(
    xid: int,
    prog: int,
    vers: int,
    proc: int,
    args: bytes = b"",
    cred: OpaqueAuth = NULL_AUTH,
    verf: OpaqueAuth = NULL_AUTH,
) -> bytes:
    p = Packer()
    p.pack_raw(_U32x6.pack(xid, MsgType.CALL, RPC_VERSION, prog, vers, proc))
    cred.pack(p)
    verf.pack(p)
    p.pack_raw(args)
    return p.get_buffer()


def _accepted_head(xid: int, verf: OpaqueAuth, stat: AcceptStat) -> bytes:
    if verf.flavor == AuthFlavor.AUTH_NONE and not verf.body:
        return _U32x6.pack(xid, MsgType.REPLY, ReplyStat.MSG_ACCEPTED, 0, 0, stat)
    p = Packer()
    p.pack_raw(_U32x3.pack(xid, MsgType.REPLY, ReplyStat.MSG_ACCEPTED))
    verf.pack(p)
    p.pack_uint(stat)
    return p.get_buffer()


_SUCCESS = struct.Struct(">I20s")
_SUCCESS_REST = _U32x5.pack(MsgType.REPLY, ReplyStat.MSG_ACCEPTED, AuthFlavor.AUTH_NONE, 0, 0)
"""What follows the xid in a SUCCESS reply with a NULL_AUTH verifier (every reply's head)."""


def encode_accepted(
    xid: int,
    stat: AcceptStat = AcceptStat.SUCCESS,
    body: bytes = b"",
    verf: OpaqueAuth = NULL_AUTH,
) -> bytes:
    """MSG_ACCEPTED with `stat`; `body` is the encoded results (SUCCESS only)."""
    if stat == AcceptStat.SUCCESS and verf is NULL_AUTH:  # the server's every result
        return _SUCCESS.pack(xid, _SUCCESS_REST) + body
    if stat == AcceptStat.PROG_MISMATCH:
        raise ValueError("PROG_MISMATCH carries a version range: use encode_prog_mismatch")
    if body and stat != AcceptStat.SUCCESS:
        raise ValueError(f"{AcceptStat(stat).name} replies carry no body")
    return _accepted_head(xid, verf, stat) + body


def encode_prog_mismatch(xid: int, low: int, high: int, verf: OpaqueAuth = NULL_AUTH) -> bytes:
    return _accepted_head(xid, verf, AcceptStat.PROG_MISMATCH) + _U32x2.pack(low, high)


def encode_rejected_rpc_mismatch(
    xid: int, low: int = RPC_VERSION, high: int = RPC_VERSION
) -> bytes:
    return _U32x6.pack(xid, MsgType.REPLY, ReplyStat.MSG_DENIED, RejectStat.RPC_MISMATCH, low, high)


def encode_auth_error(xid: int, auth_stat: AuthStat) -> bytes:
    return _U32x5.pack(xid, MsgType.REPLY, ReplyStat.MSG_DENIED, RejectStat.AUTH_ERROR, auth_stat)


def encode_reply(reply: Reply) -> bytes:
    """Encode any `Reply` value (the inverse of `decode_reply`)."""
    match reply:
        case AcceptedReply(xid, stat, body, verf):
            return encode_accepted(xid, stat, body, verf)
        case ProgMismatchReply(xid, low, high, verf):
            return encode_prog_mismatch(xid, low, high, verf)
        case RpcMismatchReply(xid, low, high):
            return encode_rejected_rpc_mismatch(xid, low, high)
        case AuthErrorReply(xid, stat):
            return encode_auth_error(xid, stat)
    raise TypeError(f"not a reply: {reply!r}")
