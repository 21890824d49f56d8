"""Run-time watching: middleware see the runs that cross their thresholds, and only those.

A middleware that overrides :meth:`Middleware.after_long_run` declares a threshold per operation
type (:meth:`Middleware.run_threshold`); one that overrides :meth:`Middleware.check_runs` is shown
the first run of each operation type on each worker thread, then again as many runs later as it
asks. The Guard House does both: its check-ins estimate an operation's p95, which sets its
threshold for slow runs.

Why thresholds rather than a hook per run: with a run watcher installed (the Guard House is, by
default) the coordinator records each run's time in the stats, beside the token's latency and
with the same counters lookup (``OperationCounters.runs``), and compares it with two numbers:
the operation's ``RunWatch.slow_after`` (the lowest threshold of the watchers, shared by every
thread) and the thread's ``next_check`` (its nearest check-in). Only a run past one of them is
handed to :func:`deliver`, outside the token's lock, which calls the watchers it concerns. A run
that crosses nothing costs a histogram record and two compares and calls nothing (B1); with no
watcher installed, run times are not recorded at all.

The shared numbers are written by whichever worker thread delivered a run last, without a lock:
a write that races another can leave a threshold one delivery out of date, never a run lost
from the stats.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ._middleware import Middleware, overridden

if TYPE_CHECKING:
    from ._stats import OperationCounters
    from ._token import Token

__all__ = ["RunWatch", "Watcher", "deliver", "limits_for", "watcher"]

log = logging.getLogger("tokengate.coordinator")
_NEVER = sys.maxsize


class Watcher(NamedTuple):
    """An installed middleware that watches run times, and which of the two hooks it has."""

    middleware: Middleware
    long_runs: bool  # overrides after_long_run (so run_threshold is asked)
    checks: bool  # overrides check_runs


def watcher(middleware: Middleware) -> Watcher | None:
    """The :class:`Watcher` for ``middleware``, or None if it watches no run times."""
    long_runs = overridden(middleware, "after_long_run")
    checks = overridden(middleware, "check_runs")
    return Watcher(middleware, long_runs, checks) if long_runs or checks else None


class RunWatch:
    """The thresholds of one operation type, shared by every thread's counters of it:
    ``limits[i]`` is watcher ``i``'s (infinite for one that watches no long runs), and a run
    longer than ``slow_after``, the lowest, is delivered."""

    __slots__ = ("limits", "slow_after")

    def __init__(self, limits: list[float] | None = None) -> None:
        self.limits: list[float] = [] if limits is None else limits
        self.slow_after = min(self.limits, default=math.inf)


def _threshold(w: Watcher, operation_type: str) -> float:
    if not w.long_runs:
        return math.inf
    try:
        return float(w.middleware.run_threshold(operation_type))
    except BaseException:  # a watcher's bug must not end the worker thread asking
        log.exception(
            "run_threshold of %r raised; no long runs of %r go to it",
            w.middleware,
            operation_type,
        )
        return math.inf


def limits_for(watchers: Sequence[Watcher], operation_type: str) -> list[float]:
    """Each watcher's threshold for ``operation_type``, asked now."""
    return [_threshold(w, operation_type) for w in watchers]


def first_checks(watchers: Sequence[Watcher]) -> int:
    """A fresh counters' ``next_check``: its first run if anyone checks runs, else never."""
    return 1 if any(w.checks for w in watchers) else _NEVER


def deliver(
    watchers: Sequence[Watcher], token: Token[Any], counters: OperationCounters, seconds: float
) -> None:
    """Hand a run that crossed its operation's watch to each watcher it concerns: its due
    check-in first (``check_runs``), then ``after_long_run`` if the run is longer than the
    watcher's threshold (asked again after each call, so it may follow what the watcher learns).
    A hook that raises is logged and the token is not affected."""
    operation_type = token.spec.operation_type
    watch = counters.watch
    limits = watch.limits
    if len(limits) != len(watchers):  # a watcher was installed since the watch was made
        limits = watch.limits = limits_for(watchers, operation_type)
    checks = counters.checks
    if len(checks) != len(watchers):
        checks = counters.checks = [1 if w.checks else _NEVER for w in watchers]
    runs = counters.runs
    count = runs.count
    for i, w in enumerate(watchers):
        if checks[i] <= count:
            checks[i] = _NEVER
            try:
                again = w.middleware.check_runs(operation_type, runs)
            except BaseException:
                log.exception("check_runs of %r raised; the token is not affected", w.middleware)
                again = None
            if again is not None:
                checks[i] = count + max(1, int(again))
            limits[i] = _threshold(w, operation_type)
        if w.long_runs and seconds > limits[i]:
            try:
                w.middleware.after_long_run(token, seconds)
            except BaseException:
                log.exception(
                    "after_long_run of %r raised; the token is not affected", w.middleware
                )
            limits[i] = _threshold(w, operation_type)
    watch.slow_after = min(limits, default=math.inf)
    counters.next_check = min(checks, default=_NEVER)
