"""The shared timer thread never dies: not for a callback that raises, not for a timer too far
away to wait for. Retry back-offs and timeouts after such an event still fire, and ``stop()``
still returns.

Time is driven by events (a callback that sets one), never by sleeping; the only delays are the
timers' own, of milliseconds, waited for with ``Event.wait(timeout)`` as a deadlock guard.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import GATE, assert_counts_add_up, eventually
from tokengate import (
    ConfigError,
    OperationsCoordinator,
    RetryPolicy,
    TaskTimeout,
    Token,
    task_token_guard,
)
from tokengate._limits import MAX_WAIT_SECONDS
from tokengate._middleware import Middleware
from tokengate._timers import TimerQueue

Make = Callable[..., OperationsCoordinator]


def thread_names() -> set[str]:
    return {t.name for t in threading.enumerate()}


def raiser(kind: type[BaseException], ran: threading.Event) -> Callable[[], None]:
    def callback() -> None:
        ran.set()
        raise kind("a timer callback that raises")

    return callback


@pytest.mark.parametrize("kind", [ValueError, SystemExit, KeyboardInterrupt])
def test_a_callback_that_raises_is_logged_and_later_timers_still_fire(
    kind: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    timers = TimerQueue(name="test-timers-raise")
    ran, later = threading.Event(), threading.Event()
    timers.call_later(0, raiser(kind, ran))
    assert ran.wait(10)
    timers.call_later(0.001, later.set)  # set after the failure: the thread must still serve it
    assert later.wait(10), f"the timer thread died of {kind.__name__}"
    assert timers.close() == []
    assert "test-timers-raise" not in thread_names()
    (record,) = [r for r in caplog.records if r.name == "tokengate.timers"]
    assert "timer callback" in record.getMessage() and record.exc_info is not None
    assert record.exc_info[0] is kind


@pytest.mark.parametrize(
    "delay",
    [1e12, float("inf"), 2**1100, MAX_WAIT_SECONDS * 10],
    ids=["1e12", "inf", "2**1100", "10x-max"],
)
def test_a_timer_too_far_away_to_wait_for_never_stops_the_thread(delay: float) -> None:
    """Waiting for 1e12 s overflowed ``time_t`` and killed the thread; an int past a float's
    range raised ``OverflowError`` in ``call_later``. Such a timer is now simply not due: the
    timers after it fire, and ``close()`` hands it back (the coordinator discards its token)."""
    timers = TimerQueue(name="test-timers-far")
    far = timers.call_later(delay, pytest.fail, "a far-away timer fired")
    fired = threading.Event()
    for _ in range(3):  # the thread wakes for each and goes back to waiting for the far one
        fired.clear()
        timers.call_later(0.001, fired.set)
        assert fired.wait(10), "the timer thread died"
    assert timers.close() == [far]
    assert "test-timers-far" not in thread_names()


def test_nan_and_negative_delays_are_due_at_once() -> None:
    timers = TimerQueue(name="test-timers-nan")
    done = [threading.Event(), threading.Event()]
    timers.call_later(float("nan"), done[0].set)
    timers.call_later(-5, done[1].set)
    assert all(event.wait(10) for event in done)
    assert timers.close() == []


# -- through the coordinator -----------------------------------------------------------------------
class ExitsOnTimeout(Middleware):
    """A middleware hook that raises ``SystemExit`` when a timeout fails a token: that runs on
    the timer thread (the timeout's callback ends the token there)."""

    def __init__(self) -> None:
        self.raised = threading.Event()

    def after_failure(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        if isinstance(exc, TaskTimeout):
            self.raised.set()
            raise SystemExit("a hook that exits")


@task_token_guard(
    operation_type="hangs", tags={"weight": "light", "executor": "thread", "timeout": 0.01}
)
def hangs() -> str:
    assert GATE.wait(30)
    return "late"


FLAKY_CALLS: list[int] = []


@task_token_guard(operation_type="flaky", tags={"weight": "light", "retries": 2})
def flaky() -> str:
    FLAKY_CALLS.append(1)
    if len(FLAKY_CALLS) == 1:
        raise ConnectionError("transient")
    return "ok"


def test_retry_backoffs_still_fire_after_a_timer_callback_raised(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture
) -> None:
    FLAKY_CALLS.clear()
    coordinator = make_coordinator(
        workers_per_core=2, cores=1, retry_policy=RetryPolicy(backoff_base=0.001)
    )
    hook = ExitsOnTimeout()
    coordinator.add_middleware(hook)
    timed_out = hangs()
    assert hook.raised.wait(10)
    with pytest.raises(TaskTimeout):
        timed_out.get(timeout=10)
    GATE.set()  # the hung body returns; its late result is dropped
    retried = flaky()
    assert retried.get(timeout=10) == "ok"  # its back-off is a timer: the thread is alive
    assert retried.attempts == 2
    coordinator.stop(timeout=10)
    assert_counts_add_up(coordinator)
    assert "tokengate-timers" not in thread_names()
    # The hook's SystemExit is logged where it is caught, before it could reach the timer
    # thread (a raising timer callback itself is the unit test's case above).
    assert any(
        r.name == "tokengate.coordinator" and r.exc_info and r.exc_info[0] is SystemExit
        for r in caplog.records
    )


# -- back-offs the timer could not wait for are refused where they are configured ------------------
@pytest.mark.parametrize("name", ["backoff_base", "backoff_cap"])
@pytest.mark.parametrize(
    "value",
    [1e12, float("inf"), float("nan"), 2**1100, -1, "1"],
    ids=["1e12", "inf", "nan", "2**1100", "-1", "str"],
)
def test_a_back_off_longer_than_any_wait_is_refused(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**{name: value})  # type: ignore[arg-type]
    assert f"RetryPolicy.{name}" in str(info.value)
    assert f"{MAX_WAIT_SECONDS:.0f}" in str(info.value)


def test_back_off_growth_past_a_float_s_range_stays_at_the_cap() -> None:
    """A huge retry budget: ``backoff_factor ** n`` overflowed, and the retry was lost."""
    for factor in (2, 2.0):
        policy = RetryPolicy(backoff_factor=factor, backoff_cap=3.0, jitter=0.0)
        assert policy.backoff(5000) == 3.0


def test_stop_discards_a_token_parked_in_the_longest_back_off(make_coordinator: Make) -> None:
    """The longest back-off allowed: ``stop(cancel_pending=True)`` returns at once and the token
    waiting it out ends discarded (its timer is handed back, never waited for)."""
    FLAKY_CALLS.clear()
    longest = RetryPolicy(backoff_base=MAX_WAIT_SECONDS, backoff_cap=MAX_WAIT_SECONDS, jitter=0)
    coordinator = make_coordinator(workers_per_core=1, cores=1, retry_policy=longest)
    parked = flaky()
    eventually(lambda: coordinator.stats().retried == 1, what="the first attempt to fail")
    coordinator.stop(cancel_pending=True, timeout=10)
    assert parked.discard_reason == "stopped"
    assert_counts_add_up(coordinator)
