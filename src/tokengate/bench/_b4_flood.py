"""B4 flood memory: a producer faster than the workers.

Each of N tasks carries a fresh 4 KB ``bytes`` payload (``os.urandom``, so every page is
touched), sleeps 100 µs and returns the payload's length. No token is kept: a done-callback sums
the results and sets an Event when the count reaches N. The same load then goes through ``map``
over an N-item generator. The headline is the peak RSS of the case's own fresh process; tokengate
also runs at 2N to show that its memory is bounded by the mailboxes, not by N.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from tokengate.bench._bodies import flood_plain
from tokengate.bench._model import (
    PEAK_RSS,
    RSS_GROWTH,
    RSS_PER_TASK,
    CaseParams,
    Figure,
    Figures,
    Scenario,
    System,
)

__all__ = ["PAYLOAD_BYTES", "SCENARIO"]

PAYLOAD_BYTES = 4096
WAIT_TIMEOUT_S = 1800.0
N, QUICK_N = 200_000, 20_000


def payloads(n: int) -> Iterator[bytes]:
    return (os.urandom(PAYLOAD_BYTES) for _ in range(n))


class _Summer:
    """The done-callback: sums results under a lock, sets ``done`` at the N-th completion."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.total = 0
        self.count = 0
        self.first_error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, fut: Future[int]) -> None:
        exc = fut.exception()
        with self._lock:
            if exc is None:
                self.total += fut.result()
            elif self.first_error is None:
                self.first_error = exc
            self.count += 1
            if self.count == self.n:
                self.done.set()

    def wait(self) -> None:
        if not self.done.wait(WAIT_TIMEOUT_S):
            raise TimeoutError(f"{self.count} of {self.n} callbacks ran in {WAIT_TIMEOUT_S} s")
        if self.first_error is not None:
            raise self.first_error
        _check(self.total, self.n)


def _check(total: int, n: int) -> None:
    if total != n * PAYLOAD_BYTES:
        raise AssertionError(f"results summed to {total}, expected {n} x {PAYLOAD_BYTES}")


def _figures(n: int, seconds: float) -> Figures:
    return {"total_s": seconds, "tasks_per_s": n / seconds}


def run_tokengate_callback(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import flood

    summer = _Summer(p.n)
    with OperationsCoordinator():
        t0 = time.perf_counter()
        for payload in payloads(p.n):
            flood(payload).add_done_callback(summer)
        summer.wait()
        seconds = time.perf_counter() - t0
    return _figures(p.n, seconds)


def run_tokengate_map(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import flood

    with OperationsCoordinator():
        t0 = time.perf_counter()
        total = sum(flood.map(payloads(p.n)))
        seconds = time.perf_counter() - t0
    _check(total, p.n)
    return _figures(p.n, seconds)


def _threadpool_callback(workers: int, n: int) -> Figures:
    summer = _Summer(n)
    with ThreadPoolExecutor(workers) as ex:
        t0 = time.perf_counter()
        for payload in payloads(n):
            ex.submit(flood_plain, payload).add_done_callback(summer)
        summer.wait()
        seconds = time.perf_counter() - t0
    return _figures(n, seconds)


def run_threadpool_4_callback(p: CaseParams) -> Figures:
    return _threadpool_callback(4, p.n)


def run_threadpool_8_callback(p: CaseParams) -> Figures:
    return _threadpool_callback(8, p.n)


def run_threadpool_4_map(p: CaseParams) -> Figures:
    with ThreadPoolExecutor(4) as ex:
        t0 = time.perf_counter()
        total = sum(ex.map(flood_plain, payloads(p.n)))
        seconds = time.perf_counter() - t0
    _check(total, p.n)
    return _figures(p.n, seconds)


SCENARIO = Scenario(
    id="B4",
    title="flood memory",
    description=(
        "fresh 4 KB payload per task, 100 µs sleep, returns len(payload); no token kept "
        "(a done-callback sums), then wait for all; and the same through map over a generator"
    ),
    figures=(
        PEAK_RSS,
        RSS_GROWTH,
        RSS_PER_TASK,
        Figure("total_s", "total s", higher_is_better=False),
        Figure("tasks_per_s", "tasks/s", higher_is_better=True),
    ),
    headline="peak_rss_mb",
    n=N,
    quick_n=QUICK_N,
    systems=(
        System(
            "tokengate-callback",
            "tokengate callback",
            run_tokengate_callback,
            kind="tokengate",
            note="OperationsCoordinator() with its defaults",
        ),
        System("tokengate-map", "tokengate fn.map(generator)", run_tokengate_map, kind="tokengate"),
        System(
            "tokengate-callback-2n",
            "tokengate callback at 2N",
            run_tokengate_callback,
            kind="tokengate",
            n=2 * N,
            quick_n=2 * QUICK_N,
            note="same as tokengate callback with twice the tasks: RSS must not grow with N",
        ),
        System(
            "threadpool-4-callback", "ThreadPoolExecutor(4) callback", run_threadpool_4_callback
        ),
        System(
            "threadpool-8-callback", "ThreadPoolExecutor(8) callback", run_threadpool_8_callback
        ),
        System("threadpool-4-map", "ThreadPoolExecutor(4).map(generator)", run_threadpool_4_map),
    ),
)
