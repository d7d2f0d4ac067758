"""rpc.transport and rpc.client end to end: live asyncio TCP and UDP servers, toy program."""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from rpc_helpers import (
    ADD,
    BIG,
    BOOM,
    ECHO,
    FLAKY,
    GATE,
    INCR,
    SLEEP,
    TOY_PROG,
    WEAK,
    WHOAMI,
    ServerThread,
    toy_dispatcher,
    u32,
)

from rpc.client import (
    AuthError,
    ConnectionClosed,
    GarbageArgsError,
    ProcUnavailable,
    ProgMismatch,
    ProgUnavailable,
    RpcClient,
    RpcMismatch,
    RpcTimeout,
    SystemError_,
    raise_for_reply,
)
from rpc.message import (
    AcceptedReply,
    AcceptStat,
    AuthErrorReply,
    AuthStat,
    AuthSys,
    OpaqueAuth,
    RpcMismatchReply,
    decode_reply,
    encode_call,
    peek_xid,
)
from rpc.record import MAX_RECORD_SIZE, frame
from rpc.transport import TransportConfig
from rpc.xdr import Unpacker

TRANSPORTS = ["tcp", "udp"]


@pytest.fixture(scope="module")
def rpc_toy_server() -> Iterator[ServerThread]:
    dispatcher, service = toy_dispatcher()
    with ServerThread(dispatcher) as server:
        server.service = service  # type: ignore[attr-defined]
        yield server


def client(server: ServerThread, transport: str = "tcp", **kw: object) -> RpcClient:
    prog = kw.pop("prog", TOY_PROG)
    vers = kw.pop("vers", 3)
    kw.setdefault("timeout", 3.0)
    return RpcClient("127.0.0.1", server.port(transport), prog, vers, transport=transport, **kw)  # type: ignore[arg-type]


def expect_closed(sock: socket.socket, timeout: float = 3.0) -> None:
    """The server closes the connection (possibly after sending some replies)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return
        except ConnectionResetError:
            return
    raise AssertionError("the server kept the connection open")


# --------------------------------------------------------------------------- statuses


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_statuses_end_to_end(rpc_toy_server: ServerThread, transport: str) -> None:
    with client(rpc_toy_server, transport) as c:
        assert c.call(0) == b""
        assert c.call(ECHO, b"ping") == b"ping"
        assert c.call(ADD, u32(40, 2)) == u32(42)
        with pytest.raises(GarbageArgsError):
            c.call(ADD, u32(1))
        with pytest.raises(SystemError_):
            c.call(BOOM)
        with pytest.raises(AuthError) as auth:
            c.call(WEAK)
        assert auth.value.stat == AuthStat.AUTH_TOOWEAK
        with pytest.raises(ProcUnavailable):
            c.call(77)
        # RPC_MISMATCH: a call with rpcvers 3
        record = bytearray(c.encode(0))
        record[8:12] = u32(3)
        reply = c.exchange(bytes(record))
        assert reply == RpcMismatchReply(peek_xid(bytes(record)) or 0, 2, 2)
        with pytest.raises(RpcMismatch) as mismatch:
            raise_for_reply(reply)
        assert (mismatch.value.low, mismatch.value.high) == (2, 2)
        # AUTH_ERROR / AUTH_BADCRED: AUTH_SYS with 17 gids
        bad = encode_call(c.next_xid(), TOY_PROG, 3, 0, cred=OpaqueAuth(1, u32(0, 0, 0, 0, 17)))
        assert isinstance(c.exchange(bad), AuthErrorReply)
        assert c.call(0) == b""  # the connection is still usable
    with client(rpc_toy_server, transport, prog=TOY_PROG + 1) as c, pytest.raises(ProgUnavailable):
        c.call(0)
    with client(rpc_toy_server, transport, vers=2) as c, pytest.raises(ProgMismatch) as info:
        c.call(0)
    assert (info.value.low, info.value.high) == (1, 3)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_auth_sys_reaches_the_handler(rpc_toy_server: ServerThread, transport: str) -> None:
    cred = AuthSys(7, b"guest", 1000, 100, (100, 27))
    with client(rpc_toy_server, transport, cred=cred, source=("127.0.0.2", 0)) as c:
        assert c.local_address[0] == "127.0.0.2"
        u = Unpacker(c.call(WHOAMI))
        assert (u.unpack_uint(), u.unpack_uint(), u.unpack_uint()) == (1, 1000, 100)
        assert u.unpack_string() == transport.encode()
        assert u.unpack_string() == b"127.0.0.2"


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a port below 1024 needs root")
def test_reserved_port(rpc_toy_server: ServerThread) -> None:
    with client(rpc_toy_server, "tcp", reserved_port=True) as c:
        assert c.local_address[1] < 1024
        assert c.call(0) == b""


# --------------------------------------------------------------------------- TCP behaviour


def test_pipelining_50_calls_in_one_write(rpc_toy_server: ServerThread) -> None:
    with client(rpc_toy_server) as c:
        records = [c.encode(SLEEP, u32((49 - i) * 2)) for i in range(50)]
        c.sock.sendall(b"".join(frame(r) for r in records))
        replies = [decode_reply(c.recv_record()) for _ in range(50)]
    sent = {peek_xid(r): r for r in records}
    assert {r.xid for r in replies} == set(sent)
    for reply in replies:
        assert isinstance(reply, AcceptedReply)
        assert reply.body == sent[reply.xid][-4:]  # SLEEP echoes its argument
    # the first call sleeps longest, so it must not be answered first: replies are sent as
    # calls complete, not in arrival order
    assert replies[0].xid != peek_xid(records[0])


def test_in_flight_cap_pauses_reading() -> None:
    dispatcher, service = toy_dispatcher()
    with ServerThread(dispatcher, TransportConfig(max_in_flight=4)) as server:
        with client(server) as c:
            records = [c.encode(GATE, u32(i)) for i in range(20)]
            c.sock.sendall(b"".join(frame(r) for r in records))
            deadline = time.monotonic() + 3
            while service.gate_entered < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            assert service.gate_entered == 4  # the other 16 wait, unread or queued
            server.call_soon(service.gate.set)
            replies = [decode_reply(c.recv_record()) for _ in range(20)]
        assert {r.xid for r in replies} == {peek_xid(r) for r in records}
        assert service.gate_max == 4


def test_drc_over_tcp_and_udp(rpc_toy_server: ServerThread) -> None:
    service = rpc_toy_server.service  # type: ignore[attr-defined]
    for transport in TRANSPORTS:
        with client(rpc_toy_server, transport) as c:
            runs = service.incr_runs
            record = c.encode(INCR, u32(0))
            c.send_raw(record)
            first = c.recv_record()
            c.send_raw(record)  # a retransmission of a completed call
            assert c.recv_record() == first
            assert service.incr_runs == runs + 1

            slow = c.encode(INCR, u32(300))
            c.send_raw(slow)
            c.send_raw(slow)  # arrives while the original still runs: dropped
            original = c.recv_record()
            with pytest.raises(RpcTimeout):
                c.recv_record(timeout=0.5)
            c.send_raw(slow)
            assert c.recv_record() == original
            assert service.incr_runs == runs + 2


def test_oversized_record_closes_only_that_connection(rpc_toy_server: ServerThread) -> None:
    with client(rpc_toy_server) as c:
        c.send_raw(
            struct.pack(">I", 0x8000_0000 | (MAX_RECORD_SIZE + 1)) + b"\0" * 1000, framed=False
        )
        expect_closed(c.sock)
    with client(rpc_toy_server) as c:
        # a record of exactly the limit is accepted (and answered with GARBAGE_ARGS)
        with pytest.raises(GarbageArgsError):
            c.call(ADD, bytes(MAX_RECORD_SIZE - 40))
        assert c.call(0) == b""


@pytest.mark.parametrize(
    "record",
    [b"\x01\x02\x03", u32(5, 1, 0, 0, 0, 0), u32(5, 0, 2, 1)],
    ids=["short", "reply", "truncated"],
)
def test_undecodable_record_closes_the_connection(
    rpc_toy_server: ServerThread, record: bytes
) -> None:
    with client(rpc_toy_server) as c:
        c.send_raw(record)
        expect_closed(c.sock)
    with client(rpc_toy_server) as c:
        assert c.call(0) == b""


def test_replies_still_due_are_sent_after_eof(rpc_toy_server: ServerThread) -> None:
    with client(rpc_toy_server) as c:
        records = [c.encode(SLEEP, u32(50)) for _ in range(3)]
        c.sock.sendall(b"".join(frame(r) for r in records))
        c.sock.shutdown(socket.SHUT_WR)
        got = {peek_xid(c.recv_record()) for _ in range(3)}
        assert got == {peek_xid(r) for r in records}
        with pytest.raises(ConnectionClosed):
            c.recv_record()


def _mutated_stream(rng: random.Random, count: int) -> list[bytes]:
    base = [
        encode_call(1, TOY_PROG, 3, 0),
        encode_call(2, TOY_PROG, 3, ECHO, b"abcd", AuthSys(0, b"m", 1, 2, (3,)).to_opaque()),
        encode_call(3, TOY_PROG, 3, ADD, u32(1, 2)),
    ]
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                data = data[: rng.randrange(len(data) + 1)] + rng.randbytes(rng.randrange(8))
        out.append(bytes(data) if rng.random() < 0.9 else rng.randbytes(rng.randrange(64)))
    return out


def test_thousands_of_mutated_records_then_null(rpc_toy_server: ServerThread) -> None:
    rng = random.Random(5531)
    # TCP: hostile records, and hostile framing, each on its own connection and all at once
    for _ in range(20):
        with client(rpc_toy_server) as c:
            stream = b"".join(frame(r) for r in _mutated_stream(rng, 100))
            if rng.random() < 0.3:
                stream = rng.randbytes(rng.randrange(1, 200)) + stream
            c.sock.sendall(stream)
            c.sock.shutdown(socket.SHUT_WR)  # in case the noise left a record incomplete
            expect_closed(c.sock)
    # UDP: thousands of datagrams on one socket; answers must be well formed
    with client(rpc_toy_server, "udp") as c:
        for record in _mutated_stream(rng, 3000):
            c.send_raw(record)
        answered = 0
        while True:
            try:
                data = c.recv_record(timeout=0.5)
            except RpcTimeout:
                break
            decode_reply(data)
            answered += 1
        assert answered > 0
        assert c.call(0) == b""
    with client(rpc_toy_server) as c:
        assert c.call(0) == b""


# --------------------------------------------------------------------------- UDP behaviour


def test_udp_retransmits_on_timeout(rpc_toy_server: ServerThread) -> None:
    service = rpc_toy_server.service  # type: ignore[attr-defined]
    before = service.flaky_runs
    with client(rpc_toy_server, "udp") as c:
        assert c.call(FLAKY, b"abcd") == b"abcd"
    assert service.flaky_runs == before + 2


def test_tcp_does_not_retransmit(rpc_toy_server: ServerThread) -> None:
    with client(rpc_toy_server, "tcp", timeout=0.5) as c, pytest.raises(RpcTimeout):
        c.call(FLAKY, b"abcd")


def test_udp_reply_too_large_for_a_datagram(rpc_toy_server: ServerThread) -> None:
    with client(rpc_toy_server, "udp") as c:
        assert len(c.call(BIG, u32(60000))) == 60000
        assert c.call_reply(BIG, u32(70000)) == AcceptedReply(c._xid, AcceptStat.SYSTEM_ERR)
    with client(rpc_toy_server, "tcp") as c:
        assert len(c.call(BIG, u32(1024 * 1024))) == 1024 * 1024


def test_server_survives_client_resets(rpc_toy_server: ServerThread) -> None:
    for _ in range(10):
        c = client(rpc_toy_server)
        c.sock.sendall(frame(c.encode(SLEEP, u32(20))))
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST while the call is running
    with client(rpc_toy_server) as c:
        assert c.call(0) == b""
