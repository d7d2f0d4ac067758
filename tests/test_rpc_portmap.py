"""rpc.portmap: the in-memory portmapper v2 and its client helpers, over TCP and UDP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from rpc_helpers import ServerThread

from rpc.client import GarbageArgsError, ProcUnavailable, RpcClient
from rpc.message import AuthErrorReply, AuthStat, decode_reply, encode_call
from rpc.portmap import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    PMAP_PROG,
    PMAP_VERS,
    PmapProc,
    PortMapping,
    PortmapProgram,
    decode_dump,
    encode_dump,
    is_loopback,
    pmap_dump,
    pmap_getport,
    pmap_set,
    pmap_unset,
    rpcbind_answers,
)
from rpc.server import RpcDispatcher

NFS = 100003


@pytest.fixture(scope="module")
def rpc_portmapper() -> Iterator[tuple[ServerThread, PortmapProgram]]:
    portmap = PortmapProgram()
    dispatcher = RpcDispatcher()
    dispatcher.add_program(portmap.program)
    with ServerThread(dispatcher) as server:
        yield server, portmap


def test_dump_golden() -> None:
    mappings = [PortMapping(NFS, 3, IPPROTO_TCP, 2049), PortMapping(NFS, 3, IPPROTO_UDP, 2049)]
    expected = bytes.fromhex(
        "00000001 000186a3 00000003 00000006 00000801"
        " 00000001 000186a3 00000003 00000011 00000801"
        " 00000000".replace(" ", "")
    )
    assert encode_dump(mappings) == expected
    assert decode_dump(expected) == mappings
    assert decode_dump(b"\0\0\0\0") == []


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_set_getport_dump_unset(
    rpc_portmapper: tuple[ServerThread, PortmapProgram], transport: str
) -> None:
    server, portmap = rpc_portmapper
    port = server.port(transport)
    prog = 0x2000_0100 + (transport == "udp")
    tcp, udp = PortMapping(prog, 3, IPPROTO_TCP, 2049), PortMapping(prog, 3, IPPROTO_UDP, 2050)
    assert pmap_getport("127.0.0.1", prog, 3, IPPROTO_TCP, port, transport=transport) == 0
    assert pmap_set("127.0.0.1", tcp, port, transport=transport) is True
    assert pmap_set("127.0.0.1", udp, port, transport=transport) is True
    taken = PortMapping(prog, 3, IPPROTO_TCP, 9)
    assert pmap_set("127.0.0.1", taken, port, transport=transport) is False
    assert pmap_getport("127.0.0.1", prog, 3, IPPROTO_TCP, port, transport=transport) == 2049
    assert pmap_getport("127.0.0.1", prog, 3, IPPROTO_UDP, port, transport=transport) == 2050
    assert pmap_getport("127.0.0.1", prog, 4, IPPROTO_UDP, port, transport=transport) == 0
    dump = pmap_dump("127.0.0.1", port, transport=transport)
    assert tcp in dump and udp in dump
    assert portmap.getport(prog, 3, IPPROTO_UDP) == 2050
    assert pmap_unset("127.0.0.1", prog, 3, port, transport=transport) is True  # both protocols
    assert pmap_unset("127.0.0.1", prog, 3, port, transport=transport) is False
    assert pmap_getport("127.0.0.1", prog, 3, IPPROTO_TCP, port, transport=transport) == 0
    assert tcp not in pmap_dump("127.0.0.1", port, transport=transport)


def test_set_from_a_remote_host_is_refused() -> None:
    portmap = PortmapProgram()
    dispatcher = RpcDispatcher()
    dispatcher.add_program(portmap.program)
    args = PortMapping(NFS, 3, IPPROTO_TCP, 2049).to_bytes()
    for proc in (PmapProc.SET, PmapProc.UNSET):
        record = encode_call(9, PMAP_PROG, PMAP_VERS, proc, args)
        reply = asyncio.run(dispatcher.dispatch(record, ("192.0.2.7", 700), "tcp"))
        assert decode_reply(reply or b"") == AuthErrorReply(9, AuthStat.AUTH_TOOWEAK)
    assert portmap.dump() == []
    # but GETPORT from anywhere is fine
    portmap.set(PortMapping(NFS, 3, IPPROTO_TCP, 2049))
    record = encode_call(10, PMAP_PROG, PMAP_VERS, PmapProc.GETPORT, args)
    reply = asyncio.run(dispatcher.dispatch(record, ("192.0.2.7", 700), "udp"))
    assert reply is not None and reply.endswith(b"\x00\x00\x08\x01")


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("::ffff:10.0.0.1")
    assert not is_loopback("") and not is_loopback("vm-1")


def test_callit_and_unknown_procs(rpc_portmapper: tuple[ServerThread, PortmapProgram]) -> None:
    server, _ = rpc_portmapper
    with RpcClient("127.0.0.1", server.tcp_port, PMAP_PROG, PMAP_VERS) as c:
        assert c.call(PmapProc.NULL) == b""
        with pytest.raises(ProcUnavailable):
            c.call(PmapProc.CALLIT, b"\0" * 16)


def test_bad_set_arguments(rpc_portmapper: tuple[ServerThread, PortmapProgram]) -> None:
    server, _ = rpc_portmapper
    with RpcClient("127.0.0.1", server.tcp_port, PMAP_PROG, PMAP_VERS) as c:
        with pytest.raises(GarbageArgsError):
            c.call(PmapProc.SET, b"\0" * 12)
        with pytest.raises(GarbageArgsError):
            c.call(PmapProc.GETPORT, b"\0" * 20)


def test_rpcbind_answers(rpc_portmapper: tuple[ServerThread, PortmapProgram]) -> None:
    server, _ = rpc_portmapper
    assert rpcbind_answers("127.0.0.1", server.tcp_port)
    with socket.socket() as unused:  # bound but not listening: connection refused
        unused.bind(("127.0.0.1", 0))
        assert not rpcbind_answers("127.0.0.1", unused.getsockname()[1])
