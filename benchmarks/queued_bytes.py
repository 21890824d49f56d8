"""Peak RSS of the caller while 3,000 process-lane calls share one 1 MB argument.

Each case runs in a fresh interpreter (peak RSS is per process): tokengate with its defaults,
then ``ProcessPoolExecutor(2)``. The task returns ``len`` of its argument; every call is
submitted before any result is gathered, so whatever the caller keeps per queued call shows in
its high-water mark (``VmHWM``). Run: ``python benchmarks/queued_bytes.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import resource
import subprocess
import sys
import time

CALLS = 3_000
SIZE = 1 << 20


def length(value: bytes) -> int:
    return len(value)


def peak_mb() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tokengate() -> dict[str, float]:
    from tokengate import OperationsCoordinator, task_token_guard

    task = task_token_guard(operation_type="length", tags={"weight": "heavy"})(length)
    data = bytes(SIZE)
    start = time.perf_counter()
    with OperationsCoordinator() as coordinator:
        tokens = [task(data) for _ in range(CALLS)]
        assert sum(t.get(timeout=600) for t in tokens) == CALLS * SIZE
        stats = coordinator.stats()
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "peak_rss_mb": peak_mb(),
        "queued_bytes_high_water_mb": getattr(stats, "process_queue_bytes_high_water", -1)
        / (1 << 20),
    }


def run_pool() -> dict[str, float]:
    data = bytes(SIZE)
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        futures = [pool.submit(length, data) for _ in range(CALLS)]
        assert sum(f.result(timeout=600) for f in futures) == CALLS * SIZE
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_mb()}


def main() -> None:
    if len(sys.argv) == 2:
        case = {"tokengate": run_tokengate, "pool": run_pool}[sys.argv[1]]
        print(json.dumps(case()))
        return
    print(f"{CALLS} calls, one {SIZE >> 20} MB bytes argument each, gathered at the end")
    for name in ("tokengate", "pool"):
        out = subprocess.run(
            [sys.executable, __file__, name], check=True, capture_output=True, text=True
        ).stdout
        figures = json.loads(out.strip().splitlines()[-1])
        label = "tokengate (defaults)" if name == "tokengate" else "ProcessPoolExecutor(2)"
        print(f"{label:24} " + "  ".join(f"{k}={v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
