"""What runs on a Dask worker: the task wrapper, its outcome, and what nested calls see.

Every token becomes one Dask task running :func:`run_task`, which applies the same rules as the
local lanes on the worker side:

* **deadline**: a token that starts past its deadline is not run (outcome ``DEADLINE``);
* **dependencies**: Token arguments arrive as the outcomes of their Dask futures (Dask resolved
  them on the cluster, never through the client); if one of them failed the body is not run
  (``DEP_FAILED``), otherwise each is replaced by its value;
* **storage tier**: a cluster-wide ``distributed.Semaphore`` lease per tier is held while the body
  runs, so a tier limit holds across every worker (and every client sharing the cluster);
* **retries**: Dask's ``retries`` re-run *every* exception, so the wrapper applies tokengate's
  rule itself. A retryable error (transient, per the coordinator's ``RetryPolicy`` and the task's
  ``retry_on``/``dont_retry_on``) is re-raised, and Dask reschedules the task; anything else is
  caught and returned as an ``ERROR`` outcome, which Dask does not retry. Each retryable failure is
  also published on the coordinator's event topic, so the client counts attempts and ``Retried``;
* **timeout**: a thread cannot be killed, so as on the local thread lane the body runs on; at the
  limit a timer publishes a ``timeout`` event and the client fails the token with ``TaskTimeout``,
  dropping the late result;
* **async tasks**: an ``async def`` body runs to its end in its own event loop on the worker
  thread (``asyncio.run``);
* **nested calls**: while the body runs, ``_runtime.local.coordinator`` is a :class:`TaskScope`,
  so a decorated call made by the body becomes a Dask task submitted from the worker. Waiting on
  such a token secedes the task from the worker's thread pool (``distributed.secede``), so nested
  tasks never deadlock, whatever the number of worker threads. The counts of nested tokens travel
  back inside the outcome and are merged into the client's statistics. They are sent by this
  worker process's own :class:`~._dask_runner.Runner` (:func:`worker_runner`), the same runner
  the client uses.

What the two sides exchange (:class:`~._dask_protocol.Call`, :class:`~._dask_protocol.Outcome`,
the events) is defined in ``_dask_protocol``; this module imports the runner, never the reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from .. import _runtime
from .._decorator import TaskFunction, adhoc_task
from .._spec import TaskSpec
from .._timers import TimerQueue
from .._token import Token, next_seq
from ._dask_protocol import (
    DEADLINE,
    DEP_FAILED,
    ERROR,
    OK,
    Call,
    Outcome,
    context_of,
    retry_event,
    timeout_event,
)
from ._dask_runner import Route, Runner

__all__ = [
    "TaskScope",
    "close_worker_runner",
    "connect_worker_client",
    "executing_keys",
    "run_task",
    "worker_runner",
]

log = logging.getLogger("tokengate.dask")

_time = time.time
_perf = time.perf_counter


# -- the per-process pieces a worker needs (created on first use) --------------------------------
_process_lock = threading.Lock()
_timers: TimerQueue | None = None
_semaphores: dict[str, Any] = {}


def _timer_queue() -> TimerQueue:
    global _timers
    with _process_lock:
        if _timers is None:
            _timers = TimerQueue(name="tokengate-dask-timers")
        return _timers


def _semaphore(name: str, limit: int) -> Any:
    sem = _semaphores.get(name)
    if sem is None:
        from distributed import Semaphore

        with _process_lock:
            sem = _semaphores.get(name)
            if sem is None:
                sem = Semaphore(max_leases=limit, name=name)  # type: ignore[no-untyped-call]
                _semaphores[name] = sem
    return sem


def publish(worker: Any, topic: str, msg: dict[str, Any]) -> None:
    """Send an event to the coordinator's topic (safe from any thread of the worker)."""
    try:
        worker.log_event(topic, msg)
    except Exception:  # pragma: no cover - the worker is going away
        log.warning("could not publish %s event for %s", msg.get("x"), msg.get("k"), exc_info=True)


def _portable(exc: BaseException, spec: TaskSpec) -> tuple[BaseException, dict[str, Any] | None]:
    """``exc`` and its traceback as something that survives pickling back to the client."""
    tb = None
    with contextlib.suppress(Exception):
        from tblib import Traceback

        tb = Traceback(exc.__traceback__).to_dict() if exc.__traceback__ is not None else None
    try:
        pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        from .._errors import SerializationError

        exc = SerializationError(
            f"{spec.operation_type!r} failed with {type(exc).__name__}: {exc}; the exception "
            f"itself could not be pickled back from the Dask worker, so this stands in for it"
        )
    return exc, tb


# -- dependencies ----------------------------------------------------------------------------------
def _first_failed(value: Any) -> Outcome | None:
    if type(value) is Outcome:
        return value if value.kind != OK else None
    kind = type(value)
    if kind is list or kind is tuple:
        for item in value:
            found = _first_failed(item)
            if found is not None:
                return found
    elif kind is dict:
        for item in value.values():
            found = _first_failed(item)
            if found is not None:
                return found
    return None


def _unwrap(value: Any) -> Any:
    kind = type(value)
    if kind is Outcome:
        return value.payload
    if kind is list:
        return [_unwrap(item) for item in value]
    if kind is tuple:
        return tuple(_unwrap(item) for item in value)
    if kind is dict:
        return {key: _unwrap(item) for key, item in value.items()}
    return value


# -- nested calls ---------------------------------------------------------------------------------
_default_config: Any = None


class TaskScope:
    """The coordinator a task body sees on a Dask worker: nested calls become Dask tasks.

    It is also the host of the nested tokens it creates (``Token._coordinator``): it counts them
    for the statistics that travel back to the client, and secedes its task from the worker's
    thread pool the first time the body waits on one of them.
    """

    def __init__(self, key: str, ctx_blob: bytes, thread: int, worker: Any) -> None:
        self.key = key
        self.ctx_blob = ctx_blob
        self.thread = thread
        self.worker = worker
        self.seceded = False
        self.counts: dict[str, list[Any]] | None = None
        self._lock = threading.Lock()

    # What TaskFunction and map() ask of a coordinator.
    @property
    def config(self) -> Any:
        global _default_config
        if _default_config is None:
            from .._config import CoordinatorConfig

            _default_config = CoordinatorConfig(mailbox_max=context_of(self.ctx_blob).mailbox_max)
        return _default_config

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Token[Any]:
        task, args = adhoc_task(fn, args)
        return self._submit(task, args, kwargs, True)

    def _submit(
        self,
        task: TaskFunction[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        internal: bool,
    ) -> Token[Any]:
        spec = task.spec
        # next_seq: the process-wide sequence every coordinator uses, so ids stay unique.
        token: Token[Any] = Token(spec, task.__wrapped__, args, kwargs, next_seq(), _perf(), self)
        self._count(spec, 1)
        if spec.deadline is not None:
            token._deadline_at = token.submitted_at + spec.deadline
        submit_nested(token, task, self)
        return token

    # Token -> host calls.
    def help(self, token: Token[Any], end: float | None = None) -> None:
        """The body waits on a nested token (until ``end``, the caller's ``get(timeout=)``):
        leave the worker's thread pool (once) so another task, that one included, can run in
        our slot. Never rejoined: the task finishes outside the pool, as with
        ``distributed.secede()``. The wait itself is the token's own."""
        if not self.seceded and threading.get_ident() == self.thread:
            from distributed import secede

            self.seceded = True
            secede()  # type: ignore[no-untyped-call]

    def on_discarded(self, token: Token[Any]) -> None:
        token.finished_at = _perf()
        self._count(token.spec, 4)

    def after_discard(self, token: Token[Any]) -> None:
        worker_runner(context_of(self.ctx_blob).topic).discarded(token)

    def record_terminal(self, token: Token[Any], exc: BaseException | None) -> None:
        now = _perf()
        token.finished_at = now
        self._count(token.spec, 2 if exc is None else 3, now - token.submitted_at)

    # Host calls from the runner.
    def record_retried(self, token: Token[Any]) -> None:
        self._count(token.spec, 5)

    def merge_nested(self, nested: dict[str, list[Any]]) -> None:
        with self._lock:
            counts = self.counts
            if counts is None:
                counts = self.counts = {}
            for op, row in nested.items():
                mine = counts.get(op)
                if mine is None:
                    counts[op] = [row[0], *row[1:6], list(row[6])]
                else:
                    for i in range(1, 6):
                        mine[i] += row[i]
                    mine[6].extend(row[6])

    def _count(self, spec: TaskSpec, column: int, latency: float | None = None) -> None:
        with self._lock:
            counts = self.counts
            if counts is None:
                counts = self.counts = {}
            row = counts.get(spec.operation_type)
            if row is None:
                row = counts[spec.operation_type] = [spec.weight, 0, 0, 0, 0, 0, []]
            row[column] += 1
            if latency is not None:
                row[6].append(latency)

    def summary(self) -> dict[str, list[Any]] | None:
        """The counts of nested tokens that have ended (those still running are left out: their
        ends would never reach the client)."""
        with self._lock:
            counts = self.counts
            if not counts:
                return None
            out = {}
            for op, row in counts.items():
                ended = row[2] + row[3] + row[4]
                if ended:
                    out[op] = [row[0], ended, row[2], row[3], row[4], row[5], list(row[6])]
            return out or None


# -- the wrapper ----------------------------------------------------------------------------------
def run_task(
    target: Any,
    call: Call,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Outcome:
    """Run one token's body on a Dask worker (see the module docstring).

    ``target`` is the TaskFunction (pickled by reference) or, for a plain callable, the callable;
    ``call`` says what to run (see :class:`Call`). ``args``/``kwargs`` are given only when the
    call had Token arguments: Dask has replaced them by their dependencies' outcomes.
    """
    key, ctx_blob, tier, deadline, spec = (
        call.key,
        call.ctx_blob,
        call.tier,
        call.deadline,
        call.spec,
    )
    has_deps = args is not None
    if not has_deps:
        args, kwargs = call.args, call.kwargs
    assert args is not None and kwargs is not None
    started = _time()
    from distributed import get_worker

    worker = get_worker()
    if deadline is not None and started > deadline:
        return Outcome(DEADLINE, None, started, started, worker.address)
    if has_deps:
        failed = _first_failed(args) or _first_failed(kwargs)
        if failed is not None:
            return Outcome(DEP_FAILED, None, started, started, worker.address)
        args = _unwrap(args)
        kwargs = _unwrap(kwargs)
    if type(target) is TaskFunction:
        body = target.__wrapped__
        spec = target.spec
    else:
        body = target
    assert spec is not None  # a plain callable's spec travels in the call
    local = _runtime.local
    previous = local.coordinator
    scope = TaskScope(key, ctx_blob, threading.get_ident(), worker)
    local.coordinator = scope
    lease = timer = None
    try:
        if tier is not None:
            lease = _semaphore(*tier)
            lease.acquire()
        if spec.timeout is not None:
            timer = _timer_queue().call_later(
                spec.timeout,
                publish,
                worker,
                context_of(ctx_blob).topic,
                timeout_event(key, worker.address),
            )
        value = body(*args, **kwargs)
        if spec.is_async:  # an async def task: run it to its end on this worker thread
            value = asyncio.run(value)
    except BaseException as exc:
        if _retryable(exc, spec, ctx_blob):
            publish(
                worker,
                context_of(ctx_blob).topic,
                retry_event(key, exc, worker.address, started),
            )
            raise  # Dask reschedules it (its retries)
        err, tb = _portable(exc, spec)
        return Outcome(ERROR, err, started, _time(), worker.address, scope.summary(), tb)
    finally:
        local.coordinator = previous
        if timer is not None:
            timer.cancel()
        if lease is not None:
            lease.release()
    return Outcome(OK, value, started, _time(), worker.address, scope.summary())


def _retryable(exc: BaseException, spec: TaskSpec, ctx_blob: bytes) -> bool:
    if not isinstance(exc, Exception):
        return False
    policy = context_of(ctx_blob).policies[spec.weight]
    return policy.is_retryable(exc, retry_on=spec.retry_on, dont_retry_on=spec.dont_retry_on)


def connect_worker_client() -> str:
    """Run once per worker when a coordinator starts: connect the worker's own client now.

    Nested calls, semaphores and events use it. Connected lazily, it can lose its handshake to a
    Dask race (a ``cancelled-keys`` report broadcast to every client lands in the same batch as
    its ``stream-start``, and ``Client._ensure_connected`` asserts), which leaves the worker with
    a half-made default client. Tokens are cancelled often enough for that to matter.
    """
    from distributed import get_client, get_worker

    get_client()
    return str(get_worker().address)


def executing_keys(dask_worker: Any) -> list[str]:
    """The keys this worker is running right now (``Client.run`` calls it at stop)."""
    state = dask_worker.state
    return [ts.key for ts in (*state.executing, *state.long_running)]


# -- nested calls: one runner per worker process and coordinator, created on first use -------------
class NestedHost:
    """Host of the tokens a task body submits on a worker: its :class:`TaskScope` counts them
    (they reach the client inside the task's outcome); no client-side tier permit applies."""

    __slots__ = ("scope",)

    def __init__(self, scope: TaskScope) -> None:
        self.scope = scope

    def finish(self, token: Token[Any], value: Any, exc: BaseException | None) -> bool:
        return token._finish(value, exc, self.scope.record_terminal)

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        pass

    def record_retried(self, token: Token[Any]) -> None:
        self.scope.record_retried(token)

    def merge_nested(self, nested: dict[str, list[Any]]) -> None:
        self.scope.merge_nested(nested)

    def acquire(self, token: Token[Any], internal: bool) -> bool:
        return True

    def settled(self, token: Token[Any]) -> None:
        pass

    def late(self, token: Token[Any], what: str) -> None:
        log.warning(
            "late %s of nested %s (token %s) dropped: the token had already ended (%s)",
            what,
            token.operation_type,
            token.id,
            token.state,
        )

    def expire_later(self, callback: Callable[[], None]) -> None:
        _timer_queue().call_later(0, callback)


_worker_runners: dict[str, Runner] = {}
_worker_lock = threading.Lock()
_nested_routes: dict[tuple[bytes, int], Route] = {}


def worker_runner(topic: str) -> Runner:
    """This worker process's runner for the coordinator publishing on ``topic``.

    Created on the first nested call, from the task's thread (``get_client`` needs it).
    """
    runner = _worker_runners.get(topic)
    if runner is None:
        from distributed import get_client

        with _worker_lock:
            runner = _worker_runners.get(topic)
            if runner is None:
                runner = Runner(get_client(), f"w{uuid.uuid4().hex[:8]}", run_task)
                runner.subscribe(topic)
                _worker_runners[topic] = runner
    return runner


def close_worker_runner(topic: str) -> bool:
    """Forget this worker process's runner for a coordinator that stopped (``Client.run`` calls
    it on every worker, on the worker's event loop: nothing here may block)."""
    with _worker_lock:
        runner = _worker_runners.pop(topic, None)
    if runner is None:
        return False
    runner.close(wait=False)
    return True


def submit_nested(token: Token[Any], task: TaskFunction[..., Any], scope: TaskScope) -> None:
    """Send a token a task body created on a worker (always internal: never blocks)."""
    spec = task.spec
    route = _nested_routes.get((scope.ctx_blob, id(spec)))
    if route is None or route.spec is not spec:
        ctx = context_of(scope.ctx_blob)
        policy = ctx.policies[spec.weight]
        retries = spec.retries if spec.retries is not None else policy.max_retries
        tier = spec.storage_speed
        limit = None if tier is None else ctx.limits[tier]
        route = Route(spec, task, retries, limit, scope.ctx_blob)
        if len(_nested_routes) > 4096:
            _nested_routes.clear()
        _nested_routes[(scope.ctx_blob, id(spec))] = route
    worker_runner(context_of(scope.ctx_blob).topic).admit(token, NestedHost(scope), route, True)
