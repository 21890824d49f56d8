"""What every reliability test checks after its fault: nothing lost, nothing leaked, still serving.

* :class:`Resources` snapshots the threads and child processes alive before a fault; ``leaks()``
  waits (a bounded condition wait, never a fixed sleep) for everything started since to end and
  returns what is still alive.
* :func:`settle` waits for tokens to become terminal and returns how many never did (lost).
* :func:`assert_terminal` checks each token is in exactly one terminal state.
* :func:`serves_new_work` proves the coordinator still runs tokens after the fault.
* :data:`LEDGER` collects the closing note's figures (fault, injections, tokens lost, leaks);
  ``conftest.py`` prints it at the end of the run and writes it to ``$TOKENGATE_FAULT_REPORT``.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from conftest import assert_counts_add_up
from tokengate import OperationsCoordinator, Token, task_token_guard

TERMINAL_STATES = ("resolved", "failed", "discarded")


# -- resources ----------------------------------------------------------------------------------
# multiprocessing's own helpers (started once, living until the interpreter exits) are not
# workers: a forkserver or resource tracker outliving a coordinator is not a leak.
_MP_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def _children() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if _alive(p) and not _is_mp_helper(p)
    }


def _is_mp_helper(process: psutil.Process) -> bool:
    try:
        cmdline = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return any(helper in cmdline for helper in _MP_HELPERS)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# Threads that live as long as the process, started on first need by design (the report of
# failures nobody retrieved): not any coordinator's, so never a leak.
PROCESS_WIDE_THREADS = frozenset({"tokengate-unretrieved"})


def coordinator_threads() -> set[threading.Thread]:
    """The threads alive now, less the process-wide ones."""
    return {t for t in threading.enumerate() if t.name not in PROCESS_WIDE_THREADS}


@dataclass
class Resources:
    """Threads and child processes alive at a moment."""

    threads: set[threading.Thread]
    children: set[int]

    @classmethod
    def now(cls) -> Resources:
        return cls(coordinator_threads(), _children())

    def leaks(self, timeout: float = 10.0) -> list[str]:
        """What started since the snapshot and is still alive after up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            threads = [t for t in coordinator_threads() if t not in self.threads and t.is_alive()]
            children = sorted(_children() - self.children)
            if (not threads and not children) or time.monotonic() > deadline:
                return [f"thread {t.name}" for t in threads] + [f"process {p}" for p in children]
            pause.wait(0.005)


# -- tokens ------------------------------------------------------------------------------------
def settle(tokens: Iterable[Token[Any]], timeout: float = 30.0) -> int:
    """Wait until every token is terminal; return how many are not (tokens lost)."""
    tokens = list(tokens)
    deadline = time.monotonic() + timeout
    for token in tokens:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        concurrent.futures.wait([token], timeout=left)
    return sum(not t.done() for t in tokens)


def assert_terminal(tokens: Sequence[Token[Any]]) -> None:
    """Each token is in exactly one terminal state, consistent across every way of asking."""
    for token in tokens:
        state = token.state
        assert state in TERMINAL_STATES, f"{token!r} is not terminal"
        assert token.done()
        assert token.cancelled() == (state == "discarded"), token
        if state == "discarded":
            assert token.discard_reason, token
        elif state == "failed":
            assert token.exception(0) is not None, token
        else:
            assert token.exception(0) is None, token


def assert_counts_match(coordinator: OperationsCoordinator, tokens: Sequence[Token[Any]]) -> None:
    """The stats add up and agree token by token with what the tokens say."""
    assert_counts_add_up(coordinator)
    snap = coordinator.stats()
    by_state = {s: sum(t.state == s for t in tokens) for s in TERMINAL_STATES}
    assert snap.submitted >= len(tokens), str(snap)
    if snap.submitted == len(tokens):
        assert (snap.resolved, snap.failed, snap.discarded) == (
            by_state["resolved"],
            by_state["failed"],
            by_state["discarded"],
        ), (str(snap), by_state)


@task_token_guard(operation_type="canary", tags={"weight": "light"})
def canary(i: int) -> int:
    return i * 2


@task_token_guard(operation_type="canary_heavy", tags={"weight": "heavy", "executor": "thread"})
def canary_heavy(i: int) -> int:
    return i * 3


def serves_new_work(coordinator: OperationsCoordinator, n: int = 50) -> None:
    """The coordinator still runs tokens of every weight after the fault."""
    assert coordinator.running
    light = [canary(i) for i in range(n)]
    heavy = [canary_heavy(i) for i in range(n)]
    assert [t.get(timeout=30) for t in light] == [i * 2 for i in range(n)]
    assert [t.get(timeout=30) for t in heavy] == [i * 3 for i in range(n)]


# -- interrupts --------------------------------------------------------------------------------
def interrupt_main_when(predicate: Callable[[], bool], timeout: float = 30.0) -> threading.Thread:
    """From a helper thread, deliver a real SIGINT to the main thread once ``predicate()`` holds.

    ``signal.pthread_kill`` (unlike ``_thread.interrupt_main``) interrupts a blocking lock wait,
    so the main thread gets its ``KeyboardInterrupt`` while it waits, as with a real Ctrl-C.
    """
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    main = threading.main_thread().ident
    assert main is not None

    def deliver() -> None:
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while not predicate():
            if time.monotonic() > deadline:
                return  # the test's own wait times out and says so
            pause.wait(0.001)
        signal.pthread_kill(main, signal.SIGINT)

    helper = threading.Thread(target=deliver, name="sigint-helper", daemon=True)
    helper.start()
    return helper


# -- the closing note's figures -----------------------------------------------------------------
@dataclass
class Entry:
    fault: str
    injected: int
    tokens: int
    lost: int
    leaks: int


LEDGER: list[Entry] = []


def record(fault: str, *, injected: int, tokens: int, lost: int, leaks: int) -> None:
    LEDGER.append(Entry(fault, injected, tokens, lost, leaks))


def ledger_table() -> str:
    merged: dict[str, Entry] = {}
    for e in LEDGER:
        m = merged.setdefault(e.fault, Entry(e.fault, 0, 0, 0, 0))
        m.injected += e.injected
        m.tokens += e.tokens
        m.lost += e.lost
        m.leaks += e.leaks
    width = max([len("fault"), *(len(f) for f in merged)])
    lines = [
        f"{'fault':<{width}}  {'injected':>8}  {'tokens':>8}  {'lost':>4}  {'leaks':>5}",
        f"{'-' * width}  {'-' * 8}  {'-' * 8}  {'-' * 4}  {'-' * 5}",
    ]
    for e in merged.values():
        lines.append(
            f"{e.fault:<{width}}  {e.injected:>8}  {e.tokens:>8}  {e.lost:>4}  {e.leaks:>5}"
        )
    return "\n".join(lines)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if not value else int(value)
