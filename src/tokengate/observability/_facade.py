"""The observability face of ``OperationsCoordinator``, mixed into it.

The coordinator inherits :class:`ObservabilityMixin` and calls ``_init_observability()`` at the
end of its ``__init__``; everything else lives here, so the coordinator module only gains a few
marked lines. What is installed depends on the configuration, and each part is middleware, so a
part that is off costs nothing at all:

===================  ==========================  =========================================
part                 config                      hooks
===================  ==========================  =========================================
Guard House monitor  ``guard_house=True``        ``after_failure`` (+ run times in the stats)
circuit breaker      ``auto_block=True``         ``before_submit``, ``after_attempt``,
                                                 ``after_discard``
Overflow Guard       ``overflow_guard=True``     ``on_start``/``on_stop`` (a sampler thread)
trace                ``trace=True``              ``after_attempt`` (a ring buffer)
metrics server       ``serve_metrics()``         ``on_stop`` (closes the HTTP servers)
===================  ==========================  =========================================
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, cast

from .._errors import CoordinatorNotRunning, Overloaded, TokenGateError
from .._middleware import Middleware
from ._guardhouse import GuardHouse
from ._options import default_memory_budget
from ._overflow import OverflowGuard
from ._trace import Span, TraceRecorder, write_trace

if TYPE_CHECKING:
    from .._coordinator import OperationsCoordinator
    from .._spec import TaskSpec
    from ._metrics import MetricsServer, TokenGateCollector

__all__ = ["ObservabilityMixin"]

guard_log = logging.getLogger("tokengate.guard_house")
overflow_log = logging.getLogger("tokengate.overflow")
metrics_log = logging.getLogger("tokengate.metrics")
trace_log = logging.getLogger("tokengate.trace")
_INFO = logging.INFO
_DEBUG = logging.DEBUG


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


class ObservabilityMixin:
    """Guard House, Overflow Guard, trace export and Prometheus metrics of a coordinator."""

    _guard_house: GuardHouse
    _overflow_guard: OverflowGuard
    _trace: TraceRecorder | None
    _metrics_servers: _MetricsServers | None

    def _init_observability(self) -> None:
        c = cast("OperationsCoordinator", self)
        cfg = c.config
        self._guard_house = GuardHouse(
            enabled=cfg.guard_house,
            auto_block=cfg.auto_block,
            block_after=cfg.block_after,
            block_cooldown=cfg.block_cooldown,
            count_event=c._stats.count_event,
            stats=c._stats,
        )
        if cfg.guard_house:  # run times reach it without a middleware call per token
            c._watch_runs = True
            c._run_watcher = self._guard_house.watch_run
        budget = cfg.memory_budget
        stats = c._stats  # not the coordinator: the sampler thread must not keep it alive
        self._overflow_guard = OverflowGuard(
            c._gate,
            budget if isinstance(budget, int) else default_memory_budget(),
            enabled=cfg.overflow_guard,
            interval=cfg.memory_check_interval,
            in_flight=lambda: stats.snapshot().in_flight,
            count_event=stats.count_event,
        )
        self._trace = TraceRecorder(cfg.trace_buffer) if cfg.trace else None
        self._metrics_servers = None
        installed: list[Middleware] = []
        if cfg.overflow_guard:
            installed.append(self._overflow_guard)
        installed += self._guard_house.middleware()
        if self._trace is not None:
            installed.append(self._trace)
        for middleware in installed:
            c.add_middleware(middleware)

    # -- public surface --------------------------------------------------------------------------
    @property
    def guard_house(self) -> GuardHouse:
        """The passive per-operation monitor (and circuit breaker with ``auto_block=True``)."""
        return self._guard_house

    @property
    def overflow_guard(self) -> OverflowGuard:
        """The memory budget guard (``overflow_guard.status()``, ``.budget``)."""
        return self._overflow_guard

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve Prometheus metrics over HTTP at ``/metrics``; returns the bound port.

        ``port=0`` picks a free port. The server reads the coordinator at scrape time only and
        stops with the coordinator. Needs ``pip install 'tokengate[metrics]'``.
        """
        from ._metrics import MetricsServer, TokenGateCollector, require

        c = cast("OperationsCoordinator", self)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535 (0: any free port), got {port!r}")
        if c._status in ("stopping", "stopped"):
            raise CoordinatorNotRunning(
                f"serve_metrics() on a coordinator that is {c._status}: the server would outlive "
                f"it. Call it before stop(), or after start() again"
            )
        prometheus_client = require()
        registry = prometheus_client.CollectorRegistry()
        registry.register(TokenGateCollector(c))
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)
        server = MetricsServer(registry, port, addr)
        if self._metrics_servers is None:
            self._metrics_servers = _MetricsServers()
            c.add_middleware(self._metrics_servers)
        self._metrics_servers.servers.append(server)
        if metrics_log.isEnabledFor(_INFO):
            metrics_log.info("[METRICS] Serving Prometheus metrics on %s", server.url)
        return server.port

    def metrics_collector(self, **options: Any) -> TokenGateCollector:
        """A :class:`TokenGateCollector` for this coordinator, to register with your registry."""
        from ._metrics import TokenGateCollector

        return TokenGateCollector(cast("OperationsCoordinator", self), **options)

    def trace_spans(self) -> list[Span]:
        """The buffered task spans, oldest first (``trace=True``)."""
        return self._require_trace().spans()

    def export_trace(self, path: str | os.PathLike[str]) -> int:
        """Write the recent task spans to ``path`` as Chrome trace-event JSON; returns how many.

        Open the file in https://ui.perfetto.dev or ``chrome://tracing``: one track per worker,
        grouped by core. Needs ``trace=True``; the last ``trace_buffer`` attempts are kept.
        """
        recorder = self._require_trace()
        spans = recorder.spans()
        count = write_trace(path, spans, capacity=recorder.capacity, full=recorder.full)
        if trace_log.isEnabledFor(_INFO):
            trace_log.info("[TRACE] Wrote %d spans to %s", count, os.fspath(path))
        return count

    def _require_trace(self) -> TraceRecorder:
        if self._trace is None:
            raise TokenGateError(
                "tracing is off: create the coordinator with OperationsCoordinator(trace=True) "
                "(and trace_buffer=N to keep more than the last 10,000 attempts)"
            )
        return self._trace

    # -- hooks for the coordinator -------------------------------------------------------------
    def _wait_admission_paused(self, spec: TaskSpec) -> None:
        """An external call while admission is paused (Overflow Guard): wait, or refuse."""
        c = cast("OperationsCoordinator", self)
        gate = c._gate
        if c.config.admission == "reject":
            detail = "; ".join(gate.paused.values()) or "paused"
            raise Overloaded(
                f"admission is paused ({detail}); {spec.operation_type!r} was refused. "
                f"Wait for running tasks to free memory, raise memory_budget, or use "
                f"admission='block'"
            )
        gate.wait_for(lambda: True)

    def _log_observability_banner(self, *, ready: bool = False) -> None:
        """The seed's [OVERFLOW_GUARD] and [GUARD_HOUSE] blocks, each on its own logger (and
        their "... initialized" lines too if ``ready``, when the coordinator's banner is off)."""
        c = cast("OperationsCoordinator", self)
        if overflow_log.isEnabledFor(_DEBUG):
            policies = {w: c.config.policy_for(w) for w in ("light", "medium", "heavy")}
            overflow_log.debug("%s", self._overflow_guard.banner(policies))
        if guard_log.isEnabledFor(_DEBUG):
            guard_log.debug("%s", self._guard_house.banner())
        if ready:
            self._log_observability_ready()

    def _log_observability_ready(self) -> None:
        if overflow_log.isEnabledFor(_DEBUG) and self._overflow_guard.enabled:
            overflow_log.debug("Overflow guard initialized")
        if guard_log.isEnabledFor(_DEBUG) and self._guard_house.enabled:
            guard_log.debug("Guard House initialized")
