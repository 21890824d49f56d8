"""TokenGateExecutor: the coordinator as a standard ``concurrent.futures.Executor``.

Anything that takes an executor (``loop.run_in_executor``, libraries with an ``executor=``
argument) can run its work through tokengate's routing, throttling, retries and stats. The
adapter follows the standard library's documented semantics: ``submit`` returns a Future (a
Token), ``map`` collects its iterables at once and yields results in order with a ``timeout``
counted from the call, ``chunksize`` batches items into one task (as ``ProcessPoolExecutor``
does), and ``shutdown(wait, cancel_futures)`` refuses new work, optionally cancels what has not
started, and optionally waits for the rest. Shutting an executor down does not stop the
coordinator; it only closes this door into it.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, wait
from typing import TYPE_CHECKING, Any, TypeVar

from ._decorator import TaskFunction
from ._errors import ConfigError
from ._spec import TaskSpec
from ._token import Token, check_timeout

if TYPE_CHECKING:
    from ._coordinator import OperationsCoordinator

__all__ = ["TokenGateExecutor"]

T = TypeVar("T")


def _run_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[T]:
    return [fn(*args) for args in chunk]


class TokenGateExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose work runs as tokens of one coordinator.

    Every call runs with the tags given to :meth:`OperationsCoordinator.executor`; the operation
    type is the callable's name unless ``operation_type`` was given.
    """

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        tags: dict[str, Any],
        operation_type: str | None = None,
    ) -> None:
        TaskSpec.from_tags(operation_type or "executor", tags)  # validate now, not at submit
        self._coordinator = coordinator
        self._tags = dict(tags)
        self._operation_type = operation_type
        self._tasks: dict[Any, TaskFunction[..., Any]] = {}
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()
        self._shutdown = False

    def _task_for(self, fn: Callable[..., Any]) -> TaskFunction[..., Any]:
        key: Any = fn
        try:
            task = self._tasks.get(key)
        except TypeError:  # unhashable callable
            key, task = None, None
        if task is None:
            if isinstance(fn, TaskFunction):
                return fn  # an already decorated function keeps its own tags
            name = self._operation_type or getattr(fn, "__name__", None) or type(fn).__name__
            task = TaskFunction(fn, TaskSpec.from_tags(name, self._tags))
            if key is not None:
                self._tasks[key] = task
        return task

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; returns its Token (a ``Future``)."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        token: Token[T] = self._coordinator.submit(self._task_for(fn), *args, **kwargs)
        with self._lock:
            self._pending.add(token)
        token.add_done_callback(self._forget)
        return token

    def _forget(self, token: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(token)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like ``Executor.map``: the iterables are collected at once, results come in order.

        ``chunksize`` > 1 runs that many items per task (fewer, larger tokens: worth it when
        each call is tiny or crosses a process boundary).
        """
        timeout = check_timeout(timeout)
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        items = zip(*iterables, strict=False)
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in items]
            return self._results(futures, end, chunked=False)
        chunks = iter(lambda: list(itertools.islice(items, chunksize)), [])
        runner = self._chunk_runner(fn)
        futures = [self.submit(runner, fn, chunk) for chunk in chunks]
        return self._results(futures, end, chunked=True)

    def _chunk_runner(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        task = self._task_for(fn)
        name = f"{task.spec.operation_type}[chunk]"
        key = ("chunk", fn)
        try:
            runner = self._tasks.get(key)
        except TypeError:
            runner = None
        if runner is None:
            runner = TaskFunction(_run_chunk, TaskSpec.from_tags(name, self._tags))
            with contextlib.suppress(TypeError):  # unhashable: just don't cache
                self._tasks[key] = runner
        return runner

    @staticmethod
    def _results(futures: list[Future[Any]], end: float | None, *, chunked: bool) -> Iterator[Any]:
        # Reverse so that pop() takes the oldest first and the list releases references early,
        # as the standard library does.
        futures.reverse()
        try:
            while futures:
                future = futures.pop()
                left = None if end is None else max(0.0, end - time.monotonic())
                try:
                    value = future.result(left)
                finally:
                    future.cancel()  # as the stdlib does: a timed-out call must not run later
                if chunked:
                    yield from value
                else:
                    yield value
        finally:
            for future in futures:
                future.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work; cancel what has not started if asked; wait for the rest if asked."""
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for token in pending:
                token.cancel()
        if wait and pending:
            _wait_all(pending)


def _wait_all(futures: list[Future[Any]]) -> None:
    wait(futures)


def make_executor(
    coordinator: OperationsCoordinator,
    *,
    weight: str = "light",
    storage_speed: str | None = None,
    executor: str = "auto",
    operation_type: str | None = None,
    **tags: Any,
) -> TokenGateExecutor:
    """Validate the tags and build the adapter (``OperationsCoordinator.executor`` calls this)."""
    all_tags: dict[str, Any] = {"weight": weight, "executor": executor, **tags}
    if storage_speed is not None:
        all_tags["storage_speed"] = storage_speed
    if operation_type is not None and not isinstance(operation_type, str):
        raise ConfigError(f"operation_type must be a string, got {operation_type!r}")
    return TokenGateExecutor(coordinator, all_tags, operation_type)
