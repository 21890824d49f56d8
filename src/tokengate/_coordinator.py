"""OperationsCoordinator: owns the lanes and decides every token's fate in one place.

The design (the flow below, the invariants, the lane model, the lifecycle) is written up in
``docs/design.md``.

The flow of one token::

    fib(30) ──> TaskFunction.__call__ ──> OperationsCoordinator._submit
        │  Token created, counted as submitted (before it can possibly finish)
        ├─> DependencyTracker.park        (tokens among the arguments: wait, holding no worker)
        ├─> RateLimiter.hold              (its operation's rate used up: wait in its FIFO)
        ├─> StorageThrottle.try_acquire   (storage tier full: wait in the tier's FIFO)
        └─> _route: least-loaded mailbox among the weight's allowed cores, preferred core first;
                every allowed mailbox full -> AdmissionGate (block) or Overloaded (reject);
                once a token of non-zero priority was routed, push_by_priority keeps mailboxes
                sorted (higher first), else a plain append
                  │
            a lane's worker: mailbox.popleft -> run (thread lanes: claim + body) or claim, begin
                  │
            complete  (the one completion path every lane calls)
                ├─ resolve   -> Token._finish: stats recorded under the token's lock, waiters woken
                ├─ retry     -> Token._reopen, backoff timer, then to the back of the queue (FIFO)
                └─ fail      -> Token._finish with the original exception and traceback
            discards (cancel, deadline, stop) go through Token._discard -> _on_discarded

Releasing a storage permit hands it to the next waiting token, and a finished token's
done-callbacks release its dependents, so no thread ever polls for work.

With a backend (``backends/``, e.g. ``backend="dask"``) no lane is built: ``_submit`` hands the
counted token to ``Backend.submit``, and the backend ends it through the same ``Token._finish`` /
``Token._discard``, ``_record_terminal`` and middleware, so stats and logs read the same.

Lanes (``lanes/``) own workers and mailboxes and talk back only through the ``LaneHost`` object
(``_Host``: ``claim``, ``begin``, ``run``, ``complete``, ``after_token``..., bound to the private
methods of the same names). Which lane runs a spec is
decided once per spec by ``_lane_for``: ``async def`` tasks run on the coordinator's event loop
(``AsyncLane``), storage-tier tasks on the per-tier thread pools of the ``IOLane``, the rest on
the core-pinned ``ThreadLane``. The ``ConvergenceEngine`` (``_convergence.py``) resizes the
thread and I/O pools while running; it calls ``_workers_changed`` so cached routes are rebuilt.
Optional policies (``Middleware``) see submissions and the end of every attempt; with none
installed they cost one truthiness check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import IO, TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from . import _banner, _lifecycle, _runtime
from ._admission import AdmissionGate, AdmissionStatus
from ._affinity import AffinityPolicy
from ._byte_budget import ByteBudget
from ._config import CoordinatorConfig
from ._convergence import ConvergenceEngine, ConvergencePolicy
from ._dependencies import DependencyTracker, find_dependencies
from ._errors import (
    ConfigError,
    CoordinatorNotRunning,
    Overloaded,
    SerializationError,
    TaskTimeout,
    TokenGateError,
)
from ._executor import TokenGateExecutor, make_executor
from ._logging import attach_verbose_handlers, detach_verbose_handlers, level_answers
from ._middleware import HOOKS, Middleware, overridden
from ._priority import push_by_priority
from ._rate import RateLimiter
from ._run_watch import Watcher, deliver, watcher
from ._spec import STORAGE_TIERS, TaskSpec
from ._stats import StatsRecorder, StatsSnapshot
from ._throttle import StorageThrottle, TierStats
from ._timers import TimerQueue
from ._token import NO_KWARGS, PENDING, Token, check_timeout, in_done_callback, next_seq
from ._topology import Topology, detect_topology, gil_enabled
from .backends import Backend, resolve_backend
from .lanes._async import AsyncLane
from .lanes._base import BeginFn, ClaimFn, CompleteFn, Lane, LaneHost, Worker
from .lanes._io import IOLane
from .lanes._thread import ThreadLane
from .lanes._wire import ProcessCall, prepare_call
from .lanes.process import (
    ProcessLane,
    check_process_lane_option,
    runs_in_process,
)
from .observability._facade import Observability

if TYPE_CHECKING:
    from ._decorator import TaskFunction
    from .observability import GuardHouse, OverflowGuard, Span, TokenGateCollector

__all__ = ["OperationsCoordinator"]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

log = logging.getLogger("tokengate.coordinator")
routing_log = logging.getLogger("tokengate.routing")
worker_log = logging.getLogger("tokengate.worker")
retry_log = logging.getLogger("tokengate.retry")
stats_log = logging.getLogger("tokengate.stats")  # the seed's "[DEBUG] Recorded:" (issue 5)
# The hot path (route, complete) reads these before calling isEnabledFor: see level_answers.
_routing_answers = level_answers(routing_log)
_worker_answers = level_answers(worker_log)
_stats_answers = level_answers(stats_log)
_DEBUG = logging.DEBUG
_INFO = logging.INFO
_THREADED = frozenset(("thread", "io"))  # lanes whose workers are plain threads
_perf = time.perf_counter
# Argument types that can hold a Token (the dependency scan's fast path checks only these).
_MAYBE_DEPENDENCY = frozenset((Token, list, tuple, dict))


def _run_hooks(hooks: list[Callable[..., Any]], *args: Any) -> None:
    """Call each middleware hook; one that raises is logged and the others still run.

    ``SystemExit``/``KeyboardInterrupt`` are caught too, as for done-callbacks: the hooks run on
    worker, proxy and timer threads, mid-way through ending a token, where anything escaping
    would end the thread (and strand its mailbox) or leave the token's resources unreleased.
    """
    for hook in hooks:
        try:
            hook(*args)
        except BaseException:
            log.exception("middleware hook %r raised; the token is not affected", hook)


class _Host:
    """The coordinator's side of the lane contract (``LaneHost``), handed to every lane.

    Its attributes are the coordinator's own bound methods, looked up once here: a lane calls
    ``host.run(token, worker)`` at the cost of calling ``coordinator._run`` directly, and the
    coordinator keeps these methods out of its public surface.
    """

    __slots__ = (
        "after_token",
        "begin",
        "claim",
        "complete",
        "count_event",
        "fail_internal",
        "gate",
        "on_worker_thread",
        "run",
    )

    def __init__(self, coordinator: OperationsCoordinator) -> None:
        c = coordinator
        self.gate: AdmissionGate = c._gate
        self.claim: ClaimFn = c._claim
        self.begin: BeginFn = c._begin
        self.complete: CompleteFn = c._complete
        self.run: Callable[[Any, Any], bool] = c._run
        self.after_token: Callable[[Any], None] = c._after_token
        self.on_worker_thread: Callable[[Any], None] = c._on_worker_thread
        self.fail_internal: Callable[[Any, BaseException], None] = c._fail_internal
        self.count_event: Callable[..., None] = c.count_event


class OperationsCoordinator:
    """Runs decorated functions as tokens on core-pinned workers with bounded mailboxes.

    Use it as a context manager (``with`` or ``async with``), or call :meth:`start` and
    :meth:`stop`. Keyword arguments are those of :class:`CoordinatorConfig` (or pass
    ``config=``); they are validated here. ``backend="dask"`` (with ``address=`` for a running
    scheduler) or a ``Backend`` object runs the tokens elsewhere than the local lanes (see
    ``tokengate.backends``).

    The public surface (a test keeps it to exactly these names):

    * lifecycle: :meth:`start`, :meth:`stop`, :attr:`running`;
    * work: :meth:`submit`, :meth:`submit_async`, :meth:`executor`;
    * policies: :meth:`add_middleware`, :attr:`middleware` (see :class:`Middleware`),
      :meth:`set_storage_limit`, :meth:`count_event` (an event of your own in the stats);
    * observation: :meth:`stats`, :meth:`tier_stats`, :attr:`admission`, :meth:`queue_depths`,
      :attr:`lanes`, :meth:`iter_workers`, :attr:`convergence`, :attr:`backend`, and from the
      observability component :attr:`guard_house`, :attr:`overflow_guard`,
      :meth:`serve_metrics`, :meth:`metrics_collector`, :meth:`trace_spans`,
      :meth:`export_trace`, and :meth:`live` (the demos' live view while a block runs);
    * for tests: :attr:`rate_limiter` (``rate_limiter.poll(now)`` steps the rate limits' clock);
    * read-only facts, set at construction: ``config`` (the :class:`CoordinatorConfig`),
      ``topology`` (the :class:`Topology` it sized itself from), ``core_count`` (cores used),
      ``affinity`` (which cores each weight may use: ``affinity.allowed("heavy")``,
      ``affinity.preferred("light")``) and ``throttle`` (the storage tiers' permits, read
      through :meth:`tier_stats`).

    What the lanes call (claim, begin, complete, ...) is private: they reach it through a
    ``LaneHost`` object (``lanes/_base.py``) whose attributes are bound private methods.

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
        # issue 7: a remote backend (Dask) runs the tokens instead of the lanes; None is local.
        self._backend: Backend | None = resolve_backend(backend, address)
        self.topology = topology if topology is not None else detect_topology()
        cores = self.topology.core_count
        if config.cores is not None:
            cores = min(cores, config.cores)
        self.core_count = cores
        self.affinity = AffinityPolicy(cores)
        self.throttle = StorageThrottle(config.storage_limits)
        self._stats = StatsRecorder()
        self._gate = AdmissionGate()
        # The bytes of pickled arguments that queued process-lane calls hold (_byte_budget.py).
        byte_limit = config.process_queue_bytes
        assert not isinstance(byte_limit, str)  # CoordinatorConfig parsed it
        self._queued_bytes = ByteBudget(byte_limit, self._gate)
        self._deps = DependencyTracker(self._admit_internal, self._fail_unrun)
        self._mailbox_max = config.mailbox_max
        self._low_water = max(1, config.mailbox_max // 2)
        self._reject = config.admission == "reject"
        self._policies = {w: config.policy_for(w) for w in ("light", "medium", "heavy")}
        # Process lane (issue 3): on where supported unless process_lane=False. issue 7: a
        # remote backend has no local lanes (its workers are processes already).
        self._process_on = check_process_lane_option(config.process_lane)
        if self._backend is not None:
            self._process_on = False
        self._gil = gil_enabled()
        self._warned_no_process: set[str] = set()
        self._lock = threading.Lock()
        # new -> running -> stopping -> stopped; running or stopping -> forked, in a child
        # forked from the process running it (_lifecycle.py), for good.
        self._status = "new"
        self._pid = os.getpid()  # the process that started it (the fork message names it)
        self._accepting = False
        self._draining = False
        # Set when stop() gives up on what has not started (cancel_pending, or the drain timed
        # out): producers waiting for room give up too, and no new attempt is scheduled.
        self._discarding = False
        # Set once the workers are being stopped: a token routed, parked or queued for a permit
        # from then on is discarded, since no worker would ever run it.
        self._closed = False
        self._drain_cond = threading.Condition(threading.Lock())
        self._backoff: set[Token[Any]] = set()
        # Tokens counted but held back by their submitter (an executor's max_workers), with the
        # task each runs: they wait here, on no worker, until _release_held admits them.
        self._held: dict[Token[Any], TaskFunction[..., Any]] = {}
        self._lanes: dict[str, Lane] = {}
        self._timers: TimerQueue | None = None
        # id(spec) -> (spec, candidate workers): the route of a spec is worked out once.
        self._routes: dict[int, tuple[TaskSpec, str, list[Worker]]] = {}
        self._middleware: list[Middleware] = []
        self._hooks: dict[str, list[Callable[..., Any]]] = {hook: [] for hook in HOOKS}
        self._before_submit: list[Callable[[TaskSpec], None]] = []
        self._after_attempt: list[Callable[[Token[Any], str, BaseException | None], None]] = []
        self._after_failure: list[Callable[[Token[Any], str, BaseException | None], None]] = []
        # Middleware that watch run times (_run_watch.py), and whether runs are recorded at all.
        self._run_watchers: tuple[Watcher, ...] = ()
        self._watch_runs = False
        self._verbose_handlers: list[Any] = []
        self._record = self._record_terminal  # bound once: Token._finish calls it per token
        self._observability = Observability(config, self._stats, self._gate, self.add_middleware)
        self._convergence: ConvergenceEngine | None = None  # io-lane: built at start
        # Rate limits (``rate`` tag): buckets and FIFOs per operation, re-admitted by a timer.
        self._rate = RateLimiter(self._call_later, on_error=self._fail_internal)
        # Set once a token of non-zero priority is routed: from then on pushes keep order.
        self._prioritized = False
        self._host: LaneHost = _Host(self)  # what the lanes may call (lanes/_base.py)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> OperationsCoordinator:
        """Start the workers; calls made from now on go to this coordinator."""
        if self._status == "forked":  # before the lock: a parent thread may have held it
            raise _lifecycle.fork_refusal("this coordinator cannot be started again", self._pid)
        if _runtime.exiting:  # the exit drain ran already: nothing would wait for this one
            raise CoordinatorNotRunning(
                "cannot start a coordinator while the interpreter is exiting: running "
                "coordinators were drained already and nothing would wait for this one's work "
                "(as concurrent.futures refuses new work after interpreter shutdown). Start it "
                "before the main thread ends, and stop() it (or use `with`) before then"
            )
        with self._lock:
            if self._status in ("running", "stopping"):
                raise TokenGateError(
                    "this OperationsCoordinator is already running; call stop() before starting "
                    "it again, or create a second coordinator"
                )
            self._status = "running"
        self._pid = os.getpid()
        cfg = self.config
        if cfg.verbose or cfg.convergence_verbose:
            self._verbose_handlers = attach_verbose_handlers(
                verbose=cfg.verbose, convergence=cfg.convergence_verbose
            )
        _banner.log_start_banner(self)
        cores: dict[int, int | None] = {
            core: self.topology.cpu_for_core(core) for core in range(1, self.core_count + 1)
        }
        # issue 7: with a remote backend the local lanes are not built.
        self._lanes = self._build_lanes(cores) if self._backend is None else {}
        self._routes = {}
        self._timers = TimerQueue()
        self._timers.on_thread_start = self._on_internal_thread
        self._stats.reset_clock()
        self._draining = False
        self._discarding = False
        self._closed = False
        self._accepting = True
        if log.isEnabledFor(_DEBUG) and self._backend is None:  # issue 7: a backend has no lanes
            log.debug(
                "[CORE_PINNED_QUEUE] Starting %d mailbox workers...",
                sum(len(lane.workers) for lane in self._lanes.values()),
            )
        for lane in self._lanes.values():
            lane.start()
        if self._backend is not None:  # issue 7: connect to (or start) the cluster
            self._start_backend(self._backend)
        else:
            self._start_convergence()  # io-lane
        _runtime.push_coordinator(self)
        for hook in self._hooks["on_start"]:
            hook(self)
        if log.isEnabledFor(_DEBUG):
            if self._backend is None:  # issue 7: a backend logs its own workers ([DASK] ...)
                log.debug(
                    "[CORE_PINNED_QUEUE] Started %d workers across %d cores",
                    sum(
                        len(ln.workers)
                        for ln in self._lanes.values()
                        if ln.name not in ("io", "async")
                    ),
                    self.core_count,
                )
            log.debug(
                "[GATE] Admission gate started - %s (mailbox_max=%d)",
                "full saturation mode" if not self._reject else "reject when full",
                self._mailbox_max,
            )
            log.debug("Worker queue started")
            log.debug("Admission gate started")
            io_lane = self._lanes.get("io")  # io-lane: its threads are not core-pinned
            if io_lane is not None:
                log.debug(
                    "[IO_LANE] Started %d workers (%d per storage tier)",
                    len(io_lane.workers),
                    self.config.io_workers,
                )
            if self._convergence is not None:  # io-lane
                log.debug("Convergence monitoring started")
        if log.isEnabledFor(_INFO):  # the one start-up line at INFO; the detail is DEBUG
            log.info("Operations Coordinator started successfully!")
        return self

    def _start_backend(self, backend: Backend) -> None:
        """issue 7: start the backend; if it cannot start, neither does the coordinator."""
        try:
            backend.start(self)
        except BaseException:
            self._accepting = False
            if self._timers is not None:
                self._timers.close()
            detach_verbose_handlers(self._verbose_handlers)
            self._verbose_handlers = []
            with self._lock:
                self._status = "stopped"
            raise

    @property
    def backend(self) -> Backend | None:
        """The backend running the tokens (``None``: the local lanes)."""
        return self._backend

    def _build_lanes(self, cores: dict[int, int | None]) -> dict[str, Lane]:
        """Create the lanes this coordinator runs (thread always; others per configuration)."""
        lanes: dict[str, Lane] = {
            "thread": ThreadLane(
                cores,
                self.config.workers_per_core,
                host=self._host,
                max_workers_per_core=self.config.max_workers_per_core,  # io-lane
            )
        }
        lanes.update(self._build_io_lanes())  # io-lane
        if self._process_on:  # issue 3: one worker process per core, started here, kept warm
            lanes["process"] = ProcessLane(
                cores,
                host=self._host,
                policies=self._policies,
                allowed=self.affinity.allowed,
                budget=self._queued_bytes,
            )
        return lanes

    def _lane_for(self, spec: TaskSpec) -> str:
        """Which lane runs tokens of ``spec`` (the lane model of docs/design.md)."""
        io_lane = self._io_lane_for(spec)  # io-lane: async def and storage-tier tasks
        if io_lane is not None:
            return io_lane
        # Process lane (issue 3): heavy CPU work while the GIL is on, or executor='process'.
        if runs_in_process(spec, gil=self._gil):
            if self._process_on:
                return "process"
            if spec.executor == "process" and spec.operation_type not in self._warned_no_process:
                self._warned_no_process.add(spec.operation_type)
                log.warning(
                    "%r is tagged executor='process' but this coordinator has no process lane "
                    "(process_lane=False or unsupported here); it runs on threads",
                    spec.operation_type,
                )
        return "thread"

    def _route_of(self, spec: TaskSpec) -> tuple[TaskSpec, str, list[Worker]]:
        routes = self._routes  # io-lane: a route built while workers change lands in the old dict
        lane_name = self._lane_for(spec)
        lane = self._lanes[lane_name]
        pick = getattr(lane, "candidates", None)  # io-lane: a lane may choose its own workers
        if pick is not None:
            candidates = list(pick(spec))
        else:
            candidates = [
                w for core in self.affinity.allowed(spec.weight) for w in lane.by_core.get(core, ())
            ]
        if not candidates:  # a lane with fewer cores than the policy (e.g. one event loop)
            candidates = list(lane.workers)
        route = (spec, lane_name, candidates)
        routes[id(spec)] = route
        if spec.priority:
            self._prioritized = True
        return route

    # -- io-lane: the async and I/O lanes, the convergence engine ---------------------------------
    def _build_io_lanes(self) -> dict[str, Lane]:
        cfg = self.config
        return {
            "io": IOLane(STORAGE_TIERS, cfg.io_workers, host=self._host, limit=self.throttle.limit),
            "async": AsyncLane(
                self._host,
                concurrency=cfg.async_concurrency,
                stall_after=cfg.async_stall_after,
                defer=self._defer,
            ),
        }

    def _io_lane_for(self, spec: TaskSpec) -> str | None:
        if spec.is_async:
            return "async"
        if spec.storage_speed is not None and spec.executor != "process":
            return "io"
        return None

    def _start_convergence(self) -> None:
        cfg = self.config
        if not cfg.convergence:
            self._convergence = None
            return
        engine = ConvergenceEngine(
            lambda: self._lanes,
            interval=cfg.convergence_interval,
            policy=ConvergencePolicy(
                gil_capacity=1.0 if gil_enabled() else float(self.core_count),
                cores=self.core_count,
            ),
            on_change=self._workers_changed,
            count_event=self.count_event,
        )
        engine.start()
        self._convergence = engine

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

    def _workers_changed(self) -> None:
        """A lane added or retired workers: routes are rebuilt on their next use."""
        self._routes = {}

    @property
    def convergence(self) -> ConvergenceEngine | None:
        """The running convergence engine (None when ``convergence=False`` or stopped)."""
        return self._convergence

    # -- middleware ----------------------------------------------------------------------------
    def add_middleware(self, middleware: Middleware) -> None:
        """Install a policy; only the hooks it overrides are ever called."""
        self._middleware.append(middleware)
        for hook in HOOKS:
            if overridden(middleware, hook):
                self._hooks[hook].append(getattr(middleware, hook))
        self._before_submit = self._hooks["before_submit"]
        self._after_attempt = self._hooks["after_attempt"]
        self._after_failure = self._hooks["after_failure"]
        run_watcher = watcher(middleware)
        if run_watcher is not None:
            self._run_watchers += (run_watcher,)
            self._stats.watch_runs(self._run_watchers)
            self._watch_runs = True
        if self._status == "running" and overridden(middleware, "on_start"):
            middleware.on_start(self)

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The installed middleware, in the order installed (the observability's first)."""
        return tuple(self._middleware)

    def _notify_after_attempt(
        self, token: Token[Any], outcome: str, exc: BaseException | None
    ) -> None:
        """An attempt ended: show its run to the run watcher if it must, then tell middleware
        (``after_attempt`` always, ``after_failure`` for errors). ``complete`` inlines the
        resolved case."""
        if outcome == "retried" and self._watch_runs and token.started_at is not None:
            spec = token.spec  # a retried attempt is not terminal: its run is recorded here
            counters = self._stats.counters(spec.operation_type, spec.weight)
            run = _perf() - token.started_at
            if counters.record_run(run):
                token._watched = (counters, run)
        if token._watched is not None:
            self._show_run(token)
        if self._after_attempt:
            _run_hooks(self._after_attempt, token, outcome, exc)
        if outcome != "resolved" and self._after_failure:
            _run_hooks(self._after_failure, token, outcome, exc)

    def _show_run(self, token: Token[Any]) -> None:
        """Hand a run that crossed its operation's RunWatch to the middleware watching run
        times (the Guard House), outside the token's lock."""
        counters, run = token._watched
        token._watched = None
        deliver(self._run_watchers, token, counters, run)

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
        if self._status == "forked":  # the parent's workers: not ours to stop, none to wait for
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
        with self._lock:
            if self._status != "running":
                return
            self._status = "stopping"
            self._accepting = False
        try:
            # Inside the try: a Ctrl-C landing from here on (while the engine's thread is
            # joined, say) must still shut the workers down, or the coordinator stays
            # "stopping" for good.
            if log.isEnabledFor(_DEBUG):
                log.debug("Stopping Operations Coordinator...")
            engine, self._convergence = self._convergence, None  # io-lane: no resizing now
            if engine is not None:
                engine.stop()
            if cancel_pending:
                self._give_up_pending()
                self._discard_pending("stopped")
            if not self._wait_drained(timeout):
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

    def _stop_at_exit(self, *, wait: bool) -> None:
        """The interpreter is exiting and this coordinator still runs (``_lifecycle.py``):
        stop it as ``stop()`` does, waiting for what was submitted, unless ``wait`` is False
        (Ctrl-C already ended the wait for another coordinator). A Ctrl-C during the wait
        discards what has not started and is raised again for the caller."""
        if self._status != "running":
            return
        if not wait:
            self.stop(cancel_pending=True, timeout=0)
            return
        discarded = self._stats.snapshot().discarded
        try:
            pending = self._stats.snapshot().in_flight
            if pending and self is _runtime.default:  # what the default coordinator is for
                log.debug("draining the default coordinator's %d pending tokens at exit", pending)
            elif pending:
                log.warning(
                    "the interpreter is exiting but this coordinator was not stopped: waiting "
                    "for its %d pending tokens to finish, as concurrent.futures does (Ctrl-C "
                    "stops waiting and discards what has not started). Call stop() yourself "
                    "to decide: stop(cancel_pending=True) does not wait for what has not started",
                    pending,
                )
            self.stop()
        except KeyboardInterrupt:
            if self._status == "running":  # it landed before stop() began
                self.stop(cancel_pending=True, timeout=0)
            log.warning(
                "Ctrl-C while waiting at interpreter exit: %d tokens that had not started were "
                "discarded; tasks still running were left behind",
                self._stats.snapshot().discarded - discarded,
            )
            raise

    def _forked(self) -> None:
        """In a forked child (``_lifecycle.py``): this coordinator's workers exist only in the
        parent, so it refuses every call from now on. Only the forking thread exists here and
        a lock may be held for ever: set plain attributes, take nothing."""
        self._status = "forked"
        self._accepting = False
        process = self._lanes.get("process")
        if isinstance(process, ProcessLane):
            process.forget_after_fork()

    def _give_up_pending(self) -> None:
        self._discarding = True
        self._gate.notify()  # producers waiting for room re-check and give up

    def _shutdown_workers(self) -> None:
        timers = self._timers
        if log.isEnabledFor(_DEBUG):
            log.debug("[GATE] Admission gate stopped")
            log.debug("[CORE_PINNED_QUEUE] Stopping all workers...")
        self._closed = True
        self._give_up_pending()
        stuck = [w for lane in self._lanes.values() for w in lane.stop(timeout=1.0)]
        # Whatever reached a mailbox, a permit queue or the dependency tracker before the flags
        # above were seen: no worker will run it now (stuck workers skip discarded tokens).
        self._discard_pending("stopped")
        if self._backend is not None:  # issue 7: end what is left on the cluster, disconnect
            self._backend.stop()
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
        with self._lock:
            self._status = "stopped"
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
        return self._status == "running"

    def _wait_drained(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._drain_cond:
            self._draining = True
            while self._stats.snapshot().in_flight > 0:
                wait = 0.1
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                self._drain_cond.wait(wait)
        return True

    def _notify_drain(self) -> None:
        with self._drain_cond:
            self._drain_cond.notify_all()

    def _discard_pending(self, reason: str) -> int:
        """Discard every token that has not started; returns how many were discarded."""
        count = 0
        sources: list[Any] = list(self._deps.drain())
        sources += self.throttle.drain_waiting()
        sources += self._rate.drain_waiting()
        with self._lock:
            sources += list(self._backoff)
            sources += list(self._held)
        for lane in self._lanes.values():
            sources += lane.queued()
        if self._backend is not None:  # issue 7: what the cluster has not started
            sources += self._backend.not_started()
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

    # -- io-lane: submission from asyncio code ------------------------------------------------
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

    async def _submit_async(
        self, task: TaskFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Token[Any]:
        if _runtime.local.coordinator is self or not self._accepting:
            return self._submit(task, args, kwargs, _runtime.local.coordinator is self)
        spec = task.spec
        has_deps = bool((args or kwargs) and find_dependencies(args, kwargs))
        mailboxes = not self._reject
        # A process-lane call is pickled first (an unpicklable argument raises here), so that
        # the wait below can include room for its bytes; it is charged when it finds room.
        # With admission='reject' nothing waits for bytes: _submit pickles and charges it.
        call = None
        if not self._reject and self._backend is None:
            call = self._process_call(task, args, kwargs, self._route_for(spec), has_deps)
        budget = self._queued_bytes

        def room() -> bool | None:
            if self._room_for(spec, has_deps, mailboxes) is None:
                return None
            if call is None or self._reject or self._discarding or not self._accepting:
                return True  # _submit charges (or refuses) it
            return True if budget.try_charge(call) else None

        if room() is None:
            await self._gate.wait_for_async(room)
        try:
            if self._reject or not self._accepting:
                return self._submit(task, args, kwargs, False, call)  # Overloaded/NotRunning
            # There is room now and nothing ran on this thread since the check: admitting as an
            # "internal" call skips the blocking waits (a racing thread can overflow the soft
            # bound by a token, exactly as calls from inside tasks may).
            return self._submit(task, args, kwargs, True, call)
        except BaseException:
            if call is not None:  # charged, but never queued (its token's discard may have)
                budget.release(call)
            raise

    def _route_for(self, spec: TaskSpec) -> tuple[TaskSpec, str, list[Worker]]:
        """The cached route of ``spec`` (worked out on first use, or after workers changed)."""
        route = self._routes.get(id(spec))
        if route is None or route[0] is not spec:
            route = self._route_of(spec)
        return route

    def _process_call(
        self,
        task: TaskFunction[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        route: tuple[TaskSpec, str, list[Worker]],
        has_deps: bool | None = None,
    ) -> ProcessCall | None:
        """The pickled call if ``route`` is the process lane, else None (raises
        ``SerializationError``). Arguments holding tokens are pickled once resolved."""
        if route[1] != "process":
            return None
        if has_deps is None:
            has_deps = bool((args or kwargs) and find_dependencies(args, kwargs))
        return prepare_call(task, args, kwargs, has_dependencies=has_deps)

    def _room_for(self, spec: TaskSpec, has_deps: bool, mailboxes: bool) -> bool | None:
        """True if a call of ``spec`` would be admitted now without waiting, else None."""
        if spec.rate is not None and self._rate.waiting(spec.operation_type) >= (
            self._backlog_bound()
        ):
            return None
        if self._backend is not None:  # issue 7: the backend bounds what it has in flight
            return True if self._backend.has_room(spec) else None
        bound = self._backlog_bound()
        if has_deps:
            return True if len(self._deps) < bound else None
        tier = spec.storage_speed
        if tier is not None:
            return True if self.throttle.waiting(tier) < bound else None
        if not mailboxes:
            return True
        return True if self._pick(self._route_for(spec)[2]) is not None else None

    def _submit(
        self,
        task: TaskFunction[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        internal: bool,
        payload: ProcessCall | None = None,
        hold: bool = False,
    ) -> Token[Any]:
        """Make, count and queue one call's token (``payload``: its process call, pickled and
        perhaps charged already by ``_submit_async``; ``hold``: count the token but keep it out
        of every queue until ``_release_held``)."""
        # While admission is paused (the Overflow Guard, for memory), external producers wait
        # here (or are refused with admission='reject'); calls from tasks never wait.
        if self._gate._paused and not internal and self._accepting:
            self._gate.wait_while_paused(task.spec.operation_type, reject=self._reject)
        if not self._accepting and not (internal and self._status == "stopping"):
            raise self._not_running(task.spec.operation_type)
        spec = task.spec
        if self._before_submit:
            for hook in self._before_submit:
                hook(spec)
        backend = self._backend
        route = None
        if backend is None:  # issue 7: a backend has no local lanes
            route = self._route_for(spec)
            if payload is None and not hold:
                # Process lane (issue 3): the call is pickled here, on the caller's thread,
                # before the token exists, so an unpicklable argument raises SerializationError
                # from the call and nothing is counted. Its bytes are charged to the byte budget
                # below. A held call is pickled when it is released (_release_held), so that
                # held calls hold no pickled copies, only references, as a stdlib pool's do.
                payload = self._process_call(task, args, kwargs, route)
        token = self._new_token(task, args, kwargs)
        kwargs = token.kwargs
        if payload is not None:
            token._payload = payload
        priority = task._call_priority
        if priority is not None:  # fn.options(priority=...)
            token._priority = priority
            if priority:
                self._prioritized = True
        try:
            if spec.deadline is not None:
                token._deadline_at = token.submitted_at + spec.deadline
            if hold:
                self._hold(token, task, internal)
                return token
            if backend is not None:  # issue 7: the backend takes it from here
                backend.submit(token, task, internal)
                return token
            if payload is not None and not self._hold_bytes(token, payload, internal):
                return token  # discarded: stop() gave up on pending work while it waited
            # Only a container or a Token can hold a dependency: most calls skip the search.
            maybe_deps = bool(kwargs)
            if not maybe_deps:
                for value in args:
                    if type(value) in _MAYBE_DEPENDENCY:
                        maybe_deps = True
                        break
            if maybe_deps:
                deps = find_dependencies(args, kwargs)
                if deps:
                    self._park_dependent(token, deps, internal)
                    return token
            if spec.storage_speed is None and spec.rate is None:  # nothing for _admit to do
                self._route(token, internal, route)
            else:
                self._admit(token, internal)
        except BaseException:
            # The caller never gets this token (a Ctrl-C while it waited for room, say): it
            # must not stay counted as in flight with nowhere to run, or stop() waits for ever.
            token._discard("interrupted")
            raise
        return token

    def _hold_bytes(self, token: Token[Any], call: ProcessCall, internal: bool) -> bool:
        """Charge a process call's pickled bytes to the byte budget before it is queued: an
        external producer waits for room (or is refused with admission='reject'); a call
        from a task never waits. False if the token was discarded instead."""
        budget = self._queued_bytes
        if budget.try_charge(call):
            return True
        if internal:
            budget.force(call)
            return True
        if self._reject:
            token._discard("overloaded")
            raise Overloaded(budget.refusal(token.operation_type, call.size()))
        self._gate.wait_for(lambda: True if self._discarding or budget.try_charge(call) else None)
        if self._discarding:
            token._discard("stopped")
            return False
        return True

    def _not_running(self, operation_type: str) -> CoordinatorNotRunning:
        what = f"cannot run {operation_type!r}"
        if self._status == "forked":
            return _lifecycle.fork_refusal(what, self._pid)
        if _runtime.exiting:
            return CoordinatorNotRunning(
                f"{what}: the coordinator is {self._status} and the interpreter is exiting "
                f"(running coordinators are stopped when the main thread ends); submit work "
                f"before then"
            )
        return CoordinatorNotRunning(
            f"{what}: the coordinator is {self._status}; start one first "
            f"(with OperationsCoordinator(): ... or coordinator.start())"
        )

    def _park_dependent(self, token: Token[Any], deps: list[Token[Any]], internal: bool) -> None:
        """Hold ``token`` until ``deps`` end (an external producer waits while the backlog of
        such tokens is as large as the mailboxes)."""
        self._wait_outside(token, self._deps, internal, lambda: self._deps.park(token, deps))

    def _hold(self, token: Token[Any], task: TaskFunction[..., Any], internal: bool) -> None:
        """Keep ``token`` counted but unqueued (an external producer waits while as many tokens
        are held as the mailboxes hold, as for dependencies)."""

        def hold() -> None:
            token._parked = "held"
            with self._lock:
                self._held[token] = task

        self._wait_outside(token, self._held, internal, hold)

    def _wait_outside(
        self, token: Token[Any], backlog: Sized, internal: bool, put: Callable[[], None]
    ) -> None:
        """``put`` ``token`` into ``backlog`` (tokens waiting outside the mailboxes), once it
        is shorter than the mailboxes hold if an external producer calls; the token is discarded
        if stop() gives up on pending work meanwhile or closed the workers."""
        if not internal and len(backlog) >= self._backlog_bound():
            self._gate.wait_for(
                lambda: self._discarding or len(backlog) < self._backlog_bound() or None
            )
            if self._discarding:
                token._discard("stopped")
                return
        put()
        if self._closed:
            token._discard("stopped")

    def _release_held(
        self,
        token: Token[Any],
        error: BaseException | None = None,
        explain: Callable[[SerializationError], BaseException] | None = None,
    ) -> bool:
        """Admit a token held by ``_submit(hold=True)``, or fail it with ``error`` without
        running it; False if it had ended meanwhile.

        A process call is pickled here, not when it was held: held calls keep references,
        not pickled copies, so however many are held they hold none of ``process_queue_bytes``.
        A call that cannot be pickled fails its token with the ``SerializationError``
        (``explain`` may reword it), as ``ProcessPoolExecutor`` sets it on the Future.
        """
        with self._lock:
            task = self._held.pop(token, None)
        if task is None or token.done():
            return False
        if self._gate.unwoken:
            self._gate.notify()  # a producer may be waiting for the held backlog to shrink
        token._parked = None
        if error is None and self._backend is None:
            try:
                token._payload = self._process_call(
                    task, token.args, token.kwargs, self._route_for(token.spec)
                )
            except SerializationError as exc:
                error = exc if explain is None else explain(exc)
        if error is not None:
            self._fail_unrun(token, error)
            return True
        if self._backend is not None:
            self._backend.submit(token, task, True)
            return True
        # Charged from now on, as a retry is (never waiting: a worker or the timer releases it).
        if self._charge_queued(token):
            self._admit(token, True)
        return True

    def _charge_queued(self, token: Token[Any]) -> bool:
        """Charge ``token``'s process call (if any) to the byte budget, over the limit if need
        be, as it waits in a queue again; False if the token has ended.

        A discard racing with this may have run ``_after_discard`` before the charge, releasing
        nothing: so the token is checked after charging, and the charge given back if it ended
        (a call holds its charge at most once, so a release by both sides counts once).
        """
        call = token._payload
        if call is not None:
            self._queued_bytes.force(call)
        if not token.done():
            return True
        if call is not None:
            self._queued_bytes.release(call)
        return False

    def _failed_token(
        self,
        task: TaskFunction[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: BaseException,
    ) -> Token[Any]:
        """A token counted as submitted and failed with ``exc`` at once: for a submitter that
        reports a call it could not send (an unpicklable argument) on the Future, as
        ``ProcessPoolExecutor`` does, rather than raising."""
        token = self._new_token(task, args, kwargs)
        self._fail_unrun(token, exc)
        return token

    def _new_token(
        self, task: TaskFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Token[Any]:
        """A token for one call, counted as submitted (before it can possibly finish)."""
        spec = task.spec
        # A call without keyword arguments shares one empty dict: the call's own (always made
        # for ``**kwargs``) is freed at once, so a token costs the garbage collector two
        # objects, not three, and collections come a third less often (B1).
        token: Token[Any] = Token(
            spec, task.__wrapped__, args, kwargs or NO_KWARGS, next_seq(), _perf(), self
        )
        try:  # StatsRecorder.record_submitted, inline (see StatsRecorder.per_thread)
            self._stats.per_thread.shard.ops[spec.operation_type].submitted += 1
        except (AttributeError, KeyError):
            self._stats.record_submitted(spec.operation_type, spec.weight)
        return token

    def _backlog_bound(self) -> int:
        """How many tokens may wait outside the mailboxes (for dependencies or a tier permit)
        before an external producer is made to wait: as many as the mailboxes hold."""
        workers = sum(len(lane.workers) for lane in self._lanes.values())
        return self._mailbox_max * max(1, workers)

    def _admit_internal(self, token: Token[Any]) -> None:
        self._admit(token, True)

    def _admit(self, token: Token[Any], internal: bool) -> None:
        if token.spec.rate is not None and self._hold_for_rate(
            token, internal, self._admit_internal
        ):
            return  # waits for its operation's rate; the RateLimiter re-admits it
        tier = token.spec.storage_speed
        if tier is not None:
            if not internal:
                bound = self._backlog_bound()
                if self.throttle.waiting(tier) >= bound:
                    self._gate.wait_for(
                        lambda: self._discarding or self.throttle.waiting(tier) < bound or None
                    )
                    if self._discarding:
                        token._discard("stopped")
                        return
            token._parked = "tier"
            if not self.throttle.try_acquire(tier, token):
                if self._closed:  # no permit will be released to it any more
                    token._discard("stopped")
                return  # routed by whoever releases the next permit
        self._route(token, internal)

    def _hold_for_rate(
        self, token: Token[Any], internal: bool, proceed: Callable[[Token[Any]], None]
    ) -> bool:
        """True if ``token`` waits for its operation's rate (``proceed(token)`` is called when
        the bucket lets it go; a backend passes its own). An external producer first waits
        while that operation's FIFO is as long as the mailboxes (as for a storage tier)."""
        if not internal and not token._rate_passed:
            name = token.spec.operation_type
            bound = self._backlog_bound()
            if self._rate.waiting(name) >= bound:
                self._gate.wait_for(
                    lambda: self._discarding or self._rate.waiting(name) < bound or None
                )
                if self._discarding:
                    token._discard("stopped")
                    return True
        if not self._rate.hold(token, proceed):
            return False
        if self._closed:  # no timer will release it any more
            token._discard("stopped")
        return True

    def _call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        timers = self._timers
        if timers is None:
            raise RuntimeError("timer queue is closed")
        return timers.call_later(delay, callback)

    @property
    def rate_limiter(self) -> RateLimiter:
        """The rate limits of ``rate``-tagged operations (their figures are in :meth:`stats`):
        ``rate_limiter.poll(now)`` releases what is due at ``now``, a ``time.monotonic()``
        instant; tests step time with it instead of waiting for the timer."""
        return self._rate

    def _route(
        self,
        token: Token[Any],
        internal: bool,
        route: tuple[TaskSpec, str, list[Worker]] | None = None,
    ) -> None:
        """Push ``token`` to the least-loaded worker its route allows (``route``: the spec's,
        when the caller has just looked it up), waiting for room if every mailbox is full."""
        if route is None:
            spec = token.spec
            route = self._routes.get(id(spec))
            if route is None or route[0] is not spec:
                route = self._route_of(spec)
        candidates = route[2]
        best: Worker | None = None
        best_load = self._mailbox_max
        for worker in candidates:
            load = len(worker.mailbox) + (worker.current is not None)
            if load == 0:
                best = worker
                break
            if load < best_load:
                best, best_load = worker, load
        if best is None:
            best = self._route_full(token, internal, candidates)
            if best is None:  # stop() gave up on pending work while this producer waited
                token._discard("stopped")
                return
        if token._parked is not None:  # only tier tokens were parked; don't touch the rest
            token._parked = None
        if self._prioritized:
            moved = push_by_priority(best, token)
            if self._closed:  # pushed after the workers were told to stop: none will run them
                for other in moved:
                    other._discard("stopped")
        else:
            best.push(token)
        if self._closed:  # pushed after the workers were told to stop: none will run it
            token._discard("stopped")
        if _routing_answers.get(_DEBUG, True) and routing_log.isEnabledFor(_DEBUG):
            routing_log.debug(
                "[ROUTING] Token %s (%s) → Pos %d (Core %d, Worker %d)",
                token.id,
                token.spec.weight,
                token.seq,
                best.core,
                best.index,
            )

    def _pick(self, candidates: list[Worker]) -> Worker | None:
        limit = self._mailbox_max
        best: Worker | None = None
        best_load = limit
        for worker in candidates:
            load = len(worker.mailbox) + (worker.current is not None)
            if load < best_load:
                best, best_load = worker, load
        return best

    def _route_full(
        self, token: Token[Any], internal: bool, candidates: list[Worker]
    ) -> Worker | None:
        if internal:  # never block a worker or the timer thread: overflow the soft bound
            return min(candidates, key=lambda w: w.load())
        if self._reject:
            token._discard("overloaded")
            raise Overloaded(
                f"every mailbox allowed for {token.spec.weight!r} tokens holds "
                f"{self._mailbox_max} tokens (mailbox_max); {token.operation_type!r} was "
                f"refused. Slow the producer, raise mailbox_max, or use admission='block'"
            )

        def room() -> list[Worker] | None:  # [] ends the wait without a worker
            if self._discarding:
                return []
            worker = self._pick(candidates)
            return None if worker is None else [worker]

        found = self._gate.wait_for(room)
        return found[0] if found else None

    # -- execution (the LaneHost side) ------------------------------------------------------------
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

    def _claim(self, token: Token[Any]) -> bool:
        """Take a token for running: discarded instead if past its deadline."""
        deadline = token._deadline_at
        if deadline is not None and _perf() > deadline:
            token._discard("deadline")
            return False
        return token._try_claim()

    def _after_token(self, worker: Worker) -> None:
        gate = self._gate
        if gate.unwoken and len(worker.mailbox) <= self._low_water:
            gate.notify()

    def _begin(self, token: Token[Any], worker: Worker, *, arm_timeout: bool = True) -> int:
        """Record the start of a run on ``worker``; arms the thread-style timeout if asked."""
        token.attempts += 1
        token._ran_on = worker
        token.started_at = _perf()
        run_id = token._run_id
        if arm_timeout:
            timeout = token.spec.timeout
            if timeout is not None:
                assert self._timers is not None
                token._timer = self._timers.call_later(timeout, self._on_timeout, token, run_id)
        return run_id

    def _run(self, token: Token[Any], worker: Worker) -> bool:
        """Claim ``token`` and run its body on this thread, then complete it; False if it was
        not runnable (discarded, past its deadline, or claimed elsewhere)."""
        # ``claim`` and ``begin``, inline: this is the hot path of every thread-run token.
        deadline = token._deadline_at
        if deadline is not None and _perf() > deadline:
            token._discard("deadline")
            return False
        if not token._try_claim():
            return False
        token.attempts += 1
        token._ran_on = worker
        run_id = token._run_id
        timeout = token.spec.timeout
        if timeout is not None:
            assert self._timers is not None
            token._timer = self._timers.call_later(timeout, self._on_timeout, token, run_id)
        token.started_at = _perf()
        previous = worker.current
        worker.current = token
        try:
            value = token.fn(*token.args, **token.kwargs)
        except BaseException as exc:
            worker.current = previous
            self._complete(token, run_id, None, exc)
        else:
            worker.current = previous
            self._complete(token, run_id, value, None)
        return True

    def _on_timeout(self, token: Token[Any], run_id: int) -> None:
        if token._run_id != run_id or token.done():
            return
        exc = TaskTimeout(
            f"{token.operation_type!r} (token {token.id}) ran longer than its timeout of "
            f"{token.spec.timeout}s on {token.worker}; a thread cannot be killed, so its late "
            f"result will be dropped",
            retryable=False,
        )
        # The body is still running: its storage permit stays held until it really returns
        # (its own, late completion releases it), so the tier limit holds.
        self._complete(token, run_id, None, exc, release_permit=False)
        self._replace_stuck(token)

    def _replace_stuck(self, token: Token[Any]) -> None:
        """Give the mailbox of the worker stuck in ``token`` to a fresh thread, so the tokens
        queued behind a hung task do not wait for it (a thread cannot be killed)."""
        lane = self._lanes.get(token.lane or "")
        replace = getattr(lane, "replace", None)
        if lane is None or replace is None:
            return
        stuck = next((w for w in lane.workers if w.current is token), None)
        if stuck is None or replace(stuck) is None:
            return
        self._routes = {}  # cached routes still name the stuck worker
        self.count_event("workers_replaced")
        log.warning(
            "[%s] stuck in %s past its timeout; a fresh thread took over its mailbox and the "
            "stuck one will exit when the task returns",
            stuck.name,
            token.id,
        )

    def _complete(
        self,
        token: Token[Any],
        run_id: int,
        value: Any,
        exc: BaseException | None,
        *,
        release_permit: bool = True,
    ) -> None:
        """The one place a run ends: resolve, retry or fail (every lane calls this)."""
        timer = token._timer
        if timer is not None:
            timer.cancel()
            token._timer = None
        if release_permit and token._holds_permit:
            for granted in self.throttle.release(token):
                self._route(granted, True)
        racy = None if token.spec.timeout is None else run_id
        if exc is None:
            if not token._finish(value, None, self._record, racy):
                self._late(token, "result")
            else:
                # _notify_after_attempt, inline (hot path)
                if token._watched is not None:
                    self._show_run(token)
                if self._after_attempt:
                    _run_hooks(self._after_attempt, token, "resolved", None)
                if _worker_answers.get(_DEBUG, True) and worker_log.isEnabledFor(_DEBUG):
                    worker_log.debug("[%s] ✓ Completed %s", (token.worker or "?").upper(), token.id)
                if _stats_answers.get(_DEBUG, True) and stats_log.isEnabledFor(_DEBUG):
                    stats_log.debug("[DEBUG] Recorded: %s", token.id)
        elif self._maybe_retry(token, run_id, exc):
            self._notify_after_attempt(token, "retried", exc)
        else:
            if not token._finish(None, exc, self._record, racy):
                self._late(token, "error")
                return
            self._notify_after_attempt(token, "failed", exc)
            if _worker_answers.get(_DEBUG, True) and worker_log.isEnabledFor(_DEBUG):
                worker_log.debug(
                    "[%s] ✗ Failed %s: %s: %s",
                    (token.worker or "?").upper(),
                    token.id,
                    type(exc).__name__,
                    exc,
                )
            if _stats_answers.get(_DEBUG, True) and stats_log.isEnabledFor(_DEBUG):
                stats_log.debug("[DEBUG] Recorded: %s", token.id)
        if self._draining:
            self._notify_drain()

    def _late(self, token: Token[Any], what: str) -> None:
        log.warning(
            "late %s of %s (token %s) dropped: the token had already ended (%s)",
            what,
            token.operation_type,
            token.id,
            token.state,
        )

    def _record_terminal(self, token: Token[Any], exc: BaseException | None) -> None:
        """Called by Token._finish under the token's lock, before anyone is woken."""
        now = _perf()
        token.finished_at = now
        spec = token.spec
        try:  # StatsRecorder.counters, inline: once per token
            counters = self._stats.per_thread.shard.ops[spec.operation_type]
        except (AttributeError, KeyError):
            counters = self._stats.counters(spec.operation_type, spec.weight)
        if exc is None:
            counters.resolved += 1
        else:
            counters.failed += 1
        counters.latency.record(now - token.submitted_at)
        if self._watch_runs:  # OperationCounters.record_run, inline: once per token
            started = token.started_at
            if started is not None:
                run = now - started
                runs = counters.runs
                runs.record(run)
                if run > counters.watch.slow_after or runs.count >= counters.next_check:
                    token._watched = (counters, run)  # shown outside the lock (_show_run)

    def _maybe_retry(self, token: Token[Any], run_id: int, exc: BaseException) -> bool:
        if self._discarding:  # stop() is not waiting for new attempts: fail with the error
            return False
        spec = token.spec
        policy = self._policies[spec.weight]
        if not policy.is_retryable(exc, retry_on=spec.retry_on, dont_retry_on=spec.dont_retry_on):
            return False
        used = token.attempts - 1
        if used >= policy.budget(exc, spec.retries):
            return False
        if not token._reopen(run_id):
            return False
        self._charge_queued(token)  # a process call waits in a queue again, holding its bytes
        self._stats.record_retried(spec.operation_type, spec.weight)
        delay = policy.backoff(used + 1)
        if retry_log.isEnabledFor(_INFO):
            retry_log.info(
                "[RETRY] %s attempt %d failed with %s: %s; retrying in %.3fs (back of the queue)",
                token.id,
                token.attempts,
                type(exc).__name__,
                exc,
                delay,
            )
        token._parked = "backoff"
        with self._lock:
            self._backoff.add(token)
        assert self._timers is not None
        try:
            self._timers.call_later(delay, self._readmit, token)
        except RuntimeError:  # the timer queue closed in between (stop): no retry will come
            with self._lock:
                self._backoff.discard(token)
            token._discard("stopped")
        return True

    def _readmit(self, token: Token[Any]) -> None:
        with self._lock:
            self._backoff.discard(token)
        if token.done():
            return
        if self._discarding:
            # stop() gave up on what has not started while this token waited out its back-off;
            # a retry decided in the same instant can miss stop()'s sweep of the back-off set.
            token._discard("stopped")
            return
        token._parked = None
        self._admit(token, True)

    def _fail_internal(self, token: Token[Any], exc: BaseException) -> None:
        """Fail a token whose run broke inside tokengate itself (never lose it)."""
        error = TokenGateError(
            f"internal error while running {token.operation_type!r} (token {token.id}): "
            f"{type(exc).__name__}: {exc}; please report it"
        )
        error.__cause__ = exc
        token._finish(None, error, self._record_terminal)
        if self._draining:
            self._notify_drain()

    def _fail_unrun(self, token: Token[Any], exc: BaseException) -> None:
        if token._finish(None, exc, self._record_terminal):
            self._notify_after_attempt(token, "failed", exc)
        if self._draining:
            self._notify_drain()

    # -- discards (called by Token._discard) -------------------------------------------------
    def _on_discarded(self, token: Token[Any]) -> None:
        spec = token.spec
        token.finished_at = _perf()
        self._stats.record_discarded(spec.operation_type, spec.weight)

    def _after_discard(self, token: Token[Any]) -> None:
        if token._parked == "rate":  # out of its operation's FIFO now, not when its turn comes
            self._rate.forget(token)
        call = token._payload
        if call is not None:  # a process call that will never be sent: let its bytes go
            token._payload = None
            self._queued_bytes.release(call)
        if self._backend is not None:  # issue 7: stop the cluster from running it
            self._backend.discarded(token)
        if token._parked == "held":
            with self._lock:
                self._held.pop(token, None)
        if self._hooks["after_discard"]:
            _run_hooks(self._hooks["after_discard"], token)
        if token.spec.storage_speed is not None:
            # Always ask the throttle (it checks under its lock): a permit granted while this
            # token was being cancelled must come back too.
            granted = self.throttle.release(token)
            if granted and self._backend is not None:  # issue 7: they run on the backend
                self._backend.granted(granted)
            else:
                for other in granted:
                    self._route(other, True)
        if self._draining:
            self._notify_drain()

    # -- help while waiting (nested tasks) ----------------------------------------------------
    def _help(self, token: Token[Any], end: float | None = None) -> None:
        """A thread worker waiting on ``token`` keeps the coordinator moving instead of blocking.

        If the token has not started, the worker runs it itself (claiming is atomic, so the
        worker whose mailbox also holds it simply skips it later). If it cannot run it here —
        it runs elsewhere, waits for a storage permit or a retry backoff, or belongs to another
        lane — the worker runs tokens from its own mailbox meanwhile, and sleeps only when that
        is empty, woken by whichever comes first: a new token or the end of the awaited one.
        So whatever the awaited token depends on can never be stuck behind the waiting worker,
        and nested tasks never deadlock, whatever the worker count. Helping stops at ``end``
        (the caller's ``get(timeout=...)``, as a ``time.monotonic()`` instant).
        """
        local = _runtime.local
        worker = local.worker
        if worker is not None and worker.kind == "async":  # io-lane: never block the event loop
            self._refuse_blocking_wait(token)
        if (
            worker is None
            or local.coordinator is not self
            or worker.kind not in _THREADED  # io-lane: I/O workers help as thread workers do
            or token._state != PENDING  # io-lane: _wait also asks for running tokens (above)
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
                if self._can_run_inline(token, worker) and self._run(token, worker):
                    continue  # a run that ended in a retry leaves the token still pending
            elif parked == "deps":
                pending = self._deps.unfinished(token)
                if pending:
                    # Helps (recursively) or waits for the dependency, then the loop re-checks
                    # the token. _wait, not exception(): waiting is not retrieving its error.
                    with contextlib.suppress(BaseException):
                        pending[0]._wait(None)
                    continue
            self._help_from_mailbox(worker, token, end)

    def _help_from_mailbox(self, worker: Any, token: Token[Any], end: float | None) -> None:
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
        self._run(other, worker)

    def _can_run_inline(self, token: Token[Any], worker: Worker) -> bool:
        """Whether ``worker`` may run ``token`` itself: same lane, or both plain threads
        (io-lane: a thread worker waiting on a storage-tier token, or the reverse, helps too)."""
        lane = self._lane_for(token.spec)
        return lane == worker.kind or (lane in _THREADED and worker.kind in _THREADED)

    def _refuse_blocking_wait(self, token: Token[Any]) -> None:
        if token.done():
            return
        raise TokenGateError(
            f"token {token.id} ({token.operation_type}) was waited on with get()/result() on "
            f"the coordinator's event loop, which would block every async task (and deadlock "
            f"if the token needs the loop). In an async task write `await token` instead."
        )

    # -- observation ------------------------------------------------------------------------------
    def stats(self, label: str = "STATS") -> StatsSnapshot:
        """A frozen snapshot of the counts and latencies; ``str()`` of it is the seed's block."""
        return self._stats.snapshot(
            label, queued_bytes=self._queued_bytes.reading(), rate=self._rate.stats()
        )

    def tier_stats(self) -> Mapping[str, TierStats]:
        """Per storage tier: limit, running, waiting and the high-water mark of running."""
        return self.throttle.stats()

    def set_storage_limit(self, tier: str, limit: int) -> None:
        """Resize a storage tier's limit while running."""
        if not isinstance(tier, str):
            raise ConfigError(
                f"storage tier must be a name such as 'FAST', got {type(tier).__name__} {tier!r}"
            )
        granted = self.throttle.resize(tier.upper(), limit)
        if self._backend is not None:  # issue 7: the backend sends the tokens granted
            self._backend.resized(granted)
            return
        for token in granted:
            self._route(token, True)

    def queue_depths(self, lane: str = "thread") -> dict[int, list[int]]:
        """Per core, the load (queued + running) of each worker's mailbox in ``lane``."""
        found = self._lanes.get(lane)
        if found is None:
            return {}
        return {core: [w.load() for w in workers] for core, workers in found.by_core.items()}

    @property
    def lanes(self) -> Mapping[str, Lane]:
        """The running lanes by name (``thread``, and ``process``/``io``/``async`` if enabled)."""
        return dict(self._lanes)

    def iter_workers(self) -> Iterator[Worker]:
        """Every worker of every running lane (a snapshot: the convergence engine resizes)."""
        return iter([w for lane in self._lanes.values() for w in lane.workers])

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
