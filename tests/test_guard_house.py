"""Guard House: passive per-operation health, slow outliers, recent failures, circuit breaker."""

from __future__ import annotations

import itertools
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

from conftest import eventually
from tokengate import (
    DependencyFailed,
    GuardHouse,
    OperationBlocked,
    OperationsCoordinator,
    RetryPolicy,
    task_token_guard,
)

Make = Callable[..., OperationsCoordinator]
_ids = itertools.count(1)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeToken:
    """What the Guard House reads of a token after a run."""

    def __init__(
        self,
        op: str,
        duration: float | None,
        *,
        attempts: int = 1,
        worker: str = "worker_0_core_1",
        start: float = 1000.0,
    ) -> None:
        self.spec = types.SimpleNamespace(operation_type=op, weight="light")
        self.started_at = None if duration is None else start
        self.finished_at = None if duration is None else start + duration
        self.attempts = attempts
        self.worker = worker
        self.id = f"{op}_{next(_ids)}"


def run(
    house: GuardHouse,
    op: str,
    duration: float | None,
    exc: BaseException | None = None,
    outcome: str | None = None,
) -> FakeToken:
    token = FakeToken(op, duration)
    if outcome is None:
        outcome = "resolved" if exc is None else "failed"
    house.observe(token, outcome, exc)  # type: ignore[arg-type]
    for middleware in house.middleware():  # the breaker watches every outcome
        middleware.after_attempt(token, outcome, exc)  # type: ignore[arg-type]
    return token


def spec(op: str) -> Any:
    return types.SimpleNamespace(operation_type=op)


# -- tasks -------------------------------------------------------------------------------------


@task_token_guard(operation_type="gh_ok", tags={"weight": "light"})
def ok(x: int) -> int:
    return x


@task_token_guard(operation_type="gh_bad", tags={"weight": "light"})
def bad(x: int) -> int:
    raise KeyError(f"no key {x}")


@task_token_guard(operation_type="gh_flaky", tags={"weight": "light", "retries": 1})
def flaky(state: dict[str, int]) -> str:
    state["calls"] += 1
    if state["calls"] == 1:
        raise ConnectionResetError("first call drops")
    return "ok"


@task_token_guard(operation_type="gh_after", tags={"weight": "light"})
def after(x: int) -> int:
    return x


# -- passive monitoring --------------------------------------------------------------------------


def errors_heard(coordinator: OperationsCoordinator, operation_type: str, errors: int) -> None:
    """Wait until the Guard House has heard of ``errors`` errors of ``operation_type``:
    middleware hears of a failure just after the token's waiters are woken."""

    def heard() -> bool:
        health = coordinator.guard_house.report().operations.get(operation_type)
        return health is not None and health.errors + health.dependency_failures >= errors

    eventually(heard, what=f"{errors} errors of {operation_type} in the Guard House")


def test_report_counts_failure_rate_and_durations(coordinator: OperationsCoordinator) -> None:
    for i in range(8):
        assert ok(i).get(timeout=10) == i
    for i in range(2):
        with pytest.raises(KeyError):
            bad(i).get(timeout=10)
    errors_heard(coordinator, "gh_bad", 2)
    report = coordinator.guard_house.report()
    assert report.enabled and not report.auto_blocking
    good, failing = report.operations["gh_ok"], report.operations["gh_bad"]
    assert (good.runs, good.errors, good.failure_rate) == (8, 0, 0.0)
    assert (failing.runs, failing.errors, failing.failed, failing.failure_rate) == (2, 2, 2, 1.0)
    assert 0 < good.duration_p50 <= good.duration_p95 <= good.duration_max
    assert good.breaker == "off"
    types_seen = {f.exception_type for f in report.recent_failures}
    assert types_seen == {"KeyError"}
    assert [f.outcome for f in failing.recent_failures] == ["failed", "failed"]
    assert failing.recent_failures[0].token_id.startswith("gh_bad_")
    with pytest.raises(AttributeError):
        good.runs = 3  # type: ignore[misc]


def test_retried_attempts_are_runs_with_errors(coordinator: OperationsCoordinator) -> None:
    state = {"calls": 0}
    token = flaky(state)
    assert token.get(timeout=10) == "ok"
    health = coordinator.guard_house.report().operations["gh_flaky"]
    assert (health.runs, health.errors, health.retried, health.failed) == (2, 1, 1, 0)
    (failure,) = health.recent_failures
    assert (failure.exception_type, failure.outcome, failure.attempt) == (
        "ConnectionResetError",
        "retried",
        1,
    )
    assert failure.token_id == token.id


def test_dependency_failures_are_kept_apart(coordinator: OperationsCoordinator) -> None:
    token = after(bad(1))
    with pytest.raises(DependencyFailed):
        token.get(timeout=10)
    errors_heard(coordinator, "gh_after", 1)
    health = coordinator.guard_house.report().operations["gh_after"]
    assert (health.runs, health.errors, health.dependency_failures) == (0, 0, 1)
    assert health.recent_failures[0].outcome == "dependency"


def test_slow_outliers_after_warm_up() -> None:
    house = GuardHouse(slow_warmup=20, slow_factor=3.0, slow_margin=0.05)
    for _ in range(18):
        run(house, "resize", 0.010)
    run(house, "resize", 5.0)  # before warm-up ends nothing is slow
    assert house.report().operations["resize"].slow_runs == 0
    assert house.report().operations["resize"].slow_threshold is None
    run(house, "resize", 0.010)
    # The 20th run refreshed the threshold: p95 of 19 x 10 ms and one 5 s run -> ~10 ms.
    threshold = house.report().operations["resize"].slow_threshold
    assert threshold == pytest.approx(0.060, rel=0.02)  # max(3 x 10 ms, 10 ms + 50 ms)
    run(house, "resize", 0.055)
    slow = run(house, "resize", 0.5)
    health = house.report().operations["resize"]
    assert health.slow_runs == 1
    (record,) = health.recent_slow
    assert (record.token_id, record.duration) == (slow.id, 0.5)
    assert record.threshold == threshold
    assert "Recent slow runs" in house.render()


@task_token_guard(operation_type="gh_pause", tags={"weight": "light"})
def pause(seconds: float) -> float:
    threading.Event().wait(seconds)  # the run's own duration, not a wait for another thread
    return seconds


def test_a_slow_run_on_a_coordinator_is_flagged_after_warm_up(make_coordinator: Make) -> None:
    # Through the coordinator's own path: run times recorded with the token's stats, the runs
    # that cross the operation's watch handed to the Guard House (no per-token middleware).
    coordinator = make_coordinator(workers_per_core=1, cores=1)  # one worker: one thread's p95
    for _ in range(20):  # slow_warmup: the 20th run sets the threshold (about 50 ms here)
        pause(0).get(timeout=10)
    slow = pause(0.3)
    assert slow.get(timeout=10) == 0.3
    house = coordinator.guard_house
    eventually(lambda: house.report().operations["gh_pause"].slow_runs == 1, what="a slow run")
    health = house.report().operations["gh_pause"]
    assert health.runs == 21 and health.slow_threshold is not None
    assert health.slow_threshold < 0.3 <= health.duration_max
    (record,) = health.recent_slow
    assert record.token_id == slow.id and record.duration >= 0.3


def test_slow_rule_uses_three_times_p95_for_long_operations() -> None:
    house = GuardHouse(slow_warmup=5)
    for _ in range(5):
        run(house, "render", 1.0)
    threshold = house.report().operations["render"].slow_threshold
    assert threshold == pytest.approx(3.0, rel=0.02)
    run(house, "render", 2.5)
    run(house, "render", 3.5)
    assert house.report().operations["render"].slow_runs == 1


def test_recent_failures_are_bounded() -> None:
    house = GuardHouse(recent=3)
    for i in range(10):
        run(house, "fetch", 0.001, ValueError(f"bad {i}"))
    health = house.report().operations["fetch"]
    assert health.errors == 10
    assert [f.message for f in health.recent_failures] == ["bad 7", "bad 8", "bad 9"]


def test_exception_types_are_qualified_outside_builtins() -> None:
    class Custom(Exception):
        pass

    house = GuardHouse()
    run(house, "x", 0.001, Custom("boom\nsecond line"))
    (failure,) = house.report().recent_failures
    assert failure.exception_type.endswith(
        "test_exception_types_are_qualified_outside_builtins.<locals>.Custom"
    )
    assert failure.exception_type.startswith("test_guard_house.")
    assert failure.message == "boom second line"


def test_rendered_table() -> None:
    house = GuardHouse()
    assert "(no runs yet)" in str(house.report())
    for _ in range(3):
        run(house, "fibonacci", 0.002)
    run(house, "json_fast", 0.0004, OSError("disk full"))
    text = house.render()
    lines = text.splitlines()
    assert lines[0] == "[GUARD_HOUSE] Report - Auto-blocking: DISABLED (observation only)"
    assert lines[1].split() == [
        "operation",
        "runs",
        "errors",
        "fail%",
        "p50",
        "p95",
        "max",
        "slow",
        "breaker",
    ]
    assert lines[2].split()[:4] == ["fibonacci", "3", "0", "0.0%"]
    assert "2.00ms" in lines[2]
    assert lines[3].split()[:4] == ["json_fast", "1", "1", "100.0%"]
    assert "400.0µs" in lines[3]
    assert "Recent failures (oldest first):" in text
    assert "OSError: disk full  (attempt 1, failed)" in text


def test_report_while_workers_record(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=4)
    stop = threading.Event()
    reports = []

    def reader() -> None:
        while not stop.is_set():
            reports.append(coordinator.guard_house.report())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        tokens = [ok(i) for i in range(2000)]
        for token in tokens:
            token.get(timeout=30)
    finally:
        stop.set()
        thread.join(10)
    assert coordinator.guard_house.report().operations["gh_ok"].runs == 2000
    assert reports
    assert all(
        r.operations.get("gh_ok") is None or r.operations["gh_ok"].runs <= 2000 for r in reports
    )


def test_passive_monitor_off_installs_nothing(make_coordinator: Make) -> None:
    coordinator = make_coordinator(guard_house=False, overflow_guard=False)
    hooks = coordinator._hooks  # white-box: what the hot path would call
    assert hooks["after_attempt"] == [] and hooks["after_failure"] == []
    assert hooks["before_submit"] == []
    completion = coordinator._completion
    assert not completion.watch_runs and completion.run_watchers == ()
    assert ok(1).get(timeout=10) == 1
    report = coordinator.guard_house.report()
    assert not report.enabled and not report.operations
    assert "passive monitoring is off" in str(report)


def test_default_installs_no_submit_hook(coordinator: OperationsCoordinator) -> None:
    # observation only: nothing runs before a call becomes a token
    hooks = coordinator._hooks  # white-box: what the hot path would call
    assert hooks["before_submit"] == []
    # nor after a successful run: run times go to the stats, errors to after_failure
    assert hooks["after_attempt"] == []
    completion = coordinator._completion
    assert len(hooks["after_failure"]) == 1 and completion.watch_runs
    assert [type(w.middleware).__name__ for w in completion.run_watchers] == ["Monitor"]


# -- circuit breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_probes_after_cooldown() -> None:
    clock = FakeClock()
    house = GuardHouse(auto_block=True, block_after=3, block_cooldown=30.0, clock=clock)
    (breaker,) = [m for m in house.middleware() if type(m).__name__ == "CircuitBreaker"]
    run(house, "fetch", 0.01, ConnectionError("down"))
    run(house, "fetch", 0.01, ConnectionError("down"))
    run(house, "fetch", 0.01)  # a success resets the count
    for _ in range(2):
        run(house, "fetch", 0.01, ConnectionError("down"))
    breaker.before_submit(spec("fetch"))  # 2 consecutive: still closed
    assert house.breaker_state("fetch") == "closed"
    run(house, "fetch", 0.01, TimeoutError("slow"))
    assert house.breaker_state("fetch") == "open"

    clock.now += 10
    with pytest.raises(OperationBlocked) as info:
        breaker.before_submit(spec("fetch"))
    err = info.value
    assert err.operation_type == "fetch"
    assert err.retry_in == pytest.approx(20.0)
    message = str(err)
    for fragment in (
        "'fetch' is blocked by the Guard House",
        "3 consecutive failures",
        "last: TimeoutError",
        "refused for 20.0s more",
        "one probe call",
    ):
        assert fragment in message, message
    breaker.before_submit(spec("other"))  # other operation types are not affected

    clock.now += 20
    assert house.breaker_state("fetch") == "half-open"
    breaker.before_submit(spec("fetch"))  # the probe goes through
    with pytest.raises(OperationBlocked, match="a probe call is running"):
        breaker.before_submit(spec("fetch"))
    run(house, "fetch", 0.01, ConnectionError("still down"))  # the probe failed: open again
    assert house.breaker_state("fetch") == "open"
    with pytest.raises(OperationBlocked, match=r"refused for 30\.0s more"):
        breaker.before_submit(spec("fetch"))

    clock.now += 30
    breaker.before_submit(spec("fetch"))  # second probe
    run(house, "fetch", 0.01)  # succeeds: closed
    assert house.breaker_state("fetch") == "closed"
    breaker.before_submit(spec("fetch"))
    breaker.before_submit(spec("fetch"))
    health = house.report().operations["fetch"]
    assert health.blocked_calls == 3
    assert health.breaker == "closed"


def test_a_discarded_probe_lets_another_call_probe() -> None:
    clock = FakeClock()
    house = GuardHouse(auto_block=True, block_after=1, block_cooldown=5.0, clock=clock)
    (breaker,) = [m for m in house.middleware() if type(m).__name__ == "CircuitBreaker"]
    run(house, "op", 0.01, ValueError("x"))
    clock.now += 5
    breaker.before_submit(spec("op"))
    with pytest.raises(OperationBlocked):
        breaker.before_submit(spec("op"))
    breaker.after_discard(FakeToken("op", None))  # type: ignore[arg-type]
    breaker.before_submit(spec("op"))


def test_retried_attempts_and_dependency_failures_do_not_trip_the_breaker() -> None:
    house = GuardHouse(auto_block=True, block_after=1)
    run(house, "op", 0.01, ConnectionError("x"), outcome="retried")
    run(house, "op", None, DependencyFailed("dep"))
    assert house.breaker_state("op") == "closed"
    house.reset("op")
    run(house, "op", 0.01, ConnectionError("x"))
    assert house.breaker_state("op") == "open"
    house.reset()
    assert house.breaker_state("op") == "closed"


def test_breaker_in_the_coordinator(make_coordinator: Make) -> None:
    coordinator = make_coordinator(
        workers_per_core=1, auto_block=True, block_after=2, block_cooldown=60
    )
    clock = FakeClock()
    coordinator.guard_house.clock = clock
    for i in range(2):
        with pytest.raises(KeyError):
            bad(i).get(timeout=10)
    with pytest.raises(OperationBlocked, match=r"'gh_bad' is blocked .* 60\.0s more"):
        bad(3)
    assert ok(1).get(timeout=10) == 1  # other operations flow
    snap = coordinator.stats()
    assert snap.operations["gh_bad"].submitted == 2  # a refused call never became a token
    assert snap.events["guard_house_blocked"] == 1
    assert snap.events["guard_house_opened"] == 1
    report = coordinator.guard_house.report()
    assert report.auto_blocking
    health = report.operations["gh_bad"]
    assert (health.breaker, health.blocked_calls) == ("open", 1)
    assert health.retry_in == pytest.approx(60.0)
    assert "open (probe in 60.0s), 1 blocked" in str(report)
    clock.now += 60
    with pytest.raises(KeyError):
        bad(4).get(timeout=10)  # the probe runs, fails, and the breaker opens again
    with pytest.raises(OperationBlocked):
        bad(5)


def test_auto_blocking_is_off_by_default(coordinator: OperationsCoordinator) -> None:
    for i in range(12):
        with pytest.raises(KeyError):
            bad(i).get(timeout=10)
    errors_heard(coordinator, "gh_bad", 12)
    assert coordinator.guard_house.report().operations["gh_bad"].errors == 12
    assert coordinator.guard_house.breaker_state("gh_bad") == "off"


def test_blocked_nested_call_fails_the_calling_task(make_coordinator: Make) -> None:
    coordinator = make_coordinator(
        workers_per_core=1, auto_block=True, block_after=1, retry_policy=RetryPolicy(max_retries=0)
    )
    with pytest.raises(KeyError):
        bad(0).get(timeout=10)

    @task_token_guard(operation_type="gh_caller", tags={"weight": "light"})
    def caller() -> int:
        return bad(1).get(timeout=10)

    with pytest.raises(OperationBlocked):
        caller().get(timeout=10)
    errors_heard(coordinator, "gh_caller", 1)
    assert coordinator.guard_house.report().operations["gh_caller"].errors == 1


def test_banner() -> None:
    assert GuardHouse().banner() == (
        "[GUARD_HOUSE] Passive Monitoring initialized\n"
        "  Mode: Post-execution analysis\n"
        "  Auto-blocking: DISABLED (observation only)"
    )
    assert "ENABLED (circuit breaker: opens after 4 consecutive failures, probes after 9s)" in (
        GuardHouse(auto_block=True, block_after=4, block_cooldown=9).banner()
    )
    assert "disabled" in GuardHouse(enabled=False).banner()
