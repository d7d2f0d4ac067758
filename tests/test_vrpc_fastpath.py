"""The C fast path (issue #12 item 4, design 5.3): GETATTR and NULL answered in C from the VM's
attribute table are byte-identical to what `RpcDispatcher.handle_now` sends for the same
record, or C declines. Hypothesis builds valid records and mutates them byte by byte."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism.nfs.service import NfsService
from prism.store import Store
from prism.store.executor import StoreExecutor
from rpc.message import NULL_AUTH, AuthSys, OpaqueAuth, encode_call
from rpc.server import TRANSPORT_SHM, RpcDispatcher
from vrpc.native import NATIVE_AVAILABLE, _native
from vrpc.publisher import MetaPublisher

pytestmark = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="vrpc._native is not built")
PEER = ("vrpc:vm:0:00", 1)


@dataclass
class World:
    store: Store
    dispatcher: RpcDispatcher
    publisher: MetaPublisher
    vm: int
    other: int
    handles: list[bytes]  # published through the VM's channel
    unpublished: list[bytes]
    foreign: bytes  # the other VM's object, published in its own table

    def python(self, record: bytes, vm: int | None = None) -> Any:
        return self.dispatcher.handle_now(record, PEER, TRANSPORT_SHM, binding=vm or self.vm)

    def fast(self, record: bytes) -> bytes | None:
        out = _native.ffi.new("uint8_t[]", 112)
        n = _native.lib.vrpc_fast_answer(self.publisher.cdata(self.vm), record, len(record), out)
        return _native.ffi.buffer(out)[:n] if n > 0 else None


def getattr_call(xid: int, fh: bytes, cred: OpaqueAuth = NULL_AUTH) -> bytes:
    args = struct.pack(">I", len(fh)) + fh + b"\0" * (-len(fh) % 4)
    return encode_call(xid, 100003, 3, 1, args, cred)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    store = Store.open(tmp_path_factory.mktemp("fast") / "data", journal=True)
    try:
        vm = store.create_namespace("vm")
        other = store.create_namespace("other")
        service = NfsService(StoreExecutor(store))
        dispatcher = RpcDispatcher()
        dispatcher.add_program(service.program())
        publisher = MetaPublisher(store.epoch, buckets=64, boot_id=store.boot_id)
        service.meta = publisher
        store.observer = publisher
        publisher.attach(vm.id)
        publisher.attach(other.id)
        made = [store.create(vm.root, f"f{i}".encode(), 0o644) for i in range(4)]
        store.commit()
        handles = [service.fh(vm.root).data] + [service.fh(a.oid).data for a in made[:3]]
        w = World(store, dispatcher, publisher, vm.id, other.id, handles, [], b"")
        for i, fh in enumerate(handles):
            reply, close = w.python(getattr_call(i, fh))  # publishes
            assert not close and reply is not None
        w.unpublished = [service.fh(made[3].oid).data]
        foreign = store.create(other.root, b"x", 0o644)
        store.commit()
        w.foreign = service.fh(foreign.oid).data
        w.python(getattr_call(9, w.foreign), vm=other.id)
        yield w
        publisher.close()
    finally:
        store.close()


def test_published_getattr_and_null_are_answered_in_c_byte_for_byte(world: World) -> None:
    for i, fh in enumerate(world.handles):
        record = getattr_call(1000 + i, fh)
        fast = world.fast(record)
        assert fast is not None and len(fast) == 112
        assert fast == world.python(record)[0]
    record = encode_call(77, 100003, 3, 0)
    assert world.fast(record) == world.python(record)[0]
    assert world.fast(encode_call(77, 100005, 3, 0)) is None  # whether MOUNT runs: Python's


def test_declines_what_it_cannot_prove(world: World) -> None:
    assert world.fast(getattr_call(1, world.unpublished[0])) is None  # never published
    assert world.fast(getattr_call(1, world.foreign)) is None  # another VM's table
    fh = bytearray(world.handles[1])
    fh[-1] ^= 1  # a forged MAC for a published key
    assert world.fast(getattr_call(1, bytes(fh))) is None
    assert world.python(getattr_call(1, bytes(fh)))[0][24:28] == struct.pack(">I", 10001)
    record = getattr_call(5, world.handles[1])
    world.store.epoch.end(world.store.epoch.begin())  # an operator command wrote meanwhile
    assert world.fast(record) is None
    world.python(record)  # republished under the new epoch
    assert world.fast(record) == world.python(record)[0]


creds = st.one_of(
    st.just(NULL_AUTH),
    st.builds(
        lambda stamp, name, uid, gid, gids: AuthSys(stamp, name, uid, gid, tuple(gids)).to_opaque(),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=40),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.lists(st.integers(0, 2**32 - 1), max_size=16),
    ),
    st.builds(OpaqueAuth, st.integers(0, 6), st.binary(max_size=64)),
)
verfs = st.one_of(
    st.just(NULL_AUTH), st.builds(OpaqueAuth, st.integers(0, 3), st.binary(max_size=8))
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    xid=st.integers(0, 2**32 - 1),
    cred=creds,
    verf=verfs,
    kind=st.sampled_from(["getattr", "getattr", "forged", "null_nfs", "null_mount", "other_proc"]),
    mutate=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=3),
    trail=st.binary(max_size=6),
)
def test_differential_c_equals_python_or_declines(
    world: World,
    data: st.DataObject,
    xid: int,
    cred: OpaqueAuth,
    verf: OpaqueAuth,
    kind: str,
    mutate: list[tuple[float, int]],
    trail: bytes,
) -> None:
    fh = data.draw(st.sampled_from(world.handles + world.unpublished + [world.foreign]))
    if kind == "forged":  # one byte of a handle changed: version, ns, vol, ino or MAC
        i, flip = data.draw(st.integers(0, len(fh) - 1)), data.draw(st.integers(1, 255))
        fh = fh[:i] + bytes([fh[i] ^ flip]) + fh[i + 1 :]
        kind = "getattr"
    if kind == "getattr":
        args = struct.pack(">I", len(fh)) + fh + b"\0"
        record = encode_call(xid, 100003, 3, 1, args, cred, verf)
    elif kind == "null_nfs":
        record = encode_call(xid, 100003, 3, 0, b"", cred, verf)
    elif kind == "null_mount":
        record = encode_call(xid, 100005, 3, 0, b"", cred, verf)
    else:
        record = encode_call(xid, 100003, 3, data.draw(st.integers(2, 21)), b"", cred, verf)
    raw = bytearray(record + trail)
    for where, byte in mutate:  # anywhere in the record, header, credential or handle
        raw[int(where * len(raw))] = byte
    record = bytes(raw)
    fast = world.fast(record)
    if fast is None:
        return  # declined: Python answers it (unchanged, on the Python path)
    outcome = world.python(record)
    assert type(outcome) is tuple, "C answered a call Python would have to wait for"
    assert outcome == (fast, False)
