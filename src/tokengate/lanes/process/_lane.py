"""The process lane: one :class:`ProcessWorker` slot per core, started and stopped together,
and the lane-wide choices its slots ask for (a live sibling, an idle one to wake, the retry
note of a crash)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..._errors import WorkerCrashed
from .._base import LaneHost
from ._handle import WorkerSetup
from ._slot import STOP_GRACE, ProcessWorker
from ._state import SlotState

if TYPE_CHECKING:
    from ..._byte_budget import ByteBudget
    from ..._retry import RetryPolicy

__all__ = ["ProcessLane"]

lane_log = logging.getLogger("tokengate.process")
_UNSTARTED = SlotState.UNSTARTED


class ProcessLane:
    """One :class:`ProcessWorker` per core, started and stopped together."""

    name = "process"

    def __init__(
        self,
        cores: Mapping[int, int | None],
        host: LaneHost,
        policies: Mapping[str, RetryPolicy],
        allowed: Callable[[str], Iterable[int]] | None = None,
        budget: ByteBudget | None = None,
        setup: WorkerSetup | None = None,
    ) -> None:
        self.host = host
        self.setup = setup or WorkerSetup()  # how each worker process starts
        self.policies = policies
        # The bytes of queued calls: released here once a call is sent (see _byte_budget.py).
        if budget is None:  # imported here: a worker process imports this package, not this
            from ..._byte_budget import ByteBudget

            budget = ByteBudget(None, host.gate)
        self.budget = budget
        # Cores each weight may run on, for stealing (None: any worker may take any token).
        self.allowed: dict[str, frozenset[int]] | None = (
            None if allowed is None else {w: frozenset(allowed(w)) for w in policies}
        )
        self.workers: list[ProcessWorker] = []
        self.by_core: dict[int, list[ProcessWorker]] = {}
        for core, cpu in cores.items():
            worker = ProcessWorker(self, len(self.workers), core, cpu)
            self.workers.append(worker)
            self.by_core[core] = [worker]

    def forget_after_fork(self) -> None:
        """In a child forked from the process running this lane: close the child's copies of
        the worker processes' pipes. Held there, they would keep a worker's task pipe open
        after the parent closes its end (the worker never sees the EOF that ends it at stop(),
        so the parent's stop() waits and kills it) and its lifeline open after the parent
        dies. Takes no lock: only the forking thread exists in the child."""
        for worker in self.workers:
            child = worker._child
            if child is not None:
                child.close()

    def start(self) -> None:
        """Start every proxy thread. Each starts its worker process when it is first needed
        (its first token, or :meth:`wait_ready`): an interpreter starting takes a core for a
        fraction of a second, which a program that runs no process-lane task should not pay,
        nor the work it runs on threads meanwhile."""
        if lane_log.isEnabledFor(logging.DEBUG):
            lane_log.debug(
                "[PROCESS_LANE] %d worker slots (one per core, pinned); each starts its worker "
                "process on first use",
                len(self.workers),
            )
        for worker in self.workers:
            worker.thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Start every worker process not started yet and wait until each is ready to take
        tasks; False at ``timeout``."""
        for worker in self.workers:
            worker.request_start()
        end = None if timeout is None else time.monotonic() + timeout
        for worker in self.workers:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not worker.ready.wait(left):
                return False
        return not any(w.broken for w in self.workers)

    def wake_idle(self, exclude: ProcessWorker) -> None:
        """Wake the sleeping workers, so that they take the tokens queued at ``exclude`` (which
        has no worker process ready) instead of leaving them to wait for its restart. A slot
        that has not started its worker process could not take them: it sleeps on."""
        for worker in self.workers:
            if worker is not exclude and worker.sleeping and worker.state is not _UNSTARTED:
                worker.wake()

    def live_worker(self, token: Any, *, exclude: ProcessWorker) -> ProcessWorker | None:
        """The least-loaded worker other than ``exclude`` whose process is ready and whose core
        may run ``token``; None if there is none."""
        allowed = None if self.allowed is None else self.allowed[token.spec.weight]
        best: ProcessWorker | None = None
        for worker in self.workers:
            if worker is exclude or worker.restarting or worker.closed or worker.stopping:
                continue
            if allowed is not None and worker.core not in allowed:
                continue
            if best is None or worker.load() < best.load():
                best = worker
        return best

    def pids(self) -> list[int]:
        """The pids of the worker processes running now, in worker order."""
        return [pid for pid in (w.pid for w in self.workers) if pid is not None]

    def queued(self) -> list[Any]:
        out: list[Any] = []
        for worker in self.workers:
            out.extend(list(worker.mailbox))
        return out

    def retry_note(self, token: Any) -> str:
        """Whether a crash of ``token``'s run will be retried, for the error message."""
        spec = token.spec
        policy = self.policies[spec.weight]
        probe = WorkerCrashed("probe")
        budget = policy.budget(probe, spec.retries)
        used = token.attempts - 1
        if (
            policy.is_retryable(probe, retry_on=spec.retry_on, dont_retry_on=spec.dont_retry_on)
            and used < budget
        ):
            return f"attempt {token.attempts} of {budget + 1}, so it will be retried"
        return f"attempt {token.attempts} of {budget + 1} (crash_retries={budget}): not retried"

    def stop(self, timeout: float | None = None) -> list[ProcessWorker]:
        """Stop every worker process; one still running a task at ``timeout`` is killed.

        Returns the workers whose proxy thread is still alive after that (none, normally).
        """
        for worker in self.workers:
            worker.request_stop()
        end = None if timeout is None else time.monotonic() + timeout
        current = threading.current_thread()
        busy = []
        for worker in self.workers:
            if worker.thread is current or not worker.thread.is_alive():
                continue
            worker.thread.join(None if end is None else max(0.0, end - time.monotonic()))
            if worker.thread.is_alive():
                busy.append(worker)
        for worker in busy:
            lane_log.warning(
                "[%s] still running %r when stop() stopped waiting; killing its worker process",
                worker.name,
                worker.current,
            )
            worker.abort()
        stuck = []
        for worker in busy:
            worker.thread.join(STOP_GRACE + 1.0)
            if worker.thread.is_alive():  # pragma: no cover - a proxy wedged outside a wait
                stuck.append(worker)
        if lane_log.isEnabledFor(logging.DEBUG):
            lane_log.debug("[PROCESS_LANE] All worker processes stopped")
        return stuck
