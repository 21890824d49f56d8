"""Routing a burst onto deep queues: the candidates in turn, within a quarter of the least load.

Below ``DEEP`` tokens on the least-loaded candidate every token goes to the least-loaded one;
beyond it, ``Router.push`` takes the candidates in turn while the one in turn holds at most a
quarter more than that least load, so that routing a token costs the same whatever the number of
candidates. These tests drive the router with stand-in workers whose mailboxes only grow, so each
push can be checked against the loads it saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HEAVY_ON_THREADS
from tokengate import OperationsCoordinator, task_token_guard
from tokengate._token import Token
from tokengate.local._router import DEEP, Route, Router

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS
Make = Callable[..., OperationsCoordinator]


@task_token_guard(operation_type="deep_plain")
def plain(x: int) -> int:
    return x


class _Worker:
    """What ``push`` needs of a candidate; a push queues the token (nothing runs it)."""

    def __init__(self, index: int, load: int) -> None:
        self.index = index
        self.core = 0
        self.current: Any = None
        self.mailbox: list[Any] = [None] * load

    def push(self, token: Token[Any]) -> None:
        self.mailbox.append(token)

    def load(self) -> int:
        return len(self.mailbox) + (self.current is not None)


class _Burst:
    """A router whose route for ``plain`` is ``workers``; ``push`` returns who took a token."""

    def __init__(self, coordinator: OperationsCoordinator) -> None:
        self.coordinator = coordinator
        self.router: Router = coordinator.backend.router  # type: ignore[attr-defined]
        self.tokens: list[Token[Any]] = []
        self.workers: list[_Worker] = []

    def route(self, loads: list[int]) -> list[_Worker]:
        self.workers = [_Worker(i, load) for i, load in enumerate(loads)]
        lane = self.router.route_for(plain.spec).lane
        self.router._routes[id(plain.spec)] = Route(plain.spec, lane, self.workers)  # type: ignore[arg-type]
        return self.workers

    def push(self) -> int:
        token = self.coordinator._submission.new_token(plain, (1,), {})
        self.tokens.append(token)
        before = [len(w.mailbox) for w in self.workers]
        self.router.push(token, internal=False)
        grew = zip(self.workers, before, strict=True)
        (taken,) = [w.index for w, n in grew if len(w.mailbox) > n]
        return taken

    def close(self) -> None:
        self.router.invalidate()
        for token in self.tokens:
            assert token.cancel()  # never run: each ends discarded, and the counts add up


@pytest.fixture
def burst(make_coordinator: Make) -> Iterator[_Burst]:
    # No convergence engine: nothing may rebuild the routes while a test holds its own.
    burst = _Burst(make_coordinator(workers_per_core=2, convergence=False))
    yield burst
    burst.close()


def test_a_burst_on_deep_queues_takes_the_candidates_in_turn(burst: _Burst) -> None:
    burst.route([40, 36, 38, 42])
    assert burst.push() == 1  # a scan: the least loaded
    assert [burst.push() for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]  # all within 36 + 9


def test_the_one_in_turn_too_far_above_the_least_load_sends_the_token_to_the_least(
    burst: _Burst,
) -> None:
    burst.route([40, 36, 38, 60])
    assert burst.push() == 1
    assert [burst.push() for _ in range(3)] == [0, 1, 2]
    assert burst.push() == 1  # 60 > 36 + 9: scanned again, the least loaded is 1 (38)


def test_below_deep_every_token_goes_to_the_least_loaded(burst: _Burst) -> None:
    workers = burst.route([DEEP - 1, DEEP + 5, DEEP + 5])
    assert [burst.push() for _ in range(6)] == [0] * 6  # 0 holds the least load throughout
    assert len(workers[0].mailbox) == DEEP + 5


def test_an_idle_candidate_gets_a_token_within_one_round(burst: _Burst) -> None:
    workers = burst.route([40, 40, 40, 40])
    assert burst.push() == 0
    workers[2].mailbox.clear()  # it drained its queue meanwhile
    assert [burst.push() for _ in range(3)] == [0, 1, 2]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    loads=st.lists(st.integers(0, 424), min_size=1, max_size=8),
    pushes=st.integers(1, 40),
)
def test_a_token_goes_to_the_least_loaded_or_within_a_quarter_of_it(
    burst: _Burst, loads: list[int], pushes: int
) -> None:
    mailbox_max = burst.router.mailbox_max
    workers = burst.route(loads)
    for _ in range(pushes):
        seen = [w.load() for w in workers]
        least = min(seen)
        if least >= mailbox_max:
            break  # every mailbox full: the producer would wait (test_coordinator covers it)
        load = seen[burst.push()]
        assert load < mailbox_max  # room
        if least < DEEP:
            assert load == least
        else:
            assert load <= least + least // 4
