"""rpc.admission: the connection table's caps, eviction order and stalled records."""

from __future__ import annotations

import pytest

from rpc.admission import ConnectionLimits, ConnectionTable


def table(total: int = 4, per_address: int = 2, timeout: float = 10.0) -> ConnectionTable[str]:
    return ConnectionTable(
        ConnectionLimits(total, per_address, timeout), is_bound=lambda host: host == "vm"
    )


def test_per_address_cap() -> None:
    t = table(per_address=2)
    assert t.admit("a", "x")[0] is not None
    assert t.admit("b", "x")[0] is not None
    assert t.admit("c", "x") == (None, [])
    assert t.admit("d", "y")[0] is not None
    assert t.count("x") == 2 and t.refused == 1


def test_at_the_cap_unbound_go_first_oldest_first() -> None:
    t = table(total=3, per_address=10)
    first, _ = t.admit("u1", "x")
    t.admit("u2", "y")
    t.admit("b1", "vm")
    assert t.admit("u3", "z") == (None, [])  # an unbound newcomer is refused
    entry, evict = t.admit("b2", "vm")
    assert entry is not None and evict == ["u1"]
    entry, evict = t.admit("b3", "vm")
    assert entry is not None and evict == ["u2"]
    assert t.admit("b4", "other-vm-host") == (None, [])  # unbound, and all are bound
    assert t.admit("b4", "vm") == (None, [])  # bound, but nothing left to evict
    assert len(t) == 3 and t.evicted == 2
    assert first is not None
    t.release(first)  # already evicted: releasing again changes nothing
    assert len(t) == 3


def test_stalled_connections_expire() -> None:
    t = table(timeout=10.0)
    a, _ = t.admit("a", "vm")
    b, _ = t.admit("b", "x")
    assert a is not None and b is not None
    t.waiting(a, 100.0)
    t.waiting(b, 105.0)
    assert t.stalled == 2
    assert t.expired(109.0) == []
    assert t.expired(110.0) == ["a"]
    t.waiting(b, 112.0)  # new bytes arrived
    assert t.expired(116.0) == []
    t.waiting(b, None)  # the record completed
    assert t.expired(1000.0) == [] and t.stalled == 0
    assert len(t) == 1 and t.expired_count == 1


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        ConnectionLimits(0, 1, 1.0)
    with pytest.raises(ValueError):
        ConnectionLimits(1, 1, 0.0)
