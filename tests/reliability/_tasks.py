"""Tasks shared by the fault tests, and the gates that hold them."""

from __future__ import annotations

import threading

from tokengate import task_token_guard

GATE = threading.Event()  # holds gated tasks until a test opens it
HANG = threading.Event()  # holds hanging tasks past their timeout


@task_token_guard(operation_type="fault_value", tags={"weight": "medium"})
def raise_if(i: int, fail: bool) -> int:
    if fail:
        raise ValueError(f"fault {i}")
    return i


@task_token_guard(
    operation_type="fault_burst",
    tags={"weight": "light", "storage_speed": "FAST", "retries": 2},
)
def burst(i: int, fail: bool) -> int:
    if fail:
        raise ConnectionError(f"burst fault {i}")
    return i


@task_token_guard(operation_type="fault_all", tags={"weight": "heavy", "executor": "thread"})
def always_raise(i: int) -> int:
    raise RuntimeError(f"every task fails ({i})")


@task_token_guard(operation_type="fault_hang", tags={"weight": "light", "timeout": 0.2})
def hang(i: int) -> int:
    HANG.wait(60)
    return i


@task_token_guard(operation_type="fault_gated", tags={"weight": "light"})
def gated(i: int) -> int:
    GATE.wait(60)
    return i


@task_token_guard(operation_type="fault_link", tags={"weight": "light"})
def link(previous: int | None, i: int, fail_at: int) -> int:
    if i == fail_at:
        raise ValueError(f"link {i} broke")
    return (previous or 0) + 1


@task_token_guard(operation_type="fault_plain", tags={"weight": "light"})
def plain(i: int) -> int:
    return i


@task_token_guard(operation_type="fault_tiered", tags={"weight": "medium", "storage_speed": "SLOW"})
def tiered(i: int) -> int:
    return i


@task_token_guard(operation_type="fault_timed", tags={"weight": "light", "timeout": 30})
def timed(i: int) -> int:
    return i


@task_token_guard(operation_type="surge_light", tags={"weight": "light"})
def surge_light(i: int) -> int:
    return i


@task_token_guard(operation_type="surge_heavy", tags={"weight": "heavy", "executor": "thread"})
def surge_heavy(i: int) -> int:
    return sum(x * x for x in range(50)) + i


@task_token_guard(
    operation_type="surge_tier", tags={"weight": "medium", "storage_speed": "FAST", "retries": 1}
)
def surge_tier(i: int) -> int:
    if i % 13 == 0:
        raise ConnectionError(f"surge transient {i}")
    return i


@task_token_guard(operation_type="late_transient", tags={"weight": "light"})
def late_transient(started: threading.Event) -> int:
    started.set()
    HANG.wait(60)
    raise ConnectionError("transient failure after stop")


@task_token_guard(operation_type="fails_once", tags={"weight": "light"})
def fails_once(runs: list[int]) -> int:
    """Fails transiently on its first run (a retryable ConnectionError), then succeeds."""
    runs.append(len(runs))
    if len(runs) == 1:
        raise ConnectionError("transient failure, retried after a back-off")
    return len(runs)
