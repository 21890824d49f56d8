"""Coordinator behaviour every backend must show, run against each through ``harness``.

The tests only use the public API (plus the harness's probes), so a result here means the same
thing on the local lanes and on a Dask cluster.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from typing import Any

import pytest

from conftest import HEAVY_ON_THREADS, eventually
from tokengate import (
    DependencyFailed,
    OperationBlocked,
    Overloaded,
    RetryPolicy,
    TaskTimeout,
    Token,
    TokenDiscarded,
)
from tokengate._middleware import Middleware
from tokengate.demos.cpu import fibonacci_operation
from tokengate.demos.mixed import prime_operation
from tokengate.demos.seed_io import append_log_slow, write_json_fast

from .conftest import Harness, assert_counts_add_up
from .tasks import (
    blocker,
    chain_accumulate,
    chain_by_hand,
    chain_filter,
    chain_finalize,
    chain_reduce,
    chain_seed,
    create_json_file,
    echo,
    flaky,
    hangs,
    nested_fib,
    raises_value_error,
    record,
    slow_write,
    square,
    total,
    urgent,
)

# The local backend's probes are threading Events (the Dask backend has no process lane).
COORDINATOR_DEFAULTS = HEAVY_ON_THREADS

NO_BACKOFF = {"retry_policy": RetryPolicy(max_retries=2, backoff_base=0.0)}


# -- results and arguments ------------------------------------------------------------------------
def test_seed_proof_1_results(harness: Harness) -> None:
    coordinator = harness.coordinator()
    args = [100, 200, 300, 150, 250, 180, 220, 280]
    tokens = [fibonacci_operation(n) for n in args]
    assert all(isinstance(t, Token) for t in tokens)  # returned at once, before any result
    assert [t.get(timeout=30) for t in tokens] == [fibonacci_operation.__wrapped__(n) for n in args]
    snap = coordinator.stats()
    assert (snap.submitted, snap.resolved, snap.failed, snap.discarded) == (8, 8, 0, 0)
    assert all(t.state == "resolved" and t.attempts == 1 for t in tokens)


def test_wait_ready_then_a_call_runs(harness: Harness) -> None:
    coordinator = harness.coordinator()
    assert coordinator.wait_ready(timeout=60)
    assert square(6).get(timeout=30) == 36


def test_positional_and_keyword_arguments(harness: Harness) -> None:
    harness.coordinator()
    assert echo(1, "two", key="v", n=None).get(timeout=10) == ((1, "two"), {"key": "v", "n": None})
    assert echo().get(timeout=10) == ((), {})


def test_map_streams_results_in_order(harness: Harness) -> None:
    harness.coordinator()
    assert list(square.map(range(60), timeout=30, window=8)) == [i * i for i in range(60)]


def test_tokens_are_futures(harness: Harness) -> None:
    harness.coordinator()
    tokens = [square(i) for i in range(10)]
    done, not_done = concurrent.futures.wait(tokens, timeout=30)
    assert len(done) == 10 and not not_done
    assert sorted(t.result() for t in concurrent.futures.as_completed(tokens, timeout=30)) == [
        i * i for i in range(10)
    ]

    async def awaited() -> int:
        return await square(7)

    assert asyncio.run(awaited()) == 49


# -- failures -------------------------------------------------------------------------------------
def test_errors_keep_their_type_and_traceback(harness: Harness) -> None:
    coordinator = harness.coordinator()
    token = raises_value_error("bad input 42")
    with pytest.raises(ValueError, match="bad input 42") as info:
        token.get(timeout=10)
    assert any(entry.name == "raises_value_error" for entry in info.traceback)
    assert token.attempts == 1  # a programming error is never retried by default
    assert token.state == "failed"
    snap = coordinator.stats()
    assert (snap.failed, snap.retried) == (1, 0)


def test_transient_errors_are_retried(harness: Harness) -> None:
    coordinator = harness.coordinator(**NO_BACKOFF)
    journal = harness.journal()
    token = flaky(journal, "A", 1)
    assert token.get(timeout=30) == "A"
    assert token.attempts == 2
    assert journal.runs("A") == 2
    assert coordinator.stats().retried == 1


def test_retries_stop_at_the_budget(harness: Harness) -> None:
    coordinator = harness.coordinator(**NO_BACKOFF)
    journal = harness.journal()
    token = flaky(journal, "always", 99)  # tag retries=3 -> 4 attempts
    with pytest.raises(ConnectionError, match="failure 4"):
        token.get(timeout=30)
    assert token.attempts == 4 == journal.runs("always")
    snap = coordinator.stats()
    assert (snap.retried, snap.failed) == (3, 1)


def test_dont_retry_on_beats_retry_on(harness: Harness) -> None:
    harness.coordinator(
        retry_policy=RetryPolicy(
            backoff_base=0.0, retry_on=(KeyError,), dont_retry_on=(LookupError,)
        )
    )
    journal = harness.journal()
    denied = flaky(journal, "denied", 1, KeyError)
    with pytest.raises(KeyError):
        denied.get(timeout=10)
    assert denied.attempts == 1 == journal.runs("denied")


class _Attempts(Middleware):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        with self.lock:
            self.seen.append((token.operation_type, outcome, type(exc).__name__ if exc else None))


def test_middleware_sees_every_attempt(harness: Harness) -> None:
    coordinator = harness.coordinator(**NO_BACKOFF)
    attempts = _Attempts()
    coordinator.add_middleware(attempts)
    journal = harness.journal()
    flaky(journal, "twice", 2).get(timeout=30)
    with pytest.raises(ValueError):
        raises_value_error("x").get(timeout=10)
    assert sorted(attempts.seen) == sorted(
        [
            ("flaky", "retried", "ConnectionError"),
            ("flaky", "retried", "ConnectionError"),
            ("flaky", "resolved", None),
            ("bad_value", "failed", "ValueError"),
        ]
    )


# -- chains ---------------------------------------------------------------------------------------
def test_the_seed_chain_works_as_written(harness: Harness) -> None:
    harness.coordinator()
    results = []
    for value in range(20):
        step = chain_reduce(chain_accumulate(chain_filter(chain_seed(value))))
        results.append(chain_finalize(step, label=f"chain_{value}"))
    assert [t.get(timeout=30) for t in results] == [
        chain_by_hand(v, f"chain_{v}") for v in range(20)
    ]


def test_tokens_inside_containers_are_dependencies(harness: Harness) -> None:
    harness.coordinator()
    a, b, c = chain_seed(1), chain_seed(2), chain_seed(3)
    assert total([a, b, 5], {"c": c}).get(timeout=10) == 10 + 13 + 5 + 16
    done = chain_seed(4)
    done.get(timeout=10)  # an ended token as an argument: its value is passed
    assert total([done], {}).get(timeout=10) == 19


def test_a_failed_dependency_fails_the_chain_without_running_it(harness: Harness) -> None:
    coordinator = harness.coordinator()
    journal = harness.journal()
    bad = raises_value_error("root cause")
    child = record(journal, "child", bad)
    grandchild = record(journal, "grandchild", child)
    with pytest.raises(DependencyFailed) as info:
        child.get(timeout=10)
    assert isinstance(info.value.__cause__, ValueError)
    assert bad.id in str(info.value)
    with pytest.raises(DependencyFailed) as info2:
        grandchild.get(timeout=10)
    assert isinstance(info2.value.__cause__, DependencyFailed)
    assert journal.labels() == []  # neither dependent ran
    assert child.attempts == grandchild.attempts == 0
    assert coordinator.stats().failed == 3


def test_a_discarded_dependency_fails_the_dependent(harness: Harness) -> None:
    harness.coordinator()
    journal, gate = harness.journal(), harness.gate()
    running = blocker(gate)
    queued = record(journal, "never", running)
    dependent = record(journal, "dependent", queued)
    assert queued.cancel()
    with pytest.raises(DependencyFailed, match="discarded"):
        dependent.get(timeout=10)
    gate.set()
    assert running.get(timeout=10) == "released"
    assert journal.labels() == []


# -- nested tasks ---------------------------------------------------------------------------------
def test_nested_tasks_never_deadlock(harness: Harness) -> None:
    coordinator = harness.coordinator()
    assert nested_fib(11).get(timeout=60) == 89
    snap = coordinator.stats()
    assert snap.resolved == snap.submitted == 287  # every fib node ran as its own token
    assert snap.operations["nested_fib"].resolved == 287


def test_a_task_may_wait_on_a_nested_tiered_task(harness: Harness) -> None:
    """The Quick-Proof's create_json_file: a plain step that needs a generated (tiered) document."""
    coordinator = harness.coordinator()
    out = os.path.join(harness.tmp, "jsons")
    os.makedirs(out)
    results = [t.get(timeout=30) for t in [create_json_file(out, i) for i in range(6)]]
    assert [r["index"] for r in results] == list(range(6))
    assert len(os.listdir(out)) == 6
    assert coordinator.stats().operations["json_fast"].resolved == 6


# -- cancellation, deadlines, timeouts ---------------------------------------------------------
def test_cancelling_a_queued_token_discards_it(harness: Harness) -> None:
    coordinator = harness.coordinator()
    journal, gate = harness.journal(), harness.gate()
    running = blocker(gate)
    queued = record(journal, "cancelled", running)  # cannot start before `running` ends
    assert queued.cancel()
    assert queued.cancelled() and queued.done() and queued.state == "discarded"
    with pytest.raises(TokenDiscarded) as info:
        queued.get(timeout=10)
    assert info.value.reason == "cancelled" == queued.discard_reason
    assert harness.forgotten(coordinator, queued)  # final when cancel() returns: nowhere to start
    gate.set()
    assert running.get(timeout=10) == "released"
    assert record(journal, "after", running).get(timeout=10) == "after"
    assert journal.labels() == ["after"]  # the cancelled token never ran
    snap = coordinator.stats()
    assert (snap.resolved, snap.discarded) == (2, 1)


def test_a_token_past_its_deadline_is_discarded_not_run(harness: Harness) -> None:
    coordinator = harness.coordinator()
    gate, started = harness.gate(), harness.gate()
    running = blocker(gate, started)
    assert started.wait(10)
    late = urgent(running)  # deadline 50 ms; it cannot start before `running` ends
    threading.Event().wait(0.1)  # let the deadline pass: time itself is what is tested
    gate.set()
    running.get(timeout=10)
    with pytest.raises(TokenDiscarded) as info:
        late.get(timeout=10)
    assert info.value.reason == "deadline" == late.discard_reason
    assert coordinator.stats().discarded == 1


def test_a_task_past_its_timeout_fails_and_its_late_result_is_dropped(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = harness.coordinator(retry_policy=RetryPolicy(retry_on=(ConnectionError,)))
    gate = harness.gate()
    with caplog.at_level(logging.WARNING, logger="tokengate.coordinator"):
        token = hangs(gate)
        with pytest.raises(TaskTimeout, match=r"timeout of 0\.3s") as info:
            token.get(timeout=10)
        assert isinstance(info.value, TimeoutError)
        gate.set()
        eventually(lambda: any("late result" in r.getMessage() for r in caplog.records))
    assert token.state == "failed"
    snap = coordinator.stats()
    assert (snap.failed, snap.resolved) == (1, 0)


# -- stop -----------------------------------------------------------------------------------------
def test_stop_drains_by_default(harness: Harness) -> None:
    coordinator = harness.coordinator()
    journal = harness.journal()
    tokens = [record(journal, str(i)) for i in range(50)]
    chained = record(journal, "last", *tokens[-5:])
    coordinator.stop()
    assert all(t.state == "resolved" for t in [*tokens, chained])
    assert len(journal.labels()) == 51
    assert_counts_add_up(coordinator)


def test_stop_with_cancel_pending_discards_what_has_not_started(harness: Harness) -> None:
    coordinator = harness.coordinator()
    journal, gate, started = harness.journal(), harness.gate(), harness.gate()
    running = blocker(gate, started)
    assert started.wait(10)
    queued = [record(journal, str(i), running) for i in range(20)]
    stopper = threading.Thread(target=coordinator.stop, kwargs={"cancel_pending": True})
    stopper.start()
    eventually(lambda: all(t.done() for t in queued), what="pending tokens discarded")
    gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert running.get(timeout=1) == "released"
    assert all(t.discard_reason == "stopped" for t in queued)
    assert journal.labels() == []
    snap = coordinator.stats()
    assert (snap.resolved, snap.discarded, snap.in_flight) == (1, 20, 0)
    assert_counts_add_up(coordinator)


def test_a_stopped_coordinator_can_start_again(harness: Harness) -> None:
    coordinator = harness.coordinator()
    for _ in range(2):
        assert echo(2).get(timeout=10) == ((2,), {})
        coordinator.stop()
        coordinator.start()
    assert coordinator.stats().resolved == 2
    coordinator.stop()
    for _ in range(2):  # the context manager restarts a stopped coordinator too
        with coordinator:
            assert echo(3).get(timeout=10) == ((3,), {})
        assert not coordinator.running
    assert coordinator.stats().resolved == 4


# -- stats and limits -----------------------------------------------------------------------------
def test_stats_counts_add_up(harness: Harness) -> None:
    coordinator = harness.coordinator(**NO_BACKOFF)
    journal, gate = harness.journal(), harness.gate()
    running = blocker(gate)
    ok = [square(i) for i in range(30)]
    failed = [raises_value_error(str(i)) for i in range(5)]
    flaky_token = flaky(journal, "f", 1)
    cancelled = [record(journal, f"c{i}", running) for i in range(4)]
    for token in cancelled:
        assert token.cancel()
    gate.set()
    for token in [running, *ok, flaky_token]:
        token.get(timeout=30)
    for token in failed:
        assert isinstance(token.exception(timeout=30), ValueError)
    snap = coordinator.stats("CHECK")
    assert (snap.submitted, snap.resolved, snap.failed, snap.discarded, snap.retried) == (
        41,
        32,
        5,
        4,
        1,
    )
    assert snap.in_flight == 0
    assert snap.operations["square"].resolved == 30
    assert snap.operations["record"].discarded == 4
    assert 0 < snap.latency_p50 <= snap.latency_p95 <= snap.latency_max
    assert "── [CHECK] Stats at" in str(snap)
    assert "square" in snap.render_dispatched()


def test_a_storage_tier_never_runs_more_than_its_limit(harness: Harness) -> None:
    # 4 workers per core: on a 2-core machine light work has only core 2, and 3 must fit.
    coordinator = harness.coordinator(storage_limits={"SLOW": 3}, workers_per_core=4)
    high_water, gate = harness.high_water(), harness.gate()
    tokens = [slow_write(high_water, gate) for _ in range(9)]
    eventually(lambda: high_water.read()[0] == 3, what="three writers inside at once")
    assert coordinator.tier_stats()["SLOW"].running == 3
    gate.set()
    assert [t.get(timeout=30) for t in tokens] == ["written"] * 9
    assert high_water.read() == (0, 3)
    assert coordinator.tier_stats()["SLOW"].high_water == 3


def test_reject_admission_raises_overloaded(harness: Harness) -> None:
    coordinator = harness.coordinator(mailbox_max=1, admission="reject", cores=1)
    gate = harness.gate()
    accepted: list[Token[Any]] = []
    with pytest.raises(Overloaded, match="mailbox_max"):
        for _ in range(100):  # the bound is mailbox_max per worker (thread): far below 100
            accepted.append(blocker(gate))
    gate.set()
    for token in accepted:
        assert token.get(timeout=30) == "released"
    snap = coordinator.stats()
    assert (snap.resolved, snap.discarded) == (len(accepted), 1)


# -- the Quick-Proof's I/O examples, unchanged -----------------------------------------------------
def test_seed_proof_3_mixed_load(harness: Harness) -> None:
    coordinator = harness.coordinator()
    log_path = os.path.join(harness.tmp, "logs", "out.log")
    log_tokens = [append_log_slow(log_path, f"entry {i}") for i in range(8)]
    primes = [97, 101, 103, 107, 109, 113, 127, 131]
    prime_tokens = [prime_operation(n) for n in primes]
    json_tokens = [
        write_json_fast(os.path.join(harness.tmp, "json", f"{i}.json"), {"i": i}) for i in range(10)
    ]
    assert [t.get(timeout=30)["chars"] for t in log_tokens] == [len(f"entry {i}") for i in range(8)]
    assert [t.get(timeout=30) for t in prime_tokens] == [True] * 8
    assert all(t.get(timeout=30)["keys"] == 1 for t in json_tokens)
    with open(log_path, encoding="utf-8") as f:
        assert sorted(f.read().split("\n")[:-1]) == sorted(f"entry {i}" for i in range(8))
    assert coordinator.stats().resolved == 26


# -- asyncio producers ----------------------------------------------------------------------------
def test_submit_async_awaits_room_instead_of_blocking(harness: Harness) -> None:
    """A full coordinator makes ``submit_async`` await, with its event loop free meanwhile."""
    coordinator = harness.coordinator(mailbox_max=1, cores=1)
    gate = harness.gate()

    async def produce() -> list[Token[Any]]:
        admitted: list[Token[Any]] = []
        for _ in range(100):  # the bound is mailbox_max per worker (thread): far below 100
            # With room, submit_async finishes in its first step: one yield to the loop tells.
            pending = asyncio.ensure_future(coordinator.submit_async(blocker, gate))
            await asyncio.sleep(0)
            if not pending.done():
                break
            admitted.append(pending.result())
        else:
            raise AssertionError("submit_async never had to wait for room")
        ticks = 0
        for _ in range(5):  # the loop keeps running while the producer waits
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not pending.done()
        gate.set()
        admitted.append(await asyncio.wait_for(pending, 30))
        return admitted

    tokens = asyncio.run(produce())
    assert [t.get(timeout=30) for t in tokens] == ["released"] * len(tokens)
    snap = coordinator.stats()
    assert (snap.submitted, snap.resolved) == (len(tokens), len(tokens))


# -- observability from the client's side ---------------------------------------------------------
def _observed_load(harness: Harness, coordinator: Any, *, then_stop: bool = False) -> None:
    """10 resolved squares, 3 ValueErrors, one token retried once then resolved.

    Middleware hooks (the trace, the Guard House's failure record) run on the worker after the
    token's waiters are woken, so a test reading what they recorded passes ``then_stop``:
    stop() joins the workers, after which every attempt's hooks have run."""
    journal = harness.journal()
    ok = [square(i) for i in range(10)]
    bad = [raises_value_error(str(i)) for i in range(3)]
    retried = flaky(journal, "o", 1)
    assert [t.get(timeout=30) for t in ok] == [i * i for i in range(10)]
    for token in bad:
        assert isinstance(token.exception(timeout=30), ValueError)
    assert retried.get(timeout=30) == "o"
    if then_stop:
        coordinator.stop()


def test_the_guard_house_sees_every_run(harness: Harness) -> None:
    coordinator = harness.coordinator(guard_house=True, **NO_BACKOFF)
    _observed_load(harness, coordinator, then_stop=True)
    report = coordinator.guard_house.report()
    square_health = report.operations["square"]
    assert (square_health.runs, square_health.errors, square_health.failed) == (10, 0, 0)
    bad = report.operations["bad_value"]
    assert (bad.runs, bad.errors, bad.failed, bad.failure_rate) == (3, 3, 3, 1.0)
    assert [f.exception_type for f in bad.recent_failures] == ["ValueError"] * 3
    flaky_health = report.operations["flaky"]
    assert (flaky_health.runs, flaky_health.errors, flaky_health.retried) == (2, 1, 1)
    assert "bad_value" in coordinator.guard_house.render()


def test_the_circuit_breaker_refuses_calls_after_repeated_failures(harness: Harness) -> None:
    coordinator = harness.coordinator(auto_block=True, block_after=3, block_cooldown=60)
    for i in range(3):
        assert isinstance(raises_value_error(str(i)).exception(timeout=30), ValueError)
    with pytest.raises(OperationBlocked, match="bad_value"):
        raises_value_error("refused")
    assert coordinator.guard_house.breaker_state("bad_value") == "open"
    assert square(3).get(timeout=30) == 9  # other operation types are not affected


def test_prometheus_metrics_read_the_same_counts(harness: Harness) -> None:
    pytest.importorskip("prometheus_client")
    coordinator = harness.coordinator(guard_house=True, **NO_BACKOFF)
    _observed_load(harness, coordinator)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in coordinator.metrics_collector().collect()
        for s in family.samples
    }
    square_op = (("operation_type", "square"), ("weight", "light"))
    assert samples[("tokengate_tokens_submitted_total", square_op)] == 10
    assert samples[("tokengate_tokens_resolved_total", square_op)] == 10
    bad_op = (("operation_type", "bad_value"), ("weight", "light"))
    assert samples[("tokengate_tokens_failed_total", bad_op)] == 3
    flaky_op = (("operation_type", "flaky"), ("weight", "heavy"))
    assert samples[("tokengate_tokens_retried_total", flaky_op)] == 1
    assert samples[("tokengate_token_latency_seconds_count", square_op)] == 10
    assert samples[("tokengate_guard_house_runs_total", (("operation_type", "flaky"),))] == 2
    assert samples[("tokengate_coordinator_running", ())] == 1


def test_the_trace_has_a_span_per_attempt(harness: Harness, tmp_path: Any) -> None:
    coordinator = harness.coordinator(trace=True, **NO_BACKOFF)
    _observed_load(harness, coordinator, then_stop=True)
    spans = coordinator.trace_spans()
    outcomes: dict[str, list[str]] = {}
    for span in spans:
        outcomes.setdefault(span.operation_type, []).append(span.outcome)
        assert span.end >= span.start and span.worker
    assert outcomes["square"] == ["resolved"] * 10
    assert outcomes["bad_value"] == ["failed"] * 3
    flaky_spans = [(s.attempt, s.outcome) for s in spans if s.operation_type == "flaky"]
    assert flaky_spans == [(1, "retried"), (2, "resolved")]
    assert coordinator.export_trace(tmp_path / "trace.json") == len(spans) == 15
