"""AsyncLane: ``async def`` tasks on the coordinator's own event loop.

One thread per coordinator runs an asyncio loop; it starts with the coordinator and stops with
it. The lane has one worker, :class:`AsyncWorker`, whose mailbox the router fills like any other
(so admission, backpressure, tier permits, deadlines and retries are the coordinator's, as for
sync tasks). A push wakes the loop only if no drain is already scheduled; the drain claims each
token and starts it as an asyncio task, at most ``concurrency`` at once; the rest wait in the
mailbox, whose bound the router enforces, so memory stays bounded however fast tasks arrive.

A run ends in ``LaneHost.complete``, called on the loop thread, the one completion path. A
``timeout`` tag really cancels the coroutine (``asyncio.timeout``) and fails the token with
``TaskTimeout``. Stopping cancels what is still running after the coordinator's drain and fails
it with an error that says so, then closes the loop.

A coroutine is only cancelled where it awaits. One that blocks past its timeout and then returns
fails with ``TaskTimeout`` all the same, its result dropped and logged. One that does not await
at all holds the loop: the :class:`~._watchdog.LoopWatchdog` names it, fails its token at its
timeout while the body runs on, and lets ``stop`` give up on the held loop instead of waiting
for it (its thread is a daemon, left running the task).

Inside an async task, await tokens (``await other(...)``): ``token.get()`` on the loop thread
would block every async task, so it raises instead (see ``OperationsCoordinator._help``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .._errors import TaskTimeout, TokenGateError
from ._base import LaneHost
from ._watchdog import LoopWatchdog

__all__ = ["AsyncLane", "AsyncWorker"]

logger = logging.getLogger("tokengate.async")

_perf = time.perf_counter


def _call_now(callback: Callable[..., None], *args: Any) -> None:
    callback(*args)


class _Run:
    """One run of a token on the loop: what the watchdog and stop() need to end it from
    another thread. ``taken`` is set (under the lane's lock) by whoever ends the run before its
    body does, so it is ended once."""

    __slots__ = ("deadline", "run_id", "taken", "token")

    def __init__(self, token: Any, run_id: int) -> None:
        self.token = token
        self.run_id = run_id
        self.deadline: float | None = None  # perf_counter() instant of the timeout, once begun
        self.taken = False


class AsyncWorker:
    """The event loop seen as a worker: a mailbox and a count of coroutines running."""

    kind = "async"

    def __init__(self, lane: AsyncLane, concurrency: int) -> None:
        self.lane = lane
        self.index = 0
        self.core = 0  # the loop thread is not pinned
        self.name = "event_loop"
        self.mailbox: deque[Any] = deque()
        self.current: Any = None  # the latest token started while any runs (router: "busy")
        self.running = 0
        self.completed = 0
        self.concurrency = concurrency
        self._scheduled = False

    def load(self) -> int:
        return len(self.mailbox) + self.running

    def push(self, token: Any) -> None:
        self.mailbox.append(token)
        if not self._scheduled:
            self._scheduled = True
            self.lane.call_soon(self._drain)

    # -- on the loop thread -----------------------------------------------------------------
    def _drain(self) -> None:
        # Reset before popping: a push after the last pop sees False and schedules a drain.
        self._scheduled = False
        lane = self.lane
        host = lane.host
        mailbox = self.mailbox
        while self.running < self.concurrency:
            try:
                token = mailbox.popleft()
            except IndexError:
                return
            try:
                if not host.claim(token):
                    self.completed += 1
                    host.after_token(self)
                    continue
                run = _Run(token, host.begin(token, self, arm_timeout=False))
                task = lane.loop.create_task(self._run(run))
            except BaseException as exc:  # a bug of ours, not the task's: keep the loop going
                lane.internal_error(token, exc)
                continue
            self.running += 1
            self.current = token
            lane.runs[task] = run
            task.add_done_callback(lane.forget)
            if self.running == 1:  # the first one running: the watchdog watches from now on
                lane.watchdog.wake()

    async def _run(self, run: _Run) -> None:
        token = run.token
        run_id = run.run_id
        value: Any = None
        error: BaseException | None = None
        timeout = token.spec.timeout
        try:
            if timeout is None:
                value = await token.fn(*token.args, **token.kwargs)
            else:
                run.deadline = _perf() + timeout
                scope = asyncio.timeout(timeout)
                try:
                    async with scope:
                        value = await token.fn(*token.args, **token.kwargs)
                except TimeoutError as exc:
                    if not scope.expired():
                        raise  # the task's own TimeoutError, not ours
                    # Really cancelled, so a retry cannot run the body twice at once.
                    error = TaskTimeout(
                        f"{token.operation_type!r} (token {token.id}) ran longer than its "
                        f"timeout of {timeout}s on the event loop and was cancelled",
                        retryable=True,
                    )
                    error.__cause__ = exc
                else:
                    if _perf() > run.deadline:
                        value, error = self._overran(run, value, None)
        except asyncio.CancelledError as exc:
            error = TokenGateError(
                f"{token.operation_type!r} (token {token.id}) was cancelled while running: the "
                f"coordinator stopped before it finished (raise stop()'s timeout to let it end)"
            )
            error.__cause__ = exc
        except BaseException as exc:
            error = exc
            if run.deadline is not None and _perf() > run.deadline:
                value, error = self._overran(run, None, exc)
        finally:
            self.running -= 1
            if self.current is token:
                self.current = None
        host = self.lane.host
        try:
            host.complete(token, run_id, None if error is not None else value, error)
        except BaseException as exc:  # a bug of ours: fail the token, never lose it
            self.lane.internal_error(token, exc)
        self.completed += 1
        host.after_token(self)
        if self.mailbox:
            self._drain()

    def _overran(
        self, run: _Run, value: Any, error: BaseException | None
    ) -> tuple[Any, BaseException | None]:
        """The body ended after its timeout without being cancelled (it blocked the loop past
        the deadline, so ``asyncio.timeout`` could not fire in time): its outcome is dropped,
        logged, and replaced by ``TaskTimeout``. If the watchdog failed the token already, the
        outcome goes to ``complete`` as it is, which drops and logs it as late."""
        if not self.lane.take(run):
            return value, error
        token = run.token
        timeout = token.spec.timeout
        logger.warning(
            "[event_loop] %r (token %s) ended after its timeout of %ss without awaiting in "
            "time to be cancelled; its %s is dropped and it fails with TaskTimeout",
            token.operation_type,
            token.id,
            timeout,
            "result" if error is None else f"error ({type(error).__name__})",
        )
        # The body has ended, so a retry cannot run it twice at once.
        timed_out = TaskTimeout(
            f"{token.operation_type!r} (token {token.id}) ran longer than its timeout of "
            f"{timeout}s: it held the event loop without awaiting, so it could not be cancelled "
            f"in time, and its late outcome was dropped",
            retryable=True,
        )
        timed_out.__cause__ = error
        return None, timed_out


class AsyncLane:
    """The coordinator's event loop thread and its one :class:`AsyncWorker`."""

    name = "async"
    kind = "async"

    def __init__(
        self,
        host: LaneHost,
        *,
        concurrency: int,
        stall_after: float = 1.0,
        defer: Callable[..., None] | None = None,
    ) -> None:
        self.host = host
        # Runs a callback and its arguments soon on a thread that may run user code (the
        # coordinator's timer thread); by default, at once on the calling thread.
        self._defer: Callable[..., None] = defer if defer is not None else _call_now
        self.worker = AsyncWorker(self, concurrency)
        self.workers: list[AsyncWorker] = [self.worker]
        self.by_core: dict[int, list[AsyncWorker]] = {}
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self.runs: dict[asyncio.Task[Any], _Run] = {}  # the tokens' tasks, on the loop thread
        self.watchdog = LoopWatchdog(self, stall_after)
        self._take_lock = threading.Lock()
        self._ready = threading.Event()
        # A daemon: a task that never awaits keeps this thread busy, and must not keep the
        # interpreter from exiting after stop() gave up on it.
        self._thread = threading.Thread(target=self._main, name="tokengate-event-loop", daemon=True)

    def forget(self, task: asyncio.Task[Any]) -> None:
        """A token's task ended (its done-callback, on the loop thread)."""
        self.runs.pop(task, None)

    def _running_runs(self) -> list[_Run]:
        """The runs not yet ended, read from any thread."""
        while True:
            try:
                return list(self.runs.values())
            except RuntimeError:  # changed size while copied (the loop thread is running)
                continue

    def take(self, run: _Run) -> bool:
        """Claim the right to end ``run`` before its body does; False if someone else has."""
        with self._take_lock:
            if run.taken:
                return False
            run.taken = True
            return True

    # -- the watchdog's side (on its thread) -------------------------------------------------
    def holder(self) -> tuple[asyncio.Task[Any] | None, _Run | None]:
        """The asyncio task running on the loop now, and its run if it is one of ours."""
        task = asyncio.current_task(self.loop)
        if task is None:
            return None, None
        return task, self.runs.get(task)

    def report_stall(self, task: asyncio.Task[Any] | None, run: _Run | None, held: float) -> None:
        """Log what holds the loop (once per holder and stall)."""
        if run is not None:
            token = run.token
            logger.warning(
                "[event_loop] %r (token %s) has held the event loop for %.2fs without awaiting; "
                "no other async task runs meanwhile and it cannot be cancelled (timeout: %s). "
                "Await in it, move the blocking call to asyncio.to_thread, or make it a plain "
                "def task",
                token.operation_type,
                token.id,
                held,
                "none" if token.spec.timeout is None else f"{token.spec.timeout}s",
            )
        else:
            logger.warning(
                "[event_loop] the event loop has not run for %.2fs; it is held by %s, not by a "
                "tokengate task",
                held,
                "a callback" if task is None else f"the asyncio task {task.get_name()!r}",
            )

    def time_out(self, run: _Run) -> None:
        """Fail ``run``'s token with TaskTimeout while its body still holds the loop.

        Called on the watchdog's thread: the completion, which runs user code (done-callbacks,
        middleware), is handed to the host's timer thread, so the watchdog never waits on it.
        """
        if not self.take(run):
            return
        token = run.token
        error = TaskTimeout(
            f"{token.operation_type!r} (token {token.id}) ran longer than its timeout of "
            f"{token.spec.timeout}s and still holds the event loop without awaiting: a coroutine "
            f"is only cancelled where it awaits, so it runs on and its late result will be "
            f"dropped",
            retryable=False,  # the body still runs: a retry would run it twice at once
        )
        self._defer(self._end, run, error)

    def _end(self, run: _Run, error: BaseException) -> None:
        try:
            # The body still runs: its storage permit stays held until it really returns (its
            # own, late completion releases it), so the tier limit holds.
            self.host.complete(run.token, run.run_id, None, error, release_permit=False)
        except BaseException as exc:  # a bug of ours: fail the token, never lose it
            self.internal_error(run.token, exc)

    def internal_error(self, token: Any, exc: BaseException) -> None:
        """An error escaped the run machinery itself: log it loudly and fail the token."""
        logger.critical(
            "[event_loop] internal error while handling %r; the token is failed and the loop "
            "goes on",
            token,
            exc_info=exc,
        )
        self.host.fail_internal(token, exc)

    def candidates(self, spec: Any) -> list[AsyncWorker]:
        return self.workers

    def call_soon(self, callback: Any) -> None:
        """Run ``callback`` on the loop thread (from any thread)."""
        with contextlib.suppress(RuntimeError):  # closed after stop: stop discards leftovers
            self.loop.call_soon_threadsafe(callback)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        self.host.on_worker_thread(self.worker)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Event loop started")
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in leftovers:
                    task.cancel()
                if leftovers:
                    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("Event loop stopped")

    async def _shutdown(self, timeout: float | None) -> None:
        # After the coordinator's drain only tasks that outlived stop()'s timeout are left.
        tasks = list(self.runs)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._discard_queued()

    def _discard_queued(self) -> None:
        mailbox = self.worker.mailbox
        while mailbox:
            try:
                token = mailbox.popleft()
            except IndexError:  # the loop thread took the last one meanwhile
                return
            token._discard("stopped")

    def queued(self) -> list[Any]:
        return list(self.worker.mailbox)

    def stop(self, timeout: float | None = None) -> list[AsyncWorker]:
        """Cancel what still runs, close the loop; returns ``[worker]`` if it would not stop.

        Waits at most ``timeout`` in all, and not at all for a loop the watchdog knows is held
        by a task that does not await: nothing on that loop can run, cancellation included.
        What is then left is ended from here: running tokens fail, queued ones are discarded,
        and the loop's daemon thread is left to run the task that holds it."""
        watchdog = self.watchdog
        if not self._thread.is_alive():
            watchdog.close()
            return []
        if self._thread is threading.current_thread():
            watchdog.close()
            self.loop.stop()
            return []
        end = None if timeout is None else time.monotonic() + timeout
        try:
            if watchdog.stalled:
                self.loop.call_soon_threadsafe(self.loop.stop)  # if it is ever let go
            else:
                done = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self.loop)
                with contextlib.suppress(Exception):
                    done.result(timeout)
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(None if end is None else max(0.0, end - time.monotonic()))
        except RuntimeError:  # the loop is already closed
            pass
        watchdog.close()
        if not self._thread.is_alive():
            return []
        self._abandon()
        return [self.worker]

    def _abandon(self) -> None:
        """The loop would not stop (held by a task that does not await): fail its running
        tokens and discard the queued ones from this thread, so every token ends."""
        task, holder = self.holder()
        if holder is not None:
            what = f"{holder.token.operation_type!r} (token {holder.token.id})"
        elif task is not None:
            what = f"the asyncio task {task.get_name()!r}"
        else:
            what = "a callback"
        for run in self._running_runs():
            if not self.take(run):
                continue
            token = run.token
            error = TokenGateError(
                f"{token.operation_type!r} (token {token.id}) was still running when the "
                f"coordinator stopped, on an event loop held by {what}, which does not await; "
                f"nothing on that loop can run, cancellation included, so the task is left "
                f"behind and a late result will be dropped"
            )
            self._end(run, error)
        self._discard_queued()
