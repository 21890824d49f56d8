"""Router: which lane runs a task, and which of its workers takes each token.

The lane is decided once per :class:`TaskSpec` (the lane model of ``docs/design.md``):
``async def`` tasks run on the event loop (``async``), storage-tier tasks on the per-tier thread
pools (``io``), heavy CPU work on the worker processes while the GIL is on (``process``), the
rest on the core-pinned threads (``thread``). With it come the candidate workers: those of the
cores the spec's weight may use (``AffinityPolicy``), or the lane's own pick. That route is
cached per spec and rebuilt when a lane adds or retires workers (:meth:`Router.invalidate`).

Each token then goes to the least-loaded candidate (queued + running); the first idle one wins
at once. Once even the least-loaded candidate holds ``DEEP`` tokens, a burst takes the candidates
in turn instead, each while it holds at most a quarter more than that least load, and scans them
all again when the next in turn is fuller. A token then queues behind at most a quarter more
tokens than it would have, and routing it costs the same on any machine (a scan looks at every
candidate, and a light task on 16 cores has 56). Below ``DEEP`` every token still scans: a
queue of a few tokens is where one more matters to its latency.

A token with a locality key (``fn.options(locality=...)``) goes instead to the worker its key is
anchored to, set by the key's first token (the least-loaded candidate then) and kept while that
worker stays a candidate: worker-local state is hit, at the price of queueing behind the key's
earlier tokens.

When every candidate's mailbox is full, an outside producer waits for room on the admission gate (or
is refused with ``admission="reject"``), and a call made from inside a task overflows the soft bound
instead of blocking a worker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any

from .._errors import Overloaded
from .._logging import level_answers
from .._priority import push_by_priority
from ..lanes._base import Lane, Worker
from ..lanes.process import runs_in_process

if TYPE_CHECKING:
    from .._admission import AdmissionGate
    from .._affinity import AffinityPolicy
    from .._spec import TaskSpec
    from .._state import Lifecycle
    from .._token import Token

__all__ = ["ANCHORS_MAX", "Route", "Router"]

ANCHORS_MAX = 100_000
"""Locality keys remembered at once; the oldest is forgotten beyond (its next token anchors
again, possibly elsewhere)."""

log = logging.getLogger("tokengate.coordinator")
routing_log = logging.getLogger("tokengate.routing")
_DEBUG = logging.DEBUG
_routing_answers = level_answers(routing_log)  # the hot path reads it first

DEEP = 8
"""Tokens (queued + running) the least-loaded candidate holds before a burst takes the
candidates in turn; below it, every token goes to the least-loaded one exactly."""


class Route:
    """A spec's route: the spec itself (to tell a reused ``id()`` apart), its lane and its
    candidate workers; and, while their queues are deep, whose turn it is and how full a
    candidate may be to take it (``Router.push``). Producers race on the two without a lock:
    the worst a race does is queue one token on a sibling of the least-loaded worker."""

    __slots__ = ("candidates", "fill_below", "lane", "spec", "turn")

    def __init__(self, spec: TaskSpec, lane: str, candidates: list[Worker]) -> None:
        self.spec = spec
        self.lane = lane
        self.candidates = candidates
        self.turn = 0
        self.fill_below = 0  # 0: scan them all; n: the next in turn takes it with < n queued

    def __repr__(self) -> str:
        workers = len(self.candidates)
        return f"<Route {self.spec.operation_type!r} -> {self.lane}, {workers} workers>"


class Router:
    """Owns the route cache and the pick rule of the local lanes."""

    def __init__(
        self,
        *,
        affinity: AffinityPolicy,
        mailbox_max: int,
        reject: bool,
        gate: AdmissionGate,
        lifecycle: Lifecycle,
        process_lane: bool,
        gil: bool,
    ) -> None:
        self.affinity = affinity
        self.mailbox_max = mailbox_max
        self.reject = reject
        self.gate = gate
        self.lifecycle = lifecycle
        self.process_lane = process_lane
        self.gil = gil
        self.lanes: Mapping[str, Lane] = {}
        # id(spec) -> (spec, lane, candidate workers): the route of a spec is worked out once.
        self._routes: dict[int, Route] = {}
        # Set once a token of non-zero priority is routed: from then on pushes keep order.
        self.prioritized = False
        # (lane, locality key) -> the worker its tokens go to; the oldest keys are forgotten
        # beyond ANCHORS_MAX (their next token anchors again), so keys cannot grow memory.
        self._anchors: dict[tuple[str, Hashable], Worker] = {}
        self._warned_no_process: set[str] = set()

    def invalidate(self) -> None:
        """A lane added or retired workers: routes are rebuilt on their next use."""
        self._routes = {}

    # -- which lane, which candidates ---------------------------------------------------------
    def lane_for(self, spec: TaskSpec) -> str:
        """Which lane runs tokens of ``spec``."""
        if spec.is_async:
            return "async"
        if spec.storage_speed is not None and spec.executor != "process":
            return "io"
        if runs_in_process(spec, gil=self.gil):
            if self.process_lane:
                return "process"
            if spec.executor == "process" and spec.operation_type not in self._warned_no_process:
                self._warned_no_process.add(spec.operation_type)
                log.warning(
                    "%r is tagged executor='process' but this coordinator has no process lane "
                    "(process_lane=False or unsupported here); it runs on threads",
                    spec.operation_type,
                )
        return "thread"

    def route_for(self, spec: TaskSpec) -> Route:
        """The cached route of ``spec`` (worked out on first use, or after workers changed;
        ``push`` inlines this and ``pick``)."""
        route = self._routes.get(id(spec))
        if route is None or route.spec is not spec:
            route = self._route_of(spec)
        return route

    def _route_of(self, spec: TaskSpec) -> Route:
        routes = self._routes  # a route built while workers change lands in the old dict
        lane_name = self.lane_for(spec)
        lane = self.lanes[lane_name]
        pick = getattr(lane, "candidates", None)  # a lane may choose its own workers
        if pick is not None:
            candidates = list(pick(spec))
        else:
            candidates = [
                w for core in self.affinity.allowed(spec.weight) for w in lane.by_core.get(core, ())
            ]
        if not candidates:  # a lane with fewer cores than the policy (e.g. one event loop)
            candidates = list(lane.workers)
        route = Route(spec, lane_name, candidates)
        routes[id(spec)] = route
        if spec.priority:
            self.prioritized = True
        return route

    # -- which worker ------------------------------------------------------------------------
    def pick(self, candidates: list[Worker]) -> Worker | None:
        """The least-loaded candidate with room (an idle one at once), else None."""
        best: Worker | None = None
        best_load = self.mailbox_max
        for worker in candidates:
            load = len(worker.mailbox) + (worker.current is not None)
            if load == 0:
                return worker
            if load < best_load:
                best, best_load = worker, load
        return best

    def push(self, token: Token[Any], internal: bool) -> None:
        """Queue ``token`` on the least-loaded worker its route allows (in turn while every
        one is deep, see the module doc; or its locality key's worker), waiting for room if
        every allowed mailbox is full (an outside producer) or overflowing (a call from a task).

        Once per token: ``route_for`` and ``pick`` are inlined (keep them in step)."""
        spec = token.spec
        route = self._routes.get(id(spec))
        if route is None or route.spec is not spec:
            route = self._route_of(spec)
        candidates = route.candidates
        if token._locality is None:
            best = None
            fill_below = route.fill_below
            if fill_below:  # every candidate was deep at the last scan: the next in turn
                turn = route.turn
                worker = candidates[turn]
                turn += 1
                route.turn = turn if turn < len(candidates) else 0
                if len(worker.mailbox) < fill_below:
                    best = worker
            if best is None:
                best_load = self.mailbox_max
                for worker in candidates:
                    load = len(worker.mailbox) + (worker.current is not None)
                    if load == 0:
                        best, best_load = worker, 0
                        break
                    if load < best_load:
                        best, best_load = worker, load
                if best is not None and best_load >= DEEP:  # a quarter more, with room
                    route.fill_below = min(best_load + best_load // 4, self.mailbox_max - 1)
                elif fill_below:
                    route.fill_below = 0
        else:
            candidates = [self._anchor(route.lane, token._locality, candidates)]
            best = self.pick(candidates)
        if best is None:
            best = self._when_full(token, internal, candidates)
            if best is None:  # stop() gave up on pending work while this producer waited
                token._discard("stopped")
                return
        if token._parked is not None:  # granted a tier permit: no longer parked
            token._parked = None
        closed = self.lifecycle
        if self.prioritized:
            moved = push_by_priority(best, token)
            if closed.closed:  # pushed after the workers were told to stop: none will run them
                for other in moved:
                    other._discard("stopped")
        else:
            best.push(token)
        if closed.closed:  # pushed after the workers were told to stop: none will run it
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

    def _anchor(self, lane: str, key: Hashable, candidates: list[Worker]) -> Worker:
        """The worker ``key``'s tokens go to on ``lane``: its anchor while that is still a
        candidate, else (first token, or its worker retired) the least-loaded candidate."""
        anchors = self._anchors
        worker = anchors.get((lane, key))
        if worker is not None and any(w is worker for w in candidates):
            return worker
        worker = min(candidates, key=lambda w: w.load())
        if len(anchors) >= ANCHORS_MAX:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del anchors[next(iter(anchors))]  # the oldest key
        anchors[(lane, key)] = worker
        return worker

    def _when_full(
        self, token: Token[Any], internal: bool, candidates: list[Worker]
    ) -> Worker | None:
        if internal:  # never block a worker or the timer thread: overflow the soft bound
            return min(candidates, key=lambda w: w.load())
        if self.reject:
            token._discard("overloaded")
            raise Overloaded(
                f"every mailbox allowed for {token.spec.weight!r} tokens holds "
                f"{self.mailbox_max} tokens (mailbox_max); {token.operation_type!r} was "
                f"refused. Slow the producer, raise mailbox_max, or use admission='block'"
            )
        life = self.lifecycle

        def room() -> list[Worker] | None:  # [] ends the wait without a worker
            if life.discarding:
                return []
            worker = self.pick(candidates)
            return None if worker is None else [worker]

        found = self.gate.wait_for(room)
        return found[0] if found else None
