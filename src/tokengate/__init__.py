"""tokengate: run ordinary Python functions as managed concurrent tasks.

Decorate a function with :func:`task_token_guard`; with an :class:`OperationsCoordinator`
running, calling it returns a :class:`Token` at once, and ``token.get(timeout=...)`` returns its
value (or, in a script or notebook, call :func:`use_default` once and skip the ``with``). The
coordinator routes tokens by weight to core-pinned workers with bounded mailboxes,
throttles storage tiers, retries transient failures, resolves chains of tokens and keeps stats.
"""

import importlib as _importlib
from typing import TYPE_CHECKING
from typing import Any as _Any

if TYPE_CHECKING:
    from ._admission import AdmissionStatus
    from ._config import MAILBOX_MAX, CoordinatorConfig
    from ._coordinator import OperationsCoordinator
    from ._decorator import TaskFunction, task_token_guard
    from ._default import default_coordinator, use_default
    from ._errors import (
        ConfigError,
        CoordinatorNotRunning,
        DependencyFailed,
        InitializerFailed,
        OperationBlocked,
        Overloaded,
        SerializationError,
        TaskTimeout,
        TokenDiscarded,
        TokenGateError,
        WorkerCrashed,
    )
    from ._executor import TokenGateExecutor
    from ._middleware import Middleware
    from ._progress import progress
    from ._retry import DEFAULT_RETRY_ON, RetryPolicy
    from ._spec import Tags, TaskSpec
    from ._stats import OperationStats, StatsSnapshot
    from ._throttle import TierStats
    from ._token import Token
    from ._topology import Topology, detect_topology
    from .observability import (
        AnomalyRule,
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
    "AdmissionStatus",
    "AnomalyRule",
    "ConfigError",
    "CoordinatorConfig",
    "CoordinatorNotRunning",
    "DependencyFailed",
    "FailureRecord",
    "GuardHouse",
    "GuardHouseReport",
    "InitializerFailed",
    "Middleware",
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
    "Tags",
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
    "default_coordinator",
    "detect_topology",
    "progress",
    "task_token_guard",
    "use_default",
]

# Where each public name lives. The package imports a module only when one of its names is first
# used (PEP 562): a worker process of the process lane needs the decorator and the wire format,
# not the coordinator, the observability stack or asyncio, and starts ~60 ms sooner for it.
_HOMES: dict[str, str] = {
    "AdmissionStatus": "._admission",
    "MAILBOX_MAX": "._config",
    "CoordinatorConfig": "._config",
    "OperationsCoordinator": "._coordinator",
    "TaskFunction": "._decorator",
    "task_token_guard": "._decorator",
    "default_coordinator": "._default",
    "use_default": "._default",
    "ConfigError": "._errors",
    "CoordinatorNotRunning": "._errors",
    "DependencyFailed": "._errors",
    "InitializerFailed": "._errors",
    "OperationBlocked": "._errors",
    "Overloaded": "._errors",
    "SerializationError": "._errors",
    "TaskTimeout": "._errors",
    "TokenDiscarded": "._errors",
    "TokenGateError": "._errors",
    "WorkerCrashed": "._errors",
    "TokenGateExecutor": "._executor",
    "Middleware": "._middleware",
    "progress": "._progress",
    "DEFAULT_RETRY_ON": "._retry",
    "RetryPolicy": "._retry",
    "TaskSpec": "._spec",
    "Tags": "._spec",
    "OperationStats": "._stats",
    "StatsSnapshot": "._stats",
    "TierStats": "._throttle",
    "Token": "._token",
    "Topology": "._topology",
    "detect_topology": "._topology",
    "AnomalyRule": ".observability",
    "FailureRecord": ".observability",
    "GuardHouse": ".observability",
    "GuardHouseReport": ".observability",
    "OperationHealth": ".observability",
    "OverflowGuard": ".observability",
    "OverflowStatus": ".observability",
    "SlowRun": ".observability",
    "Span": ".observability",
    "TokenGateCollector": ".observability",
}


def __getattr__(name: str) -> _Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tokengate' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home, __name__), name)
    if callable(value):  # classes, functions and detect_topology's cache wrapper
        value.__module__ = "tokengate"  # tracebacks, reprs and help() name the public path
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
