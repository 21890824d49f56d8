"""Helping waits: a worker thread that waits on a token keeps the lanes moving instead of
blocking, so nested tasks never deadlock whatever the worker count.

If the awaited token has not started, the worker runs it itself (claiming is atomic, so the
worker whose mailbox also holds it simply skips it later). If it cannot run it here (it runs
elsewhere, waits for a storage permit or a retry's back-off, or belongs to another lane), the
worker runs tokens from its own mailbox meanwhile, and sleeps only when that is empty, woken by
whichever comes first: a new token or the end of the awaited one. So whatever the awaited token
depends on can never be stuck behind the waiting worker. On the event loop a blocking wait is
refused instead: it would stop every async task.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _runtime
from .._errors import TokenGateError
from .._parking import Parking
from .._token import PENDING

if TYPE_CHECKING:
    from .._dependencies import DependencyTracker
    from .._token import Token
    from ..lanes._base import Worker

__all__ = ["Helper"]

_THREADED = frozenset(("thread", "io"))  # lanes whose workers are plain threads
_perf = time.perf_counter


class Helper:
    """Runs the helping wait of one coordinator's local lanes."""

    def __init__(
        self,
        owner: object,
        deps: DependencyTracker,
        lane_for: Callable[[Any], str],
        run: Callable[[Token[Any], Worker], bool],
    ) -> None:
        self.owner = owner  # the coordinator whose worker threads may help
        self.deps = deps
        self.lane_for = lane_for
        self.run = run

    def help(self, token: Token[Any], end: float | None) -> None:
        """Help until ``token`` ends or ``end`` (a ``time.monotonic()`` instant) passes."""
        local = _runtime.local
        worker = local.worker
        if worker is not None and worker.kind == "async":  # never block the event loop
            refuse_blocking_wait(token)
        if (
            worker is None
            or local.coordinator is not self.owner
            or worker.kind not in _THREADED  # I/O workers help as thread workers do
            or token._state != PENDING  # a running token: nothing to run in its place
        ):
            return
        while not token.done():
            if end is not None and time.monotonic() >= end:
                return  # the caller's timeout: its _wait raises TimeoutError
            parked = token._parked
            if parked is None and token._state == PENDING:
                deadline = token._deadline_at
                if deadline is not None and _perf() > deadline:
                    token._discard("deadline")
                    return
                if self._can_run_here(token, worker) and self.run(token, worker):
                    continue  # a run that ended in a retry leaves the token still pending
            elif parked is Parking.DEPS:
                pending = self.deps.unfinished(token)
                if pending:
                    # Helps (recursively) or waits for the dependency, then the loop re-checks
                    # the token. _wait, not exception(): waiting is not retrieving its error.
                    with contextlib.suppress(BaseException):
                        pending[0]._wait(None)
                    continue
            self._run_own_or_sleep(worker, token, end)

    def _run_own_or_sleep(self, worker: Any, token: Token[Any], end: float | None) -> None:
        """Run one token of ``worker``'s own mailbox, or sleep until there is one or ``token``
        has ended (the worker's wake lock doubles as a sleeper on the token)."""
        mailbox = worker.mailbox
        try:
            other = mailbox.popleft()
        except IndexError:
            wake = worker._wake
            if not token._add_sleeper(wake):
                return  # ended meanwhile
            worker.sleeping = True
            if mailbox or token.done() or worker.stopping:
                worker.sleeping = False
                return
            if end is None:
                wake.acquire()
            else:
                wake.acquire(True, max(0.0, end - time.monotonic()))
            return
        self.run(other, worker)

    def _can_run_here(self, token: Token[Any], worker: Worker) -> bool:
        """Same lane, or both plain threads (a thread worker waiting on a storage-tier token,
        or the reverse, helps too)."""
        lane = self.lane_for(token.spec)
        return lane == worker.kind or (lane in _THREADED and worker.kind in _THREADED)


def refuse_blocking_wait(token: Token[Any]) -> None:
    if token.done():
        return
    raise TokenGateError(
        f"token {token.id} ({token.operation_type}) was waited on with get()/result() on "
        f"the coordinator's event loop, which would block every async task (and deadlock "
        f"if the token needs the loop). In an async task write `await token` instead."
    )
