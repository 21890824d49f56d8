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

A thread cannot be killed, so a worker stuck in a task past its ``timeout`` is *replaced*
(:meth:`ThreadLane.replace`): a fresh thread on the same core takes over its mailbox, and the
stuck thread exits when its task returns. Without it, every token queued behind a hung task
waited for the hang to end, however long, while the other workers sat idle.
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
        self.retired = False  # replaced while stuck: exit once the current task returns
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
                if claim(token):
                    execute(token, self)
                self.completed += 1
                after(self)
                if self.retired:
                    break
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
        self._retired: list[ThreadWorker] = []

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

    def on_worker_exit(self, worker: ThreadWorker) -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info("[%s] Stopped", worker.name)

    def queued(self) -> list[Any]:
        """Every token sitting in a mailbox (a copy)."""
        out: list[Any] = []
        for worker in self.workers:
            out.extend(list(worker.mailbox))
        return out

    def replace(self, worker: ThreadWorker) -> ThreadWorker | None:
        """Retire ``worker``, stuck in a task, for a fresh thread that takes over its mailbox.

        The fresh worker keeps the slot (index, core, name); the retired one forwards pushes
        from routes cached before the swap, and its thread exits when its task returns.
        Returns the fresh worker, or None if ``worker`` is no longer one of this lane's.
        """
        with self._lock:
            if worker.retired or worker not in self.workers:
                return None
            fresh = ThreadWorker(self, worker.index, worker.core, worker.cpu, worker.local_index)
            fresh.mailbox = worker.mailbox
            fresh.stopping = worker.stopping
            worker.retired = True
            worker.push = fresh.push  # type: ignore[method-assign]
            self.workers[self.workers.index(worker)] = fresh
            peers = self.by_core[worker.core]
            peers[peers.index(worker)] = fresh
            self._retired = [w for w in self._retired if w.thread.is_alive()]
            self._retired.append(worker)
        fresh.thread.start()
        return fresh

    def stop(self, timeout: float | None = None) -> list[ThreadWorker]:
        """Stop every worker after its mailbox; returns the workers still running at timeout."""
        with self._lock:  # not while replace() swaps one in
            for worker in self.workers:
                worker.stop()
            workers = self.workers + self._retired
        stuck = []
        current = threading.current_thread()
        for worker in workers:
            if worker.thread is current or not worker.thread.is_alive():
                continue
            worker.thread.join(timeout)
            if worker.thread.is_alive():
                stuck.append(worker)
        return stuck
