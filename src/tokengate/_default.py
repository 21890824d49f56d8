"""The default coordinator: one line for scripts and notebooks.

``tokengate.use_default()`` opts the program in. From then on, a decorated call made while no
coordinator is running starts the default coordinator (once, on that first call) and goes to
it, as Ray starts itself on first use. It drains at interpreter exit like a coordinator stopped
by hand: every token submitted runs to its end.

It never competes with an explicit coordinator: it sits at the bottom of the running stack
(``_runtime.push_coordinator``), so while any coordinator started with ``with`` or ``start()``
is running, calls go to that one, whether it was started before or after the default. Calls
made inside a task go, as always, to the coordinator running that task.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from . import _runtime
from ._coordinator import OperationsCoordinator
from ._errors import ConfigError, CoordinatorNotRunning

__all__ = ["default_coordinator", "use_default"]

log = logging.getLogger("tokengate.coordinator")

_lock = threading.RLock()
_options: dict[str, Any] = {}
_coordinator: OperationsCoordinator | None = None
_exit_registered = False
_exiting = False


def use_default(**options: Any) -> None:
    """Opt in to the default coordinator, started on the first decorated call that finds no
    coordinator running, and drained at interpreter exit.

    ``options`` are ``OperationsCoordinator``'s keyword arguments, checked now. Calling it again
    with the same options does nothing (a notebook cell run twice); with other options it
    replaces a default that has not started, and is a ``ConfigError`` while one is running.
    """
    global _coordinator, _options
    with _lock:
        current = _coordinator
        if current is not None and options == _options:
            _runtime.default_starter = _start
            return
        if current is not None and current.running:
            raise ConfigError(
                f"the default coordinator is already running with options {_options!r}, not "
                f"{options!r}; stop it first (tokengate.default_coordinator().stop()) or pass "
                f"the same options"
            )
        made = OperationsCoordinator(**options)  # bad options fail here, not at the first call
        _coordinator, _options = made, dict(options)
        _runtime.default = made
        _runtime.default_starter = _start


def default_coordinator() -> OperationsCoordinator:
    """The default coordinator, started now if it is not running (opting in, with default
    options, if ``use_default`` was not called): for its ``stats()``, ``stop()`` and the rest."""
    with _lock:
        if _coordinator is None:
            use_default()
        _start()
        assert _coordinator is not None
        return _coordinator


def _start() -> Any:
    """Start the default coordinator unless it runs; the coordinator a call goes to now."""
    global _exit_registered
    with _lock:
        coordinator = _coordinator
        if coordinator is None:  # (the starter is set only once it exists)
            return _runtime.current_coordinator()
        if not coordinator.running:
            if _exiting or _runtime.exiting:
                raise CoordinatorNotRunning(
                    "the default coordinator was stopped at interpreter exit; a call made now "
                    "(from an atexit handler or a thread still running) cannot start it again"
                )
            coordinator.start()
            if not _exit_registered:
                atexit.register(_drain_at_exit)
                _exit_registered = True
    # An explicit coordinator started meanwhile on another thread still wins.
    return _runtime.current_coordinator()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # a parent thread may have held it at the fork: held for ever


if hasattr(os, "register_at_fork"):  # once per process, at import
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _drain_at_exit() -> None:
    global _exiting
    with _lock:
        _exiting = True
        coordinator = _coordinator
    if coordinator is not None and coordinator.running:
        log.debug("draining the default coordinator at interpreter exit")
        coordinator.stop()
