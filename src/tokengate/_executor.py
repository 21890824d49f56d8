"""TokenGateExecutor: the coordinator as a standard ``concurrent.futures.Executor``.

Anything that takes an executor (``loop.run_in_executor``, libraries with an ``executor=``
argument) can run its work through tokengate's routing, throttling and stats. The adapter
follows the standard library's documented semantics rather than the decorator's:

* ``submit(fn, *args)`` returns a Future (a Token) and runs ``fn`` once: the weight's default
  retry policy does not apply unless the executor was given ``retries`` or ``retry_on``;
* the arguments reach ``fn`` untouched: a Future (or Token) among them is passed as it is, not
  waited for. Each call travels as one opaque :class:`_Call`, which the coordinator's dependency
  scan does not look into;
* ``map`` collects its iterables at once and yields results in order with a ``timeout`` counted
  from the call, holding no result the caller has already taken; ``chunksize`` batches items
  into one task (as ``ProcessPoolExecutor`` does; by default when a call is cheap), each item's
  error raised at its own position;
* ``max_workers`` caps how many of its calls run at once: a call over the cap is counted but
  held by the coordinator (``_submit(hold=True)``), on no worker, until one of the executor's
  running calls ends;
* ``initializer(*initargs)`` runs before the executor's first call on each worker thread (on
  each worker process for work that runs in the process lane); if it raises, the executor is
  broken (:class:`InitializerFailed`, a ``concurrent.futures.BrokenExecutor``);
* ``submit`` raises ``RuntimeError`` after ``shutdown()`` and once interpreter shutdown has begun;
  a call that cannot be pickled for a worker process fails its Future instead of raising (a call
  held by ``max_workers`` is pickled when it is let go, so it holds no pickled copy meanwhile).

Shutting an executor down does not stop the coordinator; it only closes this door into it. The
executor keeps one task per operation name (not per callable), so submitting many distinct
callables (``functools.partial`` objects, bound methods) keeps none of them alive.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, wait
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import _runtime
from ._batches import AUTO_MAX, PROBE_S, Failed, batch_refusal, calls_in_target, run_batch
from ._decorator import BoundTask, TaskFunction
from ._errors import ConfigError, InitializerFailed, SerializationError
from ._spec import TaskSpec
from ._token import Token, check_timeout

if TYPE_CHECKING:
    from ._coordinator import OperationsCoordinator

__all__ = ["TokenGateExecutor"]

T = TypeVar("T")
log = logging.getLogger("tokengate.executor")

# -- interpreter shutdown ----------------------------------------------------------------------
_interpreter_exiting = False


def _on_interpreter_exit() -> None:
    global _interpreter_exiting
    _interpreter_exiting = True


# threading's exit hooks run before atexit handlers (concurrent.futures uses the same one), so an
# atexit handler that submits already sees the flag.
_register_exit = getattr(threading, "_register_atexit", None)
if _register_exit is not None:
    with contextlib.suppress(RuntimeError):  # imported while the interpreter is exiting
        _register_exit(_on_interpreter_exit)
else:  # pragma: no cover - CPython has had threading._register_atexit since 3.9
    atexit.register(_on_interpreter_exit)


# -- one call ----------------------------------------------------------------------------------
_keys = itertools.count(1)
_process_ran: dict[str, str | None] = {}  # in a worker process: initializer key -> failure
_thread_ran = threading.local()  # elsewhere, per thread: the same, in its __dict__


class _Init:
    """An executor's initializer; runs once per thread (once per worker process) before the
    executor's first call there. ``broken`` is the failure message once it raised."""

    __slots__ = ("broken", "initargs", "initializer", "key")

    def __init__(
        self,
        initializer: Callable[..., object],
        initargs: tuple[Any, ...],
        key: str,
        broken: str | None = None,
    ) -> None:
        self.initializer = initializer
        self.initargs = initargs
        self.key = key
        self.broken = broken

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Init, (self.initializer, self.initargs, self.key, self.broken))

    def ensure(self) -> None:
        """Run the initializer here if it has not run here yet; raise if the executor broke."""
        if self.broken is not None:
            raise InitializerFailed(self.broken)
        ran = _process_ran if _runtime.inline_runner is not None else vars(_thread_ran)
        if self.key in ran:
            failure = ran[self.key]
            if failure is None:
                return
            raise InitializerFailed(failure)
        try:
            self.initializer(*self.initargs)
        except BaseException as exc:
            name = getattr(self.initializer, "__qualname__", None) or repr(self.initializer)
            message = (
                f"the executor's initializer {name} raised {type(exc).__name__}: {exc}; the "
                f"executor is broken and runs no more calls (create a new one once the "
                f"initializer is fixed)"
            )
            ran[self.key] = self.broken = message
            raise InitializerFailed(message) from exc
        ran[self.key] = None


class _Call:
    """``fn(*args, **kwargs)`` as one argument: the coordinator looks for Tokens only in plain
    lists, tuples and dicts, so the call's own arguments reach ``fn`` untouched."""

    __slots__ = ("args", "fn", "init", "kwargs")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        init: _Init | None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.init = init

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Call, (self.fn, self.args, self.kwargs, self.init))

    def __repr__(self) -> str:
        return f"<call of {getattr(self.fn, '__qualname__', None) or self.fn!r}>"


def _run_call(call: _Call) -> Any:
    init = call.init
    if init is not None:
        init.ensure()
    return call.fn(*call.args, **call.kwargs)


def _run_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[Any]:
    return run_batch(fn, chunk)  # each call's own outcome: an error stays at its position


def _result_or_cancel(future: Future[T], end: float | None) -> T:
    try:
        try:
            return future.result(None if end is None else max(0.0, end - time.monotonic()))
        finally:
            future.cancel()  # as the stdlib does: a timed-out call must not run later
    finally:
        del future  # the caller's frame holds neither the future nor (through it) its result


def _explain(call: _Call, error: SerializationError) -> SerializationError:
    """Name what could not be pickled in the user's terms (the function or an argument)."""
    from .lanes._wire import dumps, dumps_arguments

    try:
        dumps(call.fn)
    except Exception as exc:
        name = getattr(call.fn, "__qualname__", None) or repr(call.fn)
        better = SerializationError(
            f"cannot send the function {name} to a worker process ({type(exc).__name__}: "
            f"{exc}). Submit a module-level function, or use an executor with "
            f"executor='thread' to run it in this process"
        )
        better.__cause__ = exc
        return better
    try:
        dumps_arguments(call.fn, call.args, call.kwargs)
    except SerializationError as better:
        return better
    return error


class TokenGateExecutor(Executor):
    """A ``concurrent.futures.Executor`` whose work runs as tokens of one coordinator.

    Build it with :meth:`OperationsCoordinator.executor`. Every call runs with the tags given
    there; the operation type is the callable's name unless ``operation_type`` was given. Unlike
    a decorated function's calls, each call runs once (unless ``retries`` or ``retry_on`` was
    given) and its arguments are passed untouched, as any ``Executor`` does.
    """

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        tags: dict[str, Any],
        operation_type: str | None = None,
        *,
        max_workers: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        tags = dict(tags)
        if "retries" not in tags and "retry_on" not in tags:
            # An Executor runs a call once; the weight's retry policy is the decorator's default.
            tags["retries"] = 0
            tags["dont_retry_on"] = (BaseException,)  # not after a worker crash either
        TaskSpec.from_tags(operation_type or "executor", tags)  # validate now, not at submit
        self._coordinator = coordinator
        self._tags = tags
        self._operation_type = operation_type
        self._tasks: dict[Any, TaskFunction[..., Any]] = {}  # one per operation name
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()
        self._shutdown = False
        self._max_workers = max_workers
        self._running = 0  # calls holding one of the max_workers slots
        self._queue: deque[Token[Any]] = deque()  # held calls waiting for a slot
        self._pumping = False
        self._init = (
            None
            if initializer is None
            else _Init(initializer, tuple(initargs), f"{os.getpid()}-{next(_keys)}")
        )
        self._broken: InitializerFailed | None = None

    # -- tasks ----------------------------------------------------------------------------------
    def _task_for(self, fn: Callable[..., Any], suffix: str = "") -> TaskFunction[..., Any]:
        """The task running calls of ``fn``: one per operation name, so the cache is bounded by
        the names in the program, never by how many callables were submitted."""
        if isinstance(fn, TaskFunction):
            key: Any = (fn.spec, suffix)  # an already decorated function keeps its own tags
        else:
            name = self._operation_type or getattr(fn, "__name__", None) or type(fn).__name__
            key = f"{name}{suffix}"
        task = self._tasks.get(key)
        if task is None:
            if isinstance(fn, TaskFunction):
                spec = fn.spec
                if suffix:
                    spec = dataclasses.replace(spec, operation_type=spec.operation_type + suffix)
                if spec.retries is None and spec.retry_on is None:
                    spec = dataclasses.replace(spec, retries=0, dont_retry_on=(BaseException,))
            else:
                spec = TaskSpec.from_tags(key, self._tags)
            task = TaskFunction(_run_call, spec)
            with self._lock:
                task = self._tasks.setdefault(key, task)
        return task

    # -- submission -----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` to run once; returns its Token (a ``Future``)."""
        if isinstance(fn, BoundTask):  # a decorated method read from an instance or a class
            task = fn.__func__
            call = _Call(task.__wrapped__, (fn.__self__, *args), kwargs, self._init)
            return self._submit(self._task_for(task), call)
        if isinstance(fn, TaskFunction):
            return self._submit(self._task_for(fn), _Call(fn.__wrapped__, args, kwargs, self._init))
        return self._submit(self._task_for(fn), _Call(fn, args, kwargs, self._init))

    def _submit(self, task: TaskFunction[..., Any], call: _Call) -> Token[Any]:
        if _interpreter_exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        slotted = hold = False
        with self._lock:
            if self._broken is not None:
                raise InitializerFailed(str(self._broken)) from self._broken.__cause__
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._max_workers is not None:
                slotted = self._running < self._max_workers
                hold = not slotted
                if slotted:
                    self._running += 1
        coordinator = self._coordinator
        internal = _runtime.local.coordinator is coordinator
        try:
            try:
                token: Token[Any] = coordinator._submit(task, (call,), {}, internal, hold=hold)
            except SerializationError as exc:  # fail the Future, as ProcessPoolExecutor does
                token = coordinator._failed_token(task, (call,), {}, _explain(call, exc))
        except BaseException:
            if slotted:
                self._slot_freed(None)
            raise
        with self._lock:
            self._pending.add(token)
        # Bookkeeping callbacks (_add_callback): they do not count as retrieving an error.
        token._add_callback(self._done)
        if slotted:
            token._add_callback(self._slot_freed)
        elif hold:
            with self._lock:
                self._queue.append(token)
            self._pump()
        return token

    def _done(self, token: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(token)
        if self._init is not None and not token.cancelled():
            exc = cast("Token[Any]", token)._exception  # read, not retrieved: it is the caller's
            if isinstance(exc, InitializerFailed):
                self._break(exc)

    def _break(self, exc: InitializerFailed) -> None:
        """The initializer failed: refuse new calls and fail the held ones without running."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = exc
            held = list(self._queue)
            self._queue.clear()
        assert self._init is not None
        if self._init.broken is None:
            self._init.broken = str(exc)
        log.error("executor broken: %s", exc, exc_info=exc.__cause__ or exc)
        for token in held:
            error = InitializerFailed(str(exc))
            error.__cause__ = exc.__cause__
            self._coordinator._release_held(token, error)

    # -- max_workers ------------------------------------------------------------------------------
    def _slot_freed(self, _token: Future[Any] | None) -> None:
        with self._lock:
            self._running -= 1
        self._pump()

    def _pump(self) -> None:
        """Start held calls while there are free slots. One thread pumps at a time; a thread
        that finds another pumping leaves its change to it (the pumper re-checks under the lock
        before it stops), so releases never recurse, however long the queue."""
        with self._lock:
            if self._pumping:
                return
            self._pumping = True
        assert self._max_workers is not None
        while True:
            with self._lock:
                if self._running >= self._max_workers or not self._queue:
                    self._pumping = False
                    return
                token = self._queue.popleft()
                self._running += 1
            token._add_callback(self._slot_freed)
            # Pickled only now: a failure is told in the user's terms, on the Future.
            explain = functools.partial(_explain, token.args[0])
            self._coordinator._release_held(token, explain=explain)

    # -- map ------------------------------------------------------------------------------------
    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[T]:
        """Like ``Executor.map``: the iterables are collected at once, results come in order.

        ``chunksize`` calls run per task (fewer, larger tokens: worth it when each call is tiny
        or crosses a process boundary); each call still ends on its own, its error raised at
        its position. ``None`` (the default) times the first call and chunks the rest when a
        call is cheap (see ``_batches.py``); ``1`` never chunks.
        """
        timeout = check_timeout(timeout)
        if chunksize is not None and (
            isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1
        ):
            raise ValueError(f"chunksize must be >= 1 or None (automatic), got {chunksize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables, strict=False))
        entries: list[tuple[Future[Any], list[tuple[Any, ...]] | None]] = []
        if chunksize is None:
            chunksize = self._auto_chunksize(fn, items, entries)
            del items[: len(entries)]  # the first call, submitted alone
        if chunksize == 1:
            entries += [(self.submit(fn, *args), None) for args in items]
            return self._results(fn, entries, end)
        if isinstance(fn, BoundTask):  # a decorated method: its task, with what it is bound to
            raw: Callable[..., Any] = functools.partial(fn.__func__.__wrapped__, fn.__self__)
            task = self._task_for(fn.__func__, "[chunk]")
        else:
            raw = fn.__wrapped__ if isinstance(fn, TaskFunction) else fn
            task = self._task_for(fn, "[chunk]")
        init = self._init
        for at in range(0, len(items), chunksize):
            chunk = items[at : at + chunksize]
            entries.append((self._submit(task, _Call(_run_chunk, (raw, chunk), {}, init)), chunk))
        return self._results(fn, entries, end)

    def _auto_chunksize(
        self,
        fn: Callable[..., Any],
        items: list[tuple[Any, ...]],
        entries: list[tuple[Future[Any], list[tuple[Any, ...]] | None]],
    ) -> int:
        """The automatic chunk: the first call is submitted alone (into ``entries``) and waited
        for up to ``PROBE_S``; if it ended, the rest go in chunks of about ``TARGET_S`` of
        work, but at least four per core so that every worker gets some."""
        if len(items) < 2:
            return 1
        task = fn.__func__ if isinstance(fn, BoundTask) else fn
        if isinstance(task, TaskFunction):
            spec = task.spec
        else:
            spec = TaskSpec.from_tags(self._operation_type or "executor", self._tags)
        if batch_refusal(spec, processes=True) is not None:
            return 1
        first = self.submit(fn, *items[0])
        entries.append((first, None))
        with contextlib.suppress(TimeoutError):
            first.exception(PROBE_S)
        spread = (len(items) - 1) // (4 * max(1, self._coordinator.core_count))
        return max(1, min(AUTO_MAX, spread, calls_in_target(cast("Token[Any]", first))))

    def _results(
        self,
        fn: Callable[..., Any],
        entries: list[tuple[Future[Any], list[tuple[Any, ...]] | None]],
        end: float | None,
    ) -> Iterator[Any]:
        # Reverse so that pop() takes the oldest first and the list releases each future (and
        # its result) once taken, as the standard library does.
        entries.reverse()
        rerun = None
        if self._tags.get("retries") or self._tags.get("retry_on"):
            rerun = self.submit  # a call failing in a chunk gets the executor's retries alone
        try:
            # No local keeps a result the caller has taken (a suspended frame would hold it).
            while entries:
                if entries[-1][1] is None:
                    yield _result_or_cancel(entries.pop()[0], end)
                    continue
                future, chunk = entries.pop()
                values = _result_or_cancel(future, end)
                del future
                assert chunk is not None
                values.reverse()
                if type(values) is list:  # every call returned (run_batch's plain list)
                    while values:
                        yield values.pop()
                    continue
                chunk.reverse()
                while values:
                    args = chunk.pop()
                    if type(values[-1]) is not Failed:
                        yield values.pop()
                        continue
                    exc = values.pop().exc
                    if rerun is None:
                        raise exc
                    del exc
                    yield _result_or_cancel(rerun(fn, *args), end)
        finally:
            for future, _ in entries:
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
    max_workers: int | None = None,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
    **tags: Any,
) -> TokenGateExecutor:
    """Validate the options and build the adapter (``OperationsCoordinator.executor``)."""
    all_tags: dict[str, Any] = {"weight": weight, "executor": executor, **tags}
    if storage_speed is not None:
        all_tags["storage_speed"] = storage_speed
    if operation_type is not None and not isinstance(operation_type, str):
        raise ConfigError(f"operation_type must be a string, got {operation_type!r}")
    if max_workers is not None and (
        isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
    ):
        raise ConfigError(
            f"max_workers must be greater than 0: a whole number of this executor's calls that "
            f"may run at once, or None for no cap; got {max_workers!r}"
        )
    if initializer is not None and not callable(initializer):
        raise ConfigError(f"initializer must be a callable or None, got {initializer!r}")
    if not isinstance(initargs, tuple | list):
        raise ConfigError(f"initargs must be a tuple of arguments, got {initargs!r}")
    return TokenGateExecutor(
        coordinator,
        all_tags,
        operation_type,
        max_workers=max_workers,
        initializer=initializer,
        initargs=tuple(initargs),
    )
