"""Tasks for the process-lane fault tests, importable by name in a worker process.

A worker process imports this module as ``reliability._process_tasks`` (the parent's
``sys.path`` holds ``tests/``), so every task here is defined at module level. Faults that must
strike once and then let the retry through use a marker file: the first attempt creates it and
crashes, the retry finds it and returns.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import threading
from pathlib import Path
from typing import Any

from tokengate import task_token_guard

HEAVY = {"weight": "heavy", "executor": "process"}


@task_token_guard(operation_type="proc_work", tags=HEAVY)
def work(i: int) -> int:
    """A few milliseconds of pure-Python CPU work."""
    total = 0
    for x in range(20_000):
        total += x * x % 7
    return i + total - total


@task_token_guard(operation_type="proc_pid", tags=HEAVY)
def pid() -> int:
    return os.getpid()


def _first_time(marker: str) -> bool:
    try:
        Path(marker).touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


@task_token_guard(operation_type="proc_sigkill_self", tags=HEAVY)
def sigkill_self(i: int, marker: str | None = None) -> int:
    if marker is None or _first_time(marker):
        os.kill(os.getpid(), signal.SIGKILL)
    return i


@task_token_guard(operation_type="proc_exit", tags=HEAVY)
def hard_exit(i: int, marker: str | None = None) -> int:
    if marker is None or _first_time(marker):
        os._exit(3)
    return i


@task_token_guard(operation_type="proc_segfault", tags=HEAVY)
def segfault(i: int, marker: str | None = None) -> int:
    if marker is None or _first_time(marker):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return i


@task_token_guard(operation_type="proc_oom_killed", tags=HEAVY)
def oom_killed(i: int, marker: str | None = None) -> int:
    """What the kernel's OOM killer does: the process grows, then dies of SIGKILL."""
    if marker is None or _first_time(marker):
        hog = bytearray(64 * 1024 * 1024)
        hog[::4096] = b"x" * len(hog[::4096])  # touch every page
        os.kill(os.getpid(), signal.SIGKILL)
    return i


@task_token_guard(operation_type="proc_memory_error", tags={**HEAVY, "retries": 0})
def exhaust_memory(i: int) -> int:
    """Allocate until the address space (capped at +256 MB for this call) runs out."""
    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = psutil.Process().memory_info().vms + 256 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    hog: list[bytearray] = []
    try:
        while True:
            hog.append(bytearray(16 * 1024 * 1024))
    finally:
        hog.clear()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@task_token_guard(operation_type="proc_bad_result", tags=HEAVY)
def unpicklable_result(i: int) -> Any:
    return threading.Lock()


@task_token_guard(operation_type="proc_takes_anything", tags=HEAVY)
def takes_anything(value: Any) -> str:
    return type(value).__name__


@task_token_guard(operation_type="proc_hang", tags={**HEAVY, "timeout": 0.5})
def hang_in_process(i: int) -> int:
    threading.Event().wait(60)
    return i
