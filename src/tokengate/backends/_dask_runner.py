"""Runner: tokens in, Dask futures out, and every token ended from its future's completion.

One runner per Dask client: the coordinator's (:class:`~tokengate.backends.DaskBackend`) on the
client side, and one per worker process for the nested calls task bodies make. The flow::

    admit(token) ── dependencies: a failed one fails the token now (DependencyFailed, never run);
        │            one not yet submitted to Dask (another coordinator's, or waiting for a tier
        │            permit) parks the token until it ends; the others become Dask futures
        ├─ host.acquire (the client's storage-tier permit; a worker always says yes)
        └─ client.submit(run_task, ..., key=<operation>-<seq>-<tag>, retries, priority)
                 │
        future done ──> on the client's event loop: the futures that ended are gathered in one
                 │      gather (those ending meanwhile wait for the next one), then queued
                 │
        the collector thread settles each token in completion order:
            retried attempts (from the ``retry`` events) -> Retried + after_attempt("retried")
            nested counts -> the host's statistics (before anyone is woken)
            host.finish(value | error): counted, middleware told, then waiters woken
            host.settled -> tier permit handed on, producers and stop() woken

Events (``retry``, ``timeout``) arrive on the client's event loop in the order the scheduler sent
them, which is before the task's own completion; they only note the attempt (retry) or hand the
failure to a timer thread (timeout), so no user code ever runs on Dask's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .._dependencies import _dependency_error, _failed, find_dependencies, replace_tokens
from .._errors import (
    DependencyFailed,
    SerializationError,
    TaskTimeout,
    TokenGateError,
    WorkerCrashed,
)
from .._parking import Parking, park
from .._token import Place, Token
from ._dask_protocol import (
    DEADLINE,
    DEP_FAILED,
    EVENT_RETRY,
    EVENT_TIMEOUT,
    MSG_ERROR,
    MSG_KEY,
    MSG_KIND,
    MSG_REPR,
    MSG_STARTED,
    MSG_WORKER,
    OK,
    Call,
    Outcome,
    load_exception,
    semaphore_name,
)

if TYPE_CHECKING:
    from .._decorator import TaskFunction
    from .._spec import TaskSpec
    from ._dask_shared import ClusterShares

__all__ = ["Host", "Route", "Runner"]

_done_callback: Any
try:  # the coroutine behind Future.add_done_callback, without its thread hop
    from distributed.client import done_callback as _done_callback
except ImportError:  # pragma: no cover - another distributed version
    _done_callback = None

log = logging.getLogger("tokengate.dask")
worker_log = logging.getLogger("tokengate.worker")
routing_log = logging.getLogger("tokengate.routing")
_DEBUG = logging.DEBUG
_perf = time.perf_counter
_STOP = object()

# Dask runs higher priorities first. Heavy first mirrors the Quick-Proof's rule of thumb (heavy may
# use every core, light only the last ones): on a saturated cluster a heavy token is never stuck
# behind a flood of light ones. Within a weight Dask keeps submission order (FIFO).
PRIORITIES = {"heavy": 2, "medium": 1, "light": 0}


def dask_priority(level: int, token: Token[Any]) -> float:
    """The Dask ``priority`` of ``token``: its weight's level (heavy 2, medium 1, light 0), and
    within it the token's own priority (``fn.options(priority=...)``, else its ``priority``
    tag), squeezed into the open interval (-0.5, 0.5) so it never crosses a weight; the order
    stays exact for priorities up to about ten million either way."""
    own = token._priority
    if own is None:
        own = token.spec.priority
    if not own:
        return level
    return level + own / (2 * (abs(own) + 1))


class Host(Protocol):
    """Who owns the tokens a runner settles: the coordinator's backend, or a worker TaskScope."""

    def finish(self, token: Token[Any], value: Any, exc: BaseException | None) -> bool:
        """End ``token`` (counted, middleware told, then its waiters woken); False if it had
        ended already."""
        ...

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None: ...

    def record_retried(self, token: Token[Any]) -> None: ...

    def merge_nested(self, nested: dict[str, list[Any]]) -> None: ...

    def acquire(self, token: Token[Any], internal: bool) -> bool: ...

    def settled(self, token: Token[Any]) -> None: ...

    def late(self, token: Token[Any], what: str) -> None: ...

    def expire_later(self, callback: Callable[[], None]) -> None: ...


class Route:
    """How tokens of one spec are sent: what to pickle, the retry budget, the priority, the tier
    semaphore and the coordinator context the worker needs. Worked out once per spec."""

    __slots__ = ("ctx_blob", "priority", "retries", "spec", "spec_meta", "target", "tier")

    def __init__(
        self,
        spec: TaskSpec,
        task: TaskFunction[..., Any],
        retries: int,
        limit: int | None,
        ctx_blob: bytes,
        *,
        main_by_value: bool = False,
    ) -> None:
        self.spec = spec
        self.target = sendable(task, main_by_value=main_by_value)
        # A TaskFunction carries its spec to the worker; a plain callable needs it sent along.
        self.spec_meta = None if self.target is task else spec
        self.retries = retries
        self.priority = PRIORITIES[spec.weight]
        tier = spec.storage_speed
        self.tier = None if tier is None or limit is None else (semaphore_name(tier, limit), limit)
        self.ctx_blob = ctx_blob


def sendable(task: TaskFunction[..., Any], *, main_by_value: bool = False) -> Any:
    """What to ship for ``task``: itself (pickled by reference: two strings) when a worker can
    import it by name, else the plain function (cloudpickled by value: lambdas, closures, the
    callables given to ``coordinator.submit``). A script's own functions (``__main__``) import on
    a LocalCluster's workers, which re-import the script; elsewhere (``main_by_value``) they go
    by value."""
    from .._decorator import resolves_by_name

    if main_by_value and task.__module__ == "__main__":
        return task.__wrapped__
    return task if resolves_by_name(task) else task.__wrapped__


class _Entry:
    __slots__ = ("deps", "done", "future", "host", "token")

    def __init__(self, token: Token[Any], host: Host, deps: list[Token[Any]], future: Any):
        self.token = token
        self.host = host
        self.deps = deps
        self.future = future
        self.done = False  # settled (resolved, failed, or timed out while still running)


class Runner:
    """Submits tokens to one Dask client and ends them from their futures (see module doc).

    ``run_task`` is what each Dask task runs (the worker side's ``_dask_task.run_task``): given
    by whoever makes the runner, so that this module never imports the worker side.
    """

    def __init__(
        self,
        client: Any,
        tag: str,
        run_task: Callable[..., Any],
        *,
        on_thread_start: Callable[[], None] | None = None,
        shares: ClusterShares | None = None,
    ) -> None:
        self.client = client
        self.shares = shares
        self.tag = tag
        self._run_task = run_task
        self._inflight: dict[str, _Entry] = {}
        self._parked: dict[Token[Any], tuple[Host, Route]] = {}
        self._errors: dict[str, list[BaseException]] = {}
        self._last_run: dict[str, tuple[str, float]] = {}  # key -> (worker, wall start)
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._topics: set[str] = set()
        self._on_thread_start = on_thread_start
        self._lock = threading.Lock()
        self._to_watch: list[Any] = []
        self._watch_lock = threading.Lock()
        self._watch_scheduled = False
        self._loop_tasks: set[asyncio.Task[Any]] = set()  # see _keep
        self._done: list[Any] = []  # ended futures not gathered yet (event loop only)
        self._gathering = False  # a _gather_finished is running (event loop only)
        self._thread = threading.Thread(
            target=self._collect, name=f"tokengate-dask-collector-{tag}", daemon=True
        )
        self._thread.start()

    # -- bookkeeping ---------------------------------------------------------------------------
    def key_of(self, token: Token[Any]) -> str:
        """The Dask key of ``token``: ``<operation_type>-<seq>-<tag>``.

        Dask names a task's TaskGroup after the key's first dash-separated word; the operation
        type there gives one group per operation (the dashboard's rows). A unique first word
        (the token id ``fib_1773...``) made one group per task, and the scheduler's default-span
        check, which walks every group on each submit, quadratic.
        """
        return f"{token.spec.operation_type}-{token.seq}-{self.tag}"

    def load(self) -> int:
        """Tokens sent to Dask or parked here and not yet ended (what backpressure bounds)."""
        return len(self._inflight) + len(self._parked)

    def subscribe(self, topic: str) -> None:
        if topic not in self._topics:
            self._topics.add(topic)
            self.client.subscribe_topic(topic, self._on_event)

    def future_of(self, token: Token[Any]) -> Any:
        entry = self._inflight.get(self.key_of(token))
        return entry.future if entry is not None and entry.token is token else None

    def in_flight(self) -> dict[str, Token[Any]]:
        """Tokens sent to Dask and not yet ended, by key."""
        return {key: e.token for key, e in list(self._inflight.items()) if not e.done}

    def parked(self) -> list[Token[Any]]:
        with self._lock:
            return list(self._parked)

    # -- submission ------------------------------------------------------------------------------
    def admit(self, token: Token[Any], host: Host, route: Route, internal: bool) -> None:
        """Send ``token`` now, or park it until what it needs has ended (see module doc)."""
        deps: list[Token[Any]] = []
        args, kwargs = token.args, token.kwargs
        if args or kwargs:
            deps = find_dependencies(args, kwargs)
        if deps:
            # Capture each dependency's future now: a Future object held here keeps its result
            # on the cluster even if the dependency ends (and is forgotten) meanwhile.
            remote: dict[int, Any] = {}
            waiting = []
            for dep in deps:
                if dep.done():
                    if _failed(dep):
                        self._fail_unrun(token, host, _dependency_error(token, dep))
                        return
                    remote[id(dep)] = None
                else:
                    future = self.future_of(dep)
                    if future is None:
                        waiting.append(dep)
                    remote[id(dep)] = future
            if waiting:
                self._park(token, host, route, waiting)
                return
            if not host.acquire(token, internal):
                return  # waits for a tier permit; admitted again when granted
            args = tuple(_remote(a, remote) for a in args)
            kwargs = {k: _remote(v, remote) for k, v in kwargs.items()}
        elif not host.acquire(token, internal):
            return
        remote_args = bool(deps)
        if self.shares is not None:
            args, kwargs, found = self.shares.substitute(args, kwargs)
            remote_args = remote_args or found
        self._send(token, host, route, args, kwargs, deps, remote_args)

    def _send(
        self,
        token: Token[Any],
        host: Host,
        route: Route,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deps: list[Token[Any]],
        remote_args: bool,
    ) -> None:
        key = self.key_of(token)
        deadline = token._deadline_at
        if deadline is not None:  # the worker's clock is wall time
            deadline = time.time() + (deadline - _perf())
        if remote_args:  # Dask must see the futures among the arguments
            call = Call(key, route.ctx_blob, route.tier, deadline, route.spec_meta, None, None)
            parts: tuple[Any, ...] = (route.target, call, args, kwargs)
        else:
            call = Call(key, route.ctx_blob, route.tier, deadline, route.spec_meta, args, kwargs)
            parts = (route.target, call)
        try:
            future = self.client.submit(
                self._run_task,
                *parts,
                key=key,
                retries=route.retries,
                priority=dask_priority(route.priority, token),
                pure=False,
            )
        except Exception as exc:  # Dask pickles here: never leave the token without an end
            self._fail_unrun(token, host, unsendable(token, route.target, exc))
            return
        self._inflight[key] = _Entry(token, host, deps, future)
        self._watch(future)
        if token.done():  # discarded while being sent
            self.discarded(token)
        if routing_log.isEnabledFor(_DEBUG):
            tier = route.tier
            routing_log.debug(
                "[ROUTING] Token %s (%s) → Pos %d (Dask, priority %g%s)",
                token.id,
                route.spec.weight,
                token.seq,
                dask_priority(route.priority, token),
                f", {tier[0]}" if tier else "",
            )

    def _watch(self, future: Any) -> None:
        """Have ``future`` gathered and settled when it ends.

        ``Future.add_done_callback`` costs a wake-up of the event loop per future and a hop
        through Dask's callback thread; here the futures sent meanwhile are handed to the loop in
        one wake-up, and each one's waiter reports to :meth:`_finished` on the loop itself.
        """
        if _done_callback is None:  # pragma: no cover - another distributed version
            future.add_done_callback(lambda f: self.client.loop.add_callback(self._finished, f))
            return
        with self._watch_lock:
            self._to_watch.append(future)
            if self._watch_scheduled:
                return
            self._watch_scheduled = True
        self.client.loop.add_callback(self._register_watchers)

    def _register_watchers(self) -> None:  # on the client's event loop
        with self._watch_lock:
            futures, self._to_watch = self._to_watch, []
            self._watch_scheduled = False
        for future in futures:
            self._keep(asyncio.ensure_future(_done_callback(future, self._finished)))

    def _keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a reference to a loop task until it ends (the loop keeps only weak ones)."""
        self._loop_tasks.add(task)
        task.add_done_callback(self._loop_tasks.discard)

    def _finished(self, future: Any) -> None:  # on the client's event loop
        self._done.append(future)
        if not self._gathering:
            self._gathering = True
            self._keep(asyncio.ensure_future(self._gather_finished()))

    async def _gather_finished(self) -> None:  # on the client's event loop
        """Fetch the results of the futures that ended, then hand them to the collector.

        While one gather is on the wire, futures ending meanwhile wait for the next: batches grow
        with the load by themselves, and a lone future is fetched at once.
        """
        try:
            while self._done:
                batch, self._done = self._done, []
                finished = {
                    f.key: f for f in batch if f.status == "finished" and f.key in self._inflight
                }
                values: dict[str, Any] = {}
                if finished:
                    try:
                        values = await self.client.gather(
                            finished, errors="skip", asynchronous=True
                        )
                    except Exception:
                        log.warning(
                            "gathering %d results from Dask failed", len(finished), exc_info=True
                        )
                self._ready.put((batch, values))
        finally:
            self._gathering = False

    def _park(self, token: Token[Any], host: Host, route: Route, waiting: list[Token[Any]]) -> None:
        park(token, Parking.DEPS)
        left = [len(waiting)]
        lock = threading.Lock()
        with self._lock:
            self._parked[token] = (host, route)

        def on_done(_dep: Any) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            with self._lock:
                if self._parked.pop(token, None) is None:
                    return  # discarded meanwhile
            token._parked = None
            if not token.done():
                self.admit(token, host, route, True)

        for dep in waiting:
            dep._add_callback(on_done)

    def discarded(self, token: Token[Any]) -> None:
        """``token`` was discarded: forget it, and cancel its Dask task if it has one."""
        with self._lock:
            self._parked.pop(token, None)
        entry = self.forget(token)
        if entry is not None:
            self.cancel([entry.future])

    def forget(self, token: Token[Any]) -> _Entry | None:
        """Stop tracking ``token``'s Dask future; returns its entry if it was running here."""
        key = self.key_of(token)
        entry = self._inflight.get(key)
        if entry is None or entry.token is not token:
            return None
        del self._inflight[key]
        self._errors.pop(key, None)
        self._last_run.pop(key, None)
        if entry.done:
            return None
        entry.done = True
        return entry

    def cancel(self, futures: list[Any]) -> None:
        """Cancel Dask tasks, and return only once the scheduler has done so.

        ``Client.cancel`` only queues a message (Dask batches them for up to 10 ms), so a task
        waiting on a dependency that ends meanwhile could still be dispatched. Running the same
        ``cancel-keys`` handler on the scheduler first closes that window: when this returns, a
        task that had not started never will. (Without tokengate on the scheduler the function
        travels by value; if that fails too, the queued message still cancels, a little later.)
        """
        if not futures:
            return
        reason = "tokengate: token discarded"
        try:
            self.client.run_on_scheduler(
                _scheduler_cancel(), [f.key for f in futures], self.client.id, reason
            )
        except Exception:
            log.debug("cancelling on the scheduler failed; cancelling by message", exc_info=True)
        try:
            self.client.cancel(futures, reason=reason)
        except Exception:  # the client is closing: the tasks die with it
            log.debug("cancelling %d Dask futures failed", len(futures), exc_info=True)

    def _fail_unrun(self, token: Token[Any], host: Host, exc: BaseException) -> None:
        host.finish(token, None, exc)
        host.settled(token)

    # -- events (on the client's event loop: note, or hand over; never run user code here) -------
    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        msg = event[1]
        key = msg.get(MSG_KEY)
        entry = self._inflight.get(key) if isinstance(key, str) else None
        if entry is None or entry.done:
            return
        kind = msg.get(MSG_KIND)
        if kind == EVENT_RETRY:
            exc = load_exception(msg.get(MSG_ERROR), str(msg.get(MSG_REPR)))
            self._errors.setdefault(entry.future.key, []).append(exc)
            started = float(msg.get(MSG_STARTED, 0.0))
            self._last_run[entry.future.key] = (str(msg.get(MSG_WORKER)), started)
        elif kind == EVENT_TIMEOUT:
            worker = str(msg.get(MSG_WORKER))
            entry.host.expire_later(lambda: self._expire(entry, worker))

    def _expire(self, entry: _Entry, worker: str) -> None:
        token = entry.token
        if entry.done or token.done():
            return
        timeout = token.spec.timeout or 0.0
        exc = TaskTimeout(
            f"{token.operation_type!r} (token {token.id}) ran longer than its timeout of "
            f"{timeout}s on Dask worker {worker}; a thread cannot be killed, so its late "
            f"result will be dropped"
        )
        token._ran_on = Place(None, worker, "dask")
        token.started_at = max(token.submitted_at, _perf() - timeout)
        errors = self._errors.pop(entry.future.key, [])
        self._last_run.pop(entry.future.key, None)
        self._end(entry, None, exc, errors, None)

    # -- completion ------------------------------------------------------------------------------
    def _collect(self) -> None:
        """The collector thread: settles what the loop gathered (user callbacks run here)."""
        if self._on_thread_start is not None:
            self._on_thread_start()
        get = self._ready.get
        while True:
            item = get()
            if item is _STOP:
                return
            batch, values = item
            for future in batch:
                entry = self._inflight.get(future.key)
                if entry is None or entry.future is not future:
                    continue
                try:
                    self._settle(entry, future, values.get(future.key))
                except Exception:  # a bug here must not stop the collector
                    log.exception("ending token %s from its Dask future failed", entry.token.id)
            # Hold nothing while waiting for the next batch: the last settled token (its
            # arguments, a shared object among them) must be freed as soon as its owner lets go.
            item = batch = values = future = entry = None

    def _settle(self, entry: _Entry, future: Any, outcome: Any) -> None:
        token, host, key = entry.token, entry.host, future.key
        if entry.done:  # timed out earlier: this is the late end of the run
            del self._inflight[key]
            if type(outcome) is Outcome and outcome.kind == OK:
                host.late(token, "result")
            return
        errors = self._errors.pop(key, [])
        value: Any = None
        exc: BaseException | None = None
        nested = None
        if type(outcome) is Outcome:
            token._ran_on = Place(None, outcome.worker, "dask")
            token.started_at = max(token.submitted_at, _perf() - (time.time() - outcome.started))
            nested = outcome.nested
            kind = outcome.kind
            if kind == OK:
                value = outcome.payload
            elif kind == DEADLINE:
                self.forget(token)
                token.started_at = None
                token._discard("deadline")
                host.settled(token)
                return
            elif kind == DEP_FAILED:
                exc = self._dependency_failure(entry) or DependencyFailed(
                    f"token {token.id} ({token.operation_type}) did not run: a dependency failed"
                )
                token.started_at = None
            else:
                exc = outcome.error()
        else:
            exc = self._remote_error(entry, future)
            # It ran (Dask re-ran it for each retry); the last retry event says where and when.
            worker, started = self._last_run.get(key, (None, 0.0))
            token._ran_on = Place(None, worker, "dask")
            token.started_at = max(token.submitted_at, _perf() - (time.time() - started))
        self._last_run.pop(key, None)
        if entry.deps:
            # A dependency that ended badly on the client's side (failed, discarded, timed out)
            # fails the dependent, whatever Dask did with it: one verdict, the client's.
            dep_exc = self._dependency_failure(entry)
            if dep_exc is not None:
                exc, value, nested, errors = dep_exc, None, None, []
                token.started_at = None
        self._end(entry, value, exc, errors, nested)

    def _end(
        self,
        entry: _Entry,
        value: Any,
        exc: BaseException | None,
        errors: list[BaseException],
        nested: dict[str, list[Any]] | None,
    ) -> None:
        token, host = entry.token, entry.host
        ran = token.started_at is not None
        # A retryable error that exhausted Dask's retries was published like the others: then
        # the last event is the final failure, not a retry.
        final_published = bool(errors) and exc is not None and type(exc) is type(errors[-1])
        retried = errors[:-1] if final_published else errors
        for attempt, err in enumerate(retried, 1):  # middleware sees each attempt's number
            token.attempts = attempt
            host.record_retried(token)
            host.after_attempt(token, "retried", err)
        token.attempts = len(retried) + 1 if ran else 0
        if nested:
            host.merge_nested(nested)  # before anyone is woken: get() then sees every count
        entry.done = True
        finished = host.finish(token, value, exc)
        if entry.future.status != "pending":
            self._inflight.pop(entry.future.key, None)
        # else: timed out while still running; kept so that its late end is logged
        if finished:
            if worker_log.isEnabledFor(_DEBUG):
                where = (token.worker or "dask").upper()
                if exc is None:
                    worker_log.debug("[%s] ✓ Completed %s", where, token.id)
                else:
                    worker_log.debug(
                        "[%s] ✗ Failed %s: %s: %s", where, token.id, type(exc).__name__, exc
                    )
        else:
            host.late(token, "result" if exc is None else "error")
        host.settled(token)

    def _dependency_failure(self, entry: _Entry) -> BaseException | None:
        for dep in entry.deps:
            if dep.done() and _failed(dep):
                return _dependency_error(entry.token, dep)
        return None

    def _remote_error(self, entry: _Entry, future: Any) -> BaseException:
        token = entry.token
        if future.status == "error":
            try:
                exc = future.exception()
                tb = future.traceback()
            except Exception as err:  # pragma: no cover - the client is closing
                exc, tb = err, None
            from distributed import KilledWorker

            if isinstance(exc, KilledWorker):
                crashed = WorkerCrashed(
                    f"the Dask workers running {token.operation_type!r} (token {token.id}) died "
                    f"while running it, more often than distributed.scheduler.allowed-failures "
                    f"allows (often the OS killing them for memory); Dask re-ran it on other "
                    f"workers before giving up"
                )
                crashed.__cause__ = exc
                return crashed
            error: BaseException = exc if tb is None else exc.with_traceback(tb)
            return error
        return TokenGateError(
            f"Dask dropped {token.operation_type!r} (token {token.id}) before it ended "
            f"(future {future.status}); the scheduler or the client went away"
        )

    # -- shutdown --------------------------------------------------------------------------------
    def close(self, *, wait: bool = True) -> None:
        """Stop the collector (after what is already queued) and unsubscribe."""
        self._ready.put(_STOP)
        if wait and self._thread is not threading.current_thread():
            self._thread.join(5)
        for topic in list(self._topics):
            try:
                self.client.unsubscribe_topic(topic)
            except Exception:
                log.debug("unsubscribing %s failed", topic, exc_info=True)
        self._topics.clear()


def _scheduler_cancel() -> Callable[..., Any]:
    """A function for ``run_on_scheduler`` that handles a ``cancel-keys`` message right away.

    The client batches its messages, so a task submitted a moment ago may not have reached the
    scheduler yet: the function first waits (on the scheduler's event loop, at most a second)
    until every key is known. Defined inside a function so that cloudpickle sends it by value:
    the scheduler need not have tokengate installed.
    """

    async def cancel(keys: list[str], client: str, reason: str, dask_scheduler: Any = None) -> None:
        import asyncio
        import time as _time

        tasks = dask_scheduler.tasks
        give_up = _time.monotonic() + 1.0
        while any(key not in tasks for key in keys) and _time.monotonic() < give_up:
            await asyncio.sleep(0.002)
        dask_scheduler.stream_handlers["cancel-keys"](
            keys=keys, client=client, force=False, reason=reason, msg=None
        )

    return cancel


def unsendable(token: Token[Any], target: Any, exc: BaseException) -> BaseException:
    """Why Dask could not take ``token``: a :class:`SerializationError` naming the function or
    the argument that cannot be pickled (found only now, on the error path), else a
    :class:`TokenGateError` wrapping Dask's own error (a closing client, say)."""
    from ..lanes._wire import _culprit, _reason, _type_name

    found = _culprit(target, "the function")
    if found is None:
        for i, arg in enumerate(token.args):
            found = _culprit(_without_tokens(arg), f"argument {i + 1}")
            if found is not None:
                break
        else:
            for name, arg in token.kwargs.items():
                found = _culprit(_without_tokens(arg), f"keyword argument {name!r}")
                if found is not None:
                    break
    what = f"{token.operation_type!r} (token {token.id})"
    error: BaseException
    if found is None:
        error = TokenGateError(f"Dask refused {what}: {type(exc).__name__}: {exc}")
    else:
        where, value = found
        error = SerializationError(
            f"cannot send {where} of {what} to a Dask worker: a {_type_name(value)} cannot be "
            f"pickled ({_reason(value)}). Pass picklable values (plain data, module-level "
            f"functions and classes)"
        )
    error.__cause__ = exc
    return error


def _without_tokens(value: Any) -> Any:
    """``value`` with Token arguments blanked (Dask sends their results, not them)."""
    return replace_tokens(value, _blank)


def _blank(_token: Token[Any]) -> None:
    return None


def _remote(value: Any, remote: dict[int, Any]) -> Any:
    """A Token becomes its Dask future (Dask hands its outcome to the task on the cluster), or its
    value if it had already ended; lists, tuples and dicts are rebuilt around them."""

    def replace(token: Token[Any]) -> Any:
        future = remote[id(token)]
        return token.result(0) if future is None else future

    return replace_tokens(value, replace)
