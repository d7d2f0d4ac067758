"""`rpc.latency.Latencies`: Prometheus histogram semantics from per-bucket counters.

A bucket's bound is inclusive (an observation equal to it counts there), an observation
above every bound goes to +Inf only, `cumulative()` is what a scrape shows, and its last
count always equals `count`.
"""

from __future__ import annotations

import math

from rpc.latency import LATENCY_BUCKETS, Latencies


def test_bounds_are_inclusive_and_cumulative() -> None:
    lat = Latencies()
    lat.observe(LATENCY_BUCKETS[0])  # exactly on the first bound
    lat.observe(LATENCY_BUCKETS[0] * 1.0001)  # just above it: the second bucket
    lat.observe(0.0)
    lat.observe(LATENCY_BUCKETS[-1] + 1)  # above every bound
    lat.observe(0.003, n=5)  # five calls of 3 ms (VRPC's fast path folds them so)
    buckets = dict(lat.cumulative())
    assert buckets[LATENCY_BUCKETS[0]] == 2
    assert buckets[LATENCY_BUCKETS[1]] == 3
    assert buckets[0.0025] == 3 and buckets[0.005] == 8
    assert buckets[LATENCY_BUCKETS[-1]] == 8
    assert buckets[math.inf] == lat.count == 9
    counts = [n for _, n in lat.cumulative()]
    assert counts == sorted(counts)
    assert math.isclose(lat.seconds, LATENCY_BUCKETS[0] * 2.0001 + LATENCY_BUCKETS[-1] + 1 + 0.015)

    assert len(lat.counts) == len(LATENCY_BUCKETS) + 1
