"""``fn.map(*iterables, timeout=None, window=None)``: ordered, lazy, bounded, cancels on exit."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Counted, eventually
from tokengate import (
    ConfigError,
    CoordinatorNotRunning,
    OperationsCoordinator,
    _runtime,
    task_token_guard,
)


@task_token_guard(operation_type="square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="plus", tags={"weight": "light"})
def plus(a: int, b: int) -> int:
    return a + b


@task_token_guard(operation_type="last_first", tags={"weight": "light"})
def last_first(i: int, gate: threading.Event, finished: list[int]) -> int:
    """Item 0 waits until the test opens the gate, so it finishes after all the others."""
    if i == 0 and not gate.wait(30):
        raise RuntimeError("the test never opened the gate")
    finished.append(i)
    return i


class Run:
    """What the gated task needs: a gate, which item blocks, and a record of what ran."""

    def __init__(self, block_on: int | None = 0) -> None:
        self.block_on = block_on
        self.gate = threading.Event()
        self.started = threading.Event()
        self.ran: list[int] = []


@task_token_guard(operation_type="gated", tags={"weight": "light"})
def gated(i: int, run: Run) -> int:
    run.ran.append(i)
    if i == run.block_on:
        run.started.set()
        if not run.gate.wait(30):
            raise RuntimeError("the test never opened the gate")
    return i


@task_token_guard(operation_type="hold_worker", tags={"weight": "light"})
def hold_worker(run: Run) -> None:
    run.started.set()
    if not run.gate.wait(30):
        raise RuntimeError("the test never opened the gate")


@task_token_guard(operation_type="fails_at", tags={"weight": "light"})
def fails_at(i: int, bad: int) -> int:
    if i == bad:
        raise KeyError(i)
    return i


def op_counts(coordinator: OperationsCoordinator, name: str) -> tuple[int, int, int, int]:
    op = coordinator.stats().operations[name]
    return op.submitted, op.resolved, op.failed, op.discarded


# -- results --------------------------------------------------------------------------------------
def test_results_come_in_input_order(make_coordinator: Callable[..., Any]) -> None:
    # More workers than items: the router never queues an item behind the blocked item 0.
    make_coordinator(cores=1, workers_per_core=8)
    gate = threading.Event()
    finished: list[int] = []

    def open_gate_when_the_rest_finished() -> None:
        eventually(lambda: len(finished) == 5, what="items 1..5 to finish")
        gate.set()

    helper = threading.Thread(target=open_gate_when_the_rest_finished)
    helper.start()
    results = list(last_first.map(range(6), itertools.repeat(gate), itertools.repeat(finished)))
    helper.join(10)
    assert finished[-1] == 0  # item 0 finished last ...
    assert results == [0, 1, 2, 3, 4, 5]  # ... and still came first


def test_map_of_many_items_keeps_order(coordinator: OperationsCoordinator) -> None:
    assert list(square.map(range(500))) == [x * x for x in range(500)]
    assert list(square.map([])) == []


def test_multiple_iterables_are_zipped_to_the_shortest(coordinator: OperationsCoordinator) -> None:
    assert list(plus.map([1, 2, 3], [10, 20, 30, 40])) == [11, 22, 33]
    assert list(plus.map(range(4), itertools.count(100))) == [100, 102, 104, 106]


# -- laziness and the window ----------------------------------------------------------------------
def test_map_is_lazy_and_keeps_at_most_window_in_flight(coordinator: OperationsCoordinator) -> None:
    source = Counted(50)
    results = square.map(source, window=4)
    assert source.pulled == 0  # nothing is submitted before the first result is asked for
    in_flight = []
    for received, value in enumerate(results):
        assert value == received * received
        in_flight.append(source.pulled - received)  # submitted and not yet handed over
    assert max(in_flight) == 4  # it does read ahead, but never beyond the window
    assert min(in_flight) >= 1
    assert source.pulled == 50


def test_default_window_is_the_mailbox_bound(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    make_coordinator(workers_per_core=2, mailbox_max=8)
    source = Counted(40)
    worst = 0
    # chunksize=1: one call per token (a batched map's window grows to four of its batches)
    for received, _ in enumerate(square.map(source, chunksize=1)):
        worst = max(worst, source.pulled - received)
    assert worst == 8


def test_a_huge_generator_runs_with_bounded_in_flight(coordinator: OperationsCoordinator) -> None:
    n, window = 100_000, 16
    source = Counted(n)
    total = 0
    worst = 0
    # chunksize=1: one token per call, so the operation's counts are the calls
    for received, value in enumerate(square.map(source, window=window, chunksize=1)):
        worst = max(worst, source.pulled - received)
        total += value
    assert total == sum(x * x for x in range(n))
    assert source.pulled == n
    assert worst == window
    snap = coordinator.stats()
    assert snap.operations["square"].resolved == n


# -- timeout and leaving early --------------------------------------------------------------------
def test_timeout_raises_and_cancels_what_has_not_started(one_worker: OperationsCoordinator) -> None:
    run = Run(block_on=0)
    source = Counted(10)
    results = gated.map(source, itertools.repeat(run), timeout=0.05, window=4)
    with pytest.raises(TimeoutError):
        next(results)
    assert source.pulled == 4  # the window, not the whole input
    # Leaving on the timeout discarded every item that had not started: 1..3, and item 0 too
    # if the worker had not begun it within the timeout (a slow machine may not have).
    discarded = op_counts(one_worker, "gated")[3]
    assert discarded in (3, 4)
    started = 4 - discarded
    run.gate.set()
    eventually(lambda: one_worker.stats().in_flight == 0, what="the blocked item to finish")
    assert op_counts(one_worker, "gated") == (4, started, 0, 4 - started)
    assert run.ran == [0] * started


def test_timeout_on_a_queued_token_cancels_it_too(one_worker: OperationsCoordinator) -> None:
    blocker = Run()
    hold_worker(blocker)
    assert blocker.started.wait(10)
    run = Run(block_on=None)
    with pytest.raises(TimeoutError):
        list(gated.map(range(10), itertools.repeat(run), timeout=0.05, window=4))
    blocker.gate.set()
    eventually(lambda: one_worker.stats().in_flight == 0)
    assert op_counts(one_worker, "gated") == (4, 0, 0, 4)
    assert run.ran == []


def test_break_cancels_tokens_not_started(one_worker: OperationsCoordinator) -> None:
    run = Run(block_on=1)
    source = Counted(100)
    for value in gated.map(source, itertools.repeat(run), window=4):
        assert value == 0
        assert run.started.wait(10)  # item 1 holds the only worker; 2 and 3 are queued
        break
    # The generator was closed when the loop let go of it.
    assert source.pulled == 4
    assert op_counts(one_worker, "gated")[3] == 2
    run.gate.set()
    eventually(lambda: one_worker.stats().in_flight == 0)
    assert op_counts(one_worker, "gated") == (4, 2, 0, 2)
    assert run.ran == [0, 1]


def test_an_exception_in_the_loop_body_cancels_tokens_not_started(
    one_worker: OperationsCoordinator,
) -> None:
    run = Run(block_on=1)
    source = Counted(100)

    def consume() -> None:
        for _ in gated.map(source, itertools.repeat(run), window=4):
            assert run.started.wait(10)
            raise LookupError("consumer gave up")

    with pytest.raises(LookupError, match="consumer gave up"):
        consume()
    assert source.pulled == 4
    run.gate.set()
    eventually(lambda: one_worker.stats().in_flight == 0)
    assert op_counts(one_worker, "gated") == (4, 2, 0, 2)
    assert run.ran == [0, 1]


def test_explicit_close_cancels_tokens_not_started(one_worker: OperationsCoordinator) -> None:
    run = Run(block_on=1)
    results = gated.map(range(10), itertools.repeat(run), window=3)
    assert next(results) == 0
    assert run.started.wait(10)  # item 1 holds the only worker; item 2 is queued
    results.close()
    run.gate.set()
    eventually(lambda: one_worker.stats().in_flight == 0)
    assert op_counts(one_worker, "gated") == (3, 2, 0, 1)
    assert run.ran == [0, 1]


def test_a_failing_item_raises_its_error_and_cancels_the_rest(
    one_worker: OperationsCoordinator,
) -> None:
    with pytest.raises(KeyError):
        list(fails_at.map(range(100), itertools.repeat(0), window=5))
    eventually(lambda: one_worker.stats().in_flight == 0)
    submitted, resolved, failed, discarded = op_counts(one_worker, "fails_at")
    assert submitted == 5  # the window, then the failure stopped the stream
    assert failed == 1
    assert resolved + discarded == 4


# -- bad calls ------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, -1, 2.5, True, "4"])
def test_bad_window_is_refused(coordinator: OperationsCoordinator, window: Any) -> None:
    with pytest.raises(ConfigError, match="window") as excinfo:
        square.map(range(3), window=window)
    assert repr(window) in str(excinfo.value)
    assert coordinator.stats().submitted == 0


@pytest.mark.parametrize(("timeout", "error"), [(-1, ValueError), ("1", TypeError)])
def test_bad_timeout_is_refused(
    coordinator: OperationsCoordinator, timeout: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="timeout"):
        square.map(range(3), timeout=timeout)


def test_map_with_no_running_coordinator() -> None:
    assert _runtime.current_coordinator() is None
    with pytest.raises(CoordinatorNotRunning, match="OperationsCoordinator"):
        square.map(range(3))
    with OperationsCoordinator(workers_per_core=1, cores=1):
        assert list(square.map(range(3))) == [0, 1, 4]
    with pytest.raises(CoordinatorNotRunning):
        square.map(range(3))
