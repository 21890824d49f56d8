"""Shared fixtures: a coordinator that is always stopped, and a bounded condition wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tokengate import OperationsCoordinator, Topology


def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait until ``predicate()`` holds (a condition, not a fixed delay); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        pause.wait(0.002)


def assert_counts_add_up(coordinator: OperationsCoordinator) -> None:
    snap = coordinator.stats()
    assert snap.in_flight == 0, str(snap)
    assert snap.submitted == snap.resolved + snap.failed + snap.discarded, str(snap)


@pytest.fixture
def make_coordinator(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., OperationsCoordinator]]:
    """Build and start coordinators; every one is stopped and its counts checked at teardown.

    A test module may set ``COORDINATOR_DEFAULTS`` (e.g. ``{"process_lane": False}`` where its
    heavy tasks take threading objects that cannot cross into a worker process).
    """
    made: list[OperationsCoordinator] = []
    defaults = dict(getattr(request.module, "COORDINATOR_DEFAULTS", {}))

    def make(**options: object) -> OperationsCoordinator:
        coordinator = OperationsCoordinator(**{**defaults, **options}).start()  # type: ignore[arg-type]
        made.append(coordinator)
        return coordinator

    yield make
    for coordinator in made:
        coordinator.stop(cancel_pending=True, timeout=10)
        assert_counts_add_up(coordinator)


@pytest.fixture
def coordinator(make_coordinator: Callable[..., OperationsCoordinator]) -> OperationsCoordinator:
    return make_coordinator(workers_per_core=2)


@pytest.fixture
def eight_cores() -> Topology:
    """The seed's 8-core machine; pinning to CPUs this machine lacks fails softly (logged)."""
    return Topology(physical_cores=8, logical_cores=8, available_cpus=tuple(range(8)))
