"""One process worker slot: a core's worker process as the parent runs it, behind a proxy
thread with its own mailbox.

The proxy thread launches the worker (:mod:`._handle`), waits for its ready message, then takes
one token at a time: it sends the call, blocks in ``poll`` on the result pipe and the pidfd
together (the task's ``timeout`` as the limit), and completes the token. What the slot is doing
is one :class:`~._state.SlotState`, changed only through the table in :mod:`._state`; the lane
overview in :mod:`tokengate.lanes.process` says what happens on a crash, a failed start, a
timeout, an out-of-step pipe and a stop.

``RESTART_DELAY_BASE`` and ``RESTART_DELAY_CAP`` are read at each failed start, so tests may
shorten the cool-down.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import signal
import time
from typing import TYPE_CHECKING, Any

from ..._errors import SerializationError, TaskTimeout, WorkerCrashed
from .. import _segments, _sharing, _wire
from .._base import MailboxWorker
from . import _handle
from ._child import INITIALIZER_FAILED
from ._handle import ChildProcess, describe_exit
from ._state import SlotState, SlotStateMachine

if TYPE_CHECKING:
    from ._lane import ProcessLane

__all__ = ["ProcessWorker", "restart_delay"]

logger = logging.getLogger("tokengate.worker")
lane_log = logging.getLogger("tokengate.process")

BOOT_ATTEMPTS = 3  # setup failures in a row before a slot fails its tokens (BROKEN)
RESTART_DELAY_BASE = 0.1  # seconds before the 2nd retry of a failing start; doubles each time
RESTART_DELAY_CAP = 10.0  # the longest cool-down between two attempts to start a worker
BOOT_TIMEOUT = 60.0  # seconds a worker may take to import and say it is ready
STOP_GRACE = 2.0  # seconds an idle worker gets to exit after its task pipe closes
_perf = time.perf_counter
_READY = SlotState.READY
_BROKEN = SlotState.BROKEN


def restart_delay(
    failures: int, *, base: float = RESTART_DELAY_BASE, cap: float = RESTART_DELAY_CAP
) -> float:
    """Seconds to wait before starting a worker again after ``failures`` failed starts in a row.

    The first retry is immediate (one unlucky kill costs nothing), then the wait doubles from
    ``base`` up to ``cap``: 0, 0.1, 0.2, 0.4, ... 6.4, 10, 10, ... A slot whose worker cannot
    start therefore costs one interpreter launch per ``cap`` seconds, and is never given up.
    """
    if failures <= 1:
        return 0.0
    return min(cap, base * 2.0 ** min(failures - 2, 64))


class _Killed(Exception):
    """Marks a run ended by the operator's ``kill`` (never raised to the user)."""

    reason = "killed by operator"


class ProcessWorker(MailboxWorker):
    """One process worker slot: a worker process behind a proxy thread with its own mailbox,
    on one core. Its state is :attr:`state` (see :mod:`._state`); ``stopping`` and
    ``aborting`` are the requests other threads make of it."""

    kind = "process"

    def __init__(self, lane: ProcessLane, index: int, core: int, cpu: int | None) -> None:
        self.lane = lane
        self.index = index
        self.core = core
        self.cpu = cpu
        super().__init__(f"process_{index}_core_{core}")
        self.restarts = 0
        self.last_crash: str | None = None  # why the latest worker process was lost, if one was
        self.pid: int | None = None
        self.machine = SlotStateMachine(self.name)  # UNSTARTED: the first token starts it
        self.ready = self.machine.ready  # set while a worker process is ready (or broken)
        self.aborting = False  # stop() gave up waiting: kill the worker, replace nothing
        self.failed_starts = 0  # attempts in a row that gave no usable worker (the back-off)
        self._broken_why = ""  # while BROKEN: why tokens sent here fail
        self._next_start = 0.0  # time.monotonic() before which no new start is attempted
        self._child: ChildProcess | None = None
        self._killed: Any = None  # the token whose worker process the operator killed
        self._sweep = False  # a shared object was forgotten: tell the worker, if it maps it
        self._start_requested = False  # wait_ready(): start the worker process before a token

    @property
    def state(self) -> SlotState:
        """Where this slot is in the life of its worker process."""
        return self.machine.state

    @property
    def broken(self) -> str | None:
        """Why tokens sent here fail now (a repeated setup failure), or None."""
        return self._broken_why if self.machine.state is _BROKEN else None

    @property
    def restarting(self) -> bool:
        """No worker process is ready to take a task (not started yet, starting, cooling down,
        broken, lost)."""
        return self.machine.state is not _READY

    def cool_down_left(self) -> float:
        """Seconds before the next attempt to start a worker process (0 when none is due)."""
        return max(0.0, self._next_start - time.monotonic())

    def retry_now(self) -> None:
        """End a cool-down early, as its timer would: the next start is attempted at once.
        For tests, and for an operator who fixed the cause of failing starts."""
        self._next_start = 0.0
        self.wake()

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
    def shared_forgotten(self) -> None:
        """A shared object was forgotten (``_sharing.watch``): the proxy thread tells its worker
        to let go of the mappings of every forgotten object it keeps, before its next call."""
        self._sweep = True
        self.wake()

    def request_start(self) -> None:
        """Start the worker process now if it has not started yet (``wait_ready()``); it
        otherwise starts with the slot's first token."""
        self._start_requested = True
        self.wake()

    def request_stop(self) -> None:
        self.stopping = True
        self.wake()
        child = self._child
        if child is not None and self.machine.state is not _READY:
            child.kill()  # still starting: nothing to lose

    def abort(self) -> None:
        """Kill the worker process even though it runs a task (``stop()`` gave up waiting)."""
        self.aborting = True
        child = self._child
        if child is not None:
            child.kill()

    def kill_current(self, token: Any) -> bool:
        """Kill the worker process running ``token`` (``coordinator.kill``): the proxy replaces
        it and ends the token discarded. False if ``token`` is not what this slot runs."""
        child = self._child
        if self.current is not token or child is None:
            return False
        self._killed = token
        if self.current is not token:  # it ended meanwhile: leave the worker alone
            self._killed = None
            return False
        child.kill()
        return True

    # -- the proxy thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        host = self.lane.host
        host.on_worker_thread(self)
        claim = host.claim
        after = host.after_token
        mailbox = self.mailbox
        pop = mailbox.popleft
        try:
            if not self._await_first_use():
                return  # stopped before anything needed a worker process
            self._spawn()
            while True:
                if self._sweep:
                    self._forget_shared()
                if self.machine.state is not _READY and not self._await_ready() and self.stopping:
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
                        if mailbox or self.stopping or self._sweep:
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

    def _await_first_use(self) -> bool:
        """Sleep until the slot is needed: a token in its mailbox, or ``wait_ready()`` asking
        for its worker process (True: now STARTING); False if ``stop()`` came first. A token a
        ready sibling steals meanwhile starts nothing here."""
        mailbox = self.mailbox
        while not self._stop_requested():
            if mailbox or self._start_requested:
                self.machine.move(SlotState.STARTING)
                return True
            self.sleeping = True
            if mailbox or self._start_requested or self._stop_requested():
                self.sleeping = False
                continue
            self._wake.acquire()
        return False

    def _forget_shared(self) -> None:
        """Tell the worker to let go of its mappings of the shared objects forgotten here (it
        keeps a shared object's mapping for the next calls until told; nothing is awaited)."""
        self._sweep = False
        child = self._child
        if child is None or not child.kept:
            return
        gone = [key for key in child.kept if not _sharing.alive(key)]
        if not gone:
            return
        child.kept.difference_update(gone)
        # A worker that died meanwhile took its mappings with it; the next call finds it dead.
        with contextlib.suppress(OSError):
            _wire.send(child.tasks, _wire.forget_message(gone))

    def _steal(self) -> Any:
        """Take the oldest token waiting behind a busy sibling, if this core may run it.

        Routing balances mailboxes when a token is submitted; tasks of uneven length, or a core
        slowed by other processes, can still leave one worker idle while a sibling has a
        queue. An idle worker therefore takes from the longest sibling queue before it sleeps
        (each ``popleft`` is atomic, and claiming a token is too).
        """
        if self.machine.state is not _READY:
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
            if token._locality is None and (
                allowed is None or self.core in allowed[token.spec.weight]
            ):
                lane.host.count_event("process_steals")
                return token
            # Not for this core, or anchored to its worker by a locality key: back where it was.
            victim.mailbox.appendleft(token)
        return None

    def _spawn(self) -> None:
        if self.machine.state is SlotState.COOLING_DOWN:
            self.machine.move(SlotState.STARTING)
        try:
            self._child = _handle.ChildProcess(self.cpu, self.lane.setup)
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
        delay = restart_delay(failures, base=RESTART_DELAY_BASE, cap=RESTART_DELAY_CAP)
        self.lane.host.count_event("process_start_failures")
        machine = self.machine
        declared = False
        if setup and failures >= BOOT_ATTEMPTS:
            self._broken_why = (
                f"worker process for {self.name} (core {self.core}) failed to start "
                f"{failures} times in a row; last: {why}"
            )
            declared = machine.state is not _BROKEN
            if declared:
                machine.move(_BROKEN)
        else:  # a failure that may pass (or not yet repeated): tokens wait for the slot
            machine.move(SlotState.COOLING_DOWN)
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

    def _handshake(self, child: ChildProcess) -> tuple[str | None, bool]:
        """Wait for the worker's ready message: (None, _) when ready, else (why it failed,
        whether that is a setup failure, which retrying alone will not fix)."""
        what = child.wait(BOOT_TIMEOUT)
        if what == "reply":
            try:
                data = child.reader.recv()
            except EOFError:
                what = "exit"
            else:
                if data[0] == _wire.READY:
                    self.machine.move(_READY)
                    if logger.isEnabledFor(logging.DEBUG):
                        logger.debug(
                            "[%s] Started on Core %d (pid %d)", self.name, self.core, child.pid
                        )
                    return None, False
                text = bytes(data[1:]).decode("utf-8", "replace")
                if text.startswith(INITIALIZER_FAILED):
                    return text, True
                return f"could not import tokengate:\n{text}", True
        if what == "timeout":
            return f"was not ready after {BOOT_TIMEOUT:.0f}s", False
        code = child.reap(STOP_GRACE)
        what_happened, cause = describe_exit(code)
        return f"{what_happened} while starting ({cause})", code >= 0  # a signal may not recur

    def _discard_child(self, child: ChildProcess) -> None:
        child.kill()
        child.reap()
        child.close()
        if self._child is child:
            self._child = None
            self.pid = None

    def _replace(self, child: ChildProcess, event: str, *, respawn: bool = True) -> int:
        """Reap a dead (or killed) worker process and start its replacement (at once, unless
        ``respawn`` is False: then ``_await_ready`` starts it after its cool-down)."""
        code = child.reap()
        child.close()
        self._child = None
        self.pid = None
        self.machine.move(SlotState.STARTING)
        if self.aborting:  # killed by stop(): not replaced, not a restart
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
        if self._killed is token and isinstance(exc, _Killed):
            self._killed = None
            token._discard(_Killed.reason, running=True)
            return
        self._killed = None
        if exc is None:  # a result ends the token: the call goes before its waiters wake
            self._let_call_go(token)
        host.complete(token, run_id, value, exc)
        if exc is not None and token.done():  # not retried: no more runs need the call
            self._let_call_go(token)

    def _let_call_go(self, token: Any) -> None:
        """Drop the token's pickled call (and its charge, if unsent): a shared object it
        carried is freed once its own handle is gone, not whenever this thread next runs."""
        call = token._payload
        if call is not None:
            token._payload = None
            self.lane.budget.release(call)
            call.close()

    def _call(self, token: Any) -> tuple[Any, BaseException | None]:
        call: _wire.ProcessCall | None = token._payload
        if call is None:  # not routed through _submit (should not happen): pickle it now
            call = token._payload = _wire.ProcessCall(None, _wire.dumps(token.fn), None)
        if call.args is None:  # its arguments held tokens, resolved since the submit
            try:
                call.set_arguments(call.task or token.fn, token.args, token.kwargs)
            except SerializationError as exc:
                return None, exc
        what = _operation(token)
        # Send; a worker that died while idle is replaced and the call sent again (it never saw
        # it, so this costs the token nothing). Deaths before a task is taken count as failed
        # starts: a worker killed each time it comes up is retried with a growing cool-down.
        waited = False
        while True:
            child = self._child
            if child is None or self.machine.state is not _READY:
                if not self._await_ready(holding=True):
                    return None, self._broken_error(token)
                waited = True
                continue
            message = call.message()
            call.released = False  # until this run's worker says otherwise
            try:
                if call.parts:  # their descriptors first: the worker takes them with the call
                    _segments.send_fds(child.channel, call.fds())
                _wire.send(child.tasks, message)
            except OSError:
                pid = child.pid
                what_happened, cause = describe_exit(
                    self._replace(child, "process_idle_deaths", respawn=False)
                )
                if not self.stopping and not self.aborting:
                    self._start_failed(
                        f"its worker process (pid {pid}) {what_happened} while idle ({cause})",
                        setup=False,
                    )
                continue
            except BaseException as error:  # part of the call may be in the pipe: out of step
                return None, self._retire(token, child, error, "sending its call")
            self.lane.budget.release(call)  # handed to the worker: no longer queued
            keys = call.shared_keys()
            if keys:  # the worker keeps these mapped: it must hear when they are forgotten
                child.kept.update(keys)
                _sharing.watch(self)
                if not all(_sharing.alive(key) for key in keys):
                    self._sweep = True  # forgotten while the call waited: let go after it
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
            if data and data[0] == _wire.RELEASED:
                call.released = True
                data = data[1:]
            return self._decode(data, what, child)
        if event == "timeout":
            child.kill()
            return None, self._timed_out(token, child)
        return None, self._crashed(token, child)

    def _decode(
        self, data: memoryview, what: str, child: ChildProcess
    ) -> tuple[Any, BaseException | None]:
        status = data[0]
        try:
            if status == _wire.VALUE:
                return pickle.loads(data[1:]), None
            if status == _wire.SHARED_VALUE:
                return _wire.decode_shared_value(data[1:], child.channel), None
            return None, _wire.decode_failure(status, data[1:], what)
        except Exception as exc:
            error = SerializationError(
                f"the result of {what} came back from the worker process but could not be "
                f"unpickled here ({type(exc).__name__}: {exc}); its module or class may not be "
                f"importable in this process"
            )
            error.__cause__ = exc
            return None, error

    def _crashed(self, token: Any, child: ChildProcess) -> BaseException:
        pid = child.pid
        if self._killed is token:  # the operator's kill(): not a crash of the task
            self._replace(child, "process_killed")
            return _Killed()
        code = self._replace(child, "process_crashes")
        what_happened, cause = describe_exit(code)
        if self.aborting:
            return self._aborted(token, pid)
        message = (
            f"worker process {self.name} (pid {pid}, core {self.core}) {what_happened} while "
            f"running token {token.id} ({token.operation_type!r}); {cause}. The worker was "
            f"replaced; {self.lane.retry_note(token)}"
        )
        logger.warning("[%s] %s", self.name, message)
        self.last_crash = f"{what_happened} ({cause})"
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
        self, token: Any, child: ChildProcess, error: BaseException, during: str
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
        if self.aborting:
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

    def _timed_out(self, token: Any, child: ChildProcess) -> BaseException:
        pid = child.pid
        self._replace(child, "process_timeouts")
        if self.aborting:
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
            code = child.reap(STOP_GRACE)
            child.close()
            if code not in (0, -signal.SIGKILL) and lane_log.isEnabledFor(logging.DEBUG):
                lane_log.debug("[%s] worker process exited with %s", self.name, code)
        self.pid = None
        self.machine.move(SlotState.STOPPED)
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
