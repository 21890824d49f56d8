"""The contracts between the coordinator and its lanes.

A lane owns workers; a worker owns a mailbox. The coordinator routes a token to the least-loaded
worker among those its weight may use (``Worker.load``/``Worker.push``), and the lane's worker,
once it takes the token, speaks to the coordinator only through :class:`LaneHost`: ``claim`` it
(deadline and cancellation checked atomically), ``begin`` a run (attempts, timings, timeout
timer), and ``complete`` it with a value or an exception. ``complete`` decides resolve, retry or
fail for every lane in one place.
"""

from __future__ import annotations

import _thread
import contextlib
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .._admission import AdmissionGate

__all__ = ["Lane", "LaneHost", "MailboxWorker", "Worker"]


class Worker(Protocol):
    """One worker of a lane: a thread, a process proxy, or a slot of the event loop."""

    index: int
    core: int
    name: str
    kind: str
    mailbox: deque[Any]
    current: Any

    def load(self) -> int:
        """Tokens queued plus running: what the router balances on."""
        ...

    def push(self, token: Any) -> None:
        """Append a token to the mailbox and wake the worker if it sleeps."""
        ...


class MailboxWorker:
    """What the thread lane's workers and the process lane's proxies share: the mailbox the
    router balances on, the lock the worker's thread sleeps on while its mailbox is empty, and
    that thread. Subclasses define ``_loop`` (the thread's body) and ``push``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mailbox: deque[Any] = deque()
        self.current: Any = None
        self.sleeping = False
        self.stopping = False
        self.closed = False
        self.completed = 0  # tokens taken from the mailbox: the convergence engine's throughput
        self._wake = _thread.allocate_lock()
        self._wake.acquire()
        self.thread = threading.Thread(target=self._loop, name=f"tokengate-{name}", daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def load(self) -> int:
        """Tokens waiting plus the one running: what the router balances on."""
        return len(self.mailbox) + (self.current is not None)

    def wake(self) -> None:
        """Let the worker's thread run if it sleeps on an empty mailbox."""
        self.sleeping = False
        # RuntimeError: already released by another producer; the worker will see that one.
        with contextlib.suppress(RuntimeError):
            self._wake.release()


class Lane(Protocol):
    """A set of workers started and stopped together."""

    name: str
    workers: list[Any]
    by_core: dict[int, list[Any]]

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> list[Any]:
        """Stop every worker; return those still busy at ``timeout``."""
        ...

    def queued(self) -> list[Any]:
        """A copy of every token sitting in a mailbox of this lane."""
        ...


class LaneHost(Protocol):
    """What the coordinator offers the lanes (implemented by ``OperationsCoordinator``)."""

    @property
    def gate(self) -> AdmissionGate:
        """Where producers wait for room; a worker may skip ``after_token`` while its
        ``unwoken`` count is 0 (nobody to wake), saving a call per token."""
        ...

    def claim(self, token: Any) -> bool:
        """Take a token out of a mailbox for running; False if discarded or taken elsewhere."""
        ...

    def begin(self, token: Any, worker: Any, *, arm_timeout: bool = True) -> int:
        """Record the start of a run; returns the run id ``complete`` must quote."""
        ...

    def complete(
        self,
        token: Any,
        run_id: int,
        value: Any,
        exc: BaseException | None,
        *,
        release_permit: bool = True,
    ) -> None:
        """End a run: resolve, retry or fail. ``release_permit=False`` when the body is still
        running (a thread past its timeout): the storage permit stays held until it returns."""
        ...

    def run(self, token: Any, worker: Any) -> bool:
        """``claim`` a token and run its body on the calling thread, then complete it; False
        if it was not runnable."""
        ...

    def after_token(self, worker: Any) -> None:
        """A worker finished a token: wake blocked producers if its mailbox has room."""
        ...

    def on_worker_thread(self, worker: Any) -> None:
        """Called first on every worker thread (thread-local set-up)."""
        ...

    def fail_internal(self, token: Any, exc: BaseException) -> None:
        """Fail a token whose run broke inside tokengate itself."""
        ...

    def count_event(self, name: str, n: int = 1) -> None:
        """Count a rare event (a restart, a swap) in the stats."""
        ...
