"""The process lane: one warm worker process per core, so CPU-heavy pure-Python work scales.

Under the GIL, threads give CPU-bound Python code no parallelism. This lane runs such tokens in
worker processes while keeping the thread lane's model: every worker has a bounded mailbox (a
``deque``) served by a parent-side *proxy thread*, so routing, backpressure, the TokenGate
Quick-Proof's core-worker mapping and routing logs are the same for both lanes. ::

    router ──push──> ProcessWorker.mailbox ──> proxy thread ──task pipe──> worker process
                                                  ▲                           (pinned to its core,
       host.complete <── decode <── result pipe ──┘   + pidfd (exit)           runs the raw body)

* **Start.** ``start()`` starts the proxy threads only. A proxy launches its worker when the
  slot is first needed (its first token, or ``wait_ready()``) as a fresh interpreter
  (``python -c`` through ``subprocess``: fork+exec in C, safe from a threaded parent, never the
  ``fork`` start method) and waits for its ready message before taking tokens. The worker
  never imports the user's ``__main__`` (see :mod:`._child`).
* **One call at a time.** The proxy claims a token, sends its call (pickled at submit time,
  ``_wire.ProcessCall``; once sent, the call no longer counts against the coordinator's
  ``ByteBudget`` of queued bytes) and blocks in ``poll`` on the result pipe *and* the process's
  pidfd together, with the task's ``timeout`` as the limit: no polling loop, no GIL held while
  waiting.
* **Crash.** If the process exits mid-task (segfault, ``os._exit``, SIGKILL, the OOM killer),
  the proxy reaps it, starts a replacement at once and completes the token with
  :class:`WorkerCrashed` naming token, operation, worker, core, pid, exit code or signal and the
  likely cause; the retry policy retries it against ``crash_retries``. Only that token is
  affected: the other workers and every queued token carry on.
* **Failed start.** A worker process that dies, hangs or cannot be launched while starting is
  started again after a cool-down that doubles with each failure in a row (none after the first,
  then 0.1 s, 0.2 s, ... up to 10 s; :func:`restart_delay`), each failure logged at WARNING. The
  slot is never given up while the lane runs, and its queued tokens wait for it (an idle sibling
  allowed to run them is woken to take them meanwhile). A *setup* failure (the worker says it
  cannot import tokengate, exits with an error code while starting, or the interpreter is
  missing or not executable) repeated
  ``BOOT_ATTEMPTS`` times moves the slot to ``BROKEN``: retrying will not fix the environment, so
  tokens that reach it go to a live sibling or fail at once with :class:`WorkerCrashed` and the
  worker's own message, instead of waiting for ever. The retries go on regardless, and the first
  start that succeeds makes it ``READY``.
* **Timeout.** A process can be killed: at the limit the proxy kills and replaces the worker and
  completes the token with a (retryable) :class:`TaskTimeout`.
* **Out of step.** An error in the proxy between sending a call and reading its whole reply (in
  the wait or the read) leaves that reply in the pipe, where it would be taken for the next
  call's. The worker is retired (killed and replaced, as after a crash) and only that token
  pays: retried against ``crash_retries``, or failed with :class:`WorkerCrashed`.
* **Stop.** Closing the task pipe ends a worker; one still running a task when ``stop()`` gives
  up is killed. Workers also die with the parent (``PR_SET_PDEATHSIG`` / a lifeline pipe), so
  no process outlives it.

The package has one module per part: :mod:`._rules` (which tokens come here), :mod:`._handle`
(one running worker process as the parent holds it), :mod:`._state` (a slot's states and the
table of moves between them), :mod:`._slot` (the proxy thread that runs a slot), :mod:`._lane`
(the slots together) and :mod:`._child` (the worker process's own loop).
"""

from ._handle import WorkerSetup, describe_exit
from ._lane import ProcessLane
from ._rules import check_process_lane_option, process_lane_supported, runs_in_process
from ._slot import ProcessWorker, restart_delay
from ._state import SlotState

__all__ = [
    "ProcessLane",
    "ProcessWorker",
    "SlotState",
    "WorkerSetup",
    "check_process_lane_option",
    "describe_exit",
    "process_lane_supported",
    "restart_delay",
    "runs_in_process",
]
