"""``task_token_guard``: turn an ordinary function into a task whose call returns a Token.

The decorator validates tags at decoration time and returns a :class:`TaskFunction`. The
wrapper is generic over the function's parameters, so an editor knows that ``fib(3)`` takes an
int and returns ``Token[int]``. It keeps ``__wrapped__``, ``__name__``, ``__doc__``, and pickles
by reference (module + qualified name), so a worker process can import it and run the body
without ever re-submitting it.

In a class it binds as what it wraps would: a function becomes a method of the instance, a
``staticmethod`` is not bound, a ``classmethod`` binds to the class. A callable that is not a
function (a ``functools.partial``, an object with ``__call__``) is not bound, as in a class
body, and gets a name made from its type, since it has none of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import operator
import sys
import time
import types
from collections import deque
from collections.abc import Callable, Coroutine, Hashable, Iterable, Iterator, Mapping, Sized
from itertools import islice, repeat
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    ParamSpec,
    Protocol,
    TypeVar,
    Unpack,
    cast,
    overload,
)

from . import _runtime
from ._batches import (
    BATCHES_IN_FLIGHT,
    PROBE_S,
    BatchSizer,
    Failed,
    batch_refusal,
    check_chunksize,
    run_batch,
    twin_spec,
)
from ._errors import ConfigError, CoordinatorNotRunning
from ._lifecycle import fork_refusal
from ._spec import Tags, TaskSpec, check_priority, merge_tags
from ._token import Token, check_timeout

if TYPE_CHECKING:
    from ._progress import Bar

__all__ = ["TaskFunction", "adhoc_task", "task_token_guard"]

_local = _runtime.local
_stack = _runtime.running_stack

P = ParamSpec("P")
R = TypeVar("R")

# How a task found on a class binds (see TaskFunction.__get__).
_BIND_INSTANCE = "instance"  # a function: a method of the instance it is read from
_BIND_CLASS = "class"  # a classmethod: bound to the class
_BIND_NONE = "none"  # a staticmethod, or a callable that is not a function


def _unwrap_method(fn: Any) -> tuple[Any, str]:
    """The callable to run and how it binds: a ``staticmethod`` or ``classmethod`` runs its
    function (it is the function's signature and code that count, e.g. for ``async def``)."""
    if isinstance(fn, staticmethod):
        return fn.__func__, _BIND_NONE
    if isinstance(fn, classmethod):
        return fn.__func__, _BIND_CLASS
    return fn, _BIND_INSTANCE if isinstance(fn, types.FunctionType) else _BIND_NONE


def _name_of(fn: Any) -> str:
    """A name for a callable without ``__qualname__`` (for reprs and messages only: it never
    resolves by name, so such a task travels to a worker process by value)."""
    name = getattr(fn, "__qualname__", None)
    if isinstance(name, str):
        return name
    if isinstance(fn, functools.partial):
        return f"partial({_name_of(fn.func)})"
    return type(fn).__qualname__


def _not_running(spec: TaskSpec) -> CoordinatorNotRunning:
    parent = _runtime.forked_from
    if parent is not None:
        return fork_refusal(f"{spec.operation_type!r} was called", parent)
    if _runtime.exiting:
        return CoordinatorNotRunning(
            f"{spec.operation_type!r} was called while the interpreter is exiting, after the "
            f"running coordinators were stopped (that happens when the main thread ends); "
            f"submit work before then"
        )
    return CoordinatorNotRunning(
        f"{spec.operation_type!r} was called with no running OperationsCoordinator. Start one "
        f"first: `with OperationsCoordinator(): ...` or `OperationsCoordinator().start()`; or, "
        f"in a script or notebook, call `tokengate.use_default()` once to have a default "
        f"coordinator started on first use"
    )


class TaskFunction(Generic[P, R]):
    """A decorated function: calling it submits a task and returns a :class:`Token` at once."""

    __wrapped__: Callable[P, R]
    __qualname__: str
    __name__: str
    # Set on the variants options() returns (the coordinator reads them at submit).
    _call_priority: int | None = None
    _call_locality: Hashable | None = None

    def __init__(self, fn: Callable[P, R], spec: TaskSpec, binding: str | None = None) -> None:
        fn, found = _unwrap_method(fn)
        if isinstance(fn, types.FunctionType):
            functools.update_wrapper(self, fn)
        else:  # an object's own attributes are its state, not a function's metadata
            functools.update_wrapper(self, fn, updated=())
            if "__qualname__" not in self.__dict__:
                self.__qualname__ = self.__name__ = _name_of(fn)
        self.__wrapped__ = fn
        self.spec = spec
        self._binding = binding or found

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Token[R]:
        coordinator = _local.coordinator
        if coordinator is not None:  # called from inside a task: never blocks at admission
            return coordinator._submit(self, args, kwargs, True)  # type: ignore[no-any-return]
        if not _stack:
            # Inside a process-lane worker there is no coordinator: the call runs inline and
            # returns a finished Token (see lanes/process/_child.py).
            if _runtime.inline_runner is not None:
                return _runtime.inline_runner(self, args, kwargs)  # type: ignore[no-any-return]
            coordinator = _runtime.default_for_call()
            if coordinator is None:
                raise _not_running(self.spec)
            return coordinator._submit(self, args, kwargs, False)  # type: ignore[no-any-return]
        return _stack[-1]._submit(self, args, kwargs, False)  # type: ignore[no-any-return]

    async def submit_async(self, *args: P.args, **kwargs: P.kwargs) -> Token[R]:
        """From asyncio code: ``token = await fn.submit_async(x)`` awaits room instead of
        blocking the event loop when the coordinator is saturated (see
        ``OperationsCoordinator.submit_async``); ``await token`` gives the result."""
        coordinator = _runtime.current_coordinator()
        if coordinator is None:
            coordinator = _runtime.default_for_call()
        if coordinator is None:
            raise _not_running(self.spec)
        return await coordinator._submit_async(self, args, kwargs)  # type: ignore[no-any-return]

    def options(
        self, *, priority: int | None = None, locality: Hashable | None = None
    ) -> TaskFunction[P, R]:
        """This task with per-call options; call it, ``submit_async`` or ``map`` it like
        ``fn``, and keep it to reuse it.

        ``fn.options(priority=5)(x)`` submits ``fn(x)`` with priority 5 instead of the
        operation's (its ``priority`` tag, default 0): among the tokens queued for a worker,
        higher priority runs first, FIFO within a priority.

        ``fn.options(locality="model-a")(x)``: tokens with the same key (any hashable) run on
        the same worker while it lives, so what that worker keeps (a model loaded by a
        ``process_initializer``, an opened file, ``functools.cache`` in a worker process) is
        there for each of them. The first token of a key goes to the least-loaded worker and
        anchors the key there; the next ones queue behind it even when a sibling is idle, and
        a producer waits while its mailbox is full. A worker process that crashes is replaced
        in the same place, so the key stays (its state is rebuilt); a thread retired by the
        convergence engine hands its keys to the least-loaded sibling. See docs/guide/data.md.
        """
        if priority is not None:
            priority = check_priority(priority, "options(priority=...)")
        if locality is not None:
            try:
                hash(locality)
            except TypeError:
                raise ConfigError(
                    f"options(locality=...) must be hashable (a str, int or tuple naming what "
                    f"the worker keeps), got {type(locality).__name__} {locality!r}"
                ) from None
        base = self._base if isinstance(self, _WithOptions) else self
        if priority is None:
            priority = self._call_priority
        if locality is None:
            locality = self._call_locality
        return _WithOptions(base, priority, locality)

    def map(
        self,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        window: int | None = None,
        progress: bool = False,
        chunksize: int | None = None,
    ) -> Iterator[R]:
        """Like ``Executor.map``, but lazy: at most ``window`` calls are in flight at once.

        The standard library submits the whole input first; this streams it, so a huge
        generator runs in bounded memory. Results come in input order. ``timeout`` counts from
        this call, as in ``Executor.map``. Leaving the loop early cancels what has not started.
        ``progress=True`` shows how many results are in (``tokengate.progress`` explains
        where that is drawn); the total is known when every iterable has a ``len()``.

        ``chunksize`` calls run per token (a *batch*, see ``_batches.py``): each call still
        ends on its own, its exception raised at its position. ``None`` (the default) sizes
        batches from the measured cost of a call, so cheap calls share tokens and expensive
        ones run one per token; ``1`` never batches.

        ``window`` defaults to the coordinator's ``mailbox_max`` calls; when calls share tokens,
        it grows with the batches to room for four of them
        (:data:`~tokengate._batches.BATCHES_IN_FLIGHT`), so that batches of cheap calls reach
        their full size. An explicit ``window`` is kept, and caps automatic batches at a quarter
        of it.
        """
        timeout = check_timeout(timeout)
        if not isinstance(progress, bool):
            raise ConfigError(f"progress must be True or False, got {progress!r}")
        chunk = check_chunksize(chunksize)
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ConfigError(f"window must be a whole number >= 1, got {window!r}")
        coordinator = _runtime.current_coordinator()
        if coordinator is None:
            coordinator = _runtime.default_for_call()
        if coordinator is None and _runtime.inline_runner is None:
            raise _not_running(self.spec)
        given = window is not None
        if window is None:  # (1 inside a process-lane worker, where each call runs inline)
            window = 1 if coordinator is None else coordinator.config.mailbox_max
        end = None if timeout is None else time.monotonic() + timeout
        total = _total(iterables) if progress else None
        items = zip(*iterables, strict=False)
        if chunk != 1 and coordinator is not None:
            why = batch_refusal(self.spec)
            if why is None and progress:
                why = "progress=True counts tokens"
            if why is None and isinstance(self, _WithOptions):
                why = "options() apply per call"
            if why is None:
                return self._map_batched(coordinator, items, window, given, end, chunk)
            if chunk is not None:
                raise ConfigError(
                    f"chunksize={chunk}: calls of {self.spec.operation_type!r} cannot share a "
                    f"token ({why}); leave chunksize out or pass 1"
                )
        if progress:
            return self._map_progress(items, window, end, total)
        return self._map(items, window, end)

    def _map_batched(
        self,
        coordinator: Any,
        items: Iterator[tuple[Any, ...]],
        least: int,
        given: bool,
        end: float | None,
        chunk: int | None,
    ) -> Iterator[R]:
        """``map`` with calls sharing tokens (see ``_batches.py``): the window counts calls;
        one not ``given`` grows with the batches, to room for :data:`BATCHES_IN_FLIGHT`."""
        sizer = None if chunk is not None else BatchSizer(least if given else None)
        window = least
        batch_task = self._batch_twin()
        pending: deque[tuple[Token[Any], list[tuple[Any, ...]] | None]] = deque()
        in_flight = 0
        try:
            if sizer is not None:  # a first call, briefly waited for: is a call cheap?
                args = next(items, None)
                if args is None:
                    return
                first = self.__call__(*args)  # type: ignore[call-arg]
                pending.append((first, None))
                in_flight = 1
                with contextlib.suppress(TimeoutError):
                    first.exception(PROBE_S)
                sizer.probed(first)
            while True:
                # Never more than ``window`` calls in flight: the oldest results are taken
                # until a whole batch fits (taking one at a time would keep batches at one).
                size = sizer.size if sizer is not None else chunk or 1
                if given:
                    size = min(size, window)
                else:
                    window = max(least, BATCHES_IN_FLIGHT * size)
                while in_flight + size > window:
                    oldest, calls = pending.popleft()
                    in_flight -= 1 if calls is None else len(calls)
                    yield from self._batch_results(coordinator, oldest, calls, end, sizer)
                if size == 1:
                    args = next(items, None)
                    if args is None:
                        break
                    token = self.__call__(*args)  # type: ignore[call-arg]
                    if sizer is not None:  # measured as it ends: the size grows meanwhile
                        token.add_done_callback(sizer.measured_one)
                    pending.append((token, None))
                    in_flight += 1
                else:
                    batch = list(islice(items, size))
                    if not batch:
                        break
                    pending.append((batch_task(self.__wrapped__, batch), batch))
                    in_flight += len(batch)
            while pending:
                oldest, calls = pending.popleft()
                yield from self._batch_results(coordinator, oldest, calls, end, sizer)
        finally:
            for left, _ in pending:
                left.cancel()

    def _batch_results(
        self,
        coordinator: Any,
        token: Token[Any],
        batch: list[tuple[Any, ...]] | None,
        end: float | None,
        sizer: BatchSizer | None,
    ) -> Iterable[R]:
        """The results of one entry of a batched map, in order: a batch whose calls all
        returned is its list of values as it is (no per-call step between it and the caller)."""
        if batch is None:
            return (_wait(token, end),)
        values = _wait(token, end)
        if sizer is not None:
            sizer.measured(token, len(batch))
        if type(values) is list:
            return values
        return self._with_reruns(coordinator, batch, values, end)

    def _with_reruns(
        self, coordinator: Any, batch: list[tuple[Any, ...]], values: list[Any], end: float | None
    ) -> Iterator[R]:
        """A batch in which some calls failed: each failure raised, or re-run, at its place."""
        for args, value in zip(batch, values, strict=True):
            if type(value) is Failed:
                yield self._rerun(coordinator, args, value.exc, end)
            else:
                yield value

    def _rerun(
        self, coordinator: Any, args: tuple[Any, ...], exc: Exception, end: float | None
    ) -> R:
        """A call that failed inside a batch: raised at its position, or run again on its own
        with the retries its task has left after that first attempt."""
        left = coordinator._retries_left(self.spec, exc)
        if not left:
            raise exc
        twins = self.__dict__.setdefault("_retry_twins", {})
        task = twins.get(left)
        if task is None:
            spec = dataclasses.replace(self.spec, retries=left - 1)
            task = twins[left] = TaskFunction(self.__wrapped__, spec, _BIND_NONE)
        return _wait(task(*args), end)  # type: ignore[no-any-return]

    def _batch_twin(self) -> TaskFunction[..., list[Any]]:
        """The task whose tokens run batches of this one's calls (made once)."""
        twin: TaskFunction[..., list[Any]] | None = self.__dict__.get("_batch_task")
        if twin is None:
            twin = TaskFunction(run_batch, twin_spec(self.spec), _BIND_NONE)
            self.__dict__["_batch_task"] = twin
        return twin

    def _map(
        self,
        items: Iterator[tuple[Any, ...]],
        window: int,
        end: float | None,
        bar: Bar | None = None,
    ) -> Iterator[R]:
        pending: deque[Token[R]] = deque()
        try:
            for args in items:
                pending.append(self.__call__(*args))  # type: ignore[call-arg]
                if len(pending) >= window:
                    yield _wait(pending.popleft(), end, bar)
            while pending:
                yield _wait(pending.popleft(), end, bar)
        finally:
            for token in pending:
                token.cancel()

    def _map_progress(
        self, items: Iterator[tuple[Any, ...]], window: int, end: float | None, total: int | None
    ) -> Iterator[R]:
        from ._progress import open_bar

        bar = open_bar(total, self.spec.operation_type)
        try:
            yield from self._map(items, window, end, bar)
        finally:
            bar.close()

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # As a function, staticmethod or classmethod would bind, so that ``obj.method(x)``,
        # ``obj.static(x)``, ``Class.klass(x)`` and ``Class.method(obj, x)`` all call the body
        # with the arguments it declares.
        binding = self._binding
        if binding == _BIND_INSTANCE:
            return self if instance is None else BoundTask(self, instance)
        if binding == _BIND_CLASS:
            return BoundTask(self, type(instance) if owner is None else owner)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # By name when its module holds it under its qualified name (a worker imports it and
        # runs ``__wrapped__``); otherwise as (raw function, spec, binding), which cloudpickle
        # can send by value (a task defined in a function, or rebound under another name).
        if resolves_by_name(self):
            return (_load_task, (self.__module__, self.__qualname__))
        return (_rebuild_task, (self.__wrapped__, self.spec, self._binding))

    def __repr__(self) -> str:
        return (
            f"<TaskFunction {self.__qualname__} {self.spec.operation_type!r} ({self.spec.weight})>"
        )


class BoundTask:
    """A task read from an instance (a method) or from a class (a classmethod): calling it, its
    ``map`` and its ``submit_async`` pass what it is bound to as the first argument."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, task: TaskFunction[..., Any], bound_to: Any) -> None:
        self.__func__ = task
        self.__self__ = bound_to

    def __call__(self, *args: Any, **kwargs: Any) -> Token[Any]:
        return self.__func__(self.__self__, *args, **kwargs)

    async def submit_async(self, *args: Any, **kwargs: Any) -> Token[Any]:
        """``TaskFunction.submit_async`` with the bound first argument."""
        return await self.__func__.submit_async(self.__self__, *args, **kwargs)

    def map(
        self,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        window: int | None = None,
        progress: bool = False,
        chunksize: int | None = None,
    ) -> Iterator[Any]:
        """``TaskFunction.map`` with the bound first argument in every call."""
        opts: dict[str, Any] = {
            "timeout": timeout,
            "window": window,
            "progress": progress,
            "chunksize": chunksize,
        }
        if not iterables:  # nothing to call it with (repeat() alone would never end)
            return self.__func__.map(**opts)
        return self.__func__.map(repeat(self.__self__), *iterables, **opts)

    def options(
        self, *, priority: int | None = None, locality: Hashable | None = None
    ) -> BoundTask:
        """``TaskFunction.options``, still bound: ``obj.method.options(priority=5)(x)``."""
        return BoundTask(self.__func__.options(priority=priority, locality=locality), self.__self__)

    def __getattr__(self, name: str) -> Any:  # spec, __wrapped__, __name__... of the task
        return getattr(self.__func__, name)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoundTask)
            and other.__func__ is self.__func__
            and other.__self__ is self.__self__
        )

    def __hash__(self) -> int:
        return hash((id(self.__func__), id(self.__self__)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (BoundTask, (self.__func__, self.__self__))

    def __repr__(self) -> str:
        return f"<bound {self.__func__!r} of {self.__self__!r}>"


class _WithOptions(TaskFunction[P, R]):
    """A task with per-call options (see :meth:`TaskFunction.options`): the same function and
    spec, so its calls share the operation's route, statistics and rate limit. TaskFunction's
    own code calls it (and ``submit_async``, ``map``); the coordinator reads ``_call_priority``
    and ``_call_locality`` off the task it is given."""

    def __init__(
        self, base: TaskFunction[P, R], priority: int | None, locality: Hashable | None
    ) -> None:
        super().__init__(base.__wrapped__, base.spec, base._binding)
        self._base = base
        self._call_priority = priority
        self._call_locality = locality

    def __reduce__(self) -> tuple[Any, ...]:
        return self._base.__reduce__()  # a worker process runs the body: the options stay here

    def __repr__(self) -> str:
        given = {"priority": self._call_priority, "locality": self._call_locality}
        shown = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
        return f"{self._base!r}.options({shown})"


def _total(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls ``map`` will make, if every input says: the shortest ``len()``; an endless
    ``itertools.repeat`` (a bound method's own first argument) does not count; any other
    iterator makes it unknown."""
    lengths = []
    for it in iterables:
        if isinstance(it, Sized):
            lengths.append(len(it))
        elif isinstance(it, repeat):
            hint = operator.length_hint(it, -1)
            if hint >= 0:
                lengths.append(hint)
        else:
            return None
    return min(lengths) if lengths else None


def _wait(token: Token[R], end: float | None, bar: Bar | None = None) -> R:
    try:
        return token.result(None if end is None else max(0.0, end - time.monotonic()))
    finally:
        token.cancel()  # a no-op once it ended; after a timeout it must not run on regardless
        if bar is not None and token.done():
            bar.advance(token)


_MISSING = object()


def _lookup(obj: Any, qualname: str) -> Any:
    """What ``obj`` holds under the dotted ``qualname``, as stored: a class's attribute is read
    from its ``__dict__`` (not through ``__get__``, which would bind a method) and unwrapped
    from ``staticmethod``/``classmethod``. ``_MISSING`` if there is none."""
    for part in qualname.split("."):
        if isinstance(obj, type):
            obj = obj.__dict__.get(part, _MISSING)
            if isinstance(obj, staticmethod | classmethod):
                obj = obj.__func__
        else:
            obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _load_task(module: str, qualname: str) -> Any:
    obj = _lookup(importlib.import_module(module), qualname)
    if obj is _MISSING:
        raise AttributeError(f"module {module!r} has no task {qualname!r}")
    return obj


def _rebuild_task(
    fn: Callable[..., Any], spec: TaskSpec, binding: str | None = None
) -> TaskFunction[..., Any]:
    return TaskFunction(fn, spec, binding)


def resolves_by_name(task: TaskFunction[..., Any]) -> bool:
    """Whether ``task`` is what its module (already imported) holds under its qualified name."""
    module = sys.modules.get(task.__module__)
    return module is not None and _lookup(module, task.__qualname__) is task


class _Decorator(Protocol):
    """What ``task_token_guard(...)`` returns. An ``async def`` task resolves to what its
    coroutine returns, so ``fn(3)`` is a ``Token[int]`` for ``async def fn(n) -> int`` too."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> TaskFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> TaskFunction[P, R]: ...


def task_token_guard(
    operation_type: str,
    tags: Tags | Mapping[str, Any] | None = None,
    **tag_keywords: Unpack[Tags],
) -> _Decorator:
    """Decorate a function so that calling it returns a Token (the Quick-Proof's decorator).

    ``tags``: ``weight`` (light / medium / heavy), ``storage_speed`` (SLOW / MODERATE / FAST /
    INSANE), ``executor`` (auto / thread / process), ``retries``, ``retry_on``,
    ``dont_retry_on``, ``deadline`` and ``timeout`` (seconds), ``priority`` (an int, higher
    runs first among queued tokens) and ``rate`` (``"100/s"``, ``"5/m"``, ``"10/h burst 3"``).
    The same tags may be given as keywords (``@task_token_guard("op", weight="heavy",
    retries=2)``), which an editor completes and a type checker checks (see :class:`Tags`); a
    tag given both ways with two different values is an error. Bad tags raise ``ConfigError``
    here, at decoration time.
    """
    if callable(operation_type) and tags is None and not tag_keywords:
        raise ConfigError(
            "task_token_guard needs arguments: use @task_token_guard(operation_type='name', "
            "tags={'weight': 'light'}), not bare @task_token_guard"
        )

    def decorate(fn: Callable[P, R]) -> TaskFunction[P, R]:
        raw, binding = _unwrap_method(fn)
        if isinstance(raw, TaskFunction):
            raise ConfigError(
                f"{raw.__qualname__} is already decorated with task_token_guard "
                f"(operation {raw.spec.operation_type!r}); decorate it once"
            )
        if not callable(raw):
            raise ConfigError(
                f"task_token_guard decorates functions, got {type(fn).__name__} {fn!r}"
            )
        is_async = is_async_callable(raw)
        spec = TaskSpec.from_tags(operation_type, merged, is_async=is_async)
        return TaskFunction(raw, spec, binding)

    merged = merge_tags(operation_type, tags, tag_keywords)
    return cast(_Decorator, decorate)


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True if calling ``fn`` returns a coroutine to await: an ``async def`` (or a partial of
    one), or an object whose ``__call__`` is an ``async def``."""
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn):
        return False
    return inspect.iscoroutinefunction(type(fn).__call__)  # an object with async __call__


def adhoc_task(
    fn: Callable[..., Any], args: tuple[Any, ...]
) -> tuple[TaskFunction[..., Any], tuple[Any, ...]]:
    """The task and arguments that run ``fn(*args)`` given to ``coordinator.submit``.

    A decorated function keeps its tags, and a decorated method read from an instance or a
    class passes what it is bound to first. Any other callable runs as a light task named after
    it: one task per name, which takes the callable as its first argument. Partials and bound
    methods are new objects at every call, so a task per callable would keep each one (and
    what it is bound to) alive in a cache, and grow the coordinator's route cache per call.
    """
    if isinstance(fn, TaskFunction):
        return fn, args
    if isinstance(fn, BoundTask):
        return fn.__func__, (fn.__self__, *args)
    if not callable(fn):
        raise ConfigError(f"submit() needs a callable, got {type(fn).__name__} {fn!r}")
    name = getattr(fn, "__name__", None) or type(fn).__name__
    is_async = is_async_callable(fn)
    task = _adhoc.get((name, is_async))
    if task is None:
        body = _await_plain if is_async else _call_plain
        spec = TaskSpec.from_tags(name, {}, is_async=is_async)
        task = _adhoc.setdefault((name, is_async), TaskFunction(body, spec))
    return task, (fn, *args)


_adhoc: dict[tuple[str, bool], TaskFunction[..., Any]] = {}


def _call_plain(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


async def _await_plain(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    return await fn(*args, **kwargs)
