"""IOLane: one pool of threads per storage tier, for tasks tagged with ``storage_speed``.

A storage-tier token takes its tier's permit before it is routed (``StorageThrottle``), so at
most ``limit`` tokens of a tier are ever in this lane's mailboxes; the pool needs no more threads
than that to reach the tier's concurrency (50 FAST writes in flight at once). It does not start
with that many: the baseline is ``io_workers`` threads per tier, and the convergence engine grows
a tier's pool toward its limit only while the work queued there is waiting on I/O, and retires
the extra threads once the surge is over. CPU-bound "I/O" work (``json.dump`` of a big dict is
pure-Python CPU work) keeps the baseline: more threads would only fight over the GIL.

The threads are not pinned to a core (``core`` 0): they mostly wait, and the kernel work of
many concurrent writes spreads better over every CPU. Everything else (mailboxes, wake-ups,
retiring, stop) is :class:`ThreadLane`'s; workers are named ``io_<tier>_<n>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ._base import LaneHost
from ._thread import ThreadLane, ThreadWorker, logger, thread_cpu_clock

__all__ = ["IOLane", "IOWorker"]


class IOWorker(ThreadWorker):
    """A tier pool's thread: a token queued behind a running one is the start of a backlog,
    and the lane says so at once (``IOLane.on_backlog``), so the convergence engine judges a
    surge of waiting I/O now rather than at its next low-frequency sample."""

    lane: IOLane

    def push(self, token: Any) -> None:
        self.mailbox.append(token)
        if self.sleeping:
            self.wake()
        else:
            on_backlog = self.lane.on_backlog
            if on_backlog is not None:
                on_backlog()


class IOLane(ThreadLane):
    """Thread pools keyed by storage tier; ``limit(tier)`` is the tier's current permit count."""

    name = "io"
    kind = "io"

    def __init__(
        self,
        tiers: Iterable[str],
        io_workers: int,
        host: LaneHost,
        *,
        limit: Callable[[str], int],
    ) -> None:
        super().__init__({}, 0, host)
        # Called when a token queues behind a busy worker (the convergence engine's nudge).
        self.on_backlog: Callable[[], None] | None = None
        self._limit = limit
        self._baseline = io_workers
        self._per_tier: dict[str, int] = {}
        pools: dict[Any, list[ThreadWorker]] = {}
        self.pools = pools  # filled in place here only, before any reader exists
        for tier in tiers:
            pools[tier] = []
            for _ in range(min(io_workers, limit(tier))):
                pools[tier].append(self._make_worker(tier))
        self._publish(pools)

    def _make_worker(self, pool: Any) -> ThreadWorker:
        index = self._next_index
        self._next_index += 1
        number = self._per_tier.get(pool, 0)
        self._per_tier[pool] = number + 1
        local = len(self.pools.get(pool, ()))
        return IOWorker(
            self, index, 0, None, local, name=f"io_{str(pool).lower()}_{number}", pool=pool
        )

    def _publish(self, pools: dict[Any, list[ThreadWorker]]) -> None:
        self.pools = pools
        self.workers = [w for members in pools.values() for w in members]
        self.by_core = {0: self.workers}  # unpinned: every I/O worker counts as "core 0"

    def on_worker_start(self, worker: ThreadWorker) -> None:
        worker.cpu_clock = thread_cpu_clock()
        self.host.on_worker_thread(worker)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[%s] Started for storage tier %s (not pinned)", worker.name, worker.pool)

    def candidates(self, spec: Any) -> list[ThreadWorker]:
        """The workers a token of ``spec`` may go to: its tier's pool."""
        return self.pools[spec.storage_speed]

    def pool_limits(self, pool: Any) -> tuple[int, int]:
        limit = self._limit(pool)
        return min(self._baseline, limit), limit
