"""tokengate: run ordinary Python functions as managed concurrent tasks.

Decorate a function with :func:`task_token_guard`; with an :class:`OperationsCoordinator`
running, calling it returns a :class:`Token` at once, and ``token.get(timeout=...)`` returns its
value. The coordinator routes tokens by weight to core-pinned workers with bounded mailboxes,
throttles storage tiers, retries transient failures, resolves chains of tokens and keeps stats.
"""

from ._config import MAILBOX_MAX, CoordinatorConfig
from ._coordinator import OperationsCoordinator
from ._decorator import TaskFunction, task_token_guard
from ._errors import (
    ConfigError,
    CoordinatorNotRunning,
    DependencyFailed,
    OperationBlocked,
    Overloaded,
    SerializationError,
    TaskTimeout,
    TokenDiscarded,
    TokenGateError,
    WorkerCrashed,
)
from ._executor import TokenGateExecutor
from ._retry import DEFAULT_RETRY_ON, RetryPolicy
from ._spec import TaskSpec
from ._stats import OperationStats, StatsSnapshot
from ._throttle import TierStats
from ._token import Token
from ._topology import Topology, detect_topology
from .observability import (
    FailureRecord,
    GuardHouse,
    GuardHouseReport,
    OperationHealth,
    OverflowGuard,
    OverflowStatus,
    SlowRun,
    Span,
    TokenGateCollector,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RETRY_ON",
    "MAILBOX_MAX",
    "ConfigError",
    "CoordinatorConfig",
    "CoordinatorNotRunning",
    "DependencyFailed",
    "FailureRecord",
    "GuardHouse",
    "GuardHouseReport",
    "OperationBlocked",
    "OperationHealth",
    "OperationStats",
    "OperationsCoordinator",
    "OverflowGuard",
    "OverflowStatus",
    "Overloaded",
    "RetryPolicy",
    "SerializationError",
    "SlowRun",
    "Span",
    "StatsSnapshot",
    "TaskFunction",
    "TaskSpec",
    "TaskTimeout",
    "TierStats",
    "Token",
    "TokenDiscarded",
    "TokenGateCollector",
    "TokenGateError",
    "TokenGateExecutor",
    "Topology",
    "WorkerCrashed",
    "__version__",
    "detect_topology",
    "task_token_guard",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "tokengate"
del _name, _obj
