"""Shared helpers for the RPC tests: a toy program and a server running in its own thread."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from rpc.message import AuthStat
from rpc.server import (
    NULL_PROCEDURE,
    AuthFailure,
    CallContext,
    DropCall,
    Procedure,
    Program,
    RpcDispatcher,
    procedure_table,
)
from rpc.transport import TransportConfig, UdpServer, bound_port, serve_tcp, serve_udp
from rpc.xdr import Packer, Unpacker

T = TypeVar("T")

TOY_PROG = 0x2000_0099
TOY_VERSIONS = (1, 3)

ECHO, ADD, BOOM, WEAK, INCR, SLEEP, WHOAMI, GATE, DROP, BIG, FLAKY = range(1, 12)


def u32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


class ToyService:
    """State behind the toy program's procedures (touched only on the server's loop)."""

    def __init__(self) -> None:
        self.counter = 0
        self.incr_runs = 0
        self.gate = asyncio.Event()
        self.gate_active = 0
        self.gate_max = 0
        self.gate_entered = 0
        self.max_delay_ms = 5000
        self.flaky_seen: set[int] = set()
        self.flaky_runs = 0

    async def echo(self, ctx: CallContext, args: bytes) -> bytes:
        return args

    async def add(self, ctx: CallContext, args: bytes) -> bytes:
        u = Unpacker(args)
        total = (u.unpack_uint() + u.unpack_uint()) & 0xFFFF_FFFF
        u.done()
        return u32(total)

    async def boom(self, ctx: CallContext, args: bytes) -> bytes:
        raise RuntimeError("the toy program exploded (expected by the test)")

    async def weak(self, ctx: CallContext, args: bytes) -> bytes:
        raise AuthFailure(AuthStat.AUTH_TOOWEAK)

    async def incr(self, ctx: CallContext, args: bytes) -> bytes:
        u = Unpacker(args)
        delay_ms = u.unpack_uint()
        u.done()
        self.incr_runs += 1
        await asyncio.sleep(min(delay_ms, self.max_delay_ms) / 1000)
        self.counter += 1
        return u32(self.counter)

    async def sleep(self, ctx: CallContext, args: bytes) -> bytes:
        u = Unpacker(args)
        delay_ms = u.unpack_uint()
        await asyncio.sleep(min(delay_ms, self.max_delay_ms) / 1000)
        return args

    async def whoami(self, ctx: CallContext, args: bytes) -> bytes:
        p = Packer()
        p.pack_uint(ctx.flavor)
        p.pack_uint(ctx.auth_sys.uid if ctx.auth_sys else 0xFFFF_FFFF)
        p.pack_uint(ctx.auth_sys.gid if ctx.auth_sys else 0xFFFF_FFFF)
        p.pack_string(ctx.transport.encode())
        p.pack_string(ctx.peer[0].encode())
        return p.get_buffer()

    async def gate_proc(self, ctx: CallContext, args: bytes) -> bytes:
        self.gate_entered += 1
        self.gate_active += 1
        self.gate_max = max(self.gate_max, self.gate_active)
        try:
            await self.gate.wait()
        finally:
            self.gate_active -= 1
        return args

    async def drop(self, ctx: CallContext, args: bytes) -> bytes:
        raise DropCall

    async def big(self, ctx: CallContext, args: bytes) -> bytes:
        u = Unpacker(args)
        size = min(u.unpack_uint(), 2 * 1024 * 1024)
        return bytes(size)

    async def flaky(self, ctx: CallContext, args: bytes) -> bytes:
        """Drops the first attempt of every xid, answers the retransmission."""
        self.flaky_runs += 1
        if ctx.xid not in self.flaky_seen:
            self.flaky_seen.add(ctx.xid)
            raise DropCall
        return args

    def program(self) -> Program:
        procs = procedure_table(
            [
                NULL_PROCEDURE,
                Procedure(ECHO, "ECHO", self.echo),
                Procedure(ADD, "ADD", self.add),
                Procedure(BOOM, "BOOM", self.boom),
                Procedure(WEAK, "WEAK", self.weak),
                Procedure(INCR, "INCR", self.incr, idempotent=False),
                Procedure(SLEEP, "SLEEP", self.sleep),
                Procedure(WHOAMI, "WHOAMI", self.whoami),
                Procedure(GATE, "GATE", self.gate_proc),
                Procedure(DROP, "DROP", self.drop, idempotent=False),
                Procedure(BIG, "BIG", self.big),
                Procedure(FLAKY, "FLAKY", self.flaky),
            ]
        )
        return Program(TOY_PROG, "toy", {vers: procs for vers in TOY_VERSIONS})


def toy_dispatcher(service: ToyService | None = None) -> tuple[RpcDispatcher, ToyService]:
    service = service or ToyService()
    dispatcher = RpcDispatcher()
    dispatcher.add_program(service.program())
    return dispatcher, service


class ServerThread:
    """Runs TCP and UDP servers for `dispatcher` on an event loop in a background thread."""

    def __init__(
        self,
        dispatcher: RpcDispatcher,
        config: TransportConfig | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.dispatcher = dispatcher
        self.config = config or TransportConfig()
        self.host = host
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.tcp: asyncio.Server | None = None
        self.udp: UdpServer | None = None
        self.tcp_port = 0
        self.udp_port = 0

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def __enter__(self) -> ServerThread:
        self._thread.start()

        async def start() -> None:
            self.tcp = await serve_tcp(self.dispatcher, self.host, 0, self.config)
            self.udp = await serve_udp(self.dispatcher, self.host, 0, self.config)

        self.run(start())
        assert self.tcp is not None and self.udp is not None
        self.tcp_port = bound_port(self.tcp)
        self.udp_port = bound_port(self.udp)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.tcp is not None and self.udp is not None
            self.tcp.close()
            self.udp.close()
            await self.udp.wait_closed()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    def port(self, transport: str) -> int:
        return self.tcp_port if transport == "tcp" else self.udp_port
