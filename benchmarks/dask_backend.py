"""Dask backend figures: per-task overhead against raw ``client.submit``, and B6 on both backends.

Self-contained (the shared harness in ``tokengate.bench`` is not needed): run it as a script::

    python benchmarks/dask_backend.py                 # full: B6 for 60 s per backend
    python benchmarks/dask_backend.py --quick         # B6 for 10 s per backend
    python benchmarks/dask_backend.py --json out.json
    python benchmarks/dask_backend.py --dask-threads 4   # B6 also on 2 workers x 4 threads

**Overhead.** One ``LocalCluster`` (2 worker processes, 1 thread each: the machine's default on
2 cores), one client. ``raw``: ``client.submit(noop, i, pure=False)`` for N tasks, then
``client.gather``. ``tokengate``: ``OperationsCoordinator(backend=DaskBackend(client=client))``
on that same client, N calls of a decorated ``noop``, then ``get()`` on each token. Both are
timed from the first submit to the last result; the ratio is tokengate / raw. Rounds alternate
(raw, tokengate) and the median of 3 is reported with the range.

**B6** (BENCHMARKS.md): the seed's Proof 3 load, waves every 0.1-1.0 s of 10-20 tasks drawn from
its 11 operation types (CPU and tiered I/O mixed), for the duration; latency p50/p95/max from
``coordinator.stats()`` (submit to result), on the local backend and on the Dask backend (a
LocalCluster sized to the machine, started by the backend), same seed for both.

To register it in the shared harness, call :func:`overhead` and :func:`b6` (each returns plain
dicts) or :func:`run` for the whole report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from tokengate import OperationsCoordinator, Token, task_token_guard


# -- the tasks -------------------------------------------------------------------------------------
def raw_noop(i: int) -> int:
    return i


@task_token_guard(operation_type="noop", tags={"weight": "light"})
def noop(i: int) -> int:
    return i


@task_token_guard(operation_type="simple_operation", tags={"weight": "light"})
def simple_operation(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


@task_token_guard(operation_type="complex_operation", tags={"weight": "medium"})
def complex_operation(dimension: int) -> int:
    matrix = [[i * j for j in range(dimension)] for i in range(dimension)]
    return sum(sum(row) for row in matrix)


@task_token_guard(operation_type="heavy_operation", tags={"weight": "heavy"})
def heavy_operation(iterations: int) -> int:
    result = 0
    for _ in range(iterations):
        result += sum(j**2 for j in range(100))
    return result


@task_token_guard(operation_type="fibonacci_operation", tags={"weight": "heavy"})
def fibonacci_operation(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@task_token_guard(operation_type="prime_operation", tags={"weight": "medium"})
def prime_operation(n: int) -> bool:
    if n < 2:
        return False
    return all(n % i for i in range(2, int(n**0.5) + 1))


@task_token_guard(operation_type="string_operation", tags={"weight": "light"})
def string_operation(n: int) -> int:
    return len("".join(str(i) for i in range(n)).upper())


@task_token_guard(operation_type="trivial_operation", tags={"weight": "light"})
def trivial_operation(n: int) -> int:
    return n + 1


@task_token_guard(operation_type="moderate_operation", tags={"weight": "medium"})
def moderate_operation(n: int) -> int:
    return sum(i * i for i in range(n))


@task_token_guard(
    operation_type="write_json_fast", tags={"weight": "light", "storage_speed": "FAST"}
)
def write_json_fast(path: str, payload: dict[str, Any]) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    return os.path.getsize(path)


@task_token_guard(
    operation_type="append_log_slow", tags={"weight": "heavy", "storage_speed": "SLOW"}
)
def append_log_slow(path: str, message: str) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(message + "\n")
    return len(message)


@task_token_guard(
    operation_type="write_blob_moderate", tags={"weight": "medium", "storage_speed": "MODERATE"}
)
def write_blob_moderate(path: str, size_kb: int) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    blob = b"x" * (size_kb * 1024)
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


def _wave(rng: random.Random, base: str, index: int) -> list[Token[Any]]:
    makers: list[Callable[[int], Token[Any]]] = [
        lambda i: simple_operation(rng.randint(1_000, 5_000)),
        lambda i: complex_operation(rng.randint(20, 40)),
        lambda i: heavy_operation(rng.randint(20, 60)),
        lambda i: fibonacci_operation(rng.randint(100, 300)),
        lambda i: prime_operation(rng.randint(10_000, 100_000)),
        lambda i: string_operation(rng.randint(100, 500)),
        trivial_operation,
        lambda i: moderate_operation(rng.randint(1_000, 5_000)),
        lambda i: write_json_fast(os.path.join(base, "json", f"{i}.json"), {"i": i}),
        lambda i: append_log_slow(os.path.join(base, "logs", "out.log"), f"entry {i}"),
        lambda i: write_blob_moderate(os.path.join(base, "blobs", f"{i % 50}.bin"), 16),
    ]
    return [rng.choice(makers)(index * 100 + k) for k in range(rng.randint(10, 20))]


# -- scenarios -------------------------------------------------------------------------------------
def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def overhead(tasks: int = 2000, rounds: int = 3) -> dict[str, Any]:
    """Seconds per task for raw client.submit and for the Dask backend, same cluster and client."""
    import distributed

    from tokengate.backends import DaskBackend

    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    client = distributed.Client(cluster, set_as_default=False)
    raw: list[float] = []
    ours: list[float] = []
    try:
        coordinator = OperationsCoordinator(backend=DaskBackend(client=client))
        with coordinator:
            # warm up both paths (imports on the workers, connections)
            client.gather([client.submit(raw_noop, i, pure=False) for i in range(50)])
            [t.get(timeout=60) for t in [noop(i) for i in range(50)]]
            for _ in range(rounds):
                start = time.perf_counter()
                futures = [client.submit(raw_noop, i, pure=False) for i in range(tasks)]
                assert client.gather(futures) == list(range(tasks))
                raw.append((time.perf_counter() - start) / tasks)
                del futures
                start = time.perf_counter()
                tokens = [noop(i) for i in range(tasks)]
                assert [t.get(timeout=600) for t in tokens] == list(range(tasks))
                ours.append((time.perf_counter() - start) / tasks)
                del tokens
    finally:
        client.close()
        cluster.close()
    ratios = [o / r for o, r in zip(ours, raw, strict=True)]
    return {
        "tasks": tasks,
        "raw_us_per_task": _summary([r * 1e6 for r in raw]),
        "tokengate_us_per_task": _summary([o * 1e6 for o in ours]),
        "ratio": _summary(ratios),
        "rounds": rounds,
    }


def b6(
    backend: str, duration: float, seed: int = 7, threads_per_worker: int | None = None
) -> dict[str, Any]:
    """The seed's Proof 3 load on one backend; latencies from coordinator.stats().

    ``threads_per_worker`` sizes the Dask LocalCluster's workers (default: Dask's choice for
    this machine, one worker process per core)."""
    rng = random.Random(seed)
    base = tempfile.mkdtemp(prefix="tokengate_b6_")
    pending: list[Token[Any]] = []
    pause = threading.Event()
    waves = 0
    chosen: Any = backend
    if backend == "dask" and threads_per_worker is not None:
        from tokengate.backends import DaskBackend

        chosen = DaskBackend(n_workers=2, threads_per_worker=threads_per_worker)
    with OperationsCoordinator(backend=chosen) as coordinator:
        described = coordinator.backend.describe() if coordinator.backend else "local lanes"
        coordinator._stats.reset_clock()
        stop_at = time.monotonic() + duration
        while time.monotonic() < stop_at:
            pending = [t for t in pending if not t.done()]
            pending += _wave(rng, base, waves)
            waves += 1
            pause.wait(rng.uniform(0.1, 1.0))
        for token in pending:
            token.exception(timeout=120)
        snap = coordinator.stats("B6")
    return {
        "backend": backend if threads_per_worker is None else f"{backend}-{threads_per_worker}t",
        "where": described,
        "duration_s": duration,
        "waves": waves,
        "submitted": snap.submitted,
        "resolved": snap.resolved,
        "failed": snap.failed,
        "p50_ms": snap.latency_p50 * 1e3,
        "p95_ms": snap.latency_p95 * 1e3,
        "max_ms": snap.latency_max * 1e3,
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "platform": platform.platform(),
    }


def run(
    quick: bool = False, b6_rounds: int = 3, dask_threads: list[int] | None = None
) -> dict[str, Any]:
    import dask
    import distributed

    report: dict[str, Any] = {
        "machine": machine(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }
    report["overhead"] = overhead(tasks=1000 if quick else 2000)
    duration = 10.0 if quick else 60.0
    variants: list[tuple[str, int | None]] = [("local", None), ("dask", None)]
    variants += [("dask", n) for n in dask_threads or ()]
    report["b6"] = {}
    for backend, threads in variants:
        runs = [b6(backend, duration, 7 + i, threads) for i in range(b6_rounds)]
        report["b6"][runs[0]["backend"]] = runs
    return report


def _print(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"machine: {m['cpus']} CPUs ({m['usable_cpus']} usable), Python {m['python']}, "
        f"GIL {'on' if m['gil'] else 'off'}; dask {report['dask']}"
    )
    o = report["overhead"]
    raw, ours, ratio = o["raw_us_per_task"], o["tokengate_us_per_task"], o["ratio"]
    print(f"\nPer-task overhead, {o['tasks']} noop tasks, median of {o['rounds']} [min-max]:")
    rows = [
        ("raw client.submit + gather", raw, "µs/task", ".0f"),
        ("tokengate backend='dask'", ours, "µs/task", ".0f"),
        ("ratio tokengate / raw", ratio, "x (target <= 1.2x)", ".2f"),
    ]
    for label, v, unit, fmt in rows:
        print(f"  {label:27s}: {v['median']:8{fmt}} {unit} [{v['min']:{fmt}}-{v['max']:{fmt}}]")
    print("\nB6 seed mixed orchestrator (latency submit -> result), median of runs [min-max]:")
    for backend, runs in report["b6"].items():
        cols = {k: _summary([r[k] for r in runs]) for k in ("p50_ms", "p95_ms", "max_ms")}
        sub = sum(r["submitted"] for r in runs)
        res = sum(r["resolved"] for r in runs)
        fail = sum(r["failed"] for r in runs)
        print(
            f"  {backend:8s} ({runs[0]['where']}): {len(runs)} x {runs[0]['duration_s']:.0f}s, "
            f"submitted {sub}, resolved {res}, failed {fail}"
        )
        print(
            "        "
            + "  ".join(
                f"{k[:-3]} {v['median']:.1f} ms [{v['min']:.1f}-{v['max']:.1f}]"
                for k, v in cols.items()
            )
        )
    print("  seed's published figures: p50 16 ms, p95 36 ms, max 53 ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B6 for 10 s instead of 60 s")
    parser.add_argument("--b6-rounds", type=int, default=3)
    parser.add_argument(
        "--dask-threads",
        type=int,
        action="append",
        help="also run B6 on Dask with this many threads per worker (repeatable)",
    )
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    report = run(quick=args.quick, b6_rounds=args.b6_rounds, dask_threads=args.dask_threads)
    _print(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
