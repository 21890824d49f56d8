"""Overflow Guard: admission pauses over the memory budget and resumes below it (hysteresis)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import HEAVY_ON_THREADS, eventually
from tokengate import (
    ConfigError,
    CoordinatorNotRunning,
    OperationsCoordinator,
    OverflowGuard,
    Overloaded,
    RetryPolicy,
    task_token_guard,
)
from tokengate._admission import AdmissionGate
from tokengate.observability._options import (
    DEFAULT_BUDGET_FRACTION,
    format_bytes,
    machine_memory,
    parse_memory_budget,
)
from tokengate.observability._overflow import process_rss

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS


Make = Callable[..., OperationsCoordinator]
MB = 1 << 20
HELD: list[bytearray] = []
ALLOCATED = threading.Event()
RELEASE = threading.Event()


@pytest.fixture(autouse=True)
def _reset() -> Any:
    HELD.clear()
    ALLOCATED.clear()
    RELEASE.clear()
    yield
    RELEASE.set()
    HELD.clear()


@task_token_guard(operation_type="of_allocate", tags={"weight": "heavy"})
def allocate(megabytes: int) -> int:
    """Allocate and touch ``megabytes`` (so they are resident), hold them until RELEASE."""
    HELD.append(bytearray(b"\x01") * (megabytes * MB))
    ALLOCATED.set()
    assert RELEASE.wait(30)
    HELD.clear()
    return megabytes


@task_token_guard(operation_type="of_noop", tags={"weight": "light"})
def noop(i: int) -> int:
    return i


def guard_with(in_flight: int = 1) -> tuple[OverflowGuard, AdmissionGate, list[int]]:
    gate = AdmissionGate()
    flight = [in_flight]
    guard = OverflowGuard(gate, 100 * MB, in_flight=lambda: flight[0], rss=lambda: 0)
    return guard, gate, flight


def test_pause_and_resume_with_hysteresis() -> None:
    guard, gate, _ = guard_with()
    assert guard.resume_below == 90 * MB
    assert guard.sample(rss=99 * MB) is False
    assert guard.sample(rss=101 * MB) is True
    assert "overflow_guard" in gate.paused
    assert "over the budget of 100 MB" in gate.paused["overflow_guard"]
    assert guard.sample(rss=95 * MB) is True  # under budget but above the resume line
    assert guard.sample(rss=90 * MB) is False
    assert gate.paused == {}
    status = guard.status()
    assert (status.rss, status.paused, status.pauses) == (90 * MB, False, 1)
    assert status.budget == 100 * MB


def test_no_pause_when_nothing_is_in_flight(caplog: pytest.LogCaptureFixture) -> None:
    guard, gate, flight = guard_with(in_flight=0)
    assert guard.sample(rss=500 * MB) is False  # pausing could not free anything
    flight[0] = 3
    assert guard.sample(rss=500 * MB) is True
    flight[0] = 0
    with caplog.at_level(logging.WARNING, logger="tokengate.overflow"):
        assert guard.sample(rss=500 * MB) is False
    assert gate.paused == {}
    assert "not held by running tasks" in caplog.text


def test_pause_and_resume_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    guard, _, _ = guard_with()
    with caplog.at_level(logging.INFO, logger="tokengate.overflow"):
        guard.sample(rss=150 * MB)
        guard.sample(rss=10 * MB)
    messages = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (
            "tokengate.overflow",
            logging.WARNING,
            "[OVERFLOW_GUARD] RSS 150 MB is over the budget of 100 MB: admission paused until "
            "it falls below 90 MB (memory_budget to change it)",
        ),
        (
            "tokengate.overflow",
            logging.INFO,
            "[OVERFLOW_GUARD] RSS 10 MB is back under 90 MB: admission resumed",
        ),
    ]


def test_small_budget_and_an_allocating_task(make_coordinator: Make) -> None:
    """A task allocating 160 MB puts the process over budget: a producer waits until the task
    frees it. Sampling is driven by hand (the sampler thread is set to an hour)."""
    base = process_rss()
    coordinator = make_coordinator(
        workers_per_core=1, memory_budget=base + 64 * MB, memory_check_interval=3600
    )
    guard = coordinator.overflow_guard
    assert not guard.sample()
    holder = allocate(160)
    assert ALLOCATED.wait(10)
    assert guard.sample() is True, guard.status()
    assert guard.status().rss is not None
    assert guard.status().rss > guard.budget  # type: ignore[operator]

    produced: list[int] = []
    producer = threading.Thread(target=lambda: produced.append(noop(7).get(timeout=30)))
    producer.start()
    eventually(lambda: coordinator.admission.waiters == 1, what="the producer to wait at admission")
    assert produced == []
    assert coordinator.stats().operations.get("of_noop") is None  # no token was even made

    RELEASE.set()
    assert holder.get(timeout=10) == 160
    assert guard.sample() is False, guard.status()  # the memory went back to the OS
    producer.join(10)
    assert produced == [7]
    snap = coordinator.stats()
    assert snap.events["overflow_pauses"] == 1


def test_reject_mode_refuses_while_paused(make_coordinator: Make) -> None:
    coordinator = make_coordinator(admission="reject", memory_check_interval=3600)
    held = allocate(1)  # something in flight, so the guard pauses
    assert ALLOCATED.wait(10)
    assert coordinator.overflow_guard.sample(rss=coordinator.overflow_guard.budget + 1)
    with pytest.raises(Overloaded, match=r"admission is paused \(RSS .* over the budget"):
        noop(1)
    coordinator.overflow_guard.sample(rss=0)
    assert noop(2).get(timeout=10) == 2
    RELEASE.set()
    held.get(timeout=10)


def test_calls_from_tasks_are_not_held(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, memory_check_interval=3600)
    go = threading.Event()

    @task_token_guard(operation_type="of_parent", tags={"weight": "light"})
    def parent() -> int:
        assert go.wait(30)
        return noop(41).get(timeout=10) + 1

    token = parent()  # in flight, so the guard pauses
    assert coordinator.overflow_guard.sample(rss=coordinator.overflow_guard.budget * 2)
    assert coordinator.admission.paused
    go.set()
    assert token.get(timeout=10) == 42  # its nested call went through the pause
    assert coordinator.admission.paused


def test_stop_releases_a_paused_producer(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, memory_check_interval=3600)
    started = threading.Event()

    @task_token_guard(operation_type="of_hold", tags={"weight": "heavy"})
    def hold() -> None:
        started.set()
        assert RELEASE.wait(30)

    held = hold()
    assert started.wait(10)
    coordinator.overflow_guard.sample(rss=coordinator.overflow_guard.budget * 2)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            noop(1)
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    eventually(lambda: coordinator.admission.waiters == 1, what="the producer to wait")
    RELEASE.set()
    held.get(timeout=10)
    coordinator.stop(timeout=10)
    producer.join(10)
    assert not producer.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], CoordinatorNotRunning), errors
    assert coordinator.admission.paused == {}


def test_memory_error_in_a_task_is_retried(make_coordinator: Make) -> None:
    make_coordinator(workers_per_core=1, retry_policy=RetryPolicy(backoff_base=0))
    calls = []

    @task_token_guard(operation_type="of_oom_once", tags={"weight": "medium"})
    def oom_once() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("momentary shortage")
        return "fits now"

    token = oom_once()
    assert token.get(timeout=10) == "fits now"
    assert token.attempts == 2


def test_sampler_thread_runs_and_stops(make_coordinator: Make) -> None:
    samples: list[int] = []
    ticked = threading.Event()

    def rss() -> int:
        samples.append(1)
        ticked.set()
        return 1

    coordinator = make_coordinator(memory_check_interval=0.01)
    guard = coordinator.overflow_guard
    guard._rss = rss
    assert ticked.wait(10)
    thread = guard._thread
    assert thread is not None and thread.name == "tokengate-overflow"
    coordinator.stop()
    assert not thread.is_alive()
    assert guard._thread is None


def test_off_means_no_thread_and_no_hooks(make_coordinator: Make) -> None:
    coordinator = make_coordinator(overflow_guard=False, guard_house=False)
    assert coordinator.overflow_guard._thread is None
    assert coordinator._hooks["on_start"] == []
    assert noop(1).get(timeout=10) == 1


def test_banner_prints_the_budget() -> None:
    guard = OverflowGuard(AdmissionGate(), 18 * MB)
    assert guard.banner() == (
        "[OVERFLOW_GUARD] Initialized\n"
        "  Base budget: 18 MB\n"
        "  Retry policies loaded for all complexity levels"
    )
    no_oom = {"light": RetryPolicy(), "heavy": RetryPolicy(retry_on=(ConnectionError,))}
    assert "MemoryError is not retried for: heavy" in guard.banner(no_oom)
    assert (
        OverflowGuard(AdmissionGate(), 1, enabled=False)
        .banner()
        .endswith("Disabled (overflow_guard=False)")
    )


def test_default_budget_is_derived_from_the_machine() -> None:
    coordinator = OperationsCoordinator(process_lane=False)
    expected = int(machine_memory() * DEFAULT_BUDGET_FRACTION)
    assert coordinator.overflow_guard.budget == expected
    assert machine_memory() > 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (12345, 12345),
        ("512MB", 512 * MB),
        ("2 GiB", 2048 * MB),
        ("1.5g", int(1.5 * 1024 * MB)),
        ("64k", 64 * 1024),
        ("100", 100),
    ],
)
def test_memory_budget_forms(value: object, expected: int | None) -> None:
    assert parse_memory_budget(value) == expected


def test_memory_budget_percent() -> None:
    assert parse_memory_budget("25%") == int(machine_memory() * 0.25)


@pytest.mark.parametrize("value", [0, -5, "lots", "0MB", "150%", 1.5, True, "12 parsecs"])
def test_bad_memory_budget(value: object) -> None:
    with pytest.raises(ConfigError, match="memory_budget must be"):
        OperationsCoordinator(process_lane=False, memory_budget=value)


def test_format_bytes() -> None:
    assert format_bytes(18 * MB) == "18 MB"
    assert format_bytes(64 * 1024) == "64 KB"
    assert format_bytes(12) == "12 B"
