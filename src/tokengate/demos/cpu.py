"""Proof 1, CPU-based operation scheduling: the Quick-Proof's CPU functions as token-managed tasks.

First the Quick-Proof's Fibonacci program (eight tokens, then ``Results: [...]``), then batches of
the Quick-Proof's CPU functions every 0.1-0.5 s for ``duration`` seconds, each result checked
against a direct call of the undecorated function. Run it on its own::

    python -m tokengate.demos.cpu 10

or through the command line tool, with a live display: ``tokengate demo cpu --duration 10``.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from tokengate import OperationsCoordinator, StatsSnapshot, Token, task_token_guard
from tokengate.demos._standalone import run_standalone

# -- the Quick-Proof's functions, as written (the import changed, type hints added) ----------------


@task_token_guard(operation_type="simple_loop", tags={"weight": "light"})
def simple_operation(n: int) -> int:
    """Fast: Basic operation with accumulation."""
    total = 0
    for i in range(n):
        total += i
    return total


@task_token_guard(operation_type="nested_loops", tags={"weight": "medium"})
def complex_operation(dimension: int) -> int:
    """Slower: Nested loops with matrix-like structure."""
    matrix: list[list[int]] = []
    for i in range(dimension):
        row: list[int] = []
        for j in range(dimension):
            row.append(i * j)
        matrix.append(row)
    return sum(sum(row) for row in matrix)


@task_token_guard(operation_type="cpu_intensive", tags={"weight": "heavy"})
def heavy_operation(iterations: int) -> int:
    """Slow: CPU-intensive calculation."""
    result = 0
    for i in range(iterations):  # noqa: B007 (as the Quick-Proof wrote it)
        result += sum(j**2 for j in range(100))
    return result


@task_token_guard(operation_type="fibonacci", tags={"weight": "heavy"})
def fibonacci_operation(n: int) -> int:
    """Iterative fibonacci scheduled as a token-managed task."""
    if n <= 1:
        return n
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@task_token_guard(operation_type="normal_operation", tags={"weight": "light"})
def normal_processing(items: list[int]) -> int:
    """
    Normal processing function that simulates a CPU-based operation.
     - Performs a simple computation (summing squares) to simulate work.
     - Returns the total sum of squares.
     - Tagged as 'light' weight for scheduling purposes.
     - The function is decorated with @task_token_guard to ensure it is managed as a token
    """

    # Simple processing
    total = sum(x**2 for x in items)
    return total


# -- the demo ---------------------------------------------------------------------------------


def cpu_call(rng: random.Random) -> tuple[Any, tuple[Any, ...]]:
    """One of the Quick-Proof's CPU functions with arguments of the Quick-Proof's sizes."""
    return rng.choice(
        [
            (simple_operation, (rng.randint(1_000, 5_000),)),
            (complex_operation, (rng.randint(10, 40),)),
            (heavy_operation, (rng.randint(10, 40),)),
            (fibonacci_operation, (rng.randint(100, 300),)),
            (normal_processing, ([rng.randint(0, 100) for _ in range(rng.randint(50, 500))],)),
        ]
    )


@dataclass
class CpuProof:
    """Submit batches of CPU tasks for ``duration`` seconds; ``report()`` sums it up."""

    duration: float = 10.0
    seed: int | None = None
    say: Any = print
    phase: str = "starting"
    batches: int = 0
    checked: int = 0
    mismatches: int = 0
    _checks: list[tuple[Token[Any], Any]] = field(default_factory=list, repr=False)

    def run(self, coordinator: OperationsCoordinator, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        rng = random.Random(self.seed)

        self.phase = "fibonacci"
        self.say("[DEMO] Starting demo...")
        args = [100, 200, 300, 150, 250, 180, 220, 280]
        tokens = [fibonacci_operation(n) for n in args]
        results = [token.get(timeout=30) for token in tokens]
        self.say(f"Results: {results}")

        self.phase = "batches"
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < self.duration:
            for _ in range(rng.randint(8, 16)):
                fn, fn_args = cpu_call(rng)
                self._checks.append((fn(*fn_args), fn.__wrapped__(*fn_args)))
            self.batches += 1
            self._verify(wait=False)
            stop.wait(rng.uniform(0.1, 0.5))
        self.phase = "draining"
        if not stop.is_set():
            self._verify(wait=True)
        self.phase = "done"

    def _verify(self, *, wait: bool) -> None:
        """Compare finished results with a direct call of the undecorated function."""
        if wait:
            futures.wait([token for token, _ in self._checks])
        keep = []
        for token, expected in self._checks:
            if not wait and not token.done():
                keep.append((token, expected))
            elif token.state == "resolved":
                self.checked += 1
                self.mismatches += token.result() != expected
        self._checks = keep

    def report(self, snap: StatsSnapshot) -> str:
        rule = "=" * 70
        return "\n".join(
            [
                rule,
                "CPU PROOF COMPLETE",
                rule,
                f"  Total wall-clock : {snap.elapsed:.1f}s",
                f"  Batches          : {self.batches}",
                f"  Results checked  : {self.checked} ({self.mismatches} mismatches)",
                "",
                str(snap.with_label("FINAL")),
                "",
                snap.render_dispatched(),
            ]
        )


def main(argv: list[str] | None = None) -> int:
    return run_standalone(CpuProof, argv, wrong=lambda demo: demo.mismatches)


if __name__ == "__main__":
    sys.exit(main())
