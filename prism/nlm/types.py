"""NLM (program 100021, versions 1, 3 and 4) and NSM (program 100024 v1) wire types.

Theory of operation: each XDR structure of the XNFS specification (and RFC 1813 appendix
II for NLM v4) is a frozen dataclass with `pack(p, wide)` and `unpack(u, wide)`. `wide` is
True for NLM v4, whose offsets and lengths are 64-bit (`nlm4_lock`, `nlm4_holder`);
versions 1 and 3 carry 32-bit ones and otherwise the same layout, so one class serves all
three. Decoders are bounded: strings and netobjs by `LM_MAXSTRLEN` / `MAXNETOBJ_SZ`, and any
malformed input raises `rpc.xdr.XdrError` only (the dispatcher answers GARBAGE_ARGS).

`decode(cls, data, wide)` decodes a whole argument body and refuses trailing bytes;
`encode(value, wide)` is the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, TypeVar

from rpc.xdr import Packer, Unpacker, XdrError

NLM_PROGRAM = 100021
NLM_V1, NLM_V3, NLM_V4 = 1, 3, 4
NSM_PROGRAM = 100024
NSM_V1 = 1
LM_MAXSTRLEN = 1024
"""Longest caller or monitor name (XNFS)."""
MAXNETOBJ_SZ = 1024
"""Longest cookie, owner handle or file handle (XNFS netobj)."""
SM_PRIV_SIZE = 16
U32_MAX = 0xFFFF_FFFF


class NlmProc(IntEnum):
    NULL = 0
    TEST = 1
    LOCK = 2
    CANCEL = 3
    UNLOCK = 4
    GRANTED = 5
    TEST_MSG = 6
    LOCK_MSG = 7
    CANCEL_MSG = 8
    UNLOCK_MSG = 9
    GRANTED_MSG = 10
    TEST_RES = 11
    LOCK_RES = 12
    CANCEL_RES = 13
    UNLOCK_RES = 14
    GRANTED_RES = 15
    SHARE = 20  # versions 3 and 4 only, as are the three below
    UNSHARE = 21
    NM_LOCK = 22
    FREE_ALL = 23


class NlmStat(IntEnum):
    GRANTED = 0
    DENIED = 1
    DENIED_NOLOCKS = 2
    BLOCKED = 3
    DENIED_GRACE_PERIOD = 4
    DEADLCK = 5
    ROFS = 6  # 6.. exist in v4 only; older versions get DENIED instead
    STALE_FH = 7
    FBIG = 8
    FAILED = 9

    def for_version(self, vers: int) -> NlmStat:
        return self if vers == NLM_V4 or self <= NlmStat.DEADLCK else NlmStat.DENIED


class NsmProc(IntEnum):
    NULL = 0
    STAT = 1
    MON = 2
    UNMON = 3
    UNMON_ALL = 4
    SIMU_CRASH = 5
    NOTIFY = 6


class NsmResult(IntEnum):
    STAT_SUCC = 0
    STAT_FAIL = 1


class _Wire(Protocol):
    def pack(self, p: Packer, wide: bool) -> None: ...


W = TypeVar("W")


def _netobj(u: Unpacker) -> bytes:
    return u.unpack_opaque(MAXNETOBJ_SZ)


def _name(u: Unpacker) -> str:
    raw = u.unpack_string(LM_MAXSTRLEN)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise XdrError("name is not UTF-8") from None


def _range_unpack(u: Unpacker, wide: bool) -> tuple[int, int]:
    if wide:
        return u.unpack_uhyper(), u.unpack_uhyper()
    return u.unpack_uint(), u.unpack_uint()


def _range_pack(p: Packer, wide: bool, offset: int, length: int) -> None:
    if wide:
        p.pack_uhyper(offset)
        p.pack_uhyper(length)
    else:  # a v1/v3 reply about a lock beyond 32 bits: clamp, as lockd does
        p.pack_uint(min(offset, U32_MAX))
        p.pack_uint(min(length, U32_MAX))


@dataclass(frozen=True, slots=True)
class NlmLock:
    """struct nlm4_lock / nlm_lock."""

    caller_name: str
    fh: bytes
    oh: bytes
    svid: int
    offset: int
    length: int

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_string(self.caller_name.encode())
        p.pack_opaque(self.fh)
        p.pack_opaque(self.oh)
        p.pack_uint(self.svid)
        _range_pack(p, wide, self.offset, self.length)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> NlmLock:
        name, fh, oh, svid = _name(u), _netobj(u), _netobj(u), u.unpack_uint()
        return cls(name, fh, oh, svid, *_range_unpack(u, wide))


@dataclass(frozen=True, slots=True)
class NlmHolder:
    """struct nlm4_holder: who holds the conflicting lock (TEST's DENIED arm)."""

    exclusive: bool
    svid: int
    oh: bytes
    offset: int
    length: int

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_bool(self.exclusive)
        p.pack_uint(self.svid)
        p.pack_opaque(self.oh)
        _range_pack(p, wide, self.offset, self.length)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> NlmHolder:
        exclusive, svid, oh = u.unpack_bool(), u.unpack_uint(), _netobj(u)
        return cls(exclusive, svid, oh, *_range_unpack(u, wide))


@dataclass(frozen=True, slots=True)
class TestArgs:
    """nlm4_testargs (TEST, TEST_MSG, and GRANTED / GRANTED_MSG to the client)."""

    cookie: bytes
    exclusive: bool
    alock: NlmLock

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_opaque(self.cookie)
        p.pack_bool(self.exclusive)
        self.alock.pack(p, wide)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> TestArgs:
        return cls(_netobj(u), u.unpack_bool(), NlmLock.unpack(u, wide))


@dataclass(frozen=True, slots=True)
class LockArgs:
    """nlm4_lockargs (LOCK, LOCK_MSG, NM_LOCK)."""

    cookie: bytes
    block: bool
    exclusive: bool
    alock: NlmLock
    reclaim: bool
    state: int

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_opaque(self.cookie)
        p.pack_bool(self.block)
        p.pack_bool(self.exclusive)
        self.alock.pack(p, wide)
        p.pack_bool(self.reclaim)
        p.pack_int(self.state)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> LockArgs:
        cookie, block, exclusive = _netobj(u), u.unpack_bool(), u.unpack_bool()
        alock = NlmLock.unpack(u, wide)
        return cls(cookie, block, exclusive, alock, u.unpack_bool(), u.unpack_int())


@dataclass(frozen=True, slots=True)
class CancArgs:
    """nlm4_cancargs (CANCEL, CANCEL_MSG)."""

    cookie: bytes
    block: bool
    exclusive: bool
    alock: NlmLock

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_opaque(self.cookie)
        p.pack_bool(self.block)
        p.pack_bool(self.exclusive)
        self.alock.pack(p, wide)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> CancArgs:
        return cls(_netobj(u), u.unpack_bool(), u.unpack_bool(), NlmLock.unpack(u, wide))


@dataclass(frozen=True, slots=True)
class UnlockArgs:
    """nlm4_unlockargs (UNLOCK, UNLOCK_MSG)."""

    cookie: bytes
    alock: NlmLock

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_opaque(self.cookie)
        self.alock.pack(p, wide)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> UnlockArgs:
        return cls(_netobj(u), NlmLock.unpack(u, wide))


@dataclass(frozen=True, slots=True)
class Res:
    """nlm4_res: the result of LOCK, CANCEL, UNLOCK, GRANTED (and their _RES calls)."""

    cookie: bytes
    stat: NlmStat

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_opaque(self.cookie)
        p.pack_enum(self.stat)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> Res:
        cookie = _netobj(u)
        try:
            return cls(cookie, NlmStat(u.unpack_enum()))
        except ValueError as exc:
            raise XdrError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class TestRes:
    """nlm4_testres: GRANTED, or DENIED with the holder, or another status."""

    cookie: bytes
    stat: NlmStat
    holder: NlmHolder | None = None

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_opaque(self.cookie)
        p.pack_enum(self.stat)
        if self.stat == NlmStat.DENIED:
            assert self.holder is not None
            self.holder.pack(p, wide)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> TestRes:
        cookie = _netobj(u)
        try:
            stat = NlmStat(u.unpack_enum())
        except ValueError as exc:
            raise XdrError(str(exc)) from None
        holder = NlmHolder.unpack(u, wide) if stat == NlmStat.DENIED else None
        return cls(cookie, stat, holder)


@dataclass(frozen=True, slots=True)
class NlmShare:
    """struct nlm4_share: a DOS share reservation (mode = deny bits, access bits)."""

    caller_name: str
    fh: bytes
    oh: bytes
    mode: int  # fsh4_mode: 0 deny none, 1 deny read, 2 deny write, 3 deny both
    access: int  # fsh4_access: 0 none, 1 read, 2 write, 3 both

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_string(self.caller_name.encode())
        p.pack_opaque(self.fh)
        p.pack_opaque(self.oh)
        p.pack_enum(self.mode)
        p.pack_enum(self.access)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> NlmShare:
        name, fh, oh = _name(u), _netobj(u), _netobj(u)
        mode, access = u.unpack_enum(), u.unpack_enum()
        if not (0 <= mode <= 3 and 0 <= access <= 3):
            raise XdrError(f"share mode {mode} / access {access} out of range")
        return cls(name, fh, oh, mode, access)


@dataclass(frozen=True, slots=True)
class ShareArgs:
    cookie: bytes
    share: NlmShare
    reclaim: bool

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_opaque(self.cookie)
        self.share.pack(p, wide)
        p.pack_bool(self.reclaim)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> ShareArgs:
        return cls(_netobj(u), NlmShare.unpack(u, wide), u.unpack_bool())


@dataclass(frozen=True, slots=True)
class ShareRes:
    cookie: bytes
    stat: NlmStat
    sequence: int = 0

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_opaque(self.cookie)
        p.pack_enum(self.stat)
        p.pack_int(self.sequence)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> ShareRes:
        cookie = _netobj(u)
        try:
            stat = NlmStat(u.unpack_enum())
        except ValueError as exc:
            raise XdrError(str(exc)) from None
        return cls(cookie, stat, u.unpack_int())


@dataclass(frozen=True, slots=True)
class Notify:
    """nlm4_notify (FREE_ALL): a host name and its new NSM state."""

    name: str
    state: int

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_string(self.name.encode())
        p.pack_int(self.state)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> Notify:
        return cls(_name(u), u.unpack_int())


# -- NSM ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmName:
    """struct sm_name (SM_STAT, and the mon_name of SM_UNMON_ALL's my_id)."""

    name: str

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_string(self.name.encode())

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> SmName:
        return cls(_name(u))


@dataclass(frozen=True, slots=True)
class MyId:
    """struct my_id: the RPC procedure to call back when the monitored host changes."""

    my_name: str
    prog: int
    vers: int
    proc: int

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_string(self.my_name.encode())
        p.pack_int(self.prog)
        p.pack_int(self.vers)
        p.pack_int(self.proc)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> MyId:
        return cls(_name(u), u.unpack_int(), u.unpack_int(), u.unpack_int())


@dataclass(frozen=True, slots=True)
class Mon:
    """struct mon (SM_MON) = mon_id {mon_name, my_id} + priv[16]; SM_UNMON takes mon_id."""

    mon_name: str
    my_id: MyId
    priv: bytes = bytes(SM_PRIV_SIZE)

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_string(self.mon_name.encode())
        self.my_id.pack(p, wide)
        p.pack_fopaque(SM_PRIV_SIZE, self.priv)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> Mon:
        return cls(_name(u), MyId.unpack(u, wide), u.unpack_fopaque(SM_PRIV_SIZE))


@dataclass(frozen=True, slots=True)
class MonId:
    mon_name: str
    my_id: MyId

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_string(self.mon_name.encode())
        self.my_id.pack(p, wide)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> MonId:
        return cls(_name(u), MyId.unpack(u, wide))


@dataclass(frozen=True, slots=True)
class SmStatRes:
    res: NsmResult
    state: int

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_enum(self.res)
        p.pack_int(self.state)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> SmStatRes:
        try:
            res = NsmResult(u.unpack_enum())
        except ValueError as exc:
            raise XdrError(str(exc)) from None
        return cls(res, u.unpack_int())


@dataclass(frozen=True, slots=True)
class SmStat:
    """struct sm_stat (SM_UNMON / SM_UNMON_ALL results): the local state number."""

    state: int

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_int(self.state)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> SmStat:
        return cls(u.unpack_int())


@dataclass(frozen=True, slots=True)
class StatChge:
    """struct stat_chge (SM_NOTIFY): the host that rebooted and its new state."""

    mon_name: str
    state: int

    def pack(self, p: Packer, wide: bool) -> None:
        p.pack_string(self.mon_name.encode())
        p.pack_int(self.state)

    @classmethod
    def unpack(cls, u: Unpacker, wide: bool) -> StatChge:
        return cls(_name(u), u.unpack_int())


def decode(cls: type[W], data: bytes, wide: bool = True) -> W:
    """Decode a whole body as `cls`; trailing bytes are an XdrError."""
    u = Unpacker(data)
    value: W = cls.unpack(u, wide)  # type: ignore[attr-defined]
    u.done()
    return value


def encode(value: _Wire, wide: bool = True) -> bytes:
    p = Packer()
    value.pack(p, wide)
    return p.get_buffer()


_NLM_NAMES = {int(s): s.name for s in NlmStat}


def nlm_status(proc: int, body: bytes) -> str | None:
    """The NlmStat name of a result other than GRANTED, else None (`rpc.server.StatusOf`).

    Every NLM result with a status (nlm4_res, nlm4_testres, nlm4_shareres) opens with the
    call's cookie (a netobj) and then the status; the other procedures answer nothing."""
    if len(body) < 8:
        return None
    at = 4 + ((int.from_bytes(body[:4], "big") + 3) & ~3)
    code = int.from_bytes(body[at : at + 4], "big")
    return None if code == NlmStat.GRANTED else _NLM_NAMES.get(code, str(code))
