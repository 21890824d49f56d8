"""Proof 3, mixed workload coordination: waves of CPU and I/O tasks under one coordinator.

After the Quick-Proof's small set-up (eight log appends and eight prime checks, resolved together),
every 0.1-1.0 s a wave of 10-20 tasks is drawn from the Quick-Proof's 11 operation types (the CPU
ones of Proof 1, a prime check, three small string/arithmetic ones, and the three storage-tier
writes of Proof 2) and submitted at once; nothing waits for a wave to finish before the next. At the
end, the Quick-Proof's "MIXED ORCHESTRATOR COMPLETE" report with the operations-dispatched bars. Run
it on its own::

    python -m tokengate.demos.mixed 20

``WAVE_MAKERS`` and ``plan_wave`` are shared with benchmark B6, which replays the same waves on
other executors.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from tokengate import OperationsCoordinator, StatsSnapshot, Token, task_token_guard
from tokengate.demos._standalone import run_standalone
from tokengate.demos.cpu import (
    complex_operation,
    fibonacci_operation,
    heavy_operation,
    simple_operation,
)
from tokengate.demos.seed_io import append_log_slow, write_blob_moderate, write_json_fast

# -- the Quick-Proof's prime check (Proof 3), and three small operations named in its report -------


@task_token_guard(operation_type="prime_check", tags={"weight": "medium"})
def prime_operation(n: int) -> bool:
    """Check if the number is prime (moderate complexity)."""
    if n < 2:
        return False
    for i in range(2, int(n**0.5) + 1):  # noqa: SIM110 (as the Quick-Proof wrote it)
        if n % i == 0:
            return False
    return True


@task_token_guard(operation_type="string_operation", tags={"weight": "light"})
def string_operation(n: int) -> int:
    """Build, upper-case and measure a string of ``n`` numbers."""
    return len("".join(str(i) for i in range(n)).upper())


@task_token_guard(operation_type="trivial_operation", tags={"weight": "light"})
def trivial_operation(n: int) -> int:
    """Almost nothing: the cost of the machinery itself."""
    return n + 1


@task_token_guard(operation_type="moderate_operation", tags={"weight": "medium"})
def moderate_operation(n: int) -> int:
    """A sum of squares over ``range(n)``."""
    return sum(i * i for i in range(n))


# -- the waves --------------------------------------------------------------------------------

#: (function, arguments drawn from rng, for a task numbered i writing under base).
WaveMaker = Callable[[random.Random, str, int], tuple[Any, tuple[Any, ...]]]

WAVE_MAKERS: tuple[WaveMaker, ...] = (
    lambda rng, base, i: (simple_operation, (rng.randint(1_000, 5_000),)),
    lambda rng, base, i: (complex_operation, (rng.randint(20, 40),)),
    lambda rng, base, i: (heavy_operation, (rng.randint(20, 60),)),
    lambda rng, base, i: (fibonacci_operation, (rng.randint(100, 300),)),
    lambda rng, base, i: (prime_operation, (rng.randint(10_000, 100_000),)),
    lambda rng, base, i: (string_operation, (rng.randint(100, 500),)),
    lambda rng, base, i: (trivial_operation, (i,)),
    lambda rng, base, i: (moderate_operation, (rng.randint(1_000, 5_000),)),
    lambda rng, base, i: (
        write_json_fast,
        (os.path.join(base, "json", f"{i}.json"), {"i": i, "wave": i // 100}),
    ),
    lambda rng, base, i: (
        append_log_slow,
        (os.path.join(base, "logs", "out.log"), f"entry {i}"),
    ),
    lambda rng, base, i: (
        write_blob_moderate,
        (os.path.join(base, "blobs", f"{i % 50}.bin"), 16),
    ),
)


def plan_wave(rng: random.Random, base: str, wave: int) -> list[tuple[Any, tuple[Any, ...]]]:
    """The calls of one wave: 10-20 tasks, each drawn from the 11 operation types."""
    size = rng.randint(10, 20)
    return [rng.choice(WAVE_MAKERS)(rng, base, wave * 100 + k) for k in range(size)]


def next_gap(rng: random.Random) -> float:
    """Seconds until the next wave."""
    return rng.uniform(0.1, 1.0)


# -- the demo ---------------------------------------------------------------------------------


@dataclass
class MixedOrchestrator:
    """Waves of mixed tasks for ``duration`` seconds; ``report()`` is the Quick-Proof's closing
    block."""

    duration: float = 20.0
    seed: int | None = None
    workdir: str | None = None
    say: Any = print
    phase: str = "starting"
    waves: int = 0
    _pending: list[Token[Any]] = field(default_factory=list, repr=False)

    def run(self, coordinator: OperationsCoordinator, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        rng = random.Random(self.seed)
        base = self.workdir or tempfile.mkdtemp(prefix="tokengate_mixed_")

        # The Quick-Proof's Proof 3 set-up first: I/O and CPU tokens side by side, then resolve all.
        self.phase = "set-up"
        log_path = os.path.join(base, "logs", "out.log")
        log_tokens = [append_log_slow(log_path, f"entry {i}") for i in range(8)]
        primes_to_check = [97, 101, 103, 107, 109, 113, 127, 131]
        prime_tokens = [prime_operation(n) for n in primes_to_check]
        log_results = [t.get(timeout=30) for t in log_tokens]
        prime_results = [t.get(timeout=30) for t in prime_tokens]
        self.say(f"  Log results  : {log_results[:3]}")
        self.say(f"  Prime results: {prime_results}")

        self.phase = "waves"
        started = time.monotonic()
        next_at = started
        while not stop.is_set() and next_at - started < self.duration:
            self._pending = [t for t in self._pending if not t.done()]
            self._pending += [fn(*args) for fn, args in plan_wave(rng, base, self.waves)]
            self.waves += 1
            next_at += next_gap(rng)  # on a fixed schedule: a slow wave does not shift the rest
            stop.wait(max(0.0, min(next_at, started + self.duration) - time.monotonic()))
        self.phase = "draining"
        if not stop.is_set():
            futures.wait(self._pending)
        self.phase = "done"

    def report(self, snap: StatsSnapshot) -> str:
        rule = "=" * 70
        pct = 100.0 * snap.resolved / snap.submitted if snap.submitted else 0.0
        lines = [
            rule,
            "MIXED ORCHESTRATOR COMPLETE",
            rule,
            f"  Total wall-clock : {snap.elapsed:.1f}s",
            f"  Waves            : {self.waves}",
            f"  Submitted        : {snap.submitted}",
            f"  Resolved         : {snap.resolved}  ({pct:.1f}%)",
            f"  Failed           : {snap.failed}",
        ]
        if snap.discarded:
            lines.append(f"  Discarded        : {snap.discarded}")
        lines += [
            f"  Latency p50      : {snap.latency_p50:.3f}s",
            f"  Latency p95      : {snap.latency_p95:.3f}s",
            f"  Latency max      : {snap.latency_max:.3f}s",
            "",
            snap.render_dispatched(),
        ]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_standalone(MixedOrchestrator, argv)


if __name__ == "__main__":
    sys.exit(main())
