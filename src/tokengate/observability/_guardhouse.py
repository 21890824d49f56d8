"""GuardHouse: a passive monitor per operation type, with an optional circuit breaker.

Passive part (on by default, the seed's "observation only"): every run's duration
(``started_at`` to the end of the attempt, queueing excluded) is recorded per operation, errors
are counted, the most recent failures kept with their exception types, and *slow outliers*
flagged:

    a run is slow when its duration exceeds ``max(slow_factor * p95, p95 + slow_margin)``, p95
    being the operation's 95th percentile run duration. Durations are recorded per worker
    thread (no lock on the hot path), so p95 is estimated from one worker's runs of the
    operation: each worker refreshes the operation's threshold after its first ``slow_warmup``
    runs of it, then every ``max(32, runs // 16)`` runs. Until the first refresh nothing is
    slow; afterwards the check costs one compare.

Where the durations live: in the coordinator's stats (``OperationCounters.runs``), recorded with
the same counters lookup as the token's latency, and the threshold is the operation's shared
``RunWatch.slow_after``. The coordinator hands the Guard House only the runs that cross it
(:meth:`GuardHouse.watch_run`), and errors through the ``after_failure`` hook, so a successful,
ordinary run costs a histogram record and two compares, not a middleware call (B1).

With the defaults (20 runs, 3x, +50 ms) an operation that usually takes 2 ms is slow past 52 ms,
one that takes 1 s past 3 s. ``report()`` returns a frozen :class:`GuardHouseReport`; its
``str()`` is a text table.

Active part (``auto_block=True``): a circuit breaker per operation type. ``block_after``
consecutive failed tokens (their final outcome, after retries; dependency failures do not count)
open it: calls of that operation type raise :class:`OperationBlocked` at once. After
``block_cooldown`` seconds it is half-open: one call is let through as a probe, the others are
still refused; the next outcome of that operation type closes it (success) or opens it again for
another cool-down (failure). The clock is injected (``GuardHouse.clock``) so tests need no sleeping.

Both parts are :class:`Middleware`; the coordinator calls only the hooks they override, and the
breaker is not installed at all unless ``auto_block`` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .._errors import DependencyFailed, OperationBlocked
from .._histogram import LatencyHistogram
from .._middleware import Middleware
from .._stats import OperationCounters, RunWatch, StatsRecorder

if TYPE_CHECKING:
    from .._spec import TaskSpec
    from .._token import Token

__all__ = [
    "FailureRecord",
    "GuardHouse",
    "GuardHouseReport",
    "OperationHealth",
    "SlowRun",
]

log = logging.getLogger("tokengate.guard_house")
_perf = time.perf_counter
_INFO = logging.INFO

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
OFF = "off"


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """One failed run: which token, what it raised, and what happened next."""

    operation_type: str
    token_id: str
    exception_type: str
    message: str
    attempt: int
    outcome: str  # "retried", "failed", or "dependency" (never ran)
    worker: str | None
    at: float  # wall-clock time (time.time())


@dataclass(frozen=True, slots=True)
class SlowRun:
    """One run far above its operation's usual duration."""

    operation_type: str
    token_id: str
    duration: float
    threshold: float
    worker: str | None
    at: float


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


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in ("builtins", "tokengate"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _message(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Operation:
    """What is shared about one operation type. Counters of errors, slow runs and blocked
    calls change under ``lock`` (rare paths); ``watch.slow_after`` (the slow threshold, shared
    with the stats' counters) is read without it."""

    __slots__ = (
        "blocked",
        "dependency_failures",
        "errors",
        "failed",
        "lock",
        "name",
        "recent_failures",
        "recent_slow",
        "retried",
        "slow",
        "watch",
    )

    def __init__(self, name: str, recent: int, watch: RunWatch) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.errors = 0
        self.retried = 0
        self.failed = 0
        self.dependency_failures = 0
        self.slow = 0
        self.blocked = 0
        self.watch = watch  # slow_after is infinite (nothing is slow) until warmed up
        self.recent_failures: deque[FailureRecord] = deque(maxlen=recent)
        self.recent_slow: deque[SlowRun] = deque(maxlen=recent)


class _Circuit:
    __slots__ = ("consecutive", "last_error", "opened_at", "probe_at", "state")

    def __init__(self) -> None:
        self.state = CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.probe_at: float | None = None
        self.last_error = ""


class GuardHouse:
    """Per-operation health, slow outliers, recent failures, and an optional circuit breaker.

    Reached as ``coordinator.guard_house``. ``enabled`` (config ``guard_house``) installs the
    passive monitor; ``auto_block`` (config ``auto_block``) installs the breaker as well.
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
        self.block_after = block_after
        self.block_cooldown = block_cooldown
        self.slow_factor = slow_factor
        self.slow_margin = slow_margin
        self.slow_warmup = slow_warmup
        self.recent = recent
        self.clock = clock
        self._count_event = count_event
        self._lock = threading.Lock()  # creating operations and circuits
        self._ops: dict[str, _Operation] = {}
        # Run times: the coordinator's stats (its own recorder when used alone, in tests).
        self._stats = StatsRecorder() if stats is None else stats
        if enabled:
            self._stats.watch_runs(first_check=slow_warmup)
        self._circuits: dict[str, _Circuit] = {}
        self._circuit_lock = threading.Lock()

    def middleware(self) -> list[Middleware]:
        """The hooks to install on the coordinator for this configuration."""
        installed: list[Middleware] = []
        if self.enabled:
            installed.append(_Monitor(self))
        if self.auto_block:
            installed.append(_Breaker(self))
        return installed

    def banner(self) -> str:
        """The seed's initialisation block."""
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

    # -- recording (called from the coordinator, on worker threads) ---------------------------
    def _operation(self, name: str) -> _Operation:
        op = self._ops.get(name)
        if op is None:
            with self._lock:
                op = self._ops.get(name)
                if op is None:
                    watch = self._stats.run_watch(name)
                    op = self._ops[name] = _Operation(name, self.recent, watch)
        return op

    def watch_run(self, token: Token[Any], counters: OperationCounters, run: float) -> None:
        """A run that crossed its operation's ``RunWatch`` (the coordinator's run watcher):
        re-estimate the threshold from this thread's runs when they are due, then flag the run
        if it is slow."""
        runs = counters.runs
        watch = counters.watch
        if runs.count >= counters.next_check:
            p95 = runs.percentile(95)
            watch.slow_after = max(self.slow_factor * p95, p95 + self.slow_margin)
            counters.next_check = runs.count + max(32, runs.count // 16)
        if run > watch.slow_after:
            self._record_slow(self._operation(token.spec.operation_type), token, run)

    def observe(self, token: Token[Any], outcome: str, exc: BaseException | None = None) -> None:
        """Record one attempt as the coordinator does: its run time (crossing the watch goes to
        :meth:`watch_run`), then its error. For a Guard House used without a coordinator."""
        started = token.started_at
        if started is not None:
            end = token.finished_at  # None for a retried attempt (the token is not terminal)
            run = (_perf() if end is None else end) - started
            spec = token.spec
            counters = self._stats.counters(spec.operation_type, spec.weight)
            if counters.record_run(run):
                self.watch_run(token, counters, run)
        if exc is not None or outcome != "resolved":
            self._record_failure(token, outcome, exc)

    def _record_failure(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """``after_failure``: count the error and keep it among the recent failures."""
        if token.started_at is None:  # failed before running: a dependency failed
            if exc is not None:
                self._record_error(token, "dependency", exc)
            return
        if exc is not None:
            self._record_error(token, outcome, exc)

    def _record_error(self, token: Token[Any], outcome: str, exc: BaseException) -> None:
        op = self._operation(token.spec.operation_type)
        record = self._failure(token, outcome, exc)
        with op.lock:
            if outcome == "dependency":
                op.dependency_failures += 1
            else:
                op.errors += 1
                if outcome == "retried":
                    op.retried += 1
                else:
                    op.failed += 1
            op.recent_failures.append(record)

    def _record_slow(self, op: _Operation, token: Token[Any], duration: float) -> None:
        threshold = op.watch.slow_after
        slow = SlowRun(op.name, token.id, duration, threshold, token.worker, time.time())
        with op.lock:
            op.slow += 1
            op.recent_slow.append(slow)
        if log.isEnabledFor(_INFO):
            log.info(
                "[GUARD_HOUSE] Slow run: %s took %.3fs on %s (threshold %.3fs for %s)",
                slow.token_id,
                slow.duration,
                slow.worker,
                slow.threshold,
                slow.operation_type,
            )

    @staticmethod
    def _failure(token: Token[Any], outcome: str, exc: BaseException) -> FailureRecord:
        return FailureRecord(
            operation_type=token.spec.operation_type,
            token_id=token.id,
            exception_type=_type_name(exc),
            message=_message(exc),
            attempt=token.attempts,
            outcome=outcome,
            worker=token.worker,
            at=time.time(),
        )

    # -- circuit breaker ---------------------------------------------------------------------
    def _check(self, spec: TaskSpec) -> None:
        """Refuse a call whose operation type's circuit is open (``before_submit``)."""
        name = spec.operation_type
        circuit = self._circuits.get(name)
        if circuit is None or circuit.state == CLOSED:
            return
        with self._circuit_lock:
            now = self.clock()
            if circuit.state == OPEN:
                reopen = circuit.opened_at + self.block_cooldown
                if now >= reopen:
                    circuit.state = HALF_OPEN
                    circuit.probe_at = now
                    log.info("[GUARD_HOUSE] %r half-open: letting one probe call through", name)
                    return
                retry_in = reopen - now
                reason = (
                    f"its circuit breaker opened after {circuit.consecutive} consecutive "
                    f"failures (last: {circuit.last_error})"
                )
            elif circuit.state == HALF_OPEN:
                probe = circuit.probe_at
                if probe is None or now - probe >= self.block_cooldown:
                    circuit.probe_at = now
                    return
                retry_in = probe + self.block_cooldown - now
                reason = "a probe call is running after repeated failures"
            else:
                return
        op = self._operation(name)
        with op.lock:
            op.blocked += 1
        if self._count_event is not None:
            self._count_event("guard_house_blocked", 1)
        raise OperationBlocked(
            f"{name!r} is blocked by the Guard House: {reason}. Calls are refused for "
            f"{retry_in:.1f}s more, then one probe call is let through (auto_block=True; "
            f"block_after={self.block_after}, block_cooldown={self.block_cooldown:g}s)",
            operation_type=name,
            retry_in=retry_in,
        )

    def _outcome(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """Feed a token's final outcome to its circuit (``after_attempt``)."""
        if outcome == "retried" or token.started_at is None or isinstance(exc, DependencyFailed):
            return
        name = token.spec.operation_type
        circuit = self._circuits.get(name)
        if outcome == "resolved":
            if circuit is None or (circuit.state == CLOSED and not circuit.consecutive):
                return
            with self._circuit_lock:
                was = circuit.state
                circuit.state = CLOSED
                circuit.consecutive = 0
                circuit.probe_at = None
            if was != CLOSED:
                log.info("[GUARD_HOUSE] %r closed again: a call succeeded", name)
            return
        with self._circuit_lock:
            if circuit is None:
                circuit = self._circuits[name] = _Circuit()
            circuit.consecutive += 1
            circuit.last_error = _type_name(exc) if exc is not None else "?"
            was = circuit.state
            if was == HALF_OPEN or (was == CLOSED and circuit.consecutive >= self.block_after):
                circuit.state = OPEN
                circuit.opened_at = self.clock()
                circuit.probe_at = None
            else:
                return
        if self._count_event is not None:
            self._count_event("guard_house_opened", 1)
        log.warning(
            "[GUARD_HOUSE] %r blocked for %gs after %d consecutive failures (last: %s)%s",
            name,
            self.block_cooldown,
            circuit.consecutive,
            circuit.last_error,
            "; the probe failed" if was == HALF_OPEN else "",
        )

    def _discarded(self, token: Token[Any]) -> None:
        """A discarded token may have been the probe: let another call probe."""
        circuit = self._circuits.get(token.spec.operation_type)
        if circuit is not None and circuit.state == HALF_OPEN:
            with self._circuit_lock:
                circuit.probe_at = None

    def breaker_state(self, operation_type: str) -> str:
        """``closed``, ``open`` or ``half-open`` (``off`` without auto_block)."""
        if not self.auto_block:
            return OFF
        circuit = self._circuits.get(operation_type)
        if circuit is None:
            return CLOSED
        if circuit.state == OPEN and self.clock() >= circuit.opened_at + self.block_cooldown:
            return HALF_OPEN  # the next call will be let through as the probe
        return circuit.state

    def reset(self, operation_type: str | None = None) -> None:
        """Close the circuit of one operation type (or all) by hand."""
        with self._circuit_lock:
            if operation_type is None:
                self._circuits.clear()
            else:
                self._circuits.pop(operation_type, None)

    # -- reading -----------------------------------------------------------------------------
    def report(self) -> GuardHouseReport:
        """A frozen snapshot of every operation type seen so far."""
        health: dict[str, OperationHealth] = {}
        now = self.clock()
        with self._lock:  # workers may add operation types meanwhile
            names = set(self._ops)
        with self._circuit_lock:
            names |= set(self._circuits)
        run_times = self._stats.run_times() if self.enabled else {}
        names |= {name for name, hist in run_times.items() if hist.count}
        for name in sorted(names):
            op = self._operation(name)
            hist = run_times.get(name) or LatencyHistogram()
            with op.lock:
                errors, retried, failed = op.errors, op.retried, op.failed
                dep, slow, blocked = op.dependency_failures, op.slow, op.blocked
                threshold = op.watch.slow_after
                failures, slows = tuple(op.recent_failures), tuple(op.recent_slow)
            retry_in = None
            circuit = self._circuits.get(name)
            if self.auto_block and circuit is not None and circuit.state == OPEN:
                retry_in = max(0.0, circuit.opened_at + self.block_cooldown - now)
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
                blocked_calls=blocked,
                retry_in=retry_in,
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


class _Monitor(Middleware):
    """The passive part's hook: errors (``after_failure``). Run times and slow runs come
    through the stats (``StatsRecorder.watch_runs``) and :meth:`GuardHouse.watch_run`."""

    def __init__(self, house: GuardHouse) -> None:
        # The coordinator calls ``getattr(middleware, "after_failure")``: hand it the house's
        # bound recorder directly, one Python call less per error.
        self.after_failure = house._record_failure  # type: ignore[method-assign]

    def after_failure(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """Replaced per instance in ``__init__`` (declared here so the hook counts as used)."""
        self.after_failure(token, outcome, exc)  # pragma: no cover


class _Breaker(Middleware):
    """The circuit breaker: refuses calls, watches final outcomes and discards."""

    def __init__(self, house: GuardHouse) -> None:
        self._house = house

    def before_submit(self, spec: TaskSpec) -> None:
        self._house._check(spec)

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        self._house._outcome(token, outcome, exc)

    def after_discard(self, token: Token[Any]) -> None:
        self._house._discarded(token)
