"""The Quick-Proof's endurance run: CPU tasks through idle, normal and surge phases.

The phases cycle NORMAL → SURGE → NORMAL → IDLE, each lasting an eighth of ``duration`` (at least
0.25 s, at most 60 s) and sending at least one wave. IDLE sends a trickle of 1-3 tasks every
0.5-1.0 s, NORMAL the Quick-Proof's waves of 10-20 tasks every 0.1-1.0 s, SURGE 20-40 tasks every
0.05-0.3 s. At the end of each phase the Quick-Proof's stats block is printed under the phase's
name; the closing report gives the tasks submitted in each phase. Run it on its own::

    python -m tokengate.demos.endurance 60
"""

from __future__ import annotations

import math
import random
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from tokengate import OperationsCoordinator, StatsSnapshot, Token
from tokengate.demos._standalone import run_standalone
from tokengate.demos.cpu import cpu_call

PHASES = ("NORMAL", "SURGE", "NORMAL", "IDLE")
#: Per phase: (smallest wave, largest wave, shortest gap s, longest gap s).
RATES = {
    "IDLE": (1, 3, 0.5, 1.0),
    "NORMAL": (10, 20, 0.1, 1.0),
    "SURGE": (20, 40, 0.05, 0.3),
}


def phase_length(duration: float) -> float:
    """Seconds per phase: an eighth of the run, between 0.25 s and 60 s."""
    return min(60.0, max(0.25, duration / 8))


@dataclass
class EnduranceRun:
    """Cycle through the phases for ``duration`` seconds; ``report()`` is the Quick-Proof's
    block."""

    duration: float = 60.0
    seed: int | None = None
    say: Any = print
    phase: str = "starting"
    per_phase: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RATES, 0))
    _pending: list[Token[Any]] = field(default_factory=list, repr=False)

    def run(self, coordinator: OperationsCoordinator, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        rng = random.Random(self.seed)
        started = time.monotonic()
        length = phase_length(self.duration)
        for number in range(math.ceil(self.duration / length)):
            if stop.is_set():
                break
            self.phase = PHASES[number % len(PHASES)]
            phase_end = started + min((number + 1) * length, self.duration)
            smallest, largest, short, long = RATES[self.phase]
            while True:  # at least one wave per phase, however late the phase starts
                self._pending = [t for t in self._pending if not t.done()]
                for _ in range(rng.randint(smallest, largest)):
                    fn, args = cpu_call(rng)
                    self._pending.append(fn(*args))
                    self.per_phase[self.phase] += 1
                left = phase_end - time.monotonic()
                if stop.is_set() or left <= 0:
                    break
                stop.wait(min(rng.uniform(short, long), left))
            self.say(str(coordinator.stats(self.phase)))
            self.say("")
        self.phase = "draining"
        if not stop.is_set():
            futures.wait(self._pending)
        self.phase = "done"

    def report(self, snap: StatsSnapshot) -> str:
        rule = "=" * 54
        lines = [
            rule,
            "ENDURANCE RUN COMPLETE",
            rule,
            f"  Total wall-clock: {snap.elapsed:.1f}s",
            "",
            str(snap.with_label("FINAL")),
            "",
            "  Tasks per phase:",
        ]
        lines += [f"    {name:<7} : {count} submitted" for name, count in self.per_phase.items()]
        lines += ["", snap.render_dispatched()]
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_standalone(EnduranceRun, argv)


if __name__ == "__main__":
    sys.exit(main())
