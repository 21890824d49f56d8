"""Which coordinator a decorated call goes to.

Worker threads (and the timer thread) of a coordinator record it in a thread-local, so nested
calls from inside a task go to the coordinator running that task and never wait at admission.
Every other thread uses the most recently started coordinator that is still running. The
default coordinator (``_default.py``, opted into with ``tokengate.use_default()``) sits at the
bottom of that stack, so any explicitly started one wins over it whenever it was started.

The stack of running coordinators holds them strongly on purpose: a running coordinator is
reachable by any decorated call in the process, so it is never garbage while it runs, however
many references the caller dropped (like a started ``threading.Thread``). It leaves the stack
when it stops, at the latest when the interpreter exits (``_lifecycle.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "current_coordinator",
    "default_for_call",
    "inline_runner",
    "local",
    "pop_coordinator",
    "push_coordinator",
    "running_coordinators",
]


class _Local(threading.local):
    coordinator: Any = None  # set on the coordinator's own threads only
    worker: Any = None  # the ThreadWorker running on this thread, if any


local = _Local()
# Set in a process-lane worker process only: runs a decorated call inline, returns a finished
# Token (lanes/_process_child.py). None everywhere else.
inline_runner: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any] | None = None
# Set by ``tokengate.use_default()``: starts the default coordinator if needed and returns the
# coordinator a call goes to now. ``default`` is that coordinator once made.
default_starter: Callable[[], Any] | None = None
default: Any = None
_stack: list[Any] = []
running_stack = _stack  # read-only outside this module: the decorator's fast path
_lock = threading.Lock()
# True once the interpreter began to exit and stopped the running coordinators (see
# _lifecycle.py): the "not running" messages say so.
exiting = False


def current_coordinator() -> Any:
    """The coordinator a call made on this thread goes to, or None."""
    coordinator = local.coordinator
    if coordinator is not None:
        return coordinator
    stack = _stack
    return stack[-1] if stack else None


def default_for_call() -> Any:
    """For a call made with no coordinator running: the default coordinator, started on first
    use, if the program opted in; otherwise (and in a process-lane worker) None."""
    starter = default_starter
    if starter is None or inline_runner is not None:
        return None
    return starter()


def push_coordinator(coordinator: Any) -> None:
    with _lock:
        if coordinator is default:
            _stack.insert(0, coordinator)  # below every explicitly started coordinator
        else:
            _stack.append(coordinator)


def pop_coordinator(coordinator: Any) -> None:
    with _lock:
        if coordinator in _stack:
            _stack.remove(coordinator)


def running_coordinators() -> list[Any]:
    """The running coordinators, the most recently started first."""
    with _lock:
        return _stack[::-1]
