"""Rate limits on every backend: the ``rate`` tag's FIFO (stepped with ``rate_limiter.poll``)
holds tokens before they are sent."""

from __future__ import annotations

import time

from .conftest import Harness
from .tasks import rated

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
