"""Validation of the observability knobs of ``CoordinatorConfig``, and byte-size helpers.

Kept out of ``_config.py`` so the configuration module only gains one call; every message names
the bad value and what is allowed, like the rest of the configuration.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from .._limits import MAX_WAIT_SECONDS, check_seconds

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "default_memory_budget",
    "format_bytes",
    "machine_memory",
    "parse_byte_size",
    "parse_memory_budget",
    "validate_observability",
]

DEFAULT_BUDGET_FRACTION = 0.5
"""Without ``memory_budget``, the Overflow Guard allows half of the memory this process may use."""

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def machine_memory() -> int:
    """Bytes of memory this process may use: total RAM, or a smaller cgroup (container) limit."""
    import psutil

    total = int(psutil.virtual_memory().total)
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def default_memory_budget() -> int:
    """The Overflow Guard's budget when none is configured (``DEFAULT_BUDGET_FRACTION``)."""
    return int(machine_memory() * DEFAULT_BUDGET_FRACTION)


def parse_memory_budget(value: object) -> int | None:
    """``None``, a number of bytes, ``"512MB"``/``"2 GiB"`` (powers of 1024) or ``"25%"``."""
    return parse_byte_size("memory_budget", value)


def parse_byte_size(name: str, value: object, none_means: str = "") -> int | None:
    """A byte-size knob ``name``: ``None``, a number of bytes >= 1, a size such as ``"512MB"``
    or ``"2 GiB"`` (powers of 1024), or a share of the machine's memory such as ``"25%"``.
    ``none_means`` (e.g. ``"no byte bound"``) is added to the error message when given."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            also = f" (or None: {none_means})" if none_means else ""
            raise ConfigError(f"{name} must be >= 1 byte{also}, got {value!r}")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
            if size >= 1:
                return size
        match = _PERCENT.match(value)
        if match and 0 < float(match.group(1)) <= 100:
            return max(1, int(machine_memory() * float(match.group(1)) / 100))
    raise ConfigError(
        f"{name} must be a number of bytes, a size such as '512MB' or '2GiB', or a share "
        f"of the machine's memory such as '25%'"
        + (f", or None ({none_means})" if none_means else "")
        + f"; got {value!r}"
    )


def format_bytes(n: float) -> str:
    """``18 MB`` as the TokenGate Quick-Proof prints it (powers of 1024); small budgets in KB or
    bytes."""
    if n >= 1 << 20:
        return f"{n / (1 << 20):.0f} MB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.0f} KB"
    return f"{n:.0f} B"


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def _seconds(name: str, value: Any) -> None:
    check_seconds(name, value, fix=f"give at most {MAX_WAIT_SECONDS:.0f} seconds")


def _count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def validate_observability(config: Any) -> None:
    """Check (and normalise ``memory_budget`` of) a ``CoordinatorConfig`` being constructed."""
    for name in ("guard_house", "auto_block", "overflow_guard", "trace"):
        _flag(name, getattr(config, name))
    if config.auto_block and not config.guard_house:
        raise ConfigError(
            "auto_block=True needs the Guard House: drop guard_house=False, or auto_block"
        )
    _count("block_after", config.block_after)
    _seconds("block_cooldown", config.block_cooldown)
    _seconds("memory_check_interval", config.memory_check_interval)
    _count("trace_buffer", config.trace_buffer)
    dashboard = config.dashboard
    if not isinstance(dashboard, bool) and not (
        isinstance(dashboard, int) and 1 <= dashboard <= 65535
    ):
        raise ConfigError(
            f"dashboard must be True (serve it on a free loopback port), False, or a port in "
            f"1..65535, got {dashboard!r}"
        )
    object.__setattr__(config, "memory_budget", parse_memory_budget(config.memory_budget))
