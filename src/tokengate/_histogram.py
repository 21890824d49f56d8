"""A fixed-memory, log-bucketed latency histogram.

Why this shape: every task completion records one duration, on whichever worker thread ran it,
so ``record`` must cost about one ``math.log`` and one list-index increment, take no lock and
never allocate. Buckets grow geometrically by ``GROWTH`` (2 %), so any percentile is known to
within half a bucket (about 1 %) of the exact value, from 1 µs up to an hour, in a preallocated
list of ~1100 ints whatever the number of samples. Each histogram is owned by one thread;
snapshots combine the per-thread histograms with :meth:`LatencyHistogram.merged`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate
from operator import add

__all__ = ["CEILING", "FLOOR", "GROWTH", "RELATIVE_PRECISION", "LatencyHistogram"]

GROWTH = 1.02
"""Ratio between consecutive bucket edges."""
RELATIVE_PRECISION = math.sqrt(GROWTH) - 1.0
"""Worst relative error of a percentile inside the resolved range (a bucket's half-width)."""
FLOOR = 1e-6
"""Lowest resolved duration (seconds): anything below lands in the underflow bucket 0."""

_LOG_GROWTH = math.log(GROWTH)
_SCALE = 1.0 / _LOG_GROWTH
# Enough regular buckets to reach one hour; bucket k (1.._REGULAR) holds
# FLOOR*GROWTH**(k-1) <= v < FLOOR*GROWTH**k, so k = floor(log(v) * _SCALE + _OFFSET):
# one multiply-add after the log.
_REGULAR = math.ceil(math.log(3600.0 / FLOOR) * _SCALE)
_OFFSET = 1.0 - math.log(FLOOR) * _SCALE
_OVERFLOW = _REGULAR + 1

CEILING = FLOOR * GROWTH**_REGULAR
"""Top of the resolved range (just over an hour): anything above lands in the overflow bucket."""
_NBUCKETS = _REGULAR + 2
_PAIRWISE = 4
"""Up to this many histograms, :meth:`LatencyHistogram.merged` adds them pair by pair."""
# Module globals are cheaper to reach than attributes of the math module, and math.floor has a
# fast path for floats that makes it ~3x cheaper than int() on CPython.
_log = math.log
_floor = math.floor
_isnan = math.isnan


def _bucket_index(seconds: float) -> int:
    """Bucket of ``seconds`` (the same formula ``record`` inlines); for reads, not the hot path."""
    if seconds >= FLOOR:
        i = _floor(_log(seconds) * _SCALE + _OFFSET)
        return _OVERFLOW if i > _REGULAR else i
    return 0


def _check_histogram(other: object) -> LatencyHistogram:
    if not isinstance(other, LatencyHistogram):
        raise TypeError(f"can only merge a LatencyHistogram, got {type(other).__name__}: {other!r}")
    return other


def _bad_latency(seconds: float) -> str:
    return (
        f"latency must be a finite, non-negative number of seconds, got {seconds!r}; "
        "measure durations with a monotonic clock"
    )


def _bucket_midpoint(index: int) -> float:
    """Geometric centre of regular bucket ``index``: the estimate with least relative error."""
    return FLOOR * math.exp((index - 0.5) * _LOG_GROWTH)


class LatencyHistogram:
    """Durations in seconds, log-bucketed, plus exact ``count``, ``sum``, ``min`` and ``max``.

    Not thread-safe by design: one thread owns and records into each histogram (a lock on the
    hot path would serialise every worker). Other threads may read or :meth:`merge` it at any
    time; they see every bucket count atomically, with totals lagging by at most the records in
    progress.
    """

    __slots__ = ("_counts", "_max", "_min", "count", "sum")

    count: int
    """Number of recorded durations (exact)."""
    sum: float
    """Sum of recorded durations in seconds (exact up to float rounding)."""

    def __init__(self) -> None:
        self._counts: list[int] = [0] * _NBUCKETS
        self.count = 0
        self.sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    def record(self, seconds: float) -> None:
        """Add one duration. Hot path: one log, one index increment, a few compares.

        Values below ``FLOOR`` (including 0) go in the underflow bucket, values above
        ``CEILING`` in the overflow bucket; ``min``/``max``/``sum`` stay exact either way.
        A negative, NaN or infinite value raises ``ValueError`` and leaves the histogram unchanged.
        """
        if seconds >= FLOOR:
            try:
                i = _floor(_log(seconds) * _SCALE + _OFFSET)
            except OverflowError:  # floor(inf)
                raise ValueError(_bad_latency(seconds)) from None
            if i > _REGULAR:
                i = _OVERFLOW
        elif seconds >= 0.0:  # also rejects NaN, which compares false
            i = 0
        else:
            raise ValueError(_bad_latency(seconds))
        self._counts[i] += 1
        self.count += 1
        self.sum += seconds
        # Plain compares: cheaper than calling the max()/min() builtins on the hot path.
        if seconds > self._max:  # noqa: PLR1730
            self._max = seconds
        if seconds < self._min:  # noqa: PLR1730
            self._min = seconds

    @property
    def min(self) -> float:
        """Smallest recorded duration, exact; 0.0 when empty."""
        return self._min if self.count else 0.0

    @property
    def max(self) -> float:
        """Largest recorded duration, exact; 0.0 when empty."""
        return self._max if self.count else 0.0

    @property
    def mean(self) -> float:
        """Arithmetic mean in seconds; 0.0 when empty."""
        return self.sum / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank ``q``-th percentile (``q`` in [0, 100]) in seconds; 0.0 when empty.

        The result lies in the same bucket as the exact nearest-rank value (the sample at rank
        ``max(1, ceil(q * count / 100))`` in sorted order), so it is within
        ``RELATIVE_PRECISION`` of it inside [FLOOR, CEILING); it is never below ``min`` nor above
        ``max``, and the ranks 1 and ``count`` return ``min`` and ``max`` exactly.
        """
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile q must be between 0 and 100 inclusive, got q={q!r}")
        n = self.count
        if n == 0:
            return 0.0
        rank = max(1, math.ceil(q * n / 100.0))
        lo, hi = self._min, self._max
        if rank >= n:
            return hi
        if rank == 1:
            return lo
        # The first bucket whose running total reaches the rank; accumulate and bisect do the
        # scan in C (a dashboard reads a few percentiles of every operation every refresh).
        index = bisect_left(list(accumulate(self._counts)), rank)
        if index == 0:
            return lo
        if index >= _OVERFLOW:
            # index > _OVERFLOW only if this was merged from a histogram being recorded into:
            # `count` was read after the buckets, so it may run ahead of them.
            return hi
        return min(max(_bucket_midpoint(index), lo), hi)

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s samples into this histogram in place (``other`` is unchanged).

        This is how a snapshot combines the per-thread shards; merging is exact for counts,
        ``min`` and ``max``, so merge-then-query equals recording everything into one.
        """
        _check_histogram(other)
        self._counts = list(map(add, self._counts, other._counts))
        self.count += other.count
        self.sum += other.sum
        self._max = max(self._max, other._max)
        self._min = min(self._min, other._min)

    @classmethod
    def merged(cls, hists: Iterable[LatencyHistogram]) -> LatencyHistogram:
        """A new histogram holding the samples of every histogram in ``hists`` (left untouched)."""
        out = cls()
        # Empty ones are skipped and the rest summed bucket by bucket in one pass (in C): a
        # snapshot merges a histogram per thread and operation, most of them empty or sparse.
        full = [h for h in hists if _check_histogram(h).count]
        if not full:
            return out
        counts = [h._counts for h in full]
        if len(counts) <= _PAIRWISE:  # bucket by bucket, pairwise: cheapest for a few
            merged = list(counts[0])
            for more in counts[1:]:
                merged = list(map(add, merged, more))
            out._counts = merged
        else:  # one pass over every bucket: cheapest for many
            out._counts = list(map(sum, zip(*counts, strict=True)))
        for h in full:  # totals read after the buckets, as merge() does
            out.count += h.count
            out.sum += h.sum
            out._max = max(out._max, h._max)
            out._min = min(out._min, h._min)
        return out

    def cumulative_buckets(self, bounds: Sequence[float]) -> list[int]:
        """For each upper bound, how many samples are ``<= bound`` (a Prometheus ``le`` count).

        Exact for a bound below ``min`` (0) or at/above ``max`` (``count``); otherwise the whole
        bucket containing the bound is counted, so the answer is off by at most that bucket's
        samples (a bound above ``CEILING`` but below ``max`` counts the samples up to
        ``CEILING``). Results are non-decreasing for sorted bounds; ``math.inf`` gives ``count``.
        """
        prefix = list(accumulate(self._counts))
        n = self.count
        out: list[int] = []
        for bound in bounds:
            if _isnan(bound):
                raise ValueError(f"histogram bounds must be numbers, got {bound!r} in {bounds!r}")
            if n == 0 or bound < self._min:
                out.append(0)
            elif bound >= self._max:
                out.append(n)
            else:
                # The overflow bucket is unbounded above: count it only once `bound >= max`.
                out.append(min(prefix[min(_bucket_index(bound), _REGULAR)], n))
        return out

    def __repr__(self) -> str:
        return (
            f"LatencyHistogram(count={self.count}, min={self.min:.6g}, "
            f"mean={self.mean:.6g}, max={self.max:.6g})"
        )
