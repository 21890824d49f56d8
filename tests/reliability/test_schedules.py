"""Random schedules against the invariants of docs/design.md, with hypothesis.

A schedule is a coordinator configuration, one to three producer threads each with its own list
of operations (submit a task that succeeds, raises a programming error, fails transiently k
times, runs a little while, takes a tier permit, or chains on an earlier token; cancel an
earlier token), and a stop() issued from another thread once a drawn number of submissions was
made, with or without ``cancel_pending`` and a drain ``timeout``. ``tests/test_invariants.py``
covers single-threaded mixes; this adds concurrent producers and stop() at random points.

Checked after every schedule (invariant numbers from docs/design.md):

1. every token the producers got is in exactly one terminal state, its done-callback ran exactly
   once, its outcome is one its task allows, and the counts add up token by token
   (``submitted == resolved + failed + discarded``, ``in_flight == 0``), refused calls
   (``Overloaded``, ``CoordinatorNotRunning``) included;
2. no storage tier ever ran more tasks than its limit;
5. errors keep their type (ValueError, ConnectionError, DependencyFailed chained to its cause);
and no thread outlives the coordinator.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tokengate import (
    CoordinatorNotRunning,
    DependencyFailed,
    OperationsCoordinator,
    Overloaded,
    RetryPolicy,
    Token,
    task_token_guard,
)

from ._support import Resources, settle

RETRIES = 2
_attempts: Counter[int] = Counter()
_attempts_lock = threading.Lock()
_keys = itertools.count()


@task_token_guard(operation_type="sched_ok", tags={"weight": "light"})
def s_ok(i: int) -> int:
    return i


@task_token_guard(operation_type="sched_value", tags={"weight": "medium"})
def s_value(i: int) -> int:
    raise ValueError(f"programming error {i}")


@task_token_guard(
    operation_type="sched_transient",
    tags={"weight": "heavy", "executor": "thread", "retries": RETRIES},
)
def s_transient(i: int, key: int, failures: int) -> int:
    with _attempts_lock:
        _attempts[key] += 1
        attempt = _attempts[key]
    if attempt <= failures:
        raise ConnectionError(f"transient {i} attempt {attempt}")
    return i


@task_token_guard(operation_type="sched_slow", tags={"weight": "light"})
def s_slow(i: int, ms: int) -> int:
    threading.Event().wait(ms / 1000)  # the task's own work, not a test waiting for threads
    return i


@task_token_guard(operation_type="sched_tier", tags={"weight": "medium", "storage_speed": "FAST"})
def s_tier(i: int, ms: int) -> int:
    threading.Event().wait(ms / 1000)
    return i


@task_token_guard(operation_type="sched_chain", tags={"weight": "light"})
def s_chain(previous: int) -> int:
    return previous + 1


# -- schedules ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    kind: str  # ok | value | transient | slow | tier | chain | cancel
    arg: int = 0  # failures, milliseconds, or the index of an earlier token


ops = st.one_of(
    st.builds(Op, st.just("ok")),
    st.builds(Op, st.just("value")),
    st.builds(Op, st.just("transient"), st.integers(0, RETRIES + 1)),
    st.builds(Op, st.just("slow"), st.integers(0, 3)),
    st.builds(Op, st.just("tier"), st.integers(0, 3)),
    st.builds(Op, st.just("chain"), st.integers(0, 30)),
    st.builds(Op, st.just("cancel"), st.integers(0, 30)),
)


@dataclass(frozen=True)
class Schedule:
    cores: int
    workers_per_core: int
    mailbox_max: int
    fast_limit: int
    admission: str
    producers: tuple[tuple[Op, ...], ...]
    repeat: int  # each producer plays its operations this many times (a surge, cheaply drawn)
    stop_at_percent: int  # stop() once this share of all submissions was made
    cancel_pending: bool
    timeout: float | None


schedules = st.builds(
    Schedule,
    cores=st.integers(1, 2),
    workers_per_core=st.integers(1, 3),
    mailbox_max=st.sampled_from([1, 2, 4, 425]),
    fast_limit=st.integers(1, 3),
    admission=st.sampled_from(["block", "block", "reject"]),
    producers=st.lists(st.lists(ops, max_size=30).map(tuple), min_size=1, max_size=3).map(tuple),
    repeat=st.sampled_from([1, 2, 5, 20]),
    stop_at_percent=st.integers(0, 110),
    cancel_pending=st.booleans(),
    timeout=st.sampled_from([None, None, 0.0, 0.02]),
)


# -- running one --------------------------------------------------------------------------------
@dataclass
class Made:
    op: Op
    token: Token[Any]
    dep: Token[Any] | None = None
    cancelled: bool = False


class Run:
    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.cond = threading.Condition()
        self.submits = 0
        self.finished = 0
        self.refused: Counter[str] = Counter()
        self.callbacks: Counter[Token[Any]] = Counter()
        self.lock = threading.Lock()
        self.made: list[list[Made]] = [[] for _ in schedule.producers]

    def on_done(self, token: Any) -> None:
        with self.lock:
            self.callbacks[token] += 1

    def submit(self, index: int, i: int, op: Op) -> Made | None:
        mine = self.made[index]
        if op.kind == "cancel":
            if mine:
                target = mine[op.arg % len(mine)]
                target.cancelled = target.token.cancel() or target.cancelled
            return None
        with self.cond:
            self.submits += 1
            self.cond.notify_all()
        dep = None
        if op.kind == "ok":
            token: Token[Any] = s_ok(i)
        elif op.kind == "value":
            token = s_value(i)
        elif op.kind == "transient":
            token = s_transient(i, next(_keys), op.arg)
        elif op.kind == "slow":
            token = s_slow(i, op.arg)
        elif op.kind == "tier":
            token = s_tier(i, op.arg)
        elif mine:
            dep = mine[op.arg % len(mine)].token
            token = s_chain(dep)
        else:
            token = s_ok(i)
            op = Op("ok")
        token.add_done_callback(self.on_done)
        return Made(op, token, dep)

    @property
    def stop_after(self) -> int:
        schedule = self.schedule
        submits = sum(op.kind != "cancel" for ops in schedule.producers for op in ops)
        return submits * schedule.repeat * schedule.stop_at_percent // 100

    def produce(self, index: int, start: threading.Barrier) -> None:
        ops = self.schedule.producers[index]
        start.wait()
        try:
            for i, op in enumerate(ops * self.schedule.repeat):
                try:
                    made = self.submit(index, index * 100_000 + i, op)
                except Overloaded:
                    with self.lock:
                        self.refused["overloaded"] += 1
                    continue
                except CoordinatorNotRunning:
                    with self.lock:
                        self.refused["not_running"] += 1
                    break
                if made is not None:
                    self.made[index].append(made)
        finally:
            with self.cond:
                self.finished += 1
                self.cond.notify_all()

    def stop_when_due(self, coordinator: OperationsCoordinator, start: threading.Barrier) -> None:
        producers = len(self.schedule.producers)
        stop_after = self.stop_after
        start.wait()
        with self.cond:
            self.cond.wait_for(
                lambda: self.submits >= stop_after or self.finished == producers, timeout=60
            )
        coordinator.stop(cancel_pending=self.schedule.cancel_pending, timeout=self.schedule.timeout)


def check_outcome(m: Made) -> None:
    token, kind = m.token, m.op.kind
    state = token.state
    if m.cancelled:
        assert state == "discarded", m
    if state == "discarded":
        assert token.discard_reason in ("cancelled", "stopped", "deadline"), m
        return
    exc = token.exception(0)
    if kind in ("ok", "slow", "tier"):
        assert state == "resolved" and token.result(0) is not None, m
    elif kind == "value":
        assert type(exc) is ValueError and token.attempts == 1, m  # never retried
    elif kind == "transient":
        if state == "resolved":
            assert m.op.arg <= RETRIES and token.attempts == m.op.arg + 1, m
        else:  # out of retries, or stop() gave up on pending work before the next attempt
            assert type(exc) is ConnectionError and token.attempts <= min(m.op.arg, RETRIES + 1), m
    elif kind == "chain":
        assert m.dep is not None
        if state == "resolved":
            assert m.dep.state == "resolved" and token.result(0) == m.dep.result(0) + 1, m
        else:
            assert type(exc) is DependencyFailed and m.dep.state != "resolved", m
            assert exc.__cause__ is not None


def run_schedule(schedule: Schedule) -> None:
    resources = Resources.now()
    coordinator = OperationsCoordinator(
        cores=schedule.cores,
        workers_per_core=schedule.workers_per_core,
        mailbox_max=schedule.mailbox_max,
        storage_limits={"FAST": schedule.fast_limit},
        admission=schedule.admission,
        retry_policy=RetryPolicy(backoff_base=0.001),
    ).start()
    run = Run(schedule)
    start = threading.Barrier(len(schedule.producers) + 1)
    producers = [
        threading.Thread(target=run.produce, args=(i, start), name=f"producer-{i}")
        for i in range(len(schedule.producers))
    ]
    stopper = threading.Thread(target=run.stop_when_due, args=(coordinator, start), name="stopper")
    try:
        for thread in [*producers, stopper]:
            thread.start()
        for thread in [*producers, stopper]:
            thread.join(60)
            assert not thread.is_alive(), f"{thread.name} is stuck"
    finally:
        coordinator.stop(cancel_pending=True, timeout=30)

    made = [m for ms in run.made for m in ms]
    tokens = [m.token for m in made]
    assert settle(tokens, timeout=30) == 0, "tokens never reached a terminal state"
    for m in made:
        check_outcome(m)
    # a done-callback that ran 0 or 2 times would mean a lost or doubled terminal transition
    with run.lock:
        callbacks = dict(run.callbacks)
    assert all(callbacks.get(t) == 1 for t in tokens), [
        (t, callbacks.get(t)) for t in tokens if callbacks.get(t) != 1
    ]
    snap = coordinator.stats()
    states = Counter(t.state for t in tokens)
    assert snap.in_flight == 0, str(snap)
    assert snap.submitted == len(tokens) + run.refused["overloaded"], (str(snap), run.refused)
    assert snap.resolved == states["resolved"], str(snap)
    assert snap.failed == states["failed"], str(snap)
    assert snap.discarded == states["discarded"] + run.refused["overloaded"], str(snap)
    event(f"producers refused after stop: {min(run.refused['not_running'], 1)}")
    event(f"tokens discarded by stop: {min(states['discarded'], 1)}")
    event(f"retries: {min(snap.retried, 1)}")
    event(f"tokens: {min(len(tokens) // 100 * 100, 500)}+")
    for tier in coordinator.tier_stats().values():
        assert tier.high_water <= tier.limit, tier
        assert tier.running == 0 and tier.waiting == 0, tier
    assert resources.leaks() == []


SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@settings(max_examples=int(os.environ.get("TOKENGATE_SCHEDULE_EXAMPLES", "40")), **SETTINGS)
@given(schedules)
def test_random_schedules_keep_the_invariants(schedule: Schedule) -> None:
    run_schedule(schedule)


@pytest.mark.soak
@settings(max_examples=1000, **SETTINGS)
@given(schedules)
def test_many_random_schedules_keep_the_invariants(schedule: Schedule) -> None:
    run_schedule(schedule)
