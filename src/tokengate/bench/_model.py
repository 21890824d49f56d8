"""What a benchmark is made of: scenarios, the systems they compare, the figures they measure.

A scenario (``B1`` …) names its figures and the one *headline* figure that the ratio to the best
peer is computed on, and lists its systems. A system is one function ``run(params) -> figures``
that does the work in the current process and returns plain numbers; the harness in ``_case``
adds peak RSS and runs it in a fresh interpreter, so nothing here measures memory or isolates.

Adding a scenario is one module with the system functions and one ``Scenario(...)`` entry in
``_scenarios.SCENARIOS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "PEAK_RSS",
    "RSS_GROWTH",
    "RSS_PER_TASK",
    "CaseParams",
    "Deadlocked",
    "Figure",
    "FigureValue",
    "Figures",
    "Scenario",
    "System",
    "SystemKind",
    "usable_cores",
]

FigureValue = float | int | bool
Figures = dict[str, FigureValue]
SystemKind = Literal["tokengate", "peer", "floor"]


def usable_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity`` where the OS has it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Figure:
    """One measured quantity.

    ``higher_is_better`` is ``None`` for a figure that is not ranked (a count, a yes/no).
    ``kind="bool"`` figures are shown as yes / no (or "2/3" when the runs disagree);
    ``kind="count"`` figures as whole numbers (a median of two runs may end in .5).
    """

    key: str
    label: str
    higher_is_better: bool | None = None
    kind: Literal["number", "count", "bool"] = "number"


#: Added to every case by the harness: the peak RSS (``VmHWM``) of the case's own fresh
#: process, and its growth over the high-water mark taken just before the system ran (after
#: its imports).
PEAK_RSS = Figure("peak_rss_mb", "peak RSS MB", higher_is_better=False)
RSS_GROWTH = Figure("rss_growth_mb", "RSS growth MB", higher_is_better=False)
#: Also computed for every case; shown only by scenarios that list it (B4).
RSS_PER_TASK = Figure("rss_growth_kb_per_task", "RSS growth KB/task", higher_is_better=False)


@dataclass(frozen=True)
class CaseParams:
    """What a system function is told: the task count, quick mode, and the usable cores.

    ``address`` is a Dask scheduler (``tokengate bench --backend dask --address ...``): the
    systems that use Dask connect to it instead of starting a ``LocalCluster`` of their own.
    """

    n: int
    quick: bool
    cores: int
    address: str | None = None


@dataclass(frozen=True)
class System:
    """One contender in a scenario.

    ``key`` is the command-line name (``--systems``), ``label`` the table's. ``requires`` lists
    the importable modules the system needs: if one is missing the case is reported
    "not installed". ``n`` / ``quick_n`` override the scenario's task count (process pools and
    Dask are scaled down; per-task figures keep them comparable). ``timeout_status`` is what a
    runner-side timeout is called for this case (B7's ``"deadlocked"``).

    ``backend`` is where a tokengate system runs its tokens: ``"dask"`` systems run only with
    ``tokengate bench --backend dask``. ``compare_to`` names the peer a tokengate system's ratio
    is taken against (the same engine without tokengate), instead of the best peer.
    """

    key: str
    label: str
    run: Callable[[CaseParams], Figures]
    kind: SystemKind = "peer"
    requires: tuple[str, ...] = ()
    n: int | None = None
    quick_n: int | None = None
    timeout: float | None = None
    quick_timeout: float | None = None
    timeout_status: str = "timeout"
    note: str = ""
    backend: str = "local"
    compare_to: str | None = None

    def task_count(self, scenario: Scenario, *, quick: bool) -> int:
        if quick:
            return self.quick_n or scenario.quick_n
        return self.n or scenario.n

    def time_limit(self, scenario: Scenario, *, quick: bool, default: float) -> float:
        """The per-case timeout: the system's, else the scenario's, else the run's default."""
        own = self.quick_timeout if quick else self.timeout
        if own is not None:
            return own
        theirs = scenario.quick_timeout if quick else scenario.timeout
        return theirs if theirs is not None else default


@dataclass(frozen=True)
class Scenario:
    """A benchmark scenario: what it does, what it measures, and who competes."""

    id: str
    title: str
    description: str
    figures: tuple[Figure, ...]
    headline: str
    n: int
    quick_n: int
    systems: tuple[System, ...]
    timeout: float | None = None
    quick_timeout: float | None = None
    notes: tuple[str, ...] = field(default=())
    n_label: str = "N"
    #: Runs per case at least, whatever ``--repeat`` says: a scenario whose ratio is a small
    #: overhead needs more runs than the run-to-run noise of a busy machine allows with three.
    min_runs: int = 1

    def __post_init__(self) -> None:
        if self.min_runs < 1:
            raise ValueError(
                f"scenario {self.id}: min_runs must be at least 1, got {self.min_runs}"
            )
        keys = [f.key for f in self.all_figures()]
        if self.headline not in keys:
            raise ValueError(
                f"scenario {self.id}: headline figure {self.headline!r} is not one of its "
                f"figures {keys}; name one of them"
            )
        head = self.figure(self.headline)
        if head.higher_is_better is None:
            raise ValueError(
                f"scenario {self.id}: headline figure {self.headline!r} has no direction; "
                "set higher_is_better on it"
            )
        system_keys = [s.key for s in self.systems]
        if len(set(system_keys)) != len(system_keys):
            raise ValueError(f"scenario {self.id}: duplicate system keys in {system_keys}")

    def figure(self, key: str) -> Figure:
        for f in self.all_figures():
            if f.key == key:
                return f
        raise KeyError(f"scenario {self.id} has no figure {key!r}")

    def all_figures(self) -> tuple[Figure, ...]:
        """The scenario's figures, then peak RSS (which every case carries) unless listed.

        ``RSS_GROWTH`` and ``RSS_PER_TASK`` are in every case's raw figures too, and shown
        when a scenario lists them.
        """
        if any(f.key == PEAK_RSS.key for f in self.figures):
            return self.figures
        return (*self.figures, PEAK_RSS)

    def system(self, key: str) -> System:
        for s in self.systems:
            if s.key == key:
                return s
        known = ", ".join(s.key for s in self.systems)
        raise KeyError(f"scenario {self.id} has no system {key!r}; known: {known}")


class Deadlocked(Exception):
    """Raised by a system that has proved it can make no further progress.

    The harness reports the case as ``deadlocked`` with ``figures`` (what it got done) and
    leaves the process with ``os._exit`` because the stuck threads can never be joined.
    """

    def __init__(self, detail: str, figures: Mapping[str, FigureValue]) -> None:
        super().__init__(detail)
        self.figures: Figures = dict(figures)
