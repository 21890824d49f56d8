"""Typed tags: keywords, a checked dict display, a ``Tags`` value, and the Quick-Proof's untyped
dict."""

from __future__ import annotations

from typing import Any

from tokengate import Tags, task_token_guard

HEAVY: Tags = {"weight": "heavy", "retries": 1}
UNTYPED: dict[str, Any] = {"weight": "Heavy", "storage_speed": "fast"}


@task_token_guard(operation_type="a", weight="heavy", executor="process", retries=2)
def a() -> None: ...


@task_token_guard(
    operation_type="b",
    tags={"storage_speed": "FAST", "retry_on": (OSError,), "deadline": 1.5, "timeout": 2},
)
def b() -> None: ...


@task_token_guard("c", HEAVY, timeout=3, dont_retry_on=KeyError)
def c() -> None: ...


@task_token_guard("d", UNTYPED)
def d() -> None: ...


@task_token_guard("e", rate="5/m burst 2", priority=3)
def e(x: int) -> int:
    return x


URGENT = e.options(priority=9)
later = URGENT(1)
