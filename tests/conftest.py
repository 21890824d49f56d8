"""Shared fixtures: a coordinator that is always stopped, a bounded condition wait, and the
gate that gated test tasks wait on."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tokengate import OperationsCoordinator, Topology

#: The gate that gated test tasks wait on (``assert GATE.wait(30)``); a test opens it with
#: ``GATE.set()``. ``_close_the_gate`` closes it before every test and opens it after, pass or
#: fail, so a failed test never leaves a worker blocked behind it.
GATE = threading.Event()


@pytest.fixture(autouse=True)
def _close_the_gate() -> Iterator[None]:
    GATE.clear()
    yield
    GATE.set()


# A run started in the background by a shell without job control inherits SIGINT ignored. The
# Ctrl-C tests deliver a real SIGINT (to this process, or to child interpreters, which inherit an
# ignored signal but not a handler): give the run Python's own handler, as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: Tests that ended with another SIGINT handler than they began with (listed at the end).
_SIGINT_LEFT_BEHIND: list[str] = []


@pytest.fixture(autouse=True)
def _sigint_handler_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """Put back the SIGINT handler a test began with. The Ctrl-C tests deliver a real SIGINT and
    need Python's own handler: one left behind by an earlier test (or a library it ran) would
    turn every one of them into a hang. The end of the run names any test that left one."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        _SIGINT_LEFT_BEHIND.append(f"{request.node.nodeid}: {after!r}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SIGINT_LEFT_BEHIND:
        terminalreporter.section("tests that left a SIGINT handler behind (put back)")
        for line in _SIGINT_LEFT_BEHIND:
            terminalreporter.write_line(line)


def run_script(script: Path) -> str:
    """Run ``script`` as a program of its own (its ``__main__``, its folder as the working
    directory) and return what it printed; fail with its stderr if it did not exit 0."""
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=script.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_code(code: str, *args: str, timeout: float = 50) -> str:
    """Run ``python -c code args`` in a fresh interpreter and return what it printed; fail with
    its stderr if it did not exit 0. For process-wide state (interpreter exit, fork, imports)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class Counted:
    """A generator of ``0..n-1`` that counts how many items were pulled from it (how far a
    lazy map has read ahead of the results it handed over)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            self.pulled += 1
            yield i


def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait until ``predicate()`` holds (a condition, not a fixed delay); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        pause.wait(0.002)


def assert_counts_add_up(coordinator: OperationsCoordinator) -> None:
    """Nothing is lost: no token is still in flight, and every submitted one ended resolved,
    failed or discarded."""
    snap = coordinator.stats()
    assert snap.in_flight == 0, str(snap)
    assert snap.submitted == snap.resolved + snap.failed + snap.discarded, str(snap)


#: ``COORDINATOR_DEFAULTS`` for a module whose tests pass threading objects to heavy tasks, which
#: the process lane cannot pickle: they test thread-lane behaviour, so heavy work stays on threads
#: there (tests/process_lane/ covers processes).
HEAVY_ON_THREADS = {"process_lane": False}


@pytest.fixture
def make_coordinator(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., OperationsCoordinator]]:
    """Build and start coordinators; every one is stopped and its counts checked at teardown.

    A test module may set ``COORDINATOR_DEFAULTS``, e.g. to ``HEAVY_ON_THREADS``.
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
def one_worker(make_coordinator: Callable[..., OperationsCoordinator]) -> OperationsCoordinator:
    """A started coordinator with a single worker (one core, one worker per core): tokens run one
    at a time, in the order they reach it."""
    return make_coordinator(workers_per_core=1, cores=1)


@pytest.fixture
def eight_cores() -> Topology:
    """The Quick-Proof's 8-core machine; pinning to CPUs this machine lacks fails softly
    (logged)."""
    return Topology(physical_cores=8, logical_cores=8, available_cpus=tuple(range(8)))
