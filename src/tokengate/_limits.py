"""The longest wait every lane can honour, and the one check of a number of seconds against it.

A ``timeout`` or ``deadline`` tag, or a retry back-off, ends up as a wait somewhere: ``poll()``
in a process lane's proxy thread (milliseconds in a C int: at most 2**31 - 1 ms, about 24.8
days), ``Condition.wait`` on the timer thread (``threading.TIMEOUT_MAX``, and the platform's
``time_t`` once the monotonic clock is added), ``asyncio``'s loop clock, a Dask worker's timer
thread. A value past any of them raises ``OverflowError`` deep inside a lane, after work was
sent, instead of a clear error where it was written. So one maximum that all of them can wait
for, :data:`MAX_WAIT_SECONDS`, is checked once, at decoration (tags) or construction (retry
policies): nothing on the hot path pays for it.
"""

from __future__ import annotations

import math
from typing import Any

from ._errors import ConfigError

__all__ = ["MAX_WAIT_SECONDS", "check_seconds", "show_number"]

#: The longest ``timeout``, ``deadline`` or retry back-off, in seconds (about 23 days): below
#: ``poll()``'s 2**31 - 1 ms and every platform's ``threading.TIMEOUT_MAX`` (49.7 days on
#: Windows, centuries elsewhere).
MAX_WAIT_SECONDS = 2_000_000.0

_SHOWN = f"{MAX_WAIT_SECONDS:,.0f} s, about {MAX_WAIT_SECONDS / 86400:.0f} days"


def show_number(value: Any) -> str:
    """``repr(value)``, except for an int too long to print usefully (or at all: ``str`` of an
    int over 4,300 digits raises ``ValueError``), which is shown by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        bits = abs(value).bit_length()
        return f"{'minus ' if value < 0 else ''}an int of {bits} bits (about 2**{bits - 1})"
    return repr(value)


def check_seconds(what: str, value: Any, *, fix: str, allow_zero: bool = False) -> float:
    """``value`` as a float of seconds in (0, MAX_WAIT_SECONDS] (or [0, ...] if
    ``allow_zero``), else :class:`ConfigError` naming ``what``, the value, the range and ``fix``.

    Ints are compared as ints, so ``2**1100`` is refused here rather than overflowing in a
    conversion to float.
    """
    low = "a number >= 0" if allow_zero else "a positive number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"{what} must be {low} of seconds, got {type(value).__name__} "
            f"{show_number(value)}; {fix}"
        )
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{what} must be {low} of seconds, got nan; {fix}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{what} must be {low} of seconds, got {show_number(value)}; {fix}")
    if value > MAX_WAIT_SECONDS:
        raise ConfigError(
            f"{what} is {show_number(value)} seconds, more than the longest wait tokengate "
            f"can honour on every lane ({_SHOWN}: a process worker's poll() waits at most "
            f"2**31 - 1 ms); {fix}"
        )
    return float(value)
