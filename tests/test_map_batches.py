"""``fn.map(..., chunksize=)``: cheap calls share tokens, each call still ends on its own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from conftest import Counted
from tokengate import ConfigError, OperationsCoordinator, task_token_guard
from tokengate._batches import AUTO_MAX, TARGET_S, BatchSizer, Failed, WithFailures, run_batch


@task_token_guard(operation_type="double", tags={"weight": "light"})
def double(x: int) -> int:
    return 2 * x


def read_ahead(source: Counted, results: Iterable[int]) -> list[int]:
    """For each result handed over, how many items the map had pulled beyond it (checking
    each value on the way: ``double`` of the item at its position)."""
    ahead = []
    for received, value in enumerate(results):
        assert value == 2 * received
        ahead.append(source.pulled - received)
    return ahead


class Calls:
    """How many times each item ran (under a lock: calls come from worker threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: dict[int, int] = {}

    def add(self, i: int) -> int:
        with self.lock:
            self.count[i] = self.count.get(i, 0) + 1
            return self.count[i]


@task_token_guard(operation_type="bad_at", tags={"weight": "light"})
def bad_at(i: int, bad: int, calls: Calls) -> int:
    calls.add(i)
    if i == bad:
        raise KeyError(i)  # a programming error: never retried
    return i


@task_token_guard(operation_type="flaky_once", tags={"weight": "light", "retries": 1})
def flaky_once(i: int, bad: int, calls: Calls) -> int:
    if calls.add(i) == 1 and i == bad:
        raise ConnectionError(f"item {i} failed once")  # retryable by default
    return i


@task_token_guard(operation_type="never_retried", tags={"weight": "light", "retries": 0})
def never_retried(i: int, bad: int, calls: Calls) -> int:
    if calls.add(i) == 1 and i == bad:
        raise ConnectionError(f"item {i} failed once")
    return i


@task_token_guard(operation_type="timed", tags={"weight": "light", "timeout": 5})
def timed(x: int) -> int:
    return x


def counts(coordinator: OperationsCoordinator, name: str) -> tuple[int, int, int, int]:
    op = coordinator.stats().operations[name]
    return op.submitted, op.resolved, op.failed, op.discarded


def test_an_explicit_chunksize_runs_that_many_calls_per_token(
    coordinator: OperationsCoordinator,
) -> None:
    assert list(double.map(range(100), chunksize=8)) == [2 * i for i in range(100)]
    assert counts(coordinator, "double[batch]") == (13, 13, 0, 0)  # 12 of 8, then 4
    assert "double" not in coordinator.stats().operations  # no call ran on its own


def test_chunksize_1_never_batches(coordinator: OperationsCoordinator) -> None:
    assert list(double.map(range(20), chunksize=1)) == [2 * i for i in range(20)]
    assert counts(coordinator, "double") == (20, 20, 0, 0)
    assert "double[batch]" not in coordinator.stats().operations


def test_automatic_batches_keep_order(coordinator: OperationsCoordinator) -> None:
    n = 3000
    assert list(double.map(range(n))) == [2 * i for i in range(n)]
    ops = coordinator.stats().operations
    single = ops["double"].resolved if "double" in ops else 0
    batches = ops["double[batch]"].resolved if "double[batch]" in ops else 0
    assert single + batches <= n and single + batches >= 1
    assert coordinator.stats().in_flight == 0


def test_a_batch_keeps_at_most_window_calls_in_flight(coordinator: OperationsCoordinator) -> None:
    source = Counted(50)
    # a second batch of 4 would make 8: the first one's results come first
    assert max(read_ahead(source, double.map(source, window=6, chunksize=4))) == 4


def test_an_item_failing_in_a_batch_raises_at_its_position_after_the_earlier_items(
    coordinator: OperationsCoordinator,
) -> None:
    calls = Calls()
    results = bad_at.map(range(8), [5] * 8, [calls] * 8, chunksize=8)
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError):
        next(results)
    assert calls.count == {i: 1 for i in range(8)}  # every call ran once; 5 was not re-run


def test_a_retryable_failure_in_a_batch_is_run_again_with_the_retries_left(
    coordinator: OperationsCoordinator,
) -> None:
    calls = Calls()
    assert list(flaky_once.map(range(6), [2] * 6, [calls] * 6, chunksize=6)) == list(range(6))
    assert calls.count == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1, 5: 1}
    assert counts(coordinator, "flaky_once") == (1, 1, 0, 0)  # the re-run, on its own


def test_a_failure_in_a_batch_with_no_retries_left_is_raised(
    coordinator: OperationsCoordinator,
) -> None:
    calls = Calls()
    results = never_retried.map(range(4), [1] * 4, [calls] * 4, chunksize=4)
    assert next(results) == 0
    with pytest.raises(ConnectionError, match="item 1 failed once"):
        next(results)
    assert calls.count == {i: 1 for i in range(4)}


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "4"])
def test_a_bad_chunksize_is_refused(coordinator: OperationsCoordinator, bad: Any) -> None:
    with pytest.raises(ConfigError, match=f"chunksize must be .*got {bad!r}"):
        double.map(range(3), chunksize=bad)


def test_an_explicit_chunksize_on_a_task_with_a_timeout_is_refused(
    coordinator: OperationsCoordinator,
) -> None:
    with pytest.raises(ConfigError, match=r"'timed' cannot share a token.*timeout"):
        timed.map(range(3), chunksize=4)
    assert list(timed.map(range(3))) == [0, 1, 2]  # automatic: one call per token


def test_a_bound_method_batches_with_its_instance(coordinator: OperationsCoordinator) -> None:
    class Scale:
        def __init__(self, k: int) -> None:
            self.k = k

        @task_token_guard(operation_type="scale", tags={"weight": "light"})
        def times(self, x: int) -> int:
            return self.k * x

    assert list(Scale(3).times.map(range(10), chunksize=4)) == [3 * i for i in range(10)]


# -- the automatic size (pure arithmetic on measured run times) ----------------------------------
class Ran:
    def __init__(self, seconds: float) -> None:
        self.started_at: float | None = 100.0
        self.finished_at: float | None = 100.0 + seconds

    def done(self) -> bool:
        return self.finished_at is not None


def sizer_after(measure: Callable[[BatchSizer], None], window: int = 4 * AUTO_MAX) -> int:
    sizer = BatchSizer(window)
    measure(sizer)
    return sizer.size


def test_cheap_calls_grow_the_batch_at_most_doubling() -> None:
    def cheap(sizer: BatchSizer) -> None:
        for _ in range(3):
            sizer.measured(Ran(1e-7 * sizer.size), sizer.size)  # type: ignore[arg-type]

    assert sizer_after(cheap) == 8
    assert sizer_after(lambda s: [s.measured(Ran(1e-7), 1) for _ in range(20)]) == AUTO_MAX  # type: ignore[arg-type,func-returns-value]


def test_the_batch_never_outgrows_a_quarter_of_the_window() -> None:
    assert sizer_after(lambda s: [s.measured(Ran(1e-7), 1) for _ in range(20)], window=40) == 10  # type: ignore[arg-type,func-returns-value]


def test_an_expensive_call_runs_alone() -> None:
    def grow_then_slow(sizer: BatchSizer) -> None:
        for _ in range(5):
            sizer.measured(Ran(1e-7), 1)  # type: ignore[arg-type]
        sizer.measured(Ran(TARGET_S * 40), 32)  # type: ignore[arg-type]

    assert sizer_after(grow_then_slow) == 1


def test_a_call_that_never_ran_teaches_nothing() -> None:
    ran = Ran(0.0)
    ran.started_at = None
    assert sizer_after(lambda s: s.measured(ran, 1)) == 1  # type: ignore[arg-type]


def test_a_cheap_first_call_starts_the_batches_at_sixteen() -> None:
    assert sizer_after(lambda s: s.probed(Ran(1e-7))) == 16  # type: ignore[arg-type]
    unfinished = Ran(0.0)
    unfinished.finished_at = None
    assert sizer_after(lambda s: s.probed(unfinished)) == 1  # type: ignore[arg-type]


def test_automatic_batches_keep_at_most_window_calls_in_flight(
    coordinator: OperationsCoordinator,
) -> None:
    source = Counted(5000)
    ahead = read_ahead(source, double.map(source, window=16))
    assert len(ahead) == 5000
    assert 1 <= max(ahead) <= 16


def test_tokens_among_a_batchs_items_are_waited_for_and_passed_as_values(
    coordinator: OperationsCoordinator,
) -> None:
    first, second = double(1), double(5)
    items = [first, 3, second, 4]
    assert list(double.map(items, chunksize=4)) == [4, 6, 20, 8]
    nested = [(first,), (7,)]  # a token inside one item's tuple, as zip builds them
    assert list(double.map([t for (t,) in nested], chunksize=2)) == [4, 14]


def test_run_batch_says_by_its_type_whether_any_call_failed() -> None:
    assert type(run_batch(abs, [(-1,), (2,)])) is list  # handed on without a look at each
    outcomes = run_batch(abs, [(-1,), ("x",)])
    assert isinstance(outcomes, WithFailures) and outcomes[0] == 1
    assert isinstance(outcomes[1], Failed) and isinstance(outcomes[1].exc, TypeError)


def test_a_batched_map_without_a_window_keeps_several_full_batches_in_flight(
    coordinator: OperationsCoordinator,
) -> None:
    source = Counted(3000)
    ahead = read_ahead(source, double.map(source, chunksize=AUTO_MAX))
    assert coordinator.config.mailbox_max < max(ahead) <= 4 * AUTO_MAX


def test_a_map_without_a_window_keeps_in_flight_what_its_batches_need(
    coordinator: OperationsCoordinator,
) -> None:
    """Small batches keep the coordinator's ``mailbox_max`` calls in flight (a map of big
    arguments stays bounded by it); large ones make room for four batches."""
    small, large = Counted(2000), Counted(2000)
    assert max(read_ahead(small, double.map(small, chunksize=4))) <= coordinator.config.mailbox_max
    most = max(read_ahead(large, double.map(large, chunksize=512)))
    assert coordinator.config.mailbox_max < most <= 4 * 512
