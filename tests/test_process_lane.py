"""The process lane (issue 3): routing by executor, warm pinned worker processes, pickling,
remote errors, crashes, timeouts, stop and orphans, and chains across lanes.

Worker processes import the tasks from ``process_tasks`` (tests/ is on ``sys.path``, which the
workers inherit), and the seed's Proof 1 tasks from ``tokengate.demos.cpu``. Nothing here sleeps
to wait for a process: tests wait on tokens with ``get(timeout=...)`` or on a condition with
``eventually``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import process_tasks as pt
from conftest import assert_counts_add_up, eventually, run_script
from tokengate import (
    ConfigError,
    DependencyFailed,
    OperationsCoordinator,
    RetryPolicy,
    SerializationError,
    TaskSpec,
    TaskTimeout,
    TokenDiscarded,
    WorkerCrashed,
    task_token_guard,
)
from tokengate._limits import MAX_WAIT_SECONDS
from tokengate.demos.cpu import heavy_operation
from tokengate.lanes import _process
from tokengate.lanes._process import describe_exit, runs_in_process
from tokengate.lanes._wire import RemoteTraceback

Make = Callable[..., OperationsCoordinator]
NO_CRASH_RETRY = RetryPolicy(crash_retries=0, max_retries=0)

pytestmark = pytest.mark.skipif(
    not _process.process_lane_supported(), reason="worker processes need POSIX"
)


@pytest.fixture
def procs(make_coordinator: Make) -> Callable[..., OperationsCoordinator]:
    """A started coordinator whose worker processes are ready."""

    def make(**options: Any) -> OperationsCoordinator:
        coordinator = make_coordinator(**options)
        assert coordinator.lanes["process"].wait_ready(30)  # type: ignore[attr-defined]
        return coordinator

    return make


def lane_of(coordinator: OperationsCoordinator) -> Any:
    return coordinator.lanes["process"]


def own_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    """Every test leaves no worker process of its own behind."""
    before = own_children()
    yield
    eventually(lambda: own_children() <= before, timeout=10, what="worker processes to exit")


# -- the routing rule ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tags", "is_async", "gil", "expected"),
    [
        ({"weight": "heavy"}, False, True, True),
        ({"weight": "heavy"}, False, False, False),  # free-threaded: threads run in parallel
        ({"weight": "heavy", "storage_speed": "FAST"}, False, True, False),  # I/O: threads
        ({"weight": "medium"}, False, True, False),
        ({"weight": "light"}, False, True, False),
        ({"weight": "heavy", "executor": "thread"}, False, True, False),
        ({"weight": "light", "executor": "process"}, False, True, True),
        ({"weight": "light", "executor": "process"}, False, False, True),
        ({"weight": "heavy", "storage_speed": "SLOW", "executor": "process"}, False, True, True),
        ({"weight": "heavy"}, True, True, False),  # async functions never leave the loop
    ],
)
def test_executor_routing_rule(
    tags: dict[str, Any], is_async: bool, gil: bool, expected: bool
) -> None:
    spec = TaskSpec.from_tags("op", tags, is_async=is_async)
    assert runs_in_process(spec, gil=gil) is expected


def test_auto_heavy_tasks_go_to_processes_and_the_rest_to_threads(procs: Make) -> None:
    procs(workers_per_core=1)
    heavy, light, tier, forced = pt.whoami(), pt.light_double(2), pt.slow_io(), pt.thread_heavy()
    assert heavy.get(timeout=30)["pid"] != os.getpid()
    assert (light.get(timeout=10), tier.get(timeout=10), forced.get(timeout=10)) == (
        4,
        "io",
        os.getpid(),
    )
    assert heavy.lane == "process" and re.fullmatch(r"process_\d+_core_\d+", heavy.worker or "")
    assert {light.lane, forced.lane} == {"thread"}
    assert tier.lane == "io"  # a storage-tier task is I/O: the tier's own thread pool


def test_free_threaded_build_keeps_auto_tasks_on_threads(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tokengate._coordinator.gil_enabled", lambda: False)
    make_coordinator(workers_per_core=1)
    assert pt.whoami().get(timeout=10)["pid"] == os.getpid()
    assert pt.slow_io_process().get(timeout=30) != os.getpid()  # explicit 'process' still is


def test_process_lane_false_runs_everything_on_threads(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = make_coordinator(workers_per_core=1, process_lane=False)
    assert "process" not in coordinator.lanes
    assert pt.whoami().get(timeout=10)["pid"] == os.getpid()
    with caplog.at_level(logging.WARNING, logger="tokengate.coordinator"):
        for _ in range(3):
            assert pt.slow_io_process().get(timeout=10) == os.getpid()
    warnings = [r for r in caplog.records if "executor='process'" in r.getMessage()]
    assert len(warnings) == 1  # said once per operation, not per call


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_process_lane_option_is_validated(bad: Any) -> None:
    with pytest.raises(ConfigError, match="process_lane must be True, False or None"):
        OperationsCoordinator(process_lane=bad)


def test_process_lane_true_where_unsupported_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_process, "process_lane_supported", lambda: False)
    with pytest.raises(ConfigError, match="not supported"):
        OperationsCoordinator(process_lane=True)


# -- workers ---------------------------------------------------------------------------------------
def test_one_pinned_worker_process_per_core_kept_warm(procs: Make) -> None:
    coordinator = procs(workers_per_core=2)
    lane = lane_of(coordinator)
    pids = lane.pids()
    assert len(lane.workers) == coordinator.core_count == len(set(pids))
    assert all(len(workers) == 1 for workers in lane.by_core.values())
    tokens = [pt.whoami() for _ in range(40)]
    for token in tokens:
        info = token.get(timeout=30)
        assert info["pid"] in pids and info["ppid"] == os.getpid()
        cpu = coordinator.topology.cpu_for_core(token.core or 0)
        assert info["cpus"] == [cpu]  # pinned to its core's CPU
    assert lane.pids() == pids  # the same warm processes served every task
    assert {t.core for t in tokens} <= set(coordinator.affinity.allowed("heavy"))


def test_a_worker_process_boots_without_the_coordinator_stack() -> None:
    """Start-up (B2's figure) is mostly the worker's imports: it needs the decorator and the
    wire format, not the coordinator, observability or asyncio (the package is lazy)."""
    probe = (
        "import sys, tokengate.lanes._process_child; "
        "print(sorted(m for m in ('asyncio', 'tokengate._coordinator', 'tokengate.observability',"
        " 'psutil') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_routing_log_and_worker_lines_for_process_workers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with OperationsCoordinator(workers_per_core=1, verbose=True) as coordinator:
        token = pt.square(3)
        assert token.get(timeout=30) == 9
        assert lane_of(coordinator).wait_ready(30)
    out = capsys.readouterr().out
    assert re.search(
        rf"\[ROUTING\] Token {token.id} \(heavy\) → Pos \d+ \(Core \d, Worker \d\)", out
    )
    assert re.search(r"\[process_0_core_1\] Started on Core 1 \(pid \d+\)", out), out
    assert "[process_0_core_1] Stopped" in out
    assert f"✓ Completed {token.id}" in out


def test_queue_depths_and_cancel_in_the_process_lane(procs: Make, tmp_path: Path) -> None:
    coordinator = procs(workers_per_core=1, cores=1, retry_policy=NO_CRASH_RETRY)
    marker = tmp_path / "running"
    running = pt.block_until_killed(str(marker))
    eventually(marker.exists, what="the blocking task to start in its worker")
    queued = [pt.square(i) for i in range(3)]
    assert coordinator.queue_depths("process") == {1: [4]}
    assert queued[1].cancel() and queued[1].state == "discarded"
    os.kill(int(marker.read_text()), signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        running.get(timeout=30)
    assert [queued[0].get(timeout=30), queued[2].get(timeout=30)] == [0, 4]
    with pytest.raises(TokenDiscarded):
        queued[1].get(timeout=1)


def test_an_idle_worker_takes_tokens_queued_behind_a_busy_one(procs: Make, tmp_path: Path) -> None:
    coordinator = procs(workers_per_core=1, retry_policy=NO_CRASH_RETRY)
    if coordinator.core_count < 2:
        pytest.skip("needs two cores")
    markers = [tmp_path / "first", tmp_path / "second"]
    first = pt.block_until_killed(str(markers[0]))
    eventually(markers[0].exists, what="the first blocking task to start")
    second = pt.block_until_killed(str(markers[1]))  # the least-loaded worker: the other one
    eventually(markers[1].exists, what="the second blocking task to start")
    tokens = [pt.square(i) for i in range(10)]  # queued behind both, half each
    assert sorted(len(q) for q in coordinator.queue_depths("process").values()) == [1, 1]
    assert sorted(sum(q) for q in coordinator.queue_depths("process").values()) == [6, 6]
    os.kill(int(markers[1].read_text()), signal.SIGKILL)  # frees one worker (after a restart)
    with pytest.raises(WorkerCrashed):
        second.get(timeout=30)
    assert [t.get(timeout=30) for t in tokens] == [i * i for i in range(10)]
    assert not first.done()  # the first worker is still held: its queue was taken over
    assert {t.core for t in tokens} == {second.core}
    assert coordinator.stats().events["process_steals"] == 5
    os.kill(int(markers[0].read_text()), signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        first.get(timeout=30)


def test_an_idle_worker_never_takes_a_token_its_core_may_not_run(
    procs: Make, tmp_path: Path
) -> None:
    coordinator = procs(workers_per_core=1, retry_policy=NO_CRASH_RETRY)
    light_cores = coordinator.affinity.allowed("light")
    if coordinator.core_count < 2 or len(light_cores) != 1:
        pytest.skip("needs a core that light tasks may not use")
    (light_core,) = light_cores
    marker = tmp_path / "pid"
    busy = pt.block_light(str(marker))
    eventually(marker.exists, what="the blocking task to start")
    queued = [pt.light_square(i) for i in range(3)]
    assert pt.square(2).get(timeout=30) == 4  # wakes another worker, which looks for work
    assert coordinator.queue_depths("process")[light_core] == [4]  # nothing was taken
    os.kill(int(marker.read_text()), signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        busy.get(timeout=30)
    assert [t.get(timeout=30) for t in queued] == [0, 1, 4]
    assert {t.core for t in queued} == {light_core}


# -- serialization ---------------------------------------------------------------------------------
def test_unpicklable_argument_raises_at_the_call_and_is_never_counted(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    lock = threading.Lock()
    with pytest.raises(SerializationError) as info:
        pt.length(lock)
    message = str(info.value)
    assert "length (operation 'length')" in message
    assert "argument 1" in message and "_thread.lock" in message
    with pytest.raises(SerializationError, match=r"argument 1\[2\] .*_thread\.lock"):
        pt.length([1, 2, lock])
    with pytest.raises(SerializationError, match=r"keyword argument 'fn'.*_thread\.lock"):
        pt.apply(fn=lock)  # type: ignore[call-arg]
    snap = coordinator.stats()
    assert snap.submitted == 0  # nothing was submitted, nothing discarded
    assert pt.length([1, 2, 3]).get(timeout=30) == 3


def test_unpicklable_result_fails_the_token_naming_function_and_type(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    token = pt.returns_lock()
    with pytest.raises(SerializationError, match=r"'returns_lock' returned a _thread\.lock"):
        token.get(timeout=30)
    assert coordinator.stats().failed == 1
    assert pt.square(5).get(timeout=30) == 25  # the worker is fine


def test_dependency_resolved_to_an_unpicklable_value_fails_that_token(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    token = pt.length(pt.light_lock())  # pickled only once the thread task has a value
    with pytest.raises(SerializationError, match=r"argument 1\[0\] .*_thread\.lock"):
        token.get(timeout=30)
    snap = coordinator.stats()
    assert (snap.resolved, snap.failed) == (1, 1)


def test_lambdas_and_local_tasks_travel_by_value(procs: Make) -> None:
    procs(workers_per_core=1)
    assert pt.apply(lambda x, y: x * y, 6, 7).get(timeout=30) == 42
    offset = 100

    @task_token_guard(operation_type="local_task", tags={"weight": "heavy"})
    def local_task(x: int) -> tuple[int, int]:
        return x + offset, os.getpid()

    value, pid = local_task(1).get(timeout=30)
    assert value == 101 and pid != os.getpid()


def test_a_function_that_cannot_be_pickled_is_refused_at_the_call(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    lock = threading.Lock()

    @task_token_guard(operation_type="holds_lock", tags={"weight": "heavy"})
    def holds_lock() -> bool:
        return lock.locked()

    with pytest.raises(SerializationError, match=r"cannot send the function .*holds_lock"):
        holds_lock()
    assert coordinator.stats().submitted == 0


# -- errors ----------------------------------------------------------------------------------------
def test_exception_keeps_its_type_and_the_remote_traceback(procs: Make) -> None:
    procs(workers_per_core=1)
    with pytest.raises(ValueError, match="boom") as info:
        pt.raises_value_error("boom").get(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback (most recent call last)" in cause.tb
    assert "process_tasks.py" in cause.tb and "in raises_value_error" in cause.tb
    assert "raise ValueError(message)" in cause.tb  # the source line, read in the worker
    assert "_process_child" not in cause.tb  # starts at the task's own frame


def test_an_exception_that_cannot_be_unpickled_arrives_as_serialization_error(
    procs: Make,
) -> None:
    procs(workers_per_core=1)
    with pytest.raises(SerializationError, match=r"raised process_tasks\.NeedsTwoArgs: 7: odd"):
        pt.raises_odd_error().get(timeout=30)


# -- inside a worker process -----------------------------------------------------------------------
def test_decorated_calls_inside_a_worker_run_inline(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    probe = pt.inline_probe().get(timeout=30)
    assert probe == {
        "is_token": True,
        "done_at_once": True,
        "value": 49,
        "lane": "inline",
        "failed_type": "ValueError",
        "chained": 50,
        "mapped": [1, 4, 9],
    }
    assert coordinator.stats().submitted == 1  # the inner calls never came back to the parent


def test_nested_heavy_tasks_never_deadlock(procs: Make) -> None:
    procs(workers_per_core=1)
    assert pt.nested_fib(15).get(timeout=60) == 610


# -- chains and nesting across lanes ---------------------------------------------------------------
def test_chains_cross_lanes(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    assert pt.light_double(pt.square(4)).get(timeout=30) == 32  # process -> thread
    assert pt.square(pt.light_double(3)).get(timeout=30) == 36  # thread -> process
    assert pt.total([pt.square(2), pt.square(3)], {"x": pt.light_double(1)}).get(timeout=30) == 15
    assert pt.light_waits_on_heavy(5).get(timeout=30) == 26  # a thread blocks on a process
    failed = pt.square(pt.raises_value_error("first"))  # type: ignore[arg-type]
    with pytest.raises(DependencyFailed) as info:
        failed.get(timeout=30)
    assert isinstance(info.value.__cause__, ValueError)
    assert failed.attempts == 0
    assert coordinator.stats().failed == 2


@pytest.mark.parametrize("workers_per_core", [1, 2])
def test_b7_style_fan_out_with_process_leaves_never_deadlocks(
    procs: Make, workers_per_core: int
) -> None:
    coordinator = procs(workers_per_core=workers_per_core)
    assert pt.light_fib(9).get(timeout=60) == 34
    snap = coordinator.stats()
    assert snap.operations["square"].resolved == 55  # one process leaf per fib(0)/fib(1) node


def test_a_storage_tier_still_applies_in_the_process_lane(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    pids = {pt.slow_io_process().get(timeout=30) for _ in range(4)}
    assert os.getpid() not in pids
    assert coordinator.tier_stats()["SLOW"].high_water >= 1


# -- crashes ---------------------------------------------------------------------------------------
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


def test_the_longest_timeout_and_deadline_allowed_work_on_every_lane(procs: Make) -> None:
    """``MAX_WAIT_SECONDS`` is one limit every lane can wait for: the process lane's ``poll()``,
    the timer thread (thread lane), ``asyncio.timeout`` (async lane)."""
    assert pt.LONGEST == {"timeout": MAX_WAIT_SECONDS, "deadline": MAX_WAIT_SECONDS}

    @task_token_guard(operation_type="longest_thread", tags={"executor": "thread", **pt.LONGEST})
    def on_a_thread(x: int) -> int:
        return x + 2

    @task_token_guard(operation_type="longest_async", tags=pt.LONGEST)
    async def on_the_loop(x: int) -> int:
        return x + 3

    coordinator = procs(workers_per_core=1)
    tokens = [pt.longest_waits(1), on_a_thread(1), on_the_loop(1)]
    assert [t.get(timeout=30) for t in tokens] == [2, 3, 4]
    assert [t.lane for t in tokens] == ["process", "thread", "async"]
    assert_counts_add_up(coordinator)


class ReplyFault:
    """Makes the proxy thread raise once, between sending the next call and reading its whole
    reply, at one of three points: ``send`` (half the call written), ``wait`` (the wait for the
    reply) or ``read`` (part of the reply read). ``arm()`` sets it for the next call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
        self.where = where
        self.armed = False
        fault = self
        real_send = _process._wire.send

        def send(fd: int, buffers: list[bytes]) -> None:
            if fault.fire("send"):
                data = b"".join(buffers)
                os.write(fd, len(data).to_bytes(8, "big") + data[: len(data) // 2])
                raise RuntimeError("injected: the send stopped half-way")
            real_send(fd, buffers)

        class Child(_process._Child):  # type: ignore[name-defined,misc]
            def wait(self, timeout: float | None) -> str:
                if self.ready and fault.fire("wait"):  # not the start-up handshake
                    raise OverflowError("injected: timeout is too large")
                event: str = super().wait(timeout)
                if event == "reply" and self.ready and fault.fire("read"):
                    os.read(self.results, 3)
                    raise RuntimeError("injected: the read stopped part-way")
                return event

        monkeypatch.setattr(_process._wire, "send", send)
        monkeypatch.setattr(_process, "_Child", Child)

    def arm(self) -> None:
        self.armed = True

    def fire(self, where: str) -> bool:
        if self.armed and where == self.where:
            self.armed = False
            return True
        return False


@pytest.mark.parametrize("where", ["send", "wait", "read"])
def test_an_error_between_sending_a_call_and_reading_its_reply_retires_the_worker(
    procs: Make, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The proxy raises after a call went out (an OverflowError from the wait, a read cut
    short, a send stopped half-way): the pipe is out of step, and the reply still in it used to
    be read as the next task's result. The worker is now retired like a crashed one, only that
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


# -- starts that fail: a cool-down, never given up -----------------------------------------------
@pytest.fixture
def quick_cool_down(monkeypatch: pytest.MonkeyPatch) -> tuple[float, float]:
    """Cool-downs of milliseconds (the schedule's shape is what is tested, not its seconds)."""
    base, cap = 0.001, 0.004
    monkeypatch.setattr(_process, "_RESTART_DELAY_BASE", base)
    monkeypatch.setattr(_process, "_RESTART_DELAY_CAP", cap)
    return base, cap


def start_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "tokengate.process" and "next attempt in" in r.getMessage()
    ]


def test_restart_delay_doubles_from_the_second_retry_up_to_its_cap() -> None:
    delays = [_process.restart_delay(n, base=0.1, cap=10.0) for n in range(1, 12)]
    assert delays == pytest.approx([0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10, 10, 10])
    assert _process.restart_delay(10_000) == _process._RESTART_DELAY_CAP  # no overflow


class StartGate:
    """Makes the worker slot on one proxy thread fail to launch (``OSError``) while ``failing``;
    ``wait_for(n)`` blocks until it has failed ``n`` times (a condition, not a delay)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, thread: str, error: OSError) -> None:
        self.thread, self.error = thread, error
        self.failing = True
        self.count = 0
        self.cond = threading.Condition()
        real = _process._Child
        gate = self

        class Child(real):  # type: ignore[valid-type,misc]
            def __init__(self, cpu: int | None) -> None:
                if gate.failing and threading.current_thread().name == gate.thread:
                    with gate.cond:
                        gate.count += 1
                        gate.cond.notify_all()
                    raise gate.error
                super().__init__(cpu)

        monkeypatch.setattr(_process, "_Child", Child)

    def wait_for(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= n, timeout=30), self.count


def test_a_worker_killed_while_starting_again_and_again_is_started_after_a_cool_down(
    make_coordinator: Make,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    quick_cool_down: tuple[float, float],
) -> None:
    """Five SIGKILLs in a row while starting (more than the 3 that used to abandon the slot):
    each is followed by a longer cool-down, logged at WARNING; the token sent meanwhile waits
    and runs on the first worker that comes up, charged nothing."""
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    die_first = textwrap.dedent(
        f"""\
        import os, signal
        if len(os.listdir({str(deaths)!r})) < 5:
            open(os.path.join({str(deaths)!r}, str(os.getpid())), "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    monkeypatch.setattr(_process, "_BOOTSTRAP", die_first + _process._BOOTSTRAP)
    caplog.set_level(logging.WARNING, logger="tokengate.process")
    coordinator = make_coordinator(workers_per_core=1, cores=1, retry_policy=NO_CRASH_RETRY)
    token = pt.whoami()  # sent while the slot fails to start
    assert token.get(timeout=30)["pid"] != os.getpid()
    assert token.attempts == 1 and token.state == "resolved"
    assert len(os.listdir(deaths)) == 5
    lane = lane_of(coordinator)
    (worker,) = lane.workers
    assert worker.broken is None and lane.wait_ready(0)
    assert coordinator.stats().events["process_start_failures"] == 5
    records = start_failures(caplog)
    base, cap = quick_cool_down
    assert [r.levelno for r in records] == [logging.WARNING] * 5
    assert [r.args[-1] for r in records] == pytest.approx(  # type: ignore[index]
        [0, base, 2 * base, cap, cap]
    )
    assert all("died with SIGKILL (signal 9) while starting" in r.getMessage() for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("error", "broken"),
    [
        pytest.param(OSError(11, "injected: resource temporarily unavailable"), False, id="EAGAIN"),
        pytest.param(FileNotFoundError(2, "injected: no such interpreter"), True, id="setup"),
    ],
)
def test_tokens_for_a_slot_that_cannot_start_go_to_a_live_sibling_while_it_keeps_trying(
    make_coordinator: Make,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    quick_cool_down: tuple[float, float],
    tmp_path: Path,
    error: OSError,
    broken: bool,
) -> None:
    """The preferred worker (core 1) cannot launch its process. It goes on trying well past the
    3 attempts that used to end it. Meanwhile the heavy tokens routed to it (the least loaded)
    run on its sibling: an idle sibling is woken to take them; a busy one takes them when it is
    free (while the failure may pass, EAGAIN) or is handed them at once (a setup failure: the
    slot is ``broken``). Once a launch works again the slot is back."""
    gate = StartGate(monkeypatch, "tokengate-process_0_core_1", error)
    caplog.set_level(logging.WARNING, logger="tokengate.process")
    coordinator = make_coordinator(workers_per_core=1, retry_policy=NO_CRASH_RETRY)
    if coordinator.core_count < 2:
        pytest.skip("needs two cores")
    lane = lane_of(coordinator)
    failing, live = lane.workers
    assert failing.name == "process_0_core_1"
    assert live.ready.wait(30)
    gate.wait_for(6)  # still trying, past the 3 that used to end it
    eventually(lambda: (failing.broken is not None) == broken, what="the slot's state")
    # Hold the slot in one long cool-down, the sibling asleep: only the tokens' arrival may
    # wake it (no failure does in between).
    monkeypatch.setattr(_process, "_RESTART_DELAY_BASE", 3600.0)
    monkeypatch.setattr(_process, "_RESTART_DELAY_CAP", 3600.0)
    eventually(lambda: failing._next_start > time.monotonic() + 60, what="a long cool-down")
    eventually(lambda: live.sleeping, what="the live worker to sleep")
    for i in range(10):  # one at a time: each finds both mailboxes empty, so goes to core 1
        token = pt.square(i)
        assert token.get(timeout=10) == i * i
        assert (token.worker, token.attempts) == (live.name, 1)
    events = coordinator.stats().events
    assert events.get("process_steals", 0) + events.get("process_handovers", 0) == 10
    # The sibling busy: a token routed to the failing slot waits there (EAGAIN), or is handed
    # over at once (broken); either way it runs on the sibling once that is free.
    marker = tmp_path / "running"
    blocker = pt.block_until_killed(str(marker))
    eventually(marker.exists, what="the sibling to be busy")
    token = pt.square(11)
    where = live if broken else failing
    eventually(lambda: token in where.mailbox, what=f"the token to be queued at {where.name}")
    assert not token.done()
    os.kill(int(marker.read_text()), signal.SIGKILL)  # frees the sibling (after its restart)
    with pytest.raises(WorkerCrashed):
        blocker.get(timeout=30)
    assert token.get(timeout=30) == 121 and token.worker == live.name
    assert ("process_handovers" in coordinator.stats().events) == broken
    assert failing.pid is None and failing.thread.is_alive()
    # The cause goes away; end the cool-down early (as its timer would) and the slot is back.
    gate.failing = False
    monkeypatch.undo()
    failing._next_start = 0.0
    failing.wake()
    eventually(lambda: lane.wait_ready(0), timeout=30, what="the next attempt to launch it")
    assert failing.broken is None and len(lane.pids()) == 2
    assert pt.square(12).get(timeout=30) == 144
    messages = [r.getMessage() for r in start_failures(caplog)]
    assert all("could not be launched" in m and "injected" in m for m in messages)
    assert any("failed to start 3 times in a row" in m for m in messages) == broken


def test_a_worker_that_cannot_import_tokengate_fails_tokens_loudly_but_is_not_given_up(
    make_coordinator: Make,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    quick_cool_down: tuple[float, float],
) -> None:
    """A setup failure (the worker says it cannot import tokengate) is reported at once to the
    tokens no live worker can take, instead of letting them wait for ever; the slot still
    retries, so once the cause is fixed the lane recovers on its own."""
    original = _process._BOOTSTRAP
    monkeypatch.setattr(
        _process,
        "_BOOTSTRAP",
        original.replace("tokengate.lanes._process_child", "tokengate.no_such_module"),
    )
    coordinator = make_coordinator(
        workers_per_core=1, cores=1, retry_policy=RetryPolicy(crash_retries=0)
    )
    lane = lane_of(coordinator)
    assert not lane.wait_ready(30)
    with pytest.raises(WorkerCrashed, match=r"(?s)failed to start \d+ times in a row.*No module"):
        pt.square(2).get(timeout=30)
    assert "failed to start 3 times in a row" in caplog.text
    monkeypatch.setattr(_process, "_BOOTSTRAP", original)  # the environment is fixed
    eventually(lambda: lane.wait_ready(0), timeout=30, what="the slot to recover")
    assert pt.square(3).get(timeout=30) == 9


# -- timeouts --------------------------------------------------------------------------------------
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


# -- stop and orphans ------------------------------------------------------------------------------
def test_stop_shuts_every_worker_process_down() -> None:
    before = own_children()
    coordinator = OperationsCoordinator(workers_per_core=1).start()
    lane = lane_of(coordinator)
    assert lane.wait_ready(30)
    pids = lane.pids()
    assert set(pids) <= own_children() - before
    assert pt.square(3).get(timeout=30) == 9
    coordinator.stop()
    assert all(gone(pid) for pid in pids)
    assert own_children() <= before


def test_stop_right_after_start_does_not_wait_for_workers_to_boot() -> None:
    before = own_children()
    OperationsCoordinator(workers_per_core=1).start().stop()
    assert own_children() <= before


def test_stop_with_cancel_pending_discards_queued_process_tokens(tmp_path: Path) -> None:
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
    marker = tmp_path / "pid"
    running = pt.block_until_killed(str(marker), 0.5)  # ends on its own after 0.5 s
    eventually(marker.exists, what="the task to start")
    queued = [pt.square(i) for i in range(5)]
    coordinator.stop(cancel_pending=True)
    assert running.get(timeout=1) == "not killed"  # what had started finished
    assert {t.state for t in queued} == {"discarded"}
    assert {t.discard_reason for t in queued} == {"stopped"}
    assert running._payload is None  # the pickled call is let go once the token ended
    assert_counts_add_up(coordinator)


def test_stop_kills_a_worker_still_running_when_it_gives_up(tmp_path: Path) -> None:
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
    marker = tmp_path / "pid"
    token = pt.block_until_killed(str(marker))
    eventually(marker.exists, what="the task to start")
    coordinator.stop(timeout=0.1)
    with pytest.raises(TaskTimeout, match="when stop"):
        token.get(timeout=1)
    assert gone(int(marker.read_text()))
    assert_counts_add_up(coordinator)


PARENT_SCRIPT = """
import sys
from tokengate import OperationsCoordinator
from tokengate.lanes import _process
from process_tasks import square

if sys.argv[2] == "lifeline":  # the portable path, as on macOS: no PR_SET_PDEATHSIG
    _process.USE_PDEATHSIG, _process.USE_LIFELINE = False, True

coordinator = OperationsCoordinator(workers_per_core=1).start()
assert square(4).get(timeout=30) == 16
print(*coordinator.lanes["process"].pids(), flush=True)
if sys.argv[1] == "hold":
    sys.stdin.read()  # hold until the test kills us
# else: leave without stop(), as a script that forgets it does
"""


@pytest.mark.parametrize("watch", ["pdeathsig", "lifeline"])
@pytest.mark.parametrize("end", ["killed", "exits-without-stop"])
def test_worker_processes_die_with_their_parent(tmp_path: Path, end: str, watch: str) -> None:
    if watch == "pdeathsig" and not _process.USE_PDEATHSIG:
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    mode = "hold" if end == "killed" else "leave"
    with subprocess.Popen(
        [sys.executable, str(script), mode, watch],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    ) as parent:
        try:
            assert parent.stdout is not None
            pids = [int(p) for p in parent.stdout.readline().split()]
            assert pids
            if end == "killed":
                assert all(psutil.Process(p).ppid() == parent.pid for p in pids)
                parent.kill()
            assert parent.wait(30) in (0, -signal.SIGKILL)
            eventually(lambda: all(gone(p) for p in pids), what="workers to die with their parent")
        finally:
            parent.kill()


# -- __main__ scripts and the seed's examples ------------------------------------------------------
MAIN_SCRIPT = """
import os
import random
import time
from dataclasses import dataclass
from tokengate import OperationsCoordinator, task_token_guard

# No `if __name__ == "__main__"` guard on purpose: worker processes never import this script.

@dataclass
class Point:
    x: int
    y: int

@task_token_guard(operation_type='cpu_intensive', tags={'weight': 'heavy'})
def heavy_operation(iterations):
    result = 0
    for i in range(iterations):
        result += sum(j ** 2 for j in range(100))
    return result

@task_token_guard(operation_type='json_generation_heavy', tags={'weight': 'heavy'})
def generate_complex_json(depth, index):
    print(f"[HEAVY-{index}] Generating complex nested JSON (depth: {depth})...")
    def create_nested(current_depth):
        if current_depth <= 0:
            return {"value": random.randint(1, 1000)}
        return {
            f"level_{current_depth}": {
                "data": [create_nested(current_depth - 1) for _ in range(3)],
                "metadata": {"timestamp": time.time(), "depth": current_depth,
                             "random": random.random()},
            }
        }
    return create_nested(depth)

@task_token_guard(operation_type='fib', tags={'weight': 'heavy'})
def fib(n):
    return n if n < 2 else fib(n - 1).get() + fib(n - 2).get()

@task_token_guard(operation_type='move', tags={'weight': 'heavy'})
def move(point, by):
    return Point(point.x + by(1), point.y), os.getpid()

coordinator = OperationsCoordinator()
coordinator.start()
try:
    print("heavy", heavy_operation(10).get(timeout=30))
    tree = generate_complex_json(3, 7).get(timeout=30)
    print("json", sorted(tree))
    print("fib", fib(12).get(timeout=30))
    moved, pid = move(Point(1, 2), lambda n: n * 10).get(timeout=30)
    print("moved", moved, isinstance(moved, Point), pid != os.getpid())
finally:
    coordinator.stop()
"""


def test_main_script_functions_run_in_the_process_lane(tmp_path: Path) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    out = run_script(script)
    assert f"heavy {heavy_operation.__wrapped__(10)}" in out
    assert "[HEAVY-7] Generating complex nested JSON (depth: 3)..." in out  # printed by a worker
    assert "json ['level_3']" in out
    assert "fib 144" in out
    assert "moved Point(x=11, y=2) True True" in out


# -- the benchmark case runs (never a timing) ------------------------------------------------------
def test_the_process_lane_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokengate.bench._case", "B2o", "tokengate", "--quick", "--n", "50"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["figures"]["us_per_task"] > 0
