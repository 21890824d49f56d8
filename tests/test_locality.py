"""Locality keys: tokens with the same key run on the same worker while it lives."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import process_tasks as pt
from conftest import GATE
from tokengate import ConfigError, OperationsCoordinator, task_token_guard

Make = Callable[..., OperationsCoordinator]


@task_token_guard(operation_type="held_at_gate")
def held_at_gate(label: str) -> str:
    assert GATE.wait(30)
    return threading.current_thread().name


def test_tokens_of_one_key_queue_on_one_worker_even_beside_an_idle_one(
    make_coordinator: Make,
) -> None:
    make_coordinator(cores=1, workers_per_core=2, convergence=False, process_lane=False)
    anchored = held_at_gate.options(locality="model-a")
    tokens = [anchored(f"a{i}") for i in range(4)]
    # Without the key, the second token would go to the idle second worker.
    GATE.set()
    assert len({t.get(timeout=30) for t in tokens}) == 1
    assert len({t.worker for t in tokens}) == 1


def test_two_keys_spread_and_each_stays_put(make_coordinator: Make) -> None:
    make_coordinator(cores=1, workers_per_core=2, convergence=False, process_lane=False)
    a = [held_at_gate.options(locality="a")(f"a{i}") for i in range(3)]
    b = [held_at_gate.options(locality="b")(f"b{i}") for i in range(3)]
    GATE.set()
    where_a = {t.get(timeout=30) for t in a}
    where_b = {t.get(timeout=30) for t in b}
    assert len(where_a) == len(where_b) == 1
    assert where_a != where_b  # the second key was anchored on the least-loaded worker


def test_a_key_keeps_its_worker_process(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1)
    if "process" not in coordinator.lanes or len(coordinator.lanes["process"].workers) < 2:
        pytest.skip("needs a process lane with two worker processes")
    pids = {pt.whoami.options(locality=("model", 7))().get(timeout=60)["pid"] for _ in range(12)}
    assert len(pids) == 1


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}, {1}])
def test_a_locality_key_must_be_hashable(bad: Any) -> None:
    with pytest.raises(ConfigError, match="must be hashable"):
        held_at_gate.options(locality=bad)


def test_options_combine() -> None:
    both = held_at_gate.options(priority=3).options(locality="k")
    assert repr(both).endswith(".options(priority=3, locality='k')")
    assert both._call_priority == 3 and both._call_locality == "k"
