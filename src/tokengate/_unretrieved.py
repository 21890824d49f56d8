"""Errors nobody retrieved: a failed token that is collected unasked logs its error once.

asyncio logs "Task exception was never retrieved" from ``Future.__del__``. A ``__del__`` on
Token would make every token pay for a finaliser, so only a token that *fails* gets an
:class:`Unretrieved` (asyncio's ``_TracebackLogger`` of Python 3.3 did the same): it lives in
the token's ``__dict__``, dies with the token, and holds the error, not the token.

The finaliser does not log itself. It runs wherever the garbage collector happens to run, and
formatting a traceback there is not safe: on Python 3.11 it parses source (``ast``) to place its
carets, and a collection that fires inside another ``ast.parse`` then breaks that parse with
``SystemError: AST constructor recursion depth mismatch``. So the finaliser only puts the error
on a ``queue.SimpleQueue`` (whose ``put`` is made to be called from finalisers), and a daemon
thread, started with the first failure, logs it; whatever is still queued at exit is logged by
an ``atexit`` hook. That thread formats the traceback itself, without the carets, since placing
them parses source too (see ``_report``).

The rule of what counts as retrieved is Token's (``Token._retrieved``): ``get()``/``result()``
raising the error, ``exception()``, ``await``, or a done-callback added before or after the
failure. tokengate's own bookkeeping does not count, and a dependent that fails with
``DependencyFailed`` takes the error over (as its ``__cause__``): only the dependent is logged.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import traceback

__all__ = ["Unretrieved"]

log = logging.getLogger("tokengate.token")

_reports: queue.SimpleQueue[tuple[str, BaseException]] = queue.SimpleQueue()
_start_lock = threading.Lock()
_reporter: threading.Thread | None = None


class Unretrieved:
    """Reports ``error`` of token ``token_id`` when collected, unless :attr:`error` was cleared
    (the token's error was retrieved)."""

    __slots__ = ("error", "token_id")

    def __init__(self, token_id: str, error: BaseException) -> None:
        self.token_id = token_id
        self.error: BaseException | None = error
        reporter = _reporter
        if reporter is None or not reporter.is_alive():  # first failure, or a forked child
            _start_reporter()

    def __del__(self) -> None:
        error = self.error
        if error is not None:
            self.error = None
            _reports.put((self.token_id, error))


def _start_reporter() -> None:
    global _reporter
    with _start_lock:
        if _reporter is None or not _reporter.is_alive():
            _reporter = threading.Thread(
                target=_report_forever, name="tokengate-unretrieved", daemon=True
            )
            _reporter.start()


def _report_forever() -> None:
    while True:
        _report(*_reports.get())


def _report(token_id: str, error: BaseException) -> None:
    with contextlib.suppress(Exception):  # a broken handler must not end the reporter
        if not log.isEnabledFor(logging.WARNING):
            return
        record = log.makeRecord(
            log.name,
            logging.WARNING,
            __file__,
            0,
            "token %s failed and its error was never retrieved (call get(), result() or "
            "exception(), await it, or add a done-callback)",
            (token_id,),
            (type(error), error, error.__traceback__),
        )
        # Formatted here, without the carets under the failing expression: Python 3.11 places
        # them with ast.parse, whose depth counter is shared by all threads, so formatting on
        # this thread while another parses fails that parse with "AST constructor recursion
        # depth mismatch". A formatter uses exc_text when it is set.
        record.exc_text = format_without_carets(error).rstrip("\n")
        log.handle(record)


def format_without_carets(error: BaseException) -> str:
    """``traceback.format_exception(error)`` without the ``^^^^`` lines, parsing nothing."""
    formatted = traceback.TracebackException(type(error), error, error.__traceback__)
    seen: set[int] = set()
    pending = [formatted]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for frame in current.stack:
            frame.colno = frame.end_colno = None  # no columns: no carets to place
        pending.extend(
            chained for chained in (current.__cause__, current.__context__) if chained is not None
        )
        pending.extend(getattr(current, "exceptions", None) or ())
    return "".join(formatted.format())


@atexit.register
def _report_the_rest() -> None:
    while True:
        try:
            item = _reports.get_nowait()
        except queue.Empty:
            return
        _report(*item)
