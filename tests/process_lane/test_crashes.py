"""A worker that dies or overruns: the failure table (how it died, the error, the message), a
crash retried per policy, no other token lost, an idle death charged to nobody, a task past its
timeout killed, and a proxy whose pipe went out of step retiring its worker. Nothing here sleeps
to wait for a process: tests wait on tokens or on a condition with ``eventually``."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import process_tasks as pt
from conftest import eventually
from tokengate import (
    RetryPolicy,
    TaskTimeout,
    WorkerCrashed,
)
from tokengate.lanes.process import (
    describe_exit,
)

from ._helpers import (
    NO_CRASH_RETRY,
    POSIX_ONLY,
    Make,
    ReplyFault,
    gone,
    lane_of,
)

pytestmark = POSIX_ONLY


@pytest.mark.parametrize(
    ("kill", "error", "fragments"),
    [
        (lambda: pt.exit_hard(3), WorkerCrashed, ["exited with code 3", "os._exit()"]),
        (pt.sigkill_self, WorkerCrashed, ["SIGKILL (signal 9)", "reclaiming memory"]),
        (pt.segfault, WorkerCrashed, ["SIGSEGV", "segmentation fault"]),
        (pt.abort, WorkerCrashed, ["SIGABRT", "abort()"]),
        (pt.memory_hog, MemoryError, []),  # an address-space limit: Python raises, no crash
    ],
    ids=["os._exit", "sigkill", "segfault", "abort", "memory-error"],
)
def test_failure_table(
    procs: Make, kill: Callable[[], Any], error: type[BaseException], fragments: list[str]
) -> None:
    coordinator = procs(workers_per_core=1, retry_policy=NO_CRASH_RETRY)
    lane = lane_of(coordinator)
    before = lane.pids()
    token = kill()
    with pytest.raises(error) as info:
        token.get(timeout=30)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    if error is WorkerCrashed:
        assert token.id in message and repr(token.operation_type) in message
        assert f"{token.worker} (pid " in message and f"core {token.core})" in message
        assert "not retried" in message
        assert coordinator.stats().events["process_restarts"] == 1
        assert lane.wait_ready(30) and lane.pids() != before  # replaced
    assert pt.square(6).get(timeout=30) == 36  # the lane carries on


def test_a_crash_is_retried_per_policy(procs: Make, tmp_path: Path) -> None:
    coordinator = procs(workers_per_core=1, retry_policy=RetryPolicy(crash_retries=1))
    token = pt.crash_once(str(tmp_path / "crashed"))
    assert token.get(timeout=30) == "recovered"
    assert token.attempts == 2
    snap = coordinator.stats()
    assert (snap.retried, snap.events["process_restarts"], snap.events["process_crashes"]) == (
        1,
        1,
        1,
    )


def test_killing_a_busy_worker_loses_no_other_token(procs: Make, tmp_path: Path) -> None:
    coordinator = procs(workers_per_core=1, retry_policy=NO_CRASH_RETRY)
    marker = tmp_path / "pid"
    victim = pt.block_until_killed(str(marker))
    eventually(marker.exists, what="the victim task to start in its worker")
    others = [pt.square(i) for i in range(30)]  # some queue behind the victim
    pid = int(marker.read_text())
    assert pid in lane_of(coordinator).pids()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed) as info:
        victim.get(timeout=30)
    assert "SIGKILL" in str(info.value) and "memory" in str(info.value)
    assert info.value.pid == pid and info.value.exitcode == -signal.SIGKILL  # type: ignore[attr-defined]
    assert [t.get(timeout=30) for t in others] == [i * i for i in range(30)]
    assert all(t.attempts == 1 for t in others)
    eventually(lambda: gone(pid), what="the killed worker to be reaped")


def test_a_worker_killed_while_idle_is_replaced_without_charging_the_next_token(
    procs: Make,
) -> None:
    coordinator = procs(workers_per_core=1, cores=1, retry_policy=NO_CRASH_RETRY)
    (pid,) = lane_of(coordinator).pids()
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: gone(pid), what="the idle worker to die")
    token = pt.whoami()
    assert token.get(timeout=30)["pid"] != pid
    assert token.attempts == 1
    assert coordinator.stats().events["process_idle_deaths"] == 1


@pytest.mark.parametrize("where", ["send", "wait", "read"])
def test_an_error_between_sending_a_call_and_reading_its_reply_retires_the_worker(
    procs: Make, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The proxy raises after a call went out (an OverflowError from the wait, a read cut
    short, a send stopped half-way): the pipe is out of step, and the reply still in it would be
    read as the next task's result. So the worker is retired like a crashed one, only that
    token fails (or is retried), and the next task on the lane gets its own result."""
    fault = ReplyFault(monkeypatch, where)
    coordinator = procs(workers_per_core=1, cores=1, retry_policy=NO_CRASH_RETRY)
    (pid,) = lane_of(coordinator).pids()
    fault.arm()
    victim = pt.square(3)
    error = victim.exception(timeout=20)
    after = [pt.square(4), pt.square(5)]
    assert [t.get(timeout=20) for t in after] == [16, 25]  # not 9: the victim's reply
    assert isinstance(error, WorkerCrashed), repr(error)
    assert f"token {victim.id}" in str(error) and "injected" in str(error)
    assert "killed and replaced" in str(error)
    assert isinstance(error.__cause__, OverflowError if where == "wait" else RuntimeError)
    assert lane_of(coordinator).pids() != [pid]
    assert coordinator.stats().events["process_retired"] == 1
    eventually(lambda: gone(pid), what="the retired worker to be reaped")


def test_a_retired_worker_s_token_is_retried_against_crash_retries(
    procs: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = ReplyFault(monkeypatch, "wait")
    procs(workers_per_core=1, cores=1, retry_policy=RetryPolicy(crash_retries=1, backoff_base=0))
    fault.arm()
    victim = pt.square(3)
    assert victim.get(timeout=20) == 9
    assert victim.attempts == 2
    assert pt.square(4).get(timeout=20) == 16


def test_describe_exit_names_signals_and_codes() -> None:
    assert describe_exit(-9)[0] == "died with SIGKILL (signal 9)"
    assert "memory" in describe_exit(-9)[1]
    assert describe_exit(3) == (
        "exited with code 3",
        describe_exit(4)[1],
    )
    assert describe_exit(-200)[0] == "died with signal 200 (signal 200)"


def test_a_process_task_past_its_timeout_is_killed_and_replaced(procs: Make) -> None:
    coordinator = procs(workers_per_core=1, cores=1)
    (pid,) = lane_of(coordinator).pids()
    token = pt.hangs()
    with pytest.raises(TaskTimeout, match=r"timeout of 0\.3s .*killed and replaced") as info:
        token.get(timeout=30)
    assert isinstance(info.value, TimeoutError)
    eventually(lambda: gone(pid), what="the overrunning worker to be killed")
    assert pt.whoami().get(timeout=30)["pid"] != pid
    assert coordinator.stats().events["process_timeouts"] == 1


def test_a_killed_timeout_may_be_retried(procs: Make, tmp_path: Path) -> None:
    coordinator = procs(workers_per_core=1, cores=1)
    token = pt.hangs_once(str(tmp_path / "hung"))
    assert token.get(timeout=30) != os.getpid()
    assert token.attempts == 2 and coordinator.stats().retried == 1
