"""Priorities: among the tokens queued for one worker, higher priority runs first, FIFO within a
priority. Each test holds the lane's single worker, queues tokens of mixed priority, releases it
and checks the order they ran in (no timing involved)."""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import process_tasks as pt
from conftest import GATE, eventually
from tokengate import ConfigError, OperationsCoordinator, Token, task_token_guard
from tokengate._decorator import TaskFunction

Make = Callable[..., OperationsCoordinator]
SINGLE = {"cores": 1, "workers_per_core": 1, "process_lane": False, "convergence": False}

ran: list[str] = []


@pytest.fixture(autouse=True)
def _clear_ran() -> None:
    ran.clear()


@task_token_guard(operation_type="pr_hold")
def hold(started: threading.Event) -> str:
    started.set()
    assert GATE.wait(30)
    return "held"


@task_token_guard(operation_type="pr_note")
def note(label: str) -> str:
    ran.append(label)
    return label


@task_token_guard(operation_type="pr_urgent", tags={"priority": 10})
def urgent(label: str) -> str:
    ran.append(label)
    return label


@task_token_guard(operation_type="pr_io_hold", tags={"storage_speed": "FAST"})
def io_hold(started: threading.Event) -> str:
    started.set()
    assert GATE.wait(30)
    return "held"


@task_token_guard(operation_type="pr_io_note", tags={"storage_speed": "FAST"})
def io_note(label: str) -> str:
    ran.append(label)
    return label


@task_token_guard(operation_type="pr_async_hold")
async def async_hold(started: threading.Event) -> str:
    started.set()
    await asyncio.get_running_loop().run_in_executor(None, GATE.wait, 30)
    return "held"


@task_token_guard(operation_type="pr_async_note")
async def async_note(label: str) -> str:
    ran.append(label)
    return label


def _held(make: Callable[[threading.Event], Token[str]]) -> Token[str]:
    started = threading.Event()
    token = make(started)
    assert started.wait(30), "the holding task never started"
    return token


def test_higher_priority_runs_first_fifo_within_a_priority(make_coordinator: Make) -> None:
    make_coordinator(**SINGLE)
    held = _held(hold)
    tokens = [
        note("a0"),
        note.options(priority=5)("b5"),
        note("c0"),
        note.options(priority=5)("d5"),
        note.options(priority=9)("e9"),
        note.options(priority=-1)("f-1"),
        note("g0"),
        urgent("h10"),  # the operation's tag
        urgent.options(priority=0)("i0"),  # the call's priority overrides the tag
    ]
    GATE.set()
    assert held.get(timeout=10) == "held"
    labels = ["a0", "b5", "c0", "d5", "e9", "f-1", "g0", "h10", "i0"]
    assert [t.get(timeout=10) for t in tokens] == labels
    assert ran == ["h10", "e9", "b5", "d5", "a0", "c0", "g0", "i0", "f-1"]


def test_without_priorities_the_order_is_fifo(make_coordinator: Make) -> None:
    make_coordinator(**SINGLE)
    held = _held(hold)
    tokens = [note(str(i)) for i in range(6)]
    GATE.set()
    held.get(timeout=10)
    for t in tokens:
        t.get(timeout=10)
    assert ran == [str(i) for i in range(6)]


@task_token_guard(operation_type="pr_hold_other")
def hold_other(started: threading.Event, release: threading.Event) -> str:
    started.set()
    assert release.wait(30)
    return "held"


def test_an_idle_worker_steals_the_highest_priorities_first(make_coordinator: Make) -> None:
    coordinator = make_coordinator(**{**SINGLE, "workers_per_core": 2})
    first = _held(hold)  # worker A, until GATE opens
    release_b = threading.Event()
    second = _held(lambda started: hold_other(started, release_b))  # worker B
    assert coordinator.queue_depths() == {1: [1, 1]}
    priorities = [0, 1, 2, 0, 3, 2, 1, 3]  # routed alternately: A gets even indexes, B odd
    tokens = [note.options(priority=p)(f"{i}p{p}") for i, p in enumerate(priorities)]
    assert coordinator.queue_depths() == {1: [5, 5]}
    release_b.set()  # B runs its own queue, then steals A's from the front: highest first
    eventually(lambda: len(ran) == len(tokens), what="every token to run on worker B")
    assert not first.done()
    GATE.set()
    assert first.get(timeout=10) == second.get(timeout=10) == "held"

    def by_priority(indexes: range) -> list[str]:
        labels = [f"{i}p{priorities[i]}" for i in indexes]
        return sorted(labels, key=lambda label: -int(label.split("p")[1]))

    assert ran == by_priority(range(1, 8, 2)) + by_priority(range(0, 8, 2))
    assert {t.worker for t in tokens} == {second.worker}


def test_priorities_in_the_io_lane(make_coordinator: Make) -> None:
    make_coordinator(**SINGLE, io_workers=1)
    held = _held(io_hold)
    tokens = [io_note("a0"), io_note.options(priority=3)("b3"), io_note("c0")]
    tokens.append(io_note.options(priority=3)("d3"))
    GATE.set()
    held.get(timeout=10)
    for t in tokens:
        t.get(timeout=10)
    assert ran == ["b3", "d3", "a0", "c0"]


def test_priorities_in_the_async_lane(make_coordinator: Make) -> None:
    make_coordinator(**SINGLE, async_concurrency=1)
    held = _held(async_hold)
    tokens = [async_note("a0"), async_note.options(priority=2)("b2"), async_note("c0")]
    GATE.set()
    held.get(timeout=10)
    for t in tokens:
        t.get(timeout=10)
    assert ran == ["b2", "a0", "c0"]


def test_priorities_in_the_process_lane(make_coordinator: Make, tmp_path: Path) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1, process_lane=True)
    assert coordinator.lanes["process"].wait_ready(30)  # type: ignore[attr-defined]
    marker, gate = tmp_path / "running", tmp_path / "open"
    held = pt.hold_until_open(str(marker), str(gate))
    eventually(marker.exists, what="the holding task to start in its worker")
    tokens = [pt.square(1), pt.square.options(priority=4)(2), pt.square(3)]
    tokens.append(pt.square.options(priority=4)(4))
    gate.touch()
    assert held.get(timeout=30) == "released"
    assert [t.get(timeout=30) for t in tokens] == [1, 4, 9, 16]
    by_start = sorted(range(4), key=lambda i: tokens[i].started_at or 0.0)
    assert [i + 1 for i in by_start] == [2, 4, 1, 3]


def test_coordinator_submit_map_and_submit_async_keep_the_call_priority(
    make_coordinator: Make,
) -> None:
    coordinator = make_coordinator(**SINGLE)
    held = _held(hold)
    low = note("low")
    high = coordinator.submit(note.options(priority=1), "submit")

    async def from_asyncio() -> Token[str]:
        return await note.options(priority=2).submit_async("async")

    top = asyncio.run(from_asyncio())
    GATE.set()
    held.get(timeout=10)
    for t in (low, high, top):
        t.get(timeout=10)
    assert ran == ["async", "submit", "low"]
    assert list(note.options(priority=3).map(["m1", "m2"])) == ["m1", "m2"]


class Notes:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @task_token_guard(operation_type="pr_method")
    def note(self, label: str) -> str:
        ran.append(self.prefix + label)
        return label


def test_a_method_keeps_its_instance_and_its_call_priority(make_coordinator: Make) -> None:
    make_coordinator(**SINGLE)
    held = _held(hold)
    notes = Notes("n:")
    tokens = [notes.note("low"), notes.note.options(priority=1)("high")]
    GATE.set()
    held.get(timeout=10)
    assert [t.get(timeout=10) for t in tokens] == ["low", "high"]
    assert ran == ["n:high", "n:low"]


def test_executor_takes_the_priority_tag(make_coordinator: Make) -> None:
    coordinator = make_coordinator(**SINGLE)
    with coordinator.executor(priority=3) as pool:
        assert pool.submit(sum, [1, 2]).result(timeout=10) == 3


@pytest.mark.parametrize("bad", ["high", 1.5, True, None])
def test_a_bad_priority_tag_fails_at_decoration(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"tag 'priority' of 'bad_priority' must be a whole"):

        @task_token_guard(operation_type="bad_priority", tags={"priority": bad})
        def f() -> None: ...


@pytest.mark.parametrize("bad", ["high", 1.5, True])
def test_a_bad_call_priority_fails_at_options(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"options\(priority=...\) must be a whole number"):
        note.options(priority=bad)


def test_options_keeps_the_task_and_pickles_as_the_task() -> None:
    urgent_now = note.options(priority=7)
    assert isinstance(urgent_now, TaskFunction)
    assert urgent_now.spec is note.spec and urgent_now.__wrapped__ is note.__wrapped__
    assert pickle.loads(pickle.dumps(urgent_now)) is note
    assert repr(urgent_now).endswith(".options(priority=7)")
