"""``coordinator.executor()`` behaves like the standard library's executors."""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any

import pytest

import process_tasks as pt
from conftest import GATE, assert_counts_add_up, eventually, run_code
from tokengate import (
    ConfigError,
    InitializerFailed,
    OperationsCoordinator,
    SerializationError,
    Token,
    TokenGateExecutor,
    WorkerCrashed,
)
from tokengate.lanes.process import process_lane_supported

needs_processes = pytest.mark.skipif(
    not process_lane_supported(), reason="worker processes need POSIX"
)

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


# -- concurrent.futures semantics: what an Executor does that the decorator path does not --------
COUNT_LOCK = threading.Lock()
CALLS: list[int] = []


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


def flaky(x: int) -> int:
    with COUNT_LOCK:
        CALLS.append(x)
    raise ConnectionError(f"transient {x}")  # retried by every weight's default policy


def identity(*args: Any, **kwargs: Any) -> Any:
    return (args, kwargs) if kwargs or len(args) != 1 else args[0]


def is_done(future: Future[Any]) -> bool:
    return future.done()


def test_submit_runs_the_call_once(coordinator: OperationsCoordinator) -> None:
    fut = coordinator.executor().submit(flaky, 1)
    with pytest.raises(ConnectionError, match="transient 1"):
        fut.result(timeout=10)
    assert CALLS == [1] and fut.attempts == 1  # type: ignore[attr-defined]


@needs_processes
def test_a_call_whose_worker_process_died_is_not_run_again(
    make_coordinator: Callable[..., OperationsCoordinator], tmp_path: Path
) -> None:
    ex = make_coordinator(workers_per_core=1).executor(executor="process")
    fut = ex.submit(pt.exit_first_time, str(tmp_path / "crashed"))
    assert isinstance(fut.exception(timeout=30), WorkerCrashed)
    assert fut.attempts == 1  # type: ignore[attr-defined]


def test_explicit_retries_on_the_executor_still_apply(coordinator: OperationsCoordinator) -> None:
    fut = coordinator.executor(retries=1).submit(flaky, 2)
    with pytest.raises(ConnectionError):
        fut.result(timeout=10)
    assert CALLS == [2, 2]


def test_futures_among_the_arguments_are_passed_untouched(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    ex = make_coordinator(workers_per_core=4).executor()
    ok = ex.submit(square, 3)
    failed = ex.submit(fail_on, 3)
    wait([ok, failed], timeout=10)
    assert ex.submit(identity, ok).result(timeout=10) is ok
    assert ex.submit(identity, failed).result(timeout=10) is failed  # and the call still runs
    args, kwargs = ex.submit(identity, [ok], key={"f": failed}).result(timeout=10)
    assert args[0][0] is ok and kwargs["key"]["f"] is failed
    assert all(a is b for a, b in zip(ex.map(identity, [ok, failed]), [ok, failed], strict=True))
    running = ex.submit(blocked, 1)
    assert STARTED.wait(10)
    assert ex.submit(is_done, running).result(timeout=10) is False  # not waited for
    GATE.set()


def test_distinct_callables_are_not_kept_alive(coordinator: OperationsCoordinator) -> None:
    ex = coordinator.executor()
    partials = [functools.partial(square, i) for i in range(1000)]
    refs = [weakref.ref(p) for p in partials]
    assert [f.result(timeout=10) for f in [ex.submit(p) for p in partials]][-1] == 999 * 999
    del partials
    gc.collect()
    assert sum(ref() is not None for ref in refs) == 0


class Owner:
    def method(self, x: int) -> int:
        return x + 1


def test_a_bound_method_does_not_keep_its_owner_alive(coordinator: OperationsCoordinator) -> None:
    ex = coordinator.executor()
    owner = Owner()
    ref = weakref.ref(owner)
    fut = ex.submit(owner.method, 1)
    assert fut.result(timeout=10) == 2
    del fut, owner
    gc.collect()
    assert ref() is None
    assert ex.submit(square, 2).result(timeout=10) == 4  # the executor itself is still in use


class Box:
    def __init__(self, value: int) -> None:
        self.value = value


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_keeps_no_result_the_caller_dropped(
    coordinator: OperationsCoordinator, chunksize: int
) -> None:
    refs: list[weakref.ref[Box]] = []
    for box in coordinator.executor().map(Box, range(10), chunksize=chunksize):
        refs.append(weakref.ref(box))
        del box
        gc.collect()
        # What the standard library keeps: nothing. (The worker thread that made the result
        # may still be returning from its run for an instant: a condition, not a count now.)
        eventually(lambda: all(ref() is None for ref in refs), what="the dropped results to go")
    assert len(refs) == 10


ATEXIT_SCRIPT = """
import atexit
from tokengate import OperationsCoordinator

coordinator = OperationsCoordinator(process_lane=False, convergence=False).start()
ex = coordinator.executor()

def late():
    try:
        ex.submit(print, "ran")
    except RuntimeError as exc:
        print("refused:", exc)
    coordinator.stop()

atexit.register(late)
print("ready", ex.submit(abs, -1).result(timeout=10))
"""


def test_submit_during_interpreter_shutdown_raises_runtime_error() -> None:
    assert run_code(ATEXIT_SCRIPT).splitlines() == [
        "ready 1",
        "refused: cannot schedule new futures after interpreter shutdown",
    ]


@needs_processes
def test_unpicklable_calls_fail_their_future_in_the_process_flavour(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    ex = make_coordinator(workers_per_core=1).executor(executor="process")
    lock = threading.Lock()
    fut = ex.submit(pt.plain_length, [1, lock])  # does not raise: the Future says why
    error = fut.exception(timeout=10)
    assert isinstance(error, SerializationError) and isinstance(error, TypeError)
    assert "argument 1[1]" in str(error) and "_thread.lock" in str(error)

    def closure() -> Any:
        return lock

    error = ex.submit(closure).exception(timeout=10)
    assert isinstance(error, SerializationError) and "the function" in str(error)
    assert "closure" in str(error)
    assert ex.submit(pt.plain_length, [1, 2]).result(timeout=30) == 2


# -- max_workers ---------------------------------------------------------------------------------
HIGH = {"running": 0, "high_water": 0}


def tracked(x: int) -> int:
    with COUNT_LOCK:
        HIGH["running"] += 1
        HIGH["high_water"] = max(HIGH["high_water"], HIGH["running"])
        CALLS.append(x)
    STARTED.set()
    try:
        assert GATE.wait(30)
    finally:
        with COUNT_LOCK:
            HIGH["running"] -= 1
    return x


def test_max_workers_caps_the_calls_running_at_once(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    HIGH.update(running=0, high_water=0)
    coordinator = make_coordinator(workers_per_core=4, convergence=False)
    ex = coordinator.executor(max_workers=2)
    futures = [ex.submit(tracked, i) for i in range(8)]
    eventually(lambda: len(CALLS) == 2, what="two calls running")
    held = futures[2:]
    assert not any(f.running() or f.done() for f in held)  # held by the coordinator, not run
    # The held calls hold no worker: another executor's call runs meanwhile.
    assert coordinator.executor().submit(square, 7).result(timeout=10) == 49
    GATE.set()
    assert [f.result(timeout=10) for f in futures] == list(range(8))
    assert HIGH["high_water"] == 2


def test_held_calls_are_cancelled_by_shutdown_cancel_futures(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    ex = make_coordinator(workers_per_core=2).executor(max_workers=1)
    first = ex.submit(blocked, 1)
    assert STARTED.wait(10)
    held = [ex.submit(square, i) for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in held)
    GATE.set()
    assert first.result(timeout=10) == 1


@needs_processes
def test_max_workers_in_the_process_flavour(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(workers_per_core=1)
    ex = coordinator.executor(executor="process", max_workers=1)
    values = [b"x" * 1000 * i for i in range(1, 9)]
    assert list(ex.map(pt.plain_length, values)) == [len(v) for v in values]
    assert coordinator.stats().process_queue_bytes == 0  # every held call's bytes came back


class Pickled:
    """An argument that counts its picklings (it arrives in the worker as ``data``) and can
    cancel a Future while it is being pickled, the moment a held call is let go."""

    count = 0

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.cancel: Future[Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        Pickled.count += 1
        if self.cancel is not None:
            self.cancel.cancel()
        return (bytes, (self.data,))


@needs_processes
def test_calls_held_by_max_workers_hold_no_pickled_copy_of_their_arguments(
    make_coordinator: Callable[..., OperationsCoordinator], tmp_path: Path
) -> None:
    coordinator = make_coordinator(workers_per_core=1, process_queue_bytes=10_000)
    ex = coordinator.executor(executor="process", max_workers=1)
    marker, gate = tmp_path / "holding", tmp_path / "gate"
    first = ex.submit(pt.hold_until_open, str(marker), str(gate))
    eventually(marker.exists, timeout=30, what="the worker process to be held")
    Pickled.count = 0
    args = [Pickled(b"x" * 5_000) for _ in range(20)]  # 100 KB, ten times the byte budget
    held = [ex.submit(pt.plain_length, arg) for arg in args]
    unpicklable = ex.submit(pt.plain_length, [1, threading.Lock()])
    assert Pickled.count == 0  # held: references only, nothing pickled yet
    gate.touch()
    assert first.result(timeout=30) == "released"
    assert [f.result(timeout=30) for f in held] == [5_000] * 20
    assert Pickled.count == 20  # each pickled once, when let go
    error = unpicklable.exception(timeout=30)  # pickled when let go: the Future says why
    assert isinstance(error, SerializationError) and "argument 1[1]" in str(error)
    assert coordinator.stats().process_queue_bytes == 0
    assert_counts_add_up(coordinator)


@needs_processes
def test_a_held_call_cancelled_as_it_is_let_go_gives_its_bytes_back(
    make_coordinator: Callable[..., OperationsCoordinator], tmp_path: Path
) -> None:
    coordinator = make_coordinator(workers_per_core=1)
    ex = coordinator.executor(executor="process", max_workers=1)
    marker, gate = tmp_path / "holding", tmp_path / "gate"
    first = ex.submit(pt.hold_until_open, str(marker), str(gate))
    eventually(marker.exists, timeout=30, what="the worker process to be held")
    arg = Pickled(b"x" * 100_000)
    held = ex.submit(pt.plain_length, arg)
    arg.cancel = held  # cancelled between its pickling and its charge to the byte budget
    after = ex.submit(pt.plain_length, b"y")
    gate.touch()
    assert first.result(timeout=30) == "released" and after.result(timeout=30) == 1
    assert held.cancelled()
    assert coordinator.stats().process_queue_bytes == 0  # the charge did not outlive the call
    assert_counts_add_up(coordinator)


@pytest.mark.parametrize("cancel_pending", [False, True])
def test_stop_drains_or_discards_held_calls(
    make_coordinator: Callable[..., OperationsCoordinator], cancel_pending: bool
) -> None:
    coordinator = make_coordinator(workers_per_core=2)
    ex = coordinator.executor(max_workers=1)
    first = ex.submit(blocked, 1)
    assert STARTED.wait(10)
    held = [ex.submit(square, i) for i in range(3)]
    stopper = threading.Thread(target=coordinator.stop, kwargs={"cancel_pending": cancel_pending})
    stopper.start()
    if cancel_pending:
        eventually(lambda: all(f.cancelled() for f in held), what="held calls discarded")
    GATE.set()
    stopper.join(10)
    assert not stopper.is_alive() and first.result(timeout=1) == 1
    if not cancel_pending:
        assert [f.result(timeout=1) for f in held] == [0, 1, 4]  # drained, each in its turn
    assert_counts_add_up(coordinator)


def test_max_workers_and_initializer_are_validated(coordinator: OperationsCoordinator) -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="max_workers"):
            coordinator.executor(max_workers=bad)
    with pytest.raises(ConfigError, match="initializer"):
        coordinator.executor(initializer=42)  # type: ignore[arg-type]


# -- initializer -----------------------------------------------------------------------------------
INITIALIZED: list[tuple[int, str]] = []


def record_thread(tag: str) -> None:
    with COUNT_LOCK:
        INITIALIZED.append((threading.get_ident(), tag))


def thread_id(_: int) -> int:
    return threading.get_ident()


def test_initializer_runs_once_per_worker_thread(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    INITIALIZED.clear()
    # No convergence: a retired thread's ident could be reused by a new one.
    ex = make_coordinator(workers_per_core=2, convergence=False).executor(
        executor="thread", initializer=record_thread, initargs=("x",)
    )
    threads = set(ex.map(thread_id, range(50)))
    assert sorted(INITIALIZED) == sorted((ident, "x") for ident in threads)


@needs_processes
def test_initializer_runs_once_per_worker_process(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    ex = make_coordinator(workers_per_core=1).executor(
        executor="process", initializer=pt.count_initialization, initargs=(1,)
    )
    seen = list(ex.map(pt.pid_and_initializations, range(20)))
    assert {count for _, count in seen} == {1}  # once in each worker process, before its calls


def broken_initializer() -> None:
    raise OSError("no database")


def test_a_failing_initializer_breaks_the_executor(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    ex = make_coordinator(workers_per_core=2).executor(
        executor="thread", initializer=broken_initializer, max_workers=1
    )
    futures = [ex.submit(flaky, i) for i in range(4)]
    for fut in futures:
        error = fut.exception(timeout=10)
        assert isinstance(error, InitializerFailed) and isinstance(error, BrokenExecutor)
        assert "broken_initializer" in str(error) and "no database" in str(error)
    assert isinstance(futures[0].exception().__cause__, OSError)  # type: ignore[union-attr]
    assert CALLS == []  # no call ran
    with pytest.raises(BrokenExecutor, match="no database"):
        ex.submit(square, 2)


# -- map: chunks, errors per item, the automatic chunk ---------------------------------------------
def fails_at_3(x: int) -> int:
    if x == 3:
        raise KeyError(x)
    return x


def test_map_raises_an_item_error_at_its_position_in_a_chunk(
    coordinator: OperationsCoordinator,
) -> None:
    results = coordinator.executor().map(fails_at_3, range(6), chunksize=6)
    assert [next(results) for _ in range(3)] == [0, 1, 2]  # the items before it still come
    with pytest.raises(KeyError):
        next(results)


class FlakyOnce:
    """Fails the first call of item ``bad`` with a retryable error; counts calls."""

    def __init__(self, bad: int) -> None:
        self.bad = bad
        self.lock = threading.Lock()
        self.calls: dict[int, int] = {}

    def __call__(self, x: int) -> int:
        with self.lock:
            self.calls[x] = self.calls.get(x, 0) + 1
            first = self.calls[x] == 1
        if first and x == self.bad:
            raise ConnectionError(f"item {x} failed once")
        return x


def test_map_reruns_an_item_that_failed_in_a_chunk_when_the_executor_retries(
    coordinator: OperationsCoordinator,
) -> None:
    flaky = FlakyOnce(bad=2)
    ex = coordinator.executor(retries=1, operation_type="flaky")
    assert list(ex.map(flaky, range(5), chunksize=5)) == list(range(5))
    assert flaky.calls == {0: 1, 1: 1, 2: 2, 3: 1, 4: 1}
    once = FlakyOnce(bad=2)
    with pytest.raises(ConnectionError):  # without retries: the error, at its position
        list(coordinator.executor(operation_type="once").map(once, range(5), chunksize=5))
    assert once.calls == {i: 1 for i in range(5)}


def test_map_by_default_runs_calls_that_are_not_cheap_one_per_task(
    coordinator: OperationsCoordinator,
) -> None:
    gate = threading.Event()

    def gated(x: int) -> int:
        if not gate.wait(30):
            raise RuntimeError("the test never opened the gate")
        return x

    results = coordinator.executor(operation_type="gated").map(gated, range(20))
    gate.set()  # the first call could not end while the map timed it: no chunks
    assert list(results) == list(range(20))
    ops = coordinator.stats().operations
    assert "gated[chunk]" not in ops
    assert ops["gated"].resolved == 20


def test_map_by_default_keeps_order_whatever_it_chunks(coordinator: OperationsCoordinator) -> None:
    n = 3000
    assert list(coordinator.executor().map(square, range(n))) == [x * x for x in range(n)]
    assert list(coordinator.executor().map(add, range(n), range(n))) == [2 * x for x in range(n)]
    assert_counts_add_up(coordinator)
