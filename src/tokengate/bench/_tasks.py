"""The tokengate side of the benchmarks: decorated tasks at module level.

Defined here, in an importable module, so that a process lane can pickle them by reference.
Only the tokengate cases import this module, so the runner and the peer cases never import the
system under test.
"""

from __future__ import annotations

from typing import Any

from tokengate import task_token_guard
from tokengate.bench._bodies import array_sum, burn, flood_plain, light_work, part_sum


@task_token_guard(operation_type="noop", tags={"weight": "light"})
def noop(i: int) -> int:
    """B1: the smallest task, so the figure is the machinery's overhead."""
    return i


@task_token_guard(operation_type="flood", tags={"weight": "light"})
def flood(payload: bytes) -> int:
    """B4: a slow consumer of a fresh 4 KB payload (the peers' very body)."""
    return flood_plain(payload)


@task_token_guard(operation_type="fib", tags={"weight": "light"})
def fib(n: int) -> int:
    """B7: each task submits its two children as tasks and waits on them."""
    if n < 2:
        return n
    left = fib(n - 1)
    right = fib(n - 2)
    return left.get() + right.get()


@task_token_guard(operation_type="burn", tags={"weight": "heavy"})
def burn_task(steps: int) -> int:
    """B2, B3: pure-Python CPU work in tokengate's worker processes."""
    return burn(steps)


@task_token_guard(operation_type="light", tags={"weight": "light"})
def light_task() -> int:
    """B3: the light task that must not wait behind the heavy ones."""
    return light_work()


@task_token_guard(operation_type="noop_process", tags={"weight": "heavy", "executor": "process"})
def noop_process(i: int) -> int:
    """B2o: the smallest process task, so the figure is the process lane's overhead."""
    return i


@task_token_guard(operation_type="array_sum", tags={"weight": "heavy", "executor": "process"})
def array_sum_task(array: Any) -> float:
    """B8 distinct: sum one big array in a worker process."""
    return array_sum(array)


@task_token_guard(operation_type="part_sum", tags={"weight": "heavy", "executor": "process"})
def part_sum_task(array: Any, i: int, parts: int) -> float:
    """B8 broadcast: sum one part of a shared array in a worker process."""
    return part_sum(array, i, parts)
