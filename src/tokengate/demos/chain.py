"""Proof 3, chains of dependent tasks: the Quick-Proof's five-step chain, many chains in flight.

A token passed as an argument is a dependency: ``chain_finalize(chain_reduce(...(chain_seed(v))))``
submits all five steps at once, and each step runs with the value of the one before it, routed
by its own tags, without a worker waiting in between. Every 0.1-0.5 s a wave of 5-15 chains is
started; each final value is checked against the same five functions called directly. Run it on
its own::

    python -m tokengate.demos.chain 5
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

# -- the Quick-Proof's chain, as written (the import changed, type hints added) --------------------


@task_token_guard(operation_type="chain_seed", tags={"weight": "light"})
def chain_seed(value: int) -> int:
    """
    Step 0: Produce an initial value.
    Entry point of a chain. Returns a transformed seed for the next step.
    """
    return value * 3 + 7


@task_token_guard(operation_type="chain_filter", tags={"weight": "light"})
def chain_filter(value: int) -> int:
    """
    Step 1: Conditionally transform the incoming value.
    Demonstrates that chain steps can apply logic, not just pass data through.
    """
    if value % 2 == 0:
        return value // 2
    return value * 2 + 1


@task_token_guard(operation_type="chain_accumulate", tags={"weight": "medium"})
def chain_accumulate(value: int) -> int:
    """
    Step 2: Expand the value into a sum across a range.
    Adds moderate CPU work mid-chain to demonstrate that chaining
    does not require tasks to be trivially fast.
    """
    return sum(i * value for i in range(1, 51))


@task_token_guard(operation_type="chain_reduce", tags={"weight": "light"})
def chain_reduce(value: int) -> int:
    """
    Step 3: Reduce back to a compact form.
    Final transformation before the chain terminates.
    """
    return value % 9973  # mod a prime to keep numbers readable


@task_token_guard(operation_type="chain_finalize", tags={"weight": "light"})
def chain_finalize(value: int, label: str = "result") -> dict[str, Any]:
    """
    Step 4: Annotate and return the final chain output.
    Demonstrates that chain steps can accept auxiliary arguments
    alongside their dependency-resolved input.
    """
    return {label: value, "parity": "even" if value % 2 == 0 else "odd"}


# -- the demo ---------------------------------------------------------------------------------


def start_chain(value: int) -> Token[dict[str, Any]]:
    """All five steps submitted at once; the last token's value is the chain's result.

    ``chain_filter(step0)`` passes a ``Token[int]`` where an ``int`` is expected: mypy accepts it
    with tokengate's plugin (``plugins = ["tokengate.mypy"]``), as the runtime does.
    """
    step0 = chain_seed(value)
    step1 = chain_filter(step0)
    step2 = chain_accumulate(step1)
    step3 = chain_reduce(step2)
    return chain_finalize(step3, label=f"chain_{value}")


def direct(value: int) -> dict[str, Any]:
    """The same chain as plain calls of the undecorated functions (``__wrapped__``)."""
    step = chain_seed.__wrapped__(value)
    step = chain_filter.__wrapped__(step)
    step = chain_accumulate.__wrapped__(step)
    step = chain_reduce.__wrapped__(step)
    return chain_finalize.__wrapped__(step, label=f"chain_{value}")


@dataclass
class ChainProof:
    """Waves of five-step chains for ``duration`` seconds, every result checked."""

    duration: float = 5.0
    seed: int | None = None
    say: Any = print
    phase: str = "starting"
    waves: int = 0
    chains: int = 0
    verified: int = 0
    wrong: int = 0
    broken: int = 0
    _open: list[tuple[int, Token[dict[str, Any]]]] = field(default_factory=list, repr=False)

    def run(self, coordinator: OperationsCoordinator, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        rng = random.Random(self.seed)
        self.phase = "first chain"
        self.say(
            "[DEMO] chain_finalize(chain_reduce(chain_accumulate(chain_filter(chain_seed(5)))))"
        )
        self.say(f"  → {start_chain(5).get(timeout=30)}")
        self.phase = "chains"
        started = time.monotonic()
        while not stop.is_set() and time.monotonic() - started < self.duration:
            for _ in range(rng.randint(5, 15)):
                value = rng.randint(0, 1_000_000)
                self._open.append((value, start_chain(value)))
                self.chains += 1
            self.waves += 1
            self._check(wait=False)
            stop.wait(rng.uniform(0.1, 0.5))
        self.phase = "draining"
        if not stop.is_set():
            self._check(wait=True)
        self.phase = "done"

    def _check(self, *, wait: bool) -> None:
        if wait:
            futures.wait([token for _, token in self._open])
        still_open = []
        for value, token in self._open:
            if not token.done():
                still_open.append((value, token))
            elif token.state != "resolved":
                self.broken += 1
            elif token.result() == direct(value):
                self.verified += 1
            else:
                self.wrong += 1
        self._open = still_open

    def report(self, snap: StatsSnapshot) -> str:
        rule = "=" * 70
        return "\n".join(
            [
                rule,
                "CHAIN PROOF COMPLETE",
                rule,
                f"  Total wall-clock : {snap.elapsed:.1f}s",
                f"  Waves            : {self.waves}",
                f"  Chains           : {self.chains} (5 steps each)",
                f"  Verified         : {self.verified}  (same value as the direct calls)",
                f"  Wrong            : {self.wrong}",
                f"  Broken           : {self.broken}  (a step failed or was discarded)",
                "",
                str(snap.with_label("FINAL")),
                "",
                snap.render_dispatched(),
            ]
        )


def main(argv: list[str] | None = None) -> int:
    return run_standalone(ChainProof, argv, wrong=lambda demo: demo.wrong)


if __name__ == "__main__":
    sys.exit(main())
