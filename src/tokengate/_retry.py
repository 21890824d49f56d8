"""RetryPolicy: when a failed attempt is tried again, and after how long.

Safe by default. A task is retried only for errors that are plausibly transient
(``DEFAULT_RETRY_ON``: connection and timeout errors, ``BlockingIOError``, ``InterruptedError``,
``MemoryError``) or for the loss of the worker that ran it (``WorkerCrashed``, counted against
``crash_retries``). A programming error (``TypeError``, ``ValueError``, ``KeyError``…) is never
retried unless the user names it in ``retry_on``, so a side-effecting function is not silently
re-run after a bug. A retried token goes to the back of the queue after its backoff (the
Quick-Proof's FIFO re-distribution); the arithmetic here is pure, with the random source injected,
so tests need no sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ._errors import ConfigError, TaskTimeout, WorkerCrashed
from ._limits import MAX_WAIT_SECONDS, check_seconds, show_number

__all__ = ["DEFAULT_RETRY_ON", "RetryPolicy", "default_retry_policies"]

DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    BlockingIOError,
    InterruptedError,
    MemoryError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and backoff for one weight class.

    ``max_retries``: extra attempts after the first for retryable application errors.
    ``crash_retries``: extra attempts after the worker running the token was lost.
    Backoff before retry *n* (1-based) is ``min(cap, base * factor ** (n - 1))``, scaled by a
    random factor in ``[1 - jitter, 1]`` ("equal jitter" keeps retries of a burst apart).
    """

    max_retries: int = 2
    retry_on: tuple[type[BaseException], ...] = DEFAULT_RETRY_ON
    dont_retry_on: tuple[type[BaseException], ...] = ()
    crash_retries: int = 1
    backoff_base: float = 0.05
    backoff_factor: float = 2.0
    backoff_cap: float = 5.0
    jitter: float = 0.5
    rng: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_retries", "crash_retries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"RetryPolicy.{name} must be an int >= 0, got {value!r}")
        for name in ("backoff_base", "backoff_cap"):  # each back-off is a wait on the timer
            check_seconds(
                f"RetryPolicy.{name}",
                getattr(self, name),
                allow_zero=True,
                fix=f"give at most {MAX_WAIT_SECONDS:.0f} seconds (backoff_cap bounds every "
                f"back-off)",
            )
        factor = self.backoff_factor
        if (
            isinstance(factor, bool)
            or not isinstance(factor, int | float)
            or not factor >= 1  # NaN compares False: refused too
        ):
            raise ConfigError(
                f"RetryPolicy.backoff_factor must be a number >= 1 (e.g. 2.0), got "
                f"{show_number(factor)}"
            )
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise ConfigError(f"RetryPolicy.jitter must be in [0, 1], got {self.jitter!r}")

    def is_retryable(
        self,
        exc: BaseException,
        *,
        retry_on: tuple[type[BaseException], ...] | None = None,
        dont_retry_on: tuple[type[BaseException], ...] | None = None,
    ) -> bool:
        """Whether ``exc`` may be retried at all (per-task tags override the policy)."""
        if not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit, GeneratorExit: never re-run
        deny = self.dont_retry_on if dont_retry_on is None else dont_retry_on
        if deny and isinstance(exc, deny):
            return False
        if isinstance(exc, WorkerCrashed):
            return True
        if isinstance(exc, TaskTimeout) and not exc.retryable:
            return False  # the timed-out run is still going: never run it twice at once
        allow = self.retry_on if retry_on is None else retry_on
        return isinstance(exc, allow)

    def budget(self, exc: BaseException, retries: int | None = None) -> int:
        """How many retries this kind of failure gets in total."""
        if isinstance(exc, WorkerCrashed):
            return self.crash_retries
        return self.max_retries if retries is None else retries

    def backoff(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1 for the first retry)."""
        if retry_number < 1:
            raise ValueError(f"retry_number starts at 1, got {retry_number}")
        try:
            grown = self.backoff_base * self.backoff_factor ** (retry_number - 1)
        except OverflowError:  # a huge retry budget: the growth passed what a float holds
            grown = self.backoff_cap
        raw = min(self.backoff_cap, grown)
        return raw * (1.0 - self.jitter * self.rng())


def default_retry_policies() -> Mapping[str, RetryPolicy]:
    """Per-weight defaults: light work is cheap to redo, heavy work less so."""
    return {
        "light": RetryPolicy(max_retries=2),
        "medium": RetryPolicy(max_retries=2),
        "heavy": RetryPolicy(max_retries=1),
    }
