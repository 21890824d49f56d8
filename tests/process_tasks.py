"""Tasks for the process-lane tests, in a module of their own so that worker processes import
only this (and tokengate), not pytest and the test modules."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from tokengate import Token, task_token_guard

HEAVY = {"weight": "heavy"}


@task_token_guard(operation_type="whoami", tags=HEAVY)
def whoami() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "thread": threading.current_thread().name,
    }


@task_token_guard(operation_type="square", tags=HEAVY)
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="add", tags={"weight": "heavy"})
def add(*values: int) -> int:
    return sum(values)


@task_token_guard(operation_type="total", tags=HEAVY)
def total(values: list[int], extra: dict[str, int]) -> int:
    return sum(values) + sum(extra.values())


@task_token_guard(operation_type="apply", tags=HEAVY)
def apply(fn: Any, *args: Any) -> Any:
    return fn(*args)


@task_token_guard(operation_type="light_double", tags={"weight": "light"})
def light_double(x: int) -> int:
    return 2 * x


@task_token_guard(operation_type="light_waits_on_heavy", tags={"weight": "light"})
def light_waits_on_heavy(x: int) -> int:
    """A thread task that submits a process task and waits for it (blocks its thread)."""
    return square(x).get(timeout=30) + 1


@task_token_guard(operation_type="light_fib", tags={"weight": "light"})
def light_fib(n: int) -> int:
    """B7-style fan-out on threads whose leaves are heavy process tasks."""
    if n < 2:
        return square(n).get(timeout=60)
    left, right = light_fib(n - 1), light_fib(n - 2)
    return left.get(timeout=60) + right.get(timeout=60)


@task_token_guard(operation_type="nested_fib", tags=HEAVY)
def nested_fib(n: int) -> int:
    """Heavy nested tasks: inside a worker process each call runs inline."""
    if n < 2:
        return n
    return nested_fib(n - 1).get(timeout=60) + nested_fib(n - 2).get(timeout=60)


@task_token_guard(operation_type="inline_probe", tags=HEAVY)
def inline_probe() -> dict[str, Any]:
    """What a decorated call made inside a worker process returns."""
    token = square(7)
    failing = raises_value_error("inner")
    chained = add(token, 1)
    return {
        "is_token": isinstance(token, Token),
        "done_at_once": token.done(),
        "value": token.get(timeout=0),
        "lane": token.lane,
        "failed_type": type(failing.exception(0)).__name__,
        "chained": chained.get(timeout=0),
        "mapped": list(square.map([1, 2, 3])),
    }


@task_token_guard(operation_type="bad_value", tags=HEAVY)
def raises_value_error(message: str) -> None:
    raise ValueError(message)


class NeedsTwoArgs(Exception):
    """An exception whose __init__ signature defeats unpickling."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


@task_token_guard(operation_type="odd_error", tags=HEAVY)
def raises_odd_error() -> None:
    raise NeedsTwoArgs(7, "odd")


@task_token_guard(operation_type="returns_lock", tags=HEAVY)
def returns_lock() -> Any:
    return threading.Lock()


@task_token_guard(operation_type="length", tags=HEAVY)
def length(value: Any) -> int:
    return len(value)


@task_token_guard(operation_type="light_lock", tags={"weight": "light"})
def light_lock() -> Any:
    return [threading.Lock()]


@task_token_guard(operation_type="slow_io", tags={"weight": "heavy", "storage_speed": "SLOW"})
def slow_io() -> str:
    return "io"


@task_token_guard(
    operation_type="slow_io_process",
    tags={"weight": "light", "storage_speed": "SLOW", "executor": "process"},
)
def slow_io_process() -> int:
    return os.getpid()


@task_token_guard(operation_type="thread_heavy", tags={"weight": "heavy", "executor": "thread"})
def thread_heavy() -> int:
    return os.getpid()


#: The longest timeout and deadline allowed (``tokengate._limits.MAX_WAIT_SECONDS``).
LONGEST = {"timeout": 2_000_000, "deadline": 2_000_000}


@task_token_guard(operation_type="longest_waits", tags={**HEAVY, "executor": "process", **LONGEST})
def longest_waits(x: int) -> int:
    return x + 1


# -- ways to die -----------------------------------------------------------------------------------
def _no_core_dumps() -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@task_token_guard(operation_type="exits", tags=HEAVY)
def exit_hard(code: int) -> None:
    os._exit(code)


@task_token_guard(operation_type="sigkill_self", tags=HEAVY)
def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@task_token_guard(operation_type="segfault", tags=HEAVY)
def segfault() -> None:
    _no_core_dumps()
    ctypes.string_at(0)


@task_token_guard(operation_type="aborts", tags=HEAVY)
def abort() -> None:
    _no_core_dumps()
    os.abort()


@task_token_guard(operation_type="memory_hog", tags={"weight": "heavy", "retries": 0})
def memory_hog() -> None:
    """Allocate past an address-space limit: Python raises MemoryError (no crash)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, hard))
    try:
        bytearray(2 << 30)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@task_token_guard(operation_type="crash_once", tags=HEAVY)
def crash_once(marker: str) -> str:
    """Dies on the first attempt (no marker file yet), succeeds on the retry."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os._exit(9)
    return "recovered"


@task_token_guard(operation_type="block", tags=HEAVY)
def block_until_killed(marker: str, seconds: float = 60.0) -> str:
    """Announce the run (pid in ``marker``, written atomically), then hold the worker."""
    partial = Path(marker + ".partial")
    partial.write_text(str(os.getpid()))
    os.replace(partial, marker)
    time.sleep(seconds)
    return "not killed"


@task_token_guard(operation_type="block_light", tags={"weight": "light", "executor": "process"})
def block_light(marker: str) -> str:
    """block_until_killed for a light process task (light may only use the last cores)."""
    return block_until_killed.__wrapped__(marker)


@task_token_guard(operation_type="light_square", tags={"weight": "light", "executor": "process"})
def light_square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="hangs", tags={"weight": "heavy", "timeout": 0.3, "retries": 0})
def hangs() -> str:
    time.sleep(60)
    return "late"


@task_token_guard(operation_type="hangs_once", tags={"weight": "heavy", "timeout": 0.3})
def hangs_once(marker: str) -> int:
    """Overruns its timeout on the first attempt only (then the marker exists)."""
    path = Path(marker)
    if not path.exists():
        path.write_text("")
        time.sleep(60)
    return os.getpid()


@task_token_guard(operation_type="hold_until_open", tags=HEAVY)
def hold_until_open(marker: str, gate: str) -> str:
    """Announce the run (``marker``), then hold the worker until the file ``gate`` exists
    (a gate between processes; the test opens it whenever it likes, before or after)."""
    Path(marker).touch()
    give_up = time.monotonic() + 60.0  # a test that forgot to open the gate still ends
    while not os.path.exists(gate) and time.monotonic() < give_up:
        time.sleep(0.005)
    return "released"


@task_token_guard(operation_type="fails_with", tags=HEAVY)
def fails_with(message: str) -> None:
    raise ValueError(message[:20])


@task_token_guard(operation_type="submits_lengths", tags={"weight": "light", "executor": "thread"})
def submits_lengths(value: bytes, n: int) -> list[Token[int]]:
    """A thread task that submits ``n`` process calls (a call from a task never waits)."""
    return [length(value) for _ in range(n)]


@task_token_guard(operation_type="crash_once_sized", tags=HEAVY)
def crash_once_sized(marker: str, value: bytes) -> int:
    """crash_once with an argument of some size: dies on the first attempt, then its length."""
    crash_once.__wrapped__(marker)
    return len(value)


# -- plain functions for the process flavour of coordinator.executor() (tests/test_executor.py) --
_initializations = 0


def count_initialization(step: int) -> None:
    """An executor initializer: counts how often it ran in this process."""
    global _initializations
    _initializations += step


def pid_and_initializations(_: int) -> tuple[int, int]:
    return os.getpid(), _initializations


def plain_length(value: Any) -> int:
    return len(value)


def exit_first_time(marker: str) -> str:
    """Kills its worker process on the first run (no marker file yet); fine on a second."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os._exit(9)
    return "ran again"


# -- tasks that are methods, a partial and a callable object (worker processes import them) ------
class Methods:
    """Each kind of method as a task; an importable class, so they travel by name."""

    factor = 10

    def __init__(self, offset: int) -> None:
        self.offset = offset

    @task_token_guard(operation_type="pm_static", tags=HEAVY)
    @staticmethod
    def static(x: int) -> tuple[int, int]:
        return x * 2, os.getpid()

    @staticmethod
    @task_token_guard(operation_type="pm_static_outside", tags=HEAVY)
    def static_outside(x: int) -> tuple[int, int]:
        return x * 3, os.getpid()

    @task_token_guard(operation_type="pm_class", tags=HEAVY)
    @classmethod
    def klass(cls, x: int) -> tuple[int, int]:
        return x * cls.factor, os.getpid()

    @task_token_guard(operation_type="pm_method", tags=HEAVY)
    def method(self, x: int) -> tuple[int, int]:
        return x + self.offset, os.getpid()


def _scale(factor: int, x: int) -> tuple[int, int]:
    return factor * x, os.getpid()


class Multiply:
    """A callable object: no ``__name__`` or ``__qualname__`` of its own."""

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: int) -> tuple[int, int]:
        return self.factor * x, os.getpid()


scale_by_3 = task_token_guard(operation_type="pm_partial", tags=HEAVY)(functools.partial(_scale, 3))
multiply_by_4 = task_token_guard(operation_type="pm_callable", tags=HEAVY)(Multiply(4))


# -- shared memory ---------------------------------------------------------------------------------
def shared_mappings() -> list[str]:
    """The lines of this process's memory map that are tokengate's shared-memory segments."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return [line for line in maps if "memfd:tokengate" in line]


@task_token_guard(operation_type="array_info", tags=HEAVY)
def array_info(array: Any) -> dict[str, Any]:
    """What the worker got: its sum, whether it may write to it, whether it is mapped shared."""
    return {
        "sum": float(array.sum()),
        "writeable": bool(array.flags.writeable),
        "mapped": bool(shared_mappings()),
        "pid": os.getpid(),
    }


_MAPPINGS_SEEN: list[weakref.ref[Any]] = []


@task_token_guard(operation_type="mapped_before", tags=HEAVY)
def mapped_before(array: Any) -> bool:
    """Whether the mapping ``array`` lies in is one an earlier call in this worker got too."""
    view = array.base
    while not isinstance(view, memoryview):  # a view of a view of the mapped buffer
        view = view.base
    mapping = view.obj
    seen = any(ref() is mapping for ref in _MAPPINGS_SEEN)
    _MAPPINGS_SEEN.append(weakref.ref(mapping))
    return seen


@task_token_guard(operation_type="make_array", tags=HEAVY)
def make_array(n: int) -> Any:
    import numpy

    return numpy.arange(n, dtype=numpy.float64)


@task_token_guard(operation_type="buffer_info", tags=HEAVY)
def buffer_info(data: Any) -> tuple[str, int, int, bool]:
    view = memoryview(data)
    return type(data).__name__, view.nbytes, sum(view[:4096]), bool(shared_mappings())


@task_token_guard(operation_type="array_raises", tags=HEAVY)
def array_raises(array: Any) -> None:
    raise ValueError(f"refused an array of {array.nbytes} bytes")


@task_token_guard(operation_type="hold_array", tags=HEAVY)
def hold_array(array: Any, marker: str) -> str:
    """Hold a mapped argument (announced in ``marker``) until killed."""
    assert shared_mappings()
    partial = Path(marker + ".partial")
    partial.write_text(str(os.getpid()))
    os.replace(partial, marker)
    time.sleep(60)
    return "not killed"


@task_token_guard(operation_type="worker_mappings", tags={**HEAVY, "executor": "process"})
def worker_mappings() -> list[str]:
    return shared_mappings()


# -- worker set-up ---------------------------------------------------------------------------------
WORKER_STATE: dict[str, Any] = {}


def remember(key: str, value: Any, log: str | None = None) -> None:
    """A process initializer: keep ``value`` for the tasks (and note each run in ``log``)."""
    WORKER_STATE[key] = value
    if log is not None:
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"{os.getpid()}\n")


def refuse_to_start() -> None:
    raise RuntimeError("injected: this initializer always fails")


@task_token_guard(operation_type="worker_state", tags=HEAVY)
def worker_state() -> dict[str, Any]:
    return dict(WORKER_STATE)


@task_token_guard(operation_type="native_threads", tags=HEAVY)
def native_threads() -> dict[str, Any]:
    """The native thread-pool sizes a worker process runs NumPy with."""
    import numpy

    numpy.dot(numpy.ones((64, 64)), numpy.ones((64, 64)))  # load and start the BLAS
    env = {
        var: os.environ.get(var)
        for var in (
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS",
            "NUMEXPR_NUM_THREADS",
        )
    }
    pools: list[int] = []
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_info

        pools = [info["num_threads"] for info in threadpool_info()]
    return {"env": env, "pools": pools}


@task_token_guard(operation_type="keep_array", tags=HEAVY)
def keep_array(array: Any) -> float:
    """Keep the (mapped) argument in the worker after the task ends."""
    WORKER_STATE["kept"] = array
    return float(array.sum())


@task_token_guard(operation_type="kept_sum", tags=HEAVY)
def kept_sum() -> float:
    return float(WORKER_STATE["kept"].sum())
