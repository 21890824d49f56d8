"""stop() under fire: mid-surge from another thread, with a timeout while
producers are blocked, racing a submit, and with tasks still running after it gave up."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import eventually
from tokengate import (
    CoordinatorNotRunning,
    DependencyFailed,
    OperationsCoordinator,
    RetryPolicy,
    Token,
    TokenDiscarded,
)
from tokengate._middleware import Middleware

from ._support import (
    Resources,
    assert_counts_match,
    assert_terminal,
    record,
    serves_new_work,
    settle,
)
from ._tasks import (
    GATE,
    HANG,
    fails_once,
    gated,
    late_transient,
    link,
    plain,
    raise_if,
    surge_heavy,
    surge_light,
    surge_tier,
)


# -- stop() in the middle of a surge ------------------------------------------------------------
def surge_producer(
    index: int, start: threading.Barrier, out: list[Token[Any]], ends: list[BaseException]
) -> None:
    start.wait()
    i = 0
    previous: Token[Any] | None = None
    try:
        while True:
            i += 1
            k = index * 1_000_000 + i
            if i % 7 == 0:
                token: Token[Any] = raise_if(k, True)
            elif i % 11 == 0 and previous is not None:
                token = link(previous, k, -1)
            elif i % 5 == 0:
                token = surge_tier(k)
            elif i % 3 == 0:
                token = surge_heavy(k)
            else:
                token = surge_light(k)
            out.append(token)
            previous = token
    except BaseException as exc:
        ends.append(exc)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """A short GIL switch interval, so threads interleave at many more points."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def surge_round(cancel_pending: bool, producers: int, stop_at: int) -> list[Token[Any]]:
    """Producers flood a coordinator with small mailboxes; another thread stops it once
    ``stop_at`` tokens were submitted. Returns every token the producers got."""
    coordinator = OperationsCoordinator(
        workers_per_core=2,
        mailbox_max=8,
        storage_limits={"FAST": 2},
        retry_policy=RetryPolicy(backoff_base=0.001),
    ).start()
    start = threading.Barrier(producers + 1)
    outs: list[list[Token[Any]]] = [[] for _ in range(producers)]
    ends: list[BaseException] = []
    threads = [
        threading.Thread(target=surge_producer, args=(p, start, outs[p], ends))
        for p in range(producers)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    eventually(lambda: coordinator.stats().submitted >= stop_at, what=f"{stop_at} submissions")
    stopper = threading.Thread(target=coordinator.stop, kwargs={"cancel_pending": cancel_pending})
    stopper.start()
    stopper.join(30)
    for thread in threads:
        thread.join(30)
    assert not stopper.is_alive() and not any(t.is_alive() for t in threads)
    assert len(ends) == producers
    assert all(type(e) is CoordinatorNotRunning for e in ends), ends
    made = [t for out in outs for t in out]
    lost = settle(made)
    assert lost == 0, f"{lost} tokens never reached a terminal state"
    assert_terminal(made)
    assert_counts_match(coordinator, made)
    for token in made:
        if token.state == "discarded":
            assert cancel_pending and token.discard_reason == "stopped", token
        elif token.state == "failed":
            assert isinstance(
                token.exception(0), ValueError | ConnectionError | DependencyFailed
            ), token
    with coordinator:  # the same coordinator starts again and serves
        serves_new_work(coordinator)
    return made


@pytest.mark.parametrize("cancel_pending", [False, True], ids=["drain", "cancel_pending"])
def test_stop_from_another_thread_in_the_middle_of_a_surge(
    resources: Resources, fast_switching: None, cancel_pending: bool
) -> None:
    rounds = 4
    tokens: list[Token[Any]] = []
    for round_ in range(rounds):
        tokens += surge_round(cancel_pending, producers=4, stop_at=500 + 700 * round_)
    leaks = resources.leaks()
    record(
        f"stop_mid_surge_{'cancel' if cancel_pending else 'drain'}",
        injected=rounds,
        tokens=len(tokens),
        lost=0,
        leaks=len(leaks),
    )
    assert leaks == []


@pytest.mark.parametrize("cancel_pending", [False, True], ids=["drain", "cancel_pending"])
def test_stop_with_a_timeout_while_producers_are_blocked_behind_a_hung_task(
    resources: Resources, cancel_pending: bool
) -> None:
    """Producers blocked at the full mailbox of a hung worker are let go when stop() gives up:
    their tokens are discarded, never pushed into a mailbox no worker will read."""
    # convergence=False: the engine would rightly add a thread beside the hung one and make room.
    coordinator = OperationsCoordinator(
        workers_per_core=1, cores=1, mailbox_max=2, convergence=False
    ).start()
    stuck = gated(0)  # no timeout: the worker stays stuck until the test opens the gate
    # Running before stop(cancel_pending=True), which would otherwise discard it unstarted.
    eventually(stuck.running, what="the hung task to start")
    queued = [plain(1)]  # the mailbox is full: 1 running + 1 queued
    blocked: list[Token[Any]] = []
    ends: list[BaseException] = []

    def producer(i: int) -> None:
        try:
            blocked.append(plain(i))
        except BaseException as exc:
            ends.append(exc)

    producers = [threading.Thread(target=producer, args=(i,)) for i in range(2, 5)]
    for thread in producers:
        thread.start()
    eventually(
        lambda: coordinator.admission.waiters == 3, what="three producers blocked at the gate"
    )
    coordinator.stop(cancel_pending=cancel_pending, timeout=0.3)
    for thread in producers:  # released while the hung task still runs
        thread.join(10)
    assert not any(t.is_alive() for t in producers), "a producer is still blocked after stop()"
    assert ends == []
    for token in [*queued, *blocked]:
        assert token.state == "discarded" and token.discard_reason == "stopped", token
    assert not stuck.done()  # stop() gave up on it and left its thread behind
    GATE.set()
    made = [stuck, *queued, *blocked]
    assert settle(made) == 0
    assert_terminal(made)
    assert stuck.result(0) == 0  # a task left running still finishes and is counted
    eventually(lambda: coordinator.stats().in_flight == 0, what="the stuck task to end")
    assert_counts_match(coordinator, made)
    with coordinator:
        serves_new_work(coordinator)
    leaks = resources.leaks()
    record("stop_timeout_with_blocked_producers", injected=3, tokens=5, lost=0, leaks=len(leaks))
    assert leaks == []


class PauseSubmit(Middleware):
    """Holds one producer inside submit() (after the running check) until told to go on."""

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self.entered = threading.Event()
        self.go_on = threading.Event()

    def before_submit(self, spec: Any) -> None:
        if threading.current_thread().name == self.thread_name:
            self.entered.set()
            assert self.go_on.wait(30)


def test_a_submit_racing_stop_is_discarded_not_lost(resources: Resources) -> None:
    """Regression: a producer preempted inside submit() while stop() ran to the end pushed its
    token into the mailbox of a worker that had already exited; the token stayed pending."""
    coordinator = OperationsCoordinator(workers_per_core=1).start()
    pause = PauseSubmit("racing-producer")
    coordinator.add_middleware(pause)
    out: list[Token[Any]] = []
    producer = threading.Thread(target=lambda: out.append(plain(1)), name="racing-producer")
    producer.start()
    assert pause.entered.wait(10)
    coordinator.stop()
    pause.go_on.set()
    producer.join(10)
    (token,) = out
    assert settle([token], timeout=5) == 0, "the token submitted during stop() is lost"
    assert token.state == "discarded" and token.discard_reason == "stopped"
    with pytest.raises(TokenDiscarded):
        token.get(timeout=1)
    assert_counts_match(coordinator, [token])
    leaks = resources.leaks()
    record("submit_racing_stop", injected=1, tokens=1, lost=0, leaks=len(leaks))
    assert leaks == []


def test_a_transient_failure_after_stop_fails_the_token_instead_of_losing_it(
    resources: Resources,
) -> None:
    """Regression: a task left running by stop(timeout=...) that then failed with a retryable
    error tried to schedule its retry on the closed timer queue; the RuntimeError killed the
    worker thread and the token stayed pending for ever."""
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
    started = threading.Event()
    token = late_transient(started)
    assert started.wait(10)
    coordinator.stop(timeout=0.1)
    HANG.set()
    assert settle([token], timeout=10) == 0, "the token is lost"
    with pytest.raises(ConnectionError, match="after stop"):
        token.get(timeout=0)
    assert token.attempts == 1  # not retried: the coordinator has stopped
    assert_counts_match(coordinator, [token])
    with coordinator:
        serves_new_work(coordinator)
    leaks = resources.leaks()
    record("transient_failure_after_stop", injected=1, tokens=1, lost=0, leaks=len(leaks))
    assert leaks == []


class Retried(Middleware):
    """Sets ``event`` once a failed attempt was scheduled for a retry (its back-off began)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def after_attempt(self, token: Any, outcome: str, exc: BaseException | None) -> None:
        if outcome == "retried":
            self.event.set()


@pytest.mark.timeout(30)  # a stop() that waited for the 60 s back-off would hit it
def test_a_token_waiting_out_its_retry_back_off_is_discarded_by_stop_cancel_pending(
    resources: Resources,
) -> None:
    """stop(cancel_pending=True) while a failed token waits 60 s for its retry: the token has
    not started its next attempt, so it is discarded at once (not run again, not lost, and
    stop() does not wait for the back-off). Found by a mutation check: with the back-off set
    left out of what stop() discards, the random schedules and the other stop tests passed."""
    policy = RetryPolicy(backoff_base=60.0, backoff_cap=60.0, jitter=0.0)
    coordinator = OperationsCoordinator(
        workers_per_core=1, cores=1, convergence=False, retry_policy=policy
    ).start()
    retried = Retried()
    coordinator.add_middleware(retried)
    runs: list[int] = []
    token = fails_once(runs)
    assert retried.event.wait(10)
    coordinator.stop(cancel_pending=True)  # no drain timeout: nothing here may wait 60 s
    assert settle([token], timeout=1) == 0, "the token waiting for its retry is lost"
    assert (token.state, token.discard_reason) == ("discarded", "stopped")
    assert runs == [0] and token.attempts == 1  # never run again
    assert_counts_match(coordinator, [token])
    assert coordinator.stats().retried == 1
    leaks = resources.leaks()
    record("stop_during_retry_back_off", injected=1, tokens=1, lost=0, leaks=len(leaks))
    assert leaks == []
