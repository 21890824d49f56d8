"""Operator controls through the Python API: pause/resume, drain, cancel queued, kill, breakers.

The dashboard's buttons call these same methods (tests/test_dashboard_browser.py presses them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import process_tasks as pt
from conftest import GATE, eventually
from tokengate import (
    CoordinatorNotRunning,
    OperationBlocked,
    OperationsCoordinator,
    Token,
    TokenDiscarded,
    TokenGateError,
    task_token_guard,
)


@task_token_guard(operation_type="ctl_square")
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="ctl_other")
def other(x: int) -> int:
    return -x


@task_token_guard(operation_type="ctl_gated")
def gated(started: threading.Event) -> str:
    started.set()
    assert GATE.wait(30)
    return "opened"


def _call_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def one_thread(make_coordinator: Callable[..., OperationsCoordinator]) -> OperationsCoordinator:
    """One worker thread that stays one (no convergence engine adding workers while a gated
    task holds it): what is queued behind the gate stays queued until the test opens it."""
    return make_coordinator(cores=1, workers_per_core=1, process_lane=False, convergence=False)


def test_pause_blocks_callers_until_resume_and_drops_nothing(
    one_thread: OperationsCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokengate.control")
    c = one_thread
    c.pause()
    assert c.admission.paused == {"operator": "paused by the operator"}
    thread, out = _call_in_thread(lambda: square(4))
    eventually(lambda: c.admission.waiters == 1, what="the caller to wait")
    assert not out and c.stats().submitted == 0
    c.resume()
    thread.join(10)
    token = out[0]
    assert isinstance(token, Token) and token.get(timeout=10) == 16
    assert c.admission.paused == {}
    assert "Admission paused by the operator" in caplog.text
    assert "Admission resumed by the operator" in caplog.text


def test_pausing_one_operation_holds_only_its_calls(one_thread: OperationsCoordinator) -> None:
    c = one_thread
    c.pause("ctl_square")
    assert c.paused_operations == {"ctl_square": "paused"}
    thread, out = _call_in_thread(lambda: square(3))
    assert other(2).get(timeout=10) == -2  # another operation runs on
    assert not out
    c.resume("ctl_square")
    thread.join(10)
    assert out[0].get(timeout=10) == 9
    assert c.paused_operations == {}


def test_drain_refuses_new_calls_and_finishes_queued_ones(
    one_thread: OperationsCoordinator,
) -> None:
    c = one_thread
    started = threading.Event()
    running = gated(started)
    assert started.wait(10)
    queued = [square(i) for i in range(3)]
    c.drain("ctl_square")
    with pytest.raises(OperationBlocked, match="'ctl_square' is draining"):
        square(9)
    GATE.set()
    assert [t.get(timeout=10) for t in queued] == [0, 1, 4]
    assert running.get(timeout=10) == "opened"
    c.resume("ctl_square")
    assert square(5).get(timeout=10) == 25


def test_cancel_queued_discards_only_that_operations_waiting_tokens(
    one_thread: OperationsCoordinator,
) -> None:
    c = one_thread
    started = threading.Event()
    running = gated(started)
    assert started.wait(10)
    queued = [square(i) for i in range(3)]
    kept = other(1)
    assert c.cancel_queued("ctl_square") == 3
    for token in queued:
        assert token.state == "discarded"
        assert token.discard_reason == "cancelled by operator"
    GATE.set()
    assert running.get(timeout=10) == "opened" and kept.get(timeout=10) == -1


def test_kill_discards_a_queued_token_and_refuses_a_running_thread(
    one_thread: OperationsCoordinator,
) -> None:
    c = one_thread
    started = threading.Event()
    running = gated(started)
    assert started.wait(10)
    queued = square(2)
    assert "discarded before it ran" in c.kill(queued)
    assert queued.discard_reason == "killed by operator"
    with pytest.raises(TokenDiscarded):
        queued.get(timeout=1)
    with pytest.raises(TokenGateError, match="a Python thread cannot be stopped safely"):
        c.kill(running)
    GATE.set()
    assert running.get(timeout=10) == "opened"
    assert "already ended" in c.kill(running)


def test_kill_ends_a_running_process_task_and_replaces_its_worker(
    make_coordinator: Callable[..., OperationsCoordinator], tmp_path: Path
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=True)
    marker = tmp_path / "running"
    token = pt.block_until_killed(str(marker))
    eventually(marker.exists, timeout=30, what="the task to start")
    eventually(lambda: token.state == "running", what="the token to run")
    restarts = c.stats().events.get("process_restarts", 0)
    assert "worker process was replaced" in c.kill(token)
    with pytest.raises(TokenDiscarded):
        token.get(timeout=30)
    assert token.discard_reason == "killed by operator"
    assert c.stats().events.get("process_killed") == 1
    assert c.stats().events.get("process_restarts", 0) == restarts + 1
    assert pt.square(7).get(timeout=30) == 49  # the lane works on


def test_a_caller_held_by_a_paused_operation_learns_of_stop(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    c.pause("ctl_square")
    thread, out = _call_in_thread(lambda: square(1))
    stopper = threading.Thread(target=c.stop)
    stopper.start()
    stopper.join(10)
    thread.join(10)
    assert isinstance(out[0], CoordinatorNotRunning)


def test_the_breaker_opens_and_closes_by_hand(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False, auto_block=True)
    c.guard_house.open("ctl_square")
    assert c.guard_house.breaker_state("ctl_square") == "open"
    with pytest.raises(OperationBlocked, match="opened by the operator"):
        square(1)
    c.guard_house.reset("ctl_square")
    assert square(3).get(timeout=10) == 9


def test_opening_a_breaker_needs_auto_block(one_thread: OperationsCoordinator) -> None:
    with pytest.raises(TokenGateError, match="auto_block=True"):
        one_thread.guard_house.open("ctl_square")


@pytest.mark.parametrize("bad", [None, "", 3])
def test_an_operation_must_be_named(one_thread: OperationsCoordinator, bad: Any) -> None:
    with pytest.raises(ValueError, match="operation must be an operation type name"):
        one_thread.drain(bad)
