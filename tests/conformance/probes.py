"""Probes that work the same in a thread and in a Dask worker process on this machine.

Tasks of the conformance suite receive these as arguments. Files (with ``fcntl.flock`` where a
count must be exact) cross process boundaries; gates are ``threading.Event`` on the local backend
and ``distributed.Event`` (held by the scheduler) on the Dask backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import Protocol


class Gate(Protocol):
    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def is_set(self) -> bool: ...


class Journal:
    """Append-only record of what ran: one file per entry in a directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)

    def record(self, label: str) -> int:
        """Record one run of ``label``; returns which run it is (1 for the first)."""
        n = 1
        while True:
            try:
                fd = os.open(os.path.join(self.path, f"{label}.{n}"), os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                n += 1
                continue
            os.close(fd)
            return n

    def runs(self, label: str) -> int:
        return sum(1 for name in os.listdir(self.path) if name.rpartition(".")[0] == label)

    def labels(self) -> list[str]:
        return sorted(name.rpartition(".")[0] for name in os.listdir(self.path))


class HighWater:
    """How many holders are inside at once, and the most ever seen, across processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "w", encoding="ascii") as f:
            f.write("0 0")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[int]]:
        with open(self.path, "r+", encoding="ascii") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            values = [int(v) for v in f.read().split()]
            yield values
            f.seek(0)
            f.truncate()
            f.write(f"{values[0]} {values[1]}")
            f.flush()
            os.fsync(f.fileno())

    def enter(self) -> None:
        with self._locked() as values:
            values[0] += 1
            values[1] = max(values[1], values[0])

    def leave(self) -> None:
        with self._locked() as values:
            values[0] -= 1

    def read(self) -> tuple[int, int]:
        """(inside now, high-water mark)."""
        with self._locked() as values:
            return values[0], values[1]
