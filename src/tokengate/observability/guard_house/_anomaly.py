"""The Guard House's anomaly rule: hold a call whose arguments or predicted run time are far
from its operation's history.

:class:`AnomalyRule` is a ready-made hold rule (``coordinator.hold_when(AnomalyRule())``) and,
to learn that history, middleware: ``hold_when`` installs it, and its ``after_attempt`` records
each successful run's argument size and run time per operation type, in a window of the last
``window`` runs. The run-time histograms the Guard House reads from the stats cannot serve
here, because the prediction needs each run's time *paired* with its size.

A call is held once its operation has ``min_runs`` runs in the window (before that, nothing is):

- **size**: its argument size exceeds ``size_factor`` times the window's median size;
- **predicted run time**: its size times the window's median seconds per byte exceeds
  ``time_factor`` times the window's p95 run time, and ``min_seconds``.

Medians and p95 resist the odd outlier, and a held call that the operator releases enters the
history once it has run, so the history follows a workload that grows.

The size of a call is cheap and bounded: per argument (the first 64), ``nbytes`` for buffers and
arrays (NumPy, pandas Series, memoryview), ``sys.getsizeof`` for str, bytes and the built-in
containers (their own size, which grows with their length; items are not visited), and 0 for
anything else (scalars, other objects). Nothing is pickled or traversed. ``size=`` replaces it.

Cost: nothing unless installed; installed, a call from outside the tasks pays the measure and a
lookup (the medians are recomputed once the window has changed by a sixteenth), and a run pays
the measure and an append under a lock.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
from array import array
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from ..._middleware import Middleware

if TYPE_CHECKING:
    from ..._spec import TaskSpec
    from ..._token import Token

__all__ = ["AnomalyRule", "argument_size"]

SizeOf = Callable[[tuple[Any, ...], dict[str, Any]], float]
"""``size(args, kwargs)``: a call's argument size, a number >= 0 in the unit of your choice."""

MEASURED_ARGUMENTS = 64  # arguments past these are not measured: the cost stays bounded
_SHALLOW = (str, bytes, bytearray, list, tuple, dict, set, frozenset, array)


def _size(value: Any) -> int:
    if isinstance(value, _SHALLOW):
        return sys.getsizeof(value)
    if isinstance(value, memoryview):
        return value.nbytes
    if getattr(type(value), "nbytes", None) is not None:  # on the type: no proxy __getattr__
        nbytes = value.nbytes
        if isinstance(nbytes, int) and not isinstance(nbytes, bool):
            return nbytes
    return 0


def argument_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The anomaly rule's measure of a call's arguments, in bytes (see the module docstring)."""
    values = itertools.chain(args, kwargs.values()) if kwargs else args
    return sum(_size(value) for value in itertools.islice(values, MEASURED_ARGUMENTS))


class _Summary(NamedTuple):
    runs: int
    median_size: float
    p95_seconds: float
    seconds_per_unit: float | None  # None: no run had a size to divide by


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted, non-empty list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _summarise(runs: deque[tuple[float, float]]) -> _Summary:
    sizes = sorted(size for size, _ in runs)
    seconds = sorted(s for _, s in runs)
    rates = sorted(s / size for size, s in runs if size > 0)
    return _Summary(
        runs=len(runs),
        median_size=_quantile(sizes, 0.5),
        p95_seconds=_quantile(seconds, 0.95),
        seconds_per_unit=_quantile(rates, 0.5) if rates else None,
    )


class _History:
    __slots__ = ("added", "runs", "summary")

    def __init__(self, window: int) -> None:
        self.runs: deque[tuple[float, float]] = deque(maxlen=window)
        self.added = 0  # runs recorded since ``summary`` was computed
        self.summary: _Summary | None = None


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _plain(n: float) -> str:
    return f"{n:.4g}"


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def _factor(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
        raise ValueError(
            f"{name} must be a number above 1 (how many times the history's usual value is "
            f"far), or None to skip that check; got {value!r}"
        )
    if math.isinf(value):
        raise ValueError(f"{name} must be finite; got {value!r} (pass None to skip that check)")
    return float(value)


def _count(name: str, value: int, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}; got {value!r}")
    return value


class AnomalyRule(Middleware):
    """A hold rule that quarantines calls far from their operation's history.

    Install it with ``coordinator.hold_when(tokengate.AnomalyRule())`` (``operation=`` limits
    it to one operation type); the coordinator then feeds it every successful run, and it
    holds a call, once the operation has ``min_runs`` runs in its last ``window``, when

    - its argument size exceeds ``size_factor`` times the median size of those runs, or
    - its predicted run time (its size times the runs' median seconds per byte) exceeds
      ``time_factor`` times their p95 run time, and ``min_seconds``.

    The held token's reason says which, in figures: ``"argument size 80 MB is 40x the
    operation's median 2 MB over the last 120 runs"``. ``None`` for a factor skips that check.
    The size is ``nbytes`` for arrays and buffers, the shallow ``sys.getsizeof`` of str, bytes
    and built-in containers, and 0 for anything else; ``size(args, kwargs)`` replaces that
    measure (its unit is then yours, and figures are shown without one). :meth:`record` adds
    a run by hand: to seed the history from an earlier run of the program, or in a test.
    """

    def __init__(
        self,
        *,
        size_factor: float | None = 10.0,
        time_factor: float | None = 10.0,
        min_runs: int = 20,
        window: int = 200,
        min_seconds: float = 1.0,
        size: SizeOf | None = None,
    ) -> None:
        self.size_factor = _factor("size_factor", size_factor)
        self.time_factor = _factor("time_factor", time_factor)
        if self.size_factor is None and self.time_factor is None:
            raise ValueError(
                "size_factor and time_factor are both None, so the rule would hold nothing; "
                "give at least one a number above 1"
            )
        self.min_runs = _count("min_runs", min_runs, 1)
        self.window = _count("window", window, 1)
        if window < min_runs:
            raise ValueError(
                f"window={window!r} keeps fewer runs than min_runs={min_runs!r} needs, so the "
                f"rule would never hold anything; make window >= min_runs"
            )
        if (
            isinstance(min_seconds, bool)
            or not isinstance(min_seconds, (int, float))
            or not 0 <= min_seconds < math.inf
        ):
            raise ValueError(
                f"min_seconds must be a finite number of seconds >= 0; got {min_seconds!r}"
            )
        self.min_seconds = float(min_seconds)
        if size is not None and not callable(size):
            raise TypeError(f"size must be callable as size(args, kwargs) -> number; got {size!r}")
        self._measure: SizeOf = argument_size if size is None else size
        self._show = _bytes if size is None else _plain
        self._lock = threading.Lock()
        self._ops: dict[str, _History] = {}

    def __repr__(self) -> str:
        return (
            f"AnomalyRule(size_factor={self.size_factor}, time_factor={self.time_factor}, "
            f"min_runs={self.min_runs}, window={self.window}, min_seconds={self.min_seconds})"
        )

    # -- learning -------------------------------------------------------------------------------
    def record(self, operation_type: str, size: float, seconds: float) -> None:
        """Add one run of ``operation_type``: its argument size and run time in seconds."""
        if not isinstance(operation_type, str) or not operation_type:
            raise ValueError(
                f"operation_type must be an operation type name; got {operation_type!r}"
            )
        if not 0 <= size < math.inf or not 0 <= seconds < math.inf:
            raise ValueError(
                f"size and seconds must be finite numbers >= 0; got size={size!r}, "
                f"seconds={seconds!r}"
            )
        with self._lock:
            history = self._ops.get(operation_type)
            if history is None:
                history = self._ops[operation_type] = _History(self.window)
            history.runs.append((float(size), float(seconds)))
            history.added += 1

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """Record a successful run (a failed one's time says little about the next)."""
        started, finished = token.started_at, token.finished_at
        if outcome != "resolved" or started is None or finished is None:
            return
        size = self._measure(token.args, token.kwargs)
        self.record(token.spec.operation_type, size, max(0.0, finished - started))

    def _summary(self, operation_type: str) -> _Summary | None:
        with self._lock:
            history = self._ops.get(operation_type)
            if history is None or len(history.runs) < self.min_runs:
                return None
            summary = history.summary
            if summary is None or history.added * 16 >= len(history.runs):
                summary = history.summary = _summarise(history.runs)
                history.added = 0
            return summary

    # -- holding ---------------------------------------------------------------------------------
    def __call__(self, spec: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Why to hold this call, or None (the hold-rule protocol of ``hold_when``)."""
        summary = self._summary(spec.operation_type)
        if summary is None:
            return None
        size = self._measure(args, kwargs)
        show = self._show
        over = f"over the last {summary.runs} runs"
        reasons: list[str] = []
        if self.size_factor is not None and size > self.size_factor * summary.median_size:
            median = summary.median_size
            if median > 0:
                reasons.append(
                    f"argument size {show(size)} is {_times(size / median)} the operation's "
                    f"median {show(median)} {over}"
                )
            else:
                reasons.append(
                    f"argument size {show(size)} where the operation's median is {show(0)} {over}"
                )
        if self.time_factor is not None and summary.seconds_per_unit is not None:
            predicted = size * summary.seconds_per_unit
            p95 = summary.p95_seconds
            if predicted >= self.min_seconds and predicted > self.time_factor * p95:
                ratio = f"{_times(predicted / p95)} " if p95 > 0 else "far above "
                reasons.append(
                    f"predicted run time {_seconds(predicted)} is {ratio}the operation's p95 "
                    f"{_seconds(p95)} {over}"
                )
        return "; ".join(reasons) or None
