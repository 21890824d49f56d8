"""The convergence engine: pure decisions on samples, and the engine driven by hand (an injected
clock and CPU counters, no timers) over a real coordinator's pools."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import GATE, HEAVY_ON_THREADS, eventually
from tokengate import ConfigError, OperationsCoordinator, task_token_guard
from tokengate._convergence import (
    CONFIRM_WAIT,
    QUICK_WAIT,
    ConvergenceEngine,
    ConvergencePolicy,
    PoolSample,
    ProcessSample,
    Swap,
    read_process_cpu,
    read_run_queue_waits,
    read_thread_cpu,
)
from tokengate._convergence import _PoolState as PoolState
from tokengate._convergence import _QuietMark as QuietMark

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS


Make = Callable[..., OperationsCoordinator]


@task_token_guard(operation_type="waits_on_io", tags={"weight": "light"})
def waits_on_io(i: int) -> int:
    """Stands in for a network call or a slow disk: the thread waits, using no CPU."""
    assert GATE.wait(30)
    return i


@task_token_guard(operation_type="spins", tags={"weight": "light", "storage_speed": "FAST"})
def spins(i: int) -> int:
    """Pure-Python CPU work until released (json.dump of a big dict is this kind of work)."""
    total = 0
    while not GATE.is_set():
        for k in range(2000):
            total += k * k
    return i


# -- the policy: pure arithmetic ------------------------------------------------------------------
def _pool(**kw: Any) -> PoolSample:
    base: dict[str, Any] = {
        "label": "io:FAST",
        "workers": 4,
        "baseline": 4,
        "maximum": 50,
        "busy": 4,
        "backlog": 46,
        "cpu": 0.02,
        "tracked": 4,
    }
    return PoolSample(**{**base, **kw})


IDLE = ProcessSample(dt=0.1, user=0.002, total=0.003)  # interpreter 2% busy
GIL_BOUND = ProcessSample(dt=0.1, user=0.095, total=0.098)  # json.dump in 4 threads
CPUS_BUSY = ProcessSample(dt=0.1, user=0.01, total=0.18)  # kernel/C work, GIL released
STARVED = ProcessSample(dt=0.1, user=0.02, total=0.02, stall=0.25)  # other processes hog CPUs

POLICY = ConvergencePolicy(cores=2)


@pytest.mark.parametrize(
    ("pool", "proc", "sustained", "calm_for", "action", "target"),
    [
        (_pool(), IDLE, True, 0.0, "grow", 50),  # waits on I/O: up to the tier limit
        (_pool(backlog=3), IDLE, True, 0.0, "grow", 7),  # no more threads than queued tokens
        (_pool(maximum=10), IDLE, True, 0.0, "grow", 10),  # bounded by the pool's maximum
        (_pool(workers=50), IDLE, True, 0.0, "hold", 50),  # already at the maximum
        (_pool(), IDLE, False, 0.0, "hold", 4),  # one backlogged sample is not a surge yet
        (_pool(cpu=0.095), GIL_BOUND, True, 0.0, "cpu-bound", 4),
        (_pool(), CPUS_BUSY, True, 0.0, "cpu-bound", 4),
        # waiting for a CPU (other processes load the machine) is not CPU demand of ours
        (_pool(), STARVED, True, 0.0, "grow", 12),
        (_pool(workers=20, cpu=0.095), GIL_BOUND, True, 0.0, "contention", 12),  # 60% target
        (_pool(workers=20, cpu=0.001), GIL_BOUND, True, 0.0, "cpu-bound", 20),  # not its fault
        (_pool(workers=20, backlog=0, busy=3), IDLE, False, 1.0, "retire", 4),
        (_pool(workers=20, backlog=0, busy=7), IDLE, False, 1.0, "retire", 7),
        (_pool(workers=20, backlog=0, busy=0), IDLE, False, 0.5, "hold", 20),  # cooling down
        # at the tier's limit a steady flow leaves no backlog: still in use, not calm
        (_pool(workers=50, backlog=0, busy=45), IDLE, False, 5.0, "hold", 50),
        (_pool(backlog=0, busy=0), IDLE, False, 9.0, "hold", 4),  # at baseline already
    ],
)
def test_policy_verdicts(
    pool: PoolSample,
    proc: ProcessSample,
    sustained: bool,
    calm_for: float,
    action: str,
    target: int,
) -> None:
    verdict = POLICY.decide(pool, proc, sustained=sustained, calm_for=calm_for)
    assert (verdict.action, verdict.target) == (action, target), verdict.reason


@pytest.mark.parametrize(
    ("interpreter", "total", "may_probe", "action", "target"),
    [
        (0.1, 0.17, True, "probe", 8),  # kernel-bound (fsync): double and measure
        (0.1, 0.17, False, "cpu-bound", 4),  # not measurable, or held after a failed trial
        (0.4, 0.17, True, "cpu-bound", 4),  # the interpreter is not idle enough to gamble
        # little CPU of our own, the rest waiting for a CPU: the load is the machine's, so grow
        # (the trial that follows retires the threads if throughput does not rise); the pool's
        # threads use 0.02 s of the process's 0.025: only that part grows with them
        (0.25, 0.03, True, "grow", 11),
    ],
)
def test_probing_needs_kernel_bound_cores_an_idle_interpreter_and_a_way_to_measure(
    interpreter: float, total: float, may_probe: bool, action: str, target: int
) -> None:
    stall = 0.18 - total  # the cores are 90% in demand either way
    proc = ProcessSample(dt=0.1, user=0.1 * interpreter, total=total, stall=stall)
    verdict = POLICY.decide(_pool(), proc, sustained=True, calm_for=0.0, may_probe=may_probe)
    assert (verdict.action, verdict.target) == (action, target), verdict.reason


def test_policy_growth_is_capped_by_interpreter_headroom() -> None:
    # tasks use a bit of Python each: at 4 threads the interpreter is 20% busy, so about 12
    # threads would bring it to the 60% target
    verdict = POLICY.decide(
        _pool(), ProcessSample(dt=0.1, user=0.02, total=0.02), sustained=True, calm_for=0.0
    )
    assert (verdict.action, verdict.target) == ("grow", 12)
    assert "interpreter 20% busy" in verdict.reason


# Per thread over a 0.1 s interval, four threads busy: a 20 ms sleep, or a 50 KB write and its
# fsync, uses about 0.1 ms of CPU a task; on a machine loaded by other processes each thread
# then waits a few ms for a CPU after every wake-up (schedstat's run-queue time).
SLEEPING_ON_A_LOADED_MACHINE = ProcessSample(dt=0.1, user=0.003, total=0.004, stall=0.09)
FSYNC_ON_A_LOADED_MACHINE = ProcessSample(dt=0.1, user=0.016, total=0.02, stall=0.33)
JSON_ON_A_LOADED_MACHINE = ProcessSample(dt=0.1, user=0.06, total=0.062, stall=0.2)


@pytest.mark.parametrize(
    ("pool", "proc", "action", "target"),
    [
        (_pool(cpu=0.002, stall=0.09), SLEEPING_ON_A_LOADED_MACHINE, "grow", 50),
        # the pool's threads use half the process's CPU: the other half does not grow with them
        (_pool(cpu=0.008, stall=0.33), FSYNC_ON_A_LOADED_MACHINE, "grow", 26),
        # json.dump keeps the interpreter busy whatever the load: no threads
        (_pool(cpu=0.06, stall=0.2), JSON_ON_A_LOADED_MACHINE, "cpu-bound", 4),
        (_pool(cpu=0.095), GIL_BOUND, "cpu-bound", 4),
    ],
)
def test_waiting_for_a_cpu_is_the_machines_load_not_the_tasks_demand(
    pool: PoolSample, proc: ProcessSample, action: str, target: int
) -> None:
    verdict = POLICY.decide(pool, proc, sustained=True, calm_for=0.0)
    assert (verdict.action, verdict.target) == (action, target), verdict.reason


def test_only_the_pools_own_demand_grows_with_its_threads() -> None:
    # A surge just submitted: the submitting thread kept the interpreter 40% busy over the
    # window, the pool's four sleeping threads used almost nothing. More sleeping threads add
    # almost nothing either: straight to the tier's limit, not to 4 * 60% / 40% = 6.
    proc = ProcessSample(dt=0.005, user=0.002, total=0.0021)
    verdict = POLICY.decide(_pool(cpu=0.00001), proc, sustained=True, calm_for=0.0)
    assert (verdict.action, verdict.target) == ("grow", 50), verdict.reason
    # Without the threads' clocks the whole process's demand is taken as the pool's.
    verdict = POLICY.decide(_pool(cpu=None, tracked=0), proc, sustained=True, calm_for=0.0)
    assert (verdict.action, verdict.target) == ("grow", 8), verdict.reason


def test_a_backlog_just_seen_is_confirmed_within_milliseconds() -> None:
    engine = ConvergenceEngine(lambda: {}, interval=0.1)
    engine._states[("io", "FAST")] = PoolState(backlogged=True)
    assert engine._next_wait() == CONFIRM_WAIT < 0.1 / 4
    engine._states[("io", "FAST")].confirmed = True
    assert engine._next_wait() == 0.1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an exact process CPU clock")
def test_a_backlog_that_began_is_looked_at_again_after_a_millisecond(
    make_coordinator: Make,
) -> None:
    coordinator = make_coordinator(workers_per_core=2, cores=1, convergence=False)
    lane = coordinator.lanes["thread"]
    engine = _engine(coordinator, FakeCPU())
    tokens = [waits_on_io(i) for i in range(20)]
    eventually(lambda: sum(w.current is not None for w in lane.pools[1]) == 2, what="2 busy")
    assert engine._next_wait() == engine.interval
    assert engine.sample(now=0.0) == []  # the backlog begins
    assert engine._next_wait() == QUICK_WAIT < CONFIRM_WAIT
    engine._mark = None  # the run loop took the quick look and found the process busy
    assert engine._next_wait() == CONFIRM_WAIT
    (swap,) = engine.sample(now=CONFIRM_WAIT)  # confirmed: the tasks wait, so it grows
    assert swap.action == "grow"
    assert engine._mark is None  # a backlog that goes on is no new beginning
    GATE.set()
    assert [t.get(timeout=10) for t in tokens] == list(range(20))


def test_quiet_means_no_thread_but_the_sampler_used_a_cpu() -> None:
    wall, process, own = time.perf_counter(), time.process_time(), time.thread_time()
    assert not QuietMark(wall - 1.0, process - 0.5, own).quiet()  # others: half a CPU
    assert QuietMark(wall - 1.0, process - 0.5, own - 0.5).quiet()  # that was the sampler
    assert QuietMark(wall - 1.0, process, own).quiet()


def test_the_sampler_confirms_a_quiet_backlog_at_once_and_a_busy_one_after_the_window() -> None:
    """The run loop, with its waits recorded instead of waited: a quiet beginning is sampled
    after QUICK_WAIT; otherwise the loop waits out the rest of CONFIRM_WAIT first."""
    engine = ConvergenceEngine(lambda: {}, interval=600.0)
    waits: list[float | None] = []

    class Wake:
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            return True

        def clear(self) -> None:
            pass

        def set(self) -> None:
            pass

    class Mark:
        def __init__(self, quiet: bool) -> None:
            self.at = time.perf_counter()
            self._quiet = quiet

        def quiet(self) -> bool:
            return self._quiet

    script: list[Any] = [Mark(True), Mark(False), None]

    def sample(now: float | None = None) -> list[Any]:
        if not script:
            engine._stop.set()
        else:
            engine._mark = script.pop(0)
        return []

    engine._wake = Wake()  # type: ignore[assignment]
    engine.sample = sample  # type: ignore[method-assign]
    engine._run()
    assert waits[:3] == [600.0, QUICK_WAIT, QUICK_WAIT], waits
    assert 0.0 <= (waits[3] or 0.0) <= CONFIRM_WAIT, waits  # the rest of the full window
    assert waits[4:] == [600.0, 600.0], waits


def test_waiting_tasks_grow_at_least_by_doubling() -> None:
    # some Python in each task (interpreter 35% busy): headroom alone would say 6 threads
    proc = ProcessSample(dt=0.1, user=0.035, total=0.04)
    verdict = POLICY.decide(_pool(cpu=0.03), proc, sustained=True, calm_for=0.0)
    assert (verdict.action, verdict.target) == ("grow", 8), verdict.reason
    # never past the queued work or the maximum
    verdict = POLICY.decide(_pool(cpu=0.03, backlog=2), proc, sustained=True, calm_for=0.0)
    assert (verdict.action, verdict.target) == ("grow", 6), verdict.reason
    verdict = POLICY.decide(_pool(cpu=0.03, maximum=5), proc, sustained=True, calm_for=0.0)
    assert (verdict.action, verdict.target) == ("grow", 5), verdict.reason


def test_free_threaded_capacity_scales_with_cores() -> None:
    policy = dataclasses.replace(POLICY, gil_capacity=8.0, cores=8)
    verdict = policy.decide(_pool(), GIL_BOUND, sustained=True, calm_for=0.0)
    assert verdict.action == "grow"  # 95% of one core is 12% of an 8-core interpreter


# -- the engine over a real coordinator, by hand ------------------------------------------------
class FakeCPU:
    """Process CPU counters the test advances: ``busy`` is the interpreter's busy fraction."""

    def __init__(self) -> None:
        self.user = 0.0
        self.busy = 0.01

    def advance(self, seconds: float) -> None:
        self.user += seconds * self.busy

    def __call__(self) -> tuple[float, float]:
        return self.user, self.user


def _engine(coordinator: OperationsCoordinator, cpu: FakeCPU, **kw: Any) -> ConvergenceEngine:
    return ConvergenceEngine(
        lambda: coordinator.lanes,
        on_change=coordinator.backend.router.invalidate,
        count_event=coordinator.count_event,
        process_cpu=cpu,
        run_queue_waits=lambda tids: None,
        **kw,
    )


def test_a_surge_of_waiting_tasks_grows_the_pool_and_calm_returns_it_to_baseline(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = make_coordinator(
        workers_per_core=2, cores=1, max_workers_per_core=8, convergence=False
    )
    lane = coordinator.lanes["thread"]
    cpu = FakeCPU()
    engine = _engine(coordinator, cpu)
    tokens = [waits_on_io(i) for i in range(20)]
    eventually(lambda: sum(w.current is not None for w in lane.pools[1]) == 2, what="2 busy")
    with caplog.at_level(logging.INFO, logger="tokengate.convergence"):
        assert engine.sample(now=0.0) == []
        cpu.advance(1.0)
        (swap,) = engine.sample(now=1.0)
    assert (swap.label, swap.action, swap.before, swap.after) == ("thread:core1", "grow", 2, 8)
    assert len(lane.pools[1]) == 8
    # the new workers take queued tokens from their backed-up siblings
    eventually(lambda: sum(w.current is not None for w in lane.pools[1]) == 8, what="8 busy")
    assert re.search(
        r"\[CONVERGENCE\] thread:core1 surge: 2 -> 8 workers: tasks wait on I/O \(backlog 18,",
        caplog.text,
    )
    GATE.set()
    assert [t.get(timeout=10) for t in tokens] == list(range(20))
    with caplog.at_level(logging.INFO, logger="tokengate.convergence"):
        cpu.advance(1.0)
        assert engine.sample(now=2.0) == []  # calm starts
        cpu.advance(0.5)
        assert engine.sample(now=2.5) == []  # cooling down
        cpu.advance(0.6)
        (swap,) = engine.sample(now=3.1)
    assert (swap.action, swap.before, swap.after) == ("retire", 8, 2)
    assert "[CONVERGENCE] thread:core1 calm: 8 -> 2 workers: no backlog for 1.1s" in caplog.text
    assert len(lane.pools[1]) == 2
    eventually(
        lambda: len([t for t in threading.enumerate() if "core_1" in t.name]) == 2,
        what="the retired threads to exit",
    )
    events = coordinator.stats().events
    assert (events["convergence_grow"], events["workers_added"]) == (1, 6)
    assert (events["convergence_retire"], events["workers_retired"]) == (1, 6)
    assert engine.worker_counts()["thread:core1"] == (2, 2, 8)
    assert [s.action for s in engine.history] == ["grow", "retire"]


def test_a_cpu_bound_backlog_triggers_no_growth(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = make_coordinator(workers_per_core=2, cores=1, convergence=False)
    lane = coordinator.lanes["thread"]
    cpu = FakeCPU()
    cpu.busy = 0.97  # the queued work keeps the interpreter busy
    engine = _engine(coordinator, cpu)
    tokens = [waits_on_io(i) for i in range(20)]
    with caplog.at_level(logging.INFO, logger="tokengate.convergence"):
        for step in range(6):
            cpu.advance(0.1)
            assert engine.sample(now=0.1 * step) == []
    assert len(lane.pools[1]) == 2
    lines = [r.getMessage() for r in caplog.records if "thread:core1" in r.getMessage()]
    assert len(lines) == 1, lines  # said once per surge, not every sample
    assert "no workers added, the interpreter is busy" in lines[0]
    assert "interpreter 97% busy" in lines[0]
    assert coordinator.stats().events["convergence_cpu_bound"] == 1
    GATE.set()
    for token in tokens:
        token.get(timeout=10)


def test_one_io_looking_sample_does_not_overturn_a_cpu_bound_verdict(
    make_coordinator: Make,
) -> None:
    coordinator = make_coordinator(workers_per_core=2, cores=1, convergence=False)
    lane = coordinator.lanes["thread"]
    cpu = FakeCPU()
    engine = _engine(coordinator, cpu)
    tokens = [waits_on_io(i) for i in range(20)]
    cpu.busy = 0.97
    for step in range(3):
        cpu.advance(0.1)
        assert engine.sample(now=0.1 * step) == []
    cpu.busy = 0.01  # one quiet interval inside a CPU-bound surge: not yet
    cpu.advance(0.1)
    assert engine.sample(now=0.3) == []
    cpu.busy = 0.97  # and it was noise
    cpu.advance(0.1)
    assert engine.sample(now=0.4) == []
    cpu.busy = 0.01  # the work really changed: two quiet intervals in a row
    cpu.advance(0.1)
    assert engine.sample(now=0.5) == []
    cpu.advance(0.1)
    (swap,) = engine.sample(now=0.6)
    assert (swap.action, swap.before) == ("grow", 2)
    assert len(lane.pools[1]) > 2
    GATE.set()
    for token in tokens:
        token.get(timeout=10)


class FakeWorker:
    ids = iter(range(1000, 10**6))

    def __init__(self) -> None:
        self.mailbox: list[int] = []
        self.current: Any = None
        self.completed = 0
        self.thread = type("Thread", (), {"native_id": next(self.ids)})()


class FakeLane:
    """A resizable lane whose queues and completion counts the test sets by hand."""

    def __init__(self, workers: int, maximum: int = 64) -> None:
        self.pools: dict[Any, list[FakeWorker]] = {"FAST": [FakeWorker() for _ in range(workers)]}
        self.baseline = workers
        self.maximum = maximum

    def pool_limits(self, key: Any) -> tuple[int, int]:
        return self.baseline, self.maximum

    def add_worker(self, key: Any) -> FakeWorker:
        worker = FakeWorker()
        self.pools[key] = [*self.pools[key], worker]
        return worker

    def retire_worker(self, worker: FakeWorker) -> bool:
        self.pools["FAST"] = [w for w in self.pools["FAST"] if w is not worker]
        return True

    def run(self, per_worker: int, backlog: int = 100) -> None:
        """One interval: every worker busy, finishing ``per_worker`` tasks; a backlog queued."""
        for worker in self.pools["FAST"]:
            worker.completed += per_worker
            worker.current = object()
            worker.mailbox = [0] * (backlog // len(self.pools["FAST"]))


class Counters:
    """Process CPU counters: ``user`` (the interpreter) and ``total`` (user + kernel)."""

    def __init__(self) -> None:
        self.user = 0.0
        self.total = 0.0

    def add(self, dt: float, *, interpreter: float, cores_busy: float, cores: int = 2) -> None:
        self.user += dt * interpreter
        self.total += dt * cores_busy * cores

    def __call__(self) -> tuple[float, float]:
        return self.user, self.total


def _fake_engine(lane: FakeLane, cpu: Counters, events: dict[str, int]) -> ConvergenceEngine:
    def count(name: str, n: int) -> None:
        events[name] = events.get(name, 0) + n

    return ConvergenceEngine(
        lambda: {"io": lane},
        count_event=count,
        process_cpu=cpu,
        thread_cpu=lambda worker: None,
        run_queue_waits=lambda tids: None,
        policy=ConvergencePolicy(cores=2),
    )


def test_busy_cores_with_an_idle_interpreter_are_probed_and_kept_while_it_pays() -> None:
    lane, cpu, events = FakeLane(4), Counters(), {}
    engine = _fake_engine(lane, cpu, events)

    def interval(now: float, per_worker: int) -> list[Any]:
        lane.run(per_worker)
        cpu.add(0.1, interpreter=0.2, cores_busy=0.9)  # kernel work (fsync) keeps cores busy
        return engine.sample(now=now)

    assert interval(0.0, 10) == []  # first sample: nothing to compare with yet
    (probe,) = interval(0.1, 10)  # 400/s with 4 threads; cores busy, interpreter idle: probe
    assert (probe.action, probe.before, probe.after) == ("probe", 4, 8)
    (again,) = interval(0.2, 8)  # 8 threads x 8 = 640/s: +60%, kept, and probed again
    assert (again.action, again.before, again.after) == ("probe", 8, 16)
    (revert,) = interval(0.3, 4)  # 16 x 4 = 640/s: no gain, back to 8 and leave it be
    assert (revert.action, revert.before, revert.after) == ("revert", 16, 8)
    assert "did not beat 640/s by 15%" in revert.reason
    assert len(lane.pools["FAST"]) == 8
    assert interval(0.4, 8) == []  # held for trial_hold seconds: says why, once
    assert interval(0.5, 8) == []
    assert events == {
        "convergence_probe": 2,
        "workers_added": 12,
        "convergence_reverted": 1,
        "convergence_retire": 1,
        "workers_retired": 8,
        "convergence_cpu_bound": 1,
    }


def test_a_surge_of_sleeping_tasks_on_a_loaded_machine_grows_to_the_limit_at_once() -> None:
    """400 tasks of a 20 ms sleep, tier limit 50, on a machine whose other processes keep its
    CPUs busy: each woken thread waits ~5 ms for a CPU. That wait is not the tasks' demand."""
    lane, cpu, events = FakeLane(4, maximum=50), Counters(), {}
    thread_cpu: dict[Any, float] = {}
    run_queue: dict[int, float] = {}
    engine = ConvergenceEngine(
        lambda: {"io": lane},
        count_event=lambda name, n: events.__setitem__(name, events.get(name, 0) + n),
        process_cpu=cpu,
        thread_cpu=lambda worker: thread_cpu.get(worker, 0.0),
        run_queue_waits=lambda tids: {tid: run_queue.get(tid, 0.0) for tid in tids},
        policy=ConvergencePolicy(cores=2),
    )

    def interval(now: float) -> list[Any]:
        lane.run(4, backlog=48)
        for worker in lane.pools["FAST"]:
            thread_cpu[worker] = thread_cpu.get(worker, 0.0) + 0.0005  # 0.5% on a CPU
            tid = worker.thread.native_id
            run_queue[tid] = run_queue.get(tid, 0.0) + 0.02  # 20% waiting for one
        cpu.add(0.1, interpreter=0.01, cores_busy=0.01)
        return engine.sample(now=now)

    assert interval(0.0) == []  # first sample: nothing to compare with yet
    (swap,) = interval(0.1)
    assert (swap.action, swap.before, swap.after) == ("grow", 4, 50), swap.reason
    assert "waiting for a CPU 20%" in swap.reason
    assert len(lane.pools["FAST"]) == 50
    assert "convergence_cpu_bound" not in events


def test_python_bound_work_is_never_probed() -> None:
    lane, cpu, events = FakeLane(4), Counters(), {}
    engine = _fake_engine(lane, cpu, events)
    for step in range(5):
        lane.run(10)
        cpu.add(0.1, interpreter=0.95, cores_busy=0.6)
        assert engine.sample(now=0.1 * step) == []
    assert len(lane.pools["FAST"]) == 4
    assert events == {"convergence_cpu_bound": 1}


def test_a_growth_that_does_not_raise_throughput_is_reverted() -> None:
    lane, cpu, events = FakeLane(4, maximum=8), Counters(), {}
    engine = _fake_engine(lane, cpu, events)
    lane.run(10)
    cpu.add(0.1, interpreter=0.02, cores_busy=0.02)
    engine.sample(now=0.0)
    lane.run(10)
    cpu.add(0.1, interpreter=0.02, cores_busy=0.02)
    (grow,) = engine.sample(now=0.1)  # the counters say I/O-bound: grown
    assert grow.action == "grow"
    assert len(lane.pools["FAST"]) == 8
    lane.run(5)  # yet 8 threads finish no more than 4 did: 40 per interval
    cpu.add(0.1, interpreter=0.02, cores_busy=0.02)
    (swap,) = engine.sample(now=0.2)
    assert (swap.action, swap.after) == ("revert", 4)
    assert events["convergence_reverted"] == 1


def _grown_early(
    interpreter: float,
) -> tuple[FakeLane, Counters, dict[str, int], ConvergenceEngine, Swap]:
    """A pool of 4 (maximum 50) grown by the sample 5 ms after its backlog began, when too few
    tasks had finished to measure throughput; the interpreter was ``interpreter`` busy."""
    lane, cpu, events = FakeLane(4, maximum=50), Counters(), {}
    engine = _fake_engine(lane, cpu, events)
    lane.run(0)  # nothing finished yet: no throughput to compare a growth with
    cpu.add(0.005, interpreter=interpreter, cores_busy=interpreter)
    engine.sample(now=0.0)
    lane.run(1)
    cpu.add(0.005, interpreter=interpreter, cores_busy=interpreter)
    (grow,) = engine.sample(now=0.005)
    return lane, cpu, events, engine, grow


def test_a_growth_too_early_to_measure_is_reverted_if_the_interpreter_is_then_busy() -> None:
    """Judged over the first milliseconds of a surge, Python-bound writers can read idle (caught
    between GIL hand-offs, or creating files in the kernel); the full interval after the growth
    is its check, and a busy interpreter there takes the threads back."""
    lane, cpu, events, engine, grow = _grown_early(interpreter=0.3)
    assert (grow.action, grow.after) == ("grow", 8)
    lane.run(5)
    cpu.add(0.1, interpreter=0.8, cores_busy=0.5)
    (swap,) = engine.sample(now=0.105)
    assert (swap.action, swap.before, swap.after) == ("revert", 8, 4), swap
    assert "the interpreter is busy with them" in swap.reason
    assert events["convergence_reverted"] == 1
    lane.run(5)
    cpu.add(0.1, interpreter=0.3, cores_busy=0.3)
    assert engine.sample(now=0.205) == []  # held after the revert, as after a failed trial
    assert len(lane.pools["FAST"]) == 4


def test_a_growth_too_early_to_measure_stays_while_its_tasks_wait() -> None:
    lane, cpu, events, engine, grow = _grown_early(interpreter=0.01)
    assert (grow.action, grow.after) == ("grow", 50)
    lane.run(2)
    cpu.add(0.1, interpreter=0.05, cores_busy=0.05)
    assert engine.sample(now=0.105) == []
    assert len(lane.pools["FAST"]) == 50 and "convergence_reverted" not in events


def test_real_cpu_bound_tasks_are_recognised(make_coordinator: Make) -> None:
    """Spinning threads measured by the real probes. The wall clock is the process's CPU clock,
    as if the machine were otherwise idle, so other load on the machine cannot blur it."""
    coordinator = make_coordinator(workers_per_core=1, io_workers=2, convergence=False)
    engine = ConvergenceEngine(
        lambda: coordinator.lanes,
        on_change=coordinator.backend.router.invalidate,
        count_event=coordinator.count_event,
        clock=time.process_time,
    )
    tokens = [spins(i) for i in range(6)]
    eventually(
        lambda: sum(w.current is not None for w in coordinator.lanes["io"].pools["FAST"]) == 2,
        what="2 spinning workers",
    )
    engine.sample()
    start = time.process_time()
    eventually(lambda: time.process_time() - start > 0.2, what="0.2 s of CPU work")
    engine.sample()
    assert len(coordinator.lanes["io"].pools["FAST"]) == 2
    assert coordinator.stats().events["convergence_cpu_bound"] == 1
    GATE.set()
    assert [t.get(timeout=10) for t in tokens] == list(range(6))


def test_the_sampler_thread_resizes_a_running_coordinator(make_coordinator: Make) -> None:
    coordinator = make_coordinator(
        workers_per_core=1, cores=1, max_workers_per_core=4, convergence_interval=0.01
    )
    engine = coordinator.convergence
    assert engine is not None
    engine.policy = dataclasses.replace(engine.policy, cooldown=0.05)
    lane = coordinator.lanes["thread"]
    tokens = [waits_on_io(i) for i in range(10)]
    eventually(lambda: len(lane.pools[1]) == 4, what="the sampler to grow core 1 to 4")
    GATE.set()
    assert [t.get(timeout=10) for t in tokens] == list(range(10))
    eventually(lambda: len(lane.pools[1]) == 1, what="the sampler to retire back to 1")
    events = coordinator.stats().events
    assert events["workers_added"] == events["workers_retired"] == 3


def test_convergence_verbose_prints_the_swaps(capsys: pytest.CaptureFixture[str]) -> None:
    with OperationsCoordinator(
        process_lane=False, workers_per_core=1, cores=1, convergence=False, convergence_verbose=True
    ) as coordinator:
        cpu = FakeCPU()
        engine = _engine(coordinator, cpu)
        tokens = [waits_on_io(i) for i in range(4)]
        lane = coordinator.lanes["thread"]
        eventually(lambda: lane.pools[1][0].current is not None, what="the worker to be busy")
        engine.sample(now=0.0)
        cpu.advance(1.0)
        engine.sample(now=1.0)
        GATE.set()
        for token in tokens:
            token.get(timeout=10)
    out = capsys.readouterr().out
    assert "[CONVERGENCE] thread:core1 surge: 1 -> 4 workers" in out
    assert "[ROUTING]" not in out  # only the convergence logger is shown


def test_engine_off_keeps_the_baseline(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, convergence=False)
    assert coordinator.convergence is None
    assert {len(m) for m in coordinator.lanes["io"].pools.values()} == {4}


def test_probes_read_this_machine() -> None:
    user, total = read_process_cpu()
    assert 0 <= user <= total
    waits = read_run_queue_waits([threading.get_native_id(), 2**22 + 7])  # me, and nobody
    assert waits is None or (
        list(waits) == [threading.get_native_id()] and waits[threading.get_native_id()] >= 0
    )

    class NoClock:
        cpu_clock = None

    assert read_thread_cpu(NoClock()) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread CPU accounts")
def test_the_sampler_does_not_count_its_own_cpu_as_demand() -> None:
    _, before = read_process_cpu()
    own = time.thread_time()
    while time.thread_time() - own < 0.2:  # the calling thread (the sampler) works
        pass
    _, after = read_process_cpu()
    assert after - before < 0.1, (before, after)


def test_policy_thresholds_are_validated() -> None:
    with pytest.raises(ConfigError, match="gil_grow_below must be in"):
        ConvergencePolicy(gil_grow_below=0)
    with pytest.raises(ConfigError, match="cores must be an int"):
        ConvergencePolicy(cores=0)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"io_workers": 0}, "io_workers must be a whole number >= 1"),
        ({"max_workers_per_core": 1000}, "beyond the supported maximum"),
        ({"async_concurrency": -1}, "async_concurrency"),
        ({"convergence": "yes"}, "convergence must be True or False"),
        ({"convergence_interval": 0}, "convergence_interval must be a positive number"),
        ({"convergence_interval": float("nan")}, "convergence_interval"),
        ({"convergence_interval": 1e12}, "at most 2000000 seconds"),  # killed its thread
        ({"convergence_interval": 2**1100}, "an int of 1101 bits"),
    ],
)
def test_io_lane_options_are_validated(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        OperationsCoordinator(process_lane=False, **options)


def test_a_nudge_samples_at_once_instead_of_at_the_next_interval() -> None:
    sampled = threading.Event()

    def process_cpu() -> tuple[float, float]:
        sampled.set()
        return 0.0, 0.0

    engine = ConvergenceEngine(lambda: {}, interval=600.0, process_cpu=process_cpu)
    engine.start()
    try:
        assert not sampled.is_set()  # the first sample is 600 s away
        engine.nudge()
        assert sampled.wait(30), "a nudge did not make the engine sample"
    finally:
        engine.stop()
