"""B8 data-heavy process tasks: NumPy arrays passed to worker processes, every peer in one run.

* **B8 distinct**: ``n`` tasks, each summing its own 32 MB float64 array.
* **B8 broadcast**: one 256 MB array, ``n`` tasks each summing its ``1/n`` part.

tokengate passes the distinct arrays as they are (each copied once into shared memory, mapped by
its worker) and the broadcast array through ``coordinator.share()`` (placed in shared memory
once; each call sends only its place). The peers get the same inputs their usual way:
``ProcessPoolExecutor`` and loky pickle each argument, joblib memory-maps big arrays, Dask
scatters the broadcast array, Ray ``put``s it (each where installed). The floor sums in this
process, moving nothing. Pools are warmed with one small task before the clock starts; the
inputs are made inside the case, so ``RSS growth`` is what the caller held beyond its imports
(compare it with ``input MB``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from time import perf_counter
from typing import Any

from tokengate.bench._model import CaseParams, Figure, Figures, Scenario, System, usable_cores

__all__ = ["SCENARIO_BROADCAST", "SCENARIO_DISTINCT"]

_CORES = usable_cores()
DISTINCT_ITEMS, DISTINCT_QUICK_ITEMS = 4 * 1024 * 1024, 256 * 1024  # float64: 32 MB / 2 MB
BROADCAST_ITEMS, BROADCAST_QUICK_ITEMS = 32 * 1024 * 1024, 2 * 1024 * 1024  # 256 MB / 16 MB
_FIGURES = (
    Figure("wall_s", "wall s", higher_is_better=False),
    Figure("input_mb", "input MB"),
    Figure("rss_growth_mb", "RSS growth MB", higher_is_better=False),
)


def _numpy() -> Any:
    return importlib.import_module("numpy")


def _distinct(p: CaseParams) -> list[Any]:
    np = _numpy()
    items = DISTINCT_QUICK_ITEMS if p.quick else DISTINCT_ITEMS
    return [np.full(items, float(i)) for i in range(p.n)]


def _broadcast(p: CaseParams) -> Any:
    np = _numpy()
    return np.ones(BROADCAST_QUICK_ITEMS if p.quick else BROADCAST_ITEMS)


def _tiny() -> Any:
    return _numpy().zeros(1)


def _warm(run: Callable[[Any], Any], p: CaseParams) -> None:
    """Start every worker and import NumPy there before the clock starts (a few at once)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2 * p.cores) as threads:
        list(threads.map(run, [_tiny() for _ in range(2 * p.cores)]))


def _warm_tokens(call: Callable[[Any], Any], p: CaseParams) -> None:
    tokens = [call(_tiny()) for _ in range(2 * p.cores)]
    for token in tokens:
        token.get(timeout=60)


def _expect_distinct(arrays: list[Any], sums: Iterable[float]) -> None:
    got = list(sums)
    want = [float(a[0]) * len(a) for a in arrays]
    if got != want:
        raise AssertionError(f"B8 distinct: wrong sums {got[:3]}..., expected {want[:3]}...")


def _expect_broadcast(array: Any, sums: Iterable[float]) -> None:
    total = sum(sums)
    if total != float(len(array)):
        raise AssertionError(f"B8 broadcast: the parts add up to {total}, not {len(array)}")


def _figures(seconds: float, inputs: int) -> Figures:
    return {"wall_s": seconds, "input_mb": inputs / 2**20}


# -- B8 distinct -----------------------------------------------------------------------------------
def _pool_distinct(make: Callable[[], Any], p: CaseParams, *, close: bool = True) -> Figures:
    from tokengate.bench._bodies import array_sum

    pool = make()
    try:
        _warm(lambda a: pool.submit(array_sum, a).result(), p)
        arrays = _distinct(p)
        t0 = perf_counter()
        futures = [pool.submit(array_sum, a) for a in arrays]
        sums = [f.result() for f in futures]
        seconds = perf_counter() - t0
    finally:
        if close:
            pool.shutdown()
    _expect_distinct(arrays, sums)
    return _figures(seconds, sum(a.nbytes for a in arrays))


def run_distinct_floor(p: CaseParams) -> Figures:
    from tokengate.bench._bodies import array_sum

    arrays = _distinct(p)
    t0 = perf_counter()
    sums = [array_sum(a) for a in arrays]
    seconds = perf_counter() - t0
    _expect_distinct(arrays, sums)
    return _figures(seconds, sum(a.nbytes for a in arrays))


def run_distinct_tokengate(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import array_sum_task

    with OperationsCoordinator(workers_per_core=1) as coordinator:
        if not coordinator.lanes["process"].wait_ready(60):  # type: ignore[attr-defined]
            raise RuntimeError("the worker processes did not start")
        _warm_tokens(array_sum_task, p)
        arrays = _distinct(p)
        t0 = perf_counter()
        tokens = [array_sum_task(a) for a in arrays]
        sums = [t.get(timeout=120) for t in tokens]
        seconds = perf_counter() - t0
    _expect_distinct(arrays, sums)
    return _figures(seconds, sum(a.nbytes for a in arrays))


def run_distinct_processpool(p: CaseParams) -> Figures:
    return _pool_distinct(lambda: ProcessPoolExecutor(p.cores), p)


def run_distinct_loky(p: CaseParams) -> Figures:
    loky = importlib.import_module("loky")
    return _pool_distinct(lambda: loky.get_reusable_executor(max_workers=p.cores), p, close=False)


def run_distinct_joblib(p: CaseParams) -> Figures:
    joblib = importlib.import_module("joblib")
    from tokengate.bench._bodies import array_sum

    with joblib.Parallel(n_jobs=p.cores) as parallel:
        parallel(joblib.delayed(array_sum)(_tiny()) for _ in range(2 * p.cores))  # warm
        arrays = _distinct(p)
        t0 = perf_counter()
        sums = parallel(joblib.delayed(array_sum)(a) for a in arrays)
        seconds = perf_counter() - t0
    _expect_distinct(arrays, sums)
    return _figures(seconds, sum(a.nbytes for a in arrays))


def _dask_client(p: CaseParams) -> tuple[Any, Any]:
    distributed = importlib.import_module("distributed")
    if p.address is not None:
        return distributed.Client(p.address), None
    cluster = distributed.LocalCluster(
        n_workers=p.cores, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    return distributed.Client(cluster), cluster


def run_distinct_dask(p: CaseParams) -> Figures:
    from tokengate.bench._bodies import array_sum

    client, cluster = _dask_client(p)
    try:
        client.gather([client.submit(array_sum, _tiny(), pure=False) for _ in range(2 * p.cores)])
        arrays = _distinct(p)
        t0 = perf_counter()
        sums = client.gather([client.submit(array_sum, a, pure=False) for a in arrays])
        seconds = perf_counter() - t0
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    _expect_distinct(arrays, sums)
    return _figures(seconds, sum(a.nbytes for a in arrays))


def run_distinct_ray(p: CaseParams) -> Figures:
    ray = importlib.import_module("ray")
    from tokengate.bench._bodies import array_sum

    ray.init(num_cpus=p.cores, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(array_sum)
        ray.get([remote.remote(_tiny()) for _ in range(2 * p.cores)])
        arrays = _distinct(p)
        t0 = perf_counter()
        sums = ray.get([remote.remote(a) for a in arrays])
        seconds = perf_counter() - t0
    finally:
        ray.shutdown()
    _expect_distinct(arrays, sums)
    return _figures(seconds, sum(a.nbytes for a in arrays))


# -- B8 broadcast ----------------------------------------------------------------------------------
def _pool_broadcast(make: Callable[[], Any], p: CaseParams, *, close: bool = True) -> Figures:
    from tokengate.bench._bodies import part_sum

    pool = make()
    try:
        _warm(lambda a: pool.submit(part_sum, a, 0, 1).result(), p)
        array = _broadcast(p)
        t0 = perf_counter()
        futures = [pool.submit(part_sum, array, i, p.n) for i in range(p.n)]
        sums = [f.result() for f in futures]
        seconds = perf_counter() - t0
    finally:
        if close:
            pool.shutdown()
    _expect_broadcast(array, sums)
    return _figures(seconds, array.nbytes)


def run_broadcast_floor(p: CaseParams) -> Figures:
    from tokengate.bench._bodies import part_sum

    array = _broadcast(p)
    t0 = perf_counter()
    sums = [part_sum(array, i, p.n) for i in range(p.n)]
    seconds = perf_counter() - t0
    _expect_broadcast(array, sums)
    return _figures(seconds, array.nbytes)


def run_broadcast_tokengate(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import part_sum_task

    with OperationsCoordinator(workers_per_core=1) as coordinator:
        if not coordinator.lanes["process"].wait_ready(60):  # type: ignore[attr-defined]
            raise RuntimeError("the worker processes did not start")
        _warm_tokens(lambda a: part_sum_task(a, 0, 1), p)
        array = _broadcast(p)
        t0 = perf_counter()
        shared = coordinator.share(array)
        tokens = [part_sum_task(shared, i, p.n) for i in range(p.n)]
        sums = [t.get(timeout=120) for t in tokens]
        seconds = perf_counter() - t0
        del shared, tokens
    _expect_broadcast(array, sums)
    return _figures(seconds, array.nbytes)


def run_broadcast_processpool(p: CaseParams) -> Figures:
    return _pool_broadcast(lambda: ProcessPoolExecutor(p.cores), p)


def run_broadcast_loky(p: CaseParams) -> Figures:
    loky = importlib.import_module("loky")
    return _pool_broadcast(lambda: loky.get_reusable_executor(max_workers=p.cores), p, close=False)


def run_broadcast_joblib(p: CaseParams) -> Figures:
    joblib = importlib.import_module("joblib")
    from tokengate.bench._bodies import part_sum

    with joblib.Parallel(n_jobs=p.cores) as parallel:
        parallel(joblib.delayed(part_sum)(_tiny(), 0, 1) for _ in range(2 * p.cores))
        array = _broadcast(p)
        t0 = perf_counter()
        sums = parallel(joblib.delayed(part_sum)(array, i, p.n) for i in range(p.n))
        seconds = perf_counter() - t0
    _expect_broadcast(array, sums)
    return _figures(seconds, array.nbytes)


def run_broadcast_dask(p: CaseParams) -> Figures:
    from tokengate.bench._bodies import part_sum

    client, cluster = _dask_client(p)
    try:
        client.gather(
            [client.submit(part_sum, _tiny(), 0, 1, pure=False) for _ in range(2 * p.cores)]
        )
        array = _broadcast(p)
        t0 = perf_counter()
        [future] = client.scatter([array], broadcast=True)
        sums = client.gather([client.submit(part_sum, future, i, p.n) for i in range(p.n)])
        seconds = perf_counter() - t0
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    _expect_broadcast(array, sums)
    return _figures(seconds, array.nbytes)


def run_broadcast_ray(p: CaseParams) -> Figures:
    ray = importlib.import_module("ray")
    from tokengate.bench._bodies import part_sum

    ray.init(num_cpus=p.cores, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(part_sum)
        ray.get([remote.remote(_tiny(), 0, 1) for _ in range(2 * p.cores)])
        array = _broadcast(p)
        t0 = perf_counter()
        ref = ray.put(array)
        sums = ray.get([remote.remote(ref, i, p.n) for i in range(p.n)])
        seconds = perf_counter() - t0
    finally:
        ray.shutdown()
    _expect_broadcast(array, sums)
    return _figures(seconds, array.nbytes)


def _systems(kind: str) -> tuple[System, ...]:
    g = globals()
    np = ("numpy",)
    return (
        System("floor", "one process, nothing moved", g[f"run_{kind}_floor"], "floor", np),
        System(
            "tokengate", "tokengate (process lane)", g[f"run_{kind}_tokengate"], "tokengate", np
        ),
        System(
            "processpool",
            f"ProcessPoolExecutor({_CORES})",
            g[f"run_{kind}_processpool"],
            requires=np,
        ),
        System("loky", f"loky({_CORES})", g[f"run_{kind}_loky"], requires=("numpy", "loky")),
        System(
            "joblib",
            f"joblib Parallel({_CORES})",
            g[f"run_{kind}_joblib"],
            requires=("numpy", "joblib"),
        ),
        System(
            "dask",
            f"Dask LocalCluster({_CORES})",
            g[f"run_{kind}_dask"],
            requires=("numpy", "distributed"),
        ),
        System("ray", "Ray", g[f"run_{kind}_ray"], requires=("numpy", "ray")),
    )


SCENARIO_DISTINCT = Scenario(
    id="B8",
    title="B8 distinct: big arrays to worker processes",
    description="n tasks, each summing its own 32 MB float64 array (2 MB with --quick)",
    figures=_FIGURES,
    headline="wall_s",
    n=16,
    quick_n=16,
    systems=_systems("distinct"),
    timeout=300.0,
    quick_timeout=120.0,
    notes=("inputs made inside the case: RSS growth includes them (compare with input MB)",),
)

SCENARIO_BROADCAST = Scenario(
    id="B8b",
    title="B8 broadcast: one big array, many tasks",
    description="one 256 MB float64 array (16 MB with --quick), n tasks each summing its 1/n",
    figures=_FIGURES,
    headline="wall_s",
    n=16,
    quick_n=16,
    systems=_systems("broadcast"),
    timeout=300.0,
    quick_timeout=120.0,
    notes=("inputs made inside the case: RSS growth includes them (compare with input MB)",),
)
