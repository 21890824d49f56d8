"""B2 CPU scaling, and B2o the per-task overhead of a trivial process task.

B2: N (16) pure-Python tasks of ~0.2 s (``burn``, which holds the GIL throughout; ``weight:
heavy`` for tokengate, so they run in its worker processes). Each system runs the batch twice:
*cold* (the pool is created with the clock running, so worker start-up is charged) and *warm*
(the same workers again); ``wall_s`` is the warm batch. ``speedup`` is computed within each case
against one task run serially in the same process (N x one task / warm wall), so it needs no
other case; ``serial`` is shown as the floor (its speedup is ~1 by construction).

B2o: N trivial process tasks (``noop(i) -> i``), submit all then gather, after the workers are
ready; then 500 one-at-a-time round trips. tokengate's task is tagged ``executor: process``.

The task bodies are in ``_bodies`` (module level, so ``ProcessPoolExecutor`` and loky pickle them
by reference); tokengate's decorated versions are in ``_tasks``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tokengate.bench._bodies import burn, noop_plain
from tokengate.bench._model import CaseParams, Figure, Figures, Scenario, System, usable_cores

if TYPE_CHECKING:
    from tokengate import OperationsCoordinator

__all__ = ["SCENARIO", "SCENARIO_OVERHEAD", "quick_steps"]

perf = time.perf_counter

#: ~0.2 s of pure-Python work on the 2-core development machine (40 ns per step).
B2_STEPS = 5_000_000
ROUND_TRIPS, QUICK_ROUND_TRIPS = 500, 100
READY_TIMEOUT_S = 60.0
RESULT_TIMEOUT_S = 300.0


def quick_steps(p: CaseParams, full: int) -> int:
    """Task size: a quarter in quick mode."""
    return full // 4 if p.quick else full


def wait_process_lane(coordinator: OperationsCoordinator) -> None:
    """Block until every tokengate worker process is ready to take a task."""
    if not coordinator.wait_ready(READY_TIMEOUT_S):
        raise TimeoutError(f"tokengate's worker processes were not ready in {READY_TIMEOUT_S} s")


# -- B2 -------------------------------------------------------------------------------------------


def _speedup(p: CaseParams, steps: int, figures: Figures) -> Figures:
    burn(steps // 10)  # warm up
    t0 = perf()
    burn(steps)
    one = perf() - t0
    figures["speedup"] = p.n * one / float(figures["wall_s"])
    figures["speedup_per_core"] = figures["speedup"] / p.cores
    return figures


def run_serial(p: CaseParams) -> Figures:
    steps = quick_steps(p, B2_STEPS)
    t0 = perf()
    for _ in range(p.n):
        burn(steps)
    return _speedup(p, steps, {"wall_s": perf() - t0})


def run_tokengate(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import burn_task

    steps = quick_steps(p, B2_STEPS)
    t0 = perf()
    coordinator = OperationsCoordinator().start()  # cold: workers boot while tasks queue
    try:
        results = [t.get(timeout=RESULT_TIMEOUT_S) for t in [burn_task(steps) for _ in range(p.n)]]
        cold = perf() - t0
        t1 = perf()  # warm: the same worker processes again
        results += [t.get(timeout=RESULT_TIMEOUT_S) for t in [burn_task(steps) for _ in range(p.n)]]
        warm = perf() - t1
    finally:
        coordinator.stop()
    if len(set(results)) != 1:
        raise AssertionError(f"burn({steps}) gave different results: {set(results)}")
    t2 = perf()  # start-up: start() until every worker process is ready to take a task
    coordinator = OperationsCoordinator().start()
    try:
        returned = perf() - t2
        wait_process_lane(coordinator)
        startup = perf() - t2
    finally:
        coordinator.stop()
    figures: Figures = {
        "wall_s": warm,
        "cold_wall_s": cold,
        "startup_s": startup,
        "start_call_s": returned,
    }
    return _speedup(p, steps, figures)


def _pool_b2(make_pool: Callable[[], Any], p: CaseParams) -> Figures:
    steps = quick_steps(p, B2_STEPS)
    t0 = perf()
    pool = make_pool()
    try:
        results = [f.result() for f in [pool.submit(burn, steps) for _ in range(p.n)]]
        cold = perf() - t0
        t1 = perf()
        results += [f.result() for f in [pool.submit(burn, steps) for _ in range(p.n)]]
        warm = perf() - t1
    finally:
        pool.shutdown()
    if len(set(results)) != 1:
        raise AssertionError(f"burn({steps}) gave different results: {set(results)}")
    return _speedup(p, steps, {"wall_s": warm, "cold_wall_s": cold})


def run_processpool(p: CaseParams) -> Figures:
    return _pool_b2(lambda: ProcessPoolExecutor(p.cores), p)


def run_loky(p: CaseParams) -> Figures:
    loky = importlib.import_module("loky")
    return _pool_b2(lambda: loky.get_reusable_executor(max_workers=p.cores), p)


def run_threadpool(p: CaseParams) -> Figures:
    return _pool_b2(lambda: ThreadPoolExecutor(p.cores), p)


class _DaskPool:
    """A Dask ``LocalCluster`` (one single-threaded worker process per core) as a pool."""

    def __init__(self, cores: int) -> None:
        distributed = importlib.import_module("distributed")
        self._cluster = distributed.LocalCluster(
            processes=True, n_workers=cores, threads_per_worker=1, dashboard_address=None
        )
        self._client = distributed.Client(self._cluster)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = self._client.submit(fn, *args, pure=False)
        return future

    def shutdown(self) -> None:
        self._client.close()
        self._cluster.close()


def run_dask(p: CaseParams) -> Figures:
    return _pool_b2(lambda: _DaskPool(p.cores), p)


_CORES = usable_cores()

SCENARIO = Scenario(
    id="B2",
    title="CPU scaling",
    description=(
        "pure-Python CPU tasks of ~0.2 s (weight heavy; a quarter of that in --quick), run as a "
        "cold batch then a warm batch on the same workers; wall s is the warm batch, speedup is "
        "N x one task run serially in the same process / wall s"
    ),
    figures=(
        Figure("wall_s", "wall s", higher_is_better=False),
        Figure("speedup", "speedup", higher_is_better=True),
        Figure("speedup_per_core", "speedup/core", higher_is_better=True),
        Figure("cold_wall_s", "cold wall s", higher_is_better=False),
        Figure("startup_s", "start-up s", higher_is_better=False),
    ),
    headline="speedup",
    n=16,
    quick_n=8,
    timeout=240.0,
    systems=(
        System(
            "tokengate",
            "tokengate",
            run_tokengate,
            kind="tokengate",
            note="OperationsCoordinator() defaults, weight heavy -> its worker processes; "
            "start-up s: start() until every worker process is ready",
        ),
        System("processpool", f"ProcessPoolExecutor({_CORES})", run_processpool),
        System("loky", f"loky({_CORES})", run_loky, requires=("loky",)),
        System(
            "dask",
            f"Dask LocalCluster({_CORES} processes x 1 thread)",
            run_dask,
            requires=("distributed",),
        ),
        System("threadpool", f"ThreadPoolExecutor({_CORES})", run_threadpool),
        System("serial", "serial (one core)", run_serial, kind="floor"),
    ),
)


# -- B2o ------------------------------------------------------------------------------------------


def _round_trips(p: CaseParams) -> int:
    return QUICK_ROUND_TRIPS if p.quick else ROUND_TRIPS


def run_overhead_tokengate(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import noop_process

    trips = _round_trips(p)
    with OperationsCoordinator() as coordinator:
        wait_process_lane(coordinator)
        noop_process(-1).get(timeout=10)
        t0 = perf()
        tokens = [noop_process(i) for i in range(p.n)]
        results = [t.get(timeout=RESULT_TIMEOUT_S) for t in tokens]
        bulk = perf() - t0
        t1 = perf()
        for i in range(trips):
            noop_process(i).get(timeout=10)
        trip = perf() - t1
    if results != list(range(p.n)):
        raise AssertionError("wrong results")
    return {"us_per_task": bulk / p.n * 1e6, "round_trip_us": trip / trips * 1e6}


def _pool_overhead(pool: Any, p: CaseParams) -> Figures:
    trips = _round_trips(p)
    for f in [pool.submit(noop_plain, i) for i in range(8)]:  # start the workers
        f.result()
    t0 = perf()
    futures = [pool.submit(noop_plain, i) for i in range(p.n)]
    results = [f.result() for f in futures]
    bulk = perf() - t0
    t1 = perf()
    for i in range(trips):
        pool.submit(noop_plain, i).result()
    trip = perf() - t1
    if results != list(range(p.n)):
        raise AssertionError("wrong results")
    return {"us_per_task": bulk / p.n * 1e6, "round_trip_us": trip / trips * 1e6}


def run_overhead_processpool(p: CaseParams) -> Figures:
    with ProcessPoolExecutor(p.cores) as pool:
        return _pool_overhead(pool, p)


def run_overhead_loky(p: CaseParams) -> Figures:
    loky = importlib.import_module("loky")
    pool = loky.get_reusable_executor(max_workers=p.cores)
    try:
        return _pool_overhead(pool, p)
    finally:
        pool.shutdown()


SCENARIO_OVERHEAD = Scenario(
    id="B2o",
    title="process task overhead",
    description=(
        "trivial process tasks noop(i) -> i, submit all then gather after the workers are "
        f"ready; then {ROUND_TRIPS} ({QUICK_ROUND_TRIPS} in --quick) one-at-a-time round trips"
    ),
    figures=(
        Figure("us_per_task", "µs/task", higher_is_better=False),
        Figure("round_trip_us", "round trip µs", higher_is_better=False),
    ),
    headline="us_per_task",
    n=5_000,
    quick_n=1_000,
    systems=(
        System(
            "tokengate",
            "tokengate executor=process",
            run_overhead_tokengate,
            kind="tokengate",
            note="a task tagged executor: process, OperationsCoordinator() defaults",
        ),
        System("processpool", f"ProcessPoolExecutor({_CORES}).submit", run_overhead_processpool),
        System("loky", f"loky({_CORES}).submit", run_overhead_loky, requires=("loky",)),
    ),
)
