"""OverflowGuard: admission pauses while the process is over its memory budget.

A low-rate daemon thread samples the process's resident set size (psutil) every
``interval`` seconds and calls :meth:`OverflowGuard.sample`, which tests may call directly with
a made-up ``rss`` instead of waiting for the thread. The rule, with hysteresis so admission does
not flap around the line:

* over ``budget`` with tokens in flight: pause admission (``AdmissionGate.pause``). External
  producers then wait at their next call, exactly as they wait for a full mailbox (or get
  ``Overloaded`` with ``admission='reject'``); calls made from inside tasks are never held, so
  running work can finish and free its memory;
* paused and back under ``resume_ratio * budget`` (90 %): resume;
* paused, but nothing of ours is in flight any more: resume anyway (with a warning). The memory
  is held by something the coordinator cannot drain (the caller's own data, or results kept in
  tokens), and holding producers would only deadlock them.

``MemoryError`` raised inside a task is retryable under the default retry policies (it is in
``DEFAULT_RETRY_ON``), so a task that met a momentary shortage goes to the back of the queue
after its backoff, while the pause lets the pressure drain.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._admission import AdmissionGate
from .._middleware import Middleware
from .._retry import RetryPolicy
from ._options import format_bytes

__all__ = ["OverflowGuard", "OverflowStatus", "process_rss"]

log = logging.getLogger("tokengate.overflow")
PAUSE_REASON = "overflow_guard"


_process: Any = None


def process_rss() -> int:
    """Resident set size of this process, in bytes (the psutil handle is kept per pid)."""
    global _process
    import psutil

    proc = _process
    if proc is None or proc.pid != os.getpid():  # first call, or we are a forked child
        proc = _process = psutil.Process()
    return int(proc.memory_info().rss)


@dataclass(frozen=True, slots=True)
class OverflowStatus:
    """The guard's state at one instant."""

    budget: int
    resume_below: int
    rss: int | None  # last sample, None before the first
    paused: bool
    pauses: int  # how many times admission was paused so far
    sampled_at: float | None  # time.monotonic() of the last sample


class OverflowGuard(Middleware):
    """Memory budget for the process; reached as ``coordinator.overflow_guard``.

    ``in_flight`` says how many tokens the coordinator still has to finish (asked only while over
    budget). ``rss`` reads the process's memory (psutil by default).
    """

    def __init__(
        self,
        gate: AdmissionGate,
        budget: int,
        *,
        enabled: bool = True,
        interval: float = 0.5,
        resume_ratio: float = 0.9,
        in_flight: Callable[[], int] = lambda: 1,
        rss: Callable[[], int] = process_rss,
        count_event: Callable[[str, int], None] | None = None,
    ) -> None:
        if not 0 < resume_ratio <= 1:
            raise ValueError(f"resume_ratio must be in (0, 1], got {resume_ratio!r}")
        self.gate = gate
        self.budget = budget
        self.enabled = enabled
        self.interval = interval
        self.resume_ratio = resume_ratio
        self._in_flight = in_flight
        self._rss = rss
        self._count_event = count_event
        self._lock = threading.Lock()
        self._paused = False
        self._pauses = 0
        self._last_rss: int | None = None
        self._sampled_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_sampling = False

    @property
    def resume_below(self) -> int:
        return int(self.budget * self.resume_ratio)

    def banner(self, policies: Mapping[str, RetryPolicy] | None = None) -> str:
        """The TokenGate Quick-Proof's initialisation block."""
        if not self.enabled:
            return "[OVERFLOW_GUARD] Disabled (overflow_guard=False)"
        lines = ["[OVERFLOW_GUARD] Initialized", f"  Base budget: {format_bytes(self.budget)}"]
        unprotected = [
            weight
            for weight, policy in (policies or {}).items()
            if not policy.is_retryable(MemoryError()) or policy.max_retries == 0
        ]
        if unprotected:
            lines.append(f"  MemoryError is not retried for: {', '.join(unprotected)}")
        else:
            lines.append("  Retry policies loaded for all complexity levels")
        return "\n".join(lines)

    def status(self) -> OverflowStatus:
        with self._lock:
            return OverflowStatus(
                budget=self.budget,
                resume_below=self.resume_below,
                rss=self._last_rss,
                paused=self._paused,
                pauses=self._pauses,
                sampled_at=self._sampled_at,
            )

    @property
    def paused(self) -> bool:
        return self._paused

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, rss: int | None = None) -> bool:
        """Take one sample (``rss`` given: use it instead of measuring); returns ``paused``."""
        if rss is None:
            rss = self._rss()
        message: tuple[Any, ...] | None = None
        warn = paused_now = False
        with self._lock:
            self._last_rss = rss
            self._sampled_at = time.monotonic()
            if not self._paused:
                if rss > self.budget and self._in_flight() > 0:
                    self._paused = True
                    self._pauses += 1
                    self.gate.pause(
                        PAUSE_REASON,
                        f"RSS {format_bytes(rss)} over the budget of {format_bytes(self.budget)}",
                    )
                    message = (
                        "[OVERFLOW_GUARD] RSS %s is over the budget of %s: admission paused "
                        "until it falls below %s (memory_budget to change it)",
                        format_bytes(rss),
                        format_bytes(self.budget),
                        format_bytes(self.resume_below),
                    )
                    warn = paused_now = True
            elif rss <= self.resume_below:
                self._resume_locked()
                message = (
                    "[OVERFLOW_GUARD] RSS %s is back under %s: admission resumed",
                    format_bytes(rss),
                    format_bytes(self.resume_below),
                )
            elif self._in_flight() == 0:
                self._resume_locked()
                message = (
                    "[OVERFLOW_GUARD] RSS %s is still over %s with no token in flight: the "
                    "memory is not held by running tasks, so admission resumes (raise "
                    "memory_budget if this is expected)",
                    format_bytes(rss),
                    format_bytes(self.resume_below),
                )
                warn = True
            paused = self._paused
        if paused_now and self._count_event is not None:
            self._count_event("overflow_pauses", 1)
        if message is not None:
            (log.warning if warn else log.info)(*message)
        return paused

    def _resume_locked(self) -> None:
        self._paused = False
        self.gate.resume(PAUSE_REASON)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # psutil trouble must not kill the guard, nor spam the log
                if not self._warned_sampling:
                    self._warned_sampling = True
                    log.exception("[OVERFLOW_GUARD] could not read the process's memory")

    # -- lifecycle (middleware hooks) ----------------------------------------------------------
    def on_start(self, coordinator: Any) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tokengate-overflow", daemon=True)
        self._thread.start()

    def on_stop(self, coordinator: Any) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        with self._lock:
            if self._paused:
                self._resume_locked()
