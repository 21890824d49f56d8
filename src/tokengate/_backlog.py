"""The waits every backend shares before a counted token may be queued.

A token may have to wait outside the mailboxes: for its operation's rate limit, for a storage
tier's permit, for the tokens among its arguments, or held back by its submitter. Each such
place is bounded the same way: once as many tokens wait there as the backend's mailboxes hold
(:meth:`Backlog.bound`), a producer from outside waits for room, while a call made from inside a
task never waits (it would block a worker or the timer thread). A producer's wait ends early,
its token discarded, when ``stop()`` gives up on pending work; and a token parked after the
workers closed is discarded at once, since nobody would ever release it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._parking import Parking, park

if TYPE_CHECKING:
    from ._admission import AdmissionGate
    from ._rate import RateLimiter
    from ._state import Lifecycle
    from ._throttle import StorageThrottle
    from ._token import Token

__all__ = ["Backlog"]


class Backlog:
    """The bounded waits outside the mailboxes (rate limit, tier permit, any other backlog)."""

    def __init__(
        self,
        gate: AdmissionGate,
        lifecycle: Lifecycle,
        rate: RateLimiter,
        throttle: StorageThrottle,
    ) -> None:
        self.gate = gate
        self.lifecycle = lifecycle
        self.rate = rate
        self.throttle = throttle
        # How many tokens may wait in one place before an outside producer waits: set by the
        # running backend (the local lanes: as many as their mailboxes hold).
        self.bound: Callable[[], int] = lambda: 1

    def wait_for_room(self, token: Token[Any], size: Callable[[], int]) -> bool:
        """Wait while ``size()`` (a backlog's length) is at the bound; False (``token``
        discarded) if stop() gave up on pending work meanwhile."""
        bound = self.bound()
        if size() < bound:
            return True
        life = self.lifecycle
        self.gate.wait_for(lambda: life.discarding or size() < bound or None)
        if life.discarding:
            token._discard("stopped")
            return False
        return True

    def park_outside(
        self, token: Token[Any], size: Callable[[], int], internal: bool, put: Callable[[], None]
    ) -> None:
        """``put`` ``token`` into a backlog of length ``size()`` once there is room (an outside
        producer waits); discarded instead if stop() gave up, or closed the workers."""
        if not internal and not self.wait_for_room(token, size):
            return
        put()
        if self.lifecycle.closed:
            token._discard("stopped")

    def hold_for_rate(
        self, token: Token[Any], internal: bool, proceed: Callable[[Token[Any]], None]
    ) -> bool:
        """True if ``token`` waits for its operation's rate (``proceed(token)`` is called when
        the bucket lets it go) or was discarded; False: go on now."""
        rate = self.rate
        if not internal and not token._rate_passed:
            name = token.spec.operation_type
            if not self.wait_for_room(token, lambda: rate.waiting(name)):
                return True
        if not rate.hold(token, proceed):
            return False
        if self.lifecycle.closed:  # no timer will release it any more
            token._discard("stopped")
        return True

    def acquire_tier(self, token: Token[Any], internal: bool) -> bool:
        """True if ``token`` holds its storage tier's permit now; False if it waits for one
        (whoever releases the next permit hands it on: ``Backend.granted``) or was discarded."""
        tier = token.spec.storage_speed
        assert tier is not None
        throttle = self.throttle
        if not internal and not self.wait_for_room(token, lambda: throttle.waiting(tier)):
            return False
        park(token, Parking.TIER)
        if throttle.try_acquire(tier, token):
            token._parked = None
            return True
        if self.lifecycle.closed:  # no permit will be released to it any more
            token._discard("stopped")
        return False
