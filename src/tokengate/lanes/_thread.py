"""ThreadLane: core-pinned worker threads, each with its own mailbox.

The hand-off is a ``collections.deque`` (append and popleft are atomic) with no lock held across
it. A worker drains its mailbox without waiting; only when it finds it empty does it announce
``sleeping`` and block on its private wake lock, and a producer releases that lock only if the
worker said it sleeps. So a busy worker costs the producer one ``append`` and one attribute read
per token. The order (announce, re-check, block / append, check, wake) makes a lost wake-up
impossible; a spare wake-up is harmless. Before it sleeps, an idle worker takes the oldest token
of the busiest sibling in its pool (``ThreadLane.steal``).

Mailbox bounds are enforced by the router (``load() < mailbox_max``), not here, so internal
re-admissions (retries, released dependents) can never block a worker. The body of a token runs
through ``LaneHost.run``, the same code a waiting worker uses to run a token inline.

Resizing (the convergence engine): workers are grouped in *pools* (here one per core; the I/O
lane keys them by storage tier). ``add_worker`` starts one more; ``retire_worker`` removes one
from the pool at once (the router stops choosing it once its cached routes are invalidated) and
hands the tokens queued in its mailbox to its pool siblings; the worker finishes its current
token, hands back anything that arrived meanwhile, and exits. The lists are replaced, never
mutated, so readers need no lock. A push that races with the exit finds ``sleeping`` set and
calls ``wake``, which on a closed worker hands the token back instead: no token can be
stranded, and ``push`` stays two operations.

A thread cannot be killed, so a worker stuck in a task past its ``timeout`` is *replaced*
(:meth:`ThreadLane.replace`: an ``add_worker`` plus a ``retire_worker``): a fresh thread in the
same pool takes over its queue, and the stuck thread exits when its task returns. Without it,
every token queued behind a hung task
waited for the hang to end, however long, while the other workers sat idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Mapping
from typing import Any

from .._topology import pin_current_thread
from ._base import LaneHost, MailboxWorker

__all__ = ["ThreadLane", "ThreadWorker", "thread_cpu_clock"]

logger = logging.getLogger("tokengate.worker")
#: Threads of workers added together that the caller, and then each new thread, starts
#: (``ThreadLane.add_workers``): a tree that starts k threads in about log2(k) start-ups.
FAN_OUT = 2


def thread_cpu_clock() -> int | None:
    """The CPU-time clock id of the calling thread, for others to read later; None where the
    platform has none. Taken by the thread itself while it is alive: a clock id is a plain
    number, so reading it after the thread ended fails with ``OSError``, nothing worse. The
    convergence engine reads it to see how much of a task's wall time is spent on a CPU."""
    getclock = getattr(time, "pthread_getcpuclockid", None)
    if getclock is None:
        return None
    try:
        clock: int = getclock(threading.get_ident())
        time.clock_gettime(clock)
    except (OSError, OverflowError, ValueError):
        return None
    return clock


class ThreadWorker(MailboxWorker):
    """One worker thread, its mailbox and its core."""

    def __init__(
        self,
        lane: ThreadLane,
        index: int,
        core: int,
        cpu: int | None,
        local_index: int,
        *,
        name: str | None = None,
        pool: Hashable = None,
    ) -> None:
        self.lane = lane
        self.kind = lane.kind
        self.index = index
        self.core = core
        self.cpu = cpu
        self.local_index = local_index
        super().__init__(name or f"worker_{index}_core_{core}")
        # Resizing (convergence engine): the pool this worker belongs to, whether it was asked
        # to retire, and its thread's CPU clock (Linux/BSD); ``closed``: it has exited for good.
        self.pool: Hashable = core if pool is None else pool
        self.retiring = False
        self.cpu_clock: int | None = None
        # Workers added together whose threads are not started yet: this one starts some of
        # them before serving tokens (``ThreadLane.add_workers``).
        self.pending: deque[ThreadWorker] | None = None

    def push(self, token: Any) -> None:
        self.mailbox.append(token)
        if self.sleeping:
            self.wake()

    def wake(self) -> None:
        if self.closed:  # retired: a push raced with the exit, pass its token on
            self.lane.hand_back(self)
            return
        super().wake()

    def stop(self) -> None:
        self.stopping = True
        self.wake()

    def _loop(self) -> None:
        lane = self.lane
        pending, self.pending = self.pending, None
        if pending:
            lane.start_pending(pending)
        lane.on_worker_start(self)
        mailbox = self.mailbox
        pop = mailbox.popleft
        host = lane.host
        run = host.run
        after = host.after_token
        gate = host.gate  # after_token only matters while a producer waits for room
        steal = lane.steal
        try:
            while True:
                # Test before popping: a pop that raises IndexError costs ten times a test,
                # and an idle worker that steals finds its own mailbox empty for every token.
                # The test can race with a thief taking the last token, hence the except.
                token = None
                if mailbox:
                    try:
                        token = pop()
                    except IndexError:
                        token = None
                if token is None:
                    if self.stopping or self.retiring:
                        break
                    token = steal(self)  # idle, so help a backed-up sibling
                    if token is None:
                        self.sleeping = True
                        if mailbox or self.stopping or self.retiring:
                            self.sleeping = False
                            continue
                        self._wake.acquire()
                        continue
                try:
                    run(token, self)
                except BaseException as exc:  # a bug of ours, not the task's: keep the worker
                    lane.internal_error(token, self, exc)
                self.completed += 1
                if gate.unwoken:
                    after(self)
                if self.retiring:
                    break
        finally:
            if self.retiring:
                lane.on_worker_retired(self)
            lane.on_worker_exit(self)


class ThreadLane:
    """``workers_per_core`` :class:`ThreadWorker` per core, started and stopped together.

    The lane owns threads and mailboxes; what a token's run means is the host's (the coordinator).
    ``max_workers_per_core`` is how far the convergence engine may grow a core's pool.
    """

    name = "thread"
    kind = "thread"

    def __init__(
        self,
        cores: Mapping[int, int | None],
        workers_per_core: int,
        host: LaneHost,
        *,
        max_workers_per_core: int | None = None,
    ) -> None:
        self.host = host
        self.workers: list[ThreadWorker] = []
        self.by_core: dict[int, list[ThreadWorker]] = {}
        self.pools: dict[Any, list[ThreadWorker]] = self.by_core
        self._cpus: dict[Any, int | None] = dict(cores)
        self._baseline = workers_per_core
        self._maximum = max(workers_per_core, max_workers_per_core or workers_per_core)
        self._next_index = 0
        self._retiring: set[ThreadWorker] = set()
        self._running = False
        self._lock = threading.Lock()
        for core in cores:
            self.by_core[core] = []
            for _ in range(workers_per_core):
                worker = self._make_worker(core)
                self.workers.append(worker)
                self.by_core[core].append(worker)

    def _make_worker(self, pool: Any) -> ThreadWorker:
        """A new (unstarted) worker for ``pool``; subclasses name and place theirs."""
        index = self._next_index
        self._next_index += 1
        local = len(self.pools.get(pool, ()))
        return ThreadWorker(self, index, pool, self._cpus[pool], local)

    def start(self) -> None:
        with self._lock:
            self._running = True
            workers = list(self.workers)
        for worker in workers:
            worker.thread.start()

    def on_worker_start(self, worker: ThreadWorker) -> None:
        if worker.cpu is not None:
            pin_current_thread([worker.cpu])
        worker.cpu_clock = thread_cpu_clock()
        self.host.on_worker_thread(worker)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
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
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[%s] Stopped", worker.name)

    def queued(self) -> list[Any]:
        """Every token sitting in a mailbox (a copy), retiring workers' included."""
        out: list[Any] = []
        with self._lock:
            workers = [*self.workers, *self._retiring]
        for worker in workers:
            out.extend(list(worker.mailbox))
        return out

    def replace(self, worker: ThreadWorker) -> ThreadWorker | None:
        """Replace ``worker``, stuck in a task, by a fresh thread in the same pool.

        The fresh worker joins the pool and the stuck one retires: its queued tokens go to the
        pool at once, and its thread exits when the task returns. Returns the fresh worker, or
        None if ``worker`` is no longer one of this lane's. The caller invalidates routes.
        """
        if worker.retiring or worker not in self.pools.get(worker.pool, ()):
            return None
        fresh = self.add_worker(worker.pool)
        self.retire_worker(worker)
        return fresh

    def stop(self, timeout: float | None = None) -> list[ThreadWorker]:
        """Stop every worker after its mailbox; returns the workers still running at timeout."""
        with self._lock:
            self._running = False
            workers = [*self.workers, *self._retiring]
        for worker in self.workers:
            worker.stop()
        stuck = []
        current = threading.current_thread()
        for worker in workers:
            if worker.thread is current or not worker.thread.is_alive():
                continue
            worker.thread.join(timeout)
            if worker.thread.is_alive():
                stuck.append(worker)
        return stuck

    # -- resizing (the convergence engine) ------------------------------------------------------
    def pool_limits(self, pool: Any) -> tuple[int, int]:
        """(baseline, maximum) worker count of ``pool``."""
        return self._baseline, self._maximum

    def add_worker(self, pool: Any) -> ThreadWorker:
        """Start one more worker in ``pool``; the caller invalidates cached routes."""
        with self._lock:
            worker = self._make_worker(pool)
            pools = dict(self.pools)
            pools[pool] = [*pools.get(pool, ()), worker]
            self._publish(pools)
            if self._running:
                worker.thread.start()
        return worker

    def add_workers(self, pool: Any, count: int) -> list[ThreadWorker]:
        """Start ``count`` more workers in ``pool`` at once; the caller invalidates routes.

        ``Thread.start`` waits until the new thread has been scheduled: a millisecond or more
        each on a loaded machine, with the GIL to win too, so starting 46 threads one after
        another took a surge's whole duration. Here every new worker joins the pool at once and
        the starts fan out as a tree: the caller starts :data:`FAN_OUT` of them, and each new
        thread starts as many pending ones before it serves tokens, so k threads are running
        after about log2(k) start-ups and the first ones serve from the first start-up on (had
        each started pending ones until none were left, none would serve before the last had
        started). A token routed to a worker whose thread is not running yet waits in its
        mailbox, as it would behind a busy one.
        """
        added: list[ThreadWorker] = []
        with self._lock:
            for _ in range(count):
                worker = self._make_worker(pool)
                pools = dict(self.pools)
                pools[pool] = [*pools.get(pool, ()), worker]
                self._publish(pools)
                added.append(worker)
            running = self._running
        if running and added:
            self.start_pending(deque(added))
        return added

    def start_pending(self, pending: deque[ThreadWorker]) -> None:
        """Start the threads of up to :data:`FAN_OUT` of the ``pending`` workers; each one
        started starts more from its own thread (``ThreadWorker._loop``) until none are left.
        A thread that cannot be started does not count, so failures cannot strand the rest."""
        started = 0
        while started < FAN_OUT:
            try:
                worker = pending.popleft()
            except IndexError:
                return
            worker.pending = pending
            try:
                worker.thread.start()
                started += 1
            except RuntimeError as exc:  # out of threads: the pool stays as large as it got
                logger.warning("[%s] could not start its thread (%s); not added", worker.name, exc)
                self.retire_worker(worker)  # its queued tokens go to the siblings
                with self._lock:
                    self._retiring.discard(worker)
                worker.closed = True  # a push that raced with this is handed back too
                worker.sleeping = True
                self.hand_back(worker)

    def retire_worker(self, worker: ThreadWorker) -> bool:
        """Take ``worker`` out of its pool: it finishes its current token, hands back the rest
        of its mailbox and exits. False if it is not (or no longer) in a pool, or is the last."""
        with self._lock:
            members = self.pools.get(worker.pool, [])
            if worker not in members or len(members) <= 1:
                return False
            pools = dict(self.pools)
            pools[worker.pool] = [w for w in members if w is not worker]
            self._publish(pools)
            self._retiring.add(worker)
            worker.retiring = True
        self.hand_back(worker)  # queued tokens go to siblings now, not after the current one
        worker.wake()
        return True

    def _publish(self, pools: dict[Any, list[ThreadWorker]]) -> None:
        """Replace the worker lists (call with the lock held): readers see old or new, whole."""
        self.pools = pools
        self.by_core = pools
        self.workers = [w for members in pools.values() for w in members]

    def steal(self, thief: ThreadWorker) -> Any:
        """The oldest token queued on the busiest sibling of idle ``thief``, or None; the
        older half of the rest of that sibling's queue moves to the front of ``thief``'s.

        Tokens are routed to a mailbox when they are submitted, so without this a worker added
        during a surge would only see new arrivals while its siblings' queues stayed long, and a
        long task would hold up the tokens queued behind it while siblings idle. Only an idle
        worker steals (never the hot path), only within its pool (same core, or same tier), and
        from the front of the queue, so the order tokens start in stays first come, first served
        (the stolen half goes *before* anything routed to the thief meanwhile). Taking half, not
        one, matters under the GIL: the worker holding it runs many short tokens in a row, and
        one steal per token cost more than the token. A token anchored to its worker by a
        locality key is never taken: the steal stops at it.
        """
        victim = None
        most = 0
        for worker in self.pools.get(thief.pool, ()):
            queued = len(worker.mailbox)
            if queued > most and worker is not thief:
                victim, most = worker, queued
        if victim is None:
            return None
        source = victim.mailbox
        try:
            first = source.popleft()
        except IndexError:  # its owner (or another thief) took it first
            return None
        if getattr(first, "_locality", None) is not None:  # anchored by a locality key
            source.appendleft(first)
            return None
        take = (most - 1) // 2
        if take:
            batch: list[Any] = []
            append = batch.append
            pop = source.popleft
            for _ in range(take):
                try:
                    token = pop()
                except IndexError:
                    break
                if getattr(token, "_locality", None) is not None:
                    source.appendleft(token)
                    break
                append(token)
            thief.mailbox.extendleft(reversed(batch))  # in their order, at the front
        return first

    def hand_back(self, worker: ThreadWorker) -> None:
        """Move the tokens queued on a retired ``worker`` to the least-loaded of its siblings."""
        mailbox = worker.mailbox
        while True:
            siblings = self.pools.get(worker.pool) or self.workers
            try:
                token = mailbox.popleft()
            except IndexError:
                return
            if token.done():
                continue
            min(siblings, key=lambda w: w.load()).push(token)

    def on_worker_retired(self, worker: ThreadWorker) -> None:
        """Called on the retiring worker's thread as it leaves its loop."""
        worker.closed = True  # before ``sleeping``: see the module docstring
        worker.sleeping = True
        self.hand_back(worker)
        with self._lock:
            self._retiring.discard(worker)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[%s] Retired", worker.name)
