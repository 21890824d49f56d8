"""The coordinator's side of the dashboard: serve one, close them all at stop.

:class:`Dashboards` is what ``OperationsCoordinator`` holds; ``serve_dashboard`` and
``dashboard_url`` call it. It imports the web stack (``_server.py``) only when a dashboard is
served, and is middleware (``on_start`` serves with ``dashboard=True``, ``on_stop`` closes every
server) installed only once a dashboard is configured or served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._errors import CoordinatorNotRunning
from .._middleware import Middleware

if TYPE_CHECKING:
    from .._coordinator import OperationsCoordinator
    from .._state import Lifecycle
    from ._registry import RecentTokens
    from ._server import DashboardServer

__all__ = ["Dashboards"]

log = logging.getLogger("tokengate.dashboard")


class Dashboards(Middleware):
    """The dashboards of one coordinator. ``port`` (from ``dashboard=``): serve one at start on
    that port (0: any free one); None: only when ``serve_dashboard`` is called."""

    def __init__(
        self,
        port: int | None,
        add_middleware: Callable[[Middleware], None],
        lifecycle: Lifecycle,
    ) -> None:
        self.port = port
        self._lifecycle = lifecycle  # serve() refuses a stopping coordinator
        self.servers: list[DashboardServer] = []
        # Made with the first server (the web stack is imported only then) and shared by
        # every server of this coordinator: the completion path records into one.
        self.registry: RecentTokens | None = None
        self._add_middleware = add_middleware
        self._installed = False
        if port is not None:
            self._install()

    def _install(self) -> None:
        if not self._installed:
            self._installed = True
            self._add_middleware(self)

    @property
    def url(self) -> str | None:
        """The first server's URL, token included; None while none is served."""
        servers = self.servers
        return servers[0].url if servers else None

    def serve(self, coordinator: OperationsCoordinator, port: int, addr: str) -> str:
        """``coordinator.serve_dashboard``: start a server that stops with the coordinator."""
        from ._server import DashboardServer, check_addr, is_loopback, require

        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in 0..65535 (0: any free port), got {port!r}")
        addr = check_addr(addr)
        status = self._lifecycle.status
        if status in ("stopping", "stopped"):
            raise CoordinatorNotRunning(
                f"serve_dashboard() on a coordinator that is {status}: the server "
                f"would outlive it. Call it before stop(), or after start() again"
            )
        require()
        from .._control import CONTROLS
        from ._registry import RecentTokens

        if self.registry is None:
            self.registry = RecentTokens()
        server = DashboardServer(
            coordinator, port, addr, controls=CONTROLS, registry=self.registry, peers=self.servers
        )
        self._install()
        self.servers.append(server)
        if not is_loopback(addr):
            log.warning(
                "[DASHBOARD] Serving on %s, reachable from other machines: anyone with the URL "
                "can use the controls",
                addr,
            )
        if log.isEnabledFor(logging.INFO):
            log.info("[DASHBOARD] Serving the dashboard on %s", server.url)
        return server.url

    def on_start(self, coordinator: Any) -> None:
        if self.port is not None and not self.servers:
            try:
                coordinator.serve_dashboard(self.port)
            except (OSError, ImportError):  # the coordinator runs on without its dashboard
                log.exception("[DASHBOARD] could not serve the dashboard")

    def on_stop(self, coordinator: Any) -> None:
        servers, self.servers = self.servers, []
        for server in servers:
            server.close()
            if log.isEnabledFor(logging.INFO):
                log.info("[DASHBOARD] Stopped serving on port %d", server.port)
