"""Decorated functions of the conformance suite, importable by name on Dask workers.

The Quick-Proof's own Proof 1-3 tasks are not copied here: the tests import them from their one
home, ``tokengate.demos`` (``cpu``, ``mixed``, ``seed_io``).
"""

from __future__ import annotations

import time
from typing import Any

from tokengate import task_token_guard

from .probes import Gate, HighWater, Journal


@task_token_guard(operation_type="echo", tags={"weight": "light"})
def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


@task_token_guard(operation_type="bad_value", tags={"weight": "light"})
def raises_value_error(message: str) -> None:
    raise ValueError(message)


@task_token_guard(operation_type="record", tags={"weight": "medium"})
def record(journal: Journal, label: str, *after: Any) -> str:
    """Note that ``label`` ran; token arguments in ``after`` make it wait for them."""
    journal.record(label)
    return label


@task_token_guard(operation_type="blocker", tags={"weight": "heavy"})
def blocker(gate: Gate, started: Gate | None = None) -> str:
    if started is not None:
        started.set()
    assert gate.wait(30), "the test never opened the gate"
    return "released"


@task_token_guard(operation_type="flaky", tags={"weight": "heavy", "retries": 3})
def flaky(
    journal: Journal, label: str, failures: int, exc_type: type[BaseException] = ConnectionError
) -> str:
    run = journal.record(label)
    if run <= failures:
        raise exc_type(f"{label} failure {run}")
    return label


@task_token_guard(operation_type="slow_write", tags={"weight": "light", "storage_speed": "SLOW"})
def slow_write(high_water: HighWater, gate: Gate) -> str:
    high_water.enter()
    try:
        assert gate.wait(30), "the test never opened the gate"
    finally:
        high_water.leave()
    return "written"


@task_token_guard(operation_type="urgent", tags={"weight": "heavy", "deadline": 0.05})
def urgent(*after: Any) -> str:
    return "ran"


@task_token_guard(operation_type="hangs", tags={"weight": "heavy", "timeout": 0.3})
def hangs(gate: Gate) -> str:
    gate.wait(30)
    return "late"


@task_token_guard(operation_type="nested_fib", tags={"weight": "light"})
def nested_fib(n: int) -> int:
    if n < 2:
        return n
    left, right = nested_fib(n - 1), nested_fib(n - 2)
    return left.get(timeout=60) + right.get(timeout=60)


@task_token_guard(operation_type="total", tags={"weight": "medium"})
def total(values: list[int], extra: dict[str, int]) -> int:
    return sum(values) + sum(extra.values())


@task_token_guard(operation_type="square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


# -- the Quick-Proof's chain, as written -----------------------------------------------------------
@task_token_guard(operation_type="chain_seed", tags={"weight": "light"})
def chain_seed(value: int) -> int:
    return value * 3 + 7


@task_token_guard(operation_type="chain_filter", tags={"weight": "light"})
def chain_filter(value: int) -> int:
    if value % 2 == 0:
        return value // 2
    return value * 2 + 1


@task_token_guard(operation_type="chain_accumulate", tags={"weight": "medium"})
def chain_accumulate(value: int) -> int:
    return sum(i * value for i in range(1, 51))


@task_token_guard(operation_type="chain_reduce", tags={"weight": "light"})
def chain_reduce(value: int) -> int:
    return value % 9973


@task_token_guard(operation_type="chain_finalize", tags={"weight": "light"})
def chain_finalize(value: int, label: str = "result") -> dict[str, Any]:
    return {label: value, "parity": "even" if value % 2 == 0 else "odd"}


def chain_by_hand(value: int, label: str) -> dict[str, Any]:
    v = value * 3 + 7
    v = v // 2 if v % 2 == 0 else v * 2 + 1
    v = sum(i * v for i in range(1, 51)) % 9973
    return {label: v, "parity": "even" if v % 2 == 0 else "odd"}


@task_token_guard(operation_type="json_fast", tags={"weight": "medium", "storage_speed": "FAST"})
def generate_medium_json(index: int) -> dict[str, Any]:
    return {"id": index, "timestamp": time.time(), "records": [{"id": i} for i in range(100)]}


@task_token_guard(operation_type="create_json_file", tags={"weight": "light"})
def create_json_file(directory: str, index: int) -> dict[str, Any]:
    """The Quick-Proof's create_json_file as a task: it waits on a nested task's token."""
    import json
    import os

    data = generate_medium_json(index).get(timeout=30)
    filename = os.path.join(directory, f"json_fast_{index:04d}.json")
    with open(filename, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    return {"index": index, "size_bytes": os.path.getsize(filename)}


@task_token_guard(operation_type="rated", tags={"weight": "light", "rate": "1/h burst 2"})
def rated(journal: Journal, label: str) -> str:
    """At most two calls at once, then one an hour: tests step the limiter's clock instead."""
    journal.record(label)
    return label


@task_token_guard(operation_type="knob_probe", tags={"weight": "light"})
def knob_probe() -> str:
    return "light"


PICKLED: list[int] = []  # one entry each time this process pickles a Blob


def _blob(data: bytes) -> Blob:
    return Blob(data)


class Blob:
    """Bytes that note each time this process pickles them (to count what is sent)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        PICKLED.append(len(self.data))
        return _blob, (self.data,)


@task_token_guard(operation_type="blob_part_sum", tags={"weight": "light"})
def blob_part_sum(blob: Blob | list[int], part: int, parts: int = 16) -> int:
    data = blob.data if isinstance(blob, Blob) else blob
    return sum(data[part::parts])
