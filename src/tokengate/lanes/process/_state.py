"""The states of a process worker slot and the one table of moves between them.

A slot (:class:`~tokengate.lanes.process.ProcessWorker`) is one core's place for a worker
process. Its proxy thread is the only writer of its state; other threads read it (routing skips
a slot that is not ``READY``) and ask for a stop or an abort through the slot's request flags,
which the proxy thread acts on. ::

    UNSTARTED ──its first token, or wait_ready()──> STARTING
    STARTING ──it says it is ready──────────> READY
    READY ──crash, timeout, retired, died idle──> STARTING   (a replacement is launched)
    STARTING ──the start failed─────────────> COOLING_DOWN ──cool-down over──> STARTING
    STARTING ──setup failure, 3 in a row────> BROKEN       (keeps trying; tokens handed over)
    BROKEN ──a start succeeds───────────────> READY
    BROKEN ──a failure that may pass────────> COOLING_DOWN
    any state ──the proxy thread ends───────> STOPPED      (final)
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Mapping

from ..._state import IllegalTransition

__all__ = ["TRANSITIONS", "IllegalTransition", "SlotState", "SlotStateMachine"]


class SlotState(enum.Enum):
    """Where a process worker slot is in the life of its worker process."""

    UNSTARTED = "unstarted"
    """No worker process yet: the first token routed to the slot, or ``wait_ready()``, starts
    one. A program that never runs a process-lane task never starts an interpreter for it."""
    STARTING = "starting"
    """No worker process ready: one is launching, saying it is ready, or due to be launched."""
    READY = "ready"
    """A worker process is ready: idle, or running one call."""
    COOLING_DOWN = "cooling_down"
    """The last start failed; the next waits out :func:`restart_delay`."""
    BROKEN = "broken"
    """Setup failures in a row (retrying alone will not fix them): tokens that reach the slot go
    to a live sibling or fail at once, while the slot keeps trying to start."""
    STOPPED = "stopped"
    """The proxy thread ended; final."""


_S = SlotState

#: Every allowed move, and only these. A move not listed is a bug in the slot's code.
TRANSITIONS: Mapping[SlotState, frozenset[SlotState]] = {
    _S.UNSTARTED: frozenset({_S.STARTING, _S.STOPPED}),
    _S.STARTING: frozenset({_S.READY, _S.COOLING_DOWN, _S.BROKEN, _S.STOPPED}),
    _S.READY: frozenset({_S.STARTING, _S.STOPPED}),
    _S.COOLING_DOWN: frozenset({_S.STARTING, _S.STOPPED}),
    _S.BROKEN: frozenset({_S.READY, _S.COOLING_DOWN, _S.STOPPED}),
    _S.STOPPED: frozenset(),
}


class SlotStateMachine:
    """One slot's state: read freely, changed only through :meth:`move`, which refuses a move
    the table does not allow (naming both states and the allowed ones) and keeps ``ready`` (an
    event others wait on) set exactly while the state is ``READY`` or ``BROKEN``."""

    __slots__ = ("name", "ready", "state")

    def __init__(self, name: str, state: SlotState = SlotState.UNSTARTED) -> None:
        self.name = name
        self.state = state
        self.ready = threading.Event()  # set while a worker is ready, or the slot is broken
        if state in (SlotState.READY, SlotState.BROKEN):
            self.ready.set()

    def move(self, to: SlotState) -> None:
        """Change the state to ``to``; :class:`IllegalTransition` if the table forbids it."""
        here = self.state
        allowed = TRANSITIONS[here]
        if to not in allowed:
            names = ", ".join(sorted(s.name for s in allowed)) or "none: it is final"
            raise IllegalTransition(
                f"process worker slot {self.name}: cannot move from {here.name} to {to.name} "
                f"(allowed from {here.name}: {names})"
            )
        self.state = to
        if to in (SlotState.READY, SlotState.BROKEN):
            self.ready.set()
        elif to is not SlotState.STOPPED:
            self.ready.clear()
