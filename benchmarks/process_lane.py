"""Process-lane benchmarks (issue 3): B2 CPU scaling, B3 isolation, per-task overhead.

    python benchmarks/process_lane.py                 # every case, 3 runs each
    python benchmarks/process_lane.py --quick         # scaled down
    python benchmarks/process_lane.py --only B3 --repeat 5 --json out.json

Every case runs in a fresh interpreter (``--case SCENARIO SYSTEM``, which prints one JSON line),
interleaved across repetitions so that machine noise spreads over all systems; the driver prints
the median and range of each figure and tokengate's ratio to each peer of the same run.

The system functions take one argument with ``.n``, ``.quick`` and ``.cores`` (the harness's
``CaseParams``) and return a dict of figures, so they register into ``tokengate bench`` as they
are: see ``SCENARIO_TABLE`` at the bottom. B2's ``speedup`` is computed within each case
against one task run serially in the same process, so it needs no other case.

The task bodies are defined here, in ``__main__`` when this file runs as a script, so tokengate
sends them by value (cloudpickle) and ``ProcessPoolExecutor`` (fork) by name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tokengate import OperationsCoordinator, task_token_guard

perf = time.perf_counter

# ~0.2 s and ~50 ms of pure-Python work on the 2-core development machine (40 ns per step).
B2_STEPS = 5_000_000
B3_STEPS = 1_250_000
B3_HEAVY = 40
B3_LIGHT_EVERY_S = 0.010
B3_LIGHT_FOR_S = 3.0
OVERHEAD_N = 5_000
ROUND_TRIPS = 500


def burn(steps: int) -> int:
    """Pure-Python CPU work: holds the GIL the whole time."""
    total = 0
    for i in range(steps):
        total += i * i % 7
    return total


def light_work() -> int:
    return sum(range(1000))


def noop(i: int) -> int:
    return i


@task_token_guard(operation_type="burn", tags={"weight": "heavy"})
def burn_task(steps: int) -> int:
    return burn(steps)


@task_token_guard(operation_type="light", tags={"weight": "light"})
def light_task() -> int:
    return light_work()


@task_token_guard(operation_type="noop", tags={"weight": "heavy", "executor": "process"})
def noop_task(i: int) -> int:
    return i


@dataclass(frozen=True)
class Params:
    n: int
    quick: bool
    cores: int


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _steps(p: Params, full: int) -> int:
    return full // 4 if p.quick else full


def _one_task_s(steps: int) -> float:
    """One task's time run here, serially: the yardstick for ``speedup`` within a case."""
    burn(steps // 10)  # warm up
    t0 = perf()
    burn(steps)
    return perf() - t0


def _speedup(p: Params, steps: int, figures: dict[str, float]) -> dict[str, float]:
    one = _one_task_s(steps)
    figures["speedup"] = p.n * one / figures["wall_s"]
    figures["speedup_per_core"] = figures["speedup"] / p.cores
    return figures


# -- B2: CPU scaling -----------------------------------------------------------------------------
def b2_serial(p: Params) -> dict[str, float]:
    steps = _steps(p, B2_STEPS)
    t0 = perf()
    for _ in range(p.n):
        burn(steps)
    return _speedup(p, steps, {"wall_s": perf() - t0})


def b2_tokengate(p: Params) -> dict[str, float]:
    steps = _steps(p, B2_STEPS)
    t0 = perf()
    coordinator = OperationsCoordinator().start()  # cold: workers boot while tasks queue
    results = [t.get(timeout=300) for t in [burn_task(steps) for _ in range(p.n)]]
    cold = perf() - t0
    t1 = perf()  # warm: the same worker processes again
    results += [t.get(timeout=300) for t in [burn_task(steps) for _ in range(p.n)]]
    warm = perf() - t1
    coordinator.stop()
    assert len(set(results)) == 1
    t2 = perf()  # start-up: start() until every worker process is ready to take a task
    coordinator = OperationsCoordinator().start()
    returned = perf() - t2
    ready = coordinator.lanes["process"].wait_ready(60)  # type: ignore[attr-defined]
    startup = perf() - t2
    coordinator.stop()
    assert ready
    figures = {"wall_s": warm, "cold_wall_s": cold, "startup_s": startup, "start_call_s": returned}
    return _speedup(p, steps, figures)


def _pool_b2(pool_factory: Callable[[], Any], p: Params) -> dict[str, float]:
    steps = _steps(p, B2_STEPS)
    t0 = perf()
    pool = pool_factory()
    results = [f.result() for f in [pool.submit(burn, steps) for _ in range(p.n)]]
    cold = perf() - t0
    t1 = perf()
    results += [f.result() for f in [pool.submit(burn, steps) for _ in range(p.n)]]
    warm = perf() - t1
    pool.shutdown()
    assert len(set(results)) == 1
    return _speedup(p, steps, {"wall_s": warm, "cold_wall_s": cold})


def b2_ppe(workers: int) -> Callable[[Params], dict[str, float]]:
    return lambda p: _pool_b2(lambda: ProcessPoolExecutor(workers), p)


def b2_loky(p: Params) -> dict[str, float]:
    import loky

    return _pool_b2(lambda: loky.get_reusable_executor(max_workers=p.cores), p)


def b2_threads(p: Params) -> dict[str, float]:
    return _pool_b2(lambda: ThreadPoolExecutor(p.cores), p)


# -- B3: isolation --------------------------------------------------------------------------------
def _light_loop(submit: Callable[[], Future[Any]], duration: float) -> list[float]:
    """Submit one light task every 10 ms for ``duration`` s, without waiting for any; returns
    each one's latency from submit to result (taken in a done-callback)."""
    latencies: list[float] = []
    futures = []
    start = perf()
    tick = start
    pause = threading.Event()
    while tick - start < duration:
        t = perf()
        future = submit()
        future.add_done_callback(lambda _, t=t: latencies.append(perf() - t))
        futures.append(future)
        tick += B3_LIGHT_EVERY_S
        wait = tick - perf()
        if wait > 0:
            pause.wait(wait)
    for future in futures:
        future.result(timeout=300)
    return latencies


def _b3_figures(latencies: list[float], makespan: float) -> dict[str, float]:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "light_p50_ms": statistics.median(ordered) * 1e3,
        "light_p95_ms": p95 * 1e3,
        "light_max_ms": ordered[-1] * 1e3,
        "heavy_makespan_s": makespan,
        "light_count": len(ordered),
    }


def _track_makespan(futures: list[Future[Any]], t0: float) -> Callable[[], float]:
    done = threading.Event()
    left = [len(futures)]
    end = [0.0]
    lock = threading.Lock()

    def finished(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                end[0] = perf()
                done.set()

    for f in futures:
        f.add_done_callback(finished)

    def makespan() -> float:
        assert done.wait(300)
        for f in futures:
            f.result()
        return end[0] - t0

    return makespan


def b3_tokengate(p: Params) -> dict[str, float]:
    steps = _steps(p, B3_STEPS)
    coordinator = OperationsCoordinator().start()
    assert coordinator.lanes["process"].wait_ready(60)  # type: ignore[attr-defined]
    light_task().get(timeout=10)  # warm the thread path too
    t0 = perf()
    heavy = [burn_task(steps) for _ in range(p.n)]
    makespan = _track_makespan(heavy, t0)  # type: ignore[arg-type]
    latencies = _light_loop(light_task, _light_for(p))  # type: ignore[arg-type]
    figures = _b3_figures(latencies, makespan())
    coordinator.stop()
    return figures


def _light_for(p: Params) -> float:
    return B3_LIGHT_FOR_S / 3 if p.quick else B3_LIGHT_FOR_S


def _pool_b3(heavy_pool: Any, light_pool: Any, p: Params) -> dict[str, float]:
    steps = _steps(p, B3_STEPS)
    for f in [heavy_pool.submit(noop, i) for i in range(8)]:  # start the workers first
        f.result()
    light_pool.submit(light_work).result()
    t0 = perf()
    heavy = [heavy_pool.submit(burn, steps) for _ in range(p.n)]
    makespan = _track_makespan(heavy, t0)
    latencies = _light_loop(lambda: light_pool.submit(light_work), _light_for(p))
    return _b3_figures(latencies, makespan())


def b3_shared_ppe(p: Params) -> dict[str, float]:
    with ProcessPoolExecutor(4) as pool:
        return _pool_b3(pool, pool, p)


def b3_shared_threads(p: Params) -> dict[str, float]:
    with ThreadPoolExecutor(4) as pool:
        return _pool_b3(pool, pool, p)


def b3_shared_loky(p: Params) -> dict[str, float]:
    import loky

    pool = loky.get_reusable_executor(max_workers=4)
    figures = _pool_b3(pool, pool, p)
    pool.shutdown()
    return figures


def b3_split(p: Params) -> dict[str, float]:
    """The hand-built split: heavy in ProcessPoolExecutor(cores), light on one thread."""
    with ProcessPoolExecutor(p.cores) as heavy, ThreadPoolExecutor(1) as light:
        return _pool_b3(heavy, light, p)


# -- per-task overhead ---------------------------------------------------------------------------
def overhead_tokengate(p: Params) -> dict[str, float]:
    coordinator = OperationsCoordinator().start()
    assert coordinator.lanes["process"].wait_ready(60)  # type: ignore[attr-defined]
    noop_task(0).get(timeout=10)
    t0 = perf()
    tokens = [noop_task(i) for i in range(p.n)]
    assert [t.get(timeout=300) for t in tokens] == list(range(p.n))
    bulk = perf() - t0
    t1 = perf()
    for i in range(ROUND_TRIPS):
        noop_task(i).get(timeout=10)
    trip = perf() - t1
    coordinator.stop()
    return {"us_per_task": bulk / p.n * 1e6, "round_trip_us": trip / ROUND_TRIPS * 1e6}


def _pool_overhead(pool: Any, p: Params) -> dict[str, float]:
    for f in [pool.submit(noop, i) for i in range(8)]:
        f.result()
    t0 = perf()
    futures = [pool.submit(noop, i) for i in range(p.n)]
    assert [f.result() for f in futures] == list(range(p.n))
    bulk = perf() - t0
    t1 = perf()
    for i in range(ROUND_TRIPS):
        pool.submit(noop, i).result()
    trip = perf() - t1
    return {"us_per_task": bulk / p.n * 1e6, "round_trip_us": trip / ROUND_TRIPS * 1e6}


def overhead_ppe(p: Params) -> dict[str, float]:
    with ProcessPoolExecutor(p.cores) as pool:
        return _pool_overhead(pool, p)


def overhead_loky(p: Params) -> dict[str, float]:
    import loky

    pool = loky.get_reusable_executor(max_workers=p.cores)
    figures = _pool_overhead(pool, p)
    pool.shutdown()
    return figures


# -- the table -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    key: str
    label: str
    run: Callable[[Params], dict[str, float]]
    tokengate: bool = False
    requires: str | None = None


@dataclass(frozen=True)
class ScenarioSpec:
    id: str
    title: str
    n: int
    quick_n: int
    headline: str
    higher_is_better: bool
    figures: tuple[str, ...]
    cases: tuple[Case, ...]


SCENARIO_TABLE: tuple[ScenarioSpec, ...] = (
    ScenarioSpec(
        "B2",
        "CPU scaling: 16 pure-Python tasks of ~0.2 s (weight heavy)",
        16,
        8,
        "wall_s",
        False,
        ("wall_s", "speedup", "speedup_per_core", "cold_wall_s", "startup_s", "start_call_s"),
        (
            Case("serial", "serial (one core)", b2_serial),
            Case("tokengate", "tokengate", b2_tokengate, tokengate=True),
            Case("ppe-2", "ProcessPoolExecutor(2)", b2_ppe(2)),
            Case("ppe-4", "ProcessPoolExecutor(4)", b2_ppe(4)),
            Case("loky", "loky(cores)", b2_loky, requires="loky"),
            Case("threads", "ThreadPoolExecutor(cores)", b2_threads),
        ),
    ),
    ScenarioSpec(
        "B3",
        "isolation: 40 heavy tasks of ~50 ms, one light task every 10 ms for 3 s",
        B3_HEAVY,
        B3_HEAVY // 2,
        "light_p95_ms",
        False,
        ("light_p50_ms", "light_p95_ms", "light_max_ms", "heavy_makespan_s", "light_count"),
        (
            Case("tokengate", "tokengate", b3_tokengate, tokengate=True),
            Case("ppe-4", "ProcessPoolExecutor(4), shared", b3_shared_ppe),
            Case("threads-4", "ThreadPoolExecutor(4), shared", b3_shared_threads),
            Case("loky-4", "loky(4), shared", b3_shared_loky, requires="loky"),
            Case("split", "split: ProcessPoolExecutor(cores) + 1 thread", b3_split),
        ),
    ),
    ScenarioSpec(
        "B2o",
        "per-task overhead: trivial process tasks, submit all then gather; then round trips",
        OVERHEAD_N,
        OVERHEAD_N // 5,
        "us_per_task",
        False,
        ("us_per_task", "round_trip_us"),
        (
            Case("tokengate", "tokengate (executor='process')", overhead_tokengate, True),
            Case("ppe", "ProcessPoolExecutor(cores).submit", overhead_ppe),
            Case("loky", "loky(cores).submit", overhead_loky, requires="loky"),
        ),
    ),
)


# -- the driver ----------------------------------------------------------------------------------
def _find(scenario: str, system: str) -> tuple[ScenarioSpec, Case]:
    spec = next(s for s in SCENARIO_TABLE if s.id == scenario)
    return spec, next(c for c in spec.cases if c.key == system)


def run_case(scenario: str, system: str, quick: bool) -> dict[str, Any]:
    spec, case = _find(scenario, system)
    if case.requires is not None:
        try:
            __import__(case.requires)
        except ImportError:
            return {"status": "not installed"}
    params = Params(n=spec.quick_n if quick else spec.n, quick=quick, cores=usable_cores())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return {"status": "ok", "figures": case.run(params), "load_1m": load}


def _spawn_case(scenario: str, system: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case", scenario, system] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"status": "error", "detail": done.stderr.strip().splitlines()[-1:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _fmt(values: list[float]) -> str:
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    digits = 3 if med < 10 else 1
    return f"{med:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", nargs=2, metavar=("SCENARIO", "SYSTEM"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", action="append", help="scenario ids to run (default: all)")
    parser.add_argument("--systems", help="comma-separated systems to run (default: all)")
    parser.add_argument("--json", help="write every run's figures to this file")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], args.case[1], args.quick)))
        return 0
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(
        f"# process lane benchmarks: Python {sys.version.split()[0]}, GIL "
        f"{'on' if gil else 'off'}, {usable_cores()} usable cores, {os.cpu_count()} CPUs, "
        f"{args.repeat} runs per case, median [min–max]"
    )
    specs = [s for s in SCENARIO_TABLE if not args.only or s.id in args.only]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s.id: {} for s in specs}
    for rep in range(args.repeat):
        for spec in specs:
            for case in spec.cases:
                if args.systems and case.key not in args.systems.split(","):
                    continue
                result = _spawn_case(spec.id, case.key, args.quick)
                runs[spec.id].setdefault(case.key, []).append(result)
                print(f"  run {rep + 1} {spec.id} {case.key}: {result['status']}", file=sys.stderr)
    for spec in specs:
        _report(spec, runs[spec.id])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(runs, out, indent=1)
    return 0


def _median(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r["figures"][key] for r in results if r["status"] == "ok" and key in r["figures"]]
    return statistics.median(values) if values else None


def _report(spec: ScenarioSpec, runs: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\n## {spec.id} {spec.title}")
    loads = [r["load_1m"] for rs in runs.values() for r in rs if "load_1m" in r]
    if loads:  # other programs on the machine: figures taken under load are not comparable
        print(f"  (1-minute load average at case start: {min(loads):.1f}–{max(loads):.1f})")
    for case in spec.cases:
        results = runs.get(case.key, [])
        ok = [r for r in results if r["status"] == "ok"]
        if not ok:
            print(f"  {case.label:<46} {results[0]['status'] if results else 'not run'}")
            continue
        cells = [
            f"{key}={_fmt([r['figures'][key] for r in ok])}"
            for key in spec.figures
            if key in ok[0]["figures"]
        ]
        print(f"  {case.label:<46} " + "  ".join(cells))
    ours = next(c for c in spec.cases if c.tokengate)
    if ours.key not in runs:
        return
    mine = _median(runs.get(ours.key, []), spec.headline)
    if mine is None:
        return
    sense = "higher" if spec.higher_is_better else "lower"
    print(f"  ratios on {spec.headline} ({sense} is better; >1 means tokengate is better):")
    for case in spec.cases:
        if case is ours:
            continue
        theirs = _median(runs.get(case.key, []), spec.headline)
        if theirs is None or mine == 0:
            continue
        ratio = mine / theirs if spec.higher_is_better else theirs / mine
        print(f"    vs {case.label:<42} {ratio:.2f}x")
    if spec.id == "B2":
        serial = _median(runs.get("serial", []), "wall_s")
        if serial:
            for case in spec.cases:
                for key in ("wall_s", "cold_wall_s"):
                    wall = _median(runs.get(case.key, []), key)
                    if wall and case.key != "serial":
                        print(
                            f"    speedup over serial, {case.label:<30} {key:<12} "
                            f"{serial / wall:.2f}x"
                        )


if __name__ == "__main__":
    sys.exit(main())
