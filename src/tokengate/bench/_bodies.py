"""The task bodies the scenarios run: plain module-level functions, in a leaf module.

The peers' process pools (``ProcessPoolExecutor``, loky, Dask) pickle these by reference, so
every worker process imports this module; tokengate's decorated versions (``_tasks``) call the
same bodies. It imports nothing from the rest of ``bench`` or from the runtime, so a worker loads
only what a task runs, and no scenario module is needed to unpickle a task.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = [
    "FLOOD_SLEEP_S",
    "array_sum",
    "burn",
    "flood_plain",
    "light_work",
    "noop_plain",
    "part_sum",
]

#: B4: how long the flood task's consumer takes per payload.
FLOOD_SLEEP_S = 0.0001


def noop_plain(i: int) -> int:
    """B1, B2o, B3: the smallest task, so the figure is the machinery's overhead."""
    return i


def burn(steps: int) -> int:
    """B2, B3: pure-Python CPU work that holds the GIL the whole time."""
    total = 0
    for i in range(steps):
        total += i * i % 7
    return total


def light_work() -> int:
    """B3: the light task that must not wait behind the heavy ones."""
    return sum(range(1000))


def flood_plain(payload: bytes) -> int:
    """B4: a slow consumer of a payload, shared by tokengate's ``flood`` and the peers."""
    time.sleep(FLOOD_SLEEP_S)
    return len(payload)


def array_sum(array: Any) -> float:
    """B8 distinct: sum one whole array."""
    return float(array.sum())


def part_sum(array: Any, i: int, parts: int) -> float:
    """B8 broadcast: sum the ``i``-th of ``parts`` equal parts of one array."""
    step = len(array) // parts
    return float(array[i * step : (i + 1) * step].sum())
