"""Which tokens the process lane takes: the routing rule by executor, weight, storage tier and
GIL, the ``process_lane`` option, and how idle workers take tokens queued behind busy ones (only
those their core may run)."""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

import process_tasks as pt
from conftest import assert_counts_add_up, eventually
from tokengate import (
    ConfigError,
    OperationsCoordinator,
    TaskSpec,
    TokenDiscarded,
    WorkerCrashed,
    task_token_guard,
)
from tokengate._limits import MAX_WAIT_SECONDS
from tokengate.lanes.process import (
    _rules,
    runs_in_process,
)

from ._helpers import (
    NO_CRASH_RETRY,
    POSIX_ONLY,
    Make,
)

pytestmark = POSIX_ONLY


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
    monkeypatch.setattr("tokengate.local._backend.gil_enabled", lambda: False)
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
    monkeypatch.setattr(_rules, "process_lane_supported", lambda: False)
    with pytest.raises(ConfigError, match="not supported"):
        OperationsCoordinator(process_lane=True)


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


def test_a_storage_tier_still_applies_in_the_process_lane(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    pids = {pt.slow_io_process().get(timeout=30) for _ in range(4)}
    assert os.getpid() not in pids
    assert coordinator.tier_stats()["SLOW"].high_water >= 1


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
