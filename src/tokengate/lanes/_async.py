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

Inside an async task, await tokens (``await other(...)``): ``token.get()`` on the loop thread
would block every async task, so it raises instead (see ``OperationsCoordinator._help``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from typing import Any

from .._errors import TaskTimeout, TokenGateError
from ._base import LaneHost

__all__ = ["AsyncLane", "AsyncWorker"]

logger = logging.getLogger("tokengate.async")


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
                run_id = host.begin(token, self, arm_timeout=False)
                task = lane.loop.create_task(self._run(token, run_id))
            except BaseException as exc:  # a bug of ours, not the task's: keep the loop going
                lane.internal_error(token, exc)
                continue
            self.running += 1
            self.current = token
            lane.tasks.add(task)
            task.add_done_callback(lane.tasks.discard)

    async def _run(self, token: Any, run_id: int) -> None:
        value: Any = None
        error: BaseException | None = None
        timeout = token.spec.timeout
        try:
            if timeout is None:
                value = await token.fn(*token.args, **token.kwargs)
            else:
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
        except asyncio.CancelledError as exc:
            error = TokenGateError(
                f"{token.operation_type!r} (token {token.id}) was cancelled while running: the "
                f"coordinator stopped before it finished (raise stop()'s timeout to let it end)"
            )
            error.__cause__ = exc
        except BaseException as exc:
            error = exc
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


class AsyncLane:
    """The coordinator's event loop thread and its one :class:`AsyncWorker`."""

    name = "async"
    kind = "async"

    def __init__(self, host: LaneHost, *, concurrency: int) -> None:
        self.host = host
        self.worker = AsyncWorker(self, concurrency)
        self.workers: list[AsyncWorker] = [self.worker]
        self.by_core: dict[int, list[AsyncWorker]] = {}
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="tokengate-event-loop", daemon=True)

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
        if logger.isEnabledFor(logging.INFO):
            logger.info("Event loop started")
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
                if logger.isEnabledFor(logging.INFO):
                    logger.info("Event loop stopped")

    async def _shutdown(self, timeout: float | None) -> None:
        # After the coordinator's drain only tasks that outlived stop()'s timeout are left.
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        mailbox = self.worker.mailbox
        while mailbox:
            mailbox.popleft()._discard("stopped")

    def queued(self) -> list[Any]:
        return list(self.worker.mailbox)

    def stop(self, timeout: float | None = None) -> list[AsyncWorker]:
        """Cancel what still runs, close the loop; returns ``[worker]`` if it would not stop."""
        if not self._thread.is_alive():
            return []
        if self._thread is threading.current_thread():
            self.loop.stop()
            return []
        try:
            done = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self.loop)
            with contextlib.suppress(Exception):
                done.result(None if timeout is None else timeout + 1.0)
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # the loop is already closed
            pass
        self._thread.join(timeout)
        return [self.worker] if self._thread.is_alive() else []
