"""The one path by which every run ends: resolve, retry or fail, and what each end records.

Every lane (through ``LaneHost.complete``) and the Dask runner end their tokens here, so the
statistics, the retry decision, the back-off, the timeouts, the Guard House's view of run times,
middleware and the drain see every token the same way whatever ran it.

Order of one ending (resolved or failed)::

    Token._finish(value | error)  under the token's lock: state, then record_terminal (the counts)
        └─ after the lock, before any waiter is woken: attempt_ended (run watcher, middleware)
    waiters woken, done-callbacks run (dependents released, futures' callbacks)

So a caller returning from ``get()`` sees counts, Guard House figures and middleware effects
that include its token. A retry instead re-opens the token, waits out its back-off on the timer
thread (counted in ``backing_off`` so ``stop()`` can find it) and hands it back to the backend's
``readmit``, to the back of the queue.

Discards (cancel, deadline, stop, overload) come here too, from ``Token._discard``:
``on_discarded`` counts it under the token's lock and ``after_discard`` gives back what it held.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ._errors import TaskTimeout, TokenGateError
from ._logging import level_answers
from ._parking import Parking
from ._run_watch import Watcher, deliver
from ._state import Lifecycle
from ._stats import StatsRecorder
from ._throttle import StorageThrottle

if TYPE_CHECKING:
    from collections import deque

    from ._rate import RateLimiter
    from ._retry import RetryPolicy
    from ._spec import TaskSpec
    from ._timers import TimerQueue
    from ._token import Token
    from .backends import Backend

__all__ = ["Completion", "run_hooks"]

log = logging.getLogger("tokengate.coordinator")
worker_log = logging.getLogger("tokengate.worker")
retry_log = logging.getLogger("tokengate.retry")
stats_log = logging.getLogger("tokengate.stats")  # the Quick-Proof's "[DEBUG] Recorded:" lines
_DEBUG = logging.DEBUG
# The hot path reads these before calling isEnabledFor: see level_answers.
_worker_answers = level_answers(worker_log)
_stats_answers = level_answers(stats_log)
_INFO = logging.INFO
_perf = time.perf_counter

Hook = Callable[..., Any]


def run_hooks(hooks: list[Hook], *args: Any) -> None:
    """Call each middleware hook; one that raises is logged and the others still run.

    ``SystemExit``/``KeyboardInterrupt`` are caught too, as for done-callbacks: the hooks run on
    worker, proxy and timer threads, mid-way through ending a token, where anything escaping
    would end the thread (and strand its mailbox) or leave the token's resources unreleased.
    """
    for hook in hooks:
        try:
            hook(*args)
        except BaseException:
            log.exception("middleware hook %r raised; the token is not affected", hook)


class Completion:
    """Ends runs for every lane and backend of one coordinator, and keeps what ending needs.

    It is also every token's owner (``Token`` calls :meth:`help`, :meth:`on_discarded` and
    :meth:`after_discard`, the ``TokenOwner`` protocol of ``_token.py``).
    """

    def __init__(
        self,
        *,
        backend: Backend,
        stats: StatsRecorder,
        throttle: StorageThrottle,
        rate: RateLimiter | None,
        policies: Mapping[str, RetryPolicy],
        lifecycle: Lifecycle,
        hooks: Mapping[str, list[Hook]],
    ) -> None:
        self.stats = stats
        self.throttle = throttle
        self.rate = rate
        self.policies = policies
        self.lifecycle = lifecycle
        self.backend = backend
        self.timers: TimerQueue | None = None  # the running coordinator's timer thread
        # Middleware hook lists, shared with the coordinator (add_middleware appends to them).
        self._after_attempt = hooks["after_attempt"]
        self._after_failure = hooks["after_failure"]
        self._after_discard = hooks["after_discard"]
        # Middleware that watch run times (_run_watch.py), and whether runs are recorded at all:
        # the runs they must see come to them here, without a middleware call per token.
        self.watch_runs = False
        self.run_watchers: tuple[Watcher, ...] = ()
        # The dashboard's recent tokens (a bounded deque), while a page looks: runs ending
        # (terminal or retried) are appended to ``recent`` until it holds ``recent_limit``,
        # which switches it off until the dashboard takes them (dashboard/_registry.py); every
        # discard to ``recent_discards``. One C call, no middleware call.
        self.recent: deque[Token[Any]] | None = None
        self.recent_limit = 0
        self.recent_discards: deque[Token[Any]] | None = None
        self._lock = threading.Lock()
        self.backing_off: set[Token[Any]] = set()  # retries waiting out their back-off
        self._drain_cond = threading.Condition(threading.Lock())
        # Bound once: Token._finish calls them once per token.
        self.record = self.record_terminal
        self.ended = self._attempt_ended

    # -- the one completion path ------------------------------------------------------------
    def complete(
        self,
        token: Token[Any],
        run_id: int,
        value: Any,
        exc: BaseException | None,
        *,
        release_permit: bool = True,
    ) -> None:
        """The one place a run ends: resolve, retry or fail (every lane calls this)."""
        timer = token._timer
        if timer is not None:
            timer.cancel()
            token._timer = None
        if release_permit and token._holds_permit:
            self._hand_on_permits(token)
        racy = None if token.spec.timeout is None else run_id
        if exc is None:
            if not token._finish(value, None, self.record, racy, self.ended):
                self.late(token, "result")
                return
            if _worker_answers.get(_DEBUG, True) and worker_log.isEnabledFor(_DEBUG):
                worker_log.debug("[%s] ✓ Completed %s", (token.worker or "?").upper(), token.id)
        elif self._retry(token, run_id, exc):
            self.attempt_ended(token, "retried", exc)
            return
        else:
            if not token._finish(None, exc, self.record, racy, self.ended):
                self.late(token, "error")
                return
            if _worker_answers.get(_DEBUG, True) and worker_log.isEnabledFor(_DEBUG):
                worker_log.debug(
                    "[%s] ✗ Failed %s: %s: %s",
                    (token.worker or "?").upper(),
                    token.id,
                    type(exc).__name__,
                    exc,
                )
        if _stats_answers.get(_DEBUG, True) and stats_log.isEnabledFor(_DEBUG):
            stats_log.debug("[DEBUG] Recorded: %s", token.id)
        if self.lifecycle.draining:
            self.notify_drain()

    def finish(self, token: Token[Any], value: Any, exc: BaseException | None) -> bool:
        """End ``token`` with ``value`` or ``exc`` without a run of ours (a backend that ran it
        elsewhere, or a failure before it ran): recorded and announced as :meth:`complete`
        does. False if it had ended already."""
        finished = token._finish(value, exc, self.record, None, self.ended)
        if self.lifecycle.draining:
            self.notify_drain()
        return finished

    def fail_unrun(self, token: Token[Any], exc: BaseException) -> None:
        """Fail a token that never ran (a dependency failed, its call could not be sent)."""
        self.finish(token, None, exc)

    def record_terminal(self, token: Token[Any], exc: BaseException | None) -> bool:
        """Called by ``Token._finish`` under the token's lock, before anyone is woken; True if
        middleware or a run watcher must hear of this end before its waiters are woken."""
        now = _perf()
        token.finished_at = now
        recent = self.recent
        if recent is not None:
            recent.append(token)
            if len(recent) >= self.recent_limit:
                self.recent = None  # enough for this period: the dashboard switches it on
        spec = token.spec
        try:  # StatsRecorder.counters, inline: once per token
            counters = self.stats.per_thread.shard.ops[spec.operation_type]
        except (AttributeError, KeyError):
            counters = self.stats.counters(spec.operation_type, spec.weight)
        if exc is None:
            counters.resolved += 1
            heard = self._after_attempt
        else:
            counters.failed += 1
            heard = self._after_attempt or self._after_failure
        counters.latency.record(now - token.submitted_at)
        if self.watch_runs:
            started = token.started_at
            if started is not None:
                run = now - started  # OperationCounters.record_run, inline: once per token
                runs = counters.runs
                runs.record(run)
                if run > counters.watch.slow_after or runs.count >= counters.next_check:
                    token._watched = (counters, run)  # shown outside the lock
                    return True
        return bool(heard)

    def _attempt_ended(self, token: Token[Any], exc: BaseException | None) -> None:
        """A terminal end, after the token's lock and before its waiters are woken."""
        self.attempt_ended(token, "resolved" if exc is None else "failed", exc)

    def attempt_ended(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """An attempt ended (``resolved``, ``failed`` or ``retried``): show its run to the run
        watcher if it must, then tell middleware (``after_attempt`` always, ``after_failure``
        for errors)."""
        recent = self.recent
        if outcome == "retried" and recent is not None:
            recent.append(token)
            if len(recent) >= self.recent_limit:
                self.recent = None
        if outcome == "retried" and self.watch_runs and token.started_at is not None:
            spec = token.spec  # a retried attempt is not terminal: its run is recorded here
            counters = self.stats.counters(spec.operation_type, spec.weight)
            run = _perf() - token.started_at
            if counters.record_run(run):
                token._watched = (counters, run)
        if token._watched is not None:
            self._show_run(token)
        if self._after_attempt:
            run_hooks(self._after_attempt, token, outcome, exc)
        if outcome != "resolved" and self._after_failure:
            run_hooks(self._after_failure, token, outcome, exc)

    def _show_run(self, token: Token[Any]) -> None:
        """Hand a run that crossed its operation's RunWatch to the middleware watching run
        times (the Guard House), outside the token's lock."""
        counters, run = token._watched
        token._watched = None
        deliver(self.run_watchers, token, counters, run)

    def late(self, token: Token[Any], what: str) -> None:
        """A result or error arrived for a token that had already ended: dropped, and said."""
        log.warning(
            "late %s of %s (token %s) dropped: the token had already ended (%s)",
            what,
            token.operation_type,
            token.id,
            token.state,
        )

    def fail_internal(self, token: Token[Any], exc: BaseException) -> None:
        """Fail a token whose run broke inside tokengate itself (never lose it)."""
        error = TokenGateError(
            f"internal error while running {token.operation_type!r} (token {token.id}): "
            f"{type(exc).__name__}: {exc}; please report it"
        )
        error.__cause__ = exc
        self.finish(token, None, error)

    # -- retries ----------------------------------------------------------------------------
    def retry_budget_left(self, token: Token[Any], exc: BaseException) -> float | None:
        """The back-off before another attempt of ``token`` after ``exc``, or None when it
        must not be retried (not retryable, budget used up, or stop() gave up on pending work).
        The one retry decision of the local lanes (Dask retries through its own ``retries=``)."""
        used = token.attempts - 1
        if used >= self.retries_left(token.spec, exc):
            return None
        return self.policies[token.spec.weight].backoff(used + 1)

    def retries_left(self, spec: TaskSpec, exc: BaseException) -> int:
        """How many more attempts a call of ``spec`` gets after its first failed with ``exc``
        outside a token (a call inside a batch): 0 when it must not be retried."""
        if self.lifecycle.discarding:
            return 0
        policy = self.policies[spec.weight]
        if not policy.is_retryable(exc, retry_on=spec.retry_on, dont_retry_on=spec.dont_retry_on):
            return 0
        return policy.budget(exc, spec.retries)

    def record_retried(self, token: Token[Any], exc: BaseException, delay: float) -> None:
        """Count a retry and say so."""
        spec = token.spec
        self.stats.record_retried(spec.operation_type, spec.weight)
        if retry_log.isEnabledFor(_INFO):
            retry_log.info(
                "[RETRY] %s attempt %d failed with %s: %s; retrying in %.3fs (back of the queue)",
                token.id,
                token.attempts,
                type(exc).__name__,
                exc,
                delay,
            )

    def _retry(self, token: Token[Any], run_id: int, exc: BaseException) -> bool:
        delay = self.retry_budget_left(token, exc)
        if delay is None or not token._reopen(run_id):
            return False
        self.backend.retrying(token)  # e.g. a process call waits in a queue again, with its bytes
        self.record_retried(token, exc, delay)
        token._parked = Parking.BACKOFF
        with self._lock:
            self.backing_off.add(token)
        assert self.timers is not None
        try:
            self.timers.call_later(delay, self._readmit, token)
        except RuntimeError:  # the timer queue closed in between (stop): no retry will come
            with self._lock:
                self.backing_off.discard(token)
            token._discard("stopped")
        return True

    def _readmit(self, token: Token[Any]) -> None:
        with self._lock:
            self.backing_off.discard(token)
        if token.done():
            return
        if self.lifecycle.discarding:
            # stop() gave up on what has not started while this token waited out its back-off;
            # a retry decided in the same instant can miss stop()'s sweep of the back-off set.
            token._discard("stopped")
            return
        token._parked = None
        self.backend.readmit(token)

    def take_backing_off(self) -> list[Token[Any]]:
        """The tokens waiting out a back-off (``stop()`` discards them)."""
        with self._lock:
            return list(self.backing_off)

    # -- timeouts ----------------------------------------------------------------------------
    def arm_timeout(self, token: Token[Any], run_id: int) -> None:
        """Start ``token``'s ``timeout`` clock for run ``run_id`` (thread-style: the run is
        failed when it expires, and its late result dropped)."""
        timers, timeout = self.timers, token.spec.timeout
        assert timers is not None and timeout is not None
        token._timer = timers.call_later(timeout, self._on_timeout, token, run_id)

    def _on_timeout(self, token: Token[Any], run_id: int) -> None:
        if token._run_id != run_id or token.done():
            return
        exc = TaskTimeout(
            f"{token.operation_type!r} (token {token.id}) ran longer than its timeout of "
            f"{token.spec.timeout}s on {token.worker}; a thread cannot be killed, so its late "
            f"result will be dropped",
            retryable=False,
        )
        # The body is still running: its storage permit stays held until it really returns
        # (its own, late completion releases it), so the tier limit holds.
        self.complete(token, run_id, None, exc, release_permit=False)
        self.backend.stuck(token)

    # -- discards (called by Token._discard) ----------------------------------------------------
    def on_discarded(self, token: Token[Any]) -> None:
        """Under the token's lock: count the discard."""
        spec = token.spec
        token.finished_at = _perf()
        if self.recent_discards is not None:
            self.recent_discards.append(token)
        self.stats.record_discarded(spec.operation_type, spec.weight)

    def after_discard(self, token: Token[Any]) -> None:
        """After the token's lock, before its callbacks: give back what it held."""
        if token._parked is Parking.RATE and self.rate is not None:
            self.rate.forget(token)  # out of its operation's FIFO now, not when its turn comes
        self.backend.discarded(token)
        if self._after_discard:
            run_hooks(self._after_discard, token)
        if token.spec.storage_speed is not None:
            # Always ask the throttle (it checks under its lock): a permit granted while this
            # token was being cancelled must come back too.
            self._hand_on_permits(token)
        if self.lifecycle.draining:
            self.notify_drain()

    def _hand_on_permits(self, token: Token[Any]) -> None:
        granted = self.throttle.release(token)
        if granted:
            self.backend.granted(granted)

    # -- waiting (called by Token._wait) ----------------------------------------------------------
    def help(self, token: Token[Any], end: float | None) -> None:
        """A thread waiting on ``token``: the backend may have it do useful work meanwhile."""
        self.backend.help(token, end)

    # -- the drain --------------------------------------------------------------------------
    def notify_drain(self) -> None:
        with self._drain_cond:
            self._drain_cond.notify_all()

    def wait_drained(self, timeout: float | None) -> bool:
        """Wait until no token is in flight; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._drain_cond:
            while self.stats.snapshot().in_flight > 0:
                wait = 0.1
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                self._drain_cond.wait(wait)
        return True
