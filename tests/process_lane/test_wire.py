"""What crosses the pipe: arguments, functions (lambdas and ``__main__`` functions by value),
results and exceptions (their type and the remote traceback kept), and what cannot be pickled,
refused at the call or failing only its token. Also decorated calls made inside a worker (run
inline) and chains across lanes.

Worker processes import the tasks from ``process_tasks`` (tests/ is on ``sys.path``, which the
workers inherit), and the TokenGate Quick-Proof's Proof 1 tasks from ``tokengate.demos.cpu``."""

from __future__ import annotations

import os
import textwrap
import threading
from pathlib import Path

import pytest

import process_tasks as pt
from conftest import run_script
from tokengate import (
    DependencyFailed,
    SerializationError,
    task_token_guard,
)
from tokengate.demos.cpu import heavy_operation
from tokengate.lanes._wire import RemoteTraceback

from ._helpers import (
    POSIX_ONLY,
    Make,
)

pytestmark = POSIX_ONLY


def test_unpicklable_argument_raises_at_the_call_and_is_never_counted(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    lock = threading.Lock()
    with pytest.raises(SerializationError) as info:
        pt.length(lock)
    message = str(info.value)
    assert "length (operation 'length')" in message
    assert "argument 1" in message and "_thread.lock" in message
    with pytest.raises(SerializationError, match=r"argument 1\[2\] .*_thread\.lock"):
        pt.length([1, 2, lock])
    with pytest.raises(SerializationError, match=r"keyword argument 'fn'.*_thread\.lock"):
        pt.apply(fn=lock)  # type: ignore[call-arg]
    snap = coordinator.stats()
    assert snap.submitted == 0  # nothing was submitted, nothing discarded
    assert pt.length([1, 2, 3]).get(timeout=30) == 3


def test_unpicklable_result_fails_the_token_naming_function_and_type(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    token = pt.returns_lock()
    with pytest.raises(SerializationError, match=r"'returns_lock' returned a _thread\.lock"):
        token.get(timeout=30)
    assert coordinator.stats().failed == 1
    assert pt.square(5).get(timeout=30) == 25  # the worker is fine


def test_dependency_resolved_to_an_unpicklable_value_fails_that_token(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    token = pt.length(pt.light_lock())  # pickled only once the thread task has a value
    with pytest.raises(SerializationError, match=r"argument 1\[0\] .*_thread\.lock"):
        token.get(timeout=30)
    snap = coordinator.stats()
    assert (snap.resolved, snap.failed) == (1, 1)


def test_lambdas_and_local_tasks_travel_by_value(procs: Make) -> None:
    procs(workers_per_core=1)
    assert pt.apply(lambda x, y: x * y, 6, 7).get(timeout=30) == 42
    offset = 100

    @task_token_guard(operation_type="local_task", tags={"weight": "heavy"})
    def local_task(x: int) -> tuple[int, int]:
        return x + offset, os.getpid()

    value, pid = local_task(1).get(timeout=30)
    assert value == 101 and pid != os.getpid()


def test_a_function_that_cannot_be_pickled_is_refused_at_the_call(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    lock = threading.Lock()

    @task_token_guard(operation_type="holds_lock", tags={"weight": "heavy"})
    def holds_lock() -> bool:
        return lock.locked()

    with pytest.raises(SerializationError, match=r"cannot send the function .*holds_lock"):
        holds_lock()
    assert coordinator.stats().submitted == 0


def test_exception_keeps_its_type_and_the_remote_traceback(procs: Make) -> None:
    procs(workers_per_core=1)
    with pytest.raises(ValueError, match="boom") as info:
        pt.raises_value_error("boom").get(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback (most recent call last)" in cause.tb
    assert "process_tasks.py" in cause.tb and "in raises_value_error" in cause.tb
    assert "raise ValueError(message)" in cause.tb  # the source line, read in the worker
    assert "tokengate/lanes/process" not in cause.tb  # starts at the task's own frame


def test_an_exception_that_cannot_be_unpickled_arrives_as_serialization_error(
    procs: Make,
) -> None:
    procs(workers_per_core=1)
    with pytest.raises(SerializationError, match=r"raised process_tasks\.NeedsTwoArgs: 7: odd"):
        pt.raises_odd_error().get(timeout=30)


def test_decorated_calls_inside_a_worker_run_inline(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    probe = pt.inline_probe().get(timeout=30)
    assert probe == {
        "is_token": True,
        "done_at_once": True,
        "value": 49,
        "lane": "inline",
        "failed_type": "ValueError",
        "chained": 50,
        "mapped": [1, 4, 9],
    }
    assert coordinator.stats().submitted == 1  # the inner calls never came back to the parent


def test_nested_heavy_tasks_never_deadlock(procs: Make) -> None:
    procs(workers_per_core=1)
    assert pt.nested_fib(15).get(timeout=60) == 610


def test_chains_cross_lanes(procs: Make) -> None:
    coordinator = procs(workers_per_core=1)
    assert pt.light_double(pt.square(4)).get(timeout=30) == 32  # process -> thread
    assert pt.square(pt.light_double(3)).get(timeout=30) == 36  # thread -> process
    assert pt.total([pt.square(2), pt.square(3)], {"x": pt.light_double(1)}).get(timeout=30) == 15
    assert pt.light_waits_on_heavy(5).get(timeout=30) == 26  # a thread blocks on a process
    failed = pt.square(pt.raises_value_error("first"))  # type: ignore[arg-type]
    with pytest.raises(DependencyFailed) as info:
        failed.get(timeout=30)
    assert isinstance(info.value.__cause__, ValueError)
    assert failed.attempts == 0
    assert coordinator.stats().failed == 2


@pytest.mark.parametrize("workers_per_core", [1, 2])
def test_b7_style_fan_out_with_process_leaves_never_deadlocks(
    procs: Make, workers_per_core: int
) -> None:
    coordinator = procs(workers_per_core=workers_per_core)
    assert pt.light_fib(9).get(timeout=60) == 34
    snap = coordinator.stats()
    assert snap.operations["square"].resolved == 55  # one process leaf per fib(0)/fib(1) node


MAIN_SCRIPT = """
import os
import random
import time
from dataclasses import dataclass
from tokengate import OperationsCoordinator, task_token_guard

# No `if __name__ == "__main__"` guard on purpose: worker processes never import this script.

@dataclass
class Point:
    x: int
    y: int

@task_token_guard(operation_type='cpu_intensive', tags={'weight': 'heavy'})
def heavy_operation(iterations):
    result = 0
    for i in range(iterations):
        result += sum(j ** 2 for j in range(100))
    return result

@task_token_guard(operation_type='json_generation_heavy', tags={'weight': 'heavy'})
def generate_complex_json(depth, index):
    print(f"[HEAVY-{index}] Generating complex nested JSON (depth: {depth})...")
    def create_nested(current_depth):
        if current_depth <= 0:
            return {"value": random.randint(1, 1000)}
        return {
            f"level_{current_depth}": {
                "data": [create_nested(current_depth - 1) for _ in range(3)],
                "metadata": {"timestamp": time.time(), "depth": current_depth,
                             "random": random.random()},
            }
        }
    return create_nested(depth)

@task_token_guard(operation_type='fib', tags={'weight': 'heavy'})
def fib(n):
    return n if n < 2 else fib(n - 1).get() + fib(n - 2).get()

@task_token_guard(operation_type='move', tags={'weight': 'heavy'})
def move(point, by):
    return Point(point.x + by(1), point.y), os.getpid()

coordinator = OperationsCoordinator()
coordinator.start()
try:
    print("heavy", heavy_operation(10).get(timeout=30))
    tree = generate_complex_json(3, 7).get(timeout=30)
    print("json", sorted(tree))
    print("fib", fib(12).get(timeout=30))
    moved, pid = move(Point(1, 2), lambda n: n * 10).get(timeout=30)
    print("moved", moved, isinstance(moved, Point), pid != os.getpid())
finally:
    coordinator.stop()
"""


def test_main_script_functions_run_in_the_process_lane(tmp_path: Path) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    out = run_script(script)
    assert f"heavy {heavy_operation.__wrapped__(10)}" in out
    assert "[HEAVY-7] Generating complex nested JSON (depth: 3)..." in out  # printed by a worker
    assert "json ['level_3']" in out
    assert "fib 144" in out
    assert "moved Point(x=11, y=2) True True" in out
