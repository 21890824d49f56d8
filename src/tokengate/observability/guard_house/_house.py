"""GuardHouse: the face of the monitor and the circuit breaker, as ``coordinator.guard_house``.

It holds the two middleware (``_monitor.py``, ``_breaker.py``), hands the coordinator those its
configuration asks for, and assembles their state into a frozen report (``_report.py``). The
passive monitor is on by default (the TokenGate Quick-Proof's "observation only"); the circuit
breaker only with ``auto_block=True``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..._errors import TokenGateError
from ..._histogram import LatencyHistogram
from ..._middleware import Middleware
from ..._run_watch import deliver, watcher
from ._breaker import OFF, CircuitBreaker
from ._monitor import Monitor
from ._report import GuardHouseReport, OperationHealth

if TYPE_CHECKING:
    from ..._stats import StatsRecorder
    from ..._token import Token

__all__ = ["GuardHouse"]

_perf = time.perf_counter


class GuardHouse:
    """Per-operation health, slow outliers, recent failures, and an optional circuit breaker.

    Reached as ``coordinator.guard_house``. ``enabled`` (config ``guard_house``) installs the
    passive monitor; ``auto_block`` (config ``auto_block``) installs the breaker as well.
    ``report()`` returns a frozen :class:`GuardHouseReport`; its ``str()`` is a text table.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        auto_block: bool = False,
        block_after: int = 5,
        block_cooldown: float = 30.0,
        slow_factor: float = 3.0,
        slow_margin: float = 0.05,
        slow_warmup: int = 20,
        recent: int = 20,
        clock: Callable[[], float] = time.monotonic,
        count_event: Callable[[str, int], None] | None = None,
        stats: StatsRecorder | None = None,
    ) -> None:
        self.enabled = enabled
        self.auto_block = auto_block
        self._monitor = Monitor(
            slow_factor=slow_factor,
            slow_margin=slow_margin,
            slow_warmup=slow_warmup,
            recent=recent,
        )
        self._breaker = CircuitBreaker(
            block_after=block_after,
            block_cooldown=block_cooldown,
            clock=clock,
            count_event=count_event,
        )
        # Run times: the coordinator's stats, or a recorder of its own when used alone (then it
        # watches them itself, as a coordinator would once the monitor is installed).
        if stats is None:
            from ..._stats import StatsRecorder  # not at import: _stats imports observability

            stats = StatsRecorder()
            own = watcher(self._monitor)
            if enabled and own is not None:
                stats.watch_runs((own,))
        self._stats = stats

    # -- configuration ---------------------------------------------------------------------------
    @property
    def block_after(self) -> int:
        """Consecutive failed tokens that open an operation type's circuit."""
        return self._breaker.block_after

    @property
    def block_cooldown(self) -> float:
        """Seconds an open circuit refuses calls before it lets a probe through."""
        return self._breaker.block_cooldown

    @property
    def clock(self) -> Callable[[], float]:
        """The breaker's clock (``time.monotonic``); tests replace it to skip the cool-down."""
        return self._breaker.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._breaker.clock = clock

    @property
    def slow_factor(self) -> float:
        """A run slower than ``slow_factor`` times its operation's p95 (and the margin) is
        slow."""
        return self._monitor.slow_factor

    @property
    def slow_margin(self) -> float:
        """Seconds a slow run must also exceed its operation's p95 by."""
        return self._monitor.slow_margin

    @property
    def slow_warmup(self) -> int:
        """Runs of an operation on a worker before its slow threshold is first estimated."""
        return self._monitor.slow_warmup

    @property
    def recent(self) -> int:
        """How many recent failures and slow runs are kept per operation type."""
        return self._monitor.recent

    def middleware(self) -> list[Middleware]:
        """The middleware to install on the coordinator for this configuration."""
        installed: list[Middleware] = []
        if self.enabled:
            installed.append(self._monitor)
        if self.auto_block:
            installed.append(self._breaker)
        return installed

    def banner(self) -> str:
        """The TokenGate Quick-Proof's initialisation block."""
        if not self.enabled:
            return "[GUARD_HOUSE] Passive Monitoring disabled (guard_house=False)"
        if self.auto_block:
            blocking = (
                f"ENABLED (circuit breaker: opens after {self.block_after} consecutive "
                f"failures, probes after {self.block_cooldown:g}s)"
            )
        else:
            blocking = "DISABLED (observation only)"
        return "\n".join(
            [
                "[GUARD_HOUSE] Passive Monitoring initialized",
                "  Mode: Post-execution analysis",
                f"  Auto-blocking: {blocking}",
            ]
        )

    def observe(self, token: Token[Any], outcome: str, exc: BaseException | None = None) -> None:
        """Record one attempt as the coordinator does: its run time (a run that crosses the
        watch goes to the monitor's run-time hooks), then its error. For a Guard House used
        without a coordinator."""
        started = token.started_at
        if started is not None:
            end = token.finished_at  # None for a retried attempt (the token is not terminal)
            run = (_perf() if end is None else end) - started
            spec = token.spec
            counters = self._stats.counters(spec.operation_type, spec.weight)
            if counters.record_run(run):
                deliver(self._stats.watchers, token, counters, run)
        if exc is not None or outcome != "resolved":
            self._monitor.after_failure(token, outcome, exc)

    # -- circuit breaker -------------------------------------------------------------------------
    def breaker_state(self, operation_type: str) -> str:
        """``closed``, ``open`` or ``half-open`` (``off`` without auto_block)."""
        return self._breaker.state(operation_type) if self.auto_block else OFF

    def open(self, operation_type: str) -> None:
        """Open the circuit of ``operation_type`` by hand: its calls are refused with
        :class:`OperationBlocked` for ``block_cooldown`` seconds, then one probe is let
        through, as after ``block_after`` failures. Needs ``auto_block=True``."""
        if not self.auto_block:
            raise TokenGateError(
                f"cannot open the circuit breaker of {operation_type!r}: the breaker is off; "
                f"create the coordinator with auto_block=True"
            )
        self._breaker.open(operation_type)

    def reset(self, operation_type: str | None = None) -> None:
        """Close the circuit of one operation type (or all) by hand."""
        self._breaker.reset(operation_type)

    # -- reading ---------------------------------------------------------------------------------
    def report(self) -> GuardHouseReport:
        """A frozen snapshot of every operation type seen so far."""
        health: dict[str, OperationHealth] = {}
        breaker = self._breaker
        now = breaker.clock()
        names = self._monitor.names() | breaker.names()
        run_times = self._stats.run_times() if self.enabled else {}
        names |= {name for name, hist in run_times.items() if hist.count}
        for name in sorted(names):
            op = self._monitor.operation(name)
            hist = run_times.get(name) or LatencyHistogram()
            with op.lock:
                errors, retried, failed = op.errors, op.retried, op.failed
                dep, slow = op.dependency_failures, op.slow
                threshold = op.slow_after
                failures, slows = tuple(op.recent_failures), tuple(op.recent_slow)
            runs = hist.count
            health[name] = OperationHealth(
                operation_type=name,
                runs=runs,
                errors=errors,
                retried=retried,
                failed=failed,
                dependency_failures=dep,
                failure_rate=errors / runs if runs else 0.0,
                duration_p50=hist.percentile(50),
                duration_p95=hist.percentile(95),
                duration_max=hist.max,
                slow_runs=slow,
                slow_threshold=None if threshold == float("inf") else threshold,
                breaker=self.breaker_state(name),
                blocked_calls=breaker.blocked(name),
                retry_in=breaker.retry_in(name, now) if self.auto_block else None,
                recent_failures=failures,
                recent_slow=slows,
            )
        return GuardHouseReport(
            auto_blocking=self.auto_block,
            enabled=self.enabled,
            operations=MappingProxyType(health),
        )

    def render(self) -> str:
        """``str(self.report())``: the text table."""
        return self.report().render()
