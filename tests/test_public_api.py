"""The public surface: what ``tokengate`` exports and what a coordinator shows (anyio's
``test_all_attributes``). Anything else is private and may change without notice."""

from __future__ import annotations

import inspect

import tokengate
from tokengate import OperationsCoordinator

# The coordinator's public names, each described in its class docstring.
COORDINATOR_API = {
    # lifecycle
    "start",
    "wait_ready",
    "stop",
    "running",
    # work
    "submit",
    "submit_async",
    "executor",
    "share",
    # policies
    "add_middleware",
    "middleware",
    "set_storage_limit",
    "count_event",
    # observation
    "stats",
    "tier_stats",
    "admission",
    "queue_depths",
    "lanes",
    "iter_workers",
    "convergence",
    "backend",
    "guard_house",
    "overflow_guard",
    "serve_metrics",
    "serve_dashboard",
    "dashboard_url",
    "metrics_collector",
    "trace_spans",
    "export_trace",
    "live",
    # operator controls
    "pause",
    "resume",
    "drain",
    "cancel_queued",
    "kill",
    "paused_operations",
    "hold_when",
    "quarantine",
    "release",
    "reject",
    # a documented test hook
    "rate_limiter",
}
# Read-only facts set at construction (instance attributes).
COORDINATOR_FACTS = {"config", "topology", "core_count", "affinity", "throttle"}


def public(names: list[str]) -> set[str]:
    return {name for name in names if not name.startswith("_")}


def test_the_coordinator_shows_exactly_its_documented_api() -> None:
    coordinator = OperationsCoordinator()  # not started: no thread, no worker
    assert public(dir(OperationsCoordinator)) == COORDINATOR_API
    assert public(dir(coordinator)) == COORDINATOR_API | COORDINATOR_FACTS


def test_each_public_coordinator_name_is_documented() -> None:
    doc = inspect.getdoc(OperationsCoordinator) or ""
    for name in sorted(COORDINATOR_API | COORDINATOR_FACTS):
        assert name in doc, f"OperationsCoordinator's docstring does not mention {name}"
    for name in sorted(COORDINATOR_API):
        assert inspect.getdoc(getattr(OperationsCoordinator, name)), f"{name} has no docstring"


def test_the_lane_contract_is_not_public() -> None:
    coordinator = OperationsCoordinator()
    for name in ("after_token", "begin", "claim", "complete", "fail_internal", "gate", "run"):
        assert not hasattr(coordinator, name), name


def test_all_matches_what_the_package_exports() -> None:
    assert sorted(set(tokengate.__all__)) == sorted(tokengate.__all__)
    assert dir(tokengate) == sorted(tokengate.__all__)
    for name in tokengate.__all__:
        assert getattr(tokengate, name) is not None, name


def test_public_classes_and_functions_name_the_public_module() -> None:
    wrong = {}
    for name in tokengate.__all__:
        value = getattr(tokengate, name)
        if callable(value) and value.__module__ != "tokengate":  # classes and functions
            wrong[name] = value.__module__
    assert wrong == {}


def test_middleware_is_exported_with_documented_hooks() -> None:
    middleware = tokengate.Middleware
    hooks = [name for name in vars(middleware) if not name.startswith("_")]
    assert hooks  # on_start, before_submit, after_attempt...
    for hook in hooks:
        assert inspect.getdoc(getattr(middleware, hook)), f"Middleware.{hook} has no docstring"
