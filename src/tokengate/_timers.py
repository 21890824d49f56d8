"""TimerQueue: one thread that runs short callbacks at a later time.

Retry backoff and task timeouts both need "do this in N seconds" without parking a worker.
One heap and one thread serve every timer of a coordinator; the thread sleeps on a condition
until the earliest deadline (block, don't poll) and starts only when the first timer is set.
Callbacks must be quick (they re-admit or fail a token); one that raises (``SystemExit`` and
``KeyboardInterrupt`` included) is logged, never allowed to stop the queue: a dead timer thread
would strand every retry back-off and timeout after it, and ``stop()`` with them.

Any delay is accepted: the thread sleeps at most :data:`MAX_WAIT_SECONDS` at a time (past it,
``Condition.wait`` overflows ``time_t`` on some platforms), so a timer too far away to be
waited for in one go is simply not due until then, and one too far to represent (an int past
a float's range) is never due: ``close()`` hands it back to its owner, like any other timer
that did not run. A NaN or negative delay is due at once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ._limits import MAX_WAIT_SECONDS

__all__ = ["TimerHandle", "TimerQueue"]

logger = logging.getLogger("tokengate.timers")


class TimerHandle:
    """A scheduled call; ``cancel()`` stops it if it has not run."""

    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class TimerQueue:
    """A heap of :class:`TimerHandle` served by one lazily started daemon thread."""

    def __init__(
        self, *, name: str = "tokengate-timers", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._name = name
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False
        self.on_thread_start: Callable[[], None] | None = None

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` on the timer thread after ``delay`` seconds."""
        now = self._clock()
        try:
            when = now + delay if delay > 0 else now  # NaN and negative delays: due at once
        except OverflowError:  # an int past a float's range: never due (close() returns it)
            when = math.inf
        handle = TimerHandle(when, callback, args)
        with self._cond:
            if self._closed:
                raise RuntimeError("timer queue is closed")
            heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is handle:
                self._cond.notify()
        return handle

    def pending(self) -> list[TimerHandle]:
        """The handles not yet run nor cancelled (for stop's bookkeeping)."""
        with self._cond:
            return [h for _, _, h in self._heap if not h.cancelled]

    def run_due(self, now: float | None = None) -> int:
        """Run every timer due at ``now`` on the calling thread (tests drive time this way)."""
        due = self._pop_due(self._clock() if now is None else now)
        self._run(due)
        return len(due)

    def _pop_due(self, now: float) -> list[TimerHandle]:
        due: list[TimerHandle] = []
        with self._cond:
            while self._heap and self._heap[0][0] <= now:
                handle = heapq.heappop(self._heap)[2]
                if not handle.cancelled:
                    due.append(handle)
        return due

    @staticmethod
    def _run(due: list[TimerHandle]) -> None:
        """Run ``due`` in order; one that raises is logged and the others still run.

        ``SystemExit`` / ``KeyboardInterrupt`` from a callback are caught too (on the timer
        thread they would end it silently); on the main thread (``run_due``), where a real
        Ctrl-C lands, the first is raised again once every callback has run.
        """
        escaped: BaseException | None = None
        for handle in due:
            try:
                handle.callback(*handle.args)
            except Exception:
                logger.exception("timer callback %r raised", handle.callback)
            except BaseException as exc:
                logger.exception("timer callback %r raised", handle.callback)
                if escaped is None:
                    escaped = exc
        if escaped is not None and threading.current_thread() is threading.main_thread():
            raise escaped

    def _loop(self) -> None:
        if self.on_thread_start is not None:
            self.on_thread_start()
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        wait = self._heap[0][0] - self._clock()
                        if wait <= 0:
                            break
                        self._cond.wait(min(wait, MAX_WAIT_SECONDS))
                    else:
                        self._cond.wait()
                if self._closed:
                    return
            self._run(self._pop_due(self._clock()))

    def close(self, timeout: float | None = 5.0) -> list[TimerHandle]:
        """Stop the thread; returns the timers that never ran (the caller settles them)."""
        with self._cond:
            self._closed = True
            left = [h for _, _, h in self._heap if not h.cancelled]
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return left
