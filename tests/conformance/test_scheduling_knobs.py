"""Rate limits and priorities on every backend: the ``rate`` tag's FIFO (stepped with
``rate_limiter.poll``) holds tokens before they are sent, and a priority orders within a weight
(on Dask: inside the weight's Dask ``priority``)."""

from __future__ import annotations

import time
from typing import Any

from conftest import eventually

from .conftest import Harness
from .tasks import blocker, knob_probe, rated

HOUR = 3600.0


def test_rate_limited_tokens_wait_then_go_in_order(harness: Harness) -> None:
    coordinator = harness.coordinator()
    journal = harness.journal()
    tokens = [rated(journal, f"r{i}") for i in range(5)]
    assert [t.get(timeout=30) for t in tokens[:2]] == ["r0", "r1"]
    assert [t.state for t in tokens[2:]] == ["pending"] * 3
    assert coordinator.stats().operations["rated"].rate_waiting == 3
    assert tokens[3].cancel()
    assert coordinator.rate_limiter.poll(time.monotonic() + HOUR) == 1
    assert tokens[2].get(timeout=30) == "r2"
    assert tokens[4].state == "pending"
    coordinator.stop(cancel_pending=True, timeout=30)
    assert tokens[4].discard_reason == "stopped"
    assert journal.labels() == ["r0", "r1", "r2"]
    op = coordinator.stats().operations["rated"]
    assert (op.resolved, op.discarded, op.rate_delayed, op.rate_waiting) == (3, 2, 3, 0)


def test_a_priority_orders_within_its_weight_on_dask(dask_harness: Harness) -> None:
    coordinator = dask_harness.coordinator()
    gate = dask_harness.gate()
    heavy = blocker(gate)
    first, soon, later = (
        knob_probe(),
        knob_probe.options(priority=7)(),
        knob_probe.options(priority=-3)(),
    )
    backend: Any = coordinator.backend
    keys = [backend._runner.key_of(t) for t in (heavy, first, soon, later)]

    def priorities(dask_scheduler: Any) -> dict[str, float]:
        return {k: -dask_scheduler.tasks[k].priority[0] for k in keys if k in dask_scheduler.tasks}

    probe = dask_harness.cluster.probe_client
    sent: dict[str, float] = {}  # a light task may end, and be forgotten, before all are seen

    def all_seen() -> bool:
        sent.update(probe.run_on_scheduler(priorities))
        return len(sent) == 4

    eventually(all_seen)
    assert sent[keys[0]] == 2 and sent[keys[1]] == 0
    assert 0 < sent[keys[2]] < 0.5 and -0.5 < sent[keys[3]] < 0
    gate.set()
    assert [t.get(timeout=30) for t in (first, soon, later)] == ["light"] * 3
    assert heavy.get(timeout=30) == "released"
