"""Logging set-up for ``verbose=True`` and ``convergence_verbose=True``.

Library code only logs, on ``tokengate.<part>`` loggers, so an operator can switch on exactly what
they need with ordinary ``logging`` configuration. The two Quick-Proof flags are shortcuts that
attach a handler printing the bare messages (the Quick-Proof's log lines) to stdout.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["attach_verbose_handlers", "detach_verbose_handlers", "level_answers"]


def level_answers(logger: logging.Logger) -> dict[int, bool]:
    """``logger``'s own cache of ``isEnabledFor`` answers, for the hot path to read first.

    ``logging`` fills it on each ``isEnabledFor`` and empties it (same dict) whenever any level
    changes (``setLevel``, ``logging.disable``), so a cached ``False`` is never stale:
    ``if answers.get(DEBUG, True) and logger.isEnabledFor(DEBUG)`` costs one C-level dict lookup
    while DEBUG is off, where ``isEnabledFor`` costs a Python call (B1 made five per token). A
    logger's ``disabled`` flag is not in the cache, but the ``isEnabledFor`` that follows (and
    the one in ``debug``) still honours it. If this Python's ``logging`` keeps no such cache, the
    answer is an empty dict: every check then asks ``isEnabledFor``, as before.
    """
    cache = getattr(logger, "_cache", None)
    return cache if isinstance(cache, dict) else {}


def _handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.set_name("tokengate-verbose")
    return handler


def attach_verbose_handlers(
    *, verbose: bool, convergence: bool
) -> list[tuple[logging.Logger, logging.Handler, int, bool]]:
    """Attach the Quick-Proof-style handlers; returns what to undo on stop."""
    attached = []
    names = []
    if verbose:
        names.append("tokengate")
    elif convergence:
        names.append("tokengate.convergence")
    for name in names:
        logger = logging.getLogger(name)
        handler = _handler()
        attached.append((logger, handler, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    if verbose and not convergence:
        conv = logging.getLogger("tokengate.convergence")
        attached.append((conv, logging.NullHandler(), conv.level, conv.propagate))
        conv.setLevel(logging.WARNING)
    return attached


def detach_verbose_handlers(
    attached: list[tuple[logging.Logger, logging.Handler, int, bool]],
) -> None:
    for logger, handler, level, propagate in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
