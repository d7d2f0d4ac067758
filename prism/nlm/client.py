"""A synchronous NLM / NSM client for tests and tools.

Each method encodes its procedure's arguments (`prism.nlm.types`), calls the server through
`rpc.client.RpcClient` (TCP or UDP) and decodes the result; NLM statuses are returned, not
raised (RPC failures are whatever the RPC client raises). Offsets are 64-bit on version 4
and 32-bit on versions 1 and 3. An owner is (this client's address, `svid`, `oh`).
"""

from __future__ import annotations

from typing import Any

from prism.nlm.types import (
    NLM_PROGRAM,
    NLM_V4,
    NSM_PROGRAM,
    NSM_V1,
    CancArgs,
    LockArgs,
    NlmLock,
    NlmProc,
    NlmShare,
    Notify,
    NsmProc,
    Res,
    ShareArgs,
    ShareRes,
    SmName,
    SmStatRes,
    StatChge,
    TestArgs,
    TestRes,
    UnlockArgs,
    decode,
    encode,
)
from rpc.client import RpcClient


class NlmClient:
    def __init__(
        self,
        host: str,
        port: int,
        transport: str = "tcp",
        *,
        vers: int = NLM_V4,
        caller_name: str = "client",
        **kw: Any,
    ) -> None:
        self.vers = vers
        self.wide = vers == NLM_V4
        self.caller_name = caller_name
        self.rpc = RpcClient(host, port, NLM_PROGRAM, vers, transport=transport, **kw)
        self._cookie = 0

    def close(self) -> None:
        self.rpc.close()

    def __enter__(self) -> NlmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cookie(self) -> bytes:
        self._cookie += 1
        return self._cookie.to_bytes(4, "big")

    def alock(
        self, fh: bytes, offset: int = 0, length: int = 0, svid: int = 1, oh: bytes = b"o"
    ) -> NlmLock:
        return NlmLock(self.caller_name, fh, oh, svid, offset, length)

    def call(self, proc: NlmProc, args: Any) -> bytes:
        return self.rpc.call(int(proc), encode(args, self.wide) if args is not None else b"")

    def test(self, lock: NlmLock, exclusive: bool = True) -> TestRes:
        reply = self.call(NlmProc.TEST, TestArgs(self.cookie(), exclusive, lock))
        return decode(TestRes, reply, self.wide)

    def lock(
        self,
        lock: NlmLock,
        exclusive: bool = True,
        *,
        block: bool = False,
        reclaim: bool = False,
        state: int = 1,
        cookie: bytes | None = None,
        proc: NlmProc = NlmProc.LOCK,
    ) -> Res:
        args = LockArgs(cookie or self.cookie(), block, exclusive, lock, reclaim, state)
        return decode(Res, self.call(proc, args), self.wide)

    def cancel(self, lock: NlmLock, exclusive: bool = True, *, block: bool = True) -> Res:
        args = CancArgs(self.cookie(), block, exclusive, lock)
        return decode(Res, self.call(NlmProc.CANCEL, args), self.wide)

    def unlock(self, lock: NlmLock) -> Res:
        return decode(Res, self.call(NlmProc.UNLOCK, UnlockArgs(self.cookie(), lock)), self.wide)

    def share(
        self, fh: bytes, access: int, deny: int, oh: bytes = b"s", *, reclaim: bool = False
    ) -> ShareRes:
        share = NlmShare(self.caller_name, fh, oh, deny, access)
        reply = self.call(NlmProc.SHARE, ShareArgs(self.cookie(), share, reclaim))
        return decode(ShareRes, reply, self.wide)

    def unshare(self, fh: bytes, oh: bytes = b"s") -> ShareRes:
        share = NlmShare(self.caller_name, fh, oh, 0, 0)
        reply = self.call(NlmProc.UNSHARE, ShareArgs(self.cookie(), share, False))
        return decode(ShareRes, reply, self.wide)

    def free_all(self, state: int = 0) -> None:
        self.call(NlmProc.FREE_ALL, Notify(self.caller_name, state))


class NsmClient:
    def __init__(self, host: str, port: int, transport: str = "udp", **kw: Any) -> None:
        self.rpc = RpcClient(host, port, NSM_PROGRAM, NSM_V1, transport=transport, **kw)

    def close(self) -> None:
        self.rpc.close()

    def __enter__(self) -> NsmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stat(self, name: str = "client") -> SmStatRes:
        return decode(SmStatRes, self.rpc.call(int(NsmProc.STAT), encode(SmName(name))))

    def notify(self, name: str, state: int) -> None:
        self.rpc.call(int(NsmProc.NOTIFY), encode(StatChge(name, state)))
