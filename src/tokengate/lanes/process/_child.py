"""The worker process of the process lane: receive a call, run the function body, reply.

Started by the process lane (:mod:`tokengate.lanes.process`) as a fresh interpreter
(``python -c BOOTSTRAP``): the bootstrap takes the parent's ``sys.path`` from the environment,
imports this module and calls :func:`main`. The user's ``__main__`` script is never imported
here (functions defined there arrive by value), so a script without an
``if __name__ == "__main__"`` guard is safe.

Lifetime: the worker leaves when its task pipe closes (``stop()``), with ``os._exit`` after
running ``atexit`` handlers and flushing output. It also dies with its parent: on Linux
``PR_SET_PDEATHSIG`` makes the kernel send it SIGKILL when the parent thread that started it
(the worker's proxy thread, alive for as long as the worker) ends, parent crashes included;
elsewhere a watchdog thread blocks on a lifeline pipe whose other end only the parent holds
and exits at its EOF.

Decorated calls made *inside* a worker process run inline, at once, in this process, and return
an already finished :class:`Token` (resolved or failed): there is no coordinator here, and
sending the call back to the parent could deadlock a lane whose workers all wait. Their tags
(routing, throttling, retries, timeouts) do not apply. Tokens among the arguments of such a
call are replaced by their values, as dependencies are in the coordinator.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pickle
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ... import _runtime
from ..._decorator import TaskFunction
from ..._dependencies import _dependency_error, find_dependencies, substitute
from ..._token import Place, Token, next_seq
from .. import _wire

__all__ = ["INITIALIZER_FAILED", "main", "run_inline"]

#: How the boot-failure reply of a worker whose initializer raised begins.
INITIALIZER_FAILED = "its process_initializer raised"

_PR_SET_PDEATHSIG = 1
_CACHE_MAX = 256
# What a mapped argument view is a view of: one mapping, or a segment's pieces mapped side by side.
_MAPPINGS = (mmap.mmap, ctypes.Array)


# -- inline calls ----------------------------------------------------------------------------------
class _InlineHost:
    """Stands in for the coordinator of tokens made inside a worker process (all finished)."""

    def help(self, token: Token[Any], end: float | None, /) -> None:
        pass

    def on_discarded(self, token: Token[Any], /) -> None:
        pass

    def after_discard(self, token: Token[Any], /) -> None:
        pass


_HOST = _InlineHost()


def _record(token: Token[Any], exc: BaseException | None) -> None:
    token.finished_at = time.perf_counter()


def run_inline(
    task: TaskFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Token[Any]:
    """Run a decorated call made inside a worker process; returns its finished Token."""
    token: Token[Any] = Token(
        task.spec, task.__wrapped__, args, kwargs, next_seq(), time.perf_counter(), _HOST
    )
    token._try_claim()
    token.attempts = 1
    token._ran_on = Place(None, f"pid_{os.getpid()}", "inline")
    token.started_at = time.perf_counter()
    value: Any = None
    error: BaseException | None = None
    deps = find_dependencies(args, kwargs)
    failed = next((d for d in deps if d.cancelled() or d.exception(0) is not None), None)
    if failed is not None:
        error = _dependency_error(token, failed)
    else:
        try:
            if deps:
                args, kwargs = substitute(args, kwargs)
            value = task.__wrapped__(*args, **kwargs)
        except BaseException as exc:
            error = exc
    token._finish(value, error, _record)
    return token


# -- process set-up --------------------------------------------------------------------------------
def _die_with_parent(parent: int, lifeline: int | None, pdeathsig: bool) -> None:
    if pdeathsig:
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:  # pragma: no cover - no libc prctl: the lifeline still works
            pass
    if lifeline is not None:

        def watch() -> None:
            try:
                while os.read(lifeline, 1):
                    pass
            except OSError:
                pass
            os._exit(70)

        threading.Thread(target=watch, name="tokengate-lifeline", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the watch was set up
        os._exit(70)


def _pin(cpu: int | None) -> None:
    setaffinity = getattr(os, "sched_setaffinity", None)
    if cpu is None or setaffinity is None:
        return
    # A CPU outside this container's set: run unpinned, as the thread lane does.
    with contextlib.suppress(OSError, ValueError, OverflowError):
        setaffinity(0, (cpu,))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


# -- the loop --------------------------------------------------------------------------------------
def _load_function(data: memoryview, cache: dict[bytes, Callable[..., Any]]) -> Callable[..., Any]:
    key = bytes(data)
    fn = cache.get(key)
    if fn is None:
        obj = pickle.loads(key)
        fn = obj.__wrapped__ if isinstance(obj, TaskFunction) else obj
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = fn
    return fn


def _serial_failure(what: str, exc: BaseException) -> list[bytes]:
    import traceback

    message = (
        f"the worker process could not unpickle {what} ({type(exc).__name__}: {exc}); the "
        f"module or class it refers to may not be importable there"
    )
    return [b"S", pickle.dumps((message, "".join(traceback.format_exception(exc))))]


def _handle(
    message: memoryview,
    cache: dict[bytes, Callable[..., Any]],
    channel: socket.socket,
    kept: dict[int, memoryview],
) -> list[bytes]:
    """Run one call; its reply begins with ``F`` when the call's own segments are mapped here no
    more (nothing the task kept holds a view of them), so the parent may write over them.
    (Shared objects' mappings are ``kept`` for the next calls until the parent forgets them.)"""
    mappings: list[weakref.ref[Any]] = []
    reply = _serve(message, cache, channel, kept, mappings)
    if mappings and all(mapping() is None for mapping in mappings):
        return [_wire.RELEASED_MARK, *reply]
    return reply


def _serve(
    message: memoryview,
    cache: dict[bytes, Callable[..., Any]],
    channel: socket.socket,
    kept: dict[int, memoryview],
    mappings: list[weakref.ref[Any]],
) -> list[bytes]:
    fn_part, args_part, places = _wire.split_call(message)
    views: list[memoryview] = []
    if places:  # taken first, whatever happens next: the channel stays in step
        try:
            views = _wire.receive_views(channel, places, writable=False, kept=kept)
        except BaseException as exc:
            return _serial_failure("the shared buffers of the arguments", exc)
        mappings.extend(
            weakref.ref(view.obj)
            for view, place in zip(views, places, strict=True)
            if not place[4] and isinstance(view.obj, _MAPPINGS)
        )
    try:
        fn = _load_function(fn_part, cache)
    except BaseException as exc:
        return _serial_failure("the task's function", exc)
    try:
        args, kwargs = _wire.loads_shared(args_part, views)
    except BaseException as exc:
        return _serial_failure(f"the arguments of {getattr(fn, '__qualname__', fn)!r}", exc)
    finally:
        views = []
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        return _wire.encode_exception(exc)
    finally:
        args = kwargs = None  # the arguments' mappings go with them (unless the task kept them)
    return _wire.encode_value(value, repr(getattr(fn, "__qualname__", fn)), channel)


def main(boot: dict[str, Any]) -> None:
    """Run the worker loop until the task pipe closes (``boot`` comes from the parent)."""
    tasks, results = boot["tasks"], boot["results"]
    _die_with_parent(boot["ppid"], boot.get("lifeline"), boot.get("pdeathsig", False))
    _pin(boot.get("cpu"))
    _runtime.inline_runner = run_inline
    reader = _wire.Reader(tasks)
    channel = socket.socket(fileno=boot["channel"])
    send = _wire.send
    cache: dict[bytes, Callable[..., Any]] = {}
    kept: dict[int, memoryview] = {}  # shared objects' mappings, by key, while the parent has them
    if boot.get("init"):
        _initialize(reader, results)
    send(results, [b"R", pickle.dumps(os.getpid())])
    while True:
        try:
            message = reader.recv()
        except EOFError:
            break
        forgotten = _wire.forgotten_keys(message)
        if forgotten is not None:  # no reply: the parent does not wait for one
            for key in forgotten:
                kept.pop(key, None)
            continue
        reply = _handle(message, cache, channel, kept)
        del message
        _flush()
        send(results, reply)
    _exit()


def _initialize(reader: _wire.Reader, results: int) -> None:
    """Run the lane's initializer (the first message); if it raises, say why and leave."""
    try:
        initializer, initargs = pickle.loads(reader.recv())
        initializer(*initargs)
    except BaseException as exc:
        import traceback

        text = "".join(traceback.format_exception(exc))
        _wire.send(results, [b"B", f"{INITIALIZER_FAILED}:\n{text}".encode()])
        _flush()
        os._exit(1)


def _exit() -> None:
    """Leave at once once the parent closed the task pipe: ``atexit`` handlers run and output
    is flushed, but the interpreter's teardown (~20 ms) is skipped, as in a forked worker."""
    import atexit

    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    _flush()
    os._exit(0)
