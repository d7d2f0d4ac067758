"""The NLM lock manager (`prism.nlm.locks`) against a byte-ownership model.

The hypothesis state machine runs random lock / unlock / test / blocking lock / cancel /
free-client sequences by several owners of two clients over two files, and after every step
checks that the held locks cover exactly the bytes the model says each owner holds (with the
model's type), that no two held locks conflict, that one owner's locks neither overlap nor
touch with the same type (merged), and that the per-client counters equal what is held.
Ranges end at or below SIZE, or run to end of file (length 0): the model's byte SIZE stands
for everything from SIZE on, which only such ranges cover.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prism.nlm.locks import END, LockManager, Outcome, Owner, covered, span

SIZE = 12
OWNERS = [Owner("10.0.0.1", 1, b"a"), Owner("10.0.0.1", 2, b"b"), Owner("10.0.0.2", 1, b"a")]
FILES = ["f", "g"]

Model = dict[str, dict[int, dict[Owner, bool]]]


def model_range(offset: int, length: int) -> range:
    return range(offset, SIZE + 1 if length == 0 else offset + length)


class LockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = LockManager(max_locks=10_000, max_waiters=10_000)
        self.model: Model = {f: {} for f in FILES}
        self.waiting: list[tuple[str, Owner, int, int, bool]] = []  # FIFO, as the manager

    def conflict(self, file: str, owner: Owner, r: range, exclusive: bool) -> bool:
        bytes_ = self.model[file]
        return any(
            o != owner and (exclusive or ex) for b in r for o, ex in bytes_.get(b, {}).items()
        )

    def hold(self, file: str, owner: Owner, r: range, exclusive: bool) -> None:
        for b in r:
            self.model[file].setdefault(b, {})[owner] = exclusive

    def release(self, file: str, owner: Owner, r: range) -> None:
        for b in r:
            self.model[file].get(b, {}).pop(owner, None)

    def wake(self, file: str) -> list[tuple[str, Owner, int, int, bool]]:
        granted = []
        for w in list(self.waiting):
            wf, owner, off, ln, ex = w
            if wf == file and not self.conflict(file, owner, model_range(off, ln), ex):
                self.hold(file, owner, model_range(off, ln), ex)
                self.waiting.remove(w)
                granted.append(w)
        return granted

    @rule(
        file=st.sampled_from(FILES),
        owner=st.sampled_from(OWNERS),
        offset=st.integers(0, SIZE - 1),
        length=st.integers(0, SIZE - 1),
        exclusive=st.booleans(),
        block=st.booleans(),
    )
    def lock(
        self, file: str, owner: Owner, offset: int, length: int, exclusive: bool, block: bool
    ) -> None:
        length = min(length, SIZE - offset)
        r = model_range(offset, length)
        start, end = span(offset, length)
        result = self.m.lock(file, owner, start, end, exclusive, block=block)
        if self.conflict(file, owner, r, exclusive):
            assert result is (Outcome.BLOCKED if block else Outcome.DENIED)
            key = (file, owner, offset, length, exclusive)
            if block and key not in self.waiting:
                self.waiting.append(key)
        else:
            assert result is Outcome.GRANTED
            self.hold(file, owner, r, exclusive)
            key = (file, owner, offset, length, exclusive)
            if key in self.waiting:
                self.waiting.remove(key)

    @rule(
        file=st.sampled_from(FILES),
        owner=st.sampled_from(OWNERS),
        offset=st.integers(0, SIZE - 1),
        length=st.integers(0, SIZE - 1),
    )
    def unlock(self, file: str, owner: Owner, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        start, end = span(offset, length)
        granted = self.m.unlock(file, owner, start, end)
        self.release(file, owner, model_range(offset, length))
        expected = self.wake(file)
        got = [(w.file, w.owner, w.start, w.end, w.exclusive) for w in granted]
        want = [(f, o, *span(off, ln), ex) for f, o, off, ln, ex in expected]
        assert got == want

    @rule(
        file=st.sampled_from(FILES),
        owner=st.sampled_from(OWNERS),
        offset=st.integers(0, SIZE - 1),
        length=st.integers(0, SIZE - 1),
        exclusive=st.booleans(),
    )
    def test(self, file: str, owner: Owner, offset: int, length: int, exclusive: bool) -> None:
        length = min(length, SIZE - offset)
        start, end = span(offset, length)
        holder = self.m.test(file, owner, start, end, exclusive)
        assert (holder is not None) == self.conflict(
            file, owner, model_range(offset, length), exclusive
        )
        if holder is not None:
            assert holder.owner != owner and holder.overlaps(start, end)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if not self.waiting:
            return
        w = data.draw(st.sampled_from(self.waiting))
        file, owner, offset, length, exclusive = w
        assert self.m.cancel(file, owner, *span(offset, length), exclusive)
        self.waiting.remove(w)

    @rule(client=st.sampled_from(["10.0.0.1", "10.0.0.2"]))
    def free_client(self, client: str) -> None:
        granted = self.m.free_client(client)
        for file in FILES:
            for holders in self.model[file].values():
                for o in [o for o in holders if o.client == client]:
                    del holders[o]
        self.waiting = [w for w in self.waiting if w[1].client != client]
        expected = [w for file in FILES for w in self.wake(file)]
        assert sorted((w.file, w.owner, w.start) for w in granted) == sorted(
            (f, o, off) for f, o, off, _, _ in expected
        )

    @invariant()
    def matches_model(self) -> None:
        for file in FILES:
            locks = [lk for lk in self.m.locks() if lk.file == file]
            got = {b: h for b, h in covered(locks, SIZE + 1).items() if h}
            want = {b: h for b, h in self.model[file].items() if h}
            assert got == want
            for i, a in enumerate(locks):
                assert a.end <= END
                for b in locks[i + 1 :]:
                    assert not a.conflicts(b.owner, b.start, b.end, b.exclusive)
                    if a.owner == b.owner:
                        assert not a.overlaps(b.start, b.end)
                        if a.exclusive == b.exclusive:
                            assert a.end != b.start and b.end != a.start
        for client in ("10.0.0.1", "10.0.0.2"):
            assert self.m.held_by(client) == sum(
                1 for lk in self.m.locks() if lk.owner.client == client
            )
        assert len(list(self.m.waiters())) == len(self.waiting)


TestLockMachine = LockMachine.TestCase
TestLockMachine.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)


def test_split_upgrade_downgrade_and_whole_file() -> None:
    m = LockManager()
    a, b = OWNERS[0], OWNERS[2]
    assert m.lock("f", a, 0, END, True) is Outcome.GRANTED  # whole file
    assert m.lock("f", b, 100, 101, False) is Outcome.DENIED
    assert m.unlock("f", a, 10, 20) == []  # splits into [0,10) and [20,END)
    assert [(lk.start, lk.end) for lk in m.locks()] == [(0, 10), (20, END)]
    assert m.lock("f", b, 10, 20, False) is Outcome.GRANTED
    assert m.lock("f", a, 0, 10, False) is Outcome.GRANTED  # downgrade
    assert m.lock("f", b, 5, 15, False) is Outcome.GRANTED  # shared with shared
    assert m.lock("f", b, 5, 15, True) is Outcome.DENIED  # upgrade refused: a shares 5..9
    assert m.held_by("10.0.0.1") == 2


def test_limits_nolocks() -> None:
    m = LockManager(max_locks=2, max_waiters=1)
    a, b = OWNERS[0], OWNERS[2]
    assert m.lock("f", a, 0, 1, True) is Outcome.GRANTED
    assert m.lock("f", a, 2, 3, True) is Outcome.GRANTED
    assert m.lock("f", a, 4, 5, True) is Outcome.NOLOCKS
    assert m.lock("f", a, 1, 2, True) is Outcome.GRANTED  # merges: fewer locks, not more
    assert m.held_by(a.client) == 1
    assert m.lock("f", b, 0, 1, True, block=True) is Outcome.BLOCKED
    assert m.lock("f", b, 1, 2, True, block=True) is Outcome.NOLOCKS
    assert m.lock("f", b, 0, 1, True, block=True) is Outcome.BLOCKED  # the same waiter again
    assert m.share("g", a, 1, 0) is Outcome.GRANTED
    assert m.lock("f", a, 4, 5, True) is Outcome.NOLOCKS  # locks and shares count together


def test_waiters_expire_and_free_client_grants() -> None:
    m = LockManager(waiter_ttl=10)
    a, b, c = OWNERS
    assert m.lock("f", a, 0, END, True) is Outcome.GRANTED
    assert m.lock("f", b, 0, 1, True, block=True, now=0) is Outcome.BLOCKED
    assert m.lock("f", c, 0, 1, True, block=True, now=5) is Outcome.BLOCKED
    assert m.lock("f", c, 0, 1, True, block=True, now=8) is Outcome.BLOCKED  # refreshed
    assert [w.owner for w in m.expire(12)] == [b]
    granted = m.free_client(a.client)
    assert [w.owner for w in granted] == [c]
    assert m.clients() == {c.client}


def test_share_reservations() -> None:
    m = LockManager()
    a, b = OWNERS[0], OWNERS[2]
    assert m.share("f", a, access=3, deny=2) is Outcome.GRANTED  # rw, deny writers
    assert m.share("f", b, access=1, deny=0) is Outcome.GRANTED  # reader: fine
    assert m.share("f", b, access=2, deny=0) is Outcome.DENIED  # writer: denied
    m.unshare("f", a)
    assert m.share("f", b, access=2, deny=0) is Outcome.GRANTED
    assert m.held_by(b.client) == 1
