"""LoopWatchdog: notices an event loop held by code that does not await.

A coroutine is only interrupted where it awaits, so an ``async def`` task that blocks (a
``time.sleep``, a busy loop, a CPU-bound step) holds the whole event loop: no other async task
runs, no ``asyncio.timeout`` fires, and nothing on the loop can cancel it. The loop cannot see
this from inside, so a separate thread watches it.

While async tasks run, the watchdog posts a heartbeat to the loop (``call_soon_threadsafe``)
every ``stall_after`` seconds and waits that long for it to run. A heartbeat that does not run
in time means the loop is held: the watchdog asks the lane which run holds it
(``AsyncLane.holder``: the loop's current asyncio task), logs a WARNING naming it, and once that
run's ``timeout`` has passed fails its token with ``TaskTimeout`` (``AsyncLane.time_out``). The
body cannot be stopped: it runs on, and its late result is dropped when it returns. The token's
completion (done-callbacks, middleware: user code that may submit or wait) is handed to the
coordinator's timer thread, so nothing can block the watchdog and stop it enforcing timeouts.

Cost: the thread starts with the first async task (a coordinator that runs none has none),
sleeps on an event while no async task runs, and otherwise costs one heartbeat per
``stall_after`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._async import AsyncLane

__all__ = ["LoopWatchdog"]

logger = logging.getLogger("tokengate.async")

_perf = time.perf_counter
_NOBODY = object()  # "no holder named yet" (None means: no task of ours holds the loop)


class LoopWatchdog:
    """A daemon thread that notices when ``lane``'s event loop has not run for ``stall_after``
    seconds, names the task holding it and enforces that task's ``timeout``."""

    def __init__(self, lane: AsyncLane, stall_after: float) -> None:
        self.lane = lane
        self.stall_after = stall_after
        #: True from the moment a heartbeat was found late until the loop runs one again: the
        #: lane's stop() does not wait for a loop known to be held.
        self.stalled = False
        self._busy = threading.Event()  # set while async tasks may be running
        self._closed = threading.Event()
        self._beat = threading.Event()  # the heartbeat waited for; close() sets it too
        self._thread = threading.Thread(
            target=self._watch, name="tokengate-loop-watchdog", daemon=True
        )

    @property
    def started(self) -> bool:
        """Whether the watchdog's thread was started (by the first async task)."""
        return self._thread.ident is not None

    def wake(self) -> None:
        """The first async task started (called on the loop thread only): watch the loop,
        starting the watchdog's thread the first time."""
        if not self._busy.is_set():
            self._busy.set()
        if self._thread.ident is None and not self._closed.is_set():
            self._thread.start()

    def close(self) -> None:
        """Stop watching (from any thread): the thread wakes up and ends."""
        self._closed.set()
        self._busy.set()
        self._beat.set()

    def _watch(self) -> None:
        worker = self.lane.worker
        busy = self._busy
        closed = self._closed
        stall_after = self.stall_after
        while not closed.is_set():
            if worker.running == 0:
                busy.clear()
                # Re-check after clearing: a task started in between has set it again or
                # will (the loop counts the task before it looks at the event).
                if worker.running == 0:
                    busy.wait()
                continue
            beat = self._beat = threading.Event()
            if closed.is_set():  # close() set the previous one
                return
            posted = _perf()
            try:
                self.lane.loop.call_soon_threadsafe(beat.set)
            except RuntimeError:  # the loop is closed: nothing left to watch
                return
            if not beat.wait(stall_after) and not closed.is_set():
                self._stalled(beat, posted)
            closed.wait(stall_after)  # one heartbeat per stall_after while tasks run

    def _stalled(self, beat: threading.Event, posted: float) -> None:
        """The heartbeat posted at ``posted`` is late: report the holder, enforce its timeout,
        and keep watching until the loop runs the heartbeat (or the lane stops)."""
        self.stalled = True
        lane = self.lane
        named: object = _NOBODY
        while True:
            task, run = lane.holder()
            now = _perf()
            if run is not named:
                named = run
                lane.report_stall(task, run, now - posted)
            wait = self.stall_after
            if run is not None and run.deadline is not None and not run.taken:
                left = run.deadline - now
                if left <= 0:
                    lane.time_out(run)
                else:
                    wait = min(wait, left)
            beat.wait(wait)
            if self._closed.is_set():
                return  # stalled or not, stop() has read it
            if beat.is_set():
                break
        self.stalled = False
        if logger.isEnabledFor(logging.INFO):
            logger.info("[event_loop] running again after %.2fs", _perf() - posted)
