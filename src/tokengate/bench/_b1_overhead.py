"""B1 overhead: 100,000 tasks ``noop(i) -> i``, submit all, then gather all.

Every system gets one warm-up task first (so worker start-up is not charged to the tasks), then
the clock runs from the first submit to the last result. Process pools, loky, Dask and Ray are
scaled down to 5,000 tasks; the figures are per task, so they compare.

``tokengate-map`` is ``noop.map(range(n))`` with its defaults (cheap calls share tokens: see
``_batches.py``), compared with ``ProcessPoolExecutor(2).map(chunksize=256)``; its submit figure
is near zero, since the map is lazy.

``tokengate-dask`` (``tokengate bench --backend dask``) is tokengate on its Dask backend, on a
cluster of the same shape as the raw Dask peers (or the same scheduler, with ``--address``); its
ratio is taken against ``dask-submit``, raw ``client.submit``: the Dask backend's own overhead.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from tokengate.bench._bodies import noop_plain
from tokengate.bench._model import CaseParams, Figure, Figures, Scenario, System

__all__ = ["SCENARIO"]

GATHER_TIMEOUT_S = 30.0
SLOW_N, SLOW_QUICK_N = 5_000, 500


def _figures(n: int, t0: float, t1: float, t2: float) -> Figures:
    total = t2 - t0
    return {
        "tasks_per_s": n / total,
        "us_per_task": total / n * 1e6,
        "submit_us_per_task": (t1 - t0) / n * 1e6,
    }


def _check(results: Iterable[int], n: int) -> None:
    got = list(results)
    if got != list(range(n)):
        raise AssertionError(f"wrong results: {len(got)} results, expected 0..{n - 1} in order")


def run_tokengate(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import noop

    with OperationsCoordinator():
        noop(-1).get(timeout=GATHER_TIMEOUT_S)
        t0 = time.perf_counter()
        tokens = [noop(i) for i in range(p.n)]
        t1 = time.perf_counter()
        results = [t.get(timeout=GATHER_TIMEOUT_S) for t in tokens]
        t2 = time.perf_counter()
    _check(results, p.n)
    return _figures(p.n, t0, t1, t2)


def run_tokengate_map(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import noop

    with OperationsCoordinator():
        list(noop.map(range(-4, 0)))
        t0 = time.perf_counter()
        it = noop.map(range(p.n))  # lazy: submits as results are taken
        t1 = time.perf_counter()
        results = list(it)
        t2 = time.perf_counter()
    _check(results, p.n)
    return _figures(p.n, t0, t1, t2)


def _run_executor_submit(ex: Any, n: int) -> Figures:
    ex.submit(noop_plain, -1).result(timeout=GATHER_TIMEOUT_S)
    t0 = time.perf_counter()
    futures = [ex.submit(noop_plain, i) for i in range(n)]
    t1 = time.perf_counter()
    results = [f.result(timeout=GATHER_TIMEOUT_S) for f in futures]
    t2 = time.perf_counter()
    _check(results, n)
    return _figures(n, t0, t1, t2)


def run_threadpool(p: CaseParams) -> Figures:
    with ThreadPoolExecutor(4) as ex:
        return _run_executor_submit(ex, p.n)


def run_processpool_submit(p: CaseParams) -> Figures:
    with ProcessPoolExecutor(2) as ex:
        return _run_executor_submit(ex, p.n)


def run_processpool_map(p: CaseParams) -> Figures:
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(noop_plain, range(-4, 0)))
        t0 = time.perf_counter()
        it = ex.map(noop_plain, range(p.n), chunksize=256)  # submits every chunk at once
        t1 = time.perf_counter()
        results = list(it)
        t2 = time.perf_counter()
    _check(results, p.n)
    return _figures(p.n, t0, t1, t2)


def run_loky(p: CaseParams) -> Figures:
    loky = importlib.import_module("loky")
    ex = loky.get_reusable_executor(max_workers=2)
    try:
        return _run_executor_submit(ex, p.n)
    finally:
        ex.shutdown(wait=True)


def _dask_client(p: CaseParams) -> tuple[Any, Any]:
    """(cluster or None, client): the scheduler at ``p.address``, else a LocalCluster."""
    distributed = importlib.import_module("distributed")
    if p.address is not None:
        return None, distributed.Client(p.address)
    cluster = distributed.LocalCluster(
        processes=False, n_workers=1, threads_per_worker=4, dashboard_address=None
    )
    return cluster, distributed.Client(cluster)


def _close(cluster: Any, client: Any) -> None:
    client.close()
    if cluster is not None:
        cluster.close()


def _on_dask(
    p: CaseParams,
    warm_up: Callable[[Any], object],
    submit_all: Callable[[Any], Any],
    gather: Callable[[Any, Any], list[int]],
) -> Figures:
    """One timed B1 run on a Dask client (a LocalCluster, or ``p.address``): warm up, submit
    all (clock), gather all (clock), close, check. Each Dask case differs only in the three."""
    cluster, client = _dask_client(p)
    try:
        warm_up(client)
        t0 = time.perf_counter()
        pending = submit_all(client)
        t1 = time.perf_counter()
        results = gather(client, pending)
        t2 = time.perf_counter()
    finally:
        _close(cluster, client)
    _check(results, p.n)
    return _figures(p.n, t0, t1, t2)


def _dask_warm_up(client: Any) -> object:
    return client.submit(noop_plain, -1, pure=False).result(timeout=GATHER_TIMEOUT_S)


def run_tokengate_dask(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.backends import DaskBackend
    from tokengate.bench._tasks import noop

    coordinator: Any = None

    def warm_up(client: Any) -> object:
        nonlocal coordinator
        coordinator = OperationsCoordinator(backend=DaskBackend(client=client)).start()
        try:
            return noop(-1).get(timeout=GATHER_TIMEOUT_S)
        except BaseException:
            coordinator.stop(cancel_pending=True)
            raise

    def gather(_: Any, tokens: list[Any]) -> list[int]:
        try:
            return [t.get(timeout=GATHER_TIMEOUT_S) for t in tokens]
        finally:
            coordinator.stop()

    return _on_dask(p, warm_up, lambda _: [noop(i) for i in range(p.n)], gather)


def run_dask_submit(p: CaseParams) -> Figures:
    return _on_dask(
        p,
        _dask_warm_up,
        lambda client: [client.submit(noop_plain, i, pure=False) for i in range(p.n)],
        lambda client, futures: client.gather(futures),
    )


def run_dask_map(p: CaseParams) -> Figures:
    return _on_dask(
        p,
        _dask_warm_up,
        lambda client: client.map(noop_plain, range(p.n), pure=False),
        lambda client, futures: client.gather(futures),
    )


def run_ray(p: CaseParams) -> Figures:
    ray = importlib.import_module("ray")
    ray.init(num_cpus=p.cores, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(noop_plain)
        ray.get(remote.remote(-1), timeout=GATHER_TIMEOUT_S)
        t0 = time.perf_counter()
        refs = [remote.remote(i) for i in range(p.n)]
        t1 = time.perf_counter()
        results = ray.get(refs, timeout=GATHER_TIMEOUT_S)
        t2 = time.perf_counter()
    finally:
        ray.shutdown()
    _check(results, p.n)
    return _figures(p.n, t0, t1, t2)


def run_deque_floor(p: CaseParams) -> Figures:
    """The floor: one producer thread appends to a deque, one consumer thread pops and runs.

    The consumer only waits on an Event when the deque is empty (clear, re-check, then wait, so
    no wake-up is lost); the producer sets the Event only when it is clear.
    """
    n = p.n
    queue: deque[int] = deque()
    results: list[int] = [0] * n
    ready = threading.Event()
    done = threading.Event()

    def consume() -> None:
        got = 0
        while got < n:
            try:
                i = queue.popleft()
            except IndexError:
                ready.clear()
                if not queue:
                    ready.wait()
                continue
            results[i] = noop_plain(i)
            got += 1
        done.set()

    consumer = threading.Thread(target=consume, name="floor-consumer")
    consumer.start()
    t0 = time.perf_counter()
    for i in range(n):
        queue.append(i)
        if not ready.is_set():
            ready.set()
    t1 = time.perf_counter()
    if not done.wait(GATHER_TIMEOUT_S):
        raise TimeoutError(f"the floor's consumer did not finish {n} items in {GATHER_TIMEOUT_S} s")
    t2 = time.perf_counter()
    consumer.join()
    _check(results, n)
    return _figures(n, t0, t1, t2)


SCENARIO = Scenario(
    id="B1",
    title="overhead",
    description="tasks noop(i) -> i, submit all, then gather all (one warm-up task first)",
    figures=(
        Figure("tasks_per_s", "tasks/s", higher_is_better=True),
        Figure("us_per_task", "µs/task", higher_is_better=False),
        Figure("submit_us_per_task", "submit µs/task", higher_is_better=False),
    ),
    headline="tasks_per_s",
    n=100_000,
    quick_n=10_000,
    min_runs=5,  # ratios of a few microseconds: three runs are too few on a noisy machine
    systems=(
        System(
            "tokengate",
            "tokengate",
            run_tokengate,
            kind="tokengate",
            note="OperationsCoordinator() with its defaults",
        ),
        System(
            "tokengate-map",
            "tokengate fn.map",
            run_tokengate_map,
            kind="tokengate",
            compare_to="processpool-2-map",
            note="noop.map(range(n)) with its defaults (automatic batches); ratio to "
            "ProcessPoolExecutor(2).map(chunksize=256)",
        ),
        System(
            "tokengate-dask",
            "tokengate on Dask",
            run_tokengate_dask,
            kind="tokengate",
            requires=("distributed",),
            n=SLOW_N,
            quick_n=SLOW_QUICK_N,
            backend="dask",
            compare_to="dask-submit",
            note="OperationsCoordinator(backend=DaskBackend(client=...)) on the dask-submit "
            "cluster's shape (or --address); ratio to dask-submit: the backend's own overhead",
        ),
        System("threadpool-4", "ThreadPoolExecutor(4) submit", run_threadpool),
        System(
            "processpool-2-submit",
            "ProcessPoolExecutor(2) submit",
            run_processpool_submit,
            n=SLOW_N,
            quick_n=SLOW_QUICK_N,
        ),
        System(
            "processpool-2-map", "ProcessPoolExecutor(2) map chunksize=256", run_processpool_map
        ),
        System(
            "loky-2", "loky(2) submit", run_loky, requires=("loky",), n=SLOW_N, quick_n=SLOW_QUICK_N
        ),
        System(
            "dask-submit",
            "Dask LocalCluster submit",
            run_dask_submit,
            requires=("distributed",),
            n=SLOW_N,
            quick_n=SLOW_QUICK_N,
            note="LocalCluster(processes=False, 1 worker x 4 threads), pure=False",
        ),
        System(
            "dask-map",
            "Dask LocalCluster map",
            run_dask_map,
            requires=("distributed",),
            n=SLOW_N,
            quick_n=SLOW_QUICK_N,
            note="LocalCluster(processes=False, 1 worker x 4 threads), pure=False",
        ),
        System(
            "ray",
            "Ray remote",
            run_ray,
            requires=("ray",),
            n=SLOW_N,
            quick_n=SLOW_QUICK_N,
            note="ray.init(num_cpus=usable cores)",
        ),
        System("deque-floor", "floor: deque hand-off, 2 threads", run_deque_floor, kind="floor"),
    ),
)
