"""B7 nested fan-out: recursive ``fib(n)``, each task submitting its two children and waiting.

tokengate runs it with ``OperationsCoordinator(workers_per_core=2)``. The contrast is a
``ThreadPoolExecutor`` with the same number of workers, which deadlocks as soon as every worker
is blocked waiting on a child queued behind it. The case proves that (all workers blocked,
children queued, no progress over a window) and reports ``deadlocked`` instead of hanging.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter

from tokengate.bench._model import (
    CaseParams,
    Deadlocked,
    Figure,
    Figures,
    Scenario,
    System,
    usable_cores,
)

__all__ = ["SCENARIO", "fib_value", "task_count"]

WORKERS_PER_CORE = 2
STALL_WINDOW_S = 1.0
TOKENGATE_TIMEOUT_S, TOKENGATE_QUICK_TIMEOUT_S = 60.0, 20.0


def fib_value(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def task_count(n: int) -> int:
    """Tasks in the recursive tree of fib(n): one per call, 2 * fib(n + 1) - 1."""
    return 2 * fib_value(n + 1) - 1


def _figures(n: int, seconds: float) -> Figures:
    tasks = task_count(n)
    return {"completed": True, "wall_s": seconds, "tasks_per_s": tasks / seconds, "tasks": tasks}


def run_tokengate(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import fib

    limit = TOKENGATE_QUICK_TIMEOUT_S if p.quick else TOKENGATE_TIMEOUT_S
    coord = OperationsCoordinator(workers_per_core=WORKERS_PER_CORE)
    coord.start()
    t0 = perf_counter()
    root = fib(p.n)
    try:
        value = root.get(timeout=limit)
    except TimeoutError:
        if root.done():  # the task itself raised a TimeoutError: an error, not a stall
            coord.stop()
            raise
        # No stop(): its workers may be stuck for good; the harness leaves with os._exit.
        raise Deadlocked(
            f"fib({p.n}) gave no result in {limit:.0f} s", {"completed": False}
        ) from None
    except BaseException:
        coord.stop()
        raise
    seconds = perf_counter() - t0
    coord.stop()
    if value != fib_value(p.n):
        raise AssertionError(f"fib({p.n}) returned {value}, expected {fib_value(p.n)}")
    return _figures(p.n, seconds)


class _NestedPool:
    """fib on a ThreadPoolExecutor, counting submitted / started / finished tasks."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="b7")
        self.submitted = self.started = self.finished = 0
        self._lock = threading.Lock()

    def submit(self, n: int) -> Future[int]:
        with self._lock:
            self.submitted += 1
        return self.pool.submit(self.fib, n)

    def fib(self, n: int) -> int:
        with self._lock:
            self.started += 1
        try:
            if n < 2:
                return n
            left = self.submit(n - 1)
            right = self.submit(n - 2)
            return left.result() + right.result()
        finally:
            with self._lock:
                self.finished += 1

    def counts(self) -> tuple[int, int, int]:
        with self._lock:
            return self.submitted, self.started, self.finished


def run_threadpool(p: CaseParams) -> Figures:
    nested = _NestedPool(WORKERS_PER_CORE * p.cores)
    t0 = perf_counter()
    root = nested.submit(p.n)
    last: tuple[int, int, int] | None = None
    while True:
        try:
            value = root.result(timeout=STALL_WINDOW_S)
            break
        except TimeoutError:
            now = nested.counts()
            submitted, started, finished = now
            blocked, queued = started - finished, submitted - started
            if now == last and blocked == nested.workers and queued > 0:
                # No pool shutdown: its threads can never be joined; the harness os._exits.
                raise Deadlocked(
                    f"all {nested.workers} workers blocked waiting on children queued behind "
                    f"them ({queued} queued, {finished} of {task_count(p.n)} tasks done, "
                    f"no progress in {STALL_WINDOW_S:.0f} s)",
                    {"completed": False, "tasks_done": finished, "tasks_queued": queued},
                ) from None
            last = now
    seconds = perf_counter() - t0
    nested.pool.shutdown(wait=True)
    if value != fib_value(p.n):
        raise AssertionError(f"fib({p.n}) returned {value}, expected {fib_value(p.n)}")
    return _figures(p.n, seconds)


SCENARIO = Scenario(
    id="B7",
    title="nested fan-out",
    description=(
        "recursive fib(n), each task submits its two children as tasks and waits on them; "
        f"{WORKERS_PER_CORE} workers per usable core"
    ),
    figures=(
        Figure("completed", "completed", kind="bool"),
        Figure("wall_s", "wall s", higher_is_better=False),
        Figure("tasks_per_s", "tasks/s", higher_is_better=True),
        Figure("tasks", "tasks"),
    ),
    headline="wall_s",
    n=18,
    quick_n=14,
    n_label="n (fib)",
    timeout=120.0,
    quick_timeout=40.0,
    systems=(
        System(
            "tokengate",
            "tokengate",
            run_tokengate,
            kind="tokengate",
            timeout_status="deadlocked",
            note=f"OperationsCoordinator(workers_per_core={WORKERS_PER_CORE})",
        ),
        System(
            "threadpool",
            f"ThreadPoolExecutor({WORKERS_PER_CORE * usable_cores()})",
            run_threadpool,
            timeout_status="deadlocked",
            note="same worker count; expected to deadlock on nested waits (the contrast)",
        ),
    ),
)
