"""Observability and control: Guard House, Overflow Guard, trace export, Prometheus metrics.

Each part is coordinator middleware (``tokengate._middleware``), installed by the coordinator
according to its configuration (``observability/_facade.py``), so a part that is off costs
nothing. ``prometheus_client`` is imported only when metrics are asked for.
"""

from ._metrics import METRICS, TokenGateCollector
from ._overflow import OverflowGuard, OverflowStatus
from ._trace import Span
from .guard_house import (
    AnomalyRule,
    FailureRecord,
    GuardHouse,
    GuardHouseReport,
    OperationHealth,
    SlowRun,
)

__all__ = [
    "METRICS",
    "AnomalyRule",
    "FailureRecord",
    "GuardHouse",
    "GuardHouseReport",
    "OperationHealth",
    "OverflowGuard",
    "OverflowStatus",
    "SlowRun",
    "Span",
    "TokenGateCollector",
]
