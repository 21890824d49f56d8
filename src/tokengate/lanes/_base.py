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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .._admission import AdmissionGate

__all__ = ["BeginFn", "ClaimFn", "CompleteFn", "Lane", "LaneHost", "MailboxWorker", "Worker"]


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


class ClaimFn(Protocol):
    def __call__(self, token: Any, /) -> bool: ...


class BeginFn(Protocol):
    def __call__(self, token: Any, worker: Any, /, *, arm_timeout: bool = True) -> int: ...


class CompleteFn(Protocol):
    def __call__(
        self,
        token: Any,
        run_id: int,
        value: Any,
        exc: BaseException | None,
        /,
        *,
        release_permit: bool = True,
    ) -> None: ...


class LaneHost(Protocol):
    """What the coordinator offers the lanes: a small object the coordinator builds at start
    whose attributes are its own bound methods, so a lane pays no extra call per token and
    never reaches into the coordinator's private attributes.

    ``gate``: where producers wait for room; a worker may skip ``after_token`` while its
    ``unwoken`` count is 0 (nobody to wake), saving a call per token.
    ``claim(token)``: take a token out of a mailbox for running; False if discarded (past its
    deadline, cancelled) or taken elsewhere.
    ``begin(token, worker, *, arm_timeout=True)``: record the start of a run; returns the run
    id ``complete`` must quote.
    ``complete(token, run_id, value, exc, *, release_permit=True)``: end a run: resolve, retry
    or fail. ``release_permit=False`` when the body is still running (a thread past its
    timeout): the storage permit stays held until it returns.
    ``run(token, worker)``: ``claim`` a token and run its body on the calling thread, then
    complete it; False if it was not runnable.
    ``after_token(worker)``: a worker finished a token: wake blocked producers if its mailbox
    has room.
    ``on_worker_thread(worker)``: called first on every worker thread (thread-local set-up).
    ``fail_internal(token, exc)``: fail a token whose run broke inside tokengate itself.
    ``count_event(name, n=1)``: count a rare event (a restart, a swap) in the stats.
    """

    @property
    def gate(self) -> AdmissionGate: ...
    @property
    def claim(self) -> ClaimFn: ...
    @property
    def begin(self) -> BeginFn: ...
    @property
    def complete(self) -> CompleteFn: ...
    @property
    def run(self) -> Callable[[Any, Any], bool]: ...
    @property
    def after_token(self) -> Callable[[Any], None]: ...
    @property
    def on_worker_thread(self) -> Callable[[Any], None]: ...
    @property
    def fail_internal(self) -> Callable[[Any, BaseException], None]: ...
    @property
    def count_event(self) -> Callable[..., None]: ...
