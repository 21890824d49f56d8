"""The exception hierarchy: one root, precise leaves, stdlib bases where the meaning matches.

Every message says what happened, the value that caused it, and what to do about it, so that
the first line of a traceback is enough to fix the problem. Classes carry
``__module__ = "tokengate"`` so tracebacks name the public path, not a private module.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor, CancelledError

__all__ = [
    "ConfigError",
    "CoordinatorNotRunning",
    "DependencyFailed",
    "OperationBlocked",
    "Overloaded",
    "SerializationError",
    "TaskTimeout",
    "TokenDiscarded",
    "TokenGateError",
    "WorkerCrashed",
]


class TokenGateError(Exception):
    """Root of every error tokengate raises on its own account."""


class ConfigError(TokenGateError, ValueError):
    """A tag, option or configuration value is not valid.

    Raised as early as possible: at decoration time for tags, at construction for the
    coordinator's configuration. Also a ``ValueError``, so generic validation code catches it.
    """


class CoordinatorNotRunning(TokenGateError, RuntimeError):
    """A task was called, or work submitted, with no running coordinator."""


class Overloaded(TokenGateError):
    """Admission refused a token because every allowed mailbox was full (``admission='reject'``)."""


class DependencyFailed(TokenGateError):
    """A token this task depended on failed or was discarded, so the task never ran.

    The dependency's own error is the ``__cause__``. ``root_cause`` is the error where the
    chain broke (the first failure or discard up the chain), so a long chain's message names
    the root instead of nesting every intermediate message.
    """

    root_cause: BaseException | None = None
    root_message: str = ""


class TokenDiscarded(TokenGateError, CancelledError):
    """The token was discarded before it started: cancelled, past its deadline, or dropped on stop.

    A ``concurrent.futures.CancelledError`` too, so code written for futures treats it as a
    cancellation. ``reason`` says which.
    """

    def __init__(self, message: str, reason: str = "cancelled") -> None:
        super().__init__(message)
        self.reason = reason


class TaskTimeout(TokenGateError, TimeoutError):
    """The task ran longer than its ``timeout`` tag allowed.

    ``retryable`` is False when the timed-out run could not be stopped (a thread cannot be
    killed): re-running it would run the function twice at once, so the retry policy refuses.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class WorkerCrashed(TokenGateError, BrokenExecutor):
    """The worker running the token died (a process killed, a segfault, an ``os._exit``)."""


class InitializerFailed(TokenGateError, BrokenExecutor):
    """The ``initializer`` of a :class:`TokenGateExecutor` raised, so the executor is broken.

    Like the standard library's ``BrokenThreadPool`` / ``BrokenProcessPool``: the call that hit
    it and every call of that executor not yet run fail with it, and ``submit`` raises it. The
    initializer's own error is the ``__cause__`` (its traceback, for process work).
    """


class SerializationError(TokenGateError, TypeError):
    """An argument or a result could not be pickled to cross into or out of a worker process."""


class OperationBlocked(TokenGateError):
    """The Guard House's circuit breaker is open for this operation type.

    ``operation_type`` names it; ``retry_in`` is how many seconds until a probe call will be let
    through (``None`` if unknown).
    """

    def __init__(
        self, message: str, operation_type: str = "", retry_in: float | None = None
    ) -> None:
        super().__init__(message)
        self.operation_type = operation_type
        self.retry_in = retry_in


for _cls in (
    TokenGateError,
    ConfigError,
    CoordinatorNotRunning,
    Overloaded,
    DependencyFailed,
    TokenDiscarded,
    TaskTimeout,
    WorkerCrashed,
    InitializerFailed,
    SerializationError,
    OperationBlocked,
):
    _cls.__module__ = "tokengate"
del _cls
