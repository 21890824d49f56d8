"""How every worker process starts: native thread pools sized so that one worker per core does
not start a pool per core each (checked with NumPy), and a per-process initializer run once
before the worker takes a task (a failing one fails the start, then the tokens, loudly)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import process_tasks as pt
from tokengate import ConfigError, OperationsCoordinator, WorkerCrashed

from ._helpers import NO_CRASH_RETRY, POSIX_ONLY, Make, lane_of

pytestmark = POSIX_ONLY
VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


@pytest.fixture
def numpy_present() -> None:
    pytest.importorskip("numpy")


@pytest.mark.usefixtures("numpy_present")
def test_native_thread_pools_default_to_one_thread_per_worker(
    procs: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NUMEXPR_NUM_THREADS", "2")  # set by the user: kept
    procs(workers_per_core=1, cores=1)
    got = pt.native_threads().get(timeout=30)
    assert got["env"] == {**dict.fromkeys(VARS, "1"), "NUMEXPR_NUM_THREADS": "2"}
    assert all(n == 1 for n in got["pools"]), got["pools"]


@pytest.mark.usefixtures("numpy_present")
def test_process_native_threads_sets_every_pool(
    procs: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    procs(workers_per_core=1, cores=1, process_native_threads=3)
    got = pt.native_threads().get(timeout=30)
    assert set(got["env"].values()) == {"3"}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_process_native_threads_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match="process_native_threads must be a whole number"):
        OperationsCoordinator(process_native_threads=bad)  # type: ignore[arg-type]


def test_the_initializer_runs_once_in_each_worker_process_before_its_tasks(
    procs: Make, tmp_path: Path
) -> None:
    log = tmp_path / "ran"
    coordinator = procs(
        workers_per_core=1,
        process_initializer=pt.remember,
        process_initargs=("model", {"weights": [1, 2, 3]}, str(log)),
    )
    states = [pt.worker_state().get(timeout=30) for _ in range(6)]
    assert all(s == {"model": {"weights": [1, 2, 3]}} for s in states)
    assert sorted(map(int, log.read_text().split())) == sorted(lane_of(coordinator).pids())


def test_a_replacement_worker_runs_the_initializer_too(procs: Make, tmp_path: Path) -> None:
    coordinator = procs(
        workers_per_core=1,
        cores=1,
        retry_policy=NO_CRASH_RETRY,
        process_initializer=pt.remember,
        process_initargs=("k", 1),
    )
    with pytest.raises(WorkerCrashed):
        pt.sigkill_self().get(timeout=30)
    assert pt.worker_state().get(timeout=30) == {"k": 1}
    assert lane_of(coordinator).wait_ready(30)


def test_an_initializer_that_raises_fails_the_start_then_the_tokens_with_its_traceback(
    make_coordinator: Make, quick_cool_down: tuple[float, float]
) -> None:
    coordinator = make_coordinator(
        workers_per_core=1, cores=1, process_initializer=pt.refuse_to_start
    )
    assert not lane_of(coordinator).wait_ready(30)  # BROKEN after 3 failed starts in a row
    with pytest.raises(WorkerCrashed) as info:
        pt.square(2).get(timeout=30)
    message = str(info.value)
    assert "its process_initializer raised" in message
    assert "injected: this initializer always fails" in message
    assert coordinator.stats().events["process_start_failures"] >= 3


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"process_initializer": "not callable"}, "process_initializer must be a callable"),
        ({"process_initializer": print, "process_initargs": [1]}, "process_initargs must be a"),
    ],
)
def test_initializer_options_are_validated(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        OperationsCoordinator(**options)  # type: ignore[arg-type]


def test_an_initializer_that_cannot_be_pickled_is_refused_at_construction() -> None:
    lock = threading.Lock()
    with pytest.raises(ConfigError, match="cannot be sent to a worker process"):
        OperationsCoordinator(process_initializer=pt.remember, process_initargs=("l", lock))
