"""Portmapper version 2 (RFC 1833 section 3): server program and client helpers.

Theory of operation: the portmapper (program 100000, version 2, port 111) maps
(prog, vers, protocol) to a port. `PortmapProgram` keeps that table in memory and serves
NULL, SET, UNSET, GETPORT and DUMP (CALLIT is not in the table, so it gets PROC_UNAVAIL).
SET and UNSET are honoured only from loopback callers; anyone else gets AUTH_ERROR /
AUTH_TOOWEAK. SET of an already mapped (prog, vers, prot) returns FALSE; UNSET removes
every protocol's entry for (prog, vers).

A system rpcbind also answers PMAP v2, so the client helpers work against it too. Note that
current rpcbind only accepts SET/UNSET over TCP/UDP loopback from a reserved port when run
with `-i`/old-style local mode; otherwise register through its Unix socket
(`pmap_set(RPCBIND_SOCKET, mapping, transport="unix")`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import IntEnum

from rpc.client import RpcClient, RpcError
from rpc.errors import RemoteProtocolError
from rpc.message import AuthStat
from rpc.server import (
    NULL_PROCEDURE,
    AuthFailure,
    CallContext,
    Procedure,
    Program,
    procedure_table,
)
from rpc.xdr import Packer, Unpacker

PMAP_PROG = 100000
PMAP_VERS = 2
PMAP_PORT = 111
RPCBIND_SOCKET = "/run/rpcbind.sock"

IPPROTO_TCP = 6
IPPROTO_UDP = 17

MAX_MAPPINGS = 4096
"""Entries the in-memory table holds; SET beyond this returns FALSE."""


class PmapProc(IntEnum):
    NULL = 0
    SET = 1
    UNSET = 2
    GETPORT = 3
    DUMP = 4
    CALLIT = 5


@dataclass(frozen=True, slots=True)
class PortMapping:
    """struct mapping { prog, vers, prot, port }."""

    prog: int
    vers: int
    prot: int
    port: int

    def pack(self, p: Packer) -> None:
        p.pack_uint(self.prog)
        p.pack_uint(self.vers)
        p.pack_uint(self.prot)
        p.pack_uint(self.port)

    @classmethod
    def unpack(cls, u: Unpacker) -> PortMapping:
        return cls(u.unpack_uint(), u.unpack_uint(), u.unpack_uint(), u.unpack_uint())

    def to_bytes(self) -> bytes:
        p = Packer()
        self.pack(p)
        return p.get_buffer()


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _bool(value: bool) -> bytes:
    p = Packer()
    p.pack_bool(value)
    return p.get_buffer()


def _decode_mapping(args: bytes) -> PortMapping:
    u = Unpacker(args)
    mapping = PortMapping.unpack(u)
    u.done()
    return mapping


def encode_dump(mappings: list[PortMapping]) -> bytes:
    """pmaplist: a linked list, each entry preceded by TRUE, ended by FALSE."""
    p = Packer()
    for mapping in mappings:
        p.pack_bool(True)
        mapping.pack(p)
    p.pack_bool(False)
    return p.get_buffer()


def decode_dump(data: bytes) -> list[PortMapping]:
    u = Unpacker(data)
    mappings: list[PortMapping] = []
    while u.unpack_bool():
        mappings.append(PortMapping.unpack(u))
    u.done()
    return mappings


class PortmapProgram:
    """The in-memory portmapper. Register `.program` with an `RpcDispatcher`; the table
    methods (`set`, `unset`, `getport`, `dump`) are also usable directly by the server that
    hosts it."""

    def __init__(self) -> None:
        self._table: dict[tuple[int, int, int], int] = {}
        procs = [
            NULL_PROCEDURE,
            Procedure(PmapProc.SET, "SET", self._set, idempotent=False),
            Procedure(PmapProc.UNSET, "UNSET", self._unset, idempotent=False),
            Procedure(PmapProc.GETPORT, "GETPORT", self._getport),
            Procedure(PmapProc.DUMP, "DUMP", self._dump),
        ]
        self.program = Program(PMAP_PROG, "portmapper", {PMAP_VERS: procedure_table(procs)})

    # table operations

    def set(self, mapping: PortMapping) -> bool:
        key = (mapping.prog, mapping.vers, mapping.prot)
        if key in self._table or len(self._table) >= MAX_MAPPINGS:
            return False
        self._table[key] = mapping.port
        return True

    def unset(self, prog: int, vers: int) -> bool:
        keys = [key for key in self._table if key[0] == prog and key[1] == vers]
        for key in keys:
            del self._table[key]
        return bool(keys)

    def getport(self, prog: int, vers: int, prot: int) -> int:
        return self._table.get((prog, vers, prot), 0)

    def dump(self) -> list[PortMapping]:
        return [PortMapping(*key, port) for key, port in self._table.items()]

    # handlers

    @staticmethod
    def _require_loopback(ctx: CallContext) -> None:
        if not is_loopback(ctx.peer[0]):
            raise AuthFailure(AuthStat.AUTH_TOOWEAK, "SET/UNSET only from loopback")

    async def _set(self, ctx: CallContext, args: bytes) -> bytes:
        mapping = _decode_mapping(args)
        self._require_loopback(ctx)
        return _bool(self.set(mapping))

    async def _unset(self, ctx: CallContext, args: bytes) -> bytes:
        mapping = _decode_mapping(args)
        self._require_loopback(ctx)
        return _bool(self.unset(mapping.prog, mapping.vers))

    async def _getport(self, ctx: CallContext, args: bytes) -> bytes:
        mapping = _decode_mapping(args)
        p = Packer()
        p.pack_uint(self.getport(mapping.prog, mapping.vers, mapping.prot))
        return p.get_buffer()

    async def _dump(self, ctx: CallContext, args: bytes) -> bytes:
        return encode_dump(self.dump())


# --------------------------------------------------------------------------- client helpers


def _client(host: str, port: int, transport: str, timeout: float, reserved: bool) -> RpcClient:
    return RpcClient(
        host,
        port,
        PMAP_PROG,
        PMAP_VERS,
        transport=transport,
        timeout=timeout,
        reserved_port=reserved,
    )


def _reply_bool(data: bytes) -> bool:
    u = Unpacker(data)
    value = u.unpack_bool()
    u.done()
    return value


def pmap_getport(
    host: str,
    prog: int,
    vers: int,
    prot: int,
    port: int = PMAP_PORT,
    *,
    transport: str = "tcp",
    timeout: float = 2.0,
) -> int:
    """The port registered for (prog, vers, prot), or 0."""
    with _client(host, port, transport, timeout, False) as client:
        u = Unpacker(client.call(PmapProc.GETPORT, PortMapping(prog, vers, prot, 0).to_bytes()))
        result = u.unpack_uint()
        u.done()
        return result


def pmap_set(
    host: str,
    mapping: PortMapping,
    port: int = PMAP_PORT,
    *,
    transport: str = "tcp",
    timeout: float = 2.0,
    reserved_port: bool = False,
) -> bool:
    """Register `mapping`; FALSE if (prog, vers, prot) is already mapped."""
    with _client(host, port, transport, timeout, reserved_port) as client:
        return _reply_bool(client.call(PmapProc.SET, mapping.to_bytes()))


def pmap_unset(
    host: str,
    prog: int,
    vers: int,
    port: int = PMAP_PORT,
    *,
    transport: str = "tcp",
    timeout: float = 2.0,
    reserved_port: bool = False,
) -> bool:
    """Remove every protocol's mapping for (prog, vers)."""
    with _client(host, port, transport, timeout, reserved_port) as client:
        return _reply_bool(client.call(PmapProc.UNSET, PortMapping(prog, vers, 0, 0).to_bytes()))


def pmap_dump(
    host: str, port: int = PMAP_PORT, *, transport: str = "tcp", timeout: float = 2.0
) -> list[PortMapping]:
    with _client(host, port, transport, timeout, False) as client:
        return decode_dump(client.call(PmapProc.DUMP))


def rpcbind_answers(host: str = "127.0.0.1", port: int = PMAP_PORT, timeout: float = 0.5) -> bool:
    """True if a portmapper (e.g. the system rpcbind) answers a PMAP v2 NULL call over TCP."""
    try:
        with _client(host, port, "tcp", timeout, False) as client:
            client.call(PmapProc.NULL)
    except (OSError, RpcError, RemoteProtocolError):
        return False
    return True
