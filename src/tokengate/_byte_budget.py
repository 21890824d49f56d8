"""ByteBudget: a bound on the bytes that queued process-lane calls hold.

A process-lane call is pickled when it is made, on the caller's thread, so that an unpicklable
argument raises from the call (a documented promise) and the bytes sent are the arguments as
they were at the call. Each queued call therefore holds its own pickled copy of its arguments
until its worker process takes it. The token count (``mailbox_max``) bounds how many calls
queue, not how much memory they hold: 3,000 calls sharing one 1 MB argument held 3,000 copies,
about 900 MB, where ``ProcessPoolExecutor`` (which keeps references and pickles a few calls at a
time) stayed near 20 MB. This budget bounds the bytes as well::

    call ──pickle──> charge ──> mailbox ... proxy thread ──send──> worker process
                       │                                   │
                       └─ over budget: the producer waits  └─ release (also on discard,
                          at the AdmissionGate                 or a failure before sending)

* **Charge** when the call is made, before it is queued: a call fits if nothing is held, or if
  what is held plus its size stays within the limit. So a call larger than the whole budget is
  let in alone once the queue has drained, and nothing can wait for ever. An external producer
  whose call does not fit waits at the admission gate (``admission='block'``, asyncio
  producers included) or is refused (``'reject'``); calls made by tasks, and retries, never wait
  (they are charged anyway, as they may overflow the soft mailbox bound).
* **Release** when the call is written to its worker process, or when the token ends without
  that (cancelled, discarded, failed before it was sent). A call holds its charge at most once
  (``ProcessCall.held``), so the releases of racing paths never count twice, and the total
  returns to 0 whenever no call waits. A retried call is charged again while it waits.
* Only the arguments are counted: the pickled function is made once per task and shared.
* A call held back by its submitter (an executor's ``max_workers``) is not pickled until it is
  let go, and is charged from then on: held calls keep references, not pickled copies.

Pickling later (at hand-off, as ``ProcessPoolExecutor`` does) was the alternative; it would
have to pickle every call twice to keep the promise that an unpicklable argument raises from the
call, and a mutation made after the call would change what runs. Zero-copy transfer of large
arguments is a separate matter; whatever it keeps for queued calls should be charged here.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple

from .observability._options import format_bytes

if TYPE_CHECKING:
    from ._admission import AdmissionGate
    from .lanes._wire import ProcessCall

__all__ = ["ByteBudget", "ByteReading"]


class ByteReading(NamedTuple):
    """The bytes held by queued process-lane calls now, and the most ever held at once."""

    current: int
    high_water: int


class ByteBudget:
    """Counts the pickled bytes of queued process-lane calls against ``limit`` (None: no bound,
    only counted)."""

    def __init__(self, limit: int | None, gate: AdmissionGate) -> None:
        self.limit = limit
        self._gate = gate
        self._lock = threading.Lock()
        self.current = 0
        self.high_water = 0

    def try_charge(self, call: ProcessCall) -> bool:
        """Charge ``call`` if it fits (or already holds its charge); False if it must wait."""
        size = call.size()
        with self._lock:
            if call.held or not size:
                return True
            limit = self.limit
            if limit is not None and self.current and self.current + size > limit:
                return False
            self._add(call, size)
            return True

    def force(self, call: ProcessCall) -> None:
        """Charge ``call`` even over the limit (internal calls and retries never wait)."""
        size = call.size()
        with self._lock:
            if not call.held and size:
                self._add(call, size)

    def _add(self, call: ProcessCall, size: int) -> None:
        call.held = size
        self.current += size
        self.high_water = max(self.high_water, self.current)

    def release(self, call: ProcessCall) -> None:
        """Give back what ``call`` holds (nothing if it holds nothing) and wake the producers
        waiting for room (the gate's register-then-re-check order loses no wake-up)."""
        if not call.held:  # the common case, unlocked: only the thread that charged sets it
            return
        with self._lock:
            size = call.held
            if not size:
                return
            call.held = 0
            self.current -= size
        gate = self._gate
        if gate.unwoken:
            gate.notify()

    def reading(self) -> ByteReading:
        return ByteReading(self.current, self.high_water)

    def refusal(self, operation_type: str, size: int) -> str:
        """Why a call was refused with ``admission='reject'`` (for ``Overloaded``)."""
        return (
            f"queued process-lane calls already hold {format_bytes(self.current)} of pickled "
            f"arguments (process_queue_bytes={self.limit}); {operation_type!r} "
            f"({format_bytes(size)}) was refused. Slow the producer, raise process_queue_bytes, "
            f"or use admission='block'"
        )
