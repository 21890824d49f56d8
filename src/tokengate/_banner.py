"""The start-up banner: what a coordinator is about to run, logged once by ``start()``.

It lives apart from the coordinator because it only reads: the topology, the affinity, the
storage tiers, the lanes' configuration and the guards, each of which renders its own block.
The whole banner is DEBUG on ``tokengate.coordinator``, laid out as in the TokenGate Quick-Proof
(the proof document of the original TokenGate project); the Overflow Guard's and the Guard
House's blocks are on their own loggers, so they can be shown without the rest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._affinity import core_worker_mapping, mapping_banner

if TYPE_CHECKING:
    from ._coordinator import OperationsCoordinator

__all__ = ["log_start_banner", "log_started"]

log = logging.getLogger("tokengate.coordinator")
guard_log = logging.getLogger("tokengate.guard_house")
overflow_log = logging.getLogger("tokengate.overflow")
_DEBUG = logging.DEBUG


def log_start_banner(coordinator: OperationsCoordinator) -> None:
    """Log the banner of a coordinator that is starting: all of it when
    ``tokengate.coordinator`` shows DEBUG, else only the guards' blocks (if their loggers do)."""
    if log.isEnabledFor(_DEBUG):
        _log_full(coordinator)
    else:
        _log_guards(coordinator)
        _log_guards_ready(coordinator)


def _log_guards(coordinator: OperationsCoordinator) -> None:
    """The [OVERFLOW_GUARD] and [GUARD_HOUSE] blocks, each on its own logger."""
    if overflow_log.isEnabledFor(_DEBUG):
        policies = {w: coordinator.config.policy_for(w) for w in ("light", "medium", "heavy")}
        overflow_log.debug("%s", coordinator.overflow_guard.banner(policies))
    if guard_log.isEnabledFor(_DEBUG):
        guard_log.debug("%s", coordinator.guard_house.banner())


def _log_guards_ready(coordinator: OperationsCoordinator) -> None:
    if overflow_log.isEnabledFor(_DEBUG) and coordinator.overflow_guard.enabled:
        overflow_log.debug("Overflow guard initialized")
    if guard_log.isEnabledFor(_DEBUG) and coordinator.guard_house.enabled:
        guard_log.debug("Guard House initialized")


def _log_lanes(coordinator: OperationsCoordinator) -> None:
    cfg = coordinator.config
    log.debug(
        "[IO_LANE] %d threads per storage tier to start, up to the tier's limit", cfg.io_workers
    )
    log.debug("[ASYNC_LANE] One event loop, up to %d async tasks at once", cfg.async_concurrency)
    log.debug("")
    log.debug("Configuring convergence engine...")
    if cfg.convergence:
        log.debug(
            "Convergence engine enabled (every %.2fs; cores grow up to %d workers, "
            "storage tiers up to their limits, only while the queued work waits on I/O)",
            cfg.convergence_interval,
            cfg.max_workers_per_core,
        )
    else:
        log.debug("Convergence engine disabled: worker counts stay at their baseline")


def _log_full(coordinator: OperationsCoordinator) -> None:
    cfg = coordinator.config
    cores = coordinator.core_count
    rule = "=" * 70
    log.debug(rule)
    log.debug("Operations Coordinator - Initializing...")
    log.debug(rule)
    log.debug("")
    log.debug("Detecting CPU topology...")
    log.debug("%s", coordinator.topology.banner())
    log.debug("")
    log.debug("Creating foundation components...")
    _log_guards(coordinator)
    log.debug("%s", coordinator.affinity.banner())
    log.debug("%s", coordinator.throttle.banner())
    _log_guards_ready(coordinator)
    log.debug("Core affinity policy created")
    log.debug("")
    log.debug("Building execution pipeline...")
    log.debug("%s", mapping_banner(cores, cfg.workers_per_core))
    log.debug("Worker queue created")
    log.debug("Admission gate configured (mailbox_max=%d, %s)", cfg.mailbox_max, cfg.admission)
    _log_lanes(coordinator)
    log.debug("")
    log.debug("Operations Coordinator ready!")
    log.debug("  Cores: %d", cores)
    log.debug("  Workers per core: %d", cfg.workers_per_core)
    workers = core_worker_mapping(cores, cfg.workers_per_core)
    log.debug("  Total workers: %d", sum(len(v) for v in workers.values()))
    log.debug("  Convergence: %s", "ENABLED" if cfg.convergence else "DISABLED")
    log.debug(rule)
    log.debug("")
    log.debug("Starting Operations Coordinator...")


def log_started(coordinator: OperationsCoordinator) -> None:
    """The lines that follow a start (DEBUG on ``tokengate.coordinator``): what now runs."""
    lanes = coordinator.lanes
    cfg = coordinator.config
    if lanes:  # a remote backend logs its own workers ([DASK] ...)
        log.debug(
            "[CORE_PINNED_QUEUE] Started %d workers across %d cores",
            sum(len(ln.workers) for ln in lanes.values() if ln.name not in ("io", "async")),
            coordinator.core_count,
        )
    log.debug(
        "[GATE] Admission gate started - %s (mailbox_max=%d)",
        "reject when full" if cfg.admission == "reject" else "full saturation mode",
        cfg.mailbox_max,
    )
    log.debug("Worker queue started")
    log.debug("Admission gate started")
    io_lane = lanes.get("io")  # its threads are not core-pinned
    if io_lane is not None:
        log.debug(
            "[IO_LANE] Started %d workers (%d per storage tier)",
            len(io_lane.workers),
            cfg.io_workers,
        )
    if coordinator.convergence is not None:
        log.debug("Convergence monitoring started")
