"""What the Guard House reports: frozen per-operation health and its text table.

Kept apart from the monitor and the breaker because it only reads: :class:`GuardHouse.report`
assembles these frozen values from both, and everything downstream (``str(report)``, the
Prometheus collector, the demos) reads them without touching live state or taking a lock.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ._monitor import FailureRecord, SlowRun

__all__ = ["GuardHouseReport", "OperationHealth"]


@dataclass(frozen=True, slots=True)
class OperationHealth:
    """What the Guard House knows of one operation type. Durations are in seconds."""

    operation_type: str
    runs: int
    errors: int  # runs that raised (retried or not)
    retried: int
    failed: int  # tokens whose final outcome was a failure after running
    dependency_failures: int  # tokens failed because a dependency did (never ran)
    failure_rate: float  # errors / runs
    duration_p50: float
    duration_p95: float
    duration_max: float
    slow_runs: int
    slow_threshold: float | None  # None until warmed up
    breaker: str  # closed / open / half-open, or "off" without auto_block
    blocked_calls: int
    retry_in: float | None  # seconds until a probe is let through, when open
    recent_failures: tuple[FailureRecord, ...] = ()
    recent_slow: tuple[SlowRun, ...] = ()


def _empty() -> Mapping[str, OperationHealth]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class GuardHouseReport:
    """A frozen view of every operation type; ``str()`` renders the table."""

    auto_blocking: bool
    enabled: bool
    operations: Mapping[str, OperationHealth] = field(default_factory=_empty)

    @property
    def recent_failures(self) -> tuple[FailureRecord, ...]:
        """The recent failures of every operation type, oldest first."""
        rows = [f for o in self.operations.values() for f in o.recent_failures]
        return tuple(sorted(rows, key=lambda f: f.at))

    @property
    def recent_slow(self) -> tuple[SlowRun, ...]:
        rows = [s for o in self.operations.values() for s in o.recent_slow]
        return tuple(sorted(rows, key=lambda s: s.at))

    def __str__(self) -> str:
        return self.render()

    def render(self, *, failures: int = 10) -> str:
        """The table, then the last ``failures`` failures and slow runs."""
        mode = "ENABLED (circuit breaker)" if self.auto_blocking else "DISABLED (observation only)"
        lines = [f"[GUARD_HOUSE] Report - Auto-blocking: {mode}"]
        if not self.enabled:
            lines.append("  (passive monitoring is off: guard_house=False)")
            return "\n".join(lines)
        ops = sorted(self.operations.values(), key=lambda o: o.operation_type)
        if not ops:
            lines.append("  (no runs yet)")
            return "\n".join(lines)
        name_w = max(20, *(len(o.operation_type) for o in ops))
        lines.append(
            f"  {'operation':<{name_w}} {'runs':>8} {'errors':>7} {'fail%':>6} "
            f"{'p50':>9} {'p95':>9} {'max':>9} {'slow':>5}  breaker"
        )
        for o in ops:
            breaker = o.breaker
            if o.retry_in is not None:
                breaker += f" (probe in {o.retry_in:.1f}s)"
            if o.blocked_calls:
                breaker += f", {o.blocked_calls} blocked"
            lines.append(
                f"  {o.operation_type:<{name_w}} {o.runs:>8} {o.errors:>7} "
                f"{100 * o.failure_rate:>5.1f}% {_dur(o.duration_p50)} {_dur(o.duration_p95)} "
                f"{_dur(o.duration_max)} {o.slow_runs:>5}  {breaker}"
            )
        recent = self.recent_failures[-failures:] if failures > 0 else ()
        if recent:
            lines.append("  Recent failures (oldest first):")
            for f in recent:
                stamp = time.strftime("%H:%M:%S", time.localtime(f.at))
                lines.append(
                    f"    {stamp}  {f.token_id}  {f.exception_type}: {f.message}"
                    f"  (attempt {f.attempt}, {f.outcome})"
                )
        slow = self.recent_slow[-failures:] if failures > 0 else ()
        if slow:
            lines.append("  Recent slow runs (oldest first):")
            for s in slow:
                stamp = time.strftime("%H:%M:%S", time.localtime(s.at))
                lines.append(
                    f"    {stamp}  {s.token_id}  {_dur(s.duration).strip()} > "
                    f"{_dur(s.threshold).strip()}"
                    f"  on {s.worker or '?'}"
                )
        return "\n".join(lines)


def _dur(seconds: float) -> str:
    """A duration in a readable unit, right-aligned in 9 columns (``  12.3µs``, `` 0.512s``)."""
    if seconds >= 1.0:
        text = f"{seconds:.3f}s"
    elif seconds >= 1e-3:
        text = f"{seconds * 1e3:.2f}ms"
    else:
        text = f"{seconds * 1e6:.1f}µs"
    return f"{text:>9}"
