"""What becomes of running coordinators when the interpreter exits or the process forks.

**Interpreter exit.** Workers are daemon threads (a task stuck in user code must not keep the
process alive once ``stop()`` gave up on it), so a script that ends without ``stop()`` would see
its queued and running tokens vanish, unrun and unreported, when the interpreter kills them. So
tokengate does what ``concurrent.futures`` does: :func:`_stop_at_exit` stops every coordinator
still running (newest first), which waits for the tokens already submitted. Nothing new is
accepted from outside meanwhile, so the wait ends when that work ends; Ctrl-C ends it sooner,
discarding what has not started. A WARNING names how many tokens were pending.

The hook is registered with ``threading._register_atexit``, as ``concurrent.futures`` registers
its own, rather than with ``atexit``: it runs in ``threading._shutdown`` as the main thread
finishes, *before* the interpreter joins non-daemon threads and before every ``atexit`` handler.
CPython's executors need that point because their workers are non-daemon threads (since 3.9, so
that they work in subinterpreters, which forbid daemon threads: bpo-39812), and joining them
would hang unless they were told to finish first. Here it puts tokengate's drain at the same
point as theirs, with the workers and the logging handlers (``logging.shutdown`` is an
``atexit`` handler) alive whatever the import order; and a non-daemon thread still submitting
is refused once the drain has begun, so it cannot hold the exit up with new work.

**Fork.** A forked child gets a copy of the parent's memory but only the thread that forked: the
coordinators are there, their workers, timer and event loop are not, and a lock another parent
thread held stays held for ever. :func:`_after_fork_in_child` (``os.register_at_fork``) runs in
the child before ``fork()`` returns there: it empties the stack of running coordinators, marks
each as forked, so a call fails at once with ``CoordinatorNotRunning`` explaining the fork and
the fix, and replaces the module locks a new coordinator in the child needs. It takes no lock
and costs some tens of microseconds (nothing beside the fork itself), a single check in a process
that never started a coordinator. A coordinator started in the child is a new one and works.

Both hooks are registered once, when this module is first imported; a forked child inherits
them along with the rest of the interpreter's state.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from typing import Any

from . import _runtime, _token
from ._errors import CoordinatorNotRunning

__all__ = ["fork_refusal"]

log = logging.getLogger("tokengate.coordinator")


def _stop_at_exit() -> None:
    """Stop every running coordinator, waiting for its pending tokens (see the module doc)."""
    _runtime.exiting = True
    interrupted = False
    for coordinator in _runtime.running_coordinators():
        try:
            _drain_at_exit(coordinator, wait=not interrupted)
        except KeyboardInterrupt:
            interrupted = True  # the other coordinators stop without waiting either
        except Exception:
            log.exception("stopping %r at interpreter exit failed", coordinator)


def _drain_at_exit(coordinator: Any, *, wait: bool) -> None:
    """Stop ``coordinator`` as ``stop()`` does, waiting for what was submitted, unless ``wait``
    is False (Ctrl-C already ended the wait for another coordinator). A Ctrl-C during the wait
    discards what has not started and is raised again for the caller."""
    if not coordinator.running:
        return
    if not wait:
        coordinator.stop(cancel_pending=True, timeout=0)
        return
    discarded = coordinator.stats().discarded
    try:
        pending = coordinator.stats().in_flight
        if pending and coordinator is _runtime.default:  # what the default coordinator is for
            log.debug("draining the default coordinator's %d pending tokens at exit", pending)
        elif pending:
            log.warning(
                "the interpreter is exiting but this coordinator was not stopped: waiting "
                "for its %d pending tokens to finish, as concurrent.futures does (Ctrl-C "
                "stops waiting and discards what has not started). Call stop() yourself "
                "to decide: stop(cancel_pending=True) does not wait for what has not started",
                pending,
            )
        coordinator.stop()
    except KeyboardInterrupt:
        if coordinator.running:  # it landed before stop() began
            coordinator.stop(cancel_pending=True, timeout=0)
        log.warning(
            "Ctrl-C while waiting at interpreter exit: %d tokens that had not started were "
            "discarded; tasks still running were left behind",
            coordinator.stats().discarded - discarded,
        )
        raise


def _after_fork_in_child() -> None:
    """In a forked child: forget the parent's running coordinators (see the module doc)."""
    if not _runtime.started:  # no tokengate thread ever ran: nothing to forget, no lock held
        return
    for refuse_calls in _runtime.forget_after_fork():
        refuse_calls()
    _token.renew_stripes()


def fork_refusal(what: str, parent: int) -> CoordinatorNotRunning:
    """The error for a call made in a child forked from a process with a running coordinator."""
    return CoordinatorNotRunning(
        f"{what}: this process ({os.getpid()}) was forked from process {parent} while an "
        f"OperationsCoordinator was running there, and a coordinator's workers do not survive "
        f"fork(): here it can run nothing. Start a new coordinator in this "
        f"process (`with OperationsCoordinator(): ...`), or start child processes with the "
        f"'spawn' or 'forkserver' method (multiprocessing.get_context('spawn')) instead of "
        f"'fork'"
    )


def _register() -> None:
    register = getattr(threading, "_register_atexit", None)
    # RuntimeError: the interpreter is already exiting (first imported from an atexit handler).
    with contextlib.suppress(RuntimeError):
        if register is not None:
            register(_stop_at_exit)
        else:  # not CPython: atexit still runs before daemon threads are killed
            atexit.register(_stop_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


_register()
