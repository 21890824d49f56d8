"""I/O: IOSURGE (the convergence engine on vs off), B5 JSON writes and B5b fsync writes.

* IOSURGE: N (400) tasks that each ``time.sleep(0.02)``, submitted at once; wall time with the
  convergence engine on and off, for a storage-tier task (I/O lane, tier FAST) and for an
  untagged light task (thread lane). Four tokengate rows, each with its ratio to the best peer:
  the engine's effect is the on row's ratio against the off row's.
* B5: N (2,000) tasks each writing a ~50 KB JSON file (``json.dump(..., indent=2)`` of the
  Quick-Proof's ``generate_medium_json`` record), tier FAST (limit 50); files/s versus serial,
  ``ThreadPoolExecutor(50)`` and asyncio ``to_thread`` + ``Semaphore(50)``; ``max running`` is
  the largest number of writes seen running at once (never above 50). The work is CPU-bound: the
  engine must not add threads (``CPU-bound holds`` counts the times it declined).
* B5b: N (2,000) writes of a pre-encoded 50 KB blob, each followed by ``os.fsync``, tier FAST.

Files go to a fresh temporary directory per case (under ``$TOKENGATE_BENCH_IO_DIR`` when set,
to test a particular disk), removed after.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tokengate.bench._model import CaseParams, Figure, Figures, Scenario, System
from tokengate.demos.seed_io import generate_medium_json

__all__ = ["SCENARIO_B5", "SCENARIO_B5B", "SCENARIO_SURGE"]

SLEEP_S = 0.02
TIER_LIMIT = 50
BLOB_BYTES = 50 * 1024
DIR_ENV = "TOKENGATE_BENCH_IO_DIR"
RESULT_TIMEOUT_S = 300.0

Body = Callable[[int], int]


class Concurrency:
    """A running-count high-water mark, the same for every system."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.high = 0

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.high = max(self.high, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


RUNNING = Concurrency()
WORKDIR: list[str] = []
PAYLOAD: dict[str, Any] = {}
BLOB: list[bytes] = [b""]


def _workdir() -> str:
    if not WORKDIR:
        base = os.environ.get(DIR_ENV) or None
        WORKDIR.append(tempfile.mkdtemp(prefix="tokengate_io_bench_", dir=base))
    return WORKDIR[0]


def _cleanup() -> None:
    while WORKDIR:
        shutil.rmtree(WORKDIR.pop(), ignore_errors=True)


# -- the work (plain functions; tokengate decorates them per case) ------------------------------


def sleep_body(i: int) -> int:
    with RUNNING:
        time.sleep(SLEEP_S)
    return i


def json_body(i: int) -> int:
    path = os.path.join(_workdir(), f"{i}.json")
    with RUNNING, open(path, "w", encoding="utf-8") as f:
        json.dump(PAYLOAD, f, indent=2)
    return i


def fsync_body(i: int) -> int:
    path = os.path.join(_workdir(), f"{i}.bin")
    with RUNNING, open(path, "wb") as f:
        f.write(BLOB[0])
        f.flush()
        os.fsync(f.fileno())
    return i


def _prepare_json() -> Body:
    random.seed(1)
    PAYLOAD.clear()
    PAYLOAD.update(generate_medium_json.__wrapped__(0))  # the Quick-Proof's body, called directly
    return json_body


def _prepare_fsync() -> Body:
    BLOB[0] = os.urandom(BLOB_BYTES)
    return fsync_body


def _prepare_sleep() -> Body:
    return sleep_body


# -- the systems, on any body ---------------------------------------------------------------------


def _rate(n: int, seconds: float, extra: Figures | None = None) -> Figures:
    figures: Figures = {"wall_s": seconds, "per_s": n / seconds, "max_running": RUNNING.high}
    figures.update(extra or {})
    return figures


def _serial(body: Body, p: CaseParams) -> Figures:
    t0 = time.perf_counter()
    for i in range(p.n):
        body(i)
    return _rate(p.n, time.perf_counter() - t0)


def _threadpool(body: Body, p: CaseParams, workers: int) -> Figures:
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        for _ in pool.map(body, range(p.n)):
            pass
        seconds = time.perf_counter() - t0
    return _rate(p.n, seconds, {"threads": workers})


def _asyncio(body: Body, p: CaseParams) -> Figures:
    async def main() -> float:
        limit = asyncio.Semaphore(TIER_LIMIT)

        async def one(i: int) -> int:
            async with limit:
                return await asyncio.to_thread(body, i)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(p.n)))
        return time.perf_counter() - t0

    seconds = asyncio.run(main())
    # to_thread uses the default executor: min(32, cpu_count + 4) threads, not 50
    return _rate(p.n, seconds, {"threads": min(32, (os.cpu_count() or 1) + 4)})


def _tokengate(body: Body, p: CaseParams, *, tier: bool, engine: bool) -> Figures:
    from tokengate import OperationsCoordinator, task_token_guard

    tags: dict[str, Any] = {"weight": "light"}
    if tier:
        tags["storage_speed"] = "FAST"
    task = task_token_guard(operation_type=body.__name__, tags=tags)(body)
    with OperationsCoordinator(convergence=engine) as coordinator:
        t0 = time.perf_counter()
        tokens = [task(i) for i in range(p.n)]
        for token in tokens:
            token.get(timeout=RESULT_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        pool = "io:FAST" if tier else f"thread:core{coordinator.affinity.preferred('light')}"
        counts = coordinator.convergence.worker_counts() if coordinator.convergence else {}
        baseline, _, peak = counts.get(pool, (0, 0, 0))
        if not counts:
            lane: Any = coordinator.lanes["io" if tier else "thread"]
            key: Any = "FAST" if tier else coordinator.affinity.preferred("light")
            baseline = peak = len(lane.pools[key])
        tier_high = coordinator.tier_stats()["FAST"].high_water
    events = coordinator.stats().events
    return _rate(
        p.n,
        seconds,
        {
            "threads": baseline,
            "peak_threads": peak,
            "grown": events.get("workers_added", 0),
            "cpu_bound_holds": events.get("convergence_cpu_bound", 0),
            "tier_high_water": tier_high,
        },
    )


def _case(
    prepare: Callable[[], Body], run: Callable[[Body, CaseParams], Figures]
) -> Callable[[CaseParams], Figures]:
    """A system function: fresh state, the run, the files removed whatever happens."""

    def system(p: CaseParams) -> Figures:
        RUNNING.now = RUNNING.high = 0
        try:
            return run(prepare(), p)
        finally:
            _cleanup()

    return system


def _systems(prepare: Callable[[], Body], *, surge: bool) -> tuple[System, ...]:
    tg = "tokengate"

    def tokengate(tier: bool, engine: bool) -> Callable[[CaseParams], Figures]:
        return _case(prepare, lambda b, p: _tokengate(b, p, tier=tier, engine=engine))

    pool50 = System(
        "threadpool-50",
        "ThreadPoolExecutor(50)",
        _case(prepare, lambda b, p: _threadpool(b, p, 50)),
    )
    if surge:
        return (
            System(
                "tier-on", f"{tg} tier FAST, engine on", tokengate(True, True), kind="tokengate"
            ),
            System(
                "tier-off", f"{tg} tier FAST, engine off", tokengate(True, False), kind="tokengate"
            ),
            System("light-on", f"{tg} light, engine on", tokengate(False, True), kind="tokengate"),
            System(
                "light-off", f"{tg} light, engine off", tokengate(False, False), kind="tokengate"
            ),
            System(
                "threadpool-4",
                "ThreadPoolExecutor(4) (the I/O tier's baseline)",
                _case(prepare, lambda b, p: _threadpool(b, p, 4)),
            ),
            pool50,
        )
    return (
        System(
            tg,
            f"{tg} (tier FAST)",
            tokengate(True, True),
            kind="tokengate",
            note="OperationsCoordinator() defaults (engine on); tags storage_speed FAST",
        ),
        System("serial", "serial", _case(prepare, _serial)),
        pool50,
        System(
            "asyncio-50",
            "asyncio to_thread + Semaphore(50)",
            _case(prepare, _asyncio),
            note="to_thread runs on the default executor: min(32, cpus + 4) threads",
        ),
    )


FIGURES = (
    Figure("wall_s", "wall s", higher_is_better=False),
    Figure("per_s", "tasks/s", higher_is_better=True),
    Figure("max_running", "max running", kind="count"),
    Figure("threads", "threads", kind="count"),
    Figure("peak_threads", "peak threads", kind="count"),
    Figure("grown", "threads added", kind="count"),
    Figure("cpu_bound_holds", "CPU-bound holds", kind="count"),
    Figure("tier_high_water", "tier high-water", kind="count"),
)
_FILE_FIGURES = tuple(
    Figure(f.key, "files/s", higher_is_better=True) if f.key == "per_s" else f for f in FIGURES
)

SCENARIO_SURGE = Scenario(
    id="IOSURGE",
    title="I/O surge, convergence engine on vs off",
    description=(
        f"tasks that each sleep {SLEEP_S * 1000:g} ms, submitted at once, on a storage-tier task "
        "(I/O lane, tier FAST) and an untagged light task (thread lane), engine on and off; "
        "the engine's effect is the on row's ratio against the off row's"
    ),
    figures=FIGURES,
    headline="wall_s",
    n=400,
    quick_n=200,
    systems=_systems(_prepare_sleep, surge=True),
)

SCENARIO_B5 = Scenario(
    id="B5",
    title="storage I/O",
    description=(
        "tasks each writing a ~50 KB JSON file (json.dump indent=2 of the Quick-Proof's "
        f"generate_medium_json record), tier FAST (limit {TIER_LIMIT}); max running must stay "
        f"<= {TIER_LIMIT}"
    ),
    figures=_FILE_FIGURES,
    headline="per_s",
    n=2_000,
    quick_n=400,
    systems=_systems(_prepare_json, surge=False),
)

SCENARIO_B5B = Scenario(
    id="B5b",
    title="fsync I/O",
    description=(
        f"writes of a pre-encoded {BLOB_BYTES // 1024} KB blob, each followed by os.fsync, "
        "tier FAST"
    ),
    figures=_FILE_FIGURES,
    headline="per_s",
    n=2_000,
    quick_n=400,
    systems=_systems(_prepare_fsync, surge=False),
)
