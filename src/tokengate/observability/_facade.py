"""The observability component of ``OperationsCoordinator``: one object the coordinator holds.

The coordinator builds one :class:`Observability` from its configuration, installs the
middleware it hands out, and forwards its public observability methods (``guard_house``,
``serve_metrics``, ``export_trace``...) to it, so the coordinator's class holds no
observability state or logic of its own. Each part is ordinary middleware, installed with
``add_middleware`` like any user's, so a part that is off costs nothing at all:

===================  ==========================  =========================================
part                 config                      hooks
===================  ==========================  =========================================
Guard House monitor  ``guard_house=True``        ``after_failure``, ``after_long_run``,
                                                 ``check_runs``
circuit breaker      ``auto_block=True``         ``before_submit``, ``after_attempt``,
                                                 ``after_discard``
Overflow Guard       ``overflow_guard=True``     ``on_start``/``on_stop`` (a sampler thread)
trace                ``trace=True``              ``after_attempt`` (a ring buffer)
metrics server       ``serve_metrics()``         ``on_stop`` (closes the HTTP servers)
===================  ==========================  =========================================

The component keeps no reference to its coordinator (the methods that need it take it as an
argument), so it adds no reference cycle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._errors import CoordinatorNotRunning, TokenGateError
from .._middleware import Middleware
from ._options import default_memory_budget
from ._overflow import OverflowGuard
from ._trace import Span, TraceRecorder, write_trace
from .guard_house import GuardHouse

if TYPE_CHECKING:
    from .._admission import AdmissionGate
    from .._config import CoordinatorConfig
    from .._coordinator import OperationsCoordinator
    from .._state import Lifecycle
    from .._stats import StatsRecorder
    from ._metrics import MetricsServer, TokenGateCollector

__all__ = ["Observability"]

metrics_log = logging.getLogger("tokengate.metrics")
trace_log = logging.getLogger("tokengate.trace")
_INFO = logging.INFO


class _MetricsServers(Middleware):
    """Closes the coordinator's metrics servers when it stops."""

    def __init__(self) -> None:
        self.servers: list[MetricsServer] = []

    def on_stop(self, coordinator: Any) -> None:
        servers, self.servers = self.servers, []
        for server in servers:
            server.close()
            if metrics_log.isEnabledFor(_INFO):
                metrics_log.info("[METRICS] Stopped serving %s", server.url)


class Observability:
    """Guard House, Overflow Guard, trace export and Prometheus metrics of one coordinator."""

    def __init__(
        self,
        config: CoordinatorConfig,
        stats: StatsRecorder,
        gate: AdmissionGate,
        add_middleware: Callable[[Middleware], None],
        lifecycle: Lifecycle,
    ) -> None:
        self._add_middleware = add_middleware
        self._lifecycle = lifecycle  # serve_metrics() refuses a stopping coordinator
        self.guard_house = GuardHouse(
            enabled=config.guard_house,
            auto_block=config.auto_block,
            block_after=config.block_after,
            block_cooldown=config.block_cooldown,
            count_event=stats.count_event,
            stats=stats,
        )
        budget = config.memory_budget
        # The stats, not the coordinator: the sampler thread must not keep it alive.
        self.overflow_guard = OverflowGuard(
            gate,
            budget if isinstance(budget, int) else default_memory_budget(),
            enabled=config.overflow_guard,
            interval=config.memory_check_interval,
            in_flight=lambda: stats.snapshot().in_flight,
            count_event=stats.count_event,
        )
        self.trace = TraceRecorder(config.trace_buffer) if config.trace else None
        self._metrics_servers: _MetricsServers | None = None
        if config.overflow_guard:
            add_middleware(self.overflow_guard)
        for middleware in self.guard_house.middleware():
            add_middleware(middleware)
        if self.trace is not None:
            add_middleware(self.trace)

    def serve_metrics(self, coordinator: OperationsCoordinator, port: int, addr: str) -> int:
        """``coordinator.serve_metrics``: start an HTTP server that stops with the coordinator."""
        from ._metrics import MetricsServer, TokenGateCollector, require

        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535 (0: any free port), got {port!r}")
        status = self._lifecycle.status
        if status in ("stopping", "stopped"):
            raise CoordinatorNotRunning(
                f"serve_metrics() on a coordinator that is {status}: the server "
                f"would outlive it. Call it before stop(), or after start() again"
            )
        prometheus_client = require()
        registry = prometheus_client.CollectorRegistry()
        registry.register(TokenGateCollector(coordinator))
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)
        server = MetricsServer(registry, port, addr)
        if self._metrics_servers is None:
            self._metrics_servers = _MetricsServers()
            self._add_middleware(self._metrics_servers)
        self._metrics_servers.servers.append(server)
        if metrics_log.isEnabledFor(_INFO):
            metrics_log.info("[METRICS] Serving Prometheus metrics on %s", server.url)
        return server.port

    @staticmethod
    def metrics_collector(coordinator: OperationsCoordinator, **options: Any) -> TokenGateCollector:
        """``coordinator.metrics_collector``: a collector reading ``coordinator``."""
        from ._metrics import TokenGateCollector

        return TokenGateCollector(coordinator, **options)

    def trace_spans(self) -> list[Span]:
        """``coordinator.trace_spans``: the buffered spans, oldest first."""
        return self._require_trace().spans()

    def export_trace(self, path: str | os.PathLike[str]) -> int:
        """``coordinator.export_trace``: write the spans as Chrome trace-event JSON."""
        recorder = self._require_trace()
        spans = recorder.spans()
        count = write_trace(path, spans, capacity=recorder.capacity, full=recorder.full)
        if trace_log.isEnabledFor(_INFO):
            trace_log.info("[TRACE] Wrote %d spans to %s", count, os.fspath(path))
        return count

    def _require_trace(self) -> TraceRecorder:
        if self.trace is None:
            raise TokenGateError(
                "tracing is off: create the coordinator with OperationsCoordinator(trace=True) "
                "(and trace_buffer=N to keep more than the last 10,000 attempts)"
            )
        return self.trace
