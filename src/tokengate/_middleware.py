"""Middleware: optional policies that watch or gate tokens, costing nothing when absent.

Guard House, trace export, metrics and the like subclass :class:`Middleware` and override only
the hooks they need. The coordinator collects, per hook, the bound methods that a middleware
actually overrides, and the hot path pays one truthiness check per hook when the list is empty
(trio's instruments, dramatiq's middleware). A hook that raises (even ``SystemExit``) is logged and
disturbs neither the token nor the thread it runs on, except ``before_submit``, which may refuse a
call on purpose (``OperationBlocked``).

Run times reach middleware through thresholds rather than a hook per run (``_run_watch.py``):
a middleware declares, per operation type, how long a run must take before it wants to hear of
it, and the coordinator hands it only those runs, so a token that crosses nothing calls nothing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._spec import TaskSpec
    from ._token import Token

__all__ = ["HOOKS", "Middleware", "RunTimes"]

# The hooks the coordinator calls from a list of the installed middleware's overrides; the
# run-time hooks (after_long_run, check_runs) are called through ``_run_watch.py`` instead.
HOOKS = ("on_start", "on_stop", "before_submit", "after_attempt", "after_failure", "after_discard")


class RunTimes(Protocol):
    """One worker thread's run times of one operation type, in seconds (``check_runs``)."""

    @property
    def count(self) -> int:
        """How many runs were recorded."""

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile run time (``q`` in 0..100); 0.0 with no runs."""


class Middleware:
    """Base class of coordinator middleware: a policy that watches (or refuses) tokens.

    Subclass it, override only the hooks you need, and install an instance with
    ``coordinator.add_middleware(m)``; ``coordinator.middleware`` lists those installed. Every
    hook does nothing by default, and the coordinator calls only the hooks a middleware
    overrides, so an unused hook costs a token nothing::

        class CountFailures(tokengate.Middleware):
            def __init__(self) -> None:
                self.failures: collections.Counter[str] = collections.Counter()

            def after_failure(self, token, outcome, exc):
                self.failures[token.operation_type] += 1

        with tokengate.OperationsCoordinator() as coordinator:
            coordinator.add_middleware(counter := CountFailures())

    Run times come through thresholds, so that watching them costs a token nothing unless its
    run is long: override :meth:`after_long_run` and :meth:`run_threshold` (seconds, per
    operation type), and only the runs longer than the threshold reach the hook::

        class LogSlowRuns(tokengate.Middleware):
            def run_threshold(self, operation_type):
                return 1.0

            def after_long_run(self, token, seconds):
                log.warning("%s took %.1fs", token.id, seconds)

    A middleware whose threshold depends on what the runs look like (the Guard House flags a run
    slower than a multiple of its operation's p95) overrides :meth:`check_runs` too: it sees
    the first run of each operation type on each worker thread, returns how many runs later it
    wants to look again, and its threshold is asked afresh after each look. While no middleware
    overrides ``after_long_run`` or ``check_runs``, run times are not even recorded.

    Hooks run on the thread where the event happens (``before_submit`` on the submitting
    thread, ``after_attempt``, ``after_failure`` and the run-time hooks on the worker that ran
    the token, or the thread that learnt its end), so they must be quick and thread-safe. A
    hook that raises is logged with its traceback and does not affect the token, except
    ``before_submit``, whose exception refuses the call (the Guard House raises
    :class:`OperationBlocked` there). The Guard House, the Overflow Guard and the trace export
    are middleware too, installed the same way.
    """

    def on_start(self, coordinator: Any) -> None:
        """The coordinator has started (or, installed on a running one, right away)."""

    def on_stop(self, coordinator: Any) -> None:
        """The coordinator has stopped (every token has ended)."""

    def before_submit(self, spec: TaskSpec) -> None:
        """A call of ``spec`` (its operation type, weight and tags) is about to become a
        token, on the caller's thread; raise to refuse it (the exception reaches the caller
        and nothing is counted)."""

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """A run ended: ``outcome`` is ``resolved``, ``failed`` or ``retried``.

        ``token.started_at``/``finished_at``, ``worker``, ``core`` and ``lane`` describe the run.
        Dependency failures (which never ran) arrive with ``token.started_at is None``.
        """

    def after_failure(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """An attempt ended in an error (``outcome`` ``failed`` or ``retried``), or a token failed
        without running (a dependency failed: ``token.started_at is None``).

        Called after ``after_attempt``, and never for a success: a middleware that only
        watches errors costs a successful token nothing.
        """

    def after_discard(self, token: Token[Any]) -> None:
        """A token was discarded (cancelled, deadline, stop, overload)."""

    def run_threshold(self, operation_type: str) -> float:
        """How many seconds a run of ``operation_type`` must take to reach
        :meth:`after_long_run` (``math.inf``, the default: none does).

        Asked when the coordinator first sees the operation type, and again after each call of
        this middleware's run-time hooks for it, so the threshold may follow what they learn.
        Only asked of a middleware that overrides ``after_long_run``; keep it a quick lookup.
        """
        return math.inf

    def after_long_run(self, token: Token[Any], seconds: float) -> None:
        """A run of ``token`` took ``seconds``, longer than :meth:`run_threshold` of its
        operation type (retried attempts included; ``token.worker`` ran it).

        Called after the token's end is recorded and before ``after_attempt``, and only for
        runs past the threshold: a run under it costs the token no call at all.
        """

    def check_runs(self, operation_type: str, runs: RunTimes) -> int | None:
        """Look at a worker thread's run times of ``operation_type`` (``runs.count``,
        ``runs.percentile(q)``); return after how many more runs on that thread to look
        again, or None for never.

        Called with the first run of each operation type on each worker thread, then as
        asked; :meth:`run_threshold` is asked again right after. The Guard House estimates its
        slow-run threshold here.
        """
        return None


def overridden(middleware: Middleware, hook: str) -> bool:
    """Whether ``middleware`` overrides ``hook`` (so the coordinator needs to call it)."""
    return getattr(type(middleware), hook) is not getattr(Middleware, hook)
