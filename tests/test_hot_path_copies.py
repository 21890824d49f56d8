"""The hot path's inlined copies do what the functions they copy do.

Three steps run once per token and are written out where they are used, because each call
saved was a measurable share of a no-op token's cost (B1): ``Submission.submit`` makes the token
as ``new_token`` does, ``LocalBackend.run`` claims and begins a run as ``claim`` and ``begin``
do, and ``Router.push`` routes as ``route_for`` and ``pick`` do. Each test drives both versions
through the same cases and compares what they leave behind, so a change to one that is not made
to the other fails here. ``LocalBackend.prepare`` copies a condition of ``runs_in_process`` to skip
the route of most calls: the last test holds it to the lane each call really takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import product
from typing import Any

import pytest

from conftest import HEAVY_ON_THREADS
from tokengate import OperationsCoordinator, task_token_guard
from tokengate._spec import EXECUTORS, WEIGHTS
from tokengate._token import Token
from tokengate.local._router import Route

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS


@task_token_guard(operation_type="copy_plain")
def plain(x: int) -> int:
    return x


@task_token_guard(operation_type="copy_timed", tags={"timeout": 30})
def timed(x: int) -> int:
    return x


class _Worker:
    """What ``run`` and ``begin`` need of a worker, and what ``push`` needs of a candidate."""

    def __init__(self, load: int = 0, core: int = 0, index: int = 0) -> None:
        self.current: Any = None
        self.mailbox: list[Token[Any]] = [None] * load  # type: ignore[list-item]
        self.pushed: list[Token[Any]] = []
        self.core = core
        self.index = index

    def push(self, token: Token[Any]) -> None:
        self.pushed.append(token)


def _fields(token: Token[Any]) -> tuple[Any, ...]:
    return (token.spec, token.fn, token.args, token.kwargs, token.attempts, token.weight)


@pytest.mark.parametrize("kwargs", [{}, {"x": 2}])
def test_submit_makes_and_counts_the_token_as_new_token_does(
    coordinator: OperationsCoordinator, kwargs: dict[str, int]
) -> None:
    submission = coordinator._submission
    args = () if kwargs else (2,)
    before = coordinator.stats().submitted
    made = submission.new_token(plain, args, kwargs)
    submitted = submission.submit(plain, args, kwargs, internal=False)
    assert coordinator.stats().submitted == before + 2  # each counted once, by its own path
    assert _fields(made) == _fields(submitted)
    if not kwargs:  # no keyword arguments: both share the one empty dict
        assert made.kwargs is submitted.kwargs
    assert submitted.seq > made.seq and submitted.submitted_at >= made.submitted_at
    assert submitted.get(timeout=10) == 2
    assert made.cancel()  # never queued: it ends discarded, and the counts add up


@pytest.mark.parametrize(
    "case", ["runs", "past its deadline", "claimed elsewhere", "with a timeout"]
)
def test_run_claims_and_begins_as_claim_and_begin_do(
    coordinator: OperationsCoordinator, case: str
) -> None:
    backend: Any = coordinator.backend
    task = timed if case == "with a timeout" else plain
    inline, parts = (coordinator._submission.new_token(task, (3,), {}) for _ in range(2))
    for token in (inline, parts):
        if case == "past its deadline":
            token._deadline_at = time.perf_counter() - 1.0
        if case == "claimed elsewhere":
            assert token._try_claim()
    by_run, by_parts = _Worker(), _Worker()
    ran = backend.run(inline, by_run)
    claimed = backend.claim(parts)
    if claimed:
        run_id = backend.begin(parts, by_parts)
        backend._completion.complete(parts, run_id, parts.fn(*parts.args), None)
    assert ran is claimed
    assert (inline.state, inline.discard_reason, inline.attempts) == (
        parts.state,
        parts.discard_reason,
        parts.attempts,
    )
    assert (inline._ran_on is by_run) is (parts._ran_on is by_parts)
    assert (inline.started_at is None) is (parts.started_at is None)
    assert by_run.current is None  # the worker's current token is put back
    if case == "claimed elsewhere":  # whoever claimed them ends them
        for token in (inline, parts):
            backend._completion.complete(token, token._run_id, 3, None)
    assert inline.state == parts.state != "running"


@pytest.mark.parametrize(
    ("loads", "chosen"),
    [
        ([2, 0, 1], 1),  # an idle worker at once
        ([3, 1, 2], 1),  # else the least loaded
        ([2, 2, 2], 0),  # ties: the first
        ([1], 0),
    ],
)
def test_push_routes_and_picks_as_route_for_and_pick_do(
    make_coordinator: Callable[..., OperationsCoordinator], loads: list[int], chosen: int
) -> None:
    # No convergence engine: nothing may rebuild the routes while the test holds its own.
    coordinator = make_coordinator(workers_per_core=2, convergence=False)
    router = coordinator.backend.router  # type: ignore[attr-defined]
    spec = plain.spec
    lane_name = router.route_for(spec).lane  # the route both versions work out
    workers = [_Worker(load, index=i) for i, load in enumerate(loads)]
    router._routes[id(spec)] = Route(spec, lane_name, workers)
    assert router.route_for(spec).candidates is workers
    token = coordinator._submission.new_token(plain, (4,), {})
    try:
        router.push(token, internal=False)
        assert router.pick(workers) is workers[chosen]
        assert [len(w.pushed) for w in workers] == [int(i == chosen) for i in range(len(loads))]
    finally:
        router.invalidate()
        token.cancel()
    router._routes.pop(id(spec), None)
    assert router.route_for(spec).lane == lane_name  # worked out afresh, the same way


def test_prepare_pickles_exactly_the_calls_the_process_lane_runs(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    # LocalBackend.prepare returns at once unless weight == "heavy" or executor == "process"
    # (runs_in_process needs one of the two): no call for a worker process may go unpickled.
    coordinator = make_coordinator(workers_per_core=1, process_lane=True, convergence=False)
    backend: Any = coordinator.backend
    tasks = [
        task_token_guard(operation_type=f"copy_rule_{i}", tags=dict(tags))(plain.__wrapped__)
        for i, tags in enumerate(
            {"weight": w, "executor": e, **({"storage_speed": s} if s else {})}.items()
            for w, e, s in product(WEIGHTS, EXECUTORS, (None, "FAST"))
        )
    ]
    for task in tasks:
        sent = backend.router.route_for(task.spec).lane == "process"
        assert (backend.prepare(task, (5,), {}) is not None) is sent, task.spec
    assert any(backend.router.route_for(t.spec).lane == "process" for t in tasks)
    assert any(t.spec.weight == "heavy" and t.spec.executor == "auto" for t in tasks)
