"""The Guard House's passive monitor: per-operation errors, recent failures and slow runs.

Every run's duration (``started_at`` to the end of the attempt, queueing excluded) is recorded
per operation in the coordinator's stats, errors are counted here, the most recent failures
kept with their exception types, and *slow outliers* flagged:

    a run is slow when its duration exceeds ``max(slow_factor * p95, p95 + slow_margin)``, p95
    being the operation's 95th percentile run duration. Durations are recorded per worker
    thread (no lock on the hot path), so p95 is estimated from one worker's runs of the
    operation: each worker refreshes the operation's threshold after its first ``slow_warmup``
    runs of it, then every ``max(32, runs // 16)`` runs. Until the first refresh nothing is
    slow.

With the defaults (20 runs, 3x, +50 ms) an operation that usually takes 2 ms is slow past 52 ms,
one that takes 1 s past 3 s.

Why it is shaped this way: it is ordinary :class:`Middleware` using the run-time hooks
(``_run_watch.py``). The refreshes are its ``check_runs`` check-ins, the threshold its
``run_threshold``, and only runs past the threshold reach ``after_long_run``, so a successful,
ordinary run costs a histogram record and two compares, not a middleware call (B1). Errors come
through ``after_failure``, which a success never calls.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..._middleware import Middleware, RunTimes

if TYPE_CHECKING:
    from ..._token import Token

__all__ = ["FailureRecord", "Monitor", "SlowRun", "type_name"]

log = logging.getLogger("tokengate.guard_house")
_INFO = logging.INFO


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


def type_name(exc: BaseException) -> str:
    """The exception's class as a report shows it: bare for builtins and tokengate's own."""
    cls = type(exc)
    module = cls.__module__
    if module in ("builtins", "tokengate"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _message(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class OperationRecord:
    """What the monitor keeps of one operation type. Counters change under ``lock`` (rare
    paths); ``slow_after`` (the slow threshold, infinite until warmed up) is read without it."""

    __slots__ = (
        "dependency_failures",
        "errors",
        "failed",
        "lock",
        "name",
        "recent_failures",
        "recent_slow",
        "retried",
        "slow",
        "slow_after",
    )

    def __init__(self, name: str, recent: int) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.errors = 0
        self.retried = 0
        self.failed = 0
        self.dependency_failures = 0
        self.slow = 0
        self.slow_after = math.inf
        self.recent_failures: deque[FailureRecord] = deque(maxlen=recent)
        self.recent_slow: deque[SlowRun] = deque(maxlen=recent)


class Monitor(Middleware):
    """The passive part of the Guard House: errors and slow runs per operation type."""

    def __init__(
        self,
        *,
        slow_factor: float = 3.0,
        slow_margin: float = 0.05,
        slow_warmup: int = 20,
        recent: int = 20,
    ) -> None:
        self.slow_factor = slow_factor
        self.slow_margin = slow_margin
        self.slow_warmup = slow_warmup
        self.recent = recent
        self._lock = threading.Lock()  # creating operation records
        self._ops: dict[str, OperationRecord] = {}

    def operation(self, name: str) -> OperationRecord:
        """The record of ``name``, created on first use."""
        op = self._ops.get(name)
        if op is None:
            with self._lock:
                op = self._ops.get(name)
                if op is None:
                    op = self._ops[name] = OperationRecord(name, self.recent)
        return op

    def names(self) -> set[str]:
        """The operation types recorded so far."""
        with self._lock:  # workers may add operation types meanwhile
            return set(self._ops)

    # -- run times (the run-time hooks) ---------------------------------------------------------
    def run_threshold(self, operation_type: str) -> float:
        op = self._ops.get(operation_type)  # not created: a report lists only what was seen
        return math.inf if op is None else op.slow_after

    def check_runs(self, operation_type: str, runs: RunTimes) -> int | None:
        """Re-estimate the slow threshold from this thread's runs once they are warmed up."""
        count = runs.count
        if count < self.slow_warmup:
            return self.slow_warmup - count
        p95 = runs.percentile(95)
        op = self.operation(operation_type)
        op.slow_after = max(self.slow_factor * p95, p95 + self.slow_margin)
        return max(32, count // 16)

    def after_long_run(self, token: Token[Any], seconds: float) -> None:
        """A run past its operation's slow threshold: count it and keep it among the recent."""
        op = self.operation(token.spec.operation_type)
        slow = SlowRun(op.name, token.id, seconds, op.slow_after, token.worker, time.time())
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

    # -- errors ------------------------------------------------------------------------------------
    def after_failure(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """Count the error and keep it among the recent failures."""
        if exc is None:
            return
        if token.started_at is None:  # failed before running: a dependency failed
            outcome = "dependency"
        op = self.operation(token.spec.operation_type)
        record = FailureRecord(
            operation_type=token.spec.operation_type,
            token_id=token.id,
            exception_type=type_name(exc),
            message=_message(exc),
            attempt=token.attempts,
            outcome=outcome,
            worker=token.worker,
            at=time.time(),
        )
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
