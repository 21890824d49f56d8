"""I/O lane benchmarks (issue 4): an I/O surge with the convergence engine on and off, B5, B5b.

    python benchmarks/io_lane.py                    # every scenario, 3 runs per case
    python benchmarks/io_lane.py SURGE B5 --quick   # some scenarios, scaled down
    python benchmarks/io_lane.py --json out.json --dir /path/on/the/disk/to/test

Self-contained (the standard library and tokengate only). Every case runs in a fresh
interpreter (``--case SCENARIO SYSTEM``), ``--repeat`` times (default 3); the tables show the
median and [min–max] range of each figure, and the ratio the scenario is about:

* SURGE: 400 tasks that each ``time.sleep(0.02)``, submitted at once; wall time with the
  convergence engine on versus off, for a storage-tier task (I/O lane, tier FAST) and for an
  untagged light task (thread lane). Peers for context: ``ThreadPoolExecutor`` with tokengate's
  baseline thread count, and with 50.
* B5: 2,000 tasks each writing a ~50 KB JSON file (``json.dump(..., indent=2)``, the seed's
  ``generate_medium_json`` record), tier FAST; files/s versus serial, ``ThreadPoolExecutor(50)``
  and asyncio ``to_thread`` + ``Semaphore(50)``; the largest number of writes seen running at
  once (never above 50). The work is CPU-bound: the engine must not add threads.
* B5b: 2,000 writes of a pre-encoded 50 KB blob, each followed by ``os.fsync``, tier FAST.

Files go to a fresh temporary directory per case (``--dir`` chooses where), removed after.

To register these in ``tokengate bench``: copy this file to ``src/tokengate/bench/_b5_io.py``
and add ``*_b5_io.harness_scenarios()`` to the tuple in ``_scenarios.py``. The system functions
already have the harness's shape (``run(params) -> figures``, params with ``n``, ``quick`` and
``cores``); ``harness_scenarios`` builds the ``Scenario`` objects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Figures = dict[str, float | int | bool]

SLEEP_S = 0.02
TIER_LIMIT = 50


@dataclass(frozen=True)
class Params:
    """What a system function is told (the harness's ``CaseParams`` has the same fields)."""

    n: int
    quick: bool
    cores: int


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# -- instrumentation: how many bodies run at once ------------------------------------------------
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


def _workdir() -> str:
    if not WORKDIR:
        base = os.environ.get("IO_LANE_BENCH_DIR") or None
        WORKDIR.append(tempfile.mkdtemp(prefix="tokengate_io_bench_", dir=base))
    return WORKDIR[0]


def _cleanup() -> None:
    while WORKDIR:
        shutil.rmtree(WORKDIR.pop(), ignore_errors=True)


# -- the work (plain functions; tokengate decorates them below) ----------------------------------
def generate_medium_json(index: int) -> dict[str, Any]:
    """The seed's ``generate_medium_json`` body (~50 KB once indented)."""
    return {
        "id": index,
        "timestamp": time.time(),
        "records": [
            {
                "id": i,
                "value": random.random(),
                "label": f"record_{i}",
                "tags": [f"tag_{j}" for j in range(5)],
                "nested": {
                    "x": random.randint(0, 100),
                    "y": random.randint(0, 100),
                    "data": [random.random() for _ in range(10)],
                },
            }
            for i in range(100)
        ],
        "metadata": {
            "version": "1.0",
            "type": "medium",
            "generator": "json_medium",
            "stats": {"total_records": 100, "created_at": time.time()},
        },
    }


PAYLOAD: dict[str, Any] = {}
BLOB = b""


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
        f.write(BLOB)
        f.flush()
        os.fsync(f.fileno())
    return i


def _prepare(scenario: str) -> Callable[[int], int]:
    global BLOB
    random.seed(1)
    RUNNING.now = RUNNING.high = 0
    if scenario == "B5":
        PAYLOAD.clear()
        PAYLOAD.update(generate_medium_json(0))
        return json_body
    if scenario == "B5b":
        BLOB = os.urandom(50 * 1024)
        return fsync_body
    return sleep_body


# -- systems -------------------------------------------------------------------------------------
def _rate(n: int, seconds: float, extra: Figures | None = None) -> Figures:
    figures: Figures = {
        "wall_s": seconds,
        "per_s": n / seconds,
        "max_running": RUNNING.high,
    }
    figures.update(extra or {})
    return figures


def run_serial(body: Callable[[int], int], p: Params) -> Figures:
    t0 = time.perf_counter()
    for i in range(p.n):
        body(i)
    return _rate(p.n, time.perf_counter() - t0)


def run_threadpool(body: Callable[[int], int], p: Params, workers: int) -> Figures:
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        for _ in pool.map(body, range(p.n)):
            pass
        seconds = time.perf_counter() - t0
    return _rate(p.n, seconds, {"threads": workers})


def run_asyncio(body: Callable[[int], int], p: Params) -> Figures:
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


def run_tokengate(body: Callable[[int], int], p: Params, *, tier: bool, engine: bool) -> Figures:
    from tokengate import OperationsCoordinator, task_token_guard

    tags: dict[str, Any] = {"weight": "light"}
    if tier:
        tags["storage_speed"] = "FAST"
    task = task_token_guard(operation_type=body.__name__, tags=tags)(body)
    with OperationsCoordinator(convergence=engine) as coordinator:
        t0 = time.perf_counter()
        tokens = [task(i) for i in range(p.n)]
        for token in tokens:
            token.get(timeout=300)
        seconds = time.perf_counter() - t0
        pool = "io:FAST" if tier else f"thread:core{coordinator.affinity.preferred('light')}"
        counts = coordinator.convergence.worker_counts() if coordinator.convergence else {}
        baseline, _, peak = counts.get(pool, (0, 0, 0))
        if not counts:
            lane = coordinator.lanes["io" if tier else "thread"]
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


@dataclass(frozen=True)
class System:
    key: str
    label: str
    run: Callable[[Params], Figures]
    kind: str = "peer"  # "tokengate" | "peer"


def _systems(scenario: str) -> list[System]:
    cores = usable_cores()

    def body() -> Callable[[int], int]:
        return _prepare(scenario)

    tg = "tokengate"
    if scenario == "SURGE":
        from tokengate._affinity import AffinityPolicy

        light = 4 * len(AffinityPolicy(cores).allowed("light"))  # the light baseline
        peers = [
            System(
                "threadpool-4",
                "ThreadPoolExecutor(4) (I/O tier baseline)",
                lambda p: run_threadpool(body(), p, 4),
            )
        ]
        if light != 4:
            peers.append(
                System(
                    "threadpool-light",
                    f"ThreadPoolExecutor({light}) (light baseline)",
                    lambda p: run_threadpool(body(), p, light),
                )
            )
        return [
            System("tier-on", f"{tg} tier FAST, engine on", lambda p: run_tokengate(
                body(), p, tier=True, engine=True), tg),
            System("tier-off", f"{tg} tier FAST, engine off", lambda p: run_tokengate(
                body(), p, tier=True, engine=False), tg),
            System("light-on", f"{tg} light, engine on", lambda p: run_tokengate(
                body(), p, tier=False, engine=True), tg),
            System("light-off", f"{tg} light, engine off", lambda p: run_tokengate(
                body(), p, tier=False, engine=False), tg),
            *peers,
            System("threadpool-50", "ThreadPoolExecutor(50)",
                   lambda p: run_threadpool(body(), p, 50)),
        ]  # fmt: skip
    return [
        System("tokengate", f"{tg} (tier FAST)", lambda p: run_tokengate(
            body(), p, tier=True, engine=True), tg),
        System("serial", "serial", lambda p: run_serial(body(), p)),
        System("threadpool-50", "ThreadPoolExecutor(50)",
               lambda p: run_threadpool(body(), p, 50)),
        System("asyncio-50", "asyncio to_thread + Semaphore(50)",
               lambda p: run_asyncio(body(), p)),
    ]  # fmt: skip


SCENARIOS: dict[str, tuple[str, int, int]] = {
    # id: (title, n, quick n)
    "SURGE": ("I/O surge: 400 tasks sleeping 20 ms each, engine on vs off", 400, 200),
    "B5": ("B5 storage I/O: ~50 KB JSON files, tier FAST", 2000, 400),
    "B5b": ("B5b fsync I/O: 50 KB blob + os.fsync, tier FAST", 2000, 400),
}


# -- one case, in this (fresh) process -----------------------------------------------------------
def run_case(scenario: str, system_key: str, n: int, quick: bool) -> dict[str, Any]:
    system = {s.key: s for s in _systems(scenario)}[system_key]
    record: dict[str, Any] = {"scenario": scenario, "system": system_key, "n": n, "status": "ok"}
    try:
        record["figures"] = system.run(Params(n=n, quick=quick, cores=usable_cores()))
    except Exception as exc:
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    finally:
        _cleanup()
    return record


# -- the runner ------------------------------------------------------------------------------------
def ambient_cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some task waited for a CPU. Read by the runner
    just before a case starts, so it measures the rest of the machine, not the case."""
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as f:
            first = f.readline().split()
        return float(first[1].partition("=")[2])
    except (OSError, IndexError, ValueError):
        return None


def _spawn(scenario: str, system: str, n: int, quick: bool, workdir: str | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case", scenario, system, "--n", str(n)]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ)
    if workdir:
        env["IO_LANE_BENCH_DIR"] = workdir
    pressure = ambient_cpu_pressure()
    try:
        done = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=600, env=env
        )
    except subprocess.TimeoutExpired:
        return {"scenario": scenario, "system": system, "status": "timeout"}
    lines = done.stdout.strip().splitlines()
    if not lines:
        return {"scenario": scenario, "system": system, "status": "error", "error": done.stderr}
    record: dict[str, Any] = json.loads(lines[-1])
    record["ambient_cpu_pressure"] = pressure
    return record


def _median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, float]]]:
    by_system: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok":
            by_system.setdefault(r["system"], []).append(r["figures"])
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for system, runs in by_system.items():
        keys = runs[0].keys()
        out[system] = {k: _median_range([float(run[k]) for run in runs]) for k in keys}
    return out


def report(scenario: str, records: list[dict[str, Any]]) -> str:
    title = SCENARIOS[scenario][0]
    systems = {s.key: s for s in _systems(scenario)}
    stats = summarize(records)
    lines = [f"## {scenario} — {title}", ""]
    columns = ["wall_s", "per_s", "max_running", "threads", "peak_threads", "tier_high_water"]
    header = "| system | " + " | ".join(c.replace("_", " ") for c in columns) + " |"
    lines += [header, "|" + "---|" * (len(columns) + 1)]
    for key, system in systems.items():
        if key not in stats:
            failed = [r for r in records if r["system"] == key]
            why = failed[0].get("status", "?") if failed else "not run"
            lines.append(f"| {system.label} | {why} |" + " |" * (len(columns) - 1))
            continue
        cells = []
        for c in columns:
            if c not in stats[key]:
                cells.append("")
                continue
            med, lo, hi = stats[key][c]
            cells.append(_fmt(med) if lo == hi else f"{_fmt(med)} [{_fmt(lo)}–{_fmt(hi)}]")
        lines.append(f"| {system.label} | " + " | ".join(cells) + " |")
    lines.append("")
    ambient = [
        r["ambient_cpu_pressure"] for r in records if r.get("ambient_cpu_pressure") is not None
    ]
    if ambient:
        med, lo, hi = _median_range(ambient)
        lines.append(
            f"- other load on the machine (CPU pressure, PSI avg10, before each case): "
            f"{med:.0f}% [{lo:.0f}–{hi:.0f}%]"
        )
    wall = {k: v["wall_s"][0] for k, v in stats.items()}
    if scenario == "SURGE":
        for kind in ("tier", "light"):
            on, off = wall.get(f"{kind}-on"), wall.get(f"{kind}-off")
            if on and off:
                lines.append(f"- {kind}: engine off / engine on wall time = **{off / on:.1f}x**")
    else:
        peers = {k: v for k, v in wall.items() if systems[k].kind != "tokengate"}
        if "tokengate" in wall and peers:
            best = min(peers, key=lambda k: peers[k])
            ratio = peers[best] / wall["tokengate"]
            lines.append(
                f"- tokengate files/s / best peer ({systems[best].label}) = **{ratio:.2f}x**"
            )
        if "tokengate" in stats:
            lines.append(
                f"- tokengate: threads grown by the engine {_fmt(stats['tokengate']['grown'][0])}"
                f", CPU-bound holds {_fmt(stats['tokengate']['cpu_bound_holds'][0])}"
            )
    return "\n".join(lines)


def machine() -> str:
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    return (
        f"{usable_cores()} usable cores, Python {platform.python_version()} "
        f"({'GIL on' if gil else 'GIL off'}), {platform.system()} {platform.machine()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", help=f"default: {' '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--systems", help="comma-separated system keys (default: all)")
    parser.add_argument("--json", help="write every run's record here")
    parser.add_argument("--dir", help="where the files are written (default: the temp dir)")
    parser.add_argument("--case", nargs=2, metavar=("SCENARIO", "SYSTEM"), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        scenario, system = args.case
        n = args.n or SCENARIOS[scenario][2 if args.quick else 1]
        print(json.dumps(run_case(scenario, system, n, args.quick)), flush=True)
        return 0
    chosen = args.scenarios or list(SCENARIOS)
    wanted = set(args.systems.split(",")) if args.systems else None
    print(f"# I/O lane benchmarks — {machine()}\n", flush=True)
    everything: list[dict[str, Any]] = []
    for scenario in chosen:
        n = SCENARIOS[scenario][2 if args.quick else 1]
        records: list[dict[str, Any]] = []
        for rep in range(args.repeat):  # interleaved: machine noise hits every system alike
            for system in _systems(scenario):
                if wanted and system.key not in wanted:
                    continue
                record = _spawn(scenario, system.key, n, args.quick, args.dir)
                record["repeat"] = rep
                records.append(record)
                print(f"  {scenario} {system.key} #{rep + 1}: {record.get('status')}",
                      file=sys.stderr, flush=True)  # fmt: skip
        print(report(scenario, records) + "\n", flush=True)
        everything += records
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": everything}, indent=2))
    return 0


# -- registration in tokengate's harness ---------------------------------------------------------
def harness_scenarios() -> tuple[Any, ...]:
    """These scenarios as ``tokengate.bench._model.Scenario`` objects (see the module doc)."""
    from tokengate.bench._model import Figure, Scenario
    from tokengate.bench._model import System as HSystem

    figures = (
        Figure("wall_s", "wall s", higher_is_better=False),
        Figure("per_s", "tasks/s", higher_is_better=True),
        Figure("max_running", "max running"),
        Figure("threads", "threads"),
        Figure("peak_threads", "peak threads"),
        Figure("tier_high_water", "tier high-water"),
    )
    out = []
    for sid, (title, n, quick_n) in SCENARIOS.items():
        systems = tuple(
            HSystem(
                s.key,
                s.label,
                _harness_runner(s.run),
                kind="tokengate" if s.kind == "tokengate" else "peer",
            )
            for s in _systems(sid)
        )
        out.append(
            Scenario(
                id=sid,
                title=title,
                description=title,
                figures=figures,
                headline="wall_s" if sid == "SURGE" else "per_s",
                n=n,
                quick_n=quick_n,
                systems=systems,
            )
        )
    return tuple(out)


def _harness_runner(run: Callable[[Params], Figures]) -> Callable[[Any], Figures]:
    def harness_run(params: Any) -> Figures:
        try:
            return run(Params(n=params.n, quick=params.quick, cores=params.cores))
        finally:
            _cleanup()

    return harness_run


if __name__ == "__main__":
    sys.exit(main())
