"""OperationsCoordinator: the public face of tokengate, its settings and its lifecycle.

A coordinator validates a call, makes its :class:`Token` and counts it, then hands it to its
backend, which runs it: the local backend (``local/``: threads pinned to cores, worker
processes, I/O pools, an event loop) or the Dask backend (``backends/``). Every run ends through
the one completion path (``_completion.py``). The design (the flow, the invariants, the state
machines, the backend protocol) is written up in ``docs/design.md``.

The flow of one call::

    fib(30) ──> TaskFunction.__call__ ──> OperationsCoordinator._submit
        │  admission paused (Overflow Guard)? wait; not running? refuse; before_submit hooks
        │  Backend.prepare (the local backend pickles a process-lane call here)
        │  Token created, counted as submitted (before it can possibly finish)
        └─> Backend.submit ──> ... a worker runs it ...──> Completion.complete
                                                           resolve / retry / fail

Its lifecycle is the state machine of ``_state.py``; what happens at interpreter exit and after
``fork()`` is in ``_lifecycle.py``. Optional policies (:class:`Middleware`) see submissions and
the end of every attempt; with none installed they cost one truthiness check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from . import _banner, _lifecycle, _runtime
from ._admission import AdmissionGate, AdmissionStatus
from ._affinity import AffinityPolicy
from ._backlog import Backlog
from ._byte_budget import ByteBudget
from ._completion import Completion
from ._config import CoordinatorConfig
from ._control import Controls
from ._convergence import ConvergenceEngine
from ._errors import ConfigError, CoordinatorNotRunning, TokenGateError
from ._executor import TokenGateExecutor, make_executor
from ._logging import attach_verbose_handlers, detach_verbose_handlers
from ._middleware import HOOKS, Middleware, overridden
from ._quarantine import HoldRule, Quarantine
from ._rate import RateLimiter
from ._retry import RetryPolicy
from ._run_watch import watcher
from ._state import CoordinatorState, Lifecycle
from ._stats import StatsRecorder, StatsSnapshot
from ._submission import Submission
from ._throttle import StorageThrottle, TierStats
from ._timers import TimerQueue
from ._token import Token, check_timeout, in_done_callback
from ._topology import Topology, detect_topology
from .backends import Backend, resolve_backend
from .dashboard._serving import Dashboards
from .lanes._base import Lane, Worker
from .lanes._sharing import with_shared
from .local import LocalBackend
from .observability._facade import Observability

if TYPE_CHECKING:
    from ._decorator import TaskFunction
    from .observability import GuardHouse, OverflowGuard, Span, TokenGateCollector

__all__ = ["OperationsCoordinator"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

log = logging.getLogger("tokengate.coordinator")
_DEBUG = logging.DEBUG
_INFO = logging.INFO
_perf = time.perf_counter
S = CoordinatorState
_STOPPING = frozenset((S.DRAINING, S.DISCARDING, S.CLOSING))
_STOPPABLE = frozenset((S.DRAINING, S.DISCARDING))


class _BackendHost:
    """What the backend may ask of its coordinator (``backends._base.BackendHost``)."""

    def __init__(self, c: OperationsCoordinator) -> None:
        self.config = c.config
        self.topology = c.topology
        self.core_count = c.core_count
        self.affinity = c.affinity
        self.policies = c._policies
        self.gate = c._gate
        self.lifecycle = c._life
        self.completion = c._completion
        self.backlog = c._backlog
        self.throttle = c.throttle
        self.byte_budget = c._queued_bytes
        self.stats = c._stats
        self.owner: object = c
        self.call_later = c._call_later
        self.defer = c._defer
        self.count_event = c.count_event
        self.on_worker_thread = c._on_worker_thread
        self.on_internal_thread = c._on_internal_thread


class OperationsCoordinator:
    """Runs decorated functions as tokens on core-pinned workers with bounded mailboxes.

    Use it as a context manager (``with`` or ``async with``), or call :meth:`start` and
    :meth:`stop`. Keyword arguments are those of :class:`CoordinatorConfig` (or pass
    ``config=``); they are validated here. ``backend="dask"`` (with ``address=`` for a running
    scheduler) or a ``Backend`` object runs the tokens elsewhere than the local lanes (see
    ``tokengate.backends``).

    The public surface (a test keeps it to exactly these names):

    * lifecycle: :meth:`start`, :meth:`wait_ready`, :meth:`stop`, :attr:`running`;
    * work: :meth:`submit`, :meth:`submit_async`, :meth:`executor`, :meth:`share`;
    * policies: :meth:`add_middleware`, :attr:`middleware` (see :class:`Middleware`),
      :meth:`set_storage_limit`, :meth:`count_event` (an event of your own in the stats);
    * observation: :meth:`stats`, :meth:`tier_stats`, :attr:`admission`, :meth:`queue_depths`,
      :attr:`lanes`, :meth:`iter_workers`, :attr:`convergence`, :attr:`backend`, and from the
      observability component :attr:`guard_house`, :attr:`overflow_guard`,
      :meth:`serve_metrics`, :meth:`serve_dashboard` (with :attr:`dashboard_url`),
      :meth:`metrics_collector`, :meth:`trace_spans`,
      :meth:`export_trace`, and :meth:`live` (the demos' live view while a block runs);
    * operator controls (``_control.py``): :meth:`pause` / :meth:`resume` (admission, or one
      operation type), :meth:`drain`, :meth:`cancel_queued`, :meth:`kill`,
      :attr:`paused_operations`; token interception (``_quarantine.py``): :meth:`hold_when`,
      :attr:`quarantine`, :meth:`release`, :meth:`reject`;
    * for tests: :attr:`rate_limiter` (``rate_limiter.poll(now)`` steps the rate limits' clock);
    * read-only facts, set at construction: ``config`` (the :class:`CoordinatorConfig`),
      ``topology`` (the :class:`Topology` it sized itself from), ``core_count`` (cores used),
      ``affinity`` (which cores each weight may use: ``affinity.allowed("heavy")``,
      ``affinity.preferred("light")``) and ``throttle`` (the storage tiers' permits, read
      through :meth:`tier_stats`).

    One still running when the main thread ends is stopped then, waiting for its tokens as
    ``concurrent.futures`` does; in a child forked from its process it refuses every call
    (``_lifecycle.py``).
    """

    def __init__(
        self,
        *,
        config: CoordinatorConfig | None = None,
        topology: Topology | None = None,
        backend: str | Backend | None = "local",
        address: str | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise TokenGateError(
                f"pass either config= or keyword options, not both (got {sorted(options)})"
            )
        if config is None:
            try:
                config = CoordinatorConfig(**options)
            except TypeError as exc:
                known = ", ".join(CoordinatorConfig.__dataclass_fields__)
                raise TokenGateError(f"{exc}; known options are {known}") from None
        self.config = config
        self._backend: Backend = resolve_backend(backend, address) or LocalBackend()
        self.topology = topology if topology is not None else detect_topology()
        cores = self.topology.core_count
        if config.cores is not None:
            cores = min(cores, config.cores)
        self.core_count = cores
        self.affinity = AffinityPolicy(cores)
        self.throttle = StorageThrottle(config.storage_limits)
        self._stats = StatsRecorder()
        self._gate = AdmissionGate()
        self._life = Lifecycle()
        # The bytes of pickled arguments that queued process-lane calls hold (_byte_budget.py).
        byte_limit = config.process_queue_bytes
        assert not isinstance(byte_limit, str)  # CoordinatorConfig parsed it
        self._queued_bytes = ByteBudget(byte_limit, self._gate)
        self._reject = config.admission == "reject"
        self._policies: dict[str, RetryPolicy] = {
            w: config.policy_for(w) for w in ("light", "medium", "heavy")
        }
        self._lock = threading.Lock()
        self._timers: TimerQueue | None = None
        self._middleware: list[Middleware] = []
        self._hooks: dict[str, list[Callable[..., Any]]] = {hook: [] for hook in HOOKS}
        self._verbose_handlers: list[Any] = []
        # Rate limits (``rate`` tag): buckets and FIFOs per operation, re-admitted by a timer.
        self._rate = RateLimiter(self._call_later, on_error=self._fail_internal)
        self._completion = Completion(
            backend=self._backend,
            stats=self._stats,
            throttle=self.throttle,
            rate=self._rate,
            policies=self._policies,
            lifecycle=self._life,
            hooks=self._hooks,
        )
        self._backlog = Backlog(self._gate, self._life, self._rate, self.throttle)
        self._submission = Submission(
            owner=self,
            backend=self._backend,
            lifecycle=self._life,
            gate=self._gate,
            completion=self._completion,
            stats=self._stats,
            backlog=self._backlog,
            rate=self._rate,
            byte_budget=self._queued_bytes,
            before_submit=self._hooks["before_submit"],
            reject=self._reject,
        )
        # What decorated functions and executors call, bound once (see _submission.py).
        self._submit = self._submission.submit
        self._submit_async = self._submission.submit_async
        self._release_held = self._submission.release_held
        self._failed_token = self._submission.failed_token
        self._retries_left = self._completion.retries_left  # a call failed inside a batch
        self._observability = Observability(
            config, self._stats, self._gate, self.add_middleware, self._life
        )
        # The web dashboard (dashboard/_serving.py): served at start with dashboard=True.
        dash_port = None if config.dashboard is False else int(config.dashboard)
        self._dashboards = Dashboards(dash_port, self.add_middleware, self._life)
        self._controls = Controls(self._gate, self.add_middleware)  # pause, drain, kill...
        # Hold rules and held tokens (_quarantine.py); submission reads the rules list directly.
        self._quarantine = Quarantine()
        self._submission.quarantine = self._quarantine
        self._submission.hold_rules = self._quarantine.rules
        self._host = _BackendHost(self)
        self._backend.configure(self._host)  # a bad lane option raises here, not at start

    def _fail_internal(self, token: Token[Any], exc: BaseException) -> None:
        self._completion.fail_internal(token, exc)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> OperationsCoordinator:
        """Start the workers; calls made from now on go to this coordinator."""
        life = self._life
        if life.state is S.FORKED:  # before the lock: a parent thread may have held it
            raise _lifecycle.fork_refusal(
                "this coordinator cannot be started again", self._submission.pid
            )
        if _runtime.exiting:  # the exit drain ran already: nothing would wait for this one
            raise CoordinatorNotRunning(
                "cannot start a coordinator while the interpreter is exiting: running "
                "coordinators were drained already and nothing would wait for this one's work "
                "(as concurrent.futures refuses new work after interpreter shutdown). Start it "
                "before the main thread ends, and stop() it (or use `with`) before then"
            )
        left = life.move(S.STARTING, allowed_from=frozenset((S.NEW, S.STOPPED)))
        if left not in (S.NEW, S.STOPPED):
            raise TokenGateError(
                "this OperationsCoordinator is already running; call stop() before starting "
                "it again, or create a second coordinator"
            )
        self._submission.pid = os.getpid()
        cfg = self.config
        if cfg.verbose or cfg.convergence_verbose:
            self._verbose_handlers = attach_verbose_handlers(
                verbose=cfg.verbose, convergence=cfg.convergence_verbose
            )
        _banner.log_start_banner(self)
        self._timers = TimerQueue()
        self._timers.on_thread_start = self._on_internal_thread
        self._completion.timers = self._timers
        self._stats.reset_clock()
        try:
            self._backend.start(self._host)
        except BaseException:  # if the backend cannot start, neither does the coordinator
            self._timers.close()
            detach_verbose_handlers(self._verbose_handlers)
            self._verbose_handlers = []
            life.move(S.STOPPED)
            raise
        life.move(S.RUNNING)
        _runtime.push_coordinator(self, self._forked)
        for hook in self._hooks["on_start"]:
            hook(self)
        if log.isEnabledFor(_DEBUG):
            _banner.log_started(self)
        if log.isEnabledFor(_INFO):  # the one start-up line at INFO; the detail is DEBUG
            log.info("Operations Coordinator started successfully!")
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker can take a task at once; False if ``timeout`` seconds pass
        first.

        The process lane starts a worker process with the first task that needs it (each
        takes a fraction of a second to start, more on a loaded machine), so that a program
        running no heavy task starts none; this starts every one now and waits for them. Call
        it first when the first calls' latency matters, as a benchmark's clock or a server's
        readiness check does. On the Dask backend: until at least one worker has joined the
        scheduler.
        """
        wait = check_timeout(timeout)
        if self._life.state is not S.RUNNING:
            raise CoordinatorNotRunning(
                f"wait_ready() needs a running coordinator (this one is "
                f"{self._life.state.name}): call start() first, or use it as a context manager"
            )
        return self._backend.wait_ready(wait)

    @property
    def backend(self) -> Backend:
        """The backend running the tokens: the local lanes (``backend.name == "local"``), or
        e.g. a :class:`~tokengate.backends.DaskBackend`."""
        return self._backend

    @property
    def convergence(self) -> ConvergenceEngine | None:
        """The running convergence engine (None when ``convergence=False`` or stopped)."""
        return self._backend.convergence

    def _defer(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` soon on the timer thread: for a thread that must never run
        user code (the loop watchdog). A call the timers never ran (they closed first) runs
        on the thread that stops the coordinator (``_shutdown_workers``), or here if closed."""
        timers = self._timers
        if timers is not None:
            try:
                timers.call_later(0, self._run_deferred, callback, args)
                return
            except RuntimeError:  # the timer queue closed (stop): nothing else will run it
                pass
        callback(*args)

    def _run_deferred(self, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        callback(*args)

    def _call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Any:
        timers = self._timers
        if timers is None:
            raise RuntimeError("timer queue is closed")
        return timers.call_later(delay, callback, *args)

    # -- middleware ----------------------------------------------------------------------------
    def add_middleware(self, middleware: Middleware) -> None:
        """Install a policy; only the hooks it overrides are ever called."""
        self._middleware.append(middleware)
        for hook in HOOKS:
            if overridden(middleware, hook):
                self._hooks[hook].append(getattr(middleware, hook))
        run_watcher = watcher(middleware)
        if run_watcher is not None:  # it watches run times (_run_watch.py)
            completion = self._completion
            completion.run_watchers += (run_watcher,)
            self._stats.watch_runs(completion.run_watchers)
            completion.watch_runs = True
        if self._life.state is S.RUNNING and overridden(middleware, "on_start"):
            middleware.on_start(self)

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The installed middleware, in the order installed (the observability's first)."""
        return tuple(self._middleware)

    def stop(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop accepting work, finish it, and stop every worker.

        By default the coordinator drains: every token already submitted runs to its end
        (including retries). With ``cancel_pending=True`` tokens that have not started are
        discarded instead. ``timeout`` bounds the drain; what has not started by then is
        discarded, and a thread still stuck in user code is left behind (it is a daemon thread)
        and logged. Once stop() discards what has not started (``cancel_pending``, or the
        timeout ran out), producers still waiting for mailbox room get their token back
        discarded, and a running task that fails is not retried: it fails with its error.
        Whatever is left behind still ends in a terminal state and is counted. Calling
        ``stop()`` on a coordinator that is not running does nothing.
        """
        timeout = check_timeout(timeout)
        life = self._life
        if life.state is S.FORKED:  # the parent's workers: not ours to stop, none to wait for
            return
        if _runtime.local.coordinator is self:
            if in_done_callback():
                where = (
                    "from a done-callback, which runs on the coordinator's own thread that "
                    "finished the token"
                )
            else:
                where = "from inside one of this coordinator's own tasks"
            raise TokenGateError(
                f"stop() was called {where}; it would wait for itself. Call stop() from the "
                f"thread that started the coordinator (a callback can set an Event it waits on)."
            )
        if life.move(S.DRAINING, allowed_from=frozenset((S.RUNNING,))) is not S.RUNNING:
            return
        try:
            if self._quarantine.held:  # held for the operator: the drain must not wait
                self._quarantine.discard_all()
            # Inside the try: a Ctrl-C landing from here on (while the engine's thread is
            # joined, say) must still shut the workers down, or the coordinator stays
            # stopping for good.
            if log.isEnabledFor(_DEBUG):
                log.debug("Stopping Operations Coordinator...")
            self._backend.draining()  # no resizing from now on
            if cancel_pending:
                self._give_up_pending()
                self._discard_pending("stopped")
            if not self._completion.wait_drained(timeout):
                self._give_up_pending()
                left = self._discard_pending("stopped")
                log.warning(
                    "stop(timeout=%s): %d tokens discarded before they started; tasks still "
                    "running are left to finish on their own",
                    timeout,
                    left,
                )
        finally:
            self._shutdown_workers()

    def _forked(self) -> None:
        """In a forked child (``_lifecycle.py``): this coordinator's workers exist only in the
        parent, so it refuses every call from now on. Only the forking thread exists here and
        a lock may be held for ever: set plain attributes, take nothing."""
        self._life.forked()
        backend = self._backend
        if isinstance(backend, LocalBackend):
            backend.forget_after_fork()

    def _give_up_pending(self) -> None:
        self._life.move(S.DISCARDING, allowed_from=frozenset((S.DRAINING,)))
        self._gate.notify()  # producers waiting for room re-check and give up

    def _shutdown_workers(self) -> None:
        timers = self._timers
        if log.isEnabledFor(_DEBUG):
            log.debug("[GATE] Admission gate stopped")
            log.debug("[CORE_PINNED_QUEUE] Stopping all workers...")
        self._life.move(S.CLOSING, allowed_from=_STOPPABLE)
        self._gate.notify()  # producers waiting for room re-check and give up
        stuck = self._backend.stop()
        # Whatever reached a mailbox, a permit queue or a backlog before the workers closed:
        # nobody will run it now (stuck workers skip discarded tokens).
        self._discard_pending("stopped")
        for worker in stuck:
            log.warning(
                "[%s] still running %r after stop; it is a daemon thread and is left behind",
                worker.name,
                worker.current,
            )
        if timers is not None:
            for handle in timers.close():
                if handle.callback == self._run_deferred:  # a completion that must happen
                    self._run_deferred(*handle.args)
                    continue
                for arg in handle.args:
                    if isinstance(arg, Token):
                        arg._discard("stopped")
        _runtime.pop_coordinator(self)
        self._life.move(S.STOPPED, allowed_from=frozenset((S.CLOSING,)))
        for hook in self._hooks["on_stop"]:
            try:
                hook(self)
            except Exception:
                log.exception("middleware on_stop hook %r raised", hook)
        if log.isEnabledFor(_DEBUG):
            log.debug("[CORE_PINNED_QUEUE] All workers stopped")
            log.debug("All components stopped")
        if log.isEnabledFor(_INFO):  # the one shutdown line at INFO; the detail is DEBUG
            log.info("Operations shutdown complete!")
        detach_verbose_handlers(self._verbose_handlers)
        self._verbose_handlers = []

    def __enter__(self) -> OperationsCoordinator:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # Leaving on an exception (Ctrl-C included): drop what has not started, finish the rest.
        self.stop(cancel_pending=exc_type is not None)

    async def __aenter__(self) -> OperationsCoordinator:
        """``async with OperationsCoordinator():`` starts it on a thread (starting a backend
        may connect to a cluster), so the event loop runs on meanwhile."""
        import asyncio

        return await asyncio.to_thread(self.start)

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Stops it as ``__exit__`` does, but the drain waits on a thread: the event loop keeps
        running its other coroutines, including those that feed or wait on the draining tokens."""
        import asyncio

        if _runtime.local.coordinator is self:  # (stop() on another thread could not tell)
            raise TokenGateError(
                "`async with` this coordinator was left from inside one of its own tasks; "
                "stopping would wait for itself. Use it from the code that started it."
            )
        await asyncio.to_thread(self.stop, cancel_pending=exc_type is not None)

    @property
    def running(self) -> bool:
        """Whether it takes calls: started, and not yet stopping or stopped."""
        return self._life.state is S.RUNNING

    def _discard_pending(self, reason: str) -> int:
        """Discard every token that has not started; returns how many were discarded."""
        # The backend's first: the tokens parked for dependencies go before what they wait on
        # (discarded as stopped, rather than failed for a discarded dependency).
        sources: list[Token[Any]] = self._backend.not_started()
        sources += self.throttle.drain_waiting()
        sources += self._rate.drain_waiting()
        sources += self._completion.take_backing_off()
        sources += self._submission.take_held()
        count = 0
        for token in sources:
            if not token.done() and token._discard(reason):
                count += 1
        return count

    # -- submission ---------------------------------------------------------------------------
    @overload
    def submit(self, fn: TaskFunction[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Token[R]: ...

    @overload
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Token[T]: ...

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Token[Any]:
        """Run ``fn(*args, **kwargs)`` as a token of this coordinator and return the
        :class:`Token` at once.

        A function decorated with :func:`task_token_guard` keeps its tags (weight, storage
        tier, retries, timeout...; a decorated method is bound as usual); any other callable
        runs as a ``light`` task whose operation type is the callable's name (an ``async def``
        one on the coordinator's event loop), and is not kept alive once its token ends. As
        with a decorated call, tokens among the arguments (also inside a list, tuple or dict)
        are dependencies: ``fn`` runs once they resolved, with their values in their place, and
        fails with :class:`DependencyFailed` if one fails. ``coordinator.submit(f, x)`` does
        what ``f(x)`` does with this coordinator running, and also works when several
        coordinators run or ``f`` is not decorated.

        Raises :class:`CoordinatorNotRunning` before :meth:`start` and after :meth:`stop`;
        with ``admission="reject"`` :class:`Overloaded` when every mailbox its weight may use is
        full (with ``"block"``, the default, the call waits for room instead);
        :class:`OperationBlocked` while the Guard House blocks the operation;
        :class:`SerializationError` when the task runs in a worker process and an argument
        cannot be pickled (nothing is counted then). Calls made from inside a running task
        never wait for room. In ``async`` code use :meth:`submit_async`, which awaits room
        instead of blocking the event loop.
        """
        from ._decorator import adhoc_task

        task, args = adhoc_task(fn, args)
        return self._submit(task, args, kwargs, _runtime.local.coordinator is self)

    # -- submission from asyncio code ----------------------------------------------------------
    async def submit_async(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Token[T]:
        """Submit from asyncio code: ``token = await coordinator.submit_async(fn, x)``.

        Takes the same arguments and returns the same :class:`Token` as :meth:`submit`
        (dependencies among the arguments included).

        Where :meth:`submit` would block its thread until there is room (full mailboxes, a full
        storage-tier queue), this *awaits* the room, so the caller's event loop keeps running
        while the coordinator is saturated. It returns the Token once admitted; ``await token``
        for the result. Calls made on the coordinator's own threads and loop never wait. With
        ``admission='reject'`` a full mailbox raises ``Overloaded`` at once, as ``submit`` does.
        """
        from ._decorator import adhoc_task

        task, args = adhoc_task(fn, args)
        return await self._submit_async(task, args, kwargs)

    @property
    def rate_limiter(self) -> RateLimiter:
        """The rate limits of ``rate``-tagged operations (their figures are in :meth:`stats`):
        ``rate_limiter.poll(now)`` releases what is due at ``now``, a ``time.monotonic()``
        instant; tests step time with it instead of waiting for the timer."""
        return self._rate

    # -- threads ----------------------------------------------------------------------------
    def _on_worker_thread(self, worker: Worker) -> None:
        _runtime.local.coordinator = self
        _runtime.local.worker = worker

    def _on_internal_thread(self) -> None:
        _runtime.local.coordinator = self

    def count_event(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the event counter ``name``: it shows in ``stats().events`` and the
        metrics' ``tokengate_events_total`` (the lanes count restarts and swaps this way; a
        middleware of yours may count its own events too)."""
        self._stats.count_event(name, n)

    # -- observation ------------------------------------------------------------------------------
    def stats(self, label: str = "STATS") -> StatsSnapshot:
        """A frozen snapshot of the counts and latencies; ``str()`` of it is the Quick-Proof's
        stats block."""
        return with_shared(
            self._stats.snapshot(
                label, queued_bytes=self._queued_bytes.reading(), rate=self._rate.stats()
            )
        )

    def share(self, obj: T) -> T:
        """Place ``obj``'s big buffers in shared memory once and return an equal, read-only
        object built on them: pass it (or slices of it) to any number of process-lane calls
        and no bytes are copied per call; the worker maps the same memory. The memory is
        freed once the returned object is gone here and the last token using it has ended.
        On the Dask backend (started) ``obj`` is scattered to every worker once and returned
        as it is: calls that pass it send its Dask key, not its bytes. See
        docs/guide/data.md."""
        return self._backend.share(obj)

    def tier_stats(self) -> Mapping[str, TierStats]:
        """Per storage tier: limit, running, waiting and the high-water mark of running."""
        return self.throttle.stats()

    def set_storage_limit(self, tier: str, limit: int) -> None:
        """Resize a storage tier's limit while running."""
        if not isinstance(tier, str):
            raise ConfigError(
                f"storage tier must be a name such as 'FAST', got {type(tier).__name__} {tier!r}"
            )
        self._backend.resized(self.throttle.resize(tier.upper(), limit))

    def queue_depths(self, lane: str = "thread") -> dict[int, list[int]]:
        """Per core, the load (queued + running) of each worker's mailbox in ``lane``."""
        found = self._backend.lanes.get(lane)
        if found is None:
            return {}
        return {core: [w.load() for w in workers] for core, workers in found.by_core.items()}

    @property
    def lanes(self) -> Mapping[str, Lane]:
        """The running lanes by name (``thread``, and ``process``/``io``/``async`` if enabled)."""
        return dict(self._backend.lanes)

    def iter_workers(self) -> Iterator[Worker]:
        """Every worker of every running lane (a snapshot: the convergence engine resizes)."""
        return iter([w for lane in self._backend.lanes.values() for w in lane.workers])

    def executor(
        self,
        *,
        weight: str = "light",
        storage_speed: str | None = None,
        executor: str = "auto",
        operation_type: str | None = None,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        **tags: Any,
    ) -> TokenGateExecutor:
        """A ``concurrent.futures.Executor`` whose work runs as tokens with these tags.

        Plug tokengate into anything that takes an executor, e.g.
        ``await loop.run_in_executor(coordinator.executor(storage_speed="FAST"), fn, arg)``
        or ``pool.map(fn, items)``. ``submit`` returns a ``concurrent.futures.Future`` (a token
        underneath: it shows in :meth:`stats`, the Guard House and the trace).

        ``weight``, ``storage_speed``, ``executor`` (``"auto"``, ``"thread"`` or
        ``"process"``) and ``operation_type`` (default: each callable's name) are the tags of
        :func:`task_token_guard`; further tags (``timeout``, ``retries``, ``retry_on``, ...) go
        in ``**tags`` and a misspelt one raises :class:`ConfigError` here. Unlike a decorated
        call, and as the standard library's executors do, each call runs once (no retries
        unless ``retries`` or ``retry_on`` is given) and its arguments are passed untouched
        (a token or future among them is not waited for). ``max_workers`` caps how many of
        this executor's calls run at once (the others wait on no worker);
        ``initializer(*initargs)`` runs before the first call on each worker thread (each
        worker process for process work). ``shutdown()`` ends this executor only; the
        coordinator keeps running. See :class:`TokenGateExecutor`.
        """
        return make_executor(
            self,
            weight=weight,
            storage_speed=storage_speed,
            executor=executor,
            operation_type=operation_type,
            max_workers=max_workers,
            initializer=initializer,
            initargs=initargs,
            **tags,
        )

    def live(
        self, *, title: str = "tokengate", interval: float = 2.0, file: IO[str] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Show the demos' live view of this coordinator while the ``with`` block runs.

        ``with coordinator.live(): ...``: on a terminal with rich installed (the ``cli`` extra),
        token counts, latencies, each lane's worker load and the storage tiers, redrawn four
        times a second on standard error (or ``file``); what the program prints meanwhile
        appears above it. Elsewhere, a plain stats line every ``interval`` seconds and one at
        the end, logged at INFO on ``tokengate.progress`` (written to the stream if logging is
        not configured).
        """
        from ._progress import live

        return live(self, title=title, interval=interval, file=file)

    @property
    def admission(self) -> AdmissionStatus:
        """A snapshot of admission: producers waiting for room, and why it is paused if it is."""
        return self._gate.status()

    # -- observability: the Observability component's, forwarded ------------------------------
    @property
    def guard_house(self) -> GuardHouse:
        """The passive per-operation monitor (and circuit breaker with ``auto_block=True``)."""
        return self._observability.guard_house

    @property
    def overflow_guard(self) -> OverflowGuard:
        """The memory budget guard (``overflow_guard.status()``, ``.budget``)."""
        return self._observability.overflow_guard

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve Prometheus metrics over HTTP at ``/metrics``; returns the bound port.

        ``port=0`` picks a free port. The server reads the coordinator at scrape time only and
        stops with the coordinator. Needs ``pip install 'tokengate[metrics]'``.
        """
        return self._observability.serve_metrics(self, port, addr)

    # -- operator controls (_control.py) and token interception (_quarantine.py) ------------
    def pause(self, operation: str | None = None) -> None:
        """Pause admission (or, given ``operation``, the calls of that operation type).

        Callers block as under backpressure (``admission='reject'`` refuses them with
        :class:`Overloaded` instead) until :meth:`resume`; work already admitted runs on and
        nothing is dropped. Calls made by running tasks are not held. Logged on
        ``tokengate.control``, as every control is.
        """
        self._controls.pause(operation)

    def resume(self, operation: str | None = None) -> None:
        """Undo :meth:`pause` (or, given ``operation``, its pause or :meth:`drain`)."""
        self._controls.resume(operation)

    def drain(self, operation: str) -> None:
        """Refuse new calls of ``operation`` (:class:`OperationBlocked`, saying why) while the
        tokens already queued finish; :meth:`resume` accepts calls again."""
        self._controls.drain(operation)

    @property
    def paused_operations(self) -> dict[str, str]:
        """Operation types paused or draining by the operator: name -> ``paused``/``draining``."""
        return self._controls.paused_operations()

    def cancel_queued(self, operation: str) -> int:
        """Discard the tokens of ``operation`` waiting in a worker's mailbox; returns how many.

        Each ends discarded with reason ``"cancelled by operator"``; running ones run on.
        """
        return self._controls.cancel_queued(self, operation)

    def kill(self, token: Token[Any]) -> str:
        """End one token now: one not yet running is discarded; one running on the process
        lane has its worker process killed (and replaced) and ends discarded with reason
        ``"killed by operator"``. A token running on a thread cannot be stopped safely, so
        that is refused with :class:`TokenGateError` saying so. Returns what was done.
        """
        return self._controls.kill(self, token)

    def hold_when(self, rule: HoldRule, *, operation: str | None = None) -> None:
        """Send the calls ``rule(spec, args, kwargs)`` picks to quarantine before they run.

        ``rule`` returns why to hold a call (a string shown to the operator, or ``True``), or a
        false value to let it through; ``operation`` limits it to one operation type. Held
        tokens are counted and wait in :attr:`quarantine` until :meth:`release` or
        :meth:`reject`; ``stop()`` discards those still held. Calls from running tasks are
        never held. An exception from ``rule`` reaches the caller, and nothing is counted.

        A rule that is also :class:`Middleware` (the Guard House's :class:`AnomalyRule`, which
        learns each operation's history from its runs) is installed as middleware too.
        """
        self._quarantine.hold_when(rule, operation)
        learner: object = rule  # a callable Middleware subclass, which HoldRule's type hides
        if isinstance(learner, Middleware) and learner not in self._middleware:
            self.add_middleware(learner)

    @property
    def quarantine(self) -> Mapping[Token[Any], str]:
        """The tokens held in quarantine now, each with why it was held, oldest first."""
        return self._quarantine.tokens()

    def release(self, token: Token[Any]) -> bool:
        """Let a quarantined token run (admitted as if just called); False if it was not held."""
        return self._quarantine.release(self, token)

    def reject(self, token: Token[Any], reason: str = "rejected by operator") -> bool:
        """End a quarantined token discarded with ``reason``; False if it was not held."""
        return self._quarantine.reject(token, reason)

    def serve_dashboard(self, port: int = 0, addr: str = "127.0.0.1") -> str:
        """Serve the live web dashboard; returns its URL, access token included.

        Open the URL in a browser: totals, rates and latencies, workers, storage tiers, the
        Guard House and the Overflow Guard, the task stream, token look-up and the operator
        controls, refreshed about once a second while a page is open (nothing is read while
        none is). ``port=0`` picks a free port. Only loopback listens unless ``addr`` names another
        address (e.g. ``"0.0.0.0"``), and every request needs the URL's token, so treat the URL
        as a password. The server stops with the coordinator. Needs
        ``pip install 'tokengate[dashboard]'``.
        """
        return self._dashboards.serve(self, port, addr)

    @property
    def dashboard_url(self) -> str | None:
        """The URL of the first dashboard served (``serve_dashboard``, ``dashboard=True``),
        access token included; None while none is served."""
        return self._dashboards.url

    def metrics_collector(self, **options: Any) -> TokenGateCollector:
        """A :class:`TokenGateCollector` for this coordinator, to register with your registry."""
        return self._observability.metrics_collector(self, **options)

    def trace_spans(self) -> list[Span]:
        """The buffered task spans, oldest first (``trace=True``)."""
        return self._observability.trace_spans()

    def export_trace(self, path: str | os.PathLike[str]) -> int:
        """Write the recent task spans to ``path`` as Chrome trace-event JSON; returns how many.

        Open the file in https://ui.perfetto.dev or ``chrome://tracing``: one track per worker,
        grouped by core. Needs ``trace=True``; the last ``trace_buffer`` attempts are kept.
        """
        return self._observability.export_trace(path)
