"""LocalBackend: runs tokens on this machine's lanes.

From a counted token to a run::

    submit ──> byte budget           (a process call's pickled bytes; an outside producer waits)
           ├─> DependencyTracker     (tokens among the arguments: parked, holding no worker)
           ├─> Backlog.hold_for_rate (its operation's rate used up: wait in its FIFO)
           ├─> Backlog.acquire_tier  (storage tier full: wait in the tier's FIFO)
           └─> Router.push           (least-loaded allowed mailbox; full: wait, refuse or overflow)
                  │
            a lane's worker: LaneHost.run (claim + begin + body) or claim, begin and the lane's
            own way of running it (a worker process, the event loop)
                  │
            Completion.complete      (the coordinator's one completion path)

The lanes speak to this backend only through the :class:`~tokengate.lanes._base.LaneHost` it
builds; the backend speaks to its coordinator only through the ``BackendHost``. Also here: the
helping wait of worker threads (``_helping.py``), replacing a thread stuck past its timeout, and
the convergence engine that resizes the thread and I/O pools.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .._convergence import ConvergenceEngine, ConvergencePolicy
from .._dependencies import DependencyTracker, find_dependencies
from .._errors import Overloaded
from .._spec import STORAGE_TIERS
from .._token import Token
from .._topology import gil_enabled
from ..backends._base import Backend, BackendHost
from ..lanes._async import AsyncLane
from ..lanes._base import Lane, LaneHost, Worker
from ..lanes._io import IOLane
from ..lanes._sharing import share as share_locally
from ..lanes._thread import ThreadLane
from ..lanes._wire import ProcessCall, prepare_call
from ..lanes.process import ProcessLane, WorkerSetup, check_process_lane_option
from ._helping import Helper
from ._router import Router

if TYPE_CHECKING:
    from .._decorator import TaskFunction
    from .._spec import TaskSpec

__all__ = ["LocalBackend"]

_S = TypeVar("_S")

log = logging.getLogger("tokengate.coordinator")
_perf = time.perf_counter
# Argument types that can hold a Token (the dependency scan's fast path checks only these).
_MAYBE_DEPENDENCY = frozenset((Token, list, tuple, dict))


class _LaneHost:
    """This backend's side of the lane contract (``LaneHost``), handed to every lane: bound
    methods looked up once, so a lane's call costs what a direct call would."""

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

    def __init__(self, backend: LocalBackend, host: BackendHost) -> None:
        self.gate = host.gate
        self.claim = backend.claim
        self.begin = backend.begin
        self.complete = host.completion.complete
        self.run = backend.run
        self.after_token = backend.after_token
        self.on_worker_thread = host.on_worker_thread
        self.fail_internal = host.completion.fail_internal
        self.count_event = host.count_event


class LocalBackend(Backend):
    """Runs tokens on core-pinned threads, worker processes, I/O pools and an event loop."""

    name = "local"

    def __init__(self, process_lane: bool | str = "auto") -> None:
        self._process_option = process_lane
        self._lanes: dict[str, Lane] = {}
        self._convergence: ConvergenceEngine | None = None
        self._host: BackendHost | None = None
        self._router: Router | None = None
        self._deps: DependencyTracker | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def configure(self, host: BackendHost) -> None:
        """Check the lane settings and build what lives as long as the coordinator."""
        self._host = host
        cfg = host.config
        self._process_on = check_process_lane_option(cfg.process_lane)
        # How its worker processes start (pickles the initializer: refused here, not at start).
        self._worker_setup = WorkerSetup.from_config(cfg) if self._process_on else None
        self._mailbox_max = cfg.mailbox_max
        self._low_water = max(1, cfg.mailbox_max // 2)
        self._reject = cfg.admission == "reject"
        self._gate = host.gate
        self._life = host.lifecycle
        self._completion = host.completion
        self._backlog = host.backlog
        self._budget = host.byte_budget
        self._deps = DependencyTracker(self._admit_internal, host.completion.fail_unrun)
        self._router = Router(
            affinity=host.affinity,
            mailbox_max=cfg.mailbox_max,
            reject=self._reject,
            gate=host.gate,
            lifecycle=host.lifecycle,
            process_lane=self._process_on,
            gil=gil_enabled(),
        )
        self._push = self._router.push  # bound once: every submit calls it
        self._helper = Helper(host.owner, self._deps, self._router.lane_for, self.run)
        self._lane_host: LaneHost = _LaneHost(self, host)

    def start(self, host: BackendHost) -> None:
        if self._host is not host:
            self.configure(host)
        router = self._router
        assert router is not None
        cores: dict[int, int | None] = {
            core: host.topology.cpu_for_core(core) for core in range(1, host.core_count + 1)
        }
        self._lanes = self._build_lanes(host, cores)
        router.lanes = self._lanes
        router.invalidate()
        host.backlog.bound = self._backlog_bound
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "[CORE_PINNED_QUEUE] Starting %d mailbox workers...",
                sum(len(lane.workers) for lane in self._lanes.values()),
            )
        for lane in self._lanes.values():
            lane.start()
        self._start_convergence(host)

    def _build_lanes(self, host: BackendHost, cores: dict[int, int | None]) -> dict[str, Lane]:
        """Create the lanes (thread, I/O and async always; process where supported)."""
        cfg = host.config
        lane_host = self._lane_host
        lanes: dict[str, Lane] = {
            "thread": ThreadLane(
                cores,
                cfg.workers_per_core,
                host=lane_host,
                max_workers_per_core=cfg.max_workers_per_core,
            ),
            "io": IOLane(STORAGE_TIERS, cfg.io_workers, host=lane_host, limit=host.throttle.limit),
            "async": AsyncLane(
                lane_host,
                concurrency=cfg.async_concurrency,
                stall_after=cfg.async_stall_after,
                defer=host.defer,
            ),
        }
        if self._process_on:  # one worker process per core, started here, kept warm
            lanes["process"] = ProcessLane(
                cores,
                host=lane_host,
                policies=host.policies,
                allowed=host.affinity.allowed,
                budget=host.byte_budget,
                setup=self._worker_setup,
            )
        return lanes

    def _start_convergence(self, host: BackendHost) -> None:
        cfg = host.config
        if not cfg.convergence:
            self._convergence = None
            return
        router = self._router
        assert router is not None
        engine = ConvergenceEngine(
            lambda: self._lanes,
            interval=cfg.convergence_interval,
            policy=ConvergencePolicy(
                gil_capacity=1.0 if gil_enabled() else float(host.core_count),
                cores=host.core_count,
            ),
            on_change=router.invalidate,
            count_event=host.count_event,
        )
        io_lane = self._lanes.get("io")
        if isinstance(io_lane, IOLane):  # a tier's backlog is answered at once, not next sample
            io_lane.on_backlog = engine.nudge
        engine.start()
        self._convergence = engine

    def draining(self) -> None:
        """No resizing from now on (``stop()`` begins)."""
        engine, self._convergence = self._convergence, None
        if engine is not None:
            engine.stop()

    def prioritize(self) -> None:
        self.router.prioritized = True

    def stop(self) -> list[Any]:
        self.draining()
        return [w for lane in self._lanes.values() for w in lane.stop(timeout=1.0)]

    def forget_after_fork(self) -> None:
        """In a forked child: the worker processes belong to the parent (takes no lock)."""
        process = self._lanes.get("process")
        if isinstance(process, ProcessLane):
            process.forget_after_fork()

    @property
    def lanes(self) -> Mapping[str, Lane]:
        return self._lanes

    @property
    def convergence(self) -> ConvergenceEngine | None:
        return self._convergence

    @property
    def router(self) -> Router:
        """Which lane and worker each token goes to (``router.invalidate()`` after resizing
        a lane by hand)."""
        assert self._router is not None
        return self._router

    def iter_workers(self) -> Iterator[Worker]:
        return iter([w for lane in self._lanes.values() for w in lane.workers])

    def wait_ready(self, timeout: float | None) -> bool:
        """Every lane whose workers start apart from ``start()`` (the process lane's worker
        processes, on first use) starts them now and is waited for, within one ``timeout``
        for all of them."""
        end = None if timeout is None else time.monotonic() + timeout
        for lane in self._lanes.values():
            wait = getattr(lane, "wait_ready", None)
            if wait is None:
                continue
            left = None if end is None else max(0.0, end - time.monotonic())
            if not wait(left):
                return False
        return True

    def describe(self) -> str:
        return "local lanes: " + ", ".join(
            f"{name} ({len(lane.workers)})" for name, lane in self._lanes.items()
        )

    # -- submission --------------------------------------------------------------------------
    def prepare(
        self, task: TaskFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ProcessCall | None:
        """A process-lane call is pickled here, on the caller's thread, before the token
        exists: an unpicklable argument raises ``SerializationError`` from the call and nothing
        is counted. Arguments holding tokens are pickled once resolved."""
        spec = task.spec
        if spec.weight != "heavy" and spec.executor != "process":
            return None  # runs_in_process needs one of the two: most calls skip the route
        router = self._router
        assert router is not None
        route = router._routes.get(id(spec))  # route_for, inlined: once per submitted call
        if route is None or route.spec is not spec:
            route = router._route_of(spec)
        if route.lane != "process":
            return None
        has_deps = bool((args or kwargs) and find_dependencies(args, kwargs))
        return prepare_call(task, args, kwargs, has_dependencies=has_deps)

    def submit(
        self, token: Token[Any], task: TaskFunction[..., Any], internal: bool, payload: Any = None
    ) -> None:
        if payload is not None:
            token._payload = payload
            if not self._hold_bytes(token, payload, internal):
                return  # discarded: stop() gave up on pending work while it waited
        args, kwargs = token.args, token.kwargs
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
                tracker = self._deps
                assert tracker is not None
                self._backlog.park_outside(
                    token, tracker.__len__, internal, lambda: tracker.park(token, deps)
                )
                return
        spec = token.spec
        if spec.storage_speed is None and spec.rate is None:  # nothing for admit to do
            self._push(token, internal)
        else:
            self.admit(token, internal)

    def _hold_bytes(self, token: Token[Any], call: ProcessCall, internal: bool) -> bool:
        """Charge a process call's pickled bytes to the byte budget before it is queued: an
        outside producer waits for room (or is refused with admission='reject'); a call
        from a task never waits. False if the token was discarded instead."""
        budget = self._budget
        charged = budget.try_charge(call)
        if not charged and internal:
            budget.force(call)
            charged = True
        if charged:
            # A held call (an executor's) is visible before it is queued: a discard racing
            # with the charge may have released nothing, so the charge is given back here.
            if token.done():
                budget.release(call)
                return False
            return True
        if self._reject:
            token._discard("overloaded")
            raise Overloaded(budget.refusal(token.operation_type, call.size()))
        life = self._life
        self._gate.wait_for(lambda: True if life.discarding or budget.try_charge(call) else None)
        if life.discarding:
            token._discard("stopped")
            return False
        return True

    def _admit_internal(self, token: Token[Any]) -> None:
        self.admit(token, True)

    def admit(self, token: Token[Any], internal: bool) -> None:
        """Past its operation's rate and its tier's permit, to a mailbox."""
        spec = token.spec
        if spec.rate is not None and self._backlog.hold_for_rate(
            token, internal, self._admit_internal
        ):
            return  # waits for its operation's rate; the RateLimiter re-admits it
        if spec.storage_speed is not None and not self._backlog.acquire_tier(token, internal):
            return  # routed by whoever releases the next permit (granted)
        self._push(token, internal)

    def charge_queued(self, token: Token[Any]) -> bool:
        """Charge ``token``'s process call (if any) to the byte budget, over the limit if need
        be, as it waits in a queue again; False if the token has ended.

        A discard racing with this may have run ``discarded`` before the charge, releasing
        nothing: so the token is checked after charging, and the charge given back if it ended
        (a call holds its charge at most once, so a release by both sides counts once).
        """
        call = token._payload
        if call is not None:
            self._budget.force(call)
        if not token.done():
            return True
        if call is not None:
            self._budget.release(call)
        return False

    def has_room(self, spec: TaskSpec, *, dependencies: bool, mailboxes: bool = True) -> bool:
        bound = self._backlog_bound()
        if dependencies:
            assert self._deps is not None
            return len(self._deps) < bound
        tier = spec.storage_speed
        if tier is not None:
            host = self._host
            assert host is not None
            return host.throttle.waiting(tier) < bound
        if not mailboxes:
            return True
        return self.router.pick(self.router.route_for(spec).candidates) is not None

    def _backlog_bound(self) -> int:
        """How many tokens may wait outside the mailboxes in one place (for dependencies, a
        tier permit, a rate) before an outside producer waits: as many as the mailboxes hold."""
        workers = sum(len(lane.workers) for lane in self._lanes.values())
        return self._mailbox_max * max(1, workers)

    def share(self, obj: _S) -> _S:
        """This machine's shared memory, which the worker processes map: an equal, read-only
        object built on it (``lanes/_sharing.py``)."""
        return share_locally(obj)

    # -- the completion path's requests ---------------------------------------------------------
    def granted(self, tokens: list[Token[Any]]) -> None:
        push = self._push
        for token in tokens:
            push(token, True)

    def resized(self, granted: list[Token[Any]]) -> None:
        self.granted(granted)

    def retrying(self, token: Token[Any]) -> None:
        self.charge_queued(token)  # a process call waits in a queue again, holding its bytes

    def readmit(self, token: Token[Any]) -> None:
        if self.charge_queued(token):
            self.admit(token, True)

    def discarded(self, token: Token[Any]) -> None:
        call = token._payload
        if call is not None:  # a process call that will never be sent: let its bytes go
            token._payload = None
            self._budget.release(call)

    def not_started(self) -> list[Token[Any]]:
        out: list[Token[Any]] = []
        if self._deps is not None:
            out += self._deps.drain()
        for lane in self._lanes.values():
            out += lane.queued()
        return out

    def help(self, token: Token[Any], end: float | None) -> None:
        self._helper.help(token, end)

    # -- execution (the LaneHost side) ---------------------------------------------------------
    def claim(self, token: Token[Any]) -> bool:
        """Take a token for running: discarded instead if past its deadline (``run`` inlines
        this and ``begin``: keep the three in step)."""
        deadline = token._deadline_at
        if deadline is not None and _perf() > deadline:
            token._discard("deadline")
            return False
        return token._try_claim()

    def begin(self, token: Token[Any], worker: Worker, *, arm_timeout: bool = True) -> int:
        """Record the start of a run on ``worker``; arms the thread-style timeout if asked."""
        token.attempts += 1
        token._ran_on = worker
        run_id = token._run_id
        if arm_timeout and token.spec.timeout is not None:
            self._completion.arm_timeout(token, run_id)
        token.started_at = _perf()
        return run_id

    def run(self, token: Token[Any], worker: Worker) -> bool:
        """Claim ``token`` and run its body on this thread, then complete it; False if it was
        not runnable (discarded, past its deadline, or claimed elsewhere).

        ``claim`` and ``begin`` are inlined: this runs once per token on the thread lane, and
        the two calls were a measurable share of a no-op token's cost (B1)."""
        deadline = token._deadline_at
        if deadline is not None and _perf() > deadline:
            token._discard("deadline")
            return False
        if not token._try_claim():
            return False
        token.attempts += 1
        token._ran_on = worker
        run_id = token._run_id
        if token.spec.timeout is not None:
            self._completion.arm_timeout(token, run_id)
        token.started_at = _perf()
        previous = worker.current
        worker.current = token
        try:
            value = token.fn(*token.args, **token.kwargs)
        except BaseException as exc:
            worker.current = previous
            self._completion.complete(token, run_id, None, exc)
        else:
            worker.current = previous
            self._completion.complete(token, run_id, value, None)
        return True

    def after_token(self, worker: Worker) -> None:
        gate = self._gate
        if gate.unwoken and len(worker.mailbox) <= self._low_water:
            gate.notify()

    def stuck(self, token: Token[Any]) -> None:
        """Give the mailbox of the worker stuck in ``token`` to a fresh thread, so the tokens
        queued behind a hung task do not wait for it (a thread cannot be killed)."""
        lane = self._lanes.get(token.lane or "")
        replace = getattr(lane, "replace", None)
        if lane is None or replace is None:
            return
        stuck = next((w for w in lane.workers if w.current is token), None)
        if stuck is None or replace(stuck) is None:
            return
        self.router.invalidate()  # cached routes still name the stuck worker
        host = self._host
        assert host is not None
        host.count_event("workers_replaced")
        log.warning(
            "[%s] stuck in %s past its timeout; a fresh thread took over its mailbox and the "
            "stuck one will exit when the task returns",
            stuck.name,
            token.id,
        )
