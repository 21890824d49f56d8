"""Decorated methods bind as the function they wrap would, and callables that are not functions
(a ``functools.partial``, an object with ``__call__``) run as tasks, on every lane.

A method task read from an instance is bound to it; a ``staticmethod`` is never bound; a
``classmethod`` is bound to the class. The bound form keeps ``map`` and ``submit_async``. In the
process lane an importable class's tasks travel by name (``process_tasks.Methods``), a class made
in a function or defined in ``__main__`` travels by value with its instances.
"""

from __future__ import annotations

import asyncio
import functools
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import process_tasks as pt
from conftest import run_script
from tokengate import OperationsCoordinator, Token, TokenGateError, task_token_guard
from tokengate.lanes.process import process_lane_supported

Make = Callable[..., OperationsCoordinator]

THREAD = {"weight": "light"}
IO = {"weight": "light", "storage_speed": "FAST"}
PROCESS = {"weight": "heavy", "executor": "process"}
LANES = {"thread": THREAD, "io": IO, "process": PROCESS}
needs_processes = pytest.mark.skipif(
    not process_lane_supported(), reason="worker processes need POSIX"
)


def lanes(*names: str) -> Any:
    return pytest.mark.parametrize(
        "lane",
        [
            pytest.param(n, marks=needs_processes) if n == "process" else pytest.param(n)
            for n in names
        ],
    )


def started(make_coordinator: Make, lane: str) -> OperationsCoordinator:
    coordinator = make_coordinator(workers_per_core=1)
    if lane == "process":
        assert coordinator.lanes["process"].wait_ready(30)  # type: ignore[attr-defined]
    return coordinator


def methods_class(lane: str) -> Any:
    """Each kind of method as a task of ``lane``, on a class made here (not importable by
    name: in the process lane its tasks and instances travel by value)."""
    tags = LANES[lane]

    class Methods:
        factor = 10

        def __init__(self, offset: int) -> None:
            self.offset = offset

        @task_token_guard(operation_type=f"{lane}_static", tags=tags)
        @staticmethod
        def static(x: int) -> int:
            return x * 2

        @staticmethod
        @task_token_guard(operation_type=f"{lane}_static_outside", tags=tags)
        def static_outside(x: int) -> int:
            return x * 3

        @task_token_guard(operation_type=f"{lane}_class", tags=tags)
        @classmethod
        def klass(cls, x: int) -> int:
            return x * cls.factor

        @classmethod
        @task_token_guard(operation_type=f"{lane}_class_outside", tags=tags)
        def klass_outside(cls, x: int) -> int:
            return x * cls.factor + 1

        @task_token_guard(operation_type=f"{lane}_method", tags=tags)
        def method(self, x: int) -> int:
            return x + self.offset

    return Methods


def ran_on(token: Token[Any], lane: str) -> Any:
    value = token.get(timeout=30)
    assert token.lane == lane, (token.lane, lane)
    return value


# -- methods --------------------------------------------------------------------------------------
@lanes("thread", "io", "process")
def test_static_class_and_instance_methods_bind_as_functions_do(
    make_coordinator: Make, lane: str
) -> None:
    started(make_coordinator, lane)
    methods = methods_class(lane)
    obj = methods(5)
    assert ran_on(methods.static(2), lane) == 4
    assert ran_on(obj.static(2), lane) == 4  # through an instance: not bound
    assert ran_on(obj.static_outside(2), lane) == 6
    assert ran_on(methods.klass(2), lane) == 20
    assert ran_on(obj.klass(2), lane) == 20  # bound to the class, not the instance
    assert ran_on(obj.klass_outside(2), lane) == 21
    assert ran_on(obj.method(2), lane) == 7
    assert ran_on(methods.method(obj, 2), lane) == 7  # through the class: self passed


@lanes("thread", "io", "process")
def test_bound_method_tasks_map_with_their_instance_or_class(
    make_coordinator: Make, lane: str
) -> None:
    started(make_coordinator, lane)
    methods = methods_class(lane)
    obj = methods(5)
    assert list(obj.method.map([1, 2, 3])) == [6, 7, 8]
    assert list(obj.klass.map([1, 2], window=1)) == [10, 20]
    assert list(obj.static.map([1, 2])) == [2, 4]
    assert obj.method.spec.operation_type == f"{lane}_method"  # the task's attributes show


def test_bound_method_tasks_submit_async(make_coordinator: Make) -> None:
    started(make_coordinator, "thread")
    obj = methods_class("thread")(5)

    async def submit() -> list[Any]:
        return [await await_token(obj.method), await await_token(obj.klass)]

    async def await_token(bound: Any) -> Any:
        return await (await bound.submit_async(1))

    assert asyncio.run(submit()) == [6, 10]


@needs_processes
def test_methods_of_an_importable_class_run_in_worker_processes(make_coordinator: Make) -> None:
    started(make_coordinator, "process")
    obj = pt.Methods(5)
    results = [
        pt.Methods.static(2),
        obj.static(2),
        obj.static_outside(2),
        pt.Methods.klass(2),
        obj.klass(2),
        obj.method(2),
        pt.Methods.method(obj, 2),
    ]
    values = [ran_on(t, "process") for t in results]
    assert [v for v, _ in values] == [4, 4, 6, 20, 20, 7, 7]
    assert all(pid != os.getpid() for _, pid in values)


class AsyncMethods:
    factor = 10

    def __init__(self, offset: int) -> None:
        self.offset = offset

    @task_token_guard(operation_type="async_static", tags={"weight": "light"})
    @staticmethod
    async def static(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    @task_token_guard(operation_type="async_class", tags={"weight": "light"})
    @classmethod
    async def klass(cls, x: int) -> int:
        await asyncio.sleep(0)
        return x * cls.factor

    @task_token_guard(operation_type="async_method", tags={"weight": "light"})
    async def method(self, x: int) -> int:
        await asyncio.sleep(0)
        return x + self.offset


def test_async_static_and_class_methods_run_on_the_event_loop(make_coordinator: Make) -> None:
    started(make_coordinator, "async")
    obj = AsyncMethods(5)
    assert AsyncMethods.static.spec.is_async and AsyncMethods.klass.spec.is_async
    assert ran_on(obj.static(2), "async") == 4
    assert ran_on(obj.klass(2), "async") == 20
    assert ran_on(obj.method(2), "async") == 7


# -- callables that are not functions -------------------------------------------------------------
def _add(a: int, b: int) -> int:
    return a + b


class Adder:
    def __init__(self, by: int) -> None:
        self.by = by
        self.spec = "the object's own attribute"  # must not replace the task's spec

    def __call__(self, x: int) -> int:
        return x + self.by


@lanes("thread", "io", "process")
def test_a_partial_and_a_callable_object_run_as_tasks(make_coordinator: Make, lane: str) -> None:
    started(make_coordinator, lane)
    tags = LANES[lane]
    partial = task_token_guard(f"{lane}_partial", tags)(functools.partial(_add, 10))
    adder = task_token_guard(f"{lane}_callable", tags)(Adder(100))
    assert ran_on(partial(1), lane) == 11
    assert ran_on(adder(1), lane) == 101
    assert list(partial.map([1, 2])) == [11, 12]
    assert list(adder.map([1, 2])) == [101, 102]
    assert partial.__name__ == "partial(_add)" and "partial(_add)" in repr(partial)
    assert adder.__qualname__ == "Adder" and adder.spec.operation_type == f"{lane}_callable"


@needs_processes
def test_an_importable_partial_and_callable_object_run_in_worker_processes(
    make_coordinator: Make,
) -> None:
    started(make_coordinator, "process")
    for token, expected in ((pt.scale_by_3(2), 6), (pt.multiply_by_4(2), 8)):
        value, pid = ran_on(token, "process")
        assert value == expected and pid != os.getpid()


async def _async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def test_a_partial_of_an_async_function_runs_on_the_event_loop(make_coordinator: Make) -> None:
    started(make_coordinator, "async")
    partial = task_token_guard("async_partial", {})(functools.partial(_async_add, 10))
    assert partial.spec.is_async
    assert ran_on(partial(1), "async") == 11


class AsyncAdder:
    def __init__(self, by: int) -> None:
        self.by = by

    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0)
        return x + self.by


def test_a_callable_object_with_an_async_call_runs_on_the_event_loop(
    make_coordinator: Make,
) -> None:
    coordinator = started(make_coordinator, "async")
    adder = task_token_guard("async_callable", {})(AsyncAdder(100))
    assert adder.spec.is_async
    assert ran_on(adder(1), "async") == 101
    assert ran_on(coordinator.submit(AsyncAdder(10), 1), "async") == 11  # undecorated too


@lanes("thread", "process")
def test_decorated_methods_given_to_submit_and_executors_run_bound(
    make_coordinator: Make, lane: str
) -> None:
    """A decorated method read from an instance or a class is submitted as the task it is
    (its tags, what it is bound to), not wrapped as a plain callable whose run returns a
    Token of a nested call."""
    coordinator = started(make_coordinator, lane)
    methods = methods_class(lane)
    obj = methods(5)
    assert ran_on(coordinator.submit(obj.method, 2), lane) == 7
    assert ran_on(coordinator.submit(methods.klass, 2), lane) == 20
    assert ran_on(asyncio.run(coordinator.submit_async(obj.method, 3)), lane) == 8
    executor = coordinator.executor(executor="thread")
    assert executor.submit(obj.method, 2).result(timeout=30) == 7
    assert list(executor.map(obj.method, [1, 2, 3], chunksize=2)) == [6, 7, 8]
    assert list(executor.map(obj.klass, [1, 2])) == [10, 20]


def test_a_method_task_is_still_refused_when_decorated_twice() -> None:
    with pytest.raises(TokenGateError, match="already decorated"):
        task_token_guard("twice", {})(staticmethod(pt.square))  # type: ignore[arg-type]


# -- a script's own classes (``__main__``) ---------------------------------------------------------
MAIN_SCRIPT = """
import functools
import os
from tokengate import OperationsCoordinator, task_token_guard

HEAVY = {"weight": "heavy", "executor": "process"}

class Shape:
    sides = 4

    def __init__(self, size):
        self.size = size

    @task_token_guard(operation_type="area", tags=HEAVY)
    def area(self):
        return self.size ** 2, os.getpid()

    @task_token_guard(operation_type="unit", tags=HEAVY)
    @classmethod
    def unit(cls, size):
        return (cls(size).size * cls.sides), os.getpid()

    @task_token_guard(operation_type="double", tags=HEAVY)
    @staticmethod
    def double(x):
        return 2 * x, os.getpid()

class Scale:
    def __init__(self, by):
        self.by = by
    def __call__(self, x):
        return x * self.by, os.getpid()

def add(a, b):
    return a + b, os.getpid()

plus_one = task_token_guard(operation_type="plus_one", tags=HEAVY)(functools.partial(add, 1))
times_5 = task_token_guard(operation_type="times_5", tags=HEAVY)(Scale(5))

with OperationsCoordinator(workers_per_core=1):
    shape = Shape(3)
    tokens = [shape.area(), Shape.unit(2), shape.unit(2), shape.double(4), Shape.double(4),
              plus_one(1), times_5(2)]
    results = [t.get(timeout=30) for t in tokens]
    print("values", [v for v, _ in results])
    print("elsewhere", all(pid != os.getpid() for _, pid in results))
    print("lanes", sorted({t.lane for t in tokens}))
"""


@needs_processes
def test_methods_of_a_scripts_own_classes_run_in_worker_processes(tmp_path: Path) -> None:
    script = tmp_path / "shapes.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    stdout = run_script(script)
    assert "values [9, 8, 8, 8, 8, 2, 10]" in stdout, stdout
    assert "elsewhere True" in stdout
    assert "lanes ['process']" in stdout
