"""Core affinity: which cores a task of each weight may run on, and which it prefers.

Cores are numbered 1..N as in the TokenGate Quick-Proof ("Core 1"); :meth:`Topology.cpu_for_core`
turns a core number into an OS CPU id. The Quick-Proof's rule of thumb on 8 cores::

    heavy  = cores 1-8, preferred 1
    medium = cores 2-8, preferred 2
    light  = cores 3-8, preferred 3

so the first core is kept for heavy work and the second for heavy and medium work: a flood of
light tasks can never crowd out the CPU-bound ones.

Fallback on small machines: each weight starts at ``min(rule_start, N)``. With N = 2 that gives
heavy [1, 2] pref 1, medium [2] pref 2, light [2] pref 2; with N = 1 every weight gets [1]. No
weight is ever left without a core, and the protected first core stays free of light (and
medium) work whenever there is another core to send it to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tokengate._errors import ConfigError

__all__ = ["WEIGHTS", "AffinityPolicy", "core_worker_mapping", "mapping_banner"]

WEIGHTS: tuple[str, ...] = ("heavy", "medium", "light")

# The first core each weight may use, from the Quick-Proof's rule of thumb.
_RULE_START: dict[str, int] = {"heavy": 1, "medium": 2, "light": 3}


def _check_positive(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1, else raise a ConfigError that names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class AffinityPolicy:
    """Weight -> allowed cores (preferred first) for a machine with ``core_count`` cores.

    Frozen and precomputed: the router asks on every submit, so answering is a dict lookup.
    """

    core_count: int
    weights: ClassVar[tuple[str, ...]] = WEIGHTS
    _allowed: dict[str, tuple[int, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        n = _check_positive("AffinityPolicy core_count", self.core_count)
        for weight in WEIGHTS:
            start = min(_RULE_START[weight], n)
            # The preferred core is the lowest allowed one, so ascending order is already
            # "preferred first, then the rest ascending".
            self._allowed[weight] = tuple(range(start, n + 1))

    def _lookup(self, weight: str) -> tuple[int, ...]:
        try:
            return self._allowed[weight]
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown weight {weight!r}; allowed weights are {', '.join(WEIGHTS)}"
            ) from None

    def allowed(self, weight: str) -> tuple[int, ...]:
        """Cores a task of ``weight`` may run on: the preferred core first, then ascending.

        The router tries them in this order, so ties in load go to the preferred core.
        """
        return self._lookup(weight)

    def preferred(self, weight: str) -> int:
        """The core a task of ``weight`` goes to when the allowed cores are equally loaded."""
        return self._lookup(weight)[0]

    def banner(self) -> str:
        """The Quick-Proof's ``[AFFINITY] Policy for N cores:`` block, without a newline."""
        lines = [f"[AFFINITY] Policy for {self.core_count} cores:"]
        for weight in WEIGHTS:
            label = f"{weight.capitalize()}:"
            cores = sorted(self._allowed[weight])
            lines.append(f"  {label:<7} {cores} (preferred: {self.preferred(weight)})")
        return "\n".join(lines)


def core_worker_mapping(core_count: int, workers_per_core: int) -> dict[int, list[int]]:
    """Core number (1..N) -> global worker indices: core 1 gets 0..k-1, core 2 gets k..2k-1.

    Workers are numbered globally so log lines like ``[worker_5_core_2]`` identify one worker.
    """
    n = _check_positive("core_count", core_count)
    k = _check_positive("workers_per_core", workers_per_core)
    return {core: list(range((core - 1) * k, core * k)) for core in range(1, n + 1)}


def mapping_banner(core_count: int, workers_per_core: int) -> str:
    """The Quick-Proof's ``[CORE_PINNED_QUEUE] Initialized:`` block, without a trailing newline."""
    mapping = core_worker_mapping(core_count, workers_per_core)
    lines = [
        "[CORE_PINNED_QUEUE] Initialized:",
        f"  Cores: {core_count}",
        f"  Workers per core: {workers_per_core}",
        f"  Total workers: {core_count * workers_per_core}",
        "  Core-worker mapping:",
    ]
    lines.extend(f"    Core {core}: Workers {workers}" for core, workers in mapping.items())
    return "\n".join(lines)
