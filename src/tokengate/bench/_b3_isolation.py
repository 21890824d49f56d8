"""B3 isolation: heavy CPU tasks must not starve the light ones.

N (40) heavy pure-Python tasks of ~50 ms are submitted at once; meanwhile one light task
(``sum(range(1000))``) is submitted every 10 ms for 3 s (1 s in --quick, where the heavy tasks
are a quarter the size), without waiting for any. Light latency is from submit to the future's
done-callback; the heavy makespan from the first heavy submit to the last heavy result. Every
system's workers are started before the clock.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from tokengate.bench._b2_scaling import RESULT_TIMEOUT_S, quick_steps, wait_process_lane
from tokengate.bench._b6_mixed import percentile
from tokengate.bench._bodies import burn, light_work, noop_plain
from tokengate.bench._model import CaseParams, Figure, Figures, Scenario, System, usable_cores

__all__ = ["SCENARIO"]

perf = time.perf_counter

B3_STEPS = 1_250_000  # ~50 ms on the 2-core development machine
LIGHT_EVERY_S = 0.010
LIGHT_FOR_S, QUICK_LIGHT_FOR_S = 3.0, 1.0
POOL_WORKERS = 4


def _light_for(p: CaseParams) -> float:
    return QUICK_LIGHT_FOR_S if p.quick else LIGHT_FOR_S


def _latency(into: list[float], t0: float) -> Callable[[Future[Any]], None]:
    def done(_: Future[Any]) -> None:
        into.append(perf() - t0)

    return done


def _light_loop(submit: Callable[[], Future[Any]], duration: float) -> list[float]:
    """One light task every 10 ms for ``duration`` s; each one's latency, submit to callback."""
    latencies: list[float] = []
    futures = []
    pause = threading.Event()
    start = tick = perf()
    while tick - start < duration:
        t0 = perf()
        future = submit()
        future.add_done_callback(_latency(latencies, t0))
        futures.append(future)
        tick += LIGHT_EVERY_S
        wait = tick - perf()
        if wait > 0:
            pause.wait(wait)
    for future in futures:
        future.result(timeout=RESULT_TIMEOUT_S)
    return latencies


def _track_makespan(futures: list[Future[Any]], t0: float) -> Callable[[], float]:
    """Returns a function that waits for every future and gives first-submit-to-last-done."""
    done = threading.Event()
    lock = threading.Lock()
    left = [len(futures)]
    end = [0.0]

    def finished(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                end[0] = perf()
                done.set()

    for f in futures:
        f.add_done_callback(finished)

    def makespan() -> float:
        if not done.wait(RESULT_TIMEOUT_S):
            raise TimeoutError(f"the heavy tasks did not finish in {RESULT_TIMEOUT_S:g} s")
        for f in futures:
            f.result()
        return end[0] - t0

    return makespan


def _figures(latencies: list[float], makespan: float) -> Figures:
    return {
        "light_p50_ms": percentile(latencies, 50) * 1e3,
        "light_p95_ms": percentile(latencies, 95) * 1e3,
        "light_max_ms": max(latencies, default=0.0) * 1e3,
        "heavy_makespan_s": makespan,
        "light_count": len(latencies),
    }


def run_tokengate(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import burn_task, light_task

    steps = quick_steps(p, B3_STEPS)
    with OperationsCoordinator() as coordinator:
        wait_process_lane(coordinator)
        light_task().get(timeout=10)  # warm the thread path too
        t0 = perf()
        heavy: list[Future[Any]] = [burn_task(steps) for _ in range(p.n)]
        makespan = _track_makespan(heavy, t0)
        latencies = _light_loop(light_task, _light_for(p))
        return _figures(latencies, makespan())


def _pool_b3(heavy_pool: Any, light_pool: Any, p: CaseParams) -> Figures:
    steps = quick_steps(p, B3_STEPS)
    for f in [heavy_pool.submit(noop_plain, i) for i in range(8)]:  # start the workers first
        f.result()
    light_pool.submit(light_work).result()
    t0 = perf()
    heavy = [heavy_pool.submit(burn, steps) for _ in range(p.n)]
    makespan = _track_makespan(heavy, t0)
    latencies = _light_loop(lambda: light_pool.submit(light_work), _light_for(p))
    return _figures(latencies, makespan())


def run_processpool(p: CaseParams) -> Figures:
    with ProcessPoolExecutor(POOL_WORKERS) as pool:
        return _pool_b3(pool, pool, p)


def run_threadpool(p: CaseParams) -> Figures:
    with ThreadPoolExecutor(POOL_WORKERS) as pool:
        return _pool_b3(pool, pool, p)


def run_loky(p: CaseParams) -> Figures:
    loky = importlib.import_module("loky")
    pool = loky.get_reusable_executor(max_workers=POOL_WORKERS)
    try:
        return _pool_b3(pool, pool, p)
    finally:
        pool.shutdown()


def run_split(p: CaseParams) -> Figures:
    """The hand-built split: heavy in ProcessPoolExecutor(cores), light on one thread."""
    with ProcessPoolExecutor(p.cores) as heavy, ThreadPoolExecutor(1) as light:
        return _pool_b3(heavy, light, p)


SCENARIO = Scenario(
    id="B3",
    title="isolation",
    description=(
        "heavy pure-Python tasks of ~50 ms submitted at once (a quarter of that in --quick); "
        f"meanwhile one light task sum(range(1000)) every {LIGHT_EVERY_S * 1000:g} ms for "
        f"{LIGHT_FOR_S:g} s ({QUICK_LIGHT_FOR_S:g} s in --quick); light latency submit to "
        "done-callback, heavy makespan first submit to last result"
    ),
    figures=(
        Figure("light_p50_ms", "light p50 ms", higher_is_better=False),
        Figure("light_p95_ms", "light p95 ms", higher_is_better=False),
        Figure("light_max_ms", "light max ms", higher_is_better=False),
        Figure("heavy_makespan_s", "heavy makespan s", higher_is_better=False),
        Figure("light_count", "light tasks", kind="count"),
    ),
    headline="light_p95_ms",
    n=40,
    quick_n=20,
    n_label="heavy",
    systems=(
        System(
            "tokengate",
            "tokengate",
            run_tokengate,
            kind="tokengate",
            note="OperationsCoordinator() defaults: heavy -> worker processes, light -> threads",
        ),
        System("processpool-4", f"ProcessPoolExecutor({POOL_WORKERS}), shared", run_processpool),
        System("threadpool-4", f"ThreadPoolExecutor({POOL_WORKERS}), shared", run_threadpool),
        System("loky-4", f"loky({POOL_WORKERS}), shared", run_loky, requires=("loky",)),
        System(
            "split",
            f"hand-built split: ProcessPoolExecutor({usable_cores()}) + 1 thread",
            run_split,
            note="heavy tasks in a process pool of one per core, light tasks on their own thread",
        ),
    ),
)
