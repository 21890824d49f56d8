"""ThreadLane: core-pinned worker threads, each with its own mailbox.

The hand-off is a ``collections.deque`` (append and popleft are atomic) with no lock held across
it. A worker drains its mailbox without waiting; only when it finds it empty does it announce
``sleeping`` and block on its private wake lock, and a producer releases that lock only if the
worker said it sleeps. So a busy worker costs the producer one ``append`` and one attribute read
per token. The order (announce, re-check, block / append, check, wake) makes a lost wake-up
impossible; a spare wake-up is harmless.

Mailbox bounds are enforced by the router (``load() < mailbox_max``), not here, so internal
re-admissions (retries, released dependents) can never block a worker. The body of a token runs
through ``LaneHost.execute``, the same code a waiting worker uses to run a token inline.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from .._topology import pin_current_thread
from ._base import LaneHost

__all__ = ["ThreadLane", "ThreadWorker"]

logger = logging.getLogger("tokengate.worker")


class ThreadWorker:
    """One worker thread, its mailbox and its core."""

    kind = "thread"

    def __init__(
        self,
        lane: ThreadLane,
        index: int,
        core: int,
        cpu: int | None,
        local_index: int,
    ) -> None:
        self.lane = lane
        self.index = index
        self.core = core
        self.cpu = cpu
        self.local_index = local_index
        self.name = f"worker_{index}_core_{core}"
        self.mailbox: deque[Any] = deque()
        self.current: Any = None
        self.sleeping = False
        self.stopping = False
        self.completed = 0
        self._wake = _thread.allocate_lock()
        self._wake.acquire()
        self.thread = threading.Thread(
            target=self._loop, name=f"tokengate-{self.name}", daemon=True
        )

    def load(self) -> int:
        """Tokens waiting plus the one running: what the router balances on."""
        return len(self.mailbox) + (self.current is not None)

    def push(self, token: Any) -> None:
        self.mailbox.append(token)
        if self.sleeping:
            self.wake()

    def wake(self) -> None:
        self.sleeping = False
        # RuntimeError: already released by another producer; the worker will see that one.
        with contextlib.suppress(RuntimeError):
            self._wake.release()

    def stop(self) -> None:
        self.stopping = True
        self.wake()

    def _loop(self) -> None:
        lane = self.lane
        lane.on_worker_start(self)
        mailbox = self.mailbox
        pop = mailbox.popleft
        host = lane.host
        claim = host.claim
        execute = host.execute
        after = host.after_token
        try:
            while True:
                try:
                    token = pop()
                except IndexError:
                    if self.stopping:
                        break
                    self.sleeping = True
                    if mailbox or self.stopping:
                        self.sleeping = False
                        continue
                    self._wake.acquire()
                    continue
                try:
                    if claim(token):
                        execute(token, self)
                except BaseException as exc:  # a bug of ours, not the task's: keep the worker
                    lane.internal_error(token, self, exc)
                self.completed += 1
                after(self)
        finally:
            lane.on_worker_exit(self)


class ThreadLane:
    """``workers_per_core`` :class:`ThreadWorker` per core, started and stopped together.

    The lane owns threads and mailboxes; what a token's run means is the host's (the coordinator).
    """

    name = "thread"

    def __init__(
        self, cores: Mapping[int, int | None], workers_per_core: int, host: LaneHost
    ) -> None:
        self.host = host
        self.workers: list[ThreadWorker] = []
        self.by_core: dict[int, list[ThreadWorker]] = {}
        for core, cpu in cores.items():
            self.by_core[core] = []
            for local in range(workers_per_core):
                worker = ThreadWorker(self, len(self.workers), core, cpu, local)
                self.workers.append(worker)
                self.by_core[core].append(worker)
        self._started = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        for worker in self.workers:
            worker.thread.start()

    def on_worker_start(self, worker: ThreadWorker) -> None:
        if worker.cpu is not None:
            pin_current_thread([worker.cpu])
        self.host.on_worker_thread(worker)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "[%s] Started on Core %d (local %d)", worker.name, worker.core, worker.local_index
            )

    def internal_error(self, token: Any, worker: ThreadWorker, exc: BaseException) -> None:
        """An error escaped the run machinery itself: log it loudly and fail the token, so
        neither the token nor the rest of the mailbox is ever stranded."""
        logger.critical(
            "[%s] internal error while handling %r; the token is failed and the worker goes on",
            worker.name,
            token,
            exc_info=exc,
        )
        worker.current = None
        self.host.fail_internal(token, exc)

    def on_worker_exit(self, worker: ThreadWorker) -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info("[%s] Stopped", worker.name)

    def queued(self) -> list[Any]:
        """Every token sitting in a mailbox (a copy)."""
        out: list[Any] = []
        for worker in self.workers:
            out.extend(list(worker.mailbox))
        return out

    def stop(self, timeout: float | None = None) -> list[ThreadWorker]:
        """Stop every worker after its mailbox; returns the workers still running at timeout."""
        for worker in self.workers:
            worker.stop()
        stuck = []
        current = threading.current_thread()
        for worker in self.workers:
            if worker.thread is current or not worker.thread.is_alive():
                continue
            worker.thread.join(timeout)
            if worker.thread.is_alive():
                stuck.append(worker)
        return stuck
