"""AdmissionGate: where a producer faster than the workers waits.

Backpressure without polling and without a lock on the hot path. A producer that finds no room
registers as a waiter *before* re-checking, under the gate's condition; a worker that has just
made room checks the plain ``waiters`` count and, only if someone waits, takes the condition and
notifies. That order makes a missed wake-up impossible (the worker either sees the waiter, or the
waiter's re-check sees the room). Internal threads (workers, timers, the event loop) never wait
here: a worker blocked on its own mailbox would deadlock, so their re-admissions may overflow the
soft bound, which the recursion structure of their work bounds in turn.

Other admission conditions (the Overflow Guard's memory budget) plug in as ``pause`` reasons.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["AdmissionGate"]

T = TypeVar("T")

# A waiter re-checks at least this often, as a safety net; wake-ups normally come from notify().
_SAFETY_WAIT = 0.5


class AdmissionGate:
    """Blocks external producers until ``attempt()`` finds room."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.waiters = 0
        self._paused: dict[str, str] = {}

    def wait_for(self, attempt: Callable[[], T | None], timeout: float | None = None) -> T | None:
        """Call ``attempt`` until it returns non-None; ``None`` if ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self.waiters += 1
            try:
                while True:
                    if not self._paused:
                        result = attempt()
                        if result is not None:
                            return result
                    wait = _SAFETY_WAIT
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return None
                        wait = min(wait, left)
                    self._cond.wait(wait)
            finally:
                self.waiters -= 1

    def notify(self) -> None:
        """Room was made; wake the waiting producers (callers check ``waiters`` first)."""
        with self._cond:
            self._cond.notify_all()

    # -- pauses (overflow guard) ---------------------------------------------------------------
    def pause(self, reason: str, detail: str = "") -> None:
        with self._cond:
            self._paused[reason] = detail

    def resume(self, reason: str) -> None:
        with self._cond:
            self._paused.pop(reason, None)
            self._cond.notify_all()

    @property
    def paused(self) -> dict[str, str]:
        return dict(self._paused)
