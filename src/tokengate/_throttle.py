"""StorageThrottle: at most N tasks of a storage tier run at once.

A token of a tier takes a permit *before* it is routed to a worker; a token that finds no permit
waits in the tier's FIFO, not in a worker, so CPU work keeps flowing while a tier is full.
Releasing a permit hands it straight to the next waiting token (skipping discarded ones), which
the caller then routes. Limits can be resized while running (the convergence engine does), and a
high-water mark per tier proves the limit held. Releasing is idempotent per token, so every path
that takes a token out of the pipeline may call it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError
from ._spec import STORAGE_TIERS

__all__ = ["StorageThrottle", "TierStats"]


@dataclass(frozen=True)
class TierStats:
    """One tier's state at a moment."""

    tier: str
    limit: int
    running: int
    waiting: int
    high_water: int


class _Tier:
    __slots__ = ("high_water", "limit", "running", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.high_water = 0
        self.waiting: deque[Any] = deque()


class StorageThrottle:
    """Permits per storage tier, with a FIFO of tokens waiting for one."""

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._lock = threading.Lock()
        self._tiers = {tier: _Tier(limits[tier]) for tier in STORAGE_TIERS}

    def banner(self) -> str:
        lines = ["[STORAGE_THROTTLE] Initialized with speed tiers:"]
        lines += [f"  {tier}: {t.limit} concurrent I/O" for tier, t in self._tiers.items()]
        return "\n".join(lines)

    def try_acquire(self, tier: str, token: Any) -> bool:
        """Give ``token`` a permit now, or queue it (FIFO) and return False."""
        with self._lock:
            t = self._tiers[tier]
            if t.running < t.limit and not t.waiting:
                t.running += 1
                t.high_water = max(t.high_water, t.running)
                token._holds_permit = True
                return True
            t.waiting.append(token)
            return False

    def release(self, token: Any) -> list[Any]:
        """Return ``token``'s permit (if it holds one); the tokens granted a permit as a result."""
        tier = token.spec.storage_speed
        with self._lock:
            if not token._holds_permit:
                return []
            token._holds_permit = False
            t = self._tiers[tier]
            t.running -= 1
            return self._grant(t)

    def _grant(self, t: _Tier) -> list[Any]:
        granted: list[Any] = []
        while t.waiting and t.running < t.limit:
            token = t.waiting.popleft()
            if token.done():  # discarded while waiting: it never held a permit
                continue
            t.running += 1
            t.high_water = max(t.high_water, t.running)
            token._holds_permit = True
            granted.append(token)
        return granted

    def resize(self, tier: str, limit: int) -> list[Any]:
        """Change a tier's limit while running; returns tokens granted by a larger limit."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"storage limit for {tier!r} must be an int >= 1, got {limit!r}")
        with self._lock:
            if tier not in self._tiers:
                raise ConfigError(
                    f"unknown storage tier {tier!r}; known tiers are {', '.join(STORAGE_TIERS)}"
                )
            t = self._tiers[tier]
            t.limit = limit
            return self._grant(t)

    def drain_waiting(self) -> list[Any]:
        """Remove and return every waiting token (stop with ``cancel_pending``)."""
        with self._lock:
            out: list[Any] = []
            for t in self._tiers.values():
                out.extend(t.waiting)
                t.waiting.clear()
            return out

    def waiting(self, tier: str) -> int:
        """How many tokens wait for a permit of ``tier`` (read without the lock: advisory)."""
        return len(self._tiers[tier].waiting)

    def limit(self, tier: str) -> int:
        return self._tiers[tier].limit

    def stats(self) -> dict[str, TierStats]:
        with self._lock:
            return {
                tier: TierStats(tier, t.limit, t.running, len(t.waiting), t.high_water)
                for tier, t in self._tiers.items()
            }
