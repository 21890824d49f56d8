"""B6 mixed orchestrator: the Quick-Proof's Proof 3 load, replayed on tokengate and its peers.

The waves are those of ``tokengate demo mixed``: every 0.1-1.0 s, 10-20 calls drawn from the
Quick-Proof's 11 operation types (CPU work and storage-tier file writes mixed), from
``tokengate.demos.mixed.plan_wave`` with a fixed seed, on a fixed schedule (a wave that is
submitted late does not shift the rest), for N seconds. Every system gets the same waves.

Latency is measured identically for every system: from just before the submit call to the
future's done-callback. tokengate runs the decorated functions; the peers run the same bodies
undecorated (``fn.__wrapped__``). ProcessPoolExecutor workers get the function by module and
name (so it pickles) and are started before the clock.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tokengate.bench._b2_scaling import wait_process_lane
from tokengate.bench._model import CaseParams, Figure, Figures, Scenario, System, usable_cores

if TYPE_CHECKING:
    from tokengate import OperationsCoordinator

__all__ = ["SCENARIO", "SEED", "Span", "percentile"]

SEED = 6
#: The module of the waves' functions, imported by every worker process before the clock.
BODIES = "tokengate.demos.mixed"
THREADS = 8
DRAIN_TIMEOUT_S = 60.0
#: The Quick-Proof's Proof 3 runs (its own 8-core machine), p50 / p95 / max in ms:
#: 60.6 s, 120 waves, 1,789 tasks; and 900.1 s, 1,731 waves, 26,189 tasks.
SEED_60S_MS = (18.0, 36.0, 53.0)
SEED_900S_MS = (16.0, 36.0, 72.0)

Submit = Callable[[Any, tuple[Any, ...]], "Future[Any]"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0 < q <= 100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def schedule(
    duration: float, base: str
) -> Iterator[tuple[float, list[tuple[Any, tuple[Any, ...]]]]]:
    """(seconds from the start, the wave's calls) for every wave of a run, the same every time."""
    from tokengate.demos.mixed import next_gap, plan_wave

    rng = random.Random(SEED)
    at, wave = 0.0, 0
    while at < duration:
        yield at, plan_wave(rng, base, wave)
        at += next_gap(rng)
        wave += 1


Span = tuple[float, float]  # a task's submit and done-callback times, time.perf_counter()


class _Outcomes:
    """Done-callbacks: latency and span of each finished future, resolved / failed counts."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.spans: list[Span] = []
        self.resolved = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)

    def track(self, future: Future[Any], t0: float) -> None:
        def done(f: Future[Any]) -> None:
            end = time.perf_counter()
            ok = not f.cancelled() and f.exception() is None
            with self._lock:
                self.latencies.append(end - t0)
                self.spans.append((t0, end))
                if ok:
                    self.resolved += 1
                else:
                    self.failed += 1
                self._finished.notify_all()

        future.add_done_callback(done)

    def wait(self, count: int) -> None:
        with self._finished:
            if not self._finished.wait_for(
                lambda: self.resolved + self.failed >= count, DRAIN_TIMEOUT_S
            ):
                raise TimeoutError(
                    f"{self.resolved + self.failed} of {count} tasks finished "
                    f"{DRAIN_TIMEOUT_S:g} s after the last wave"
                )


def drive(submit: Submit, duration: float, spans: list[Span] | None = None) -> Figures:
    """Replay the waves through ``submit``; wait for every task; return the figures (and add
    every task's span to ``spans``, if given)."""
    outcomes = _Outcomes()
    pause = threading.Event()
    submitted = waves = 0
    with tempfile.TemporaryDirectory(prefix="tokengate_b6_") as base:
        start = time.perf_counter()
        for at, calls in schedule(duration, base):
            delay = start + at - time.perf_counter()
            if delay > 0:
                pause.wait(delay)
            for fn, args in calls:
                t0 = time.perf_counter()
                outcomes.track(submit(fn, args), t0)
                submitted += 1
            waves += 1
        outcomes.wait(submitted)
        wall = time.perf_counter() - start
    if spans is not None:
        spans.extend(outcomes.spans)
    lat = outcomes.latencies
    return {
        "waves": waves,
        "submitted": submitted,
        "resolved": outcomes.resolved,
        "failed": outcomes.failed,
        "p50_ms": percentile(lat, 50) * 1000,
        "p95_ms": percentile(lat, 95) * 1000,
        "max_ms": max(lat, default=0.0) * 1000,
        "wall_s": wall,
    }


@contextlib.contextmanager
def started_coordinator() -> Iterator[OperationsCoordinator]:
    """A coordinator as B6 runs on it: before the clock, as for the process pool, its worker
    processes are up and have imported the bodies."""
    from tokengate import OperationsCoordinator

    with OperationsCoordinator(
        process_initializer=importlib.import_module, process_initargs=(BODIES,)
    ) as coordinator:
        wait_process_lane(coordinator)
        yield coordinator


def run_tokengate(p: CaseParams) -> Figures:
    with started_coordinator():
        return drive(lambda fn, args: fn(*args), p.n)


def run_tokengate_dask(p: CaseParams) -> Figures:
    from tokengate import OperationsCoordinator

    with OperationsCoordinator(backend="dask", address=p.address) as coordinator:
        backend: Any = coordinator.backend
        # Before the clock, as for the process pool: every worker imports the bodies.
        backend.client.run(importlib.import_module, BODIES)
        return drive(lambda fn, args: fn(*args), p.n)


def run_threadpool(p: CaseParams) -> Figures:
    with ThreadPoolExecutor(THREADS) as pool:
        return drive(lambda fn, args: pool.submit(fn.__wrapped__, *args), p.n)


def call_by_name(module: str, name: str, args: tuple[Any, ...]) -> Any:
    """Run the undecorated body of ``module.name`` (a worker process imports it by name)."""
    return getattr(importlib.import_module(module), name).__wrapped__(*args)


def _ready(_: int) -> int:
    importlib.import_module(BODIES)
    return 0


def run_processpool(p: CaseParams) -> Figures:
    workers = usable_cores()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_ready, range(workers * 4)))  # start the workers and import the bodies
        return drive(
            lambda fn, args: pool.submit(call_by_name, fn.__module__, fn.__name__, args), p.n
        )


SCENARIO = Scenario(
    id="B6",
    title="seed mixed orchestrator",
    description=(
        "the Quick-Proof's Proof 3 load: waves every 0.1-1.0 s of 10-20 tasks drawn from its 11 "
        f"operation types (CPU and storage-tier writes mixed), the same waves (seed {SEED}) for "
        "every system; latency from submit to done-callback"
    ),
    figures=(
        Figure("waves", "waves", kind="count"),
        Figure("submitted", "submitted", kind="count"),
        Figure("resolved", "resolved", kind="count"),
        Figure("failed", "failed", kind="count"),
        Figure("p50_ms", "p50 ms", higher_is_better=False),
        Figure("p95_ms", "p95 ms", higher_is_better=False),
        Figure("max_ms", "max ms", higher_is_better=False),
        Figure("wall_s", "wall s", higher_is_better=False),
    ),
    headline="p95_ms",
    n=60,
    quick_n=10,
    n_label="seconds",
    timeout=180.0,
    quick_timeout=90.0,
    notes=(
        "The Quick-Proof's published figures for this load, on its own 8-core machine: "
        "p50 / p95 / max {} / {} / {} ms over 60.6 s (120 waves, 1,789 tasks) and "
        "{} / {} / {} ms over 900 s (1,731 waves, 26,189 tasks). Targets for tokengate: p50 "
        "under 2 ms, p95 under 10 ms on 2 cores.".format(
            *(f"{v:g}" for v in SEED_60S_MS), *(f"{v:g}" for v in SEED_900S_MS)
        ),
    ),
    systems=(
        System(
            "tokengate",
            "tokengate",
            run_tokengate,
            kind="tokengate",
            note="OperationsCoordinator() defaults; its worker processes started and the "
            "bodies' module imported before the clock (process_initializer, wait_ready()), as "
            "for the process pool; the demo's decorated functions",
        ),
        System(
            "tokengate-dask",
            "tokengate on Dask",
            run_tokengate_dask,
            kind="tokengate",
            requires=("distributed",),
            backend="dask",
            note="OperationsCoordinator(backend='dask'): a LocalCluster sized to the machine "
            "(or --address), started and warmed up before the clock",
        ),
        System(
            "threadpool-8",
            f"ThreadPoolExecutor({THREADS})",
            run_threadpool,
            note="the same bodies undecorated (fn.__wrapped__)",
        ),
        System(
            "processpool",
            f"ProcessPoolExecutor({usable_cores()})",
            run_processpool,
            note="one process per usable core, started before the clock; functions sent by "
            "module and name, arguments and results pickled",
        ),
    ),
)
