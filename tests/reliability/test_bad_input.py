"""Bad input: a clear error at the earliest point, and nothing else disturbed.

The messages themselves are unit-tested in ``tests/test_spec_config.py`` and
``tests/test_coordinator.py``; here every bad input is thrown at a coordinator that is busy
(tokens running, queued and waiting for a tier permit) and the test then proves that nothing
else noticed: the bad call created no token, every token in flight still resolves with its
value, the tier limits and worker threads are what they were, the coordinator serves new work,
and it stops with its counts adding up and no thread left behind.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tokengate import (
    ConfigError,
    CoordinatorNotRunning,
    OperationsCoordinator,
    Token,
    TokenGateError,
    task_token_guard,
)

from ._support import (
    Resources,
    assert_counts_match,
    assert_terminal,
    coordinator_threads,
    serves_new_work,
    settle,
)
from ._tasks import GATE, gated, plain, tiered


@dataclass
class Busy:
    """A running coordinator with tokens running, queued and waiting for a SLOW permit."""

    coordinator: OperationsCoordinator
    tokens: list[Token[Any]]
    expected: list[int]
    threads: int

    def undisturbed(self, extra_submitted: int = 0) -> None:
        coordinator = self.coordinator
        assert coordinator.running
        assert coordinator.stats().submitted == len(self.tokens) + extra_submitted
        assert coordinator.tier_stats()["SLOW"].limit == 2
        assert len(coordinator_threads()) == self.threads
        GATE.set()
        assert [t.get(timeout=30) for t in self.tokens] == self.expected
        assert_terminal(self.tokens)
        serves_new_work(coordinator)


@pytest.fixture
def busy(resources: Resources) -> Iterator[Busy]:
    # convergence=False: the engine would add workers for the gated tasks, and the test checks
    # that the thread count does not move
    coordinator = OperationsCoordinator(
        workers_per_core=2, storage_limits={"SLOW": 2}, convergence=False
    ).start()
    try:
        tokens: list[Token[Any]] = [gated(i) for i in range(4)]
        tokens += [plain(i) for i in range(4, 40)]
        tokens += [tiered(i) for i in range(40, 50)]
        yield Busy(coordinator, tokens, list(range(50)), len(coordinator_threads()))
    finally:
        GATE.set()
        coordinator.stop(timeout=30)
    assert coordinator.stats().in_flight == 0
    assert resources.leaks() == []


async def _doubled(x: int) -> int:
    return 2 * x


def _nested() -> Callable[[], int]:
    def inner() -> int:
        return 1

    return inner


def _submit_a_coroutine_object(busy: Busy) -> Any:
    coro = _doubled(1)  # a call of an async function, not the function itself
    try:
        return busy.coordinator.submit(coro)  # type: ignore[arg-type]
    finally:
        coro.close()  # never awaited on purpose: no RuntimeWarning


# (what is wrong, the bad call, the error it must raise, a fragment of its message)
BAD_CALLS: list[tuple[str, Callable[[Busy], Any], type[BaseException], str]] = [
    (
        "unknown_tag_name",
        lambda b: task_token_guard("op", {"wieght": "heavy"})(_nested()),
        ConfigError,
        "did you mean 'weight'",
    ),
    (
        "unknown_tag_value",
        lambda b: task_token_guard("op", {"storage_speed": "LUDICROUS"})(_nested()),
        ConfigError,
        "SLOW, MODERATE, FAST, INSANE",
    ),
    (
        "decorate_non_callable",
        lambda b: task_token_guard("op", {})(42),  # type: ignore[arg-type]
        ConfigError,
        "decorates functions",
    ),
    (
        "submit_non_callable",
        lambda b: b.coordinator.submit(42),  # type: ignore[arg-type]
        ConfigError,
        "needs a callable",
    ),
    (
        "submit_a_coroutine_object_as_the_function",
        _submit_a_coroutine_object,
        ConfigError,
        "needs a callable",
    ),
    (
        "async_def_for_the_process_lane",
        lambda b: task_token_guard("op", {"executor": "process"})(_doubled),
        ConfigError,
        "cannot use executor='process'",
    ),
    ("get_negative_timeout", lambda b: b.tokens[0].get(timeout=-1), ValueError, ">= 0"),
    (
        "get_non_numeric_timeout",
        lambda b: b.tokens[0].get(timeout="soon"),  # type: ignore[arg-type]
        TypeError,
        "number of seconds",
    ),
    ("get_nan_timeout", lambda b: b.tokens[0].get(timeout=math.nan), ValueError, "nan"),
    (
        "get_bool_timeout",
        lambda b: b.tokens[0].get(timeout=True),
        TypeError,
        "number of seconds",
    ),
    ("exception_negative_timeout", lambda b: b.tokens[5].exception(-0.5), ValueError, ">= 0"),
    ("map_negative_timeout", lambda b: plain.map(range(3), timeout=-1), ValueError, ">= 0"),
    ("map_window_zero", lambda b: plain.map(range(3), window=0), ConfigError, ">= 1"),
    (
        "stop_negative_timeout",
        lambda b: b.coordinator.stop(timeout=-1),
        ValueError,
        ">= 0",
    ),
    ("start_twice", lambda b: b.coordinator.start(), TokenGateError, "already running"),
    (
        "tier_limit_0_while_running",
        lambda b: b.coordinator.set_storage_limit("SLOW", 0),
        ConfigError,
        ">= 1, got 0",
    ),
    (
        "unknown_tier_while_running",
        lambda b: b.coordinator.set_storage_limit("TURBO", 5),
        ConfigError,
        "unknown storage tier 'TURBO'",
    ),
    (
        "second_coordinator_mailbox_max_0",
        lambda b: OperationsCoordinator(mailbox_max=0),
        ConfigError,
        "mailbox_max must be a whole number >= 1, got 0",
    ),
    (
        "second_coordinator_tier_limit_0",
        lambda b: OperationsCoordinator(storage_limits={"SLOW": 0}),
        ConfigError,
        "storage_limits['SLOW']",
    ),
    (
        "second_coordinator_absurd_workers",
        lambda b: OperationsCoordinator(workers_per_core=10**6),
        ConfigError,
        "beyond the supported maximum",
    ),
    (
        "second_coordinator_negative_workers",
        lambda b: OperationsCoordinator(workers_per_core=-4),
        ConfigError,
        "got -4",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "fragment"), [pytest.param(c, e, f, id=n) for n, c, e, f in BAD_CALLS]
)
def test_bad_input_fails_at_once_and_disturbs_nothing(
    busy: Busy, call: Callable[[Busy], Any], error: type[BaseException], fragment: str
) -> None:
    with pytest.raises(error) as info:
        call(busy)
    assert fragment in str(info.value)
    busy.undisturbed()


@task_token_guard(operation_type="bad_arity", tags={"weight": "light"})
def takes_one(x: int) -> int:
    return x


def test_wrong_arguments_fail_the_token_not_the_call_and_are_not_retried(busy: Busy) -> None:
    """Documented behaviour: the arguments are bound when the task runs (binding the signature
    on every call would cost more than the hand-off itself), so the TypeError arrives at get();
    a programming error is never retried, so a side-effecting body is not run twice."""
    GATE.set()
    token = takes_one(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="positional argument"):
        token.get(timeout=30)
    assert token.attempts == 1
    busy.undisturbed(extra_submitted=1)


@task_token_guard(operation_type="runs_coroutine", tags={"weight": "light"})
def run_coroutine(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_coroutine_object_argument_reaches_a_thread_task_as_is(busy: Busy) -> None:
    """Documented behaviour: tokengate does not look inside arguments (except for Tokens), so a
    coroutine object is passed as it is; a thread task may run it with ``asyncio.run``."""
    GATE.set()
    assert run_coroutine(_doubled(21)).get(timeout=30) == 42
    busy.undisturbed(extra_submitted=1)


@task_token_guard(operation_type="async_task", tags={"weight": "light"})
async def async_task(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


def test_an_async_def_task_resolves_to_its_value(busy: Busy) -> None:
    GATE.set()
    token = async_task(21)
    assert token.get(timeout=30) == 42  # (before the async lane: an un-awaited coroutine)
    assert token.lane == "async"
    busy.threads += 1  # the event loop's watchdog starts with the first async task
    busy.undisturbed(extra_submitted=1)


def test_submitting_after_stop_is_refused_and_counts_nothing(resources: Resources) -> None:
    coordinator = OperationsCoordinator(workers_per_core=1).start()
    tokens = [plain(i) for i in range(20)]
    coordinator.stop()
    before = coordinator.stats()
    with pytest.raises(CoordinatorNotRunning, match="stopped"):
        coordinator.submit(plain, 1)
    with pytest.raises(CoordinatorNotRunning, match="OperationsCoordinator"):
        plain(1)  # no coordinator running at all
    with pytest.raises(CoordinatorNotRunning):
        list(plain.map(range(3)))
    after = coordinator.stats()
    assert (after.submitted, after.in_flight) == (before.submitted, 0) == (20, 0)
    assert [t.get(timeout=0) for t in tokens] == list(range(20))
    with coordinator:  # and it starts again
        serves_new_work(coordinator)
    assert_counts_match(coordinator, tokens)
    assert resources.leaks() == []


def test_starting_twice_from_two_threads_starts_once(resources: Resources) -> None:
    coordinator = OperationsCoordinator(workers_per_core=2)
    barrier = threading.Barrier(2)
    outcomes: list[BaseException | None] = []

    def start() -> None:
        barrier.wait()
        try:
            coordinator.start()
            outcomes.append(None)
        except TokenGateError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    try:
        assert sorted(map(type, outcomes), key=str) == sorted([type(None), TokenGateError], key=str)
        assert len(coordinator.lanes["thread"].workers) == 2 * coordinator.core_count
        serves_new_work(coordinator)
    finally:
        coordinator.stop(timeout=10)
    assert resources.leaks() == []


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"workers_per_core": 256}, id="most_workers_allowed"),
        pytest.param({"cores": 10**6}, id="more_cores_than_the_machine"),
        pytest.param({"mailbox_max": 10**9}, id="huge_mailbox"),
        pytest.param({"mailbox_max": 1, "workers_per_core": 1}, id="mailbox_of_one"),
        pytest.param({"storage_limits": {"FAST": 1, "SLOW": 10**6}}, id="extreme_tier_limits"),
    ],
)
def test_extreme_but_valid_configurations_work_and_leave_nothing(
    resources: Resources, options: dict[str, Any]
) -> None:
    coordinator = OperationsCoordinator(**options).start()
    try:
        assert coordinator.core_count <= len(coordinator.topology.available_cpus)
        tokens = [tiered(i) for i in range(300)] + [plain(i) for i in range(300, 1300)]
        assert settle(tokens) == 0
        assert [t.result(0) for t in tokens] == list(range(1300))
        serves_new_work(coordinator)
    finally:
        coordinator.stop(timeout=30)
    assert_counts_match(coordinator, tokens)
    assert resources.leaks(timeout=30) == []
