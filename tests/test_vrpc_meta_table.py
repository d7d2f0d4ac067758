"""VRPC attribute tables (issue #12 item 5, design 7.2/7.5): the sealed memfd, the seqlocked
entries and the store epoch, on both backends (C `vrpc_meta_*` and `vrpc.pymeta`)."""

from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.store.epoch import EpochFile
from tests.vrpc_helpers import BACKENDS, NATIVE_REQUIRED, PAIRS
from vrpc import abi
from vrpc.meta import map_table, meta_backend, new_table
from vrpc.native import NATIVE_AVAILABLE
from vrpc.pymeta import MetaOpenError, bucket

BUCKETS = 64
needs_native = pytest.mark.skipif(
    not NATIVE_AVAILABLE and not NATIVE_REQUIRED, reason="vrpc._native is not built"
)


def fattr(n: int) -> bytes:
    return bytes([n & 0xFF]) * abi.FATTR3_SIZE


@pytest.fixture
def epoch(tmp_path: Path) -> EpochFile:
    (tmp_path / "meta").mkdir()
    return EpochFile.open(tmp_path)


def ends(server: str, client: str, epoch: EpochFile | None, buckets: int = BUCKETS):  # type: ignore[no-untyped-def]
    table = new_table(buckets)
    writer = meta_backend(server).writer(table.map, buckets=buckets, vm_ns=7, epoch=epoch)
    reader = meta_backend(client).reader(map_table(table.fd), epoch=epoch)
    return table, writer, reader


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_publish_lookup_invalidate_bump(server: str, client: str, epoch: EpochFile) -> None:
    _, w, r = ends(server, client, epoch)
    assert r.vm_ns == 7 and r.buckets == BUCKETS
    e0 = epoch.stable()
    assert e0 == 0
    assert r.lookup(7, 0, 5) is None
    assert w.publish(7, 0, 5, fattr(1), insert=False, epoch0=e0) == -errno.ENOENT
    assert w.publish(7, 0, 5, fattr(1), epoch0=e0) >= 0
    assert r.lookup(7, 0, 5) == fattr(1)
    assert r.lookup(7, 1, 5) is None and r.lookup(8, 0, 5) is None and r.lookup(7, 0, 6) is None
    assert w.publish(7, 0, 5, fattr(2), insert=False, epoch0=e0) >= 0
    assert r.lookup(7, 0, 5) == fattr(2)
    assert w.invalidate(7, 0, 5) and not w.invalidate(7, 0, 5)
    assert r.lookup(7, 0, 5) is None
    w.publish(7, 0, 5, fattr(3), epoch0=e0)
    w.publish(7, 0, 9, fattr(4), epoch0=e0)
    w.bump()
    assert r.lookup(7, 0, 5) is None and r.lookup(7, 0, 9) is None
    # after a bump nothing is "present": the observer's update-only publish does not revive it
    assert w.publish(7, 0, 5, fattr(5), insert=False, epoch0=e0) == -errno.ENOENT
    w.publish(7, 0, 5, fattr(5), epoch0=e0)
    assert r.lookup(7, 0, 5) == fattr(5)


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_external_writer_makes_every_entry_miss(server: str, client: str, epoch: EpochFile) -> None:
    _, w, r = ends(server, client, epoch)
    w.publish(7, 0, 5, fattr(1), epoch0=0)
    assert r.lookup(7, 0, 5) == fattr(1)
    begun = epoch.begin()  # an operator command holds LMDB's writer lock
    assert r.lookup(7, 0, 5) is None and w.lookup(7, 0, 5) is None
    assert w.publish(7, 0, 5, fattr(2), epoch0=0) == -errno.ESTALE  # nothing published
    assert w.publish(7, 0, 5, fattr(2), epoch0=begun) == -errno.ESTALE
    epoch.end(begun)
    assert r.lookup(7, 0, 5) is None  # published before the external write: misses for good
    assert w.publish(7, 0, 5, fattr(2), epoch0=0) == -errno.ESTALE  # read before it: refused
    w.publish(7, 0, 5, fattr(3), epoch0=epoch.stable() or 0)
    assert r.lookup(7, 0, 5) == fattr(3)
    # a writer that died between begin and end disables tables until the server repairs
    epoch.begin()
    assert r.lookup(7, 0, 5) is None
    epoch.repair()
    assert epoch.stable() == 2
    w.publish(7, 0, 5, fattr(4), epoch0=2)
    assert r.lookup(7, 0, 5) == fattr(4)


@pytest.mark.parametrize("name", BACKENDS)
def test_private_mac_array_guards_server_lookups(name: str, epoch: EpochFile) -> None:
    _, w, _ = ends(name, name, epoch)
    mac = bytes(range(16))
    w.publish(7, 0, 5, fattr(1), mac=mac)
    assert w.lookup(7, 0, 5, mac) == fattr(1)
    assert w.lookup(7, 0, 5, bytes(16)) is None
    assert w.lookup(7, 0, 5) == fattr(1)


_GOOD = {"ns": 7, "vol": 0, "ino": 5, "fattr3": fattr(9), "flags": 0, "mac": bytes(16)}
BAD_PUBLISH = {
    "short fattr3": {"fattr3": fattr(9)[:-1]},
    "long fattr3": {"fattr3": fattr(9) + b"x"},
    "bytearray fattr3": {"fattr3": bytearray(fattr(9))},
    "memoryview fattr3": {"fattr3": memoryview(fattr(9))},
    "short mac": {"mac": bytes(15)},
    "long mac": {"mac": bytes(17)},
    "bytearray mac": {"mac": bytearray(16)},
    "negative ns": {"ns": -1},
    "ns beyond u32": {"ns": 1 << 32},
    "vol beyond u16": {"vol": 1 << 16},
    "negative ino": {"ino": -1},
    "ino beyond u64": {"ino": 1 << 64},
    "float ino": {"ino": 5.0},
    "flags beyond u32": {"flags": 1 << 32},
    "unknown flag bit": {"flags": 4},
    "negative epoch0": {"epoch0": -1},
    "epoch0 beyond u64": {"epoch0": 1 << 64},
}


def _refusal(name: str, epoch: EpochFile, bad: dict) -> tuple[type, str]:  # type: ignore[type-arg]
    """What backend `name` raises for a publish with `bad` over good arguments; the table
    (entries and the private MAC array) must be exactly as before."""
    table, w, r = ends(name, name, epoch)
    mac = bytes(range(16))
    w.publish(7, 0, 5, fattr(1), mac=mac)
    w.publish(7, 0, 6, fattr(2), mac=mac)
    before = bytes(table.map)
    args = {**_GOOD, "epoch0": 0, **bad}
    with pytest.raises((TypeError, ValueError)) as refused:
        w.publish(
            args["ns"], args["vol"], args["ino"], args["fattr3"],
            flags=args["flags"], mac=args["mac"], epoch0=args["epoch0"],
        )  # fmt: skip
    assert bytes(table.map) == before
    assert w.lookup(7, 0, 5, mac) == fattr(1) and w.lookup(7, 0, 6, mac) == fattr(2)
    assert r.lookup(7, 0, 6) == fattr(2)
    return type(refused.value), str(refused.value)


@needs_native
@pytest.mark.parametrize("bad", BAD_PUBLISH.values(), ids=BAD_PUBLISH.keys())
def test_both_backends_refuse_bad_publish_arguments_alike(bad: dict, epoch: EpochFile) -> None:  # type: ignore[type-arg]
    refusals = {name: _refusal(name, epoch, bad) for name in ("native", "python")}
    assert refusals["native"] == refusals["python"], refusals
    field = next(iter(bad))
    assert field.removesuffix("3") in refusals["python"][1].lower()  # names what is wrong


@needs_native
@pytest.mark.parametrize("key", [(-1, 0, 5), (1 << 32, 0, 5), (7, 1 << 16, 5), (7, 0, -1)])
def test_both_backends_refuse_bad_invalidate_keys_alike(key: tuple, epoch: EpochFile) -> None:  # type: ignore[type-arg]
    refusals = []
    for name in ("native", "python"):
        _, w, _ = ends(name, name, epoch)
        w.publish(7, 0, 5, fattr(1))
        with pytest.raises(ValueError) as refused:
            w.invalidate(*key)
        assert w.lookup(7, 0, 5) == fattr(1)
        refusals.append(str(refused.value))
    assert refusals[0] == refusals[1]


@pytest.mark.parametrize("name", BACKENDS)
def test_two_way_buckets_evict_the_older(name: str, epoch: EpochFile) -> None:
    _, w, r = ends(name, name, epoch, buckets=2)  # one bucket pair: every key collides
    w.publish(1, 0, 1, fattr(1))
    w.publish(1, 0, 2, fattr(2))
    assert r.lookup(1, 0, 1) == fattr(1) and r.lookup(1, 0, 2) == fattr(2)
    w.publish(1, 0, 1, fattr(3))  # rewritten in place: now the younger
    w.publish(1, 0, 3, fattr(4))  # evicts key 2, the older
    assert r.lookup(1, 0, 1) == fattr(3)
    assert r.lookup(1, 0, 2) is None
    assert r.lookup(1, 0, 3) == fattr(4)


@pytest.mark.parametrize("name", BACKENDS)
def test_clients_cannot_write_the_table(name: str, epoch: EpochFile) -> None:
    table, w, _ = ends(name, name, epoch)
    w.publish(7, 0, 5, fattr(1))
    fd = os.open(f"/proc/self/fd/{table.fd}", os.O_RDWR)  # what a client could reopen
    try:
        for target in (table.fd, fd):
            with pytest.raises(PermissionError):
                mmap.mmap(target, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.pwrite(target, b"x", 4096)
            with pytest.raises(PermissionError):
                os.ftruncate(target, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(target, 1 << 30)
    finally:
        os.close(fd)
    ro = map_table(table.fd)
    with pytest.raises(TypeError):
        ro[0:1] = b"x"
    # the server's own mapping stays writable
    w.publish(7, 0, 5, fattr(2))
    assert meta_backend(name).reader(ro, epoch=epoch).lookup(7, 0, 5) == fattr(2)


@pytest.mark.parametrize("name", BACKENDS)
def test_reader_refuses_foreign_mappings(name: str, epoch: EpochFile) -> None:
    table = new_table(BUCKETS)
    reader = meta_backend(name).reader
    with pytest.raises(MetaOpenError) as bad:
        reader(map_table(table.fd), epoch=epoch)  # never initialised: no magic
    assert bad.value.errno == errno.EBADMSG
    meta_backend(name).writer(table.map, buckets=BUCKETS, vm_ns=1, epoch=epoch)
    struct.pack_into("=H", table.map, 8, abi.ABI_MAJOR + 1)
    with pytest.raises(MetaOpenError) as major:
        reader(map_table(table.fd), epoch=epoch)
    assert major.value.errno == errno.EPROTONOSUPPORT
    struct.pack_into("=HHIII", table.map, 8, abi.ABI_MAJOR, 0, 4096, 4096, BUCKETS * 2)
    with pytest.raises(MetaOpenError) as geometry:
        reader(map_table(table.fd), epoch=epoch)
    assert geometry.value.errno == errno.EINVAL


def test_buckets_are_the_same_in_c_and_python() -> None:
    from vrpc.native import _native

    if _native is None:
        pytest.skip("vrpc._native is not built")
    for key in [(0, 0, 0), (1, 2, 3), (2**32 - 1, 2**16 - 1, 2**64 - 1), (7, 0, 12345)]:
        for buckets in (2, 64, 1 << 20):
            assert _native.lib.vrpc_meta_bucket(buckets, *key) == bucket(buckets, *key)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["publish", "update", "invalidate", "bump", "external"]),
        st.integers(0, 11),
        st.integers(0, 255),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_backends_agree_byte_for_byte_and_never_answer_stale(ops: list, tmp_path_factory) -> None:  # type: ignore[no-untyped-def,type-arg]
    tmp = tmp_path_factory.mktemp("epoch")
    (tmp / "meta").mkdir()
    epoch = EpochFile.open(tmp)
    names = ["python"]
    from vrpc.native import NATIVE_AVAILABLE

    if NATIVE_AVAILABLE:
        names.append("native")
    tables = [new_table(8) for _ in names]
    writers = [
        meta_backend(n).writer(t.map, buckets=8, vm_ns=3, epoch=epoch)
        for n, t in zip(names, tables, strict=True)
    ]
    model: dict[tuple[int, int, int], bytes] = {}
    for op, k, v in ops:
        key = (3, k % 2, k)
        e0 = epoch.stable()
        assert e0 is not None
        if op in ("publish", "update"):
            results = [
                w.publish(*key, fattr(v), epoch0=e0, insert=op == "publish") for w in writers
            ]
            assert len(set(results)) == 1
            if results[0] >= 0:
                model[key] = fattr(v)
        elif op == "invalidate":
            assert len({w.invalidate(*key) for w in writers}) == 1
            model.pop(key, None)
        elif op == "bump":
            for w in writers:
                w.bump()
            model.clear()
        else:
            epoch.end(epoch.begin())
            model.clear()
        for w in writers:
            for kk in range(12):
                got = w.lookup(3, kk % 2, kk)
                assert got is None or got == model.get((3, kk % 2, kk)), "stale or foreign hit"
        if op in ("publish", "update") and key in model:
            assert all(w.lookup(*key) == model[key] for w in writers)
    if len(tables) == 2:
        assert tables[0].map[:] == tables[1].map[:]


def _rewrite(fd: int, name: str, epoch_dir: str, rounds: int) -> None:
    epoch = EpochFile.open(Path(epoch_dir))
    buf = mmap.mmap(fd, abi.meta_size(BUCKETS), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    w = meta_backend(name).writer(buf, buckets=BUCKETS, vm_ns=1, epoch=epoch)
    for i in range(rounds):
        w.publish(1, 0, 42, fattr(i), epoch0=0)


@pytest.mark.parametrize(("server", "client"), PAIRS)
def test_readers_in_another_process_never_see_a_torn_entry(
    server: str, client: str, tmp_path: Path
) -> None:
    (tmp_path / "meta").mkdir()
    epoch = EpochFile.open(tmp_path)
    # The writer maps the memfd before sealing in real use; here the writer child gets a
    # writable mapping of an unsealed memfd, the reader a read-only one.
    fd = os.memfd_create("t", 0)
    os.ftruncate(fd, abi.meta_size(BUCKETS))
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_rewrite, args=(fd, server, str(tmp_path), 20000))
    child.start()
    reader = None
    hits = 0
    while child.is_alive() or reader is None:
        if reader is None:
            ro = mmap.mmap(fd, abi.meta_size(BUCKETS), mmap.MAP_SHARED, mmap.PROT_READ)
            try:
                reader = meta_backend(client).reader(ro, epoch=epoch)
            except MetaOpenError:
                reader = None
                if not child.is_alive():
                    break
                continue
        got = reader.lookup(1, 0, 42)
        if got is not None:
            hits += 1
            assert got == bytes([got[0]]) * abi.FATTR3_SIZE, "torn entry"
    child.join()
    assert child.exitcode == 0
    assert hits > 0


def test_store_epoch_module_mirrors_the_abi() -> None:
    from prism.store import epoch as ep

    assert ep.EPOCH_MAGIC == abi.EPOCH_MAGIC and ep.EPOCH_SIZE == abi.EPOCH_SIZE
    begun, ended = abi.EPOCH_FILE["begun"][0], abi.EPOCH_FILE["ended"][0]
    assert (begun, ended) == (ep._BEGUN * 8, ep._ENDED * 8)
