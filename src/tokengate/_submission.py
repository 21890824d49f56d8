"""Submission: from a call to a counted token in its backend's hands.

One call becomes one :class:`Token` here, on the caller's thread::

    admission paused (the Overflow Guard)? an outside producer waits, or is refused
    not running? CoordinatorNotRunning, saying why (never started, stopping, forked, exiting)
    before_submit middleware (the Guard House's breaker may refuse it: nothing is counted)
    Backend.prepare   (the local backend pickles a process-lane call: an unpicklable argument
                       raises here, and nothing is counted)
    the Token, counted as submitted before it can possibly finish
    Backend.submit    (or held back, counted but queued nowhere, for an executor's max_workers)

The coordinator's ``_submit``, ``_submit_async``, ``_release_held`` and ``_failed_token`` are
this object's methods, bound onto it once: decorated functions and executors call them at the
cost of a direct call.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _lifecycle, _runtime
from ._dependencies import find_dependencies
from ._errors import CoordinatorNotRunning, SerializationError
from ._parking import Parking, park
from ._state import CoordinatorState, Lifecycle
from ._token import NO_KWARGS, Token, next_seq

if TYPE_CHECKING:
    from ._admission import AdmissionGate
    from ._backlog import Backlog
    from ._byte_budget import ByteBudget
    from ._completion import Completion
    from ._decorator import TaskFunction
    from ._quarantine import Quarantine
    from ._rate import RateLimiter
    from ._spec import TaskSpec
    from ._stats import StatsRecorder
    from .backends import Backend

__all__ = ["Submission"]

S = CoordinatorState
_STOPPING = frozenset((S.DRAINING, S.DISCARDING, S.CLOSING))
_perf = time.perf_counter


class Submission:
    """Makes, counts and hands on the tokens of one coordinator (see the module doc)."""

    def __init__(
        self,
        *,
        owner: object,
        backend: Backend,
        lifecycle: Lifecycle,
        gate: AdmissionGate,
        completion: Completion,
        stats: StatsRecorder,
        backlog: Backlog,
        rate: RateLimiter,
        byte_budget: ByteBudget,
        before_submit: list[Callable[[TaskSpec], None]],
        reject: bool,
    ) -> None:
        self.owner = owner  # the coordinator: calls made on its own threads never wait
        self.backend = backend
        self.lifecycle = lifecycle
        self.gate = gate
        self.completion = completion
        self.stats = stats
        self.backlog = backlog
        self.rate = rate
        self.byte_budget = byte_budget
        self.before_submit = before_submit  # shared with add_middleware, which appends to it
        self.reject = reject
        self.pid = os.getpid()  # the process that started it (the fork message names it)
        self._lock = threading.Lock()
        # Tokens counted but held back by their submitter (an executor's max_workers), with the
        # task each runs: they wait here, on no worker, until release_held admits them.
        self.held: dict[Token[Any], TaskFunction[..., Any]] = {}
        # Hold rules (_quarantine.py): set by the coordinator; an empty list costs one check.
        self.quarantine: Quarantine | None = None
        self.hold_rules: list[Any] = []

    def submit(
        self,
        task: TaskFunction[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        internal: bool,
        payload: Any = None,
        hold: bool = False,
    ) -> Token[Any]:
        """Make, count and hand on one call's token (``payload``: what the backend prepared
        for it already, in ``submit_async``; ``hold``: count the token but keep it out of
        every queue until ``release_held``)."""
        life = self.lifecycle
        # Overflow Guard: while admission is paused for memory, external producers wait here
        # (or are refused with admission='reject'); calls from tasks never wait.
        if self.gate.is_paused and not internal and life.accepting:
            self.gate.wait_while_paused(task.spec.operation_type, reject=self.reject)
        if not life.accepting and not (internal and life.state in _STOPPING):
            raise self.not_running(task.spec.operation_type)
        spec = task.spec
        if self.before_submit:
            for hook in self.before_submit:
                hook(spec)
        quarantine = None  # hold rules: why this call waits for the operator (_quarantine.py)
        if self.hold_rules and not internal and not hold and self.quarantine is not None:
            quarantine = self.quarantine.reason(spec, args, kwargs)
            hold = quarantine is not None
        backend = self.backend
        if payload is None and not hold:
            # Held calls are prepared when released (release_held), so that they hold no
            # pickled copies, only references, as a stdlib pool's queued calls do.
            payload = backend.prepare(task, args, kwargs)
        # new_token, inline (once per call): keep the two in step.
        token: Token[Any] = Token(
            spec, task.__wrapped__, args, kwargs or NO_KWARGS, next_seq(), _perf(), self.completion
        )
        try:  # StatsRecorder.record_submitted, inline (see StatsRecorder.per_thread)
            self.stats.per_thread.shard.ops[spec.operation_type].submitted += 1
        except (AttributeError, KeyError):
            self.stats.record_submitted(spec.operation_type, spec.weight)
        priority = task._call_priority
        if priority is not None:  # fn.options(priority=...)
            token._priority = priority
            if priority:
                backend.prioritize()
        locality = task._call_locality
        if locality is not None:  # fn.options(locality=...)
            token._locality = locality
        try:
            if spec.deadline is not None:
                token._deadline_at = token.submitted_at + spec.deadline
            if hold:
                self._hold(token, task, internal)
                if quarantine is not None and self.quarantine is not None:
                    # Recorded once it is held: releasable from now on.
                    self.quarantine.add(token, quarantine, accepting=lambda: life.accepting)
            else:
                backend.submit(token, task, internal, payload)
        except BaseException:
            # The caller never gets this token (a Ctrl-C while it waited for room, say): it
            # must not stay counted as in flight with nowhere to run, or stop() waits for ever.
            token._discard("interrupted")
            raise
        return token

    async def submit_async(
        self, task: TaskFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Token[Any]:
        """``submit`` for asyncio code: awaits room instead of blocking the event loop."""
        mine = _runtime.local.coordinator is self.owner
        life = self.lifecycle
        if mine or not life.accepting:
            return self.submit(task, args, kwargs, mine)
        spec = task.spec
        has_deps = bool((args or kwargs) and find_dependencies(args, kwargs))
        reject = self.reject
        backend = self.backend
        # The call is prepared first (a process-lane call is pickled: an unpicklable argument
        # raises here), so that the wait below can include room for its bytes; it is charged
        # when it finds room. With admission='reject' nothing waits: submit prepares it.
        call = None if reject else backend.prepare(task, args, kwargs)
        budget = self.byte_budget

        def room() -> bool | None:
            if spec.rate is not None and self.rate.waiting(spec.operation_type) >= (
                self.backlog.bound()
            ):
                return None
            if not backend.has_room(spec, dependencies=has_deps, mailboxes=not reject):
                return None
            if call is None or reject or life.discarding or not life.accepting:
                return True  # submit charges (or refuses) it
            return True if budget.try_charge(call) else None

        if room() is None:
            await self.gate.wait_for_async(room)
        try:
            if reject or not life.accepting:
                return self.submit(task, args, kwargs, False, call)  # Overloaded/NotRunning
            # There is room now and nothing ran on this thread since the check: admitting as an
            # "internal" call skips the blocking waits (a racing thread can overflow the soft
            # bound by a token, exactly as calls from inside tasks may).
            return self.submit(task, args, kwargs, True, call)
        except BaseException:
            if call is not None:  # charged, but never queued (its token's discard may have)
                budget.release(call)
            raise

    def new_token(
        self, task: TaskFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Token[Any]:
        """A token for one call, counted as submitted (before it can possibly finish);
        ``submit`` inlines this."""
        spec = task.spec
        # A call without keyword arguments shares one empty dict: the call's own (always made
        # for ``**kwargs``) is freed at once, so a token costs the garbage collector two
        # objects, not three, and collections come a third less often (B1).
        token: Token[Any] = Token(
            spec, task.__wrapped__, args, kwargs or NO_KWARGS, next_seq(), _perf(), self.completion
        )
        try:  # StatsRecorder.record_submitted, inline (see StatsRecorder.per_thread)
            self.stats.per_thread.shard.ops[spec.operation_type].submitted += 1
        except (AttributeError, KeyError):
            self.stats.record_submitted(spec.operation_type, spec.weight)
        return token

    def failed_token(
        self,
        task: TaskFunction[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: BaseException,
    ) -> Token[Any]:
        """A token counted as submitted and failed with ``exc`` at once: for a submitter that
        reports a call it could not send (an unpicklable argument) on the Future, as
        ``ProcessPoolExecutor`` does, rather than raising."""
        token = self.new_token(task, args, kwargs)
        self.completion.fail_unrun(token, exc)
        return token

    # -- held calls (an executor's max_workers) ------------------------------------------------
    def _hold(self, token: Token[Any], task: TaskFunction[..., Any], internal: bool) -> None:
        """Keep ``token`` counted but unqueued (an external producer waits while as many tokens
        are held as the mailboxes hold, as for dependencies)."""

        def hold() -> None:
            park(token, Parking.HELD)
            with self._lock:
                self.held[token] = task

        self.backlog.park_outside(token, self.held.__len__, internal, hold)

    def release_held(
        self,
        token: Token[Any],
        error: BaseException | None = None,
        explain: Callable[[SerializationError], BaseException] | None = None,
    ) -> bool:
        """Admit a token held by ``submit(hold=True)``, or fail it with ``error`` without
        running it; False if it had ended meanwhile.

        A process call is pickled here, not when it was held: held calls keep references,
        not pickled copies, so however many are held they hold none of ``process_queue_bytes``.
        A call that cannot be pickled fails its token with the ``SerializationError``
        (``explain`` may reword it), as ``ProcessPoolExecutor`` sets it on the Future.
        """
        with self._lock:
            task = self.held.pop(token, None)
        if task is None or token.done():
            return False
        if self.gate.unwoken:
            self.gate.notify()  # a producer may be waiting for the held backlog to shrink
        token._parked = None
        payload = None
        if error is None:
            try:
                payload = self.backend.prepare(task, token.args, token.kwargs)
            except SerializationError as exc:
                error = exc if explain is None else explain(exc)
        if error is not None:
            self.completion.fail_unrun(token, error)
            return True
        self.backend.submit(token, task, True, payload)
        return True

    def take_held(self) -> list[Token[Any]]:
        """The held tokens (``stop()`` discards them)."""
        with self._lock:
            return list(self.held)

    # -- refusals ------------------------------------------------------------------------------
    def not_running(self, operation_type: str) -> CoordinatorNotRunning:
        what = f"cannot run {operation_type!r}"
        life = self.lifecycle
        if life.state is S.FORKED:
            return _lifecycle.fork_refusal(what, self.pid)
        if _runtime.exiting:
            return CoordinatorNotRunning(
                f"{what}: the coordinator is {life.status} and the interpreter is exiting "
                f"(running coordinators are stopped when the main thread ends); submit work "
                f"before then"
            )
        return CoordinatorNotRunning(
            f"{what}: the coordinator is {life.status}; start one first "
            f"(with OperationsCoordinator(): ... or coordinator.start())"
        )
