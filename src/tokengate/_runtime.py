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

import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "current_coordinator",
    "default_for_call",
    "forget_after_fork",
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
# Token (lanes/process/_child.py). None everywhere else.
inline_runner: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any] | None = None
# Set by ``tokengate.use_default()``: starts the default coordinator if needed and returns the
# coordinator a call goes to now. ``default`` is that coordinator once made.
default_starter: Callable[[], Any] | None = None
default: Any = None
_stack: list[Any] = []
running_stack = _stack  # read-only outside this module: the decorator's fast path
_lock = threading.Lock()
# Process-wide facts the "not running" messages explain (see _lifecycle.py): True once the
# interpreter began to exit and stopped the running coordinators; the pid of the process whose
# running coordinators this one inherited through fork(), until a coordinator starts here.
exiting = False
forked_from: int | None = None
started = False  # a coordinator was started in this process (or the one it was forked from)
# What each running coordinator does in a forked child (refuse every call), by id; and the ids
# of the coordinators this process inherited through fork().
_on_fork: dict[int, Callable[[], None]] = {}
_forked_ids: set[int] = set()


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
    if default is not None and id(default) in _forked_ids:
        return None  # inherited running through fork(): the caller explains (_lifecycle.py)
    return starter()


def push_coordinator(coordinator: Any, on_fork: Callable[[], None]) -> None:
    """``coordinator`` runs: calls go to it; ``on_fork()`` is called in a child forked while
    it runs (with only the forking thread alive: it must take no lock)."""
    global forked_from, started
    with _lock:
        _on_fork[id(coordinator)] = on_fork
        if coordinator is default:
            _stack.insert(0, coordinator)  # below every explicitly started coordinator
        else:
            _stack.append(coordinator)
        forked_from = None  # a coordinator runs here now: calls go to it
        started = True


def pop_coordinator(coordinator: Any) -> None:
    with _lock:
        _on_fork.pop(id(coordinator), None)
        if coordinator in _stack:
            _stack.remove(coordinator)


def running_coordinators() -> list[Any]:
    """The running coordinators, the most recently started first."""
    with _lock:
        return _stack[::-1]


def forget_after_fork() -> list[Callable[[], None]]:
    """In a forked child (only the forking thread exists): empty the stack and return what each
    coordinator it held does in a forked child. Takes no lock: a parent thread may have held
    ``_lock`` at the fork, so it is replaced."""
    global _lock, forked_from
    _lock = threading.Lock()
    inherited = _stack[:]
    _stack.clear()  # in place: the decorator holds this very list
    _forked_ids.update(id(c) for c in inherited)
    hooks = [_on_fork.pop(id(c)) for c in inherited if id(c) in _on_fork]
    local.coordinator = None  # forked from inside a task: that worker does not exist here
    local.worker = None
    if inherited:
        forked_from = os.getppid()
    return hooks
