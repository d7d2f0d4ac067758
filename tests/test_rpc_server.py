"""rpc.server: the dispatcher and the duplicate request cache, without any sockets."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_helpers import (
    ADD,
    BOOM,
    DROP,
    ECHO,
    INCR,
    TOY_PROG,
    WEAK,
    WHOAMI,
    ToyService,
    toy_dispatcher,
    u32,
)

from rpc.message import (
    NULL_AUTH,
    AcceptedReply,
    AcceptStat,
    AuthErrorReply,
    AuthStat,
    AuthSys,
    OpaqueAuth,
    ProgMismatchReply,
    RpcMismatchReply,
    decode_reply,
    encode_call,
    peek_xid,
)
from rpc.server import (
    NULL_PROCEDURE,
    DrcState,
    DuplicateRequestCache,
    Procedure,
    Program,
    RpcDispatcher,
    null_handler,
    procedure_table,
)

PEER = ("127.0.0.1", 900)


def dispatch(dispatcher: RpcDispatcher, record: bytes, peer: tuple[str, int] = PEER) -> object:
    reply = asyncio.run(dispatcher.dispatch(record, peer, "tcp"))
    return None if reply is None else decode_reply(reply)


def call(proc: int, args: bytes = b"", *, xid: int = 42, vers: int = 3, **kw: object) -> bytes:
    return encode_call(xid, kw.pop("prog", TOY_PROG), vers, proc, args, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- statuses


def test_success_and_results() -> None:
    d, _ = toy_dispatcher()
    assert dispatch(d, call(0)) == AcceptedReply(42, AcceptStat.SUCCESS)
    assert dispatch(d, call(ECHO, b"abcd")) == AcceptedReply(42, AcceptStat.SUCCESS, b"abcd")
    assert dispatch(d, call(ADD, u32(2, 3))) == AcceptedReply(42, AcceptStat.SUCCESS, u32(5))


def test_table_driven_errors() -> None:
    d, _ = toy_dispatcher()
    assert dispatch(d, call(0, prog=TOY_PROG + 1)) == AcceptedReply(42, AcceptStat.PROG_UNAVAIL)
    assert dispatch(d, call(0, vers=2)) == ProgMismatchReply(42, 1, 3)
    assert dispatch(d, call(0, vers=4)) == ProgMismatchReply(42, 1, 3)
    assert dispatch(d, call(99)) == AcceptedReply(42, AcceptStat.PROC_UNAVAIL)


def test_handler_errors(caplog: pytest.LogCaptureFixture) -> None:
    d, _ = toy_dispatcher()
    assert dispatch(d, call(ADD, u32(1))) == AcceptedReply(42, AcceptStat.GARBAGE_ARGS)
    assert dispatch(d, call(ADD, u32(1, 2, 3))) == AcceptedReply(42, AcceptStat.GARBAGE_ARGS)
    assert dispatch(d, call(WEAK)) == AuthErrorReply(42, AuthStat.AUTH_TOOWEAK)
    with caplog.at_level(logging.ERROR, logger="rpc.server"):
        assert dispatch(d, call(BOOM)) == AcceptedReply(42, AcceptStat.SYSTEM_ERR)
    assert "BOOM" in caplog.text and "RuntimeError" in caplog.text  # traceback logged
    assert dispatch(d, call(DROP)) is None


def test_header_errors_and_close_decision() -> None:
    d, _ = toy_dispatcher()
    bad_vers = bytearray(call(0))
    bad_vers[11] = 3
    reply, close = asyncio.run(d.handle(bytes(bad_vers), PEER, "tcp"))
    assert decode_reply(reply or b"") == RpcMismatchReply(42, 2, 2) and not close
    too_many_gids = OpaqueAuth(1, u32(0, 0, 0, 0, 17, *range(17)))  # gids<16>
    reply, close = asyncio.run(d.handle(call(0, cred=too_many_gids), PEER, "tcp"))
    assert decode_reply(reply or b"") == AuthErrorReply(42, AuthStat.AUTH_BADCRED) and not close
    for garbage in (b"", b"\x00" * 7, encode_call(1, 2, 3, 4)[:20], u32(42, 1, 0, 0, 0, 0)):
        assert asyncio.run(d.handle(garbage, PEER, "tcp")) == (None, True)
    assert d.stats.outcomes["UNDECODABLE"] == 4


def test_unsupported_flavor_is_badcred() -> None:
    d, _ = toy_dispatcher()
    gss = OpaqueAuth(6, b"\x00" * 8)
    assert dispatch(d, call(0, cred=gss)) == AuthErrorReply(42, AuthStat.AUTH_BADCRED)
    only_sys = RpcDispatcher(flavors={1})
    only_sys.add_program(ToyService().program())
    assert dispatch(only_sys, call(0)) == AuthErrorReply(42, AuthStat.AUTH_BADCRED)


def test_context_carries_credential_and_transport() -> None:
    d, _ = toy_dispatcher()
    cred = AuthSys(1, b"vm", 1000, 100, (100, 4))
    reply = dispatch(d, call(WHOAMI, cred=cred.to_opaque()))
    assert isinstance(reply, AcceptedReply)
    assert reply.body[:12] == u32(1, 1000, 100)
    assert b"tcp" in reply.body and b"127.0.0.1" in reply.body


def test_program_table_validation() -> None:
    with pytest.raises(ValueError):
        Program(1, "p", {})
    with pytest.raises(ValueError):
        Program(1, "p", {1: {1: NULL_PROCEDURE}})
    with pytest.raises(ValueError):
        procedure_table([NULL_PROCEDURE, Procedure(0, "AGAIN", null_handler)])
    d = RpcDispatcher()
    d.add_program(Program(1, "p", {1: procedure_table([NULL_PROCEDURE])}))
    with pytest.raises(ValueError):
        d.add_program(Program(1, "p", {2: procedure_table([NULL_PROCEDURE])}))


def test_stats() -> None:
    d, _ = toy_dispatcher()
    for _ in range(3):
        dispatch(d, call(ECHO, b"x"))
    dispatch(d, call(ADD, b""))
    dispatch(d, call(99))
    echo = d.stats.procs[(TOY_PROG, 3, ECHO)]
    assert (echo.program, echo.name, echo.calls, echo.errors) == ("toy", "ECHO", 3, {})
    assert echo.latency.count == 3 and echo.latency.seconds >= 0
    assert d.stats.procs[(TOY_PROG, 3, ADD)].latency.count == 1
    assert d.stats.procs[(TOY_PROG, 3, ADD)].errors == {"GARBAGE_ARGS": 1}
    assert d.stats.outcomes["SUCCESS"] == 3
    assert d.stats.outcomes["GARBAGE_ARGS"] == 1
    assert d.stats.outcomes["PROC_UNAVAIL"] == 1


def test_a_program_s_own_failure_statuses_count_as_errors() -> None:
    """A SUCCESS reply whose results carry a non-OK status of the program's own is an error
    of its procedure, by that status; RPC-level failures count by their outcome."""
    service = ToyService()
    d = RpcDispatcher()
    d.add_program(service.program(), lambda proc, body: "BAD" if body[:3] == b"bad" else None)
    for args in (b"bad1", b"good", b"bad2", b""):
        assert dispatch(d, call(ECHO, args)) == AcceptedReply(42, AcceptStat.SUCCESS, args)
    dispatch(d, call(ADD, u32(1)))
    dispatch(d, call(DROP))
    procs = d.stats.procs
    assert procs[(TOY_PROG, 3, ECHO)].calls == 4
    assert procs[(TOY_PROG, 3, ECHO)].errors == {"BAD": 2}
    assert procs[(TOY_PROG, 3, ADD)].errors == {"GARBAGE_ARGS": 1}
    assert procs[(TOY_PROG, 3, DROP)].errors == {"DROPPED": 1}
    assert d.stats.outcomes["SUCCESS"] == 4


# --------------------------------------------------------------------------- DRC


def test_drc_replays_completed_non_idempotent_call() -> None:
    d, service = toy_dispatcher()
    record = call(INCR, u32(0))
    first = asyncio.run(d.dispatch(record, PEER, "tcp"))
    again = asyncio.run(d.dispatch(record, ("127.0.0.1", 901), "udp"))  # same host
    assert first is not None and again == first
    assert service.incr_runs == 1 and service.counter == 1
    assert d.stats.outcomes["DRC_HIT"] == 1
    # another host, another xid or other arguments are different calls
    assert asyncio.run(d.dispatch(record, ("127.0.0.2", 900), "tcp")) != first
    assert asyncio.run(d.dispatch(call(INCR, u32(0), xid=43), PEER, "tcp")) is not None
    assert asyncio.run(d.dispatch(call(INCR, u32(1)), PEER, "tcp")) is not None
    assert service.incr_runs == 4


def test_drc_drops_retransmission_while_in_progress() -> None:
    d, service = toy_dispatcher()
    record = call(INCR, u32(100))

    async def scenario() -> list[bytes | None]:
        first = asyncio.create_task(d.dispatch(record, PEER, "tcp"))
        await asyncio.sleep(0.01)
        second, close = await d.handle(record, PEER, "tcp")  # original still sleeping
        assert not close  # a dropped duplicate must not close the connection
        return [await first, second, await d.dispatch(record, PEER, "tcp")]

    first, second, third = asyncio.run(scenario())
    assert first is not None and second is None and third == first
    assert service.incr_runs == 1
    assert d.stats.outcomes["DRC_IN_PROGRESS"] == 1


def test_idempotent_calls_bypass_the_drc() -> None:
    d, _ = toy_dispatcher()
    dispatch(d, call(ECHO, b"x"))
    dispatch(d, call(ECHO, b"x"))
    assert len(d.drc) == 0 and d.stats.procs[(TOY_PROG, 3, ECHO)].calls == 2


def test_dropped_call_is_not_cached() -> None:
    d, _ = toy_dispatcher()
    assert dispatch(d, call(DROP)) is None
    assert dispatch(d, call(DROP)) is None
    assert d.stats.procs[(TOY_PROG, 3, DROP)].calls == 2  # the retransmission ran again
    assert len(d.drc) == 0


def test_drc_bounds() -> None:
    now = [0.0]
    drc = DuplicateRequestCache(max_entries=3, max_age=10.0, max_bytes=10, clock=lambda: now[0])
    keys = [DuplicateRequestCache.key("h", xid, 1, 1, 1, b"") for xid in range(5)]
    for key in keys[:3]:
        assert drc.begin(key) == (DrcState.NEW, None)
        drc.complete(key, b"r")
    assert drc.begin(keys[0]) == (DrcState.DONE, b"r")
    assert drc.begin(keys[3])[0] is DrcState.NEW  # evicts the oldest (keys[0])
    assert len(drc) == 3
    assert drc.begin(keys[0])[0] is DrcState.NEW  # forgotten: runs again
    assert drc.begin(keys[0]) == (DrcState.IN_PROGRESS, None)
    now[0] = 20.0
    assert drc.begin(keys[4])[0] is DrcState.NEW  # everything else expired
    assert len(drc) == 1 and drc.total_bytes == 0
    drc.complete(keys[4], b"0123456789")
    drc.complete(keys[1], b"x")  # 11 bytes > 10: the older entry goes
    assert drc.begin(keys[4])[0] is DrcState.NEW
    drc.abandon(keys[4])
    assert len(drc) == 1 and drc.total_bytes == 1


def test_drc_key_uses_args_checksum() -> None:
    k1 = DuplicateRequestCache.key("h", 1, 2, 3, 4, b"abcd")
    assert k1 == DuplicateRequestCache.key("h", 1, 2, 3, 4, b"abcd")
    assert k1 != DuplicateRequestCache.key("h", 1, 2, 3, 4, b"abce")


# --------------------------------------------------------------------------- fuzzing


def _fuzz_dispatcher() -> RpcDispatcher:
    service = ToyService()
    service.max_delay_ms = 0
    dispatcher = RpcDispatcher()
    dispatcher.add_program(service.program())
    return dispatcher


VALID = [
    call(0),
    call(ECHO, b"abcd", cred=AuthSys(1, b"m", 2, 3, (4,)).to_opaque()),
    call(ADD, u32(1, 2)),
    call(INCR, u32(0), verf=NULL_AUTH),
]


def mutate(record: bytes, rng: random.Random) -> bytes:
    data = bytearray(record)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:
            data = data[: rng.randrange(len(data) + 1)]
        elif op == 2:
            data += rng.randbytes(rng.randrange(16))
        elif data:
            pos = rng.randrange(0, len(data), 4) if len(data) >= 4 else 0
            data[pos : pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x01\x91", u32(17)])
    return bytes(data)


def _check_reply(record: bytes, reply: bytes | None) -> None:
    if reply is not None:
        decoded = decode_reply(reply)
        assert decoded.xid == peek_xid(record)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200), st.sampled_from(VALID), st.integers(0, 2**32 - 1))
def test_dispatch_never_raises(noise: bytes, valid: bytes, seed: int) -> None:
    d = _fuzz_dispatcher()
    mutated = mutate(valid, random.Random(seed))

    async def run() -> None:
        for record in (noise, mutated):
            _check_reply(record, await d.dispatch(record, PEER, "udp"))

    asyncio.run(run())


def test_thousands_of_mutated_records(caplog: pytest.LogCaptureFixture) -> None:
    d = _fuzz_dispatcher()
    rng = random.Random(1234)

    async def run() -> None:
        for _ in range(5000):
            record = mutate(rng.choice(VALID), rng)
            _check_reply(record, await d.dispatch(record, PEER, "tcp"))

    with caplog.at_level(logging.ERROR, logger="rpc.server"):
        asyncio.run(run())
    assert "SYSTEM_ERR" not in caplog.text and d.stats.outcomes["SYSTEM_ERR"] == 0
    assert d.stats.outcomes["SUCCESS"] > 0 and d.stats.outcomes["UNDECODABLE"] > 0
