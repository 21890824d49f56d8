"""What becomes of running coordinators when the interpreter exits.

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

The hook is registered once, when this module is first imported.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading

from . import _runtime

__all__: list[str] = []

log = logging.getLogger("tokengate.coordinator")


def _stop_at_exit() -> None:
    """Stop every running coordinator, waiting for its pending tokens (see the module doc)."""
    _runtime.exiting = True
    interrupted = False
    for coordinator in _runtime.running_coordinators():
        try:
            coordinator._stop_at_exit(wait=not interrupted)
        except KeyboardInterrupt:
            interrupted = True  # the other coordinators stop without waiting either
        except Exception:
            log.exception("stopping %r at interpreter exit failed", coordinator)


def _register() -> None:
    register = getattr(threading, "_register_atexit", None)
    # RuntimeError: the interpreter is already exiting (first imported from an atexit handler).
    with contextlib.suppress(RuntimeError):
        if register is not None:
            register(_stop_at_exit)
        else:  # not CPython: atexit still runs before daemon threads are killed
            atexit.register(_stop_at_exit)


_register()
