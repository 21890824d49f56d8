"""Quickstart: decorate a function, start a coordinator, call it, collect the results.

Run it with ``python examples/quickstart.py``.
"""

from __future__ import annotations

from tokengate import OperationsCoordinator, task_token_guard


@task_token_guard(operation_type="fibonacci", tags={"weight": "heavy"})
def fibonacci(n: int) -> int:
    """The n-th Fibonacci number (CPU work: ``heavy`` runs in a worker process)."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@task_token_guard(operation_type="greet")
def greet(name: str) -> str:
    """A light task: runs on the thread lane."""
    return f"hello, {name}"


def main() -> None:
    with OperationsCoordinator() as coordinator:
        tokens = [fibonacci(n) for n in (10, 20, 30)]  # each call returns a Token at once
        hello = greet("tokengate")
        print("fibonacci:", [token.get(timeout=30) for token in tokens])
        print(hello.get(timeout=30))
        print(coordinator.stats())  # counts and latency percentiles


if __name__ == "__main__":
    main()
