"""``coordinator.executor()`` behaves like the standard library's executors (issue 6)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

import pytest

from conftest import GATE
from tokengate import ConfigError, OperationsCoordinator, Token, TokenGateExecutor

STARTED = threading.Event()


@pytest.fixture(autouse=True)
def _reset() -> None:
    STARTED.clear()


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def blocked(x: int) -> int:
    STARTED.set()
    assert GATE.wait(30)
    return x


def fail_on(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad {x}")
    return x


def test_is_a_real_executor_and_submit_returns_a_future(coordinator: OperationsCoordinator) -> None:
    ex = coordinator.executor(weight="medium")
    assert isinstance(ex, Executor) and isinstance(ex, TokenGateExecutor)
    fut = ex.submit(add, 2, b=3)
    assert isinstance(fut, Future) and isinstance(fut, Token)
    assert fut.result(timeout=10) == 5
    assert fut.spec.weight == "medium" and fut.operation_type == "add"  # type: ignore[attr-defined]


@pytest.mark.parametrize("chunksize", [1, 3, 100])
def test_map_yields_in_order_with_several_iterables(
    coordinator: OperationsCoordinator, chunksize: int
) -> None:
    ex = coordinator.executor()
    assert list(ex.map(square, range(20), chunksize=chunksize)) == [x * x for x in range(20)]
    assert list(ex.map(add, [1, 2, 3], [10, 20], chunksize=chunksize)) == [11, 22]


def test_map_collects_its_input_immediately(coordinator: OperationsCoordinator) -> None:
    pulled: list[int] = []

    def source() -> Any:
        for i in range(10):
            pulled.append(i)
            yield i

    results = coordinator.executor().map(square, source())
    assert pulled == list(range(10))  # documented: "collected immediately rather than lazily"
    assert list(results) == [x * x for x in range(10)]


def test_map_raises_the_error_at_its_position(coordinator: OperationsCoordinator) -> None:
    it = coordinator.executor().map(fail_on, range(6))
    assert [next(it), next(it), next(it)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad 3"):
        next(it)


def test_map_timeout_counts_from_the_call(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    ex = make_coordinator(workers_per_core=1).executor()
    it = ex.map(blocked, [1, 2], timeout=0.05)
    with pytest.raises(FuturesTimeout):
        next(it)
    GATE.set()


def test_bad_chunksize_and_tags(coordinator: OperationsCoordinator) -> None:
    with pytest.raises(ValueError, match="chunksize"):
        coordinator.executor().map(square, [1], chunksize=0)
    with pytest.raises(ConfigError, match="'weightless'"):
        coordinator.executor(weight="weightless")


def test_submit_after_shutdown_raises_runtime_error(coordinator: OperationsCoordinator) -> None:
    ex = coordinator.executor()
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 2)
    assert square.__name__ and coordinator.running  # the coordinator itself keeps running


def test_shutdown_waits_and_cancel_futures_discards_pending(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1)
    ex = coordinator.executor()
    running = ex.submit(blocked, 1)
    assert STARTED.wait(10)
    queued = [ex.submit(square, i) for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    assert not running.cancelled()
    done_waiting = threading.Event()

    def waiter() -> None:
        ex.shutdown(wait=True)
        done_waiting.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not done_waiting.wait(0.05)  # still waiting for the running call
    GATE.set()
    assert done_waiting.wait(10)
    thread.join(10)
    assert running.result(timeout=1) == 1


def test_context_manager_waits_for_submitted_work(coordinator: OperationsCoordinator) -> None:
    with coordinator.executor() as ex:
        futures = [ex.submit(square, i) for i in range(50)]
    assert all(f.done() for f in futures)
    done, not_done = wait(futures, timeout=0)
    assert len(done) == 50 and not not_done


def test_run_in_executor(coordinator: OperationsCoordinator) -> None:
    ex = coordinator.executor(storage_speed="FAST")

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(10))))

    assert asyncio.run(main()) == [x * x for x in range(10)]
    assert coordinator.tier_stats()["FAST"].high_water >= 1
