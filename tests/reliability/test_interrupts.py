"""KeyboardInterrupt in the main thread while tokens are in flight.

A real SIGINT is delivered to the main thread by a helper (``signal.pthread_kill``) once the
main thread is waiting: in ``get()``, at the admission gate, or in ``stop()``'s drain.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import eventually
from tokengate import OperationsCoordinator, Token

from ._support import (
    Resources,
    assert_counts_match,
    assert_terminal,
    interrupt_main_when,
    record,
    serves_new_work,
    settle,
)
from ._tasks import GATE, gated, link, plain, surge_tier, tiered, timed


# -- KeyboardInterrupt in the main thread -------------------------------------------------------
def _waiting_on(token: Token[Any]) -> Callable[[], bool]:
    return lambda: bool(token._sleepers)


def test_ctrl_c_while_waiting_in_get_leaves_the_tokens_alone(resources: Resources) -> None:
    coordinator = OperationsCoordinator(workers_per_core=2).start()
    try:
        running = [gated(i) for i in range(4)]
        queued = [plain(i) for i in range(200)]
        interrupt_main_when(_waiting_on(running[0]))
        with pytest.raises(KeyboardInterrupt):
            running[0].get(timeout=30)
        assert not running[0].done()  # the interrupt is the caller's, not the token's
        GATE.set()
        made = running + queued
        assert [t.get(timeout=30) for t in made] == [*range(4), *range(200)]
        assert_terminal(made)
        assert_counts_match(coordinator, made)
        serves_new_work(coordinator)
    finally:
        GATE.set()
        coordinator.stop(timeout=30)
    leaks = resources.leaks()
    record("ctrl_c_in_get", injected=1, tokens=len(made), lost=0, leaks=len(leaks))
    assert leaks == []


def open_gate_once_stopping(coordinator: OperationsCoordinator) -> None:
    """Open the gate once stop() is draining, as a task finishing on its own would."""
    eventually(lambda: not coordinator.running, timeout=50, what="stop() to begin")
    GATE.set()


def test_ctrl_c_inside_the_with_block_discards_pending_and_finishes_running(
    resources: Resources,
) -> None:
    # convergence=False: while the only thread worker waits on the gate, the engine rightly adds
    # threads, which can run the queued tokens (the last one included) before Ctrl-C lands.
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1, convergence=False)
    made: list[Token[Any]] = []
    with pytest.raises(KeyboardInterrupt), coordinator:
        made += [gated(0)]
        # Running before Ctrl-C, whose stop(cancel_pending=True) would discard it unstarted.
        eventually(made[0].running, what="the gated task to start")
        made += [plain(i) for i in range(1, 100)]
        made += [tiered(i) for i in range(100, 120)]
        made += [link(made[-1], 120, -1)]
        interrupt_main_when(_waiting_on(made[0]))
        threading.Thread(target=open_gate_once_stopping, args=(coordinator,), daemon=True).start()
        made[0].get(timeout=30)
    assert settle(made) == 0
    assert_terminal(made)
    assert made[0].result(0) == 0
    assert all(t.discard_reason == "stopped" for t in made[1:-1] if t.state == "discarded")
    assert made[-1].state in ("discarded", "failed")
    assert_counts_match(coordinator, made)
    with coordinator:
        serves_new_work(coordinator)
    leaks = resources.leaks()
    record("ctrl_c_in_with_block", injected=1, tokens=len(made), lost=0, leaks=len(leaks))
    assert leaks == []


def test_ctrl_c_while_blocked_by_backpressure_loses_nothing(resources: Resources) -> None:
    """Regression: a producer interrupted while waiting for mailbox room left its token counted
    as submitted but never queued; ``in_flight`` stayed at 1 and ``stop()`` (the ``with``
    block's exit on Ctrl-C) waited for it for ever."""
    coordinator = OperationsCoordinator(
        workers_per_core=1, cores=1, mailbox_max=2, convergence=False
    ).start()
    try:
        made = [gated(0), plain(1)]  # full: 1 running + 1 queued
        interrupt_main_when(lambda: coordinator.admission.waiters == 1)
        with pytest.raises(KeyboardInterrupt):
            made.append(plain(2))  # blocks at the gate; the interrupt lands there
        assert len(made) == 2
        snap = coordinator.stats()
        assert (snap.submitted, snap.discarded) == (3, 1)  # the refused call is a discard
        GATE.set()
        assert [t.get(timeout=30) for t in made] == [0, 1]
        assert_counts_match(coordinator, made)
        serves_new_work(coordinator)
    finally:
        GATE.set()
        coordinator.stop(timeout=30)
    assert coordinator.stats().in_flight == 0
    leaks = resources.leaks()
    record("ctrl_c_at_backpressure", injected=1, tokens=3, lost=0, leaks=len(leaks))
    assert leaks == []


def test_ctrl_c_during_stops_drain_loses_nothing(resources: Resources) -> None:
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
    made = [gated(0)]
    made += [timed(i) for i in range(1, 50)]  # timeout tags: arming one needs the timer queue
    made += [surge_tier(i) for i in range(50, 80)]
    interrupt_main_when(lambda: coordinator._life.status == "stopping")
    with pytest.raises(KeyboardInterrupt):
        coordinator.stop()
    assert not coordinator.running
    GATE.set()
    assert settle(made) == 0, "tokens were lost after Ctrl-C interrupted stop()"
    assert_terminal(made)
    assert made[0].result(0) == 0
    for token in made[1:]:
        assert token.state in ("resolved", "discarded") or isinstance(
            token.exception(0), ConnectionError
        ), token
    eventually(lambda: coordinator.stats().in_flight == 0, what="in_flight to reach 0")
    assert_counts_match(coordinator, made)
    with coordinator:
        serves_new_work(coordinator)
    leaks = resources.leaks()
    record("ctrl_c_during_stop", injected=1, tokens=len(made), lost=0, leaks=len(leaks))
    assert leaks == []


class _EngineInterruptedWhileJoined:
    """Stands in for the convergence engine: its stop() is where the Ctrl-C lands."""

    def stop(self) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_while_stop_joins_the_convergence_engine_still_shuts_down(
    resources: Resources,
) -> None:
    """Regression: stop() joined the engine's thread before its try/finally, so a Ctrl-C there
    skipped the shutdown: the coordinator stayed 'stopping' for ever, refusing both stop() (a
    no-op) and start() ('already running'), with its workers still up."""
    coordinator = OperationsCoordinator(workers_per_core=1).start()
    made = [plain(i) for i in range(50)]
    engine = coordinator.convergence
    coordinator.backend._convergence = _EngineInterruptedWhileJoined()  # type: ignore[attr-defined]
    try:
        with pytest.raises(KeyboardInterrupt):
            coordinator.stop()
    finally:
        if engine is not None:
            engine.stop()
    assert not coordinator.running
    assert settle(made) == 0
    assert_terminal(made)
    assert_counts_match(coordinator, made)
    with coordinator:  # it starts again: it really stopped
        serves_new_work(coordinator)
    leaks = resources.leaks()
    record("ctrl_c_while_stop_joins_engine", injected=1, tokens=50, lost=0, leaks=len(leaks))
    assert leaks == []
