"""Rate limits: at most N calls of an operation per second, minute or hour (the ``rate`` tag).

``tags={"rate": "100/s"}`` gives the operation a token bucket (:class:`TokenBucket`): it holds
up to ``burst`` permits (1 unless the tag says ``"100/s burst 20"``) and refills at the rate. A
token that finds the bucket empty waits in its operation's FIFO, the way a token waits for a
storage-tier permit (``_throttle.py``): outside every mailbox, so it holds no worker. One timer
on the coordinator's shared :class:`~tokengate._timers.TimerQueue` per operation with waiters
fires when the next permit is due and releases what the bucket allows, in order; nothing polls.

The bucket is pure arithmetic on an injected clock, so its behaviour is tested without waiting,
and :meth:`RateLimiter.poll` releases what is due at a given instant (tests drive time that
way; the timer calls it with the real clock). A waiting token that was discarded, or whose
deadline passed, leaves the FIFO when its turn comes without using a permit.

Grammar of the tag (checked at decoration time by :func:`parse_rate`)::

    "<N>/<unit>"  or  "<N>/<unit> burst <B>"
    N: a number > 0 (5, 2.5); unit: s, m or h (also sec, second, min, minute, hour);
    B: a whole number >= 1, the calls allowed back to back after an idle spell (default 1).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError
from ._limits import MAX_WAIT_SECONDS
from ._parking import Parking, park

__all__ = ["RATE_GRAMMAR", "Rate", "RateLimiter", "RateStats", "TokenBucket", "parse_rate"]

log = logging.getLogger("tokengate.rate")
_perf = time.perf_counter  # the clock of Token deadlines

RATE_GRAMMAR = (
    '"N/s", "N/m" or "N/h" (N calls per second, minute or hour; N > 0, e.g. "100/s", "5/m", '
    '"0.5/s"), optionally followed by " burst B" (B >= 1 calls back to back, default 1), e.g. '
    '"100/s burst 20"'
)
_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
_PATTERN = re.compile(
    r"\s*(?P<n>[0-9]+(?:\.[0-9]+)?)\s*/\s*(?P<unit>[a-z]+)\s*(?:burst\s+(?P<burst>[0-9]+)\s*)?",
    re.IGNORECASE,
)
# A permit is due once the bucket holds this much of one: float sums of refills land a hair
# under 1.0, and a timer that fired on time must not re-arm for a nanosecond.
_ALMOST_ONE = 1.0 - 1e-9


@dataclass(frozen=True, slots=True)
class Rate:
    """A parsed ``rate`` tag: ``per_second`` permits a second, at most ``burst`` at once."""

    text: str
    per_second: float
    burst: int


def parse_rate(value: Any, operation_type: str = "?") -> Rate | None:
    """Validate a ``rate`` tag (``None``: no limit); the error names the value and the grammar."""
    if value is None:
        return None
    match = _PATTERN.fullmatch(value) if isinstance(value, str) else None
    unit = None if match is None else _UNITS.get(match["unit"].lower())
    if match is None or unit is None:
        raise ConfigError(
            f"tag 'rate' of operation {operation_type!r} has value {value!r}; write it as "
            f"{RATE_GRAMMAR}"
        )
    count = float(match["n"])
    burst = 1 if match["burst"] is None else int(match["burst"])
    if count <= 0 or not math.isfinite(count) or burst < 1:
        raise ConfigError(
            f"tag 'rate' of operation {operation_type!r} has value {value!r}: the count must "
            f"be > 0 and the burst >= 1; write it as {RATE_GRAMMAR}"
        )
    if unit / count > MAX_WAIT_SECONDS:
        raise ConfigError(
            f"tag 'rate' of operation {operation_type!r} has value {value!r}: one call per "
            f"{unit / count:,.0f} s is a longer wait than tokengate can honour on every lane "
            f"({MAX_WAIT_SECONDS:,.0f} s); give a faster rate, or leave the tag out for none"
        )
    return Rate(value.strip(), count / unit, burst)


class TokenBucket:
    """``burst`` permits, refilled at ``per_second``; starts full. Pure arithmetic: every
    method takes ``now`` from the caller (an instant of one monotonic clock)."""

    __slots__ = ("_last", "_tokens", "burst", "per_second")

    def __init__(self, per_second: float, burst: int, now: float) -> None:
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:  # an instant earlier than the last one adds nothing
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
            self._last = now

    def try_take(self, now: float) -> bool:
        """Take one permit if the bucket holds one at ``now``."""
        self._refill(now)
        if self._tokens >= _ALMOST_ONE:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until a permit is there (0 if one is there now)."""
        self._refill(now)
        if self._tokens >= _ALMOST_ONE:
            return 0.0
        return (1.0 - self._tokens) / self.per_second


@dataclass(frozen=True, slots=True)
class RateStats:
    """One rate-limited operation at a moment: tokens ``waiting`` for the rate now, how many
    ever had to wait (``delayed``) and the seconds they waited in all (``wait_seconds``; a
    token still waiting counts once it leaves)."""

    waiting: int = 0
    delayed: int = 0
    wait_seconds: float = 0.0


class _Operation:
    __slots__ = ("armed", "bucket", "delayed", "waited", "waiting")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        # (token, when it started waiting, what to call once it may go on)
        self.waiting: deque[tuple[Any, float, Callable[[Any], None]]] = deque()
        self.armed = False
        self.delayed = 0
        self.waited = 0.0


class RateLimiter:
    """The buckets and FIFOs of every rate-limited operation of one coordinator.

    ``call_later(delay, callback)`` arms a timer (the coordinator's TimerQueue); it may raise
    ``RuntimeError`` once the queue is closed, and the waiting tokens are then left to the
    coordinator's stop, which discards them (:meth:`drain_waiting`). ``on_error(token, exc)``
    fails a token whose release broke inside tokengate, so none is ever lost.
    """

    def __init__(
        self,
        call_later: Callable[[float, Callable[[], None]], Any],
        *,
        on_error: Callable[[Any, BaseException], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._call_later = call_later
        self._on_error = on_error
        self._clock = clock
        self._lock = threading.Lock()
        self._ops: dict[str, _Operation] = {}

    def _op(self, spec: Any, now: float) -> _Operation:
        op = self._ops.get(spec.operation_type)
        if op is None:
            rate: Rate = spec.rate
            op = self._ops[spec.operation_type] = _Operation(
                TokenBucket(rate.per_second, rate.burst, now)
            )
        return op

    def hold(self, token: Any, proceed: Callable[[Any], None]) -> bool:
        """True if ``token`` must wait for its operation's rate: it is queued (FIFO) and
        ``proceed(token)`` is called once the bucket lets it go. False: go on now (a token
        released by this limiter passes once, without taking a second permit)."""
        if token._rate_passed:
            token._rate_passed = False  # a retry takes a permit of its own
            return False
        now = self._clock()
        with self._lock:
            op = self._op(token.spec, now)
            if not op.waiting and op.bucket.try_take(now):
                return False
            park(token, Parking.RATE)
            op.waiting.append((token, now, proceed))
            op.delayed += 1
            if not op.armed:
                self._arm(token.spec.operation_type, op, now)
        return True

    def _arm(self, name: str, op: _Operation, now: float) -> None:
        """Set the operation's timer for its next permit (call with the lock held)."""
        try:
            self._call_later(op.bucket.wait(now), lambda: self._fire(name))
        except RuntimeError:  # the timer queue closed (stopping): stop discards the waiters
            op.armed = False
            return
        op.armed = True

    def _fire(self, name: str) -> None:
        with self._lock:
            op = self._ops[name]
            op.armed = False
        self._release(self._clock(), [name])

    def poll(self, now: float | None = None) -> int:
        """Release every waiting token the buckets allow at ``now`` (default: the clock's
        now), in order; returns how many went on. The timer does this when a permit is due;
        tests call it with a later ``now`` instead of waiting."""
        with self._lock:
            names = list(self._ops)
        return self._release(self._clock() if now is None else now, names)

    def _release(self, now: float, names: list[str]) -> int:
        ready: list[tuple[Any, Callable[[Any], None]]] = []
        expired: list[Any] = []
        with self._lock:
            for name in names:
                op = self._ops[name]
                waiting = op.waiting
                while waiting:
                    token, since, proceed = waiting[0]
                    if token.done():  # discarded while waiting: uses no permit
                        waiting.popleft()
                        op.waited += max(0.0, now - since)
                        continue
                    deadline = token._deadline_at
                    if deadline is not None and _perf() > deadline:  # nor does a late one
                        waiting.popleft()
                        op.waited += max(0.0, now - since)
                        expired.append(token)
                        continue
                    if not op.bucket.try_take(now):
                        break
                    waiting.popleft()
                    op.waited += max(0.0, now - since)
                    token._rate_passed = True
                    token._parked = None
                    ready.append((token, proceed))
                if waiting and not op.armed:
                    self._arm(name, op, now)
        for token in expired:
            token._discard("deadline")
        for token, proceed in ready:
            try:
                proceed(token)
            except Exception as exc:  # never lose the token: it fails with the reason
                log.exception("releasing %s after its rate wait failed", token.id)
                self._on_error(token, exc)
        return len(ready)

    def forget(self, token: Any) -> None:
        """``token`` was discarded while waiting: take it out of its FIFO now (stats)."""
        now = self._clock()
        with self._lock:
            op = self._ops.get(token.spec.operation_type)
            if op is None:
                return
            for entry in op.waiting:
                if entry[0] is token:
                    op.waiting.remove(entry)
                    op.waited += max(0.0, now - entry[1])
                    return

    def waiting(self, operation_type: str) -> int:
        """How many tokens of ``operation_type`` wait for its rate (read without the lock)."""
        op = self._ops.get(operation_type)
        return 0 if op is None else len(op.waiting)

    def drain_waiting(self) -> list[Any]:
        """Remove and return every waiting token (stop gives up on them)."""
        now = self._clock()
        out: list[Any] = []
        with self._lock:
            for op in self._ops.values():
                for token, since, _ in op.waiting:
                    op.waited += max(0.0, now - since)
                    out.append(token)
                op.waiting.clear()
        return out

    def stats(self) -> dict[str, RateStats]:
        """Per rate-limited operation type that has been called: its :class:`RateStats`."""
        with self._lock:
            return {
                name: RateStats(len(op.waiting), op.delayed, op.waited)
                for name, op in self._ops.items()
            }
