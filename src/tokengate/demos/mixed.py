"""The seed's Proof 3 load: waves of CPU and I/O tasks mixed, with stats as it runs.

Every 0.1-1.0 s a wave of 10-20 tasks drawn from the seed's operation types is submitted; the
results are collected as they finish, and a stats block is printed every few seconds. At the end,
the seed's "MIXED ORCHESTRATOR COMPLETE" report.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from tokengate import OperationsCoordinator, Token, task_token_guard


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
def write_json_fast(path: str, payload: dict[str, Any]) -> dict[str, Any]:
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    return {"path": path, "bytes": os.path.getsize(path), "keys": len(payload)}


@task_token_guard(
    operation_type="append_log_slow", tags={"weight": "heavy", "storage_speed": "SLOW"}
)
def append_log_slow(path: str, message: str) -> dict[str, Any]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(message + "\n")
    return {"path": path, "chars": len(message)}


@task_token_guard(
    operation_type="write_blob_moderate", tags={"weight": "medium", "storage_speed": "MODERATE"}
)
def write_blob_moderate(path: str, size_kb: int) -> dict[str, Any]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    blob = b"x" * (size_kb * 1024)
    with open(path, "wb") as f:
        f.write(blob)
    return {"path": path, "bytes": len(blob)}


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


def run(
    duration: float = 20.0,
    *,
    verbose: bool = False,
    seed: int | None = None,
    backend: Any = "local",
    address: str | None = None,
) -> int:
    """Run the mixed orchestrator for ``duration`` seconds; returns the number of failures.

    ``backend``/``address`` go to ``OperationsCoordinator`` (``backend="dask"`` runs the same
    load on a Dask cluster)."""
    rng = random.Random(seed)
    base = tempfile.mkdtemp(prefix="tokengate_mixed_")
    stop_at = time.monotonic() + duration
    waves = 0
    pending: list[Token[Any]] = []
    done = threading.Event()
    with OperationsCoordinator(verbose=verbose, backend=backend, address=address) as coordinator:
        next_report = time.monotonic() + 5
        while time.monotonic() < stop_at:
            pending = [t for t in pending if not t.done()]
            pending += _wave(rng, base, waves)
            waves += 1
            if time.monotonic() >= next_report:
                print(coordinator.stats("MIXED"), flush=True)
                next_report += 5
            done.wait(rng.uniform(0.1, 1.0))
        for token in pending:
            token.exception(timeout=60)
    snap = coordinator.stats("FINAL")
    rule = "=" * 70
    print(rule)
    print("MIXED ORCHESTRATOR COMPLETE")
    print(rule)
    print(f"  Total wall-clock : {snap.elapsed:.1f}s")
    print(f"  Waves            : {waves}")
    print(f"  Submitted        : {snap.submitted}")
    pct = 100.0 * snap.resolved / snap.submitted if snap.submitted else 0.0
    print(f"  Resolved         : {snap.resolved}  ({pct:.1f}%)")
    print(f"  Failed           : {snap.failed}")
    print(f"  Latency p50      : {snap.latency_p50:.3f}s")
    print(f"  Latency p95      : {snap.latency_p95:.3f}s")
    print(f"  Latency max      : {snap.latency_max:.3f}s")
    print()
    print(snap.render_dispatched())
    return snap.failed
