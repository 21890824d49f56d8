"""The Quick-Proof's Proof 2, I/O-based workloads: its functions as written, and its report.

The functions are the Quick-Proof's, from :mod:`tokengate.demos.seed_io` (``create_json_file`` with
the one change docs/guide/quick-proof.md explains: a decorated call returns a Token, so it reads
``generate_medium_json(index).get()``). The files go to a fresh temporary directory. Then a
surge of 400 writes that each wait 20 ms on "the disk" shows the convergence engine growing the
FAST pool and retiring it afterwards.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tokengate import OperationsCoordinator, Token, task_token_guard
from tokengate.demos.seed_io import (
    append_log_slow,
    create_json_file,
    write_blob_moderate,
    write_json_fast,
)


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
