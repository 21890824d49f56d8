"""Middleware: optional policies that watch or gate tokens, costing nothing when absent.

Guard House, trace export, metrics and the like subclass :class:`Middleware` and override only
the hooks they need. The coordinator collects, per hook, the bound methods that a middleware
actually overrides, and the hot path pays one truthiness check per hook when the list is empty
(trio's instruments, dramatiq's middleware). A hook that raises (even ``SystemExit``) is logged and
disturbs neither the token nor the thread it runs on, except ``before_submit``, which may refuse a
call on purpose (``OperationBlocked``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._spec import TaskSpec
    from ._token import Token

__all__ = ["HOOKS", "Middleware"]

HOOKS = ("on_start", "on_stop", "before_submit", "after_attempt", "after_failure", "after_discard")


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

    Hooks run on the thread where the event happens (``before_submit`` on the submitting
    thread, ``after_attempt`` and ``after_failure`` on the worker that ran the token, or the
    thread that learnt its end), so they must be quick and thread-safe. A hook that raises is
    logged with its traceback and does not affect the token, except ``before_submit``, whose
    exception refuses the call (the Guard House raises :class:`OperationBlocked` there).
    The Guard House, the Overflow Guard and the trace export are middleware too.
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


def overridden(middleware: Middleware, hook: str) -> bool:
    """Whether ``middleware`` overrides ``hook`` (so the coordinator needs to call it)."""
    return getattr(type(middleware), hook) is not getattr(Middleware, hook)
