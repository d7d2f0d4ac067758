"""The redo journal: record format, recovery after a crash, ownership, failed checkpoints."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism.errors import Busy
from prism.store import Store
from prism.store import journal as J
from prism.store.check import fsck
from prism.store.writelock import WriteLock

REPO = Path(__file__).resolve().parent.parent

changes = st.lists(
    st.tuples(
        st.sampled_from([J.PUT, J.DELETE]),
        st.integers(0, 9),
        st.binary(min_size=1, max_size=40),
        st.binary(max_size=60),
    ).map(lambda c: (c[0], c[1], c[2], c[3] if c[0] == J.PUT else b"")),
    max_size=20,
)


@given(changes)
def test_changes_round_trip(batch: list[J.Change]) -> None:
    assert list(J.decode_changes(J.encode_changes(batch))) == batch


@given(st.binary(max_size=200))
def test_decoding_garbage_raises_only_corrupt(data: bytes) -> None:
    with contextlib.suppress(J.Corrupt):
        list(J.decode_changes(data))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8), st.data())
def test_only_a_torn_last_record_may_be_dropped(
    tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes], data: st.DataObject
) -> None:
    """One changed byte anywhere in a record: the last one is a torn tail (dropped); any
    other stops recovery with Corrupt naming its offset, never a silent prefix."""
    path = tmp_path_factory.mktemp("j") / "journal"
    journal = J.Journal.open(path, size=64 << 10)
    try:
        journal.start(7)
        offsets = []
        for payload in payloads:
            offsets.append(journal.offset)
            journal.append(payload)
        assert list(journal.records(7)) == payloads
        assert list(journal.records(6)) == [] and list(journal.records(8)) == []
        victim = data.draw(st.integers(0, len(payloads) - 1))
        size = J.HEADER.size + len(payloads[victim])
        spot = offsets[victim] + data.draw(st.integers(0, size - 1))
        byte = os.pread(journal._fd, 1, spot)
        os.pwrite(journal._fd, bytes([byte[0] ^ data.draw(st.integers(1, 255))]), spot)
        if victim == len(payloads) - 1:
            assert journal.recover(7) == payloads[:victim]
            assert journal.offset == offsets[victim]  # the next append overwrites it
        else:
            with pytest.raises(J.Corrupt, match=f"at offset {offsets[victim]} "):
                journal.recover(7)
    finally:
        journal.close()


def _v1_record(generation: int, payload: bytes) -> bytes:
    """A record as format 1 wrote it (before each header carried its own checksum)."""
    summed = J.xxhash.xxh3_64(struct.pack("<QI", generation, len(payload)))
    summed.update(payload)
    return J.HEADER_V1.pack(J.MAGIC_V1, generation, len(payload), summed.intdigest()) + payload


def test_a_format_1_journal_still_replays(tmp_path: Path) -> None:
    journal = J.Journal.open(tmp_path / "journal", size=64 << 10)
    try:
        old = [b"first", b"second" * 50, b""]
        os.pwrite(journal._fd, b"".join(_v1_record(3, p) for p in old), 0)
        assert journal.recover(3) == old
        journal.append(b"appended in format 2")  # after a checkpoint that failed
        assert journal.recover(3) == [*old, b"appended in format 2"]
    finally:
        journal.close()


def test_a_new_generation_hides_the_old_records(tmp_path: Path) -> None:
    journal = J.Journal.open(tmp_path / "journal", size=64 << 10)
    journal.start(1)
    for n in range(5):
        journal.append(b"old %d" % n)
    journal.start(2)
    journal.append(b"new")
    assert list(journal.records(2)) == [b"new"]
    journal.close()


def test_the_file_is_written_zeros_of_the_full_size(tmp_path: Path) -> None:
    journal = J.Journal.open(tmp_path / "journal")
    journal.close()
    assert os.stat(tmp_path / "journal").st_size == J.JOURNAL_SIZE
    assert os.stat(tmp_path / "journal").st_blocks * 512 >= J.JOURNAL_SIZE  # no holes


CRASHER = textwrap.dedent(
    """
    import os, sys
    from prism.store import Store
    store = Store.open(sys.argv[1], journal=True)
    root = store.namespace("vm").root
    store.begin_batch()
    for i in range(int(sys.argv[2])):
        f = store.create(root, b"durable%d" % i, 0o644).oid
        store.write(f, 0, b"payload %d" % i * 1000)
        store.make_durable()
    store.create(root, b"never-durable", 0o644)
    print("ACKED", flush=True)
    os._exit(0)  # dies like a killed server: the batch is never committed
    """
)


def crash_with_acknowledged_changes(data: Path, count: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", CRASHER, str(data), str(count)],
        capture_output=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert out.stdout == b"ACKED\n", out.stderr.decode()


def names(store: Store) -> set[bytes]:
    entries, _ = store.readdir(store.namespace("vm").root, 0, limit=1000)
    return {e.name for e in entries}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    with Store.open(tmp_path / "data") as store:
        store.create_namespace("vm")
    return tmp_path / "data"


def test_acknowledged_changes_survive_the_death_of_their_owner(data: Path) -> None:
    crash_with_acknowledged_changes(data, 20)
    with Store.open(data) as store:  # an operator command: replays what was left
        assert names(store) == {b"durable%d" % i for i in range(20)}
        f = store.lookup(store.namespace("vm").root, b"durable7").oid
        assert store.read(f, 0, 100_000)[0] == b"payload 7" * 1000
        assert fsck(store).errors == []
    with Store.open(data, journal=True) as store:  # and nothing is applied twice
        assert names(store) == {b"durable%d" % i for i in range(20)}
        assert fsck(store).errors == []


def test_the_next_server_replays_too(data: Path) -> None:
    crash_with_acknowledged_changes(data, 3)
    with Store.open(data, journal=True) as store:
        assert names(store) == {b"durable0", b"durable1", b"durable2"}
        store.begin_batch()
        store.create(store.namespace("vm").root, b"after", 0o644)
        store.make_durable()
        store.commit()
    with Store.open(data) as store:
        assert names(store) == {b"durable0", b"durable1", b"durable2", b"after"}
        assert fsck(store).errors == []


def test_a_torn_last_record_is_dropped_cleanly(data: Path) -> None:
    crash_with_acknowledged_changes(data, 4)
    journal = J.Journal.open(data / "meta" / "journal")  # its owner is gone: we may
    found = list(journal.records(0))  # a new store's first generation
    assert len(found) == 4
    last = sum(J.HEADER.size + len(p) for p in found[:-1])
    os.pwrite(journal._fd, b"\xff" * 8, last + J.HEADER.size + 3)
    journal.close()
    with Store.open(data) as store:
        assert names(store) == {b"durable0", b"durable1", b"durable2"}
        assert fsck(store).errors == []


def test_only_one_process_owns_the_journal(data: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from prism.store import Store; s = Store.open(sys.argv[1], "
            "journal=True); print('OWNED', flush=True); sys.stdin.read()",
            str(data),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"OWNED\n"
        with pytest.raises(Busy, match="owns"):
            Store.open(data, journal=True, journal_wait=0.2)
        with Store.open(data) as store:  # others still read and write (not journaled)
            store.create(store.namespace("vm").root, b"from-cli", 0o644)
    finally:
        holder.communicate(b"", timeout=30)
    with Store.open(data, journal=True) as store:
        assert names(store) == {b"from-cli"}


def test_a_failed_checkpoint_keeps_what_was_acknowledged(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(data, journal=True) as store:
        root = store.namespace("vm").root
        verifier = store.boot_id
        store.begin_batch()
        store.create(root, b"acked", 0o644)
        store.make_durable()
        store.create(root, b"not-acked", 0o644)
        real = store.segments.sync
        calls = []

        def fail_once() -> None:
            calls.append(1)
            if len(calls) == 1:  # as an fdatasync failing inside the checkpoint would
                raise OSError(5, "simulated I/O error")
            real()

        monkeypatch.setattr(store.segments, "sync", fail_once)
        with pytest.raises(OSError, match="simulated"):
            store.commit()
        monkeypatch.undo()
        assert store.in_batch  # reopened from the journal, which still holds "acked"
        assert names(store) == {b"acked"}
        assert store.boot_id != verifier  # clients resend their UNSTABLE writes
        other = WriteLock(data)  # nobody may write on top of LMDB without "acked"
        assert not other.try_acquire()
        other.close()
        store.commit()  # a later checkpoint succeeds
    with Store.open(data) as store:
        assert names(store) == {b"acked"}
        assert fsck(store).errors == []


STATISTICS = textwrap.dedent(
    """
    import os, sys
    from prism.store import Store, quota, txn
    from prism.store.layers import view_of
    txn.RSTAT_COMPACT = 60  # (bytes) merge the pending differences every few operations
    journal = sys.argv[2] == "journal"
    store = Store.open(sys.argv[1], journal=journal)
    ctx, ns = store.ctx, store.namespace("vm").id
    store.begin_batch()
    dirs = [store.root(ns)]
    for k in range(4):
        dirs.append(store.mkdir(dirs[-1], b"d%d" % k).oid)
    for i in range(40):
        at = dirs[1 + i % 4]
        f = store.create(at, b"f%d" % i).oid
        store.write(f, 0, b"x" * (100 + i))
        if i % 3 == 0:  # across directories
            store.rename(at, b"f%d" % i, dirs[1 + (i + 1) % 4], b"f%d" % i)
        if i % 5 == 0:  # an operation that fails after adding differences (folding some)
            try:
                with txn.write(ctx) as t:
                    d = dirs[2]
                    quota.add_rstat(ctx, view_of(ctx, t, ns), (d.vol, d.ino), (10**6, 7))
                    if i % 10 == 0:
                        quota.fold(ctx, t)
                    raise RuntimeError("fails")
            except RuntimeError:
                pass
        if i == 22:
            store.snapshot("vm", "mid")  # folds inside the batch, journaling the deletions
        if journal:
            store.make_durable()
    if journal:
        print("ACKED", flush=True)
        os._exit(0)  # dies like a killed server: the batch is never committed
    store.commit()
    store.close()
    print("ACKED", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["journal", "plain"])
def test_deferred_statistics_stay_exact_through_merges_failures_and_replay(
    data: Path, mode: str
) -> None:
    """A long batch merges its pending statistics (one difference per directory: with a
    journal, those already journaled; without, all), an operation that fails takes its
    own differences back (a fold inside it too), and what a dead owner journaled replays
    once: every directory's figures are exact afterwards."""
    from prism.store import quota, txn
    from prism.store.tree import locate

    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", STATISTICS, str(data), mode],
        capture_output=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert out.stdout == b"ACKED\n", out.stderr.decode()
    with Store.open(data) as store:  # replays what a dead owner left
        expected = (sum(100 + i for i in range(40)), 40 + 4 + 1)
        used = store.usage("vm")
        assert (used.logical_bytes, used.files) == expected
        with txn.read(store.ctx) as t:
            root = locate(store.ctx, t, store.root(store.namespace("vm").id))[2]
        assert quota.rstat(root) == expected
        assert fsck(store).errors == []
