"""Proof 2, I/O-based workloads: file writes throttled by storage tier, under a temp directory.

Each round submits the Quick-Proof's three groups: 10 JSON writes (each payload a ~50 KB document
made by ``generate_medium_json``, passed in as a token: the write waits for it without holding a
worker), 10 log appends on the SLOW tier and 6 blob writes on the MODERATE tier, then waits for
them. The first round prints the Quick-Proof's lines; rounds repeat for ``duration`` seconds (over
the same files, so the directory stays small); the report adds up every round and shows the most
writes each tier ever ran at once (never over its limit). Run it on its own::

    python -m tokengate.demos.io 5
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from tokengate import OperationsCoordinator, StatsSnapshot, Token
from tokengate.demos._standalone import run_standalone
from tokengate.demos.seed_io import (
    append_log_slow,
    generate_medium_json,
    write_blob_moderate,
    write_json_fast,
)

# -- the demo ---------------------------------------------------------------------------------

GROUPS = ("JSON writes", "Log appends", "Blob writes")


@dataclass
class IoProof:
    """Rounds of the Quick-Proof's three I/O groups for ``duration`` seconds under ``workdir``."""

    duration: float = 5.0
    seed: int | None = None
    workdir: str | None = None
    say: Any = print
    phase: str = "starting"
    rounds: int = 0
    submitted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    resolved: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    high_water: dict[str, tuple[int, int]] = field(default_factory=dict)

    def run(self, coordinator: OperationsCoordinator, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        base = self.workdir or tempfile.mkdtemp(prefix="tokengate_io_")
        self.say("── I/O-BOUND PROOF " + "─" * 50)
        self.say(f"  Output directory: {base}")
        self.say("")
        self.say("[STORAGE_THROTTLE] Initialized with speed tiers:")
        for tier, stats in coordinator.tier_stats().items():
            self.say(f"  {tier}: {stats.limit} concurrent I/O")
        self.say("")
        started = time.monotonic()
        while not stop.is_set():
            self.phase = f"round {self.rounds + 1}"
            r = self.rounds
            groups: dict[str, list[Token[Any]]] = {
                "JSON writes": [
                    write_json_fast(
                        os.path.join(base, "jsons", f"json_fast_{i:04d}.json"),
                        # A token as an argument: the write waits for it, holding no worker.
                        generate_medium_json(r * 10 + i),
                    )
                    for i in range(10)
                ],
                "Log appends": [
                    append_log_slow(os.path.join(base, "logs", "out.log"), f"round {r} entry {i}")
                    for i in range(10)
                ],
                "Blob writes": [
                    write_blob_moderate(os.path.join(base, "blobs", f"blob_{i}.bin"), 64)
                    for i in range(6)
                ],
            }
            for name, tokens in groups.items():
                if self.rounds == 0:
                    self.say(f"Submitting {len(tokens)} tasks → {name}")
                futures.wait(tokens)
                ok = sum(t.state == "resolved" for t in tokens)
                bad = sum(t.state == "failed" for t in tokens)
                self.submitted[name] += len(tokens)
                self.resolved[name] += ok
                self.failed[name] += bad
                if self.rounds == 0:
                    self.say(f"{ok}/{len(tokens)} resolved  |  {bad} failed")
                    self.say(f"{'✓' if ok == len(tokens) else '✗'} {name}")
                    self.say("")
            self.rounds += 1
            if time.monotonic() - started >= self.duration:
                break
        self.high_water = {
            tier: (s.high_water, s.limit) for tier, s in coordinator.tier_stats().items()
        }
        self.phase = "done"

    def report(self, snap: StatsSnapshot) -> str:
        lines = ["── I/O-BOUND PROOF: totals " + "─" * 42, f"  Rounds: {self.rounds}", ""]
        for name in GROUPS:
            n, ok, bad = self.submitted[name], self.resolved[name], self.failed[name]
            lines += [
                f"Submitting {n} tasks → {name}",
                f"{ok}/{n} resolved  |  {bad} failed",
                f"{'✓' if ok == n else '✗'} {name}",
                "",
            ]
        lines.append("  Most writes running at once, per storage tier (limit):")
        for tier, (most, limit) in self.high_water.items():
            lines.append(f"    {tier:<9} {most:>3} of {limit}")
        lines += ["", str(snap.with_label("FINAL")), "", snap.render_dispatched(), ""]
        complete = all(self.resolved[g] == self.submitted[g] for g in GROUPS)
        lines.append("✓ I/O proof complete." if complete else "✗ I/O proof incomplete.")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_standalone(IoProof, argv)


if __name__ == "__main__":
    sys.exit(main())
