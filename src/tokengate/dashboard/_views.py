"""What the dashboard shows, read from a coordinator's public API at refresh time.

:func:`snapshot` returns plain data (dicts, lists, numbers, strings) ready for JSON: totals and
latencies, workers per lane and core, process workers, storage tiers, the Guard House table with
a health class per operation, the Overflow Guard, convergence, recent failures and the task
stream. Rates and the charts' history are worked out by the page from successive snapshots, so
the server keeps no history and does nothing while no page is open.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._coordinator import OperationsCoordinator
    from ._registry import RecentTokens, TokenRecord

__all__ = ["health_class", "snapshot", "stats_json", "token_view"]

STREAM_SPANS = 300
"""Spans in the task stream of one snapshot (the most recent)."""


def health_class(runs: int, failure_rate: float) -> str:
    """The original TokenGate's health classes, by success rate over the runs seen.

    ``UNKNOWN`` under 5 runs, ``EXCELLENT`` above 95 % success, ``HEALTHY`` 80-95 %,
    ``AT_RISK`` 50-80 %, ``PROBLEMATIC`` below 50 %.
    """
    if runs < 5:
        return "UNKNOWN"
    success = 1.0 - failure_rate
    if success > 0.95:
        return "EXCELLENT"
    if success >= 0.80:
        return "HEALTHY"
    if success >= 0.50:
        return "AT_RISK"
    return "PROBLEMATIC"


def _plain(obj: Any) -> dict[str, Any]:
    """A frozen dataclass as a dict, without its private histogram copy."""
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.name != "latency" and not f.name.startswith("_")
    }


def stats_json(coordinator: OperationsCoordinator) -> dict[str, Any]:
    """``stats()`` as JSON-ready data: totals, per operation, events."""
    snap = coordinator.stats()
    data = _plain(snap)
    data["operations"] = {name: _plain(op) for name, op in snap.operations.items()}
    data["events"] = dict(snap.events)
    return data


def _worker_row(lane: str, worker: Any) -> dict[str, Any]:
    current = worker.current
    row: dict[str, Any] = {
        "lane": lane,
        "name": worker.name,
        "core": getattr(worker, "core", None),
        "queued": len(worker.mailbox) if hasattr(worker, "mailbox") else 0,
        "busy": current is not None,
        "token": getattr(current, "id", None) if current is not None else None,
    }
    if lane == "process":
        state = getattr(worker, "state", None)  # the slot's SlotState
        label = getattr(state, "value", "unknown")
        if label == "ready":
            label = "busy" if current is not None else "idle"
        row.update(
            pid=getattr(worker, "pid", None),
            restarts=getattr(worker, "restarts", 0),
            state=label,
            last_crash=getattr(worker, "last_crash", None),
        )
    return row


def _workers(coordinator: OperationsCoordinator) -> list[dict[str, Any]]:
    rows = []
    for name, lane in coordinator.lanes.items():
        for worker in list(lane.workers):
            rows.append(_worker_row(name, worker))
    return rows


def _guard_house(coordinator: OperationsCoordinator, operations: list[str]) -> dict[str, Any]:
    """The Guard House table, with a row for every operation submitted (``operations``) even
    before it ran, so its controls are there while its first tokens still wait."""
    house = coordinator.guard_house
    report = house.report()
    ops = []
    for name in operations:
        if name not in report.operations:
            ops.append(
                {
                    "operation_type": name,
                    "runs": 0,
                    "errors": 0,
                    "failure_rate": 0.0,
                    "health": "UNKNOWN",
                    "p50": 0.0,
                    "p95": 0.0,
                    "max": 0.0,
                    "slow_runs": 0,
                    "breaker": house.breaker_state(name),
                    "blocked_calls": 0,
                    "retry_in": None,
                }
            )
    for health in report.operations.values():
        ops.append(
            {
                "operation_type": health.operation_type,
                "runs": health.runs,
                "errors": health.errors,
                "failure_rate": health.failure_rate,
                "health": health_class(health.runs, health.failure_rate),
                "p50": health.duration_p50,
                "p95": health.duration_p95,
                "max": health.duration_max,
                "slow_runs": health.slow_runs,
                "breaker": health.breaker,
                "blocked_calls": health.blocked_calls,
                "retry_in": health.retry_in,
            }
        )
    failures = [
        {
            "operation_type": f.operation_type,
            "token_id": f.token_id,
            "exception_type": f.exception_type,
            "message": f.message,
            "attempt": f.attempt,
            "outcome": f.outcome,
            "worker": f.worker,
            "at": f.at,
        }
        for f in report.recent_failures[-20:]
    ]
    return {
        "enabled": report.enabled,
        "auto_blocking": report.auto_blocking,
        "operations": ops,
        "failures": failures,
    }


def _convergence(coordinator: OperationsCoordinator) -> dict[str, Any] | None:
    engine = coordinator.convergence
    if engine is None:
        return None
    pools = {
        label: {"baseline": base, "current": now, "peak": peak}
        for label, (base, now, peak) in engine.worker_counts().items()
    }
    swaps = [dataclasses.asdict(swap) for swap in list(engine.history)[-20:]]
    return {"pools": pools, "swaps": swaps}


def _stream(registry: RecentTokens | None, now: float) -> list[dict[str, Any]]:
    """The recent runs per worker, each as seconds before ``now`` (the page draws them)."""
    if registry is None:
        return []
    spans = []
    for token in registry.recent(STREAM_SPANS):
        start, end = token.started_at, token.finished_at
        if start is None or end is None:
            continue
        spans.append(
            {
                "token_id": token.id,
                "operation_type": token.operation_type,
                "worker": token.worker or "?",
                "start": round(now - start, 4),
                "end": round(now - end, 4),
                "state": token.state,
            }
        )
    return spans


def _sampled(registry: RecentTokens | None) -> dict[str, float] | None:
    """How the task stream was sampled in the last period (None: every run is in it)."""
    if registry is None or not registry.limited:
        return None
    return {"runs": registry.per_period, "every_s": registry.period}


def _backend_dashboard(backend: Any) -> str | None:
    """The Dask dashboard's address, for a backend with a Dask client (else None)."""
    client = getattr(backend, "client", None)
    link = getattr(client, "dashboard_link", None) if client is not None else None
    return link if isinstance(link, str) else None


def snapshot(
    coordinator: OperationsCoordinator, registry: RecentTokens | None = None
) -> dict[str, Any]:
    """Everything the page shows, at this instant."""
    out: dict[str, Any] = {}
    for _ in snapshot_sections(coordinator, registry, out):
        pass
    return out


def snapshot_sections(
    coordinator: OperationsCoordinator, registry: RecentTokens | None, out: dict[str, Any]
) -> Iterator[None]:
    """Fill ``out`` with :func:`snapshot`'s data, a section at a time, yielding between them.

    Under a real mix a snapshot is several milliseconds of Python (every operation's histograms,
    the Guard House table, the task stream), and any task running meanwhile waits for the GIL:
    the live stream lets the other threads run between sections rather than hold it in one
    piece."""
    stats = stats_json(coordinator)
    out.update(time=time.time(), running=coordinator.running, stats=stats)
    yield
    admission = coordinator.admission
    overflow = coordinator.overflow_guard.status()
    out.update(
        admission={"waiters": admission.waiters, "paused": dict(admission.paused)},
        paused_operations=coordinator.paused_operations,
        quarantine=[
            {"token_id": t.id, "operation_type": t.operation_type, "reason": reason}
            for t, reason in list(coordinator.quarantine.items())[:200]
        ],
        workers=_workers(coordinator),
        tiers=[_plain(t) for t in coordinator.tier_stats().values()],
        overflow={**_plain(overflow), "enabled": coordinator.overflow_guard.enabled},
        convergence=_convergence(coordinator),
    )
    yield
    out["guard_house"] = _guard_house(coordinator, list(stats["operations"]))
    yield
    tracebacks = list(registry.tracebacks) if registry is not None else []
    backend = coordinator.backend
    out.update(
        tracebacks=[{"token_id": tid, "traceback": text} for tid, text in tracebacks[-10:]],
        stream=_stream(registry, time.perf_counter()),
        stream_sampled=_sampled(registry),
        backend=None if backend is None else type(backend).__name__,
        backend_dashboard=_backend_dashboard(backend),
    )


def token_view(record: TokenRecord) -> dict[str, Any]:
    """One token: state, attempts, where and when it ran, its error or discard reason."""
    now = time.perf_counter()

    def ago(at: float | None) -> float | None:
        return None if at is None else round(now - at, 4)

    return {
        "id": record.id,
        "operation_type": record.operation_type,
        "weight": record.weight,
        "state": record.state,
        "attempts": record.attempts,
        "lane": record.lane,
        "worker": record.worker,
        "core": record.core,
        "submitted_ago": ago(record.submitted_at),
        "started_ago": ago(record.started_at),
        "finished_ago": ago(record.finished_at),
        "error": record.error,
        "discard_reason": record.discard_reason,
    }
