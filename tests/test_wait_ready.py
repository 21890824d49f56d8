"""``coordinator.wait_ready()``: block until every worker, the process lane's included, can take a
task at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tokengate import CoordinatorNotRunning, OperationsCoordinator
from tokengate.local import LocalBackend

Make = Callable[..., OperationsCoordinator]


def test_after_wait_ready_every_process_worker_is_ready(make_coordinator: Make) -> None:
    coordinator = make_coordinator(cores=2, process_lane=True, convergence=False)
    assert coordinator.wait_ready(timeout=60)
    workers = coordinator.lanes["process"].workers
    assert workers and all(w.ready.is_set() for w in workers)


def test_wait_ready_is_true_at_once_without_lanes_that_start_late(make_coordinator: Make) -> None:
    coordinator = make_coordinator(cores=1, process_lane=False, convergence=False)
    assert coordinator.wait_ready(timeout=0)


class _Lane:
    """A lane whose workers start late: records the time it was given, answers ``ready``."""

    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self.given: list[float | None] = []

    def wait_ready(self, timeout: float | None) -> bool:
        self.given.append(timeout)
        return self.ready


def test_one_timeout_covers_every_lane_and_a_late_lane_answers_false() -> None:
    backend = LocalBackend()
    first, second = _Lane(ready=True), _Lane(ready=False)
    lanes: dict[str, Any] = {"thread": object(), "process": first, "other": second}
    backend._lanes = lanes
    assert backend.wait_ready(5.0) is False
    (left_first,) = first.given
    (left_second,) = second.given
    assert left_first is not None and left_second is not None
    assert 0.0 <= left_second <= left_first <= 5.0
    second.ready = True
    assert backend.wait_ready(None) is True


def test_wait_ready_refuses_a_coordinator_that_is_not_running() -> None:
    coordinator = OperationsCoordinator(process_lane=False)
    with pytest.raises(CoordinatorNotRunning, match="start"):
        coordinator.wait_ready()


@pytest.mark.parametrize(("timeout", "error"), [(-1, ValueError), ("soon", TypeError)])
def test_wait_ready_names_a_bad_timeout(
    make_coordinator: Make, timeout: object, error: type[Exception]
) -> None:
    coordinator = make_coordinator(cores=1, process_lane=False, convergence=False)
    with pytest.raises(error, match="timeout"):
        coordinator.wait_ready(timeout)  # type: ignore[arg-type]
