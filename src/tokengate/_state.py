"""The coordinator's lifecycle as one state machine, with every allowed move written down here.

A coordinator is one of::

    NEW ──start──> STARTING ──> RUNNING ──stop──> DRAINING ──give up──> DISCARDING
                      │                              │                          │
                      │ (the backend fails to start) └──────────> CLOSING <─────┘
                      └──────────────────────────────────────────>  │
                                                               STOPPED ──start──> STARTING
    STARTING, RUNNING, DRAINING, DISCARDING, CLOSING ──fork()──> FORKED (in the child, for good)

* ``STARTING``: the backend is starting its workers (or connecting); no call is taken yet.

* ``RUNNING``: takes calls from anyone.
* ``DRAINING``: ``stop()`` began; only calls made from inside its own tasks are taken, and every
  token already submitted runs to its end (retries included).
* ``DISCARDING``: ``stop()`` gave up on what has not started (``cancel_pending``, or the drain
  timed out): producers waiting for room give up, and a failing task is not retried.
* ``CLOSING``: the workers are being stopped; a token routed, parked or queued from now on is
  discarded, since no worker would ever run it.
* ``FORKED``: in a child forked while it ran; its workers exist only in the parent, so every call
  is refused with the reason and the fix (``_lifecycle.py``).

The hot path asks four questions many times a second (may an outside caller submit? is a drain
waiting? has stop() given up? are the workers gone?). :class:`Lifecycle` answers them with plain
boolean attributes, set from :data:`FLAGS` on every move, so a question costs one attribute read
and the answers can never disagree with the state.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping

from ._errors import TokenGateError

__all__ = ["FLAGS", "TRANSITIONS", "CoordinatorState", "IllegalTransition", "Lifecycle"]


class CoordinatorState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    DISCARDING = "discarding"
    CLOSING = "closing"
    STOPPED = "stopped"
    FORKED = "forked"


S = CoordinatorState

#: Every allowed move; any other is refused by :meth:`Lifecycle.move`.
TRANSITIONS: Mapping[CoordinatorState, frozenset[CoordinatorState]] = {
    S.NEW: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.STOPPED, S.FORKED}),
    S.RUNNING: frozenset({S.DRAINING, S.FORKED}),
    S.DRAINING: frozenset({S.DISCARDING, S.CLOSING, S.FORKED}),
    S.DISCARDING: frozenset({S.CLOSING, S.FORKED}),
    S.CLOSING: frozenset({S.STOPPED, S.FORKED}),
    S.STOPPED: frozenset({S.STARTING}),
    S.FORKED: frozenset(),
}

#: Per state: (accepting, draining, discarding, closed), the hot path's four questions.
FLAGS: Mapping[CoordinatorState, tuple[bool, bool, bool, bool]] = {
    S.NEW: (False, False, False, False),
    S.STARTING: (False, False, False, False),
    S.RUNNING: (True, False, False, False),
    S.DRAINING: (False, True, False, False),
    S.DISCARDING: (False, True, True, False),
    S.CLOSING: (False, True, True, True),
    S.STOPPED: (False, False, True, True),
    S.FORKED: (False, False, True, True),
}


def _names(states: frozenset[CoordinatorState]) -> str:
    return ", ".join(sorted(s.value for s in states)) or "nothing"


class IllegalTransition(TokenGateError):
    """A lifecycle move :data:`TRANSITIONS` does not allow (a bug in tokengate, not in user
    code: the public methods check the state before they move)."""


class Lifecycle:
    """The current :class:`CoordinatorState` and the four answers derived from it.

    ``accepting``: calls from outside its own tasks are taken. ``draining``: ``stop()`` waits for
    in-flight tokens, so each end must wake it. ``discarding``: ``stop()`` gave up on what has
    not started. ``closed``: no worker will run anything queued from now on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = S.NEW
        self.accepting, self.draining, self.discarding, self.closed = FLAGS[S.NEW]

    def move(
        self, to: CoordinatorState, *, allowed_from: frozenset[CoordinatorState] | None = None
    ) -> CoordinatorState:
        """Move to ``to`` and return the state left. With ``allowed_from``, a state outside it
        refuses quietly (returns it, nothing moves): for the public methods, for which being in
        another state is not an error (``stop()`` twice). Otherwise an illegal move raises."""
        with self._lock:
            current = self.state
            if allowed_from is not None and current not in allowed_from:
                return current
            if to not in TRANSITIONS[current]:
                raise IllegalTransition(
                    f"coordinator lifecycle: {current.value} -> {to.value} is not allowed "
                    f"(from {current.value}: {_names(TRANSITIONS[current])})"
                )
            self._set(to)
            return current

    def forked(self) -> None:
        """In a forked child: FORKED without taking the lock (a parent thread may have held it
        at fork(), and only the forking thread exists here)."""
        if S.FORKED in TRANSITIONS[self.state]:
            self._set(S.FORKED)
        self._lock = threading.Lock()

    def _set(self, to: CoordinatorState) -> None:
        self.state = to
        self.accepting, self.draining, self.discarding, self.closed = FLAGS[to]

    @property
    def status(self) -> str:
        """The state in a word for messages: new, starting, running, stopping, stopped or
        forked (the three stopping states read alike to a user)."""
        state = self.state
        if state in (S.DRAINING, S.DISCARDING, S.CLOSING):
            return "stopping"
        return str(state.value)

    def __repr__(self) -> str:
        return f"<Lifecycle {self.state.value}>"
