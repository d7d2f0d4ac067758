"""Latency histograms a hot path can feed: bucket counters, no lock, no allocation.

Theory of operation: an observation adds one to the bucket its duration falls in (found by
`bisect` over the fixed upper bounds `LATENCY_BUCKETS`, each inclusive: a duration d lands in
the first bucket whose bound is >= d, or in the last, unbounded one) and its seconds to the
sum. Counts are per bucket, not cumulative, so an observation touches one slot; a reader
(the metrics endpoint, `prism.metrics`) makes them cumulative when it reads them. Counters
only grow: a histogram is never reset while the process lives, as Prometheus expects.

Everything that feeds a `Latencies` runs on the server's event loop thread, so plain integer
additions suffice, and a reader on that thread sees every bucket and the sum agree.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

LATENCY_BUCKETS: tuple[float, ...] = (
    10e-6,
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds in seconds, 10 µs (a GETATTR answered from the store's cache) to 10 s (an
fsync on a saturated disk); slower observations go to the unbounded last bucket."""


def _no_observations() -> list[int]:
    return [0] * (len(LATENCY_BUCKETS) + 1)


@dataclass(slots=True)
class Latencies:
    """A histogram of durations: `counts[i]` observations in bucket i (the last: above
    every bound), and their `seconds` in all."""

    counts: list[int] = field(default_factory=_no_observations)
    seconds: float = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        """Count `n` observations of `seconds` each."""
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += n
        self.seconds += seconds * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, the last bound infinite:
        a Prometheus histogram's buckets."""
        out, total = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
