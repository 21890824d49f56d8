"""Rate limits (the ``rate`` tag): the grammar, the token bucket on a fake clock, the limiter's
FIFO and timer on a fake clock, and the coordinator's waiting tokens, stepped with
``rate_limiter.poll(now)`` instead of waiting for the clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from conftest import GATE, eventually
from tokengate import ConfigError, OperationsCoordinator, TokenGateCollector, task_token_guard
from tokengate._rate import RateLimiter, RateStats, TokenBucket, parse_rate
from tokengate._spec import TaskSpec

Make = Callable[..., OperationsCoordinator]
HOUR = 3600.0
SINGLE = {"cores": 1, "workers_per_core": 1, "process_lane": False, "convergence": False}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- grammar ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "per_second", "burst"),
    [
        ("100/s", 100.0, 1),
        ("5/m", 5 / 60, 1),
        ("10/h", 10 / 3600, 1),
        ("0.5/s", 0.5, 1),
        ("100/s burst 20", 100.0, 20),
        (" 3 / minute  burst 2 ", 3 / 60, 2),
        ("7/Hour", 7 / 3600, 1),
        ("2/sec", 2.0, 1),
    ],
)
def test_rate_grammar(text: str, per_second: float, burst: int) -> None:
    rate = parse_rate(text, "op")
    assert rate is not None
    assert rate.per_second == pytest.approx(per_second) and rate.burst == burst


@pytest.mark.parametrize(
    "bad", ["100", "100/d", "/s", "fast", "0/s", "-1/s", "1/s burst 0", "1/s burst", 100, 2.5, []]
)
def test_a_bad_rate_fails_at_decoration_naming_the_value_and_the_grammar(bad: Any) -> None:
    with pytest.raises(ConfigError) as caught:

        @task_token_guard(operation_type="bad_rate", tags={"rate": bad})
        def f() -> None: ...

    message = str(caught.value)
    assert repr(bad) in message and "'bad_rate'" in message
    assert '"N/s", "N/m" or "N/h"' in message and "burst" in message


def test_a_rate_slower_than_the_longest_wait_is_refused() -> None:
    assert parse_rate("1/h", "op") is not None
    with pytest.raises(ConfigError, match=r"'0.0001/h'.*longer wait than tokengate can honour"):
        parse_rate("0.0001/h", "op")


def test_no_rate_tag_means_no_limit() -> None:
    assert TaskSpec.from_tags("op", {}).rate is None


# -- the bucket, pure arithmetic -------------------------------------------------------------------
def test_bucket_burst_then_the_rate() -> None:
    bucket = TokenBucket(per_second=2.0, burst=3, now=0.0)
    assert [bucket.try_take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert not bucket.try_take(0.25)
    assert bucket.wait(0.25) == pytest.approx(0.25)
    assert bucket.try_take(0.5)
    assert not bucket.try_take(0.5)


def test_bucket_refills_up_to_its_burst_only() -> None:
    bucket = TokenBucket(per_second=1.0, burst=2, now=0.0)
    assert bucket.try_take(0.0) and bucket.try_take(0.0)
    assert [bucket.try_take(100.0) for _ in range(3)] == [True, True, False]


def test_bucket_ignores_an_earlier_instant() -> None:
    bucket = TokenBucket(per_second=1.0, burst=1, now=10.0)
    assert bucket.try_take(10.0)
    assert not bucket.try_take(5.0)  # not a refill, and no debt either
    assert bucket.wait(5.0) == pytest.approx(1.0)
    assert bucket.try_take(11.0)


def test_bucket_due_on_time_despite_float_sums() -> None:
    bucket = TokenBucket(per_second=10.0, burst=1, now=0.0)
    now = 0.0
    assert bucket.try_take(now)
    for _ in range(100):  # each wait, added to now, must be enough: no nanosecond re-arms
        now += bucket.wait(now)
        assert bucket.try_take(now)


# -- the limiter on a fake clock -------------------------------------------------------------------
class FakeToken:
    """What the limiter touches of a Token."""

    def __init__(self, spec: TaskSpec, name: str) -> None:
        self.spec = spec
        self.id = name
        self._parked: str | None = None
        self._rate_passed = False
        self._deadline_at: float | None = None
        self.discarded = False

    def done(self) -> bool:
        return self.discarded


class FakeTimers:
    """The TimerQueue's ``call_later`` on the fake clock, run only by ``run_due`` (no thread)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.handles: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.handles.append((self.clock() + delay, callback))

    def pending(self) -> list[tuple[float, Callable[[], None]]]:
        return list(self.handles)

    def run_due(self, now: float) -> int:
        due = [h for h in self.handles if h[0] <= now]
        self.handles = [h for h in self.handles if h[0] > now]
        for _, callback in due:
            callback()
        return len(due)


def _limiter(clock: FakeClock) -> tuple[RateLimiter, FakeTimers, list[str]]:
    timers = FakeTimers(clock)
    released: list[str] = []

    def fail(token: Any, exc: BaseException) -> None:
        raise AssertionError(f"{token.id} failed: {exc}")

    return RateLimiter(timers.call_later, on_error=fail, clock=clock), timers, released


def test_limiter_fifo_released_by_its_timer() -> None:
    clock = FakeClock()
    limiter, timers, released = _limiter(clock)
    spec = TaskSpec.from_tags("op", {"rate": "1/h burst 2"})
    tokens = [FakeToken(spec, f"t{i}") for i in range(5)]
    proceed = [limiter.hold(t, lambda t: released.append(t.id)) for t in tokens]
    assert proceed == [False, False, True, True, True]  # True: it waits
    assert [t._parked for t in tokens] == [None, None, "rate", "rate", "rate"]
    assert len(timers.pending()) == 1  # one timer per operation, not one per token
    assert limiter.stats() == {"op": RateStats(waiting=3, delayed=3, wait_seconds=0.0)}

    clock.now += HOUR
    assert timers.run_due(clock.now) == 1
    assert released == ["t2"]
    assert len(timers.pending()) == 1  # re-armed for the next one
    tokens[3].discarded = True  # cancelled while waiting: skipped, uses no permit
    clock.now += HOUR
    timers.run_due(clock.now)
    assert released == ["t2", "t4"]
    assert timers.pending() == []
    stats = limiter.stats()["op"]
    assert (stats.waiting, stats.delayed) == (0, 3)
    assert stats.wait_seconds == pytest.approx(HOUR + 2 * HOUR + 2 * HOUR)
    # A released token passes the limiter once (its admission goes on); a retry waits again.
    assert tokens[2]._rate_passed and not limiter.hold(tokens[2], released.append)
    assert limiter.hold(tokens[2], released.append)


def test_limiter_newcomers_queue_behind_waiters() -> None:
    clock = FakeClock()
    limiter, _timers, released = _limiter(clock)
    spec = TaskSpec.from_tags("op", {"rate": "1/s"})
    first, second, third = (FakeToken(spec, n) for n in ("a", "b", "c"))
    assert not limiter.hold(first, released.append)
    assert limiter.hold(second, released.append)
    clock.now += 1.0  # a permit is there, but "b" waits for it already
    assert limiter.hold(third, released.append)
    assert limiter.poll() == 1 and [t.id for t in released] == ["b"]


def test_limiter_a_late_waiter_leaves_without_using_a_permit() -> None:
    clock = FakeClock()
    limiter, timers, released = _limiter(clock)
    spec = TaskSpec.from_tags("op", {"rate": "1/h"})
    first, late, last = (FakeToken(spec, n) for n in ("first", "late", "last"))
    late._deadline_at = time.perf_counter() - 1.0  # already past (Token deadlines' clock)
    discards: list[str] = []
    late._discard = discards.append  # type: ignore[attr-defined]
    assert not limiter.hold(first, released.append)
    assert limiter.hold(late, released.append) and limiter.hold(last, released.append)
    clock.now += HOUR  # one permit: for "last", since "late" is discarded
    assert timers.run_due(clock.now) == 1
    assert [t.id for t in released] == ["last"] and discards == ["deadline"]


def test_limiter_forget_and_drain() -> None:
    clock = FakeClock()
    limiter, _timers, released = _limiter(clock)
    spec = TaskSpec.from_tags("op", {"rate": "1/h"})
    tokens = [FakeToken(spec, f"t{i}") for i in range(4)]
    for t in tokens:
        limiter.hold(t, released.append)
    limiter.forget(tokens[1])
    assert limiter.waiting("op") == 2
    assert [t.id for t in limiter.drain_waiting()] == ["t2", "t3"]
    assert limiter.waiting("op") == 0 and limiter.poll(clock.now + 10 * HOUR) == 0


# -- the coordinator ---------------------------------------------------------------------------
ran: list[int] = []


@task_token_guard(operation_type="rt_limited", tags={"rate": "1/h burst 2"})
def limited(i: int) -> int:
    ran.append(i)
    return i


@task_token_guard(operation_type="rt_free")
def free(i: int) -> int:
    return i


@task_token_guard(operation_type="rt_hold")
def hold(started: threading.Event) -> str:
    started.set()
    assert GATE.wait(30)
    return "held"


@task_token_guard(operation_type="rt_fast", tags={"rate": "50/s"})
def fast(i: int) -> int:
    ran.append(i)
    return i


@task_token_guard(operation_type="rt_late", tags={"rate": "1/h", "deadline": 0.001})
def late() -> str:
    return "ran"


@pytest.fixture(autouse=True)
def _clear_ran() -> None:
    ran.clear()


def test_the_burst_passes_then_tokens_wait_holding_no_worker(make_coordinator: Make) -> None:
    coordinator = make_coordinator(**SINGLE)
    tokens = [limited(i) for i in range(5)]
    assert [t.get(timeout=10) for t in tokens[:2]] == [0, 1]
    assert [t.state for t in tokens[2:]] == ["pending"] * 3
    # No worker holds them: the single worker runs other work meanwhile, mailboxes are empty.
    assert free(7).get(timeout=10) == 7
    assert coordinator.queue_depths() == {1: [0]}
    snap = coordinator.stats()
    op = snap.operations["rt_limited"]
    assert (op.rate_waiting, op.rate_delayed, op.in_flight) == (3, 3, 3)
    assert (snap.rate_waiting, snap.rate_delayed) == (3, 3)
    assert "Rate wait : 3 waiting now, 3 waited" in str(snap)

    now = time.monotonic()
    assert coordinator.rate_limiter.poll(now + HOUR) == 1
    assert tokens[2].get(timeout=10) == 2
    assert [t.state for t in tokens[3:]] == ["pending"] * 2
    assert coordinator.rate_limiter.poll(now + 3 * HOUR) == 2
    assert [t.get(timeout=10) for t in tokens[3:]] == [3, 4]
    assert ran == [0, 1, 2, 3, 4]  # FIFO
    op = coordinator.stats().operations["rt_limited"]
    assert (op.rate_waiting, op.rate_delayed, op.resolved) == (0, 3, 5)
    assert op.rate_wait_seconds >= 4 * HOUR  # the stepped clock's hours, not real time


def test_the_timer_releases_waiting_tokens_in_order(make_coordinator: Make) -> None:
    make_coordinator(**SINGLE)
    tokens = [fast(i) for i in range(6)]
    assert [t.get(timeout=10) for t in tokens] == list(range(6))
    assert ran == list(range(6))


def test_cancelled_and_stopped_waiters_are_discarded_and_counted(make_coordinator: Make) -> None:
    coordinator = make_coordinator(**SINGLE)
    tokens = [limited(i) for i in range(5)]
    assert [t.get(timeout=10) for t in tokens[:2]] == [0, 1]
    assert tokens[2].cancel()
    assert tokens[2].discard_reason == "cancelled"
    op = coordinator.stats().operations["rt_limited"]
    assert (op.rate_waiting, op.discarded) == (2, 1)  # out of the FIFO at once
    coordinator.stop(cancel_pending=True, timeout=10)
    assert [t.discard_reason for t in tokens[3:]] == ["stopped", "stopped"]
    snap = coordinator.stats()
    assert (snap.submitted, snap.resolved, snap.discarded, snap.in_flight) == (5, 2, 3, 0)
    assert snap.rate_waiting == 0
    assert ran == [0, 1]


def test_a_waiter_past_its_deadline_is_discarded_when_its_turn_comes(
    make_coordinator: Make,
) -> None:
    coordinator = make_coordinator(**SINGLE)
    first, second = late(), late()
    eventually(first.done, what="the first call ended")
    assert first.state in ("resolved", "discarded")  # its deadline is a millisecond
    assert second.state == "pending"
    eventually(lambda: time.perf_counter() - second.submitted_at > 0.01, what="its deadline")
    assert coordinator.rate_limiter.poll(time.monotonic() + HOUR) == 0
    assert second.discard_reason == "deadline"
    op = coordinator.stats().operations["rt_late"]
    assert (op.rate_delayed, op.rate_waiting, op.discarded + op.resolved) == (1, 0, 2)


def test_rate_metrics(make_coordinator: Make) -> None:
    coordinator = make_coordinator(**SINGLE)
    tokens = [limited(i) for i in range(3)]
    assert [t.get(timeout=10) for t in tokens[:2]] == [0, 1]
    registry = CollectorRegistry()
    registry.register(TokenGateCollector(coordinator))
    text = generate_latest(registry).decode()
    labels = '{operation_type="rt_limited",weight="light"}'
    assert f"tokengate_rate_waiting{labels} 1.0" in text
    assert f"tokengate_rate_delayed_total{labels} 1.0" in text
    assert f"tokengate_rate_wait_seconds_total{labels}" in text
    assert "tokengate_rate_waiting{" + 'operation_type="rt_free"' not in text
