"""Faults and bad input in the process lane, through its public API.

Heavy ``executor='process'`` tasks run in ``coordinator.lanes["process"]``,
``lanes["process"].pids()`` lists the worker processes, a worker that dies surfaces as
``tokengate.WorkerCrashed`` (retried per ``RetryPolicy.crash_retries``), a process task's
``timeout`` kills and replaces its worker, and arguments that cannot be pickled raise
``SerializationError`` at submit time. Every test skips, saying so, where the coordinator has
no process lane (a platform without one, or ``process_lane=False``).

After each fault: no token lost, every failed token carries the right error, the lane is back
to its full set of live workers, the coordinator serves new work (thread and process), and after
``stop()`` no worker process is left (the pids seen during the test are all gone, and no child
process other than multiprocessing's own forkserver/resource tracker remains).
"""

from __future__ import annotations

import random
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import eventually
from tokengate import (
    OperationsCoordinator,
    RetryPolicy,
    SerializationError,
    Token,
    WorkerCrashed,
    task_token_guard,
)

from . import _process_tasks as pt
from ._support import (
    Resources,
    assert_counts_match,
    assert_terminal,
    canary,
    record,
    serves_new_work,
    settle,
)

NO_PROCESS_LANE = "this coordinator has no process lane (coordinator.lanes has no 'process')"


class ProcessFixture:
    def __init__(self, coordinator: OperationsCoordinator) -> None:
        self.coordinator = coordinator
        self.lane: Any = coordinator.lanes["process"]
        self.size = len(self.lane.workers)  # processes start in the background: count slots
        self.seen: set[int] = set()
        self.fault: tuple[str, int, int] | None = None  # (name, injected, tokens) for the ledger

    def ledger(self, name: str, *, injected: int, tokens: int) -> None:
        """Record the fault; the fixture adds tokens lost (0, or the test failed) and leaks."""
        self.fault = (name, injected, tokens)

    def pids(self) -> list[int]:
        pids = list(self.lane.pids())
        self.seen.update(pids)
        return pids

    def full_strength(self) -> None:
        """The lane is back to its size, every worker alive (crashed ones were replaced)."""

        def ready() -> bool:
            pids = self.pids()
            return len(pids) == self.size and all(psutil.pid_exists(p) for p in pids)

        eventually(ready, timeout=30, what="the process lane to replace its dead workers")

    def serves(self) -> None:
        serves_new_work(self.coordinator)
        tokens = [pt.work(i) for i in range(20)]
        assert [t.get(timeout=60) for t in tokens] == list(range(20))


@pytest.fixture
def make_process_coordinator(
    resources: Resources,
) -> Iterator[Callable[..., ProcessFixture]]:
    made: list[ProcessFixture] = []

    def make(**options: Any) -> ProcessFixture:
        coordinator = OperationsCoordinator(workers_per_core=1, **options).start()
        if "process" not in coordinator.lanes:
            coordinator.stop()
            pytest.skip(NO_PROCESS_LANE)
        fixture = ProcessFixture(coordinator)
        made.append(fixture)
        wait_ready = getattr(fixture.lane, "wait_ready", None)
        if wait_ready is not None:  # started, not just spawned: a kill then hits a live worker
            assert wait_ready(60)
        fixture.full_strength()  # every worker process up before the fault is injected
        return fixture

    yield make
    for fixture in made:
        fixture.coordinator.stop(cancel_pending=True, timeout=30)
        assert fixture.coordinator.stats().in_flight == 0
    for fixture in made:
        eventually(
            lambda f=fixture: not any(psutil.pid_exists(p) for p in f.seen),  # type: ignore[misc]
            timeout=30,
            what="every worker process to be gone after stop()",
        )
    leaks = resources.leaks(timeout=30)
    for fixture in made:
        if fixture.fault is not None:
            name, injected, tokens = fixture.fault
            record(name, injected=injected, tokens=tokens, lost=0, leaks=len(leaks))
    assert leaks == []


# -- crash table --------------------------------------------------------------------------------
# (what kills the worker, the task, the error when retries are exhausted, what the message must
# say as regular expressions: besides the token and its operation, the signal or exit code, and
# for a SIGKILL the likely cause)
CRASH_CASES: list[tuple[str, Any, type[BaseException], tuple[str, ...]]] = [
    ("sigkill", pt.sigkill_self, WorkerCrashed, (r"SIGKILL|signal 9",)),
    ("os_exit", pt.hard_exit, WorkerCrashed, (r"exit(ed)?\b.*\b3\b",)),
    ("segfault", pt.segfault, WorkerCrashed, (r"SIGSEGV|signal 11",)),
    ("oom_killed", pt.oom_killed, WorkerCrashed, (r"SIGKILL|signal 9", r"memory")),
]


@pytest.mark.parametrize(
    ("task", "error", "fragments"), [pytest.param(t, e, f, id=n) for n, t, e, f in CRASH_CASES]
)
def test_a_crash_fails_only_its_token_when_out_of_crash_retries(
    request: pytest.FixtureRequest,
    make_process_coordinator: Callable[..., ProcessFixture],
    task: Any,
    error: type[BaseException],
    fragments: tuple[str, ...],
) -> None:
    lane = make_process_coordinator(retry_policy=RetryPolicy(crash_retries=0))
    others = [pt.work(i) for i in range(40)]
    crashed = task(7)
    assert [t.get(timeout=60) for t in others] == list(range(40))
    with pytest.raises(error) as info:
        crashed.get(timeout=60)
    message = str(info.value)
    assert crashed.id in message and crashed.operation_type in message, message
    for pattern in fragments:
        assert re.search(pattern, message, re.IGNORECASE), (pattern, message)
    assert crashed.attempts == 1
    lane.full_strength()
    lane.serves()
    assert_counts_match(lane.coordinator, [*others, crashed])
    lane.ledger(f"process_crash_{request.node.callspec.id}", injected=1, tokens=41)


@pytest.mark.parametrize(
    "task", [pytest.param(t, id=n) for n, t, _, _ in CRASH_CASES if n != "segfault"]
)
def test_a_crash_is_retried_per_crash_retries(
    make_process_coordinator: Callable[..., ProcessFixture], task: Any, tmp_path: Path
) -> None:
    lane = make_process_coordinator(retry_policy=RetryPolicy(crash_retries=1, backoff_base=0.0))
    token = task(7, marker=str(tmp_path / "crashed-once"))
    assert token.get(timeout=60) == 7
    assert token.attempts == 2
    assert lane.coordinator.stats().retried == 1
    lane.full_strength()
    lane.serves()
    lane.ledger("process_crash_retried", injected=1, tokens=1)


def test_sigkill_at_random_moments_under_load(
    make_process_coordinator: Callable[..., ProcessFixture],
) -> None:
    """A killer thread SIGKILLs a random worker process at random moments (12 times) while heavy
    process tasks and thread tasks flow: every token resolves, or fails with WorkerCrashed once it
    was hit more often than its crash retries allow; none is lost, and the lane ends at full
    strength.

    The victims include replacements still starting (``pids()`` lists them from their launch):
    about half of the kills land there, and now and then the same slot is shot while starting
    several times in a row. Such a slot is started again after a growing cool-down, never given
    up, so the lane never stays short (``tests/process_lane/test_start_failures.py`` pins the
    cool-down itself deterministically)."""
    lane = make_process_coordinator(retry_policy=RetryPolicy(crash_retries=3, backoff_base=0.0))
    rng = random.Random(8)
    kills = 12
    done = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        pause = threading.Event()
        while len(killed) < kills and not done.is_set():
            pause.wait(rng.uniform(0.02, 0.15))  # when to strike: the fault's timing, not a sync
            pids = lane.pids()
            if pids:
                victim = rng.choice(pids)
                try:
                    psutil.Process(victim).send_signal(signal.SIGKILL)
                    killed.append(victim)
                except psutil.NoSuchProcess:
                    pass

    tokens: list[Token[Any]] = []
    thread = threading.Thread(target=killer, name="killer")
    thread.start()
    try:
        i = 0
        while len(killed) < kills and i < 20_000:  # the load lasts until every kill landed
            for _ in range(200):
                tokens.append(pt.work(i))
                tokens.append(canary(i))
                i += 1
            settle(tokens[-2:], timeout=60)  # keep the load flowing, not piling up
        lost = settle(tokens, timeout=120)
    finally:
        done.set()
        thread.join(30)
    assert lost == 0
    assert len(killed) >= 3, f"only {len(killed)} kills landed"
    assert_terminal(tokens)
    for i, token in enumerate(tokens):
        if token.state == "failed":
            assert isinstance(token.exception(0), WorkerCrashed), token
            assert token.attempts == 4  # 1 + crash_retries
        else:
            assert token.result(0) == (i // 2) * (2 if i % 2 else 1)
    lane.full_strength()
    lane.serves()
    assert_counts_match(lane.coordinator, tokens)
    lane.ledger("process_sigkill_random", injected=len(killed), tokens=len(tokens))


def test_a_task_that_exhausts_memory_fails_with_memoryerror_and_the_worker_lives_on(
    make_process_coordinator: Callable[..., ProcessFixture],
) -> None:
    lane = make_process_coordinator()
    token = pt.exhaust_memory(1)
    with pytest.raises(MemoryError):
        token.get(timeout=120)
    assert token.attempts == 1  # tag retries=0
    lane.full_strength()  # whether the lane recycles that worker is its own choice
    lane.serves()
    lane.ledger("process_memory_exhausted", injected=1, tokens=1)


def test_a_process_task_past_its_timeout_kills_and_replaces_its_worker(
    make_process_coordinator: Callable[..., ProcessFixture],
) -> None:
    lane = make_process_coordinator(retry_policy=RetryPolicy(max_retries=0))
    token = pt.hang_in_process(1)
    with pytest.raises(TimeoutError):  # TaskTimeout is one
        token.get(timeout=60)
    lane.full_strength()
    lane.serves()
    lane.ledger("process_timeout", injected=1, tokens=1)


# -- bad input for the process lane -------------------------------------------------------------
def test_unpicklable_argument_fails_at_submit_and_disturbs_nothing(
    make_process_coordinator: Callable[..., ProcessFixture],
) -> None:
    lane = make_process_coordinator()
    running = [pt.work(i) for i in range(20)]
    with pytest.raises(SerializationError) as info:
        pt.takes_anything(threading.Lock())
    message = str(info.value)
    assert "takes_anything" in message and "lock" in message.lower(), message
    assert [t.get(timeout=60) for t in running] == list(range(20))
    lane.serves()
    assert_counts_match(lane.coordinator, running)


def test_a_coroutine_object_argument_to_a_process_task_is_refused_at_submit(
    make_process_coordinator: Callable[..., ProcessFixture],
) -> None:
    make_process_coordinator()

    async def nothing() -> None:
        pass

    coro = nothing()
    try:
        with pytest.raises(SerializationError, match="coroutine"):
            pt.takes_anything(coro)
    finally:
        coro.close()


def test_unpicklable_result_fails_its_token_and_disturbs_nothing(
    make_process_coordinator: Callable[..., ProcessFixture],
) -> None:
    lane = make_process_coordinator()
    token = pt.unpicklable_result(1)
    with pytest.raises(SerializationError) as info:
        token.get(timeout=60)
    assert "unpicklable_result" in str(info.value)
    lane.full_strength()
    lane.serves()


def _nested_task() -> Any:
    @task_token_guard(operation_type="proc_nested", tags=pt.HEAVY)
    def nested(x: int) -> int:
        return x + 1

    return nested


@pytest.mark.parametrize(
    "make_task",
    [
        pytest.param(
            lambda: task_token_guard("proc_lambda", pt.HEAVY)(lambda x: x + 1), id="lambda"
        ),
        pytest.param(_nested_task, id="nested_function"),
    ],
)
def test_a_lambda_or_nested_function_for_the_process_lane(
    make_process_coordinator: Callable[..., ProcessFixture], make_task: Callable[[], Any]
) -> None:
    """The process lane's documented choice (docs/guide/executors.md): lambdas and functions
    defined inside functions go to the worker by value, so they run there like module-level ones.
    """
    lane = make_process_coordinator()
    token = make_task()(41)
    assert token.get(timeout=60) == 42
    assert token.lane == "process"
    lane.serves()
