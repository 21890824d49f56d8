"""Middleware run-time hooks: ``after_long_run`` hears only the runs past the middleware's
``run_threshold``, ``check_runs`` looks at a worker's run times when it asked to, and a
middleware that overrides neither is never called for a run (``docs/guide/middleware.md``)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tokengate import Middleware, OperationsCoordinator, RetryPolicy, Token, task_token_guard

Make = Callable[..., OperationsCoordinator]
# One worker thread, no observability of tokengate's own: only the test's middleware watch runs.
ONE_WORKER = {
    "cores": 1,
    "workers_per_core": 1,
    "convergence": False,
    "guard_house": False,
    "overflow_guard": False,
}


@task_token_guard(operation_type="rt_watched", tags={"weight": "light"})
def watched(x: int) -> int:
    return x


@task_token_guard(operation_type="rt_ignored", tags={"weight": "light"})
def ignored(x: int) -> int:
    return x


_attempts: dict[int, int] = {}


@task_token_guard(operation_type="rt_flaky", tags={"weight": "light"})
def flaky(key: int) -> int:
    _attempts[key] = _attempts.get(key, 0) + 1
    if _attempts[key] == 1:
        raise ConnectionError("first attempt fails")
    return key


class LongRuns(Middleware):
    """Hears every run of ``rt_watched`` and ``rt_flaky`` (threshold -1 s), none of the rest."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.heard: list[tuple[str, int, float]] = []

    def run_threshold(self, operation_type: str) -> float:
        return math.inf if operation_type == "rt_ignored" else -1.0

    def after_long_run(self, token: Token[Any], seconds: float) -> None:
        with self.lock:
            self.heard.append((token.id, token.attempts, seconds))


def test_a_user_middleware_hears_only_the_runs_past_its_threshold(make_coordinator: Make) -> None:
    coordinator = make_coordinator(**ONE_WORKER)
    long_runs = LongRuns()
    coordinator.add_middleware(long_runs)
    tokens = [watched(i) for i in range(5)]
    others = [ignored(i) for i in range(5)]
    for token in tokens + others:
        token.get(timeout=10)
    coordinator.stop()  # the workers have returned: every hook call is over
    assert sorted(token_id for token_id, _, _ in long_runs.heard) == sorted(t.id for t in tokens)
    by_id = {t.id: t for t in tokens}
    for token_id, _, seconds in long_runs.heard:
        token = by_id[token_id]
        assert token.started_at is not None and token.finished_at is not None
        assert seconds == token.finished_at - token.started_at


def test_a_retried_attempt_is_a_run_too(make_coordinator: Make) -> None:
    coordinator = make_coordinator(
        **ONE_WORKER, retry_policy=RetryPolicy(max_retries=2, backoff_base=0.0)
    )
    long_runs = LongRuns()
    coordinator.add_middleware(long_runs)
    token = flaky(1)
    assert token.get(timeout=10) == 1
    coordinator.stop()
    assert [(token_id, attempts) for token_id, attempts, _ in long_runs.heard] == [
        (token.id, 1),
        (token.id, 2),
    ]


def test_a_middleware_that_does_not_override_the_run_hooks_is_not_called(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[str] = []
    # The base class's hooks record any call: a coordinator that called a hook the middleware
    # does not override (or asked its threshold) would show up here.
    monkeypatch.setattr(Middleware, "after_long_run", lambda *_: called.append("after_long_run"))
    monkeypatch.setattr(Middleware, "check_runs", lambda *_: called.append("check_runs"))
    monkeypatch.setattr(Middleware, "run_threshold", lambda *_: called.append("run_threshold"))

    class Attempts(Middleware):
        def __init__(self) -> None:
            self.outcomes: list[str] = []

        def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
            self.outcomes.append(outcome)

    coordinator = make_coordinator(**ONE_WORKER)
    attempts = Attempts()
    coordinator.add_middleware(attempts)
    for i in range(50):
        watched(i).get(timeout=10)
    coordinator.stop()
    assert attempts.outcomes == ["resolved"] * 50
    assert called == []


class Checks(Middleware):
    """Looks at the thread's run times every ``every`` runs; from its look at 3 runs on, hears
    every run (its threshold drops from infinite to -1 s)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.looks: list[int] = []
        self.long: list[str] = []
        self.threshold = math.inf

    def run_threshold(self, operation_type: str) -> float:
        return self.threshold

    def check_runs(self, operation_type: str, runs: Any) -> int | None:
        assert operation_type == "rt_watched"
        assert runs.percentile(50) > 0.0
        self.looks.append(runs.count)
        if runs.count >= 3:
            self.threshold = -1.0
        return self.every

    def after_long_run(self, token: Token[Any], seconds: float) -> None:
        self.long.append(token.id)


def test_check_runs_sees_the_first_run_then_as_often_as_it_asks(make_coordinator: Make) -> None:
    coordinator = make_coordinator(**ONE_WORKER)
    checks = Checks(every=2)
    coordinator.add_middleware(checks)
    tokens = [watched(i) for i in range(8)]
    for token in tokens:
        token.get(timeout=10)
    coordinator.stop()
    assert checks.looks == [1, 3, 5, 7]
    # The threshold is asked again right after a look: the run looked at 3 runs in is heard too.
    assert checks.long == [t.id for t in tokens[2:]]


def test_a_run_watcher_added_to_a_running_coordinator_looks_at_the_next_run(
    make_coordinator: Make,
) -> None:
    coordinator = make_coordinator(**ONE_WORKER)
    for i in range(3):
        watched(i).get(timeout=10)  # no run watcher yet: run times are not recorded
    checks = Checks(every=1)
    coordinator.add_middleware(checks)
    for i in range(2):
        watched(i).get(timeout=10)
    coordinator.stop()
    assert checks.looks == [1, 2]


def test_a_run_hook_that_raises_is_logged_and_the_token_is_not_affected(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Middleware):
        def run_threshold(self, operation_type: str) -> float:
            return -1.0

        def after_long_run(self, token: Token[Any], seconds: float) -> None:
            raise RuntimeError("broken watcher")

    coordinator = make_coordinator(**ONE_WORKER)
    coordinator.add_middleware(Broken())
    with caplog.at_level(logging.ERROR, logger="tokengate.coordinator"):
        assert watched(7).get(timeout=10) == 7
        coordinator.stop()
    assert any("after_long_run" in r.getMessage() and r.exc_info for r in caplog.records)
    assert coordinator.stats().resolved == 1


def test_the_guard_house_is_ordinary_middleware(make_coordinator: Make) -> None:
    coordinator = make_coordinator(guard_house=True, auto_block=True, overflow_guard=False)
    installed = coordinator.middleware
    assert all(isinstance(m, Middleware) for m in installed)
    assert installed == tuple(coordinator.guard_house.middleware())
