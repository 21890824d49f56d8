"""Where a counted token waits while it cannot run yet: one state machine for every backend.

A token that is not in a mailbox, not running and not ended is *parked* in exactly one place,
and ``Token._parked`` says which, so that a discard knows what to give back (a rate-limit FIFO
place, a held slot) and a waiting thread knows whether it may run the token itself::

    (not parked) ──> DEPS     waiting for the tokens among its arguments (DependencyTracker)
                 ──> RATE     waiting for its operation's rate limit (RateLimiter)
                 ──> TIER     waiting for a storage-tier permit (StorageThrottle)
                 ──> BACKOFF  waiting out a retry's back-off (Completion)
                 ──> HELD     held back by its submitter, e.g. an executor's max_workers
    each of them ──> (not parked), when released; never straight from one place to another

"Not parked" is ``None`` so that the hot path's check is one identity test. Moves go through
:func:`park` (checked against :data:`TRANSITIONS`) except un-parking, which is legal from every
state and done inline where a token is routed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from ._state import IllegalTransition

__all__ = ["TRANSITIONS", "Parking", "park"]


class Parking(enum.StrEnum):
    DEPS = "deps"
    RATE = "rate"
    TIER = "tier"
    BACKOFF = "backoff"
    HELD = "held"


#: From each place (``None``: not parked), the places a token may move to.
TRANSITIONS: Mapping[Parking | None, frozenset[Parking | None]] = {
    None: frozenset({None, *Parking}),
    **{place: frozenset({None, place}) for place in Parking},
}


def park(token: Any, to: Parking | None) -> None:
    """Move ``token`` to ``to``; a move :data:`TRANSITIONS` does not allow raises (a token
    parked in two places at once would be released twice, or by neither)."""
    current = token._parked
    if to not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"token {token.id}: parked {current.value if current else 'nowhere'} cannot move "
            f"to {to.value if to else 'nowhere'}; it must be released first"
        )
    token._parked = to
