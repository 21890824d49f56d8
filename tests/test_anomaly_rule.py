"""The Guard House's anomaly rule: calls far from their operation's history go to quarantine.

Run-time history is driven through ``AnomalyRule.record`` (no clock, no sleeping); the one test
that learns from real runs judges sizes only.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tokengate import AnomalyRule, OperationsCoordinator, task_token_guard
from tokengate.observability.guard_house._anomaly import MEASURED_ARGUMENTS, argument_size


@task_token_guard(operation_type="an_load")
def load(data: Any) -> int:
    return len(data)


@task_token_guard(operation_type="an_scale")
def scale(n: int) -> int:
    return n


@task_token_guard(operation_type="an_flaky")
def flaky(data: bytes) -> int:
    raise ValueError("flaky")


def by_first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
    return float(args[0])


@pytest.fixture
def coordinator(make_coordinator: Callable[..., OperationsCoordinator]) -> OperationsCoordinator:
    return make_coordinator(workers_per_core=1, process_lane=False)


def test_argument_size_is_cheap_and_in_bytes() -> None:
    assert argument_size((b"x" * 1000,), {}) == sys.getsizeof(b"x" * 1000)
    assert argument_size((), {"data": memoryview(bytes(500))}) == 500
    assert argument_size(([0] * 100,), {}) == sys.getsizeof([0] * 100)  # shallow: items unseen
    assert argument_size((3, 2.5, None, object()), {}) == 0  # scalars and unknown objects
    arguments = tuple(b"abc" for _ in range(MEASURED_ARGUMENTS + 10))
    assert argument_size(arguments, {}) == MEASURED_ARGUMENTS * sys.getsizeof(b"abc")


def test_argument_size_of_an_array_is_its_nbytes() -> None:
    np = pytest.importorskip("numpy")
    array = np.zeros((100, 100))
    assert argument_size((array[::2],), {}) == 5000 * 8  # a view: its own elements


def test_nothing_is_held_before_min_runs(coordinator: OperationsCoordinator) -> None:
    rule = AnomalyRule(min_runs=5, time_factor=None)
    coordinator.hold_when(rule)
    for _ in range(4):
        rule.record("an_load", 1000, 0.01)
    assert load(bytes(1_000_000)).get(timeout=10) == 1_000_000  # 4 runs: not judged yet
    big = load(bytes(1_000_000))
    assert coordinator.quarantine == {
        big: "argument size 1 MB is 1000x the operation's median 1 KB over the last 5 runs"
    }
    assert coordinator.reject(big, "too big") is True  # the 5th run was the first big call


def test_a_size_far_from_the_median_is_held_with_its_figures(
    coordinator: OperationsCoordinator,
) -> None:
    rule = AnomalyRule(time_factor=None)  # the defaults: 10x the median of >= 20 runs
    coordinator.hold_when(rule)
    for _ in range(119):
        rule.record("an_load", 2000, 0.01)
    rule.record("an_load", 10**9, 0.01)  # one outlier does not move the median
    big = load(bytes(80_000))
    reason = "argument size 80 KB is 40x the operation's median 2 KB over the last 120 runs"
    assert coordinator.quarantine == {big: reason}
    assert load(bytes(1500)).get(timeout=10) == 1500
    assert load(bytes(19_000)).get(timeout=10) == 19_000  # under 10x
    assert scale(10**6).get(timeout=10) == 10**6  # another operation: no history, not held
    assert coordinator.release(big) is True
    assert big.get(timeout=10) == 80_000


def test_a_predicted_run_time_far_from_the_p95_is_held(
    coordinator: OperationsCoordinator,
) -> None:
    rule = AnomalyRule(size_factor=None, min_runs=10, size=by_first)
    coordinator.hold_when(rule, operation="an_scale")
    for i in range(30):  # 0.1 ms per unit; run times 0.1 .. 0.129 s
        rule.record("an_scale", 1000 + 10 * i, (1000 + 10 * i) * 1e-4)
    big = scale(200_000)
    reason = "predicted run time 20 s is 156x the operation's p95 128 ms over the last 30 runs"
    assert coordinator.quarantine == {big: reason}
    assert scale(2000).get(timeout=10) == 2000  # predicted 0.2 s: under 10x the p95
    coordinator.reject(big)


def test_min_seconds_lets_short_predictions_through(coordinator: OperationsCoordinator) -> None:
    rule = AnomalyRule(size_factor=None, min_runs=10, size=by_first, min_seconds=0.5)
    coordinator.hold_when(rule)
    for _ in range(10):
        rule.record("an_scale", 1000, 0.001)
    assert scale(400_000).get(timeout=10) == 400_000  # 0.4 s predicted: 400x, but short
    big = scale(600_000)
    assert coordinator.quarantine[big].startswith("predicted run time 600 ms is 600x")
    coordinator.reject(big)


def test_both_reasons_are_given_when_both_checks_hold(
    coordinator: OperationsCoordinator,
) -> None:
    rule = AnomalyRule(min_runs=10, size=by_first)
    coordinator.hold_when(rule)
    for _ in range(10):
        rule.record("an_scale", 100, 0.5)
    big = scale(10_000)
    assert coordinator.quarantine == {
        big: "argument size 1e+04 is 100x the operation's median 100 over the last 10 runs; "
        "predicted run time 50 s is 100x the operation's p95 500 ms over the last 10 runs"
    }
    coordinator.reject(big)


def test_the_window_forgets_old_runs(coordinator: OperationsCoordinator) -> None:
    rule = AnomalyRule(min_runs=5, window=5, time_factor=None, size=by_first)
    coordinator.hold_when(rule)
    for size in (10, 10, 10, 10, 10, 1000, 1000, 1000, 1000, 1000):
        rule.record("an_scale", size, 0.01)
    assert scale(5000).get(timeout=10) == 5000  # 5x the median of the last five


def test_it_learns_from_successful_runs(coordinator: OperationsCoordinator) -> None:
    rule = AnomalyRule(min_runs=3, time_factor=None)
    coordinator.hold_when(rule)
    coordinator.hold_when(rule, operation="an_load")  # installed as middleware once
    assert coordinator.middleware.count(rule) == 1
    for _ in range(3):  # failed runs are not history
        with pytest.raises(ValueError):
            flaky(bytes(1000)).get(timeout=10)
    assert flaky(bytes(100_000)).exception(timeout=10) is not None  # not held
    for _ in range(3):
        assert load(bytes(1000)).get(timeout=10) == 1000
    big = load(bytes(100_000))
    assert coordinator.quarantine[big].startswith(
        "argument size 100 KB is 97x the operation's median 1.03 KB over the last 3 runs"
    )
    coordinator.release(big)
    assert big.get(timeout=10) == 100_000


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"size_factor": 1}, ValueError, "size_factor must be a number above 1"),
        ({"time_factor": "10"}, ValueError, "time_factor must be a number above 1"),
        ({"size_factor": float("inf")}, ValueError, "size_factor must be finite"),
        ({"size_factor": None, "time_factor": None}, ValueError, "would hold nothing"),
        ({"min_runs": 0}, ValueError, "min_runs must be an int >= 1; got 0"),
        ({"min_runs": True}, ValueError, "min_runs must be an int >= 1; got True"),
        ({"window": 10}, ValueError, "window=10 keeps fewer runs than min_runs=20"),
        ({"min_seconds": -1}, ValueError, "min_seconds must be a finite number"),
        ({"size": 42}, TypeError, "size must be callable as size(args, kwargs)"),
    ],
)
def test_bad_options_are_refused_with_the_fix(
    options: dict[str, Any], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=re.escape(fragment)):
        AnomalyRule(**options)


def test_record_refuses_bad_runs() -> None:
    rule = AnomalyRule()
    with pytest.raises(ValueError, match="size and seconds must be finite numbers >= 0"):
        rule.record("an_load", -1, 0.1)
    with pytest.raises(ValueError, match="operation_type must be an operation type name"):
        rule.record("", 1, 0.1)
