"""Fixtures of the process-lane tests: a coordinator whose worker processes are ready, no
worker process left behind by any test, and cool-downs short enough to watch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import eventually
from tokengate import OperationsCoordinator
from tokengate.lanes.process import _slot

from ._helpers import Make, lane_of, own_children


@pytest.fixture
def procs(make_coordinator: Make) -> Callable[..., OperationsCoordinator]:
    """A started coordinator whose worker processes are ready."""

    def make(**options: Any) -> OperationsCoordinator:
        coordinator = make_coordinator(**options)
        assert lane_of(coordinator).wait_ready(30)
        return coordinator

    return make


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    """Every test leaves no worker process of its own behind."""
    before = own_children()
    yield
    eventually(lambda: own_children() <= before, timeout=10, what="worker processes to exit")


@pytest.fixture
def quick_cool_down(monkeypatch: pytest.MonkeyPatch) -> tuple[float, float]:
    """Cool-downs of milliseconds (the schedule's shape is what is tested, not its seconds)."""
    base, cap = 0.001, 0.004
    monkeypatch.setattr(_slot, "RESTART_DELAY_BASE", base)
    monkeypatch.setattr(_slot, "RESTART_DELAY_CAP", cap)
    return base, cap
