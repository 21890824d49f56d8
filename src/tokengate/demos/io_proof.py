"""The seed's Proof 2, I/O-based workloads: its functions as written, and its report.

``write_json_fast``, ``append_log_slow`` and ``write_blob_moderate`` are the seed's, unchanged;
so is ``generate_medium_json``. ``create_json_file`` takes the one change the README explains:
a decorated call returns a Token, so it reads ``generate_medium_json(index).get()``. The files go
to a fresh temporary directory. Then a surge of 400 writes that each wait 20 ms on "the disk"
shows the convergence engine growing the FAST pool and retiring it afterwards.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tokengate import OperationsCoordinator, Token, task_token_guard


@task_token_guard(
    operation_type="write_json_fast", tags={"weight": "light", "storage_speed": "FAST"}
)
def write_json_fast(path, payload):  # type: ignore[no-untyped-def]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "keys": len(payload),
    }


@task_token_guard(
    operation_type="append_log_slow", tags={"weight": "heavy", "storage_speed": "SLOW"}
)
def append_log_slow(path, message):  # type: ignore[no-untyped-def]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(message + "\n")
    return {
        "path": path,
        "chars": len(message),
    }


@task_token_guard(
    operation_type="write_blob_moderate", tags={"weight": "medium", "storage_speed": "MODERATE"}
)
def write_blob_moderate(path, size_kb):  # type: ignore[no-untyped-def]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    blob = b"x" * (size_kb * 1024)
    with open(path, "wb") as f:
        f.write(blob)
    return {
        "path": path,
        "bytes": len(blob),
    }


@task_token_guard(
    operation_type="json_fast",
    tags={
        "weight": "medium",  # Core routing
        "storage_speed": "FAST",  # Storage throttling
    },
)
def generate_medium_json(index: int) -> dict[str, Any]:
    """Generate medium-sized JSON (~50KB)."""
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


def create_json_file(index: int, base: Path) -> dict[str, Any]:
    """The seed's ``create_json_file``; the one change is the ``.get()``."""
    _dir = base / "jsons"
    _dir.mkdir(exist_ok=True)

    # Generate data
    data = generate_medium_json(index).get()  # the seed: data = generate_medium_json(index)

    # Write file - throttling happens automatically!
    timestamp = int(time.time() * 1000)
    filename = _dir / f"json_fast_{timestamp}_{index:04d}.json"

    start = time.time()
    with open(filename, "w") as f:
        json.dump(data, f, indent=2)

    duration = time.time() - start
    file_size = filename.stat().st_size

    if index % 100 == 0:
        print(f"[JSON-{index:04d}] Created {file_size:,} bytes in {duration:.3f}s")

    return {
        "index": index,
        "filename": str(filename),
        "size_bytes": file_size,
        "write_time": duration,
    }


@task_token_guard(operation_type="slow_disk_write", tags={"storage_speed": "FAST"})
def slow_disk_write(index: int) -> int:
    """Stands in for a write to a slow disk: the thread waits 20 ms, using no CPU."""
    time.sleep(0.02)
    return index


def _report(label: str, tokens: list[Token[Any]]) -> int:
    print(f"Submitting {len(tokens)} tasks → {label}")
    failed = 0
    for token in tokens:
        if token.exception(timeout=60) is not None:
            failed += 1
    print(f"{len(tokens) - failed}/{len(tokens)} resolved  |  {failed} failed")
    print(f"{' ✓' if label.startswith('JSON') else '✓'} {label}")
    print()
    return failed


def run(*, verbose: bool = False, show_calm: bool = True) -> int:
    """Run the proof; returns the number of failed tasks. ``show_calm`` waits (up to 5 s) for
    the engine to retire the surge's extra threads."""
    base = Path(tempfile.mkdtemp(prefix="tokengate_io_proof_"))
    print("── I/O-BOUND PROOF " + "─" * 50)
    print(f"  Output directory: {base}")
    print()
    failures = 0
    with OperationsCoordinator(verbose=verbose, convergence_verbose=True) as coordinator:
        if not verbose:
            print(coordinator.throttle.banner())
            print()
        writes = [
            write_json_fast(str(base / "json" / f"{i}.json"), {"i": i, "values": list(range(i))})
            for i in range(10)
        ]
        failures += _report("JSON writes", writes)
        logs = [append_log_slow(str(base / "logs" / "proof.log"), f"entry {i}") for i in range(10)]
        failures += _report("Log appends", logs)
        blobs = [write_blob_moderate(str(base / "blobs" / f"{i}.bin"), 64) for i in range(6)]
        failures += _report("Blob writes", blobs)
        made = [create_json_file(i, base) for i in range(3)]
        print(f"create_json_file: {len(made)} files of ~{made[0]['size_bytes'] // 1024} KB")
        print()
        print("Surge: 400 writes that each wait 20 ms on the disk (tier FAST)")
        start = time.perf_counter()
        surge = [slow_disk_write(i) for i in range(400)]
        for token in surge:
            token.get(timeout=60)
        elapsed = time.perf_counter() - start
        engine = coordinator.convergence
        peak = engine.worker_counts()["io:FAST"][2] if engine is not None else "-"
        print(f"  400 writes in {elapsed:.2f}s; FAST pool peaked at {peak} threads")
        print(f"  FAST high-water: {coordinator.tier_stats()['FAST'].high_water} (limit 50)")
        if show_calm and engine is not None:
            until = time.monotonic() + 5.0
            calm = threading.Event()
            while engine.worker_counts()["io:FAST"][1] > engine.worker_counts()["io:FAST"][0]:
                if time.monotonic() > until:
                    break
                calm.wait(0.05)
            print(f"  after the surge: {engine.worker_counts()['io:FAST'][1]} FAST threads")
        print(f"  convergence events: {dict(coordinator.stats().events)}")
    print("✓ I/O proof complete.")
    return failures
