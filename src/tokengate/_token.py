"""Token: the handle a decorated call returns at once.

A Token *is* a ``concurrent.futures.Future``, so ``wait``, ``as_completed`` and
``asyncio.wrap_future`` work on it unchanged, and it is awaitable. What it adds:

* the Quick-Proof's identity (``fibonacci_1773231605448885800``), attempts, timings and where
  it ran;
* ``get(timeout)``, the Quick-Proof's spelling of ``result``, which validates its timeout;
* exactly-once terminal transitions. ``_finish`` and ``_discard`` change state and record the
  outcome in the statistics while holding the token's own condition, *before* waking anyone, so
  a caller woken by ``get()`` always sees counts that include its token. The bookkeeping hooks
  are passed in by the coordinator; the token knows nothing of lanes or stats;
* help while waiting: a worker thread that waits on a token which has not started yet runs it
  itself (see ``OperationsCoordinator._help``), so nested tasks never deadlock;
* loud failures: a failed token whose error nobody retrieved logs it once, at WARNING with the
  traceback, when it is garbage-collected (see ``_unretrieved.py``);
* no inputs kept alive: ``args`` and ``kwargs`` are the call's until the token ends (its
  middleware hooks still see them), then ``()`` and ``{}``, so a list of finished tokens kept
  for their results does not hold every array (or bound method's object) they were given, as
  a stdlib future never did.
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import logging
import math
import sys
import threading
import time
import types
from collections.abc import Callable, Generator
from concurrent.futures import Future
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar

from ._errors import TokenDiscarded, TokenGateError
from ._parking import Parking
from ._unretrieved import Unretrieved

if TYPE_CHECKING:
    import asyncio

    from ._spec import TaskSpec

__all__ = [
    "NO_KWARGS",
    "PENDING",
    "Place",
    "Token",
    "TokenOwner",
    "check_timeout",
    "in_done_callback",
    "next_seq",
]

T = TypeVar("T")
_TERMINAL = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_HELPABLE = frozenset((PENDING, RUNNING))
_ID_BASE = time.time_ns()
# One sequence per process, so ids stay unique across coordinators.
next_seq = itertools.count(1).__next__
_RLock = threading.RLock
# State changes of token k take stripe k % 64 (see Token): no lock object per token.
_STRIPE_MASK = 63
_STRIPES = tuple(_thread.allocate_lock() for _ in range(_STRIPE_MASK + 1))


def renew_stripes() -> None:
    """In a forked child: a parent thread may have held a stripe at the fork, and it would stay
    held for ever; tokens made in the child get fresh ones (see _lifecycle.py)."""
    global _STRIPES
    _STRIPES = tuple(_thread.allocate_lock() for _ in range(_STRIPE_MASK + 1))


_allocate_lock = _thread.allocate_lock
_monotonic = time.monotonic
_TIMEOUT_MAX = threading.TIMEOUT_MAX
NO_KWARGS: dict[str, Any] = {}
"""The ``kwargs`` of every token called without keyword arguments: shared, never mutated."""


class Place(NamedTuple):
    """Where a run happened when no local worker ran it (a Dask worker, a call made inside a
    process-lane worker): what :attr:`Token.core`, ``worker`` and ``lane`` read. Local workers
    have the same three attributes and are recorded themselves."""

    core: int | None
    name: str | None
    kind: str


callback_log = logging.getLogger("tokengate.callbacks")


class TokenOwner(Protocol):
    """What a token asks of the coordinator that made it (its ``Completion``, in practice)."""

    def help(self, token: Token[Any], end: float | None, /) -> None:
        """A thread is about to wait for ``token`` (until ``end``, a monotonic instant):
        it may run work meanwhile, so that nested waits never deadlock."""

    def on_discarded(self, token: Token[Any], /) -> None:
        """``token`` was just discarded: count it (called under the token's lock)."""

    def after_discard(self, token: Token[Any], /) -> None:
        """After a discard, before its callbacks: give back what the token held."""


Ended = Callable[["Token[Any]", "BaseException | None"], None]


def check_timeout(timeout: object) -> float | None:
    """Validate a user timeout: ``None`` or a finite number of seconds >= 0."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(
            f"timeout must be a number of seconds or None, got {type(timeout).__name__} {timeout!r}"
        )
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    if timeout > threading.TIMEOUT_MAX:  # inf and beyond what a lock can wait: wait forever
        return None
    return float(timeout)


class Token(Future[T], Generic[T]):
    """The handle of one submitted task; a ``concurrent.futures.Future`` with more to say.

    Built lean on purpose: a stdlib ``Future`` allocates a ``Condition`` (with five bound
    methods and a deque) and two lists, about ten objects the cyclic garbage collector must
    traverse for as long as the future lives, and with 100,000 futures alive collection time
    dominated the whole run. A Token is one object: its fields are ``__slots__``, its state
    changes take one of 64 shared stripe locks, its waiter and callback lists are made only
    when someone asks, and it wakes its own waiters in :meth:`result`.

    The stdlib helpers ``wait``/``as_completed`` lock futures through ``_condition``; for them a
    per-token ``RLock`` is made on first access. From then on a state change holds the stripe
    *and* that lock. It only ever *tries* the token lock while holding the stripe (and backs off
    to wait for it holding nothing), while ``_condition`` takes a stripe holding nothing of ours,
    so the two orders can never deadlock. ``set_result``/``set_exception`` belong to the
    coordinator.
    """

    # Rarely set fields live in class-level defaults: an instance writes them (into its
    # ``__dict__``) only on the paths that need them, so the common token never pays for them.
    _w: list[Any] | None = None  # stdlib waiters (wait / as_completed)
    _cb: list[Callable[[Future[Any]], object]] | None = None  # done-callbacks
    _sleepers: list[Any] | None = None  # locks released when the token ends
    _parked: Parking | None = None  # where it waits while not runnable (_parking.py)
    _holds_permit: bool = False
    _discard_reason: str | None = None
    _deadline_at: float | None = None
    _retry_count: int = 0
    _timer: Any = None
    _payload: Any = None  # process lane: the call, pickled at submit (lanes/_wire.py)
    _priority: int | None = None  # a per-call priority (fn.options); None: the spec's
    _locality: Any = None  # a per-call locality key (fn.options): its worker is anchored
    _rate_passed: bool = False  # released by the RateLimiter: admitted once without a permit
    # Also class-level, to keep the token small (every slot is visited by each garbage
    # collection, and B1 keeps 100,000 tokens alive): the stdlib-facing lock (made only if a
    # helper asks), the error (only failed tokens have one) and keyword arguments (most calls
    # have none; the shared empty dict is never mutated).
    _cond: Any = None
    _exception: BaseException | None = None
    _watched: Any = None  # (counters, run time) of a run the Guard House must see
    # Failed tokens only: logs the error if nobody retrieves it (see _unretrieved.py). A user's
    # done-callback sets _observed, so a token failing after one was added gets none.
    _unretrieved: Unretrieved | None = None
    _observed: bool = False
    kwargs: dict[str, Any] = NO_KWARGS

    __slots__ = (
        "_owner",
        "_ran_on",
        "_result",
        "_run_id",
        "_state",
        "args",
        "attempts",
        "finished_at",
        "fn",
        "seq",
        "spec",
        "started_at",
        "submitted_at",
    )

    def __init__(
        self,
        spec: TaskSpec,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        seq: int,
        submitted_at: float,
        owner: TokenOwner,
    ) -> None:
        # Future.__init__ is deliberately not called: see the class docstring.
        self._state = PENDING
        self._result = None
        self.spec = spec
        self.fn = fn
        self.args = args
        if kwargs:
            self.kwargs = kwargs
        self.seq = seq
        self.submitted_at = submitted_at
        self._owner = owner
        self.attempts = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._ran_on: Any = None  # the worker (or Place) of the latest run: core, worker, lane
        self._run_id = 0

    # -- locking --------------------------------------------------------------------------
    @property
    def _condition(self) -> Any:  # type: ignore[override]
        """The per-token lock the stdlib helpers use, made on first access."""
        cond = self._cond
        if cond is None:
            stripe = _STRIPES[self.seq & _STRIPE_MASK]
            with stripe:
                cond = self._cond
                if cond is None:
                    cond = self._cond = _RLock()
        return cond

    def _lock(self) -> Any:
        """Hold this token's stripe (and its stdlib lock if it has one); see the class doc."""
        stripe = _STRIPES[self.seq & _STRIPE_MASK]
        while True:
            stripe.acquire()
            cond = self._cond
            if cond is None or cond.acquire(False):
                return cond
            stripe.release()
            cond.acquire()  # a stdlib helper holds it: wait holding nothing, then retry
            cond.release()

    def _unlock(self, cond: Any) -> None:
        if cond is not None:
            cond.release()
        _STRIPES[self.seq & _STRIPE_MASK].release()

    # Lists the stdlib helpers append to, created on first use.
    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        w = self._w
        if w is None:
            w = self._w = []
        return w

    @property
    def _done_callbacks(self) -> list[Callable[[Future[T]], object]]:
        cb = self._cb
        if cb is None:
            cb = self._cb = []
        return cb

    # -- where it ran -----------------------------------------------------------------------
    @property
    def core(self) -> int | None:
        """The core of the latest run (None before it ran, or where cores do not apply)."""
        where = self._ran_on
        return None if where is None else where.core

    @property
    def worker(self) -> str | None:
        """The name of the worker of the latest run, e.g. ``worker_4_core_2``."""
        where = self._ran_on
        return None if where is None else where.name

    @property
    def lane(self) -> str | None:
        """The lane of the latest run: ``thread``, ``process``, ``io``, ``async``, ``dask``…"""
        where = self._ran_on
        return None if where is None else where.kind

    # -- identity ---------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """The Quick-Proof's id, ``<operation_type>_<nanosecond-style number>``, unique in its
        process."""
        return f"{self.spec.operation_type}_{_ID_BASE + self.seq}"

    @property
    def operation_type(self) -> str:
        return self.spec.operation_type

    @property
    def weight(self) -> str:
        return self.spec.weight

    @property
    def state(self) -> str:
        """``pending``, ``running``, ``resolved``, ``failed`` or ``discarded``."""
        state = self._state
        if state == FINISHED:
            return "failed" if self._exception is not None else "resolved"
        if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            return "discarded"
        return "running" if state == RUNNING else "pending"

    @property
    def discard_reason(self) -> str | None:
        """Why the token was discarded (``cancelled``, ``deadline``, ``stopped``…), else None."""
        return self._discard_reason

    def __repr__(self) -> str:
        return f"<Token {self.id} {self.state} attempts={self.attempts}>"

    def done(self) -> bool:
        return self._state in _TERMINAL

    def cancelled(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    # -- waiting ----------------------------------------------------------------------------
    def _wait(self, timeout: float | None) -> None:
        """Block until terminal or ``timeout``; raises ``TimeoutError`` on timeout."""
        if self._state in _HELPABLE:  # RUNNING too, so the event loop never blocks
            end = None if timeout is None else _monotonic() + timeout
            self._owner.help(self, end)
            if end is not None:
                timeout = max(0.0, end - _monotonic())
        if self._state in _TERMINAL:
            return
        sleeper = _allocate_lock()
        sleeper.acquire()
        if not self._add_sleeper(sleeper):
            return
        if sleeper.acquire(True, -1 if timeout is None else timeout):
            return
        cond = self._lock()
        try:
            if self._state in _TERMINAL:
                return
            if self._sleepers is not None and sleeper in self._sleepers:
                self._sleepers.remove(sleeper)
        finally:
            self._unlock(cond)
        raise TimeoutError(f"token {self.id} did not finish within {timeout}s")

    def result(self, timeout: float | None = None) -> T:
        """The task's value, waiting up to ``timeout`` seconds; re-raises the task's error.

        ``get`` is the same method under the Quick-Proof's name.
        """
        if timeout is not None:
            kind = type(timeout)  # a plain, in-range number passes without check_timeout's call
            if (kind is not float and kind is not int) or not 0 <= timeout <= _TIMEOUT_MAX:
                timeout = check_timeout(timeout)
        if self._state != FINISHED:
            self._wait(timeout)
            if self._state != FINISHED:
                raise self._discarded_error()
        exc = self._exception
        if exc is None:
            return self._result  # type: ignore[return-value]
        self._retrieved()
        try:
            raise exc
        finally:
            exc = None

    get = result  # the Quick-Proof's name; an alias, not a wrapper: one call less per result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if timeout is not None:
            timeout = check_timeout(timeout)
        if self._state != FINISHED:
            self._wait(timeout)
            if self._state != FINISHED:
                raise self._discarded_error()
        if self._unretrieved is not None:
            self._retrieved()
        return self._exception

    def _retrieved(self) -> None:
        """The error reached someone: nothing to log when the token goes."""
        self._observed = True
        reporter = self._unretrieved
        if reporter is not None:
            reporter.error = None
            self._unretrieved = None

    def _add_sleeper(self, lock: Any) -> bool:
        """Have ``lock`` released when the token ends; False if it already has."""
        cond = self._lock()
        try:
            if self._state in _TERMINAL:
                return False
            if self._sleepers is None:
                self._sleepers = []
            self._sleepers.append(lock)
            return True
        finally:
            self._unlock(cond)

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        """Call ``fn(token)`` when the token ends (at once if it has); errors are logged.

        The callback is handed the token, so a failure is its to report: a token with a
        done-callback never logs its error as unretrieved.
        """
        self._add_callback(fn, observe=True)

    def _add_callback(self, fn: Callable[[Future[T]], object], *, observe: bool = False) -> None:
        """``add_done_callback`` for tokengate's own bookkeeping: by default it does not count
        as retrieving the error (see ``_unretrieved.py``)."""
        cond = self._lock()
        try:
            if observe:
                self._retrieved()
            if self._state not in _TERMINAL:
                if self._cb is None:
                    self._cb = []
                self._cb.append(fn)
                return
        finally:
            self._unlock(cond)
        try:
            fn(self)
        except Exception:
            callback_log.exception("done-callback %r of token %s raised", fn, self.id)

    def _discarded_error(self) -> TokenDiscarded:
        reason = self._discard_reason or "cancelled"
        return TokenDiscarded(f"token {self.id} was discarded before it ran ({reason})", reason)

    def __await__(self) -> Generator[Any, None, T]:
        # Not asyncio.wrap_future, which turns a discarded token into the awaiting
        # task's own CancelledError; this re-raises TokenDiscarded or the task's error as is.
        return _await_token(self).__await__()

    def set_result(self, result: object) -> None:
        raise TokenGateError(
            f"token {self.id} is completed by its coordinator; set_result() is not for tokens"
        )

    def set_exception(self, exception: BaseException | None) -> None:
        raise TokenGateError(
            f"token {self.id} is completed by its coordinator; set_exception() is not for tokens"
        )

    def _invoke_callbacks(self) -> None:
        """Run every done-callback; one that raises is logged and the others still run.

        ``SystemExit``/``KeyboardInterrupt`` are caught too: raised on a worker thread they
        silently ended the worker (its mailbox with it) and skipped the callbacks after it,
        among them the one that releases dependents. On the main thread, where a real Ctrl-C
        lands, the first of them is raised again once every callback has run.
        """
        callbacks = self._cb
        if not callbacks:
            return
        escaped: BaseException | None = None
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                callback_log.exception("done-callback %r of token %s raised", callback, self.id)
            except BaseException as exc:
                callback_log.exception("done-callback %r of token %s raised", callback, self.id)
                if escaped is None:
                    escaped = exc
        if escaped is not None and threading.current_thread() is threading.main_thread():
            raise escaped

    def _wake_all(self, kind: str) -> None:
        """Tell stdlib waiters and our sleepers; call with the token locked."""
        waiters = self._w
        if waiters:
            for waiter in waiters:
                getattr(waiter, kind)(self)
        sleepers = self._sleepers
        if sleepers:
            self._sleepers = None
            for sleeper in sleepers:
                # A worker's wake lock may already be released (a new token woke it first).
                with contextlib.suppress(RuntimeError):
                    sleeper.release()

    # -- terminal transitions (called by the coordinator only) --------------------------------
    def _let_go(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Take the call's arguments off a token that has ended, and return them.

        An ended token never runs again, and a caller who keeps the token for its result must
        not keep its inputs alive with it (a stdlib future never held them): a list of
        finished tokens over large arrays would hold every array. (``fn`` stays: it is the
        decorated function's, alive as long as the decorator; a plain callable passed to
        ``coordinator.submit`` travels among the arguments.) The caller drops what this
        returns *after* releasing the token's lock, since dropping the last reference runs
        the objects' finalizers, which may touch tokens. The arguments go before anyone is
        woken, so a woken waiter sees the token without them.
        """
        held = self.args, self.kwargs
        self.args = ()
        if held[1] is not NO_KWARGS:
            del self.kwargs  # back to the class's shared empty dict
        return held

    def cancel(self) -> bool:
        """Discard the token if it has not started; True if it is (now) discarded."""
        return self._discard("cancelled")

    def _discard(self, reason: str, *, running: bool = False) -> bool:
        """Discard the token if it has not started (``running=True``: or if it is running, for
        a run its lane has already ended, e.g. a worker process the operator killed)."""
        cond = self._lock()
        try:
            state = self._state
            if state == FINISHED or (state == RUNNING and not running):
                return False
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED_AND_NOTIFIED
            self._discard_reason = reason
            self._owner.on_discarded(self)
            held = self._let_go()
            self._wake_all("add_cancelled")
        finally:
            self._unlock(cond)
        del held  # the arguments' finalizers may run here, with no lock of ours held
        # What the token held (queued bytes, a storage permit, a held slot) goes back before
        # any user callback runs: a callback that submits may need exactly that room.
        self._owner.after_discard(self)
        self._invoke_callbacks()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        return self._try_claim()

    def _try_claim(self) -> bool:
        """PENDING -> RUNNING, atomically; False if discarded or claimed by someone else."""
        # Hot path, once per run: with no stdlib lock on the token (the common case) the
        # stripe alone guards the change, taken inline rather than through _lock/_unlock.
        stripe = _STRIPES[self.seq & _STRIPE_MASK]
        stripe.acquire()
        if self._cond is None:
            claimed = self._state == PENDING
            if claimed:
                self._state = RUNNING
                self._run_id += 1
            stripe.release()
            return claimed
        stripe.release()
        cond = self._lock()
        try:
            if self._state != PENDING:
                return False
            self._state = RUNNING
            self._run_id += 1
            return True
        finally:
            self._unlock(cond)

    def _finish(
        self,
        result: Any,
        exception: BaseException | None,
        record: Callable[[Token[Any], BaseException | None], bool | None],
        run_id: int | None = None,
        ended: Ended | None = None,
    ) -> bool:
        """Make the token terminal exactly once; False if it already was (a late result).

        ``record`` (the statistics) runs under the token's lock. If it returns True, someone
        watches this end (middleware, the Guard House): ``ended`` runs after the lock, before
        anyone is woken. So a caller woken by ``get()`` sees counts and middleware effects that
        include this token, and a hook may itself wait on tokens. Otherwise waiters are woken
        under the lock, as the standard library's futures do.
        """
        stripe = _STRIPES[self.seq & _STRIPE_MASK]  # _lock(), inline: once per token
        stripe.acquire()
        cond = self._cond
        if cond is not None and not cond.acquire(False):
            stripe.release()
            cond = self._lock()
        waiters = sleepers = None
        try:
            if self._state in _TERMINAL or (run_id is not None and run_id != self._run_id):
                return False
            if exception is None:
                self._result = result
            else:
                self._exception = exception
                if not self._observed:
                    self._unretrieved = Unretrieved(self.id, exception)
            self._state = FINISHED
            watched = record(self, exception) and ended is not None
            if not watched:
                held = self._let_go()  # before anyone wakes; dropped outside the lock
                if self._w or self._sleepers:
                    self._wake_all("add_result" if exception is None else "add_exception")
            else:  # woken after ``ended``, outside the lock
                waiters = list(self._w) if self._w else None
                sleepers = self._sleepers
                self._sleepers = None
        finally:  # _unlock(cond), inline
            if cond is not None:
                cond.release()
            stripe.release()
        if watched:
            assert ended is not None
            ended(self, exception)  # middleware: they may still read the call's arguments
            held = self._let_go()
            if waiters:
                kind = "add_result" if exception is None else "add_exception"
                for waiter in waiters:
                    getattr(waiter, kind)(self)
            if sleepers:
                for sleeper in sleepers:
                    with contextlib.suppress(RuntimeError):
                        sleeper.release()
        del held  # the arguments' finalizers may run here, with no lock of ours held
        if self._cb:
            self._invoke_callbacks()
        return True

    def _reopen(self, run_id: int) -> bool:
        """RUNNING -> PENDING for a retry, only if ``run_id`` is still the current run."""
        cond = self._lock()
        try:
            if self._state != RUNNING or run_id != self._run_id:
                return False
            self._state = PENDING
            self._run_id += 1  # a late completion of the old run no longer matches
            return True
        finally:
            self._unlock(cond)


# -- awaiting a token from any event loop ---------------------------------------------------------
_CALLBACK_CODES = frozenset((Token._invoke_callbacks.__code__, Token.add_done_callback.__code__))


def in_done_callback() -> bool:
    """Whether this thread is inside a token's done-callback.

    Read from the call stack, and only to word an error (``stop()`` refused on a coordinator's
    own thread): running the callbacks costs nothing extra for it.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _CALLBACK_CODES:
            return True
        frame = frame.f_back
    return False


def _resolve_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _await_token(token: Token[T]) -> T:
    """Wait for ``token`` without blocking the running loop, then return its result.

    The token's done-callback (on whichever thread finishes it) wakes the loop through
    ``call_soon_threadsafe``. Cancelling the awaiting task cancels the token if it has not
    started, as awaiting an asyncio future would.
    """
    import asyncio  # here, not at the top: awaiting means asyncio is loaded already, and a
    # process-lane worker, which imports this module, starts faster without it

    if not token.done():
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake(_: Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_resolve_waiter, waiter)

        token._add_callback(wake)  # the result() below is what retrieves the error
        try:
            await waiter
        except asyncio.CancelledError:
            token.cancel()
            raise
    return token.result()
