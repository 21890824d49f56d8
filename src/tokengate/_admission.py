"""AdmissionGate: where a producer faster than the workers waits.

Backpressure without polling and without a lock on the hot path. A producer that finds no room
registers *before* re-checking, under the gate's condition; a worker that has just made room
checks the plain ``unwoken`` count and, only if someone is registered, takes the condition and
notifies. That order makes a missed wake-up impossible (the worker either sees the registration,
or the waiter's re-check sees the room). ``notify`` wakes every waiter and zeroes ``unwoken``, so
the completions that follow, before the woken producer has run, pay one attribute test each
rather than a notify each: under the GIL a worker finishes thousands of short tokens before the
producer it woke gets to run (B1 made ~84,000 notify calls per 100,000 tokens before this).

Internal threads (workers, timers, the event loop) never wait here: a worker blocked on its own
mailbox would deadlock, so their re-admissions may overflow the soft bound, which the recursion
structure of their work bounds in turn.

Other admission conditions (the Overflow Guard's memory budget) plug in as ``pause`` reasons.

asyncio producers (``submit_async``) wait in :meth:`wait_for_async` instead: the same attempt,
the same register-then-re-check order, but the wait is an ``asyncio`` future that ``notify``
resolves through ``call_soon_threadsafe``, so the producer's event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from ._errors import Overloaded

__all__ = ["AdmissionGate", "AdmissionStatus"]

T = TypeVar("T")

# A waiter re-checks at least this often, as a safety net; wake-ups normally come from notify().
_SAFETY_WAIT = 0.5


def _next_wait(deadline: float | None) -> float | None:
    """How long a waiter may sleep before re-checking; None once ``deadline`` has passed."""
    if deadline is None:
        return _SAFETY_WAIT
    left = deadline - time.monotonic()
    return None if left <= 0 else min(_SAFETY_WAIT, left)


@dataclass(frozen=True)
class AdmissionStatus:
    """A snapshot of admission (``OperationsCoordinator.admission``).

    ``waiters``: producers blocked waiting for room in a mailbox (``admission="block"``);
    ``paused``: why admission is paused, by reason (the Overflow Guard's ``"overflow_guard"``
    while memory is over its budget), each with a human-readable detail.
    """

    waiters: int
    paused: Mapping[str, str]


class AdmissionGate:
    """Blocks external producers until ``attempt()`` finds room."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.waiters = 0  # producers waiting for room (a gauge, for metrics)
        self.unwoken = 0  # registrations since the last notify: what a worker checks
        self._paused: dict[str, str] = {}
        self.is_paused = False  # read by every submit: one attribute, not a dict's length
        # asyncio producers waiting for room, as (their loop, a future to resolve)
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def wait_for(self, attempt: Callable[[], T | None], timeout: float | None = None) -> T | None:
        """Call ``attempt`` until it returns non-None; ``None`` if ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self.waiters += 1
            try:
                while True:
                    self.unwoken += 1  # before the re-check: see the module docstring
                    if not self._paused:
                        result = attempt()
                        if result is not None:
                            self._unregister()
                            return result
                    wait = _next_wait(deadline)
                    if wait is None:
                        self._unregister()
                        return None
                    if not self._cond.wait(wait):
                        self._unregister()  # timed out: no notify consumed the registration
            finally:
                self.waiters -= 1

    def _unregister(self) -> None:
        """Take back one registration (call with the condition held). Floored at 0: a notify
        racing a timed-out wait has zeroed it already; a count too high costs a spare notify,
        one too low could lose a wake-up."""
        if self.unwoken:
            self.unwoken -= 1

    def notify(self) -> None:
        """Room was made; wake the waiting producers (callers check ``unwoken`` first)."""
        with self._cond:
            self.unwoken = 0
            self._cond.notify_all()
            woken = self._take_async_waiters()
        _wake_async(woken)

    # -- asyncio producers -----------------------------------------------------------------------
    async def wait_for_async(
        self, attempt: Callable[[], T | None], timeout: float | None = None
    ) -> T | None:
        """:meth:`wait_for` for asyncio code: awaits instead of blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            entry = (loop, waiter)
            with self._cond:
                self.waiters += 1
                self.unwoken += 1
                self._async_waiters.append(entry)
            try:
                if not self._paused:  # re-checked after registering: no wake-up can be lost
                    result = attempt()
                    if result is not None:
                        return result
                wait = _next_wait(deadline)
                if wait is None:
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await waiter
            finally:
                with self._cond:
                    self.waiters -= 1
                    try:
                        self._async_waiters.remove(entry)
                    except ValueError:
                        pass  # a notify took it, and zeroed ``unwoken``
                    else:
                        self._unregister()

    def _take_async_waiters(
        self,
    ) -> list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]:
        woken = self._async_waiters
        if woken:
            self._async_waiters = []
        return woken

    # -- pauses (overflow guard) ---------------------------------------------------------------
    def pause(self, reason: str, detail: str = "") -> None:
        with self._cond:
            self._paused[reason] = detail
            self.is_paused = True

    def resume(self, reason: str) -> None:
        with self._cond:
            self._paused.pop(reason, None)
            self.is_paused = bool(self._paused)
            self.unwoken = 0
            self._cond.notify_all()
            woken = self._take_async_waiters()
        _wake_async(woken)

    @property
    def paused(self) -> dict[str, str]:
        return dict(self._paused)

    def wait_while_paused(self, operation_type: str, *, reject: bool) -> None:
        """An external call while admission is paused: wait until it resumes, or (``reject``,
        admission='reject') refuse the call with :class:`Overloaded`."""
        if reject:
            detail = "; ".join(self.paused.values()) or "paused"
            raise Overloaded(
                f"admission is paused ({detail}); {operation_type!r} was refused. "
                f"Wait for running tasks to free memory, raise memory_budget, or use "
                f"admission='block'"
            )
        self.wait_for(lambda: True)

    def status(self) -> AdmissionStatus:
        """A frozen snapshot of the waiters and pause reasons."""
        return AdmissionStatus(self.waiters, self.paused)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake_async(woken: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    for loop, waiter in woken:
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, waiter)
