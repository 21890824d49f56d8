"""Coordinator behaviour on the local backend only: lifecycle, routing, backpressure, retries,
nesting, timeouts, stop semantics and logs.

What every backend must show (results, errors, chains, dependencies, deadlines, draining, restart)
is in ``tests/conformance/test_coordinator_conformance.py``, which runs on the local backend too;
the tests here pin local details (worker counts, cores, mailboxes, threads, logs). Task functions
shared with that suite are imported from ``conformance.tasks``, its one home."""

from __future__ import annotations

import functools
import gc
import logging
import re
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from conformance.tasks import echo, nested_fib, raises_value_error
from conftest import GATE, assert_counts_add_up, eventually
from tokengate import (
    CoordinatorNotRunning,
    OperationsCoordinator,
    Overloaded,
    RetryPolicy,
    TaskSpec,
    TaskTimeout,
    Token,
    TokenDiscarded,
    TokenGateError,
    Topology,
    task_token_guard,
)
from tokengate._middleware import Middleware
from tokengate.demos.cpu import fibonacci_operation  # the Quick-Proof's Proof 1 task, unchanged

Make = Callable[..., OperationsCoordinator]
RUNS: list[str] = []
RUNS_LOCK = threading.Lock()


@pytest.fixture(autouse=True)
def _reset() -> None:
    RUNS.clear()


@task_token_guard(operation_type="where", tags={"weight": "light"})
def where_light() -> str:
    return threading.current_thread().name


@task_token_guard(operation_type="where_heavy", tags={"weight": "heavy", "executor": "thread"})
def where_heavy() -> str:
    return threading.current_thread().name


@task_token_guard(operation_type="blocker", tags={"weight": "heavy", "executor": "thread"})
def blocker(started: threading.Event | None = None) -> str:
    if started is not None:
        started.set()
    assert GATE.wait(30)
    return "released"


@task_token_guard(operation_type="record", tags={"weight": "heavy", "executor": "thread"})
def record(label: str) -> str:
    with RUNS_LOCK:
        RUNS.append(label)
    return label


FLAKY_STATE: dict[str, int] = {}


@task_token_guard(
    operation_type="flaky", tags={"weight": "heavy", "retries": 3, "executor": "thread"}
)
def flaky(label: str, failures: int, exc_type: type[BaseException] = ConnectionError) -> str:
    with RUNS_LOCK:
        RUNS.append(label)
        seen = FLAKY_STATE.get(label, 0)
        FLAKY_STATE[label] = seen + 1
    if seen < failures:
        raise exc_type(f"{label} failure {seen + 1}")
    return label


# -- lifecycle ----------------------------------------------------------------------------------
def test_seed_proof_1_runs_unchanged() -> None:
    """The Quick-Proof's Proof 1 as written: its heavy tasks go to worker processes where the
    platform has them (the process lane), to threads elsewhere; the results and counts are the
    same."""
    coordinator = OperationsCoordinator()
    coordinator.start()
    try:
        args = [100, 200, 300, 150, 250, 180, 220, 280]
        tokens = [fibonacci_operation(n) for n in args]
        results = [token.get(timeout=30) for token in tokens]
    finally:
        coordinator.stop()
    assert results == [fibonacci_operation.__wrapped__(n) for n in args]
    snap = coordinator.stats()
    assert (snap.submitted, snap.resolved, snap.failed, snap.discarded) == (8, 8, 0, 0)
    expected_lane = "process" if "process" in coordinator.lanes else "thread"
    assert {t.lane for t in tokens} == {expected_lane}


def test_call_without_coordinator_says_how_to_start_one() -> None:
    with pytest.raises(CoordinatorNotRunning, match=r"OperationsCoordinator\(\)"):
        echo(1)


def test_context_manager_start_twice_and_submit_after_stop() -> None:
    with OperationsCoordinator(workers_per_core=1) as coordinator:
        assert coordinator.running
        with pytest.raises(TokenGateError, match="already running"):
            coordinator.start()
        assert echo(1).get(timeout=10) == ((1,), {})
    assert not coordinator.running
    with pytest.raises(CoordinatorNotRunning, match="stopped"):
        coordinator.submit(echo, 1)
    coordinator.stop()  # a second stop is a no-op


def test_the_innermost_running_coordinator_takes_calls(make_coordinator: Make) -> None:
    outer = make_coordinator(workers_per_core=1)
    inner = make_coordinator(workers_per_core=1)
    echo(1).get(timeout=10)
    assert (outer.stats().submitted, inner.stats().submitted) == (0, 1)
    inner.stop()
    echo(2).get(timeout=10)
    assert outer.stats().submitted == 1


# -- routing ------------------------------------------------------------------------------------
def test_routing_respects_the_affinity_policy(
    make_coordinator: Make, eight_cores: Topology
) -> None:
    make_coordinator(workers_per_core=2, topology=eight_cores)
    light = [where_light() for _ in range(200)]
    heavy = [where_heavy() for _ in range(200)]
    for token in light + heavy:
        token.get(timeout=10)
    assert {t.core for t in light} <= set(range(3, 9))
    assert {t.core for t in heavy} <= set(range(1, 9))
    assert all(re.fullmatch(r"worker_\d+_core_\d", t.worker or "") for t in light + heavy)


def test_idle_coordinator_routes_to_the_preferred_core(
    make_coordinator: Make, eight_cores: Topology
) -> None:
    coordinator = make_coordinator(workers_per_core=2, topology=eight_cores)
    assert where_heavy().get(timeout=10) and coordinator.affinity.preferred("heavy") == 1
    token = where_heavy()
    token.get(timeout=10)
    assert token.core == 1
    token = where_light()
    token.get(timeout=10)
    assert token.core == 3


def test_routing_balances_to_the_least_loaded_mailbox(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=2, cores=1)
    started = [threading.Event() for _ in range(2)]
    blocked = [blocker(started[i]) for i in range(2)]  # one per worker
    for event in started:
        assert event.wait(10)
    queued = [record(str(i)) for i in range(10)]
    depths = coordinator.queue_depths()[1]
    assert sorted(depths) == [6, 6]  # 1 running + 5 queued on each: balanced
    GATE.set()
    for token in blocked + queued:
        token.get(timeout=10)


def test_routing_log_line_matches_the_seed(
    coordinator: OperationsCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="tokengate.routing"):
        token = where_heavy()
        token.get(timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "tokengate.routing"]
    assert any(
        re.fullmatch(
            rf"\[ROUTING\] Token {token.id} \(heavy\) → Pos \d+ \(Core \d, Worker \d+\)", line
        )
        for line in lines
    ), lines


# -- backpressure -------------------------------------------------------------------------------
def test_a_full_mailbox_blocks_the_producer_until_there_is_room(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1, mailbox_max=2)
    started = threading.Event()
    first = blocker(started)
    assert started.wait(10)
    queued = [record("a")]  # load: 1 running + 1 queued = 2 = mailbox_max
    produced = threading.Event()
    extra: list[Any] = []

    def producer() -> None:
        extra.append(record("b"))
        produced.set()

    thread = threading.Thread(target=producer)
    thread.start()
    eventually(lambda: coordinator.admission.waiters == 1, what="the producer to block at the gate")
    assert not produced.is_set()
    GATE.set()
    assert produced.wait(10)
    thread.join(10)
    assert [t.get(timeout=10) for t in [first, *queued, *extra]] == ["released", "a", "b"]


def test_a_blocked_producer_is_notified_once_per_wait_not_once_per_completion(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under the GIL a worker finishes many tokens before the producer it woke runs again; each
    # of those completions used to notify the gate again (B1: ~84,000 notifies per 100,000).
    coordinator = make_coordinator(workers_per_core=1, cores=1, mailbox_max=50)
    gate = coordinator._gate  # white-box: counts the gate's notifies
    counts = {"notify": 0, "registrations": 0}
    real_notify, real_wait_for = gate.notify, gate.wait_for

    def counting_notify() -> None:
        counts["notify"] += 1
        real_notify()

    def counting_wait_for(attempt: Callable[[], Any], timeout: float | None = None) -> Any:
        def counted() -> Any:  # the gate registers the producer once per attempt
            counts["registrations"] += 1
            return attempt()

        return real_wait_for(counted, timeout)

    monkeypatch.setattr(gate, "notify", counting_notify)
    monkeypatch.setattr(gate, "wait_for", counting_wait_for)

    def release_once_the_producer_waits() -> None:
        try:
            eventually(lambda: gate.waiters >= 1, what="the producer to wait for room")
        finally:
            GATE.set()

    # The only worker is held until the producer waits, so it must wait at least once however
    # fast the worker is against it; after that the worker drains a full mailbox at once.
    held = blocker()
    releaser = threading.Thread(target=release_once_the_producer_waits)
    releaser.start()
    tokens = [echo(i) for i in range(5_000)]
    releaser.join(30)
    assert held.get(timeout=30) == "released"
    assert [t.get(timeout=30) for t in tokens] == [((i,), {}) for i in range(5_000)]
    assert counts["registrations"] > 0, "the producer never waited: the test shows nothing"
    assert counts["notify"] <= counts["registrations"], counts


def test_a_queued_token_costs_the_garbage_collector_two_objects(make_coordinator: Make) -> None:
    # The token and its args tuple; a call without keyword arguments does not keep the empty
    # dict ``**kwargs`` makes, so collections come a third less often with many tokens alive.
    make_coordinator(workers_per_core=1, cores=1, mailbox_max=5_000, convergence=False)
    started = threading.Event()
    first = blocker(started)
    assert started.wait(10)  # the one worker is busy: what follows only queues
    record("warm-up")  # the operation's counters and route exist from here on
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        queued = [record(f"t{i}") for i in range(1_000)]
        per_token = (gc.get_count()[0] - before) / len(queued)
    finally:
        gc.enable()
    GATE.set()
    assert first.get(timeout=10) == "released"
    assert [t.get(timeout=10) for t in queued] == [f"t{i}" for i in range(1_000)]
    assert queued[0].kwargs == {} and record(label="kw").get(timeout=10) == "kw"
    assert per_token <= 2.05, f"{per_token:.2f} GC objects per queued token"


def test_reject_admission_raises_overloaded_and_counts_a_discard(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1, mailbox_max=1, admission="reject")
    started = threading.Event()
    first = blocker(started)
    assert started.wait(10)
    with pytest.raises(Overloaded, match="mailbox_max"):
        record("refused")
    GATE.set()
    first.get(timeout=10)
    snap = coordinator.stats()
    assert (snap.submitted, snap.resolved, snap.discarded) == (2, 1, 1)
    assert_counts_add_up(coordinator)


# -- failures and retries -----------------------------------------------------------------------
def test_transient_errors_are_retried_to_the_back_of_the_queue(make_coordinator: Make) -> None:
    FLAKY_STATE.clear()
    coordinator = make_coordinator(
        workers_per_core=1, cores=1, retry_policy=RetryPolicy(max_retries=3, backoff_base=0.0)
    )
    started = threading.Event()
    gate = blocker(started)
    assert started.wait(10)
    tokens = [flaky("A", 1), record("B"), record("C")]
    GATE.set()
    gate.get(timeout=10)
    assert [t.get(timeout=10) for t in tokens] == ["A", "B", "C"]
    assert RUNS == ["A", "B", "C", "A"]  # the retry ran after what was already queued (FIFO)
    assert tokens[0].attempts == 2
    assert coordinator.stats().retried == 1


def test_dont_retry_on_and_retry_on(make_coordinator: Make) -> None:
    FLAKY_STATE.clear()
    make_coordinator(
        workers_per_core=1,
        retry_policy=RetryPolicy(
            backoff_base=0.0, retry_on=(KeyError,), dont_retry_on=(LookupError,)
        ),
    )
    denied = flaky("denied", 1, KeyError)
    with pytest.raises(KeyError):
        denied.get(timeout=10)
    assert denied.attempts == 1


# -- nesting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers_per_core", [1, 2])
def test_a_deep_nested_tree_never_deadlocks_at_one_or_two_workers_per_core(
    make_coordinator: Make, workers_per_core: int
) -> None:
    """The conformance suite runs a small tree at the harness's two workers per core; this pins
    the worker count (with one, every waiting worker must run the children itself) on a tree of
    3193 tokens."""
    coordinator = make_coordinator(workers_per_core=workers_per_core)
    assert nested_fib(16).get(timeout=120) == 987
    snap = coordinator.stats()
    assert snap.resolved == snap.submitted == 3193  # every fib node ran as its own token


# -- cancellation, deadlines, timeouts, stop ------------------------------------------------------
@task_token_guard(operation_type="holds_the_worker")
def holds_the_worker(started: threading.Event) -> str:
    started.set()
    GATE.wait(30)
    return "released"


LIGHT_RUNS: list[str] = []


@task_token_guard(operation_type="light_with_deadline", tags={"deadline": 0.05})
def light_with_deadline() -> str:
    LIGHT_RUNS.append("ran")
    return "ran"


def test_a_thread_lane_token_past_its_deadline_in_a_mailbox_is_discarded_not_run(
    make_coordinator: Make,
) -> None:
    """A light token queued on the thread lane is checked against its deadline by the worker
    that reaches it (the conformance suite's deadline token waits as a dependency instead)."""
    coordinator = make_coordinator(workers_per_core=1, cores=1, convergence=False)
    LIGHT_RUNS.clear()
    started = threading.Event()
    running = holds_the_worker(started)
    assert started.wait(10)
    late = light_with_deadline()  # queued behind `running` on the only thread worker
    threading.Event().wait(0.1)  # let the deadline pass: time itself is what is tested
    GATE.set()
    assert running.get(timeout=10) == "released"
    with pytest.raises(TokenDiscarded) as info:
        late.get(timeout=10)
    assert info.value.reason == "deadline" == late.discard_reason
    assert LIGHT_RUNS == []
    assert coordinator.stats().discarded == 1


@task_token_guard(
    operation_type="hangs", tags={"weight": "heavy", "timeout": 0.2, "executor": "thread"}
)
def hangs() -> str:
    GATE.wait(30)
    return "late"


def test_a_thread_task_past_its_timeout_fails_and_its_late_result_is_dropped(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = make_coordinator(
        workers_per_core=1, retry_policy=RetryPolicy(retry_on=(ConnectionError,))
    )
    token = hangs()
    with pytest.raises(TaskTimeout, match=r"timeout of 0\.2s") as info:
        token.get(timeout=10)
    assert isinstance(info.value, TimeoutError)
    with caplog.at_level(logging.WARNING, logger="tokengate.coordinator"):
        GATE.set()
        eventually(lambda: any("late result" in r.getMessage() for r in caplog.records))
    assert token.state == "failed"
    snap = coordinator.stats()
    assert (snap.failed, snap.resolved) == (1, 0)


def test_stop_with_cancel_pending_empties_a_busy_workers_mailbox() -> None:
    """The conformance version discards tokens waiting on a dependency; here they sit in the one
    worker's mailbox behind a running task (lane queues are discarded apart from dependency
    waits), and a dependent of a discarded one ends too."""
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
    started = threading.Event()
    running = blocker(started)
    assert started.wait(10)
    queued = [record(str(i)) for i in range(20)]
    chained = record(queued[-1])
    stopper = threading.Thread(target=coordinator.stop, kwargs={"cancel_pending": True})
    stopper.start()
    eventually(lambda: all(t.done() for t in [*queued, chained]), what="pending tokens discarded")
    GATE.set()
    stopper.join(10)
    assert running.get(timeout=1) == "released"
    assert all(t.discard_reason == "stopped" for t in queued)
    assert chained.state in ("discarded", "failed")
    snap = coordinator.stats()
    assert snap.resolved == 1 and snap.in_flight == 0
    assert_counts_add_up(coordinator)


def test_a_retry_that_misses_the_cancel_sweep_is_discarded_when_its_back_off_ends() -> None:
    """stop(cancel_pending=True) sweeps the tokens waiting out a retry back-off; a retry decided
    in the same instant can be parked just after the sweep. It must still not run again."""
    FLAKY_STATE.clear()
    coordinator = OperationsCoordinator(
        workers_per_core=1, cores=1, retry_policy=RetryPolicy(max_retries=3, backoff_base=0.3)
    ).start()
    token = flaky("late", 1)
    eventually(lambda: token._parked == "backoff", what="the retry to wait out its back-off")
    completion = coordinator._completion  # white-box: as if parked just after stop()'s sweep
    with completion._lock:
        completion.backing_off.discard(token)
    coordinator.stop(cancel_pending=True, timeout=30)
    assert token.discard_reason == "stopped"
    assert RUNS == ["late"]  # the one failed attempt; the retry never ran
    assert_counts_add_up(coordinator)


def test_leaving_the_context_on_an_exception_discards_pending() -> None:
    with pytest.raises(KeyboardInterrupt), OperationsCoordinator(workers_per_core=1, cores=1) as c:
        started = threading.Event()
        running = blocker(started)
        assert started.wait(10)
        queued = [record(str(i)) for i in range(5)]
        GATE.set()
        raise KeyboardInterrupt
    assert running.done() and all(t.done() for t in queued)
    assert_counts_add_up(c)


@task_token_guard(operation_type="stopper", tags={"weight": "light"})
def stop_from_inside(coordinator: OperationsCoordinator) -> None:
    coordinator.stop()


def test_stop_from_inside_a_task_is_refused(coordinator: OperationsCoordinator) -> None:
    with pytest.raises(TokenGateError, match="inside one of this coordinator's own tasks"):
        stop_from_inside(coordinator).get(timeout=10)


def test_stop_from_a_done_callback_is_refused_naming_the_callback(
    coordinator: OperationsCoordinator,
) -> None:
    refused: list[BaseException] = []
    called = threading.Event()

    def stop_in_callback(_token: object) -> None:
        try:
            coordinator.stop()
        except TokenGateError as exc:
            refused.append(exc)
        finally:
            called.set()

    started = threading.Event()
    token = blocker(started)
    assert started.wait(10)
    token.add_done_callback(stop_in_callback)  # still running: the worker will call it
    GATE.set()
    assert token.get(timeout=10) == "released"
    assert called.wait(10)
    assert len(refused) == 1
    message = str(refused[0])
    assert "from a done-callback" in message and "own tasks" not in message, message
    assert coordinator.running
    assert echo(1).get(timeout=10) == ((1,), {})


# -- dependencies in arguments ------------------------------------------------------------------
def _nested(depth: int, leaf: object) -> list[Any]:
    """``[[[...[leaf]...]]]``, ``depth`` lists deep, built without recursion."""
    root: list[Any] = [leaf]
    for _ in range(depth - 1):
        root = [root]
    return root


def _leaf(value: Any) -> tuple[int, Any]:
    depth = 0
    while type(value) is list:
        (value,) = value
        depth += 1
    return depth, value


def test_a_deeply_nested_argument_without_tokens_is_passed_as_it_is(
    coordinator: OperationsCoordinator,
) -> None:
    deep = _nested(2_000, "leaf")
    args, kwargs = echo(deep, key=_nested(2_000, 7)).get(timeout=10)
    assert args[0] is deep  # not rebuilt: no token in it
    assert _leaf(args[0]) == (2_000, "leaf") and _leaf(kwargs["key"]) == (2_000, 7)


def test_a_token_deep_inside_an_argument_is_found_and_replaced(
    coordinator: OperationsCoordinator,
) -> None:
    first = echo("first")
    args, _ = echo(_nested(2_000, first), {"k": (first, [3])}).get(timeout=10)
    assert _leaf(args[0]) == (2_000, (("first",), {}))
    assert args[1] == {"k": ((("first",), {}), [3])}


def test_an_argument_that_holds_itself_is_passed_or_rebuilt_as_a_cycle(
    coordinator: OperationsCoordinator,
) -> None:
    plain: list[Any] = [1]
    plain.append(plain)
    args, _ = echo(plain).get(timeout=10)
    assert args[0] is plain
    token = echo("v")
    looped: list[Any] = [token]
    looped.append((looped, token))
    args, _ = echo(looped).get(timeout=10)
    rebuilt = args[0]
    assert rebuilt is not looped and rebuilt[0] == (("v",), {})
    inner, value = rebuilt[1]
    assert inner is rebuilt and value == (("v",), {})  # the cycle is kept, on the new list


# -- stats and logs -----------------------------------------------------------------------------
def test_stats_block_and_per_operation_breakdown(coordinator: OperationsCoordinator) -> None:
    for n in range(10):
        fibonacci_operation(n).get(timeout=10)
    with pytest.raises(ValueError):
        raises_value_error("x").get(timeout=10)
    snap = coordinator.stats("NORMAL")
    text = str(snap)
    assert "── [NORMAL] Stats at" in text
    assert re.search(r"Submitted : 11\n\s+Resolved  : 10  \(90\.9%\)", text), text
    assert "Failed    : 1" in text
    assert re.search(r"Latency   : p50=\d+\.\d{3}s  p95=\d+\.\d{3}s  max=\d+\.\d{3}s", text)
    assert snap.operations["fibonacci"].resolved == 10
    assert snap.operations["bad_value"].failed == 1
    assert 0 < snap.latency_p50 <= snap.latency_p95 <= snap.latency_max


def test_verbose_prints_the_seed_banner_and_worker_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with OperationsCoordinator(workers_per_core=1, verbose=True):
        fibonacci_operation(10).get(timeout=10)
    out = capsys.readouterr().out
    for fragment in (
        "Operations Coordinator - Initializing...",
        "CPU Topology Detected:",
        "[AFFINITY] Policy for",
        "[STORAGE_THROTTLE] Initialized with speed tiers:",
        "[CORE_PINNED_QUEUE] Initialized:",
        "Operations Coordinator ready!",
        "[worker_0_core_1] Started on Core 1 (local 0)",
        "[ROUTING] Token fibonacci_",
        "✓ Completed fibonacci_",
        "[worker_0_core_1] Stopped",
        "Operations shutdown complete!",
    ):
        assert fragment in out, fragment
    # verbose is undone on stop: nothing more is printed afterwards
    with OperationsCoordinator(workers_per_core=1):
        fibonacci_operation(10).get(timeout=10)
    assert capsys.readouterr().out == ""


def test_threads_end_after_stop() -> None:
    before = set(threading.enumerate())
    with OperationsCoordinator(workers_per_core=2):
        [nested_fib(8) for _ in range(4)]
    eventually(lambda: set(threading.enumerate()) <= before, what="worker threads to end")


def test_an_internal_error_fails_the_token_and_keeps_the_worker(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1)
    real_complete = coordinator._completion.complete  # white-box: a bug inside tokengate
    calls = {"n": 0}

    def broken_complete(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated bug in tokengate")
        real_complete(*args, **kwargs)

    monkeypatch.setattr(coordinator._completion, "complete", broken_complete)
    with caplog.at_level(logging.CRITICAL, logger="tokengate.worker"):
        first = record("first")
        with pytest.raises(TokenGateError, match="internal error") as info:
            first.get(timeout=10)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert any("internal error" in r.getMessage() for r in caplog.records)
    assert record("second").get(timeout=10) == "second"  # the same worker goes on


class Box:
    """Hands a token to a task without making it a dependency (tokens as arguments are)."""

    def __init__(self, token: Any) -> None:
        self.token = token


@task_token_guard(operation_type="waits_briefly", tags={"weight": "light"})
def waits_briefly(box: Box) -> str:
    try:
        box.token.get(timeout=0.2)
    except TimeoutError:
        return "timed out"
    return "finished"


@task_token_guard(operation_type="slow_held", tags={"weight": "light", "storage_speed": "SLOW"})
def slow_held(started: threading.Event | None = None) -> str:
    if started is not None:
        started.set()
    assert GATE.wait(30)
    return "io"


def test_get_timeout_holds_inside_a_task_too(make_coordinator: Make) -> None:
    """A worker that helps while it waits (here: the awaited token waits for a storage permit,
    so the worker runs its own mailbox and sleeps) still honours the caller's timeout."""
    make_coordinator(workers_per_core=2, cores=1, storage_limits={"SLOW": 1})
    started = threading.Event()
    holder = slow_held(started)  # takes the only SLOW permit and holds it
    assert started.wait(10)
    child = slow_held()  # parked: waiting for the permit
    assert waits_briefly(Box(child)).get(timeout=10) == "timed out"
    GATE.set()
    assert holder.get(timeout=10) == child.get(timeout=10) == "io"


def _identity(x: int) -> int:
    return x


def test_submitting_many_partials_keeps_no_description_per_call(make_coordinator: Make) -> None:
    """A partial is a new callable at each call: submitting a thousand must not leave a task
    description (and its cached route) behind per call."""
    coordinator = make_coordinator(workers_per_core=1)
    assert coordinator.submit(functools.partial(_identity, -1)).get(timeout=30) == -1
    gc.collect()
    before = sum(isinstance(o, TaskSpec) for o in gc.get_objects())
    tokens = [coordinator.submit(functools.partial(_identity, i)) for i in range(1000)]
    assert [t.get(timeout=30) for t in tokens] == list(range(1000))
    del tokens
    gc.collect()
    assert sum(isinstance(o, TaskSpec) for o in gc.get_objects()) - before < 10


class _Owner:
    def value(self, x: int) -> int:
        return x


def test_callables_given_to_submit_are_not_kept_alive(make_coordinator: Make) -> None:
    """coordinator.submit keeps no reference to a plain callable once its token is done and
    dropped: not to a lambda, not to a bound method's instance."""
    coordinator = make_coordinator(workers_per_core=1)
    owners = [_Owner() for _ in range(5)]
    refs = [weakref.ref(owner) for owner in owners]
    assert [coordinator.submit(o.value, i).get(timeout=30) for i, o in enumerate(owners)] == [
        0,
        1,
        2,
        3,
        4,
    ]
    fn = lambda x: x + 1  # noqa: E731
    fn_ref = weakref.ref(fn)
    assert coordinator.submit(fn, 1).get(timeout=30) == 2
    del owners, fn
    gc.collect()
    assert [r() for r in refs] == [None] * 5
    assert fn_ref() is None


@task_token_guard(operation_type="first_leaf", tags={"weight": "light"})
def first_leaf(value: Any) -> Any:
    while type(value) is list:
        value = value[0]
    return value


def test_an_argument_sharing_its_parts_is_scanned_once_per_part(make_coordinator: Make) -> None:
    """``x = [x, x]`` forty times is 41 lists but 2**40 paths: the dependency scan must walk
    each list once (as the substitution does), or the call never returns."""
    make_coordinator(workers_per_core=1)
    plain: Any = [7]
    with_token: Any = [first_leaf(8)]
    for _ in range(40):
        plain = [plain, plain]
        with_token = [with_token, with_token]
    assert first_leaf(plain).get(timeout=30) == 7
    assert first_leaf(with_token).get(timeout=30) == 8


# -- middleware hooks that raise ---------------------------------------------------------------
class ExitsInHooks(Middleware):
    """Every hook that sees the end of an attempt raises ``SystemExit``."""

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        raise SystemExit("after_attempt exits")

    def after_failure(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        raise SystemExit("after_failure exits")


@pytest.mark.parametrize("fails", [False, True], ids=["resolves", "fails"])
def test_a_middleware_hook_raising_system_exit_is_logged_and_its_thread_goes_on(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture, fails: bool
) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=1, convergence=False)
    coordinator.add_middleware(ExitsInHooks())
    with caplog.at_level(logging.WARNING, logger="tokengate"):
        tokens = [raises_value_error("no") if fails else echo(i) for i in range(3)]
        for token in tokens:
            token.exception(timeout=10)
        expected = (2 if fails else 1) * sum(t.attempts for t in tokens)

        def hooks() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage().startswith("middleware hook")]

        # The hooks run just after the token ends: every hook of every attempt, each logged.
        eventually(lambda: len(hooks()) >= expected, what="every hook to be logged")
    assert len(hooks()) == expected
    assert all(r.exc_info and r.exc_info[0] is SystemExit for r in hooks())
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    assert_counts_add_up(coordinator)


class _HoldsTheEnd(Middleware):
    """Sees each attempt end, then waits (bounded) for the caller to say get() returned."""

    def __init__(self) -> None:
        self.caller_returned = threading.Event()
        self.seen: list[tuple[str, bool]] = []

    def after_attempt(self, token: Any, outcome: str, exc: BaseException | None) -> None:
        self.seen.append((outcome, self.caller_returned.wait(timeout=0.5)))


@pytest.mark.parametrize("fails", [False, True], ids=["resolved", "failed"])
def test_middleware_sees_an_end_before_the_caller_of_get_is_woken(
    make_coordinator: Make, fails: bool
) -> None:
    # A caller returning from get() (say, a test or a report) must find the end already seen by
    # every middleware: the Guard House's figures, the trace and a user's counters include it.
    coordinator = make_coordinator(workers_per_core=1, cores=1)
    watcher = _HoldsTheEnd()
    coordinator.add_middleware(watcher)
    token = coordinator.submit(raises_value_error if fails else echo, "x")
    if fails:
        with pytest.raises(ValueError):
            token.get(timeout=30)
    else:
        assert token.get(timeout=30) == (("x",), {})
    watcher.caller_returned.set()
    # The hook ran, and ran to its end, before get() returned: the caller had not yet returned.
    assert watcher.seen == [("failed" if fails else "resolved", False)]
