"""CPU topology: how many cores this process may use.

The coordinator sizes its worker pool and numbers its cores from a :class:`Topology`, so the
numbers must describe what the *process* may use (its affinity mask, which a container or
``taskset`` can narrow), not merely what the machine has. :func:`detect_topology` reads the
machine once; tests build ``Topology(...)`` directly to describe any machine they like.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from tokengate._errors import ConfigError

__all__ = ["Topology", "detect_topology", "gil_enabled", "pin_current_thread"]

logger = logging.getLogger("tokengate.topology")


def _available_cpus() -> tuple[int, ...]:
    """The OS CPU ids this process may run on (its affinity mask where the OS has one)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            cpus: Iterable[int] = getaffinity(0)
        except OSError:  # pragma: no cover - only on exotic kernels
            logger.debug("os.sched_getaffinity failed; assuming every CPU", exc_info=True)
        else:
            return tuple(sorted(cpus))
    return tuple(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class Topology:
    """Physical and logical core counts plus the CPU ids this process may use.

    ``available_cpus`` is normalised to a sorted tuple without duplicates, so two topologies
    describing the same CPUs compare equal whatever order the ids came in.
    """

    physical_cores: int
    logical_cores: int
    available_cpus: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("physical_cores", "logical_cores"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"Topology {name} must be an integer >= 1, got {value!r}; "
                    "pass the count of cores the machine has"
                )
        cpus = tuple(sorted(set(self.available_cpus)))
        for cpu in cpus:
            if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < 0:
                raise ConfigError(
                    f"Topology available_cpus must hold OS CPU ids (integers >= 0), got {cpu!r}"
                )
        object.__setattr__(self, "available_cpus", cpus)

    @property
    def smt_enabled(self) -> bool:
        """True when the OS shows more logical CPUs than physical cores (hyper-threading)."""
        return self.logical_cores > self.physical_cores

    @property
    def smt_ratio(self) -> float:
        """Logical CPUs per physical core (1.0 without SMT, usually 2.0 with it)."""
        return self.logical_cores / self.physical_cores

    @property
    def core_count(self) -> int:
        """How many cores this process may use; at least 1 so a pool is never sized to zero."""
        return max(1, len(self.available_cpus))

    def cpu_for_core(self, core: int) -> int:
        """The OS CPU id behind the 1-based core number the affinity policy uses.

        Core ``k`` is the k-th CPU of ``available_cpus``; numbers past the end wrap around, so a
        policy built for more cores than the process may use still maps onto real CPUs. With no
        known CPUs the core number minus one is returned unchanged.
        """
        if isinstance(core, bool) or not isinstance(core, int) or core < 1:
            raise ConfigError(f"core numbers start at 1, got {core!r}")
        if not self.available_cpus:
            return core - 1
        return self.available_cpus[(core - 1) % len(self.available_cpus)]

    def banner(self) -> str:
        """The Quick-Proof's initialisation block ("CPU Topology Detected: ..."), without a newline.

        It shows no "recommended worker counts" per weight: no pool is sized by weight
        (weights choose cores, the thread lane's ``workers_per_core`` serves every weight,
        heavy work runs in one process per core), so such numbers would be advice nothing follows.
        """
        return "\n".join(
            [
                "CPU Topology Detected:",
                f"  Physical cores: {self.physical_cores}",
                f"  Logical cores: {self.logical_cores}",
                f"  SMT enabled: {self.smt_enabled}",
                f"  SMT ratio: {self.smt_ratio:.1f}x",
                f"  Available cores: {self.core_count}",
            ]
        )


@functools.cache
def detect_topology() -> Topology:
    """Read this machine's topology once; later calls return the same object.

    Memoised because the answer does not change while the process runs (short of someone
    calling ``sched_setaffinity`` on the whole process) and psutil reads ``/sys`` to get it.
    ``detect_topology.cache_clear()`` forces a fresh read.
    """
    logical = psutil.cpu_count() or os.cpu_count() or 1
    # psutil returns None for physical cores where it cannot tell (some VMs, containers, BSDs).
    physical = psutil.cpu_count(logical=False) or logical
    return Topology(
        physical_cores=min(physical, logical),
        logical_cores=logical,
        available_cpus=_available_cpus(),
    )


def pin_current_thread(cpus: Iterable[int]) -> bool:
    """Restrict the calling thread to ``cpus`` (OS CPU ids); True if the OS did it.

    On Linux ``sched_setaffinity(0, ...)`` applies to the calling thread only, which is what a
    worker wants. Pinning is an optimisation, never a requirement: where the OS lacks it (macOS,
    Windows) or refuses it (a CPU outside the cgroup, an invalid id) this logs at debug level and
    returns False so the worker runs unpinned. It never raises.
    """
    setaffinity = getattr(os, "sched_setaffinity", None)
    if setaffinity is None:
        logger.debug("CPU pinning unsupported on this platform; thread left unpinned")
        return False
    try:
        wanted = tuple(cpus)
        setaffinity(0, wanted)
    except (OSError, ValueError, OverflowError, TypeError) as exc:
        logger.debug("could not pin thread to CPUs %r: %s", cpus, exc)
        return False
    return True


def gil_enabled() -> bool:
    """True unless this is a free-threaded build running without the GIL.

    It decides where CPU-heavy work runs (processes under the GIL, threads without it) and how
    much CPU one interpreter can use (the convergence engine).
    """
    probe = getattr(sys, "_is_gil_enabled", None)
    return True if probe is None else bool(probe())
