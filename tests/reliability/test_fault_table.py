"""Faults on the thread lane as a failure table: after each, nothing is lost.

Each row injects one fault into a running coordinator. Then the same checks run for every row:
every token is in exactly one terminal state, each failed token carries the right error, the
counts add up (``submitted == resolved + failed + discarded``, ``in_flight == 0``) and agree
with the tokens, no storage permit is held, the coordinator serves new work, and after stop()
no thread or child process outlives it. Each row is recorded in the fault ledger printed at the
end of the run (injections, tokens lost, leaks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from conftest import eventually
from tokengate import (
    DependencyFailed,
    OperationsCoordinator,
    RetryPolicy,
    TaskTimeout,
    Token,
)

from ._support import (
    Resources,
    assert_counts_match,
    assert_terminal,
    record,
    serves_new_work,
    settle,
)
from ._tasks import GATE, HANG, always_raise, burst, gated, hang, link, plain, raise_if


# -- the rows --------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a fault left behind: its tokens, how each must have ended, how often it struck."""

    tokens: list[Token[Any]]
    check: Callable[[int, Token[Any]], None]
    injected: int
    release: Callable[[], None] = lambda: None
    extra: list[Callable[[OperationsCoordinator], None]] = field(default_factory=list)


def expect_error(token: Token[Any], kind: type[BaseException], fragment: str) -> BaseException:
    assert token.state == "failed", token
    exc = token.exception(0)
    assert type(exc) is kind, (token, exc)
    assert fragment in str(exc), (fragment, str(exc))
    return exc


def every_third(_: OperationsCoordinator) -> Outcome:
    n = 600
    tokens = [raise_if(i, i % 3 == 0) for i in range(n)]

    def check(i: int, token: Token[Any]) -> None:
        assert token.attempts == 1  # a ValueError is a programming error: never retried
        if i % 3 == 0:
            expect_error(token, ValueError, f"fault {i}")
        else:
            assert token.result(0) == i

    return Outcome(tokens, check, injected=n // 3)


BURSTS = (range(100, 150), range(300, 360), range(500, 600))


def in_burst(i: int) -> bool:
    return any(i in b for b in BURSTS)


def bursts(_: OperationsCoordinator) -> Outcome:
    tokens = [burst(i, in_burst(i)) for i in range(600)]

    def check(i: int, token: Token[Any]) -> None:
        if in_burst(i):
            expect_error(token, ConnectionError, f"burst fault {i}")
            assert token.attempts == 3  # transient: retried twice (tag), then failed
        else:
            assert token.result(0) == i and token.attempts == 1

    def retries_counted(coordinator: OperationsCoordinator) -> None:
        assert coordinator.stats().operations["fault_burst"].retried == 2 * sum(map(len, BURSTS))
        assert coordinator.tier_stats()["FAST"].high_water <= 3

    return Outcome(tokens, check, injected=3 * sum(map(len, BURSTS)), extra=[retries_counted])


def all_of_them(_: OperationsCoordinator) -> Outcome:
    tokens = [always_raise(i) for i in range(300)]

    def check(i: int, token: Token[Any]) -> None:
        expect_error(token, RuntimeError, f"every task fails ({i})")

    return Outcome(tokens, check, injected=300)


def hangs_past_timeout(_: OperationsCoordinator) -> Outcome:
    hung = {0, 25, 50, 75}
    tokens = [hang(i) if i in hung else plain(i) for i in range(100)]

    def check(i: int, token: Token[Any]) -> None:
        if i in hung:
            exc = expect_error(token, TaskTimeout, "timeout of 0.2s")
            assert isinstance(exc, TimeoutError)
            assert token.attempts == 1  # the run could not be stopped: never run twice
        else:
            assert token.result(0) == i

    def workers_replaced(coordinator: OperationsCoordinator) -> None:
        # every hung worker handed its mailbox to a fresh thread, so the rest did not wait
        # The token fails first and its worker is replaced just after: wait for the count.
        eventually(
            lambda: coordinator.stats().events.get("workers_replaced") == len(hung),
            what="every hung worker to be replaced",
        )

    return Outcome(tokens, check, injected=len(hung), release=HANG.set, extra=[workers_replaced])


def raising_callbacks(kind: type[BaseException]) -> Callable[[OperationsCoordinator], Outcome]:
    def inject(_: OperationsCoordinator) -> Outcome:
        n = 300
        tokens = [gated(i) for i in range(n)]
        seen: list[int] = []
        lock = threading.Lock()

        def raising(_token: Any) -> None:
            raise kind("done-callback fault")

        def counting(token: Any) -> None:
            with lock:
                seen.append(token.result(0))

        for token in tokens:  # registered while every token is still pending
            token.add_done_callback(raising)
            token.add_done_callback(counting)
        GATE.set()

        def check(i: int, token: Token[Any]) -> None:
            assert token.result(0) == i

        def later_callbacks_ran(_: OperationsCoordinator) -> None:
            eventually(lambda: len(seen) == n, what="the callback after the raising one")
            assert sorted(seen) == list(range(n))

        return Outcome(tokens, check, injected=n, extra=[later_callbacks_ran])

    return inject


def chain_breaks_in_the_middle(_: OperationsCoordinator) -> Outcome:
    n, fail_at = 1000, 500
    tokens: list[Token[Any]] = []
    previous: Token[int] | None = None
    for i in range(n):
        previous = link(previous, i, fail_at)
        tokens.append(previous)

    def check(i: int, token: Token[Any]) -> None:
        if i < fail_at:
            assert token.result(0) == i + 1
        elif i == fail_at:
            expect_error(token, ValueError, f"link {fail_at} broke")
        else:
            exc = expect_error(token, DependencyFailed, tokens[i - 1].id)
            assert token.attempts == 0  # never ran
            assert isinstance(exc.__cause__, ValueError if i == fail_at + 1 else DependencyFailed)
            # the root cause is named, and the message does not grow with the chain's length
            assert exc.root_cause is tokens[fail_at].exception(0)
            assert f"link {fail_at} broke" in str(exc)
            assert len(str(exc)) < 1000, len(str(exc))

    return Outcome(tokens, check, injected=1)


FAULTS: list[tuple[str, dict[str, Any], Callable[[OperationsCoordinator], Outcome]]] = [
    ("raise_every_3rd", {}, every_third),
    (
        "raise_in_bursts",
        {"retry_policy": RetryPolicy(backoff_base=0.001), "storage_limits": {"FAST": 3}},
        bursts,
    ),
    ("raise_all", {}, all_of_them),
    ("hang_past_timeout", {}, hangs_past_timeout),
    ("callback_raises_Exception", {}, raising_callbacks(RuntimeError)),
    ("callback_raises_SystemExit", {}, raising_callbacks(SystemExit)),
    ("callback_raises_KeyboardInterrupt", {}, raising_callbacks(KeyboardInterrupt)),
    ("dependency_fails_mid_1000_chain", {}, chain_breaks_in_the_middle),
]


@pytest.mark.parametrize(
    ("options", "inject"), [pytest.param(o, f, id=name) for name, o, f in FAULTS]
)
def test_fault_table(
    request: pytest.FixtureRequest,
    resources: Resources,
    options: dict[str, Any],
    inject: Callable[[OperationsCoordinator], Outcome],
) -> None:
    name = request.node.callspec.id
    # convergence=False: the fault rows count replacements and workers exactly; the engine's own
    # growth is tested in tests/test_convergence.py.
    coordinator = OperationsCoordinator(workers_per_core=2, convergence=False, **options).start()
    outcome = None
    try:
        outcome = inject(coordinator)
        lost = settle(outcome.tokens)
        assert lost == 0, f"{lost} tokens never reached a terminal state"
        assert_terminal(outcome.tokens)
        for i, token in enumerate(outcome.tokens):
            outcome.check(i, token)
        assert_counts_match(coordinator, outcome.tokens)
        for extra in outcome.extra:
            extra(coordinator)
        assert all(t.running == t.waiting == 0 for t in coordinator.tier_stats().values())
        serves_new_work(coordinator)
    finally:
        if outcome is not None:
            outcome.release()
        coordinator.stop(timeout=30)
    assert_counts_match(coordinator, outcome.tokens)
    leaks = resources.leaks()
    record(name, injected=outcome.injected, tokens=len(outcome.tokens), lost=lost, leaks=len(leaks))
    assert leaks == []


def test_a_callback_raising_keyboardinterrupt_on_the_main_thread_still_interrupts() -> None:
    """On the main thread (a cancel() there runs the callbacks) a KeyboardInterrupt or
    SystemExit from a callback is raised again, but only after every other callback ran."""
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1, convergence=False).start()
    try:
        running = gated(0)
        queued = gated(1)
        ran: list[str] = []

        def interrupting(_token: Any) -> None:
            raise KeyboardInterrupt

        queued.add_done_callback(interrupting)
        queued.add_done_callback(lambda token: ran.append(token.state))
        with pytest.raises(KeyboardInterrupt):
            queued.cancel()
        assert ran == ["discarded"]
        GATE.set()
        assert running.get(timeout=10) == 0
        serves_new_work(coordinator)
    finally:
        GATE.set()
        coordinator.stop(timeout=10)
    assert_counts_match(coordinator, [running, queued])


def test_tokens_queued_behind_a_hung_task_run_once_it_times_out(resources: Resources) -> None:
    """Regression: a thread cannot be killed, and the tokens queued in the hung worker's own
    mailbox waited for the hang to end (however long) while the token itself had long failed.
    The stuck worker is now replaced by a fresh thread that takes over its mailbox."""
    # convergence=False: the engine would otherwise add workers for the backlog behind the
    # sleeping task, and this test is about replacing the one stuck worker.
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1, convergence=False).start()
    try:
        stuck = hang(0)
        behind = [plain(i) for i in range(1, 50)]  # one worker: all queued behind the hang
        assert [t.get(timeout=10) for t in behind] == list(range(1, 50))
        with pytest.raises(TaskTimeout):
            stuck.get(timeout=10)
        assert not HANG.is_set()  # the hung task is still running: it was not waited for
        # Replaced, not added. ThreadLane.replace adds the fresh worker before it retires the
        # stuck one, and the fresh one may steal (and finish) every queued token in between.
        eventually(
            lambda: len(coordinator.lanes["thread"].workers) == 1,
            what="the stuck worker to be retired",
        )
        serves_new_work(coordinator)
    finally:
        HANG.set()
        coordinator.stop(timeout=10)
    assert_counts_match(coordinator, [stuck, *behind])
    assert resources.leaks() == []  # the stuck thread exits once its task returns
