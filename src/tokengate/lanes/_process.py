"""ProcessLane: one warm worker process per core, so CPU-heavy pure-Python work scales.

Under the GIL, threads give CPU-bound Python code no parallelism. This lane runs such tokens in
worker processes while keeping the thread lane's model: every worker has a bounded mailbox (a
``deque``) served by a parent-side *proxy thread*, so routing, backpressure, the seed's
core-worker mapping and routing logs are the same for both lanes. ::

    router ──push──> ProcessWorker.mailbox ──> proxy thread ──task pipe──> worker process
                                                  ▲                           (pinned to its core,
       host.complete <── decode <── result pipe ──┘   + pidfd (exit)           runs the raw body)

* **Start.** ``start()`` returns at once; each proxy thread launches its worker as a fresh
  interpreter (``python -c`` through ``subprocess``: fork+exec in C, safe from a threaded
  parent, never the ``fork`` start method) and waits for its ready message before taking
  tokens. The worker never imports the user's ``__main__`` (see ``_process_child.py``).
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
  ``_BOOT_ATTEMPTS`` times marks the slot ``broken``: retrying will not fix the environment, so
  tokens that reach it go to a live sibling or fail at once with :class:`WorkerCrashed` and the
  worker's own message, instead of waiting for ever. The retries go on regardless, and the first
  start that succeeds clears ``broken``.
* **Timeout.** A process can be killed: at the limit the proxy kills and replaces the worker and
  completes the token with a (retryable) :class:`TaskTimeout`.
* **Out of step.** An error in the proxy between sending a call and reading its whole reply (in
  the wait or the read) leaves that reply in the pipe, where it would be taken for the next
  call's. The worker is retired (killed and replaced, as after a crash) and only that token
  pays: retried against ``crash_retries``, or failed with :class:`WorkerCrashed`.
* **Stop.** Closing the task pipe ends a worker; one still running a task when ``stop()`` gives
  up is killed. Workers also die with the parent (``PR_SET_PDEATHSIG`` / a lifeline pipe), so
  no process outlives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .._byte_budget import ByteBudget
from .._errors import ConfigError, SerializationError, TaskTimeout, WorkerCrashed
from . import _wire
from ._base import LaneHost, MailboxWorker

if TYPE_CHECKING:
    from .._retry import RetryPolicy
    from .._spec import TaskSpec

__all__ = [
    "ProcessLane",
    "ProcessWorker",
    "describe_exit",
    "process_lane_supported",
    "restart_delay",
    "runs_in_process",
]

logger = logging.getLogger("tokengate.worker")
lane_log = logging.getLogger("tokengate.process")

_ENV = "TOKENGATE_PROCESS_WORKER"
_BOOT_ATTEMPTS = 3  # setup failures in a row before a slot fails its tokens (see "Failed start")
_RESTART_DELAY_BASE = 0.1  # seconds before the 2nd retry of a failing start; doubles each time
_RESTART_DELAY_CAP = 10.0  # the longest cool-down between two attempts to start a worker
_BOOT_TIMEOUT = 60.0  # seconds a worker may take to import and say it is ready
_STOP_GRACE = 2.0  # seconds an idle worker gets to exit after its task pipe closes
_perf = time.perf_counter
# How a worker notices its parent's death: the kernel's PR_SET_PDEATHSIG where there is one,
# else a lifeline pipe (module constants so that tests can take the portable path on Linux).
USE_PDEATHSIG = sys.platform == "linux"
USE_LIFELINE = not USE_PDEATHSIG

# The worker's first lines: take the parent's sys.path, then import the worker loop. Failing
# to import tokengate is reported through the result pipe so the parent can say why.
_BOOTSTRAP = """\
import os, sys, json
boot = json.loads(os.environ.pop("TOKENGATE_PROCESS_WORKER"))
sys.path[:] = boot["path"]
try:
    from tokengate.lanes._process_child import main
except BaseException:
    import struct, traceback
    message = b"B" + traceback.format_exc().encode()
    os.write(boot["results"], struct.pack("!Q", len(message)) + message)
    raise SystemExit(1)
main(boot)
"""


# -- the routing rule ------------------------------------------------------------------------------
def runs_in_process(spec: TaskSpec, *, gil: bool) -> bool:
    """Whether tokens of ``spec`` belong in the process lane (the rule in docs/guide/executors.md).

    ``executor='process'`` always; ``'thread'`` never; ``'auto'`` when the work is CPU-heavy
    (``weight='heavy'``), not storage-bound (no ``storage_speed``: I/O releases the GIL, so
    threads serve it without pickling) and the GIL is on (on a free-threaded build threads
    already run in parallel, with no pickling and shared memory).
    """
    if spec.executor == "process":
        return True
    if spec.executor == "thread" or spec.is_async:
        return False
    return gil and spec.weight == "heavy" and spec.storage_speed is None


def process_lane_supported() -> bool:
    """Worker processes need POSIX pipes passed to a child (``pass_fds``)."""
    return os.name == "posix"


def check_process_lane_option(value: bool | None) -> bool:
    """Resolve ``CoordinatorConfig.process_lane``: None means "where supported"."""
    if value is None:
        return process_lane_supported()
    if value and not process_lane_supported():
        raise ConfigError(
            f"process_lane=True, but worker processes are not supported on {sys.platform}; "
            f"use process_lane=None (automatic) or False"
        )
    return value


# -- how a worker died -----------------------------------------------------------------------------
_SIGNAL_CAUSES = {
    "SIGKILL": (
        "a SIGKILL is often the OS reclaiming memory (the out-of-memory killer: check `dmesg` "
        "or the container's memory limit), or someone killed the process"
    ),
    "SIGSEGV": "a segmentation fault: a crash in C code (an extension module, ctypes)",
    "SIGBUS": "a bus error: a crash in C code, or a memory-mapped file that shrank",
    "SIGABRT": "abort(): a fatal error in C code (a failed assertion, or out of memory in C)",
    "SIGTERM": "another process asked it to terminate (a supervisor, or `kill`)",
    "SIGFPE": "an arithmetic fault in C code",
    "SIGILL": "an illegal instruction: C code built for another CPU",
}


def describe_exit(code: int) -> tuple[str, str]:
    """How a worker process ended (``died with SIGKILL (signal 9)``) and its likely cause."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return (
            f"died with {name} (signal {-code})",
            _SIGNAL_CAUSES.get(name, "a fatal signal"),
        )
    if code == 70:
        return "exited with code 70", "it lost its parent (the lifeline closed)"
    return (
        f"exited with code {code}",
        "the task called os._exit() or sys.exit() outside Python's control, or the interpreter "
        "hit an unrecoverable error",
    )


def restart_delay(
    failures: int, *, base: float = _RESTART_DELAY_BASE, cap: float = _RESTART_DELAY_CAP
) -> float:
    """Seconds to wait before starting a worker again after ``failures`` failed starts in a row.

    The first retry is immediate (one unlucky kill costs nothing), then the wait doubles from
    ``base`` up to ``cap``: 0, 0.1, 0.2, 0.4, ... 6.4, 10, 10, ... A slot whose worker cannot
    start therefore costs one interpreter launch per ``cap`` seconds, and is never given up.
    """
    if failures <= 1:
        return 0.0
    return min(cap, base * 2.0 ** min(failures - 2, 64))


# -- one worker process, as seen from the parent ---------------------------------------------------
def _open_pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:  # an old kernel or a sandbox: the result pipe's EOF still says it died
        return None
    return fd


class _Child:
    """A running worker process: its pipes, its pidfd and one ``poll`` object over both."""

    __slots__ = (
        "lifeline",
        "pid",
        "pidfd",
        "poller",
        "proc",
        "reader",
        "ready",
        "results",
        "tasks",
    )

    def __init__(self, cpu: int | None) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        life_r: int | None = None
        life_w: int | None = None
        if USE_LIFELINE:  # the worker watches a pipe only this process holds the other end of
            life_r, life_w = os.pipe()
        boot = {
            "path": list(sys.path),
            "tasks": task_r,
            "results": result_w,
            "lifeline": life_r,
            "pdeathsig": USE_PDEATHSIG,
            "cpu": cpu,
            "ppid": os.getpid(),
        }
        env = dict(os.environ)
        env[_ENV] = json.dumps(boot)
        flags: list[str] = getattr(subprocess, "_args_from_interpreter_flags", list)()
        passed = [fd for fd in (task_r, result_w, life_r) if fd is not None]
        try:
            self.proc = subprocess.Popen(
                [_executable(), *flags, "-c", _BOOTSTRAP],
                stdin=subprocess.DEVNULL,
                pass_fds=passed,
                env=env,
                process_group=0,  # a terminal's Ctrl-C goes to the parent, which stops us
            )
        except BaseException:
            for fd in (task_r, task_w, result_r, result_w, life_r, life_w):
                if fd is not None:
                    os.close(fd)
            raise
        for fd in passed:
            os.close(fd)
        self.pid = self.proc.pid
        self.tasks = task_w
        self.results = result_r
        self.lifeline = life_w
        self.reader = _wire.Reader(result_r)
        self.ready = False
        self.pidfd = _open_pidfd(self.pid)
        self.poller = select.poll()
        self.poller.register(result_r, select.POLLIN)
        if self.pidfd is not None:
            self.poller.register(self.pidfd, select.POLLIN)

    def wait(self, timeout: float | None) -> str:
        """Block until a reply (``"reply"``), the process's end (``"exit"``) or ``"timeout"``."""
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        events = self.poller.poll(ms)
        if not events:
            return "timeout"
        for fd, _ in events:
            if fd == self.results:
                return "reply"  # data, or the EOF of a dead worker: recv() tells which
        return "exit"

    def kill(self) -> None:
        pidfd = self.pidfd  # read once: close() may run on the proxy thread meanwhile
        with contextlib.suppress(OSError):
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                self.proc.kill()

    def close_tasks(self) -> None:
        if self.tasks >= 0:
            with contextlib.suppress(OSError):
                os.close(self.tasks)
            self.tasks = -1

    def reap(self, timeout: float | None = None) -> int:
        """Wait for the process to end (killing it after ``timeout``); its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def close(self) -> None:
        """Close this process's descriptors, once: a number closed twice may by then belong
        to another file (a fork can run ``close`` again in the child, see ``ProcessLane``)."""
        self.close_tasks()
        pidfd, self.pidfd = self.pidfd, None
        results, self.results = self.results, -1
        lifeline, self.lifeline = self.lifeline, None
        for fd in (results, pidfd, lifeline):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _executable() -> str:
    """The interpreter for worker processes (honours ``multiprocessing.set_executable``, which
    can only have been called if ``multiprocessing`` is imported)."""
    spawn = sys.modules.get("multiprocessing.spawn")
    if spawn is None:
        return sys.executable
    return os.fsdecode(spawn.get_executable())


class ProcessWorker(MailboxWorker):
    """One worker process behind a proxy thread with its own mailbox, on one core."""

    kind = "process"

    def __init__(self, lane: ProcessLane, index: int, core: int, cpu: int | None) -> None:
        self.lane = lane
        self.index = index
        self.core = core
        self.cpu = cpu
        super().__init__(f"process_{index}_core_{core}")
        self.restarts = 0
        self.pid: int | None = None
        self.broken: str | None = None  # why tokens sent here fail now (a setup failure)
        self.ready = threading.Event()  # set while a worker process is ready (or broken)
        self.restarting = True  # no worker process ready to take a task (starting, or lost)
        self.failed_starts = 0  # attempts in a row that gave no usable worker (the back-off)
        self._next_start = 0.0  # time.monotonic() before which no new start is attempted
        self._child: _Child | None = None
        self._aborting = False

    # -- the Worker protocol -----------------------------------------------------------------
    def push(self, token: Any) -> None:
        self.mailbox.append(token)
        if self.sleeping:
            self.wake()
        if self.restarting:  # nothing here can run it yet: an idle sibling may take it
            self.lane.wake_idle(self)
        if self.closed:  # pushed after the proxy ended (a late retry): never leave it stuck
            self._discard_left()

    # -- control from other threads ------------------------------------------------------------
    def request_stop(self) -> None:
        self.stopping = True
        self.wake()
        child = self._child
        if child is not None and not child.ready:
            child.kill()  # still starting: nothing to lose

    def abort(self) -> None:
        """Kill the worker process even though it runs a task (``stop()`` gave up waiting)."""
        self._aborting = True
        child = self._child
        if child is not None:
            child.kill()

    # -- the proxy thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        host = self.lane.host
        host.on_worker_thread(self)
        claim = host.claim
        after = host.after_token
        mailbox = self.mailbox
        pop = mailbox.popleft
        try:
            self._spawn()
            while True:
                child = self._child
                if (child is None or not child.ready) and not self._await_ready() and self.stopping:
                    break  # else ready, or broken with tokens waiting: handed over or failed
                try:
                    token = pop()
                except IndexError:
                    if self.stopping:
                        break
                    if self.restarting:
                        continue  # no sleeping here: _await_ready's cool-down is the wait
                    token = self._steal()
                    if token is None:
                        self.sleeping = True
                        if mailbox or self.stopping:
                            self.sleeping = False
                            continue
                        self._wake.acquire()
                        continue
                if self.broken is not None and self._hand_over(token):
                    after(self)
                    continue
                if claim(token):
                    self._run(token)
                self.completed += 1
                after(self)
        except BaseException:  # pragma: no cover - a bug here must not strand tokens silently
            logger.exception("[%s] proxy thread failed; its worker process is stopped", self.name)
            raise
        finally:
            self._shutdown()

    def _steal(self) -> Any:
        """Take the oldest token waiting behind a busy sibling, if this core may run it.

        Routing balances mailboxes when a token is submitted; tasks of uneven length, or a core
        slowed by other processes, can still leave one worker idle while a sibling has a
        queue. An idle worker therefore takes from the longest sibling queue before it sleeps
        (each ``popleft`` is atomic, and claiming a token is too).
        """
        if self.broken or self._child is None or not self._child.ready:
            return None  # a worker that cannot run it would only bounce it
        lane = self.lane
        allowed = lane.allowed
        for victim in sorted(lane.workers, key=lambda w: len(w.mailbox), reverse=True):
            if victim is self:
                continue
            if not victim.mailbox:
                return None  # sorted: no sibling further on has a queue either
            try:
                token = victim.mailbox.popleft()
            except IndexError:
                continue
            if allowed is None or self.core in allowed[token.spec.weight]:
                lane.host.count_event("process_steals")
                return token
            victim.mailbox.appendleft(token)  # not for this core: back where it was
        return None

    def _spawn(self) -> None:
        self.restarting = True
        if self.broken is None:
            self.ready.clear()
        try:
            self._child = _Child(self.cpu)
        except OSError as exc:
            self._child = None
            self.pid = None
            self._start_failed(
                f"its worker process could not be launched ({type(exc).__name__}: {exc})",
                setup=isinstance(exc, (FileNotFoundError, PermissionError)),
            )
            return
        self.pid = self._child.pid

    def _await_ready(self, *, holding: bool = False) -> bool:
        """Start the worker process if need be and wait until it is ready (True).

        Never gives up while the lane runs: a failed start is retried after its cool-down
        (:func:`restart_delay`). False when ``stop()`` was asked for, or when the slot is broken
        and a token waits for it: one in the mailbox, or the one the caller ``holding`` claimed.
        """
        while not self._stop_requested():
            if self.broken is not None and (holding or self.mailbox):
                return False
            left = self._next_start - time.monotonic()
            if left > 0:
                self._cool_down(left)
                continue
            child = self._child
            if child is None:
                self._spawn()  # a launch that fails is recorded, with its cool-down
                continue
            why, setup = self._handshake(child)
            if why is None:
                return True
            self._discard_child(child)
            if self._stop_requested():  # stop() kills a starting worker: not a failure
                break
            self._start_failed(f"its worker process {why}", setup=setup)
        return False

    def _cool_down(self, seconds: float) -> None:
        """Wait before the next start. ``stop()`` ends the wait, and so does a token pushed to a
        broken slot (it is handed over or failed at once)."""
        self.sleeping = self.broken is not None
        if self.stopping or (self.sleeping and self.mailbox):
            self.sleeping = False
            return
        self._wake.acquire(timeout=seconds)  # False at the timeout; True if woken (re-locked)
        self.sleeping = False

    def _start_failed(self, why: str, *, setup: bool) -> None:
        """Record an attempt that gave no usable worker: count it, log it, set the cool-down."""
        self.failed_starts += 1
        failures = self.failed_starts
        delay = restart_delay(failures, base=_RESTART_DELAY_BASE, cap=_RESTART_DELAY_CAP)
        self.lane.host.count_event("process_start_failures")
        declared = False
        if setup and failures >= _BOOT_ATTEMPTS:
            declared = self.broken is None
            self.broken = (
                f"worker process for {self.name} (core {self.core}) failed to start "
                f"{failures} times in a row; last: {why}"
            )
            self.ready.set()
        elif not setup and self.broken is not None:  # a failure that may pass: tokens wait
            self.broken = None
            self.ready.clear()
        if declared:
            lane_log.error(
                "[%s] %s. Retrying will not fix this: until a start succeeds, tokens sent here "
                "go to a live sibling or fail at once (next attempt in %.2fs)",
                self.name,
                self.broken,
                delay,
            )
        else:
            lane_log.warning(
                "[%s] %s (%d failed start(s) in a row); next attempt in %.2fs",
                self.name,
                why,
                failures,
                delay,
            )
        self.lane.wake_idle(self)  # tokens queued here may go to an idle sibling meanwhile
        self._next_start = time.monotonic() + delay  # last: set means all of the above is done

    def _hand_over(self, token: Any) -> bool:
        """Give a token this broken slot cannot run to a live sibling; False if there is none."""
        sibling = self.lane.live_worker(token, exclude=self)
        if sibling is None:
            return False
        self.lane.host.count_event("process_handovers")
        sibling.push(token)
        return True

    def _stop_requested(self) -> bool:
        return self.stopping  # a method, so checkers do not assume other threads never set it

    def _handshake(self, child: _Child) -> tuple[str | None, bool]:
        """Wait for the worker's ready message: (None, _) when ready, else (why it failed,
        whether that is a setup failure, which retrying alone will not fix)."""
        what = child.wait(_BOOT_TIMEOUT)
        if what == "reply":
            try:
                data = child.reader.recv()
            except EOFError:
                what = "exit"
            else:
                if data[0] == _wire.READY:
                    child.ready = True
                    self.broken = None
                    self.restarting = False
                    self.ready.set()
                    if logger.isEnabledFor(logging.DEBUG):
                        logger.debug(
                            "[%s] Started on Core %d (pid %d)", self.name, self.core, child.pid
                        )
                    return None, False
                text = bytes(data[1:]).decode("utf-8", "replace")
                return f"could not import tokengate:\n{text}", True
        if what == "timeout":
            return f"was not ready after {_BOOT_TIMEOUT:.0f}s", False
        code = child.reap(_STOP_GRACE)
        what_happened, cause = describe_exit(code)
        return f"{what_happened} while starting ({cause})", code >= 0  # a signal may not recur

    def _discard_child(self, child: _Child) -> None:
        child.kill()
        child.reap()
        child.close()
        if self._child is child:
            self._child = None
            self.pid = None

    def _replace(self, child: _Child, event: str, *, respawn: bool = True) -> int:
        """Reap a dead (or killed) worker process and start its replacement (at once, unless
        ``respawn`` is False: then ``_await_ready`` starts it after its cool-down)."""
        code = child.reap()
        child.close()
        self._child = None
        self.pid = None
        self.restarting = True
        if self._aborting:  # killed by stop(): not replaced, not a restart
            return code
        self.restarts += 1
        host = self.lane.host
        host.count_event("process_restarts")
        host.count_event(event)
        if not self.stopping:
            self.lane.wake_idle(self)  # tokens queued here may go to an idle sibling meanwhile
            if respawn:
                self._spawn()
        return code

    def _run(self, token: Any) -> None:
        host = self.lane.host
        run_id = host.begin(token, self, arm_timeout=False)
        self.current = token
        try:
            value, exc = self._call(token)
        except BaseException as error:  # pragma: no cover - a bug must still end the token
            value, exc = None, error
        self.current = None
        host.complete(token, run_id, value, exc)
        if token.done():  # no more runs: let the pickled call go (and its charge, if unsent)
            call = token._payload
            if call is not None:
                token._payload = None
                self.lane.budget.release(call)

    def _call(self, token: Any) -> tuple[Any, BaseException | None]:
        call: _wire.ProcessCall | None = token._payload
        if call is None:  # not routed through _submit (should not happen): pickle it now
            call = token._payload = _wire.ProcessCall(None, _wire.dumps(token.fn), None)
        if call.args is None:  # its arguments held tokens, resolved since the submit
            try:
                call.args = _wire.dumps_arguments(call.task or token.fn, token.args, token.kwargs)
            except SerializationError as exc:
                return None, exc
        what = _operation(token)
        # Send; a worker that died while idle is replaced and the call sent again (it never saw
        # it, so this costs the token nothing). Deaths before a task is taken count as failed
        # starts: a worker killed each time it comes up is retried with a growing cool-down.
        waited = False
        while True:
            child = self._child
            if child is None or not child.ready:
                if not self._await_ready(holding=True):
                    return None, self._broken_error(token)
                waited = True
                continue
            message = call.message()
            try:
                _wire.send(child.tasks, message)
            except OSError:
                pid = child.pid
                what_happened, cause = describe_exit(
                    self._replace(child, "process_idle_deaths", respawn=False)
                )
                if not self.stopping and not self._aborting:
                    self._start_failed(
                        f"its worker process (pid {pid}) {what_happened} while idle ({cause})",
                        setup=False,
                    )
                continue
            except BaseException as error:  # part of the call may be in the pipe: out of step
                return None, self._retire(token, child, error, "sending its call")
            self.lane.budget.release(call)  # handed to the worker: no longer queued
            if self.failed_starts:
                self.failed_starts = 0  # it took a task: the slot is healthy again
            if waited:  # its run (and its timeout) starts now, not before the restart
                token.started_at = _perf()
            break
        # Wait for the reply, the process's end or the task's timeout, whichever comes first.
        timeout = token.spec.timeout
        left = None if timeout is None else token.started_at + timeout - _perf()
        # Anything raised from here until the whole reply is read leaves the reply (or the rest
        # of it) in the pipe, where it would be read as the answer to the next call.
        try:
            event = child.wait(left) if left is None or left > 0 else "timeout"
            data = child.reader.recv() if event == "reply" else None
        except EOFError:  # the pipe closed: the process died (mid-reply, perhaps)
            return None, self._crashed(token, child)
        except BaseException as error:
            return None, self._retire(token, child, error, "waiting for its reply")
        if data is not None:
            return self._decode(data, what)
        if event == "timeout":
            child.kill()
            return None, self._timed_out(token, child)
        return None, self._crashed(token, child)

    def _decode(self, data: memoryview, what: str) -> tuple[Any, BaseException | None]:
        status = data[0]
        try:
            if status == _wire.VALUE:
                return pickle.loads(data[1:]), None
            return None, _wire.decode_failure(status, data[1:], what)
        except Exception as exc:
            error = SerializationError(
                f"the result of {what} came back from the worker process but could not be "
                f"unpickled here ({type(exc).__name__}: {exc}); its module or class may not be "
                f"importable in this process"
            )
            error.__cause__ = exc
            return None, error

    def _crashed(self, token: Any, child: _Child) -> BaseException:
        pid = child.pid
        code = self._replace(child, "process_crashes")
        what_happened, cause = describe_exit(code)
        if self._aborting:
            return self._aborted(token, pid)
        message = (
            f"worker process {self.name} (pid {pid}, core {self.core}) {what_happened} while "
            f"running token {token.id} ({token.operation_type!r}); {cause}. The worker was "
            f"replaced; {self.lane.retry_note(token)}"
        )
        logger.warning("[%s] %s", self.name, message)
        return self._worker_crashed(message, code, pid)

    def _worker_crashed(self, message: str, exitcode: int | None, pid: int | None) -> WorkerCrashed:
        """A :class:`WorkerCrashed` naming this worker, its process and how it ended."""
        exc = WorkerCrashed(message)
        exc.exitcode = exitcode  # type: ignore[attr-defined]
        exc.pid = pid  # type: ignore[attr-defined]
        exc.worker = self.name  # type: ignore[attr-defined]
        exc.core = self.core  # type: ignore[attr-defined]
        return exc

    def _retire(
        self, token: Any, child: _Child, error: BaseException, during: str
    ) -> BaseException:
        """The proxy failed between sending ``token``'s call and reading its whole reply (an
        error in the wait or the read, say). The worker's pipe can no longer be trusted: its
        reply may still come and be taken for the next call's. So the worker is killed and
        replaced, as after a crash, and only this token pays: it is retried against
        ``crash_retries`` or fails with :class:`WorkerCrashed`, ``error`` as its cause.
        Call it from the ``except`` block that caught ``error`` (the log shows its traceback).
        """
        pid = child.pid
        child.kill()
        self._replace(child, "process_retired")
        if self._aborting:
            return self._aborted(token, pid)
        message = (
            f"lost track of worker process {self.name} (pid {pid}, core {self.core}) while "
            f"running token {token.id} ({token.operation_type!r}): {during} raised "
            f"{type(error).__name__}: {error}. Its pipe could no longer be trusted, so the worker "
            f"was killed and replaced; {self.lane.retry_note(token)}"
        )
        logger.exception("[%s] %s", self.name, message)
        exc = self._worker_crashed(message, None, pid)
        exc.__cause__ = error
        return exc

    def _timed_out(self, token: Any, child: _Child) -> BaseException:
        pid = child.pid
        self._replace(child, "process_timeouts")
        if self._aborting:
            return self._aborted(token, pid)
        message = (
            f"{token.operation_type!r} (token {token.id}) ran longer than its timeout of "
            f"{token.spec.timeout}s on worker process {self.name} (pid {pid}, core "
            f"{self.core}); the process was killed and replaced"
        )
        logger.warning("[%s] %s", self.name, message)
        return TaskTimeout(message)

    def _aborted(self, token: Any, pid: int) -> BaseException:
        return TaskTimeout(
            f"{token.operation_type!r} (token {token.id}) was still running on worker process "
            f"{self.name} (pid {pid}, core {self.core}) when stop() stopped waiting; the "
            f"process was killed",
            retryable=False,
        )

    def _broken_error(self, token: Any) -> BaseException:
        why = self.broken or f"the lane stopped before {self.name} had a worker process ready"
        return WorkerCrashed(f"token {token.id} ({token.operation_type!r}) could not run: {why}")

    def _shutdown(self) -> None:
        child = self._child
        self._child = None
        if child is not None:
            child.close_tasks()  # EOF: an idle worker leaves its loop and exits
            code = child.reap(_STOP_GRACE)
            child.close()
            if code not in (0, -signal.SIGKILL) and lane_log.isEnabledFor(logging.DEBUG):
                lane_log.debug("[%s] worker process exited with %s", self.name, code)
        self.pid = None
        self.closed = True
        self._discard_left()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[%s] Stopped", self.name)

    def _discard_left(self) -> None:
        while True:
            try:
                token = self.mailbox.popleft()
            except IndexError:
                return
            token._discard("stopped")


def _operation(token: Any) -> str:
    return f"{token.operation_type!r} (token {token.id})"


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
    ) -> None:
        self.host = host
        self.policies = policies
        # The bytes of queued calls: released here once a call is sent (see _byte_budget.py).
        self.budget = budget if budget is not None else ByteBudget(None, host.gate)
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
        """Start every proxy thread; each starts its worker process (not waited for here)."""
        if lane_log.isEnabledFor(logging.DEBUG):
            lane_log.debug(
                "[PROCESS_LANE] Starting %d worker processes (one per core, pinned)",
                len(self.workers),
            )
        for worker in self.workers:
            worker.thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every worker process is ready to take tasks; False at ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        for worker in self.workers:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not worker.ready.wait(left):
                return False
        return not any(w.broken for w in self.workers)

    def wake_idle(self, exclude: ProcessWorker) -> None:
        """Wake the sleeping workers, so that they take the tokens queued at ``exclude`` (which
        has no worker process ready) instead of leaving them to wait for its restart."""
        for worker in self.workers:
            if worker is not exclude and worker.sleeping:
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
            worker.thread.join(_STOP_GRACE + 1.0)
            if worker.thread.is_alive():  # pragma: no cover - a proxy wedged outside a wait
                stuck.append(worker)
        if lane_log.isEnabledFor(logging.DEBUG):
            lane_log.debug("[PROCESS_LANE] All worker processes stopped")
        return stuck
