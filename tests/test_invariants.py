"""The invariants of docs/design.md under random schedules (hypothesis).

1. Every submitted token ends in exactly one terminal state, and the counts add up.
2. A storage tier never has more tasks running than its limit.

A schedule is a list of task descriptions (weight, tier, outcome, held on a gate, cancelled
right after submit, depending on an earlier token) and a stop mode. The gate opens only once
``stop()`` has begun, so held tasks pile work up in the tiers and mailboxes while the schedule is
submitted, cancelled and stopped. The invariant-4 tests at the end (nested waits never deadlock)
are deterministic.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HEAVY_ON_THREADS, assert_counts_add_up, eventually
from tokengate import (
    DependencyFailed,
    OperationsCoordinator,
    RetryPolicy,
    TaskFunction,
    Token,
    TokenDiscarded,
    task_token_guard,
)

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS


WEIGHTS = ("light", "medium", "heavy")
TIERS = (None, "SLOW", "MODERATE")
LIMITS = {"SLOW": 2, "MODERATE": 3}
MAX_RETRIES = 2
# ok; ValueError (never retried); ConnectionError on the first attempt only (retried, then ok);
# ConnectionError on every attempt (retried MAX_RETRIES times, then failed).
OUTCOMES = ("ok", "value_error", "flaky", "connection_error")


@dataclass(frozen=True)
class TaskDesc:
    weight: str
    tier: str | None
    outcome: str
    hold: bool
    cancel: bool
    dep: int | None  # reduced modulo the task's index: always an earlier task


@dataclass
class Schedule:
    """Shared state of one example; the tasks record into it under ``lock``."""

    tasks: list[TaskDesc]
    gate: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    runs: Counter[int] = field(default_factory=Counter)
    received: dict[int, Any] = field(default_factory=dict)
    active: Counter[str] = field(default_factory=Counter)
    high_water: Counter[str] = field(default_factory=Counter)


def _body(schedule: Schedule, index: int, dep_value: Any = None) -> int:
    desc = schedule.tasks[index]
    with schedule.lock:
        schedule.runs[index] += 1
        attempt = schedule.runs[index]
        schedule.received[index] = dep_value
        if desc.tier is not None:
            schedule.active[desc.tier] += 1
            schedule.high_water[desc.tier] = max(
                schedule.high_water[desc.tier], schedule.active[desc.tier]
            )
    try:
        if desc.hold and not schedule.gate.wait(30):
            raise RuntimeError("the gate never opened")
        if desc.outcome == "value_error":
            raise ValueError(f"task {index} is broken")
        if desc.outcome == "connection_error" or (desc.outcome == "flaky" and attempt == 1):
            raise ConnectionError(f"task {index} attempt {attempt} lost its connection")
        return index
    finally:
        with schedule.lock:
            if desc.tier is not None:
                schedule.active[desc.tier] -= 1


# One decorated task per (weight, tier), all at module level, sharing the body above.
TASKS: dict[tuple[str, str | None], TaskFunction[..., int]] = {
    (weight, tier): task_token_guard(
        operation_type=f"inv_{weight}_{(tier or 'cpu').lower()}",
        tags={"weight": weight} | ({"storage_speed": tier} if tier else {}),
    )(_body)
    for weight in WEIGHTS
    for tier in TIERS
}

task_desc = st.builds(
    TaskDesc,
    weight=st.sampled_from(WEIGHTS),
    tier=st.sampled_from((*TIERS, "SLOW")),  # tiers twice as likely as none
    outcome=st.sampled_from(OUTCOMES),
    hold=st.booleans(),
    cancel=st.sampled_from((False, False, False, True)),
    dep=st.one_of(st.none(), st.none(), st.integers(min_value=0, max_value=10_000)),
)


def _dep_index(index: int, desc: TaskDesc) -> int | None:
    return None if desc.dep is None or index == 0 else desc.dep % index


def _expected_retries(tok: Token[Any]) -> int:
    """Retries the stats must show for ``tok``: one per run that was followed by another try.

    A resolved or failed token that ran ``n`` times was retried ``n - 1`` times. A discarded
    token that ran at all was discarded while waiting out a retry's backoff, so each of its
    runs was followed by a retry decision.
    """
    if tok.state == "discarded":
        return tok.attempts
    return max(tok.attempts - 1, 0)


@settings(
    max_examples=35,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    tasks=st.lists(task_desc, min_size=8, max_size=40),
    stop_mode=st.sampled_from(("drain", "cancel_pending")),
)
def test_every_token_ends_once_counts_add_up_and_tiers_hold(
    tasks: list[TaskDesc], stop_mode: str
) -> None:
    schedule = Schedule(tasks)
    tokens: list[Token[int]] = []
    cancelled_ok: list[bool] = []
    with OperationsCoordinator(
        process_lane=False,
        workers_per_core=4,
        cores=2,
        storage_limits=LIMITS,
        retry_policy=RetryPolicy(max_retries=MAX_RETRIES, backoff_base=0),
    ) as coordinator:

        def open_gate_once_stopping() -> None:
            eventually(lambda: not coordinator.running, what="stop() to begin")
            schedule.gate.set()

        opener = threading.Thread(target=open_gate_once_stopping)
        opener.start()
        try:
            for index, desc in enumerate(tasks):
                task = TASKS[desc.weight, desc.tier]
                dep = _dep_index(index, desc)
                tok = task(schedule, index) if dep is None else task(schedule, index, tokens[dep])
                tokens.append(tok)
                cancelled_ok.append(tok.cancel() if desc.cancel else False)
        finally:
            coordinator.stop(cancel_pending=stop_mode == "cancel_pending", timeout=10)
            schedule.gate.set()
            opener.join(10)

    # Invariant 1: every token is terminal, in exactly one of the three states.
    states = Counter(tok.state for tok in tokens)
    assert all(tok.done() for tok in tokens)
    assert set(states) <= {"resolved", "failed", "discarded"}, states
    snap = coordinator.stats()
    assert snap.submitted == len(tokens)
    assert (snap.resolved, snap.failed, snap.discarded) == (
        states["resolved"],
        states["failed"],
        states["discarded"],
    ), str(snap)
    assert_counts_add_up(coordinator)
    for name, op in snap.operations.items():
        mine = [tok for tok in tokens if tok.operation_type == name]
        assert op.submitted == len(mine)
        assert op.resolved + op.failed + op.discarded == len(mine)
        assert op.in_flight == 0
    assert snap.retried == sum(_expected_retries(tok) for tok in tokens), str(snap)

    # Invariant 2: no tier ran more bodies than its limit, by our count and the throttle's.
    for tier, limit in LIMITS.items():
        assert schedule.high_water[tier] <= limit, (tier, schedule.high_water)
        tier_stats = coordinator.tier_stats()[tier]
        assert tier_stats.high_water <= limit
        assert tier_stats.running == 0
        assert tier_stats.waiting == 0

    # Each token's fate agrees with its description.
    for index, (desc, tok) in enumerate(zip(tasks, tokens, strict=True)):
        runs = schedule.runs[index]
        assert tok.attempts == runs, (index, desc, tok)
        if cancelled_ok[index]:
            assert tok.state == "discarded"
        dep = _dep_index(index, desc)
        dep_tok = tokens[dep] if dep is not None else None
        if tok.state == "resolved":
            assert tok.result() == index
            assert desc.outcome in ("ok", "flaky")
            assert runs == (2 if desc.outcome == "flaky" else 1)
            if dep_tok is not None:
                assert dep_tok.state == "resolved"
                assert schedule.received[index] == dep
        elif tok.state == "failed":
            exc = tok.exception()
            if isinstance(exc, DependencyFailed):
                assert runs == 0
                assert dep_tok is not None and dep_tok.state in ("failed", "discarded")
                expected_cause = TokenDiscarded if dep_tok.state == "discarded" else Exception
                assert isinstance(exc.__cause__, expected_cause)
                assert dep_tok.id in str(exc)
            elif desc.outcome == "value_error":
                assert isinstance(exc, ValueError)
                assert runs == 1  # a programming error is never retried
            elif stop_mode == "drain":
                assert desc.outcome == "connection_error"
                assert isinstance(exc, ConnectionError)
                assert runs == MAX_RETRIES + 1
            else:  # cancel_pending starts no new attempt: a transient error is final
                assert desc.outcome in ("connection_error", "flaky")
                assert isinstance(exc, ConnectionError)
                assert 1 <= runs <= (MAX_RETRIES + 1 if desc.outcome == "connection_error" else 1)
        else:
            assert tok.discard_reason in ("cancelled", "stopped"), tok.discard_reason
            if stop_mode == "drain":
                assert tok.discard_reason == "cancelled"
            if runs:  # only a retry waiting out its backoff can be discarded after running
                assert desc.outcome in ("flaky", "connection_error")
        # A token whose dependency did not resolve never ran.
        if dep_tok is not None and dep_tok.state != "resolved":
            assert runs == 0
            assert tok.state in ("failed", "discarded")
            if tok.state == "failed":
                assert isinstance(tok.exception(), DependencyFailed)


# -- invariant 4: a task that waits on another token never deadlocks ------------------------------
@task_token_guard(operation_type="flaky_child", tags={"weight": "light"})
def flaky_child(runs: list[int]) -> str:
    runs.append(1)
    if len(runs) == 1:
        raise ConnectionError("transient")
    return "child ok"


@task_token_guard(operation_type="retrying_parent", tags={"weight": "light"})
def retrying_parent(runs: list[int]) -> str:
    child = flaky_child(runs)
    try:
        return child.get(timeout=3)
    except TimeoutError:
        return "deadlocked"


@task_token_guard(operation_type="slow_child", tags={"weight": "light", "storage_speed": "SLOW"})
def slow_child() -> str:
    return "io done"


@task_token_guard(operation_type="tier_parent", tags={"weight": "light"})
def tier_parent(started: threading.Event, go: threading.Event) -> str:
    started.set()
    if not go.wait(30):
        raise RuntimeError("the test never let the parent go on")
    child = slow_child()
    try:
        return child.get(timeout=3)
    except TimeoutError:
        return "deadlocked"


def test_nested_child_that_retries_does_not_deadlock_one_worker() -> None:
    runs: list[int] = []
    with OperationsCoordinator(
        process_lane=False, workers_per_core=1, cores=1, retry_policy=RetryPolicy(backoff_base=0)
    ) as coordinator:
        parent = retrying_parent(runs)
        assert parent.get(timeout=20) == "child ok"
        coordinator.stop(cancel_pending=True, timeout=10)


def test_nested_child_waiting_for_a_tier_permit_does_not_deadlock_one_worker() -> None:
    started, go = threading.Event(), threading.Event()
    with OperationsCoordinator(
        process_lane=False, workers_per_core=1, cores=1, storage_limits={"SLOW": 1}
    ) as coordinator:
        parent = tier_parent(started, go)
        assert started.wait(10)
        holder = slow_child()  # takes the only SLOW permit, queued behind the parent
        go.set()
        assert parent.get(timeout=20) == "io done"
        assert holder.get(timeout=10) == "io done"
        coordinator.stop(cancel_pending=True, timeout=10)
