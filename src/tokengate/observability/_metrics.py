"""Prometheus exposition, read from the coordinator at scrape time (nothing on the hot path).

:class:`TokenGateCollector` is a custom collector: every scrape takes one ``stats()`` snapshot and
reads the lanes, the storage throttle, the admission gate, the Guard House and the Overflow Guard,
and turns what it finds into metric families. Register it with any registry::

    from prometheus_client import REGISTRY
    REGISTRY.register(TokenGateCollector(coordinator))

or let ``coordinator.serve_metrics(port=0)`` serve it (with the process and GC collectors) on a
private registry over HTTP. ``prometheus_client`` is the optional extra ``tokengate[metrics]``;
this module imports it only when a collector or server is made, so ``import tokengate`` never
does. The names are listed in :data:`METRICS` (and in docs/guide/observability.md).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._coordinator import OperationsCoordinator

__all__ = ["DEFAULT_BUCKETS", "METRICS", "MetricsServer", "TokenGateCollector", "require"]

log = logging.getLogger("tokengate.metrics")

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Upper bounds (seconds) of ``tokengate_token_latency_seconds``; tasks are often sub-ms."""

_OP = ("operation_type", "weight")
# name (without _total for counters), type, labels, help. The source of the table in
# docs/guide/observability.md.
METRICS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("tokengate_tokens_submitted", "counter", _OP, "Tokens submitted (calls accepted)."),
    ("tokengate_tokens_resolved", "counter", _OP, "Tokens that returned a value."),
    ("tokengate_tokens_failed", "counter", _OP, "Tokens that ended with an error."),
    ("tokengate_tokens_discarded", "counter", _OP,
     "Tokens discarded before they ran (cancelled, deadline, stop)."),
    ("tokengate_tokens_retried", "counter", _OP, "Failed attempts that were retried."),
    ("tokengate_tokens_in_flight", "gauge", _OP, "Tokens submitted and not yet ended."),
    ("tokengate_token_latency_seconds", "histogram", _OP,
     "Time from call to end (queueing included) of resolved and failed tokens."),
    ("tokengate_rate_waiting", "gauge", _OP,
     "Tokens waiting for their operation's rate limit now (holding no worker)."),
    ("tokengate_rate_delayed", "counter", _OP,
     "Tokens that had to wait for their operation's rate limit."),
    ("tokengate_rate_wait_seconds", "counter", _OP,
     "Seconds tokens waited for their operation's rate limit, in all."),
    ("tokengate_queue_depth", "gauge", ("lane", "core"),
     "Tokens waiting in the worker mailboxes of a core."),
    ("tokengate_workers", "gauge", ("lane", "core"), "Workers on a core."),
    ("tokengate_workers_busy", "gauge", ("lane", "core"), "Workers running a token now."),
    ("tokengate_storage_in_flight", "gauge", ("tier",), "Tasks of a storage tier running now."),
    ("tokengate_storage_limit", "gauge", ("tier",), "Concurrency limit of a storage tier."),
    ("tokengate_storage_waiting", "gauge", ("tier",), "Tokens waiting for a storage permit."),
    ("tokengate_storage_high_water", "gauge", ("tier",),
     "Most tasks of a storage tier ever running at once."),
    ("tokengate_convergence_swaps", "counter", (), "Worker-count hot swaps by convergence."),
    ("tokengate_process_restarts", "counter", (), "Worker processes restarted after a loss."),
    ("tokengate_process_queue_bytes", "gauge", (),
     "Bytes of pickled arguments held by process-lane calls waiting for a worker process."),
    ("tokengate_process_queue_high_water_bytes", "gauge", (),
     "Most bytes of pickled arguments queued process-lane calls ever held at once."),
    ("tokengate_process_queue_limit_bytes", "gauge", (),
     "The byte budget of queued process-lane calls (process_queue_bytes; absent if None)."),
    ("tokengate_shared_objects", "gauge", (),
     "Objects placed in shared memory by share() and alive now."),
    ("tokengate_shared_bytes", "gauge", (),
     "Bytes of shared memory those objects hold (once, whatever the calls using them)."),
    ("tokengate_events", "counter", ("event",), "Every rare event the coordinator counted."),
    ("tokengate_admission_paused", "gauge", ("reason",),
     "1 while admission is paused for that reason (overflow_guard: memory)."),
    ("tokengate_admission_waiters", "gauge", (),
     "Producers blocked at admission now (full mailboxes or a pause)."),
    ("tokengate_memory_rss_bytes", "gauge", (), "Resident memory of the process (last sample)."),
    ("tokengate_memory_budget_bytes", "gauge", (), "The Overflow Guard's memory budget."),
    ("tokengate_guard_house_runs", "counter", ("operation_type",),
     "Runs (attempts) the Guard House observed."),
    ("tokengate_guard_house_errors", "counter", ("operation_type",),
     "Runs that raised (retried or not)."),
    ("tokengate_guard_house_slow_runs", "counter", ("operation_type",),
     "Runs flagged as slow outliers."),
    ("tokengate_guard_house_run_p95_seconds", "gauge", ("operation_type",),
     "95th percentile run duration (execution only)."),
    ("tokengate_guard_house_breaker_open", "gauge", ("operation_type",),
     "1 while the operation's circuit breaker refuses calls (open or half-open)."),
    ("tokengate_guard_house_blocked_calls", "counter", ("operation_type",),
     "Calls refused by the circuit breaker."),
    ("tokengate_coordinator_running", "gauge", (), "1 while the coordinator is running."),
    ("tokengate_uptime_seconds", "gauge", (), "Seconds since the coordinator started."),
)  # fmt: skip

_KNOWN_EVENTS = {
    "tokengate_convergence_swaps": "convergence_swaps",
    "tokengate_process_restarts": "process_restarts",
}


def require() -> Any:
    """Import ``prometheus_client`` or say how to install it."""
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise ImportError(
            "Prometheus metrics need the optional prometheus_client package, which is not "
            "installed: pip install 'tokengate[metrics]'"
        ) from exc
    return prometheus_client


def _le(bound: float) -> str:
    return repr(float(bound))


class TokenGateCollector:
    """A ``prometheus_client`` collector for one coordinator (held by a weak reference).

    ``buckets`` are the latency histogram's upper bounds in seconds. Register it with any
    ``CollectorRegistry``; one collector per coordinator and registry (two would export the same
    names twice).
    """

    def __init__(
        self, coordinator: OperationsCoordinator, *, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        self._core = require().core
        bounds = sorted(float(b) for b in buckets)
        if not bounds or any(math.isnan(b) or b <= 0 for b in bounds):
            raise ValueError(f"buckets must be positive numbers of seconds, got {buckets!r}")
        self.buckets = tuple(b for b in bounds if b != float("inf"))
        self._coordinator = weakref.ref(coordinator)

    def describe(self) -> Iterator[Any]:
        """The metric families without samples (for a registry's duplicate check)."""
        for name, kind, labels, doc in METRICS:
            yield self._family(name, kind, labels, doc)

    def _family(self, name: str, kind: str, labels: Sequence[str], doc: str) -> Any:
        core = self._core
        cls = {
            "counter": core.CounterMetricFamily,
            "gauge": core.GaugeMetricFamily,
            "histogram": core.HistogramMetricFamily,
        }[kind]
        return cls(name, doc, labels=list(labels))

    def collect(self) -> Iterator[Any]:
        coordinator = self._coordinator()
        if coordinator is None:
            return
        families = {
            name: self._family(name, kind, labels, doc) for name, kind, labels, doc in METRICS
        }
        self._tokens(coordinator, families)
        self._lanes(coordinator, families)
        self._storage(coordinator, families)
        self._admission(coordinator, families)
        self._guard_house(coordinator, families)
        yield from families.values()

    def _tokens(self, coordinator: OperationsCoordinator, f: dict[str, Any]) -> None:
        snap = coordinator.stats()
        hist = f["tokengate_token_latency_seconds"]
        for o in snap.operations.values():
            labels = [o.operation_type, o.weight]
            f["tokengate_tokens_submitted"].add_metric(labels, o.submitted)
            f["tokengate_tokens_resolved"].add_metric(labels, o.resolved)
            f["tokengate_tokens_failed"].add_metric(labels, o.failed)
            f["tokengate_tokens_discarded"].add_metric(labels, o.discarded)
            f["tokengate_tokens_retried"].add_metric(labels, o.retried)
            f["tokengate_tokens_in_flight"].add_metric(labels, o.in_flight)
            if o.rate_delayed:  # only operations a rate limit ever held back
                f["tokengate_rate_waiting"].add_metric(labels, o.rate_waiting)
                f["tokengate_rate_delayed"].add_metric(labels, o.rate_delayed)
                f["tokengate_rate_wait_seconds"].add_metric(labels, o.rate_wait_seconds)
            h = o.latency
            counts = h.cumulative_buckets(self.buckets)
            buckets = [(_le(b), n) for b, n in zip(self.buckets, counts, strict=True)]
            buckets.append(("+Inf", h.count))
            hist.add_metric(labels, buckets, sum_value=h.sum)
        events = snap.events
        for family, event in _KNOWN_EVENTS.items():
            f[family].add_metric([], events.get(event, 0))
        for event, n in sorted(events.items()):
            f["tokengate_events"].add_metric([event], n)
        f["tokengate_uptime_seconds"].add_metric([], snap.elapsed if coordinator.running else 0)
        f["tokengate_process_queue_bytes"].add_metric([], snap.process_queue_bytes)
        f["tokengate_process_queue_high_water_bytes"].add_metric(
            [], snap.process_queue_bytes_high_water
        )
        limit = coordinator.config.process_queue_bytes
        if isinstance(limit, int):
            f["tokengate_process_queue_limit_bytes"].add_metric([], limit)
        f["tokengate_shared_objects"].add_metric([], snap.shared_objects)
        f["tokengate_shared_bytes"].add_metric([], snap.shared_bytes)
        f["tokengate_coordinator_running"].add_metric([], 1 if coordinator.running else 0)

    @staticmethod
    def _lanes(coordinator: OperationsCoordinator, f: dict[str, Any]) -> None:
        for lane_name, lane in sorted(coordinator.lanes.items()):
            for core, workers in sorted(lane.by_core.items()):
                labels = [lane_name, str(core)]
                f["tokengate_queue_depth"].add_metric(labels, sum(len(w.mailbox) for w in workers))
                f["tokengate_workers"].add_metric(labels, len(workers))
                f["tokengate_workers_busy"].add_metric(
                    labels, sum(1 for w in workers if w.current is not None)
                )

    @staticmethod
    def _storage(coordinator: OperationsCoordinator, f: dict[str, Any]) -> None:
        for tier, t in coordinator.tier_stats().items():
            f["tokengate_storage_in_flight"].add_metric([tier], t.running)
            f["tokengate_storage_limit"].add_metric([tier], t.limit)
            f["tokengate_storage_waiting"].add_metric([tier], t.waiting)
            f["tokengate_storage_high_water"].add_metric([tier], t.high_water)

    @staticmethod
    def _admission(coordinator: OperationsCoordinator, f: dict[str, Any]) -> None:
        admission = coordinator.admission
        paused = admission.paused
        for reason in sorted({"overflow_guard", *paused}):
            f["tokengate_admission_paused"].add_metric([reason], 1 if reason in paused else 0)
        f["tokengate_admission_waiters"].add_metric([], admission.waiters)
        guard = coordinator.overflow_guard
        status = guard.status()
        rss = status.rss
        if rss is None or not guard.enabled:
            from ._overflow import process_rss

            rss = process_rss()
        f["tokengate_memory_rss_bytes"].add_metric([], rss)
        if guard.enabled:
            f["tokengate_memory_budget_bytes"].add_metric([], status.budget)

    @staticmethod
    def _guard_house(coordinator: OperationsCoordinator, f: dict[str, Any]) -> None:
        house = coordinator.guard_house
        if not house.enabled:
            return
        for name, o in house.report().operations.items():
            labels = [name]
            f["tokengate_guard_house_runs"].add_metric(labels, o.runs)
            f["tokengate_guard_house_errors"].add_metric(labels, o.errors)
            f["tokengate_guard_house_slow_runs"].add_metric(labels, o.slow_runs)
            f["tokengate_guard_house_run_p95_seconds"].add_metric(labels, o.duration_p95)
            f["tokengate_guard_house_blocked_calls"].add_metric(labels, o.blocked_calls)
            if house.auto_block:
                f["tokengate_guard_house_breaker_open"].add_metric(
                    labels, 0 if o.breaker == "closed" else 1
                )


@functools.cache
def _server_classes(ipv6: bool) -> tuple[type[Any], type[Any]]:
    """The WSGI server and handler classes, built on first use (http.server is not light)."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class QuietHandler(WSGIRequestHandler):
        """Request lines go to the ``tokengate.metrics`` logger at DEBUG, not to stderr."""

        def log_message(self, format: str, *args: Any) -> None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("[METRICS] %s %s", self.address_string(), format % args)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ipv6 else socket.AF_INET

    return Server, QuietHandler


class MetricsServer:
    """An HTTP server for one registry on its own daemon thread; ``close()`` stops it."""

    def __init__(self, registry: Any, port: int, addr: str) -> None:
        from wsgiref.simple_server import make_server

        prometheus_client = require()
        app = prometheus_client.make_wsgi_app(registry)
        server_cls, handler_cls = _server_classes(":" in addr)
        self._httpd = make_server(addr, port, app, server_cls, handler_class=handler_cls)
        self.addr = addr
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"tokengate-metrics-{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)
