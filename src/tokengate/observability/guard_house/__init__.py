"""The Guard House: a passive monitor per operation type, with an optional circuit breaker.

One concept per module: ``_monitor.py`` watches (errors, recent failures, slow runs, through
ordinary middleware hooks), ``_breaker.py`` acts (refuses calls after repeated failures),
``_anomaly.py`` holds calls far from their operation's history (a hold rule), ``_report.py``
renders what the monitor and the breaker know as a frozen report, and ``_house.py`` is the face
that ties them to one configuration (``coordinator.guard_house``).
"""

from ._anomaly import AnomalyRule
from ._house import GuardHouse
from ._monitor import FailureRecord, SlowRun
from ._report import GuardHouseReport, OperationHealth

__all__ = [
    "AnomalyRule",
    "FailureRecord",
    "GuardHouse",
    "GuardHouseReport",
    "OperationHealth",
    "SlowRun",
]
