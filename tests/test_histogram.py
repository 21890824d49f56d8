"""LatencyHistogram: percentiles against exact ones, exact totals, merging, range edges."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokengate._histogram import CEILING, FLOOR, GROWTH, RELATIVE_PRECISION, LatencyHistogram

# Float rounding at a bucket edge may put a value in the neighbouring bucket; that costs at most
# a relative 1e-15 on top of the documented precision.
TOLERANCE = RELATIVE_PRECISION * (1 + 1e-9)

in_range = st.floats(min_value=FLOOR, max_value=CEILING * 0.999, allow_nan=False)
any_duration = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
quantiles = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


def exact_percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the sample at rank ceil(q*n/100) (at least 1), sorted."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) / 100.0))
    return ordered[rank - 1]


def filled(values: list[float]) -> LatencyHistogram:
    h = LatencyHistogram()
    for v in values:
        h.record(v)
    return h


@settings(max_examples=300, deadline=None)
@given(values=st.lists(in_range, min_size=1, max_size=300), q=quantiles)
def test_percentile_within_relative_precision_of_exact(values: list[float], q: float) -> None:
    h = filled(values)
    exact = exact_percentile(values, q)
    got = h.percentile(q)
    assert got == pytest.approx(exact, rel=TOLERANCE)
    assert min(values) <= got <= max(values)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(any_duration, min_size=1, max_size=200), q=quantiles)
def test_percentile_never_outside_min_max_whatever_the_range(values: list[float], q: float) -> None:
    h = filled(values)
    assert h.min <= h.percentile(q) <= h.max


def test_precision_is_about_one_percent() -> None:
    assert 0.005 < RELATIVE_PRECISION <= 0.01
    assert FLOOR <= 1e-6
    assert CEILING >= 3600.0


def test_percentile_on_a_spread_of_known_values() -> None:
    values = [i / 1000 for i in range(1, 1001)]  # 1 ms .. 1 s
    h = filled(values)
    for q, exact in [(50, 0.5), (95, 0.95), (99, 0.99), (10, 0.1)]:
        assert h.percentile(q) == pytest.approx(exact, rel=TOLERANCE)
    assert h.percentile(0) == 0.001
    assert h.percentile(100) == 1.0


def test_single_value_gives_that_value_at_every_quantile() -> None:
    h = filled([0.123])
    for q in (0, 1, 50, 99.9, 100):
        assert h.percentile(q) == 0.123


@settings(max_examples=200, deadline=None)
@given(values=st.lists(any_duration, min_size=1, max_size=200))
def test_count_min_max_sum_mean_are_exact(values: list[float]) -> None:
    h = filled(values)
    assert h.count == len(values)
    assert h.min == min(values)
    assert h.max == max(values)
    assert h.sum == pytest.approx(math.fsum(values), rel=1e-12, abs=1e-300)
    assert h.mean == pytest.approx(math.fsum(values) / len(values), rel=1e-12, abs=1e-300)


def test_empty_histogram() -> None:
    h = LatencyHistogram()
    assert h.count == 0
    assert h.sum == 0.0
    assert (h.min, h.max, h.mean) == (0.0, 0.0, 0.0)
    for q in (0, 50, 100):
        assert h.percentile(q) == 0.0
    assert h.cumulative_buckets([0.1, 1.0, math.inf]) == [0, 0, 0]
    assert "count=0" in repr(h)


@pytest.mark.parametrize("q", [-0.001, -5, 100.0001, 1000, math.nan, math.inf])
def test_bad_quantile_is_rejected_with_its_value(q: float) -> None:
    h = filled([0.5])
    with pytest.raises(ValueError, match=r"q=") as info:
        h.percentile(q)
    assert repr(q) in str(info.value)


@pytest.mark.parametrize("bad", [-0.001, -1e-12, math.nan, math.inf, -math.inf])
def test_bad_durations_are_rejected_and_leave_the_histogram_unchanged(bad: float) -> None:
    h = filled([0.25])
    with pytest.raises(ValueError, match="non-negative number of seconds"):
        h.record(bad)
    assert (h.count, h.min, h.max, h.sum) == (1, 0.25, 0.25, 0.25)
    assert h.cumulative_buckets([math.inf]) == [1]


def test_values_outside_the_resolved_range() -> None:
    tiny, zero, huge = 1e-9, 0.0, 1e5
    h = filled([tiny, zero, 0.5, huge, huge * 3])
    assert h.count == 5
    assert h.min == zero
    assert h.max == huge * 3
    assert h.percentile(0) == zero
    assert h.percentile(100) == huge * 3
    # rank 2 sits in the underflow bucket, rank 4 in the overflow bucket: both stay in range.
    assert zero <= h.percentile(40) < FLOOR
    assert CEILING < h.percentile(80) <= huge * 3
    assert h.percentile(60) == pytest.approx(0.5, rel=TOLERANCE)
    assert h.cumulative_buckets([FLOOR / 10, 1.0, CEILING, math.inf]) == [2, 3, 3, 5]


@settings(max_examples=150, deadline=None)
@given(
    a=st.lists(any_duration, max_size=100),
    b=st.lists(any_duration, max_size=100),
    c=st.lists(any_duration, max_size=100),
)
def test_merge_equals_recording_everything_into_one(
    a: list[float], b: list[float], c: list[float]
) -> None:
    one = filled(a + b + c)
    ha, hb, hc = filled(a), filled(b), filled(c)
    merged = LatencyHistogram.merged([ha, hb, hc])
    in_place = filled(a)
    in_place.merge(hb)
    in_place.merge(hc)
    bounds = [0.0, 1e-7, 1e-5, 1e-3, 0.01, 0.1, 0.5, 1.0, 10.0, 1e3, 1e5, math.inf]
    for h in (merged, in_place):
        assert (h.count, h.min, h.max) == (one.count, one.min, one.max)
        assert h.sum == pytest.approx(one.sum, rel=1e-12, abs=1e-300)
        for q in (0, 1, 10, 25, 50, 75, 90, 95, 99, 99.9, 100):
            assert h.percentile(q) == one.percentile(q)
        assert h.cumulative_buckets(bounds) == one.cumulative_buckets(bounds)
    # merged() leaves its inputs untouched
    assert (ha.count, hb.count, hc.count) == (len(a), len(b), len(c))
    assert filled(a).cumulative_buckets(bounds) == ha.cumulative_buckets(bounds)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.lists(any_duration, max_size=30), max_size=9))
def test_merged_of_any_number_of_histograms_some_empty_equals_one(
    parts: list[list[float]],
) -> None:
    # merged() adds a few histograms pair by pair and sums many bucket by bucket; both ways,
    # and skipping the empty ones, give what recording everything into one gives.
    one = filled([v for part in parts for v in part])
    merged = LatencyHistogram.merged([filled(part) for part in parts])
    assert (merged.count, merged.min, merged.max) == (one.count, one.min, one.max)
    for q in (0, 1, 50, 95, 99, 100):
        assert merged.percentile(q) == one.percentile(q)
    bounds = [0.0, 1e-5, 1e-3, 0.1, 1.0, 1e3, math.inf]
    assert merged.cumulative_buckets(bounds) == one.cumulative_buckets(bounds)


def test_merged_of_nothing_is_empty_and_merge_rejects_other_types() -> None:
    assert LatencyHistogram.merged([]).count == 0
    with pytest.raises(TypeError, match="LatencyHistogram"):
        LatencyHistogram().merge([0.1, 0.2])  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(in_range, min_size=1, max_size=200),
    bounds=st.lists(in_range, min_size=1, max_size=20),
)
def test_cumulative_buckets_within_one_bucket_of_exact(
    values: list[float], bounds: list[float]
) -> None:
    h = filled(values)
    bounds = sorted(bounds)
    got = h.cumulative_buckets(bounds)
    assert got == sorted(got)  # non-decreasing for sorted bounds
    for bound, count in zip(bounds, got, strict=True):
        at_most = sum(v <= bound for v in values)
        within_a_bucket = sum(v <= bound * GROWTH * (1 + 1e-9) for v in values)
        assert at_most <= count <= within_a_bucket
    assert h.cumulative_buckets([math.inf, 0.0]) == [len(values), 0]


def test_cumulative_buckets_rejects_nan_bounds() -> None:
    with pytest.raises(ValueError, match="nan"):
        filled([0.1]).cumulative_buckets([0.5, math.nan])


def test_memory_is_fixed() -> None:
    h = LatencyHistogram()
    assert not hasattr(h, "__dict__")
    before = len(h._counts)
    for i in range(10_000):
        h.record(i * 1e-3)
    assert len(h._counts) == before < 2000
