"""Progress over tokens: ``progress(tokens)``, ``fn.map(..., progress=True)``, ``live()``.

Where the output goes is the one design question. Library code logs, it never prints; a
progress bar is output the program explicitly asked for, so it is drawn, like tqdm's, on
standard error (``file=`` to choose another stream), and only when that stream is a terminal and
rich (the ``cli`` extra) is installed. Everywhere else (a pipe, a CI log, no rich) progress is a
plain line now and then, logged at INFO on ``tokengate.progress``; a program that configured no
logging at all would never see those, so then the lines are written to the stream instead.
rich is imported only when a bar is drawn.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, as_completed
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from ._errors import ConfigError
from ._token import check_timeout

if TYPE_CHECKING:
    from ._coordinator import OperationsCoordinator

__all__ = ["Bar", "live", "open_bar", "progress"]

F = TypeVar("F", bound=Future[Any])

progress_log = logging.getLogger("tokengate.progress")
DEFAULT_INTERVAL = 10.0
"""Seconds between plain progress lines."""


def _check_interval(interval: object) -> float:
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or math.isnan(interval)
        or interval < 0
    ):
        raise ConfigError(f"interval must be a number of seconds >= 0, got {interval!r}")
    return float(interval)


def line_sink(logger: logging.Logger, out: IO[str]) -> Callable[[str], None]:
    """Where plain progress lines go: ``logger`` at INFO if logging is configured for it, else
    straight to ``out`` (an explicit request for progress is never silent)."""
    if logger.hasHandlers():

        def log_line(line: str) -> None:
            logger.info("%s", line)

        return log_line

    def write_line(line: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: stay quiet
            out.write(line + "\n")
            out.flush()

    return write_line


def _is_terminal(out: IO[str]) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Bar:
    """Counts completions; the plain form logs a line every ``interval`` seconds and at the end."""

    def __init__(
        self,
        total: int | None,
        description: str,
        *,
        interval: float,
        emit: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.description = description
        self.done = 0
        self.failed = 0
        self.discarded = 0
        self._interval = interval
        self._emit = emit
        self._clock = clock
        self._started = self._last = clock()
        self._closed = False

    def advance(self, future: Future[Any]) -> None:
        """One more ``future`` has ended (resolved, failed or discarded)."""
        self.done += 1
        if future.cancelled():
            self.discarded += 1
        elif _failed(future):
            self.failed += 1
        self._update()

    def _update(self) -> None:
        now = self._clock()
        if now - self._last >= self._interval:
            self._last = now
            self._emit(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (self._clock() if now is None else now) - self._started
        of = "" if self.total is None else f"/{self.total}"
        return (
            f"[progress] {self.description}: {self.done}{of} done, {self.failed} failed, "
            f"{self.discarded} discarded, {elapsed:.1f} s"
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(self.line())


class _CannotDraw(Exception):
    """rich is there but cannot draw now (an older rich with another live display running)."""


_consoles: weakref.WeakKeyDictionary[IO[str], Any] = weakref.WeakKeyDictionary()


def console_for(out: IO[str]) -> Any:
    """One rich ``Console`` per stream, so a bar inside ``live()`` nests in its display
    instead of both redrawing over each other (rich 14+ nests; older rich refuses)."""
    from rich.console import Console

    try:
        return _consoles[out]
    except (KeyError, TypeError):
        pass
    console = Console(file=out)
    with contextlib.suppress(TypeError):  # a stream that takes no weak reference: no caching
        _consoles[out] = console
    return console


class _RichBar(Bar):
    """The same counts drawn as a rich progress bar (on a terminal)."""

    def __init__(self, total: int | None, description: str, *, out: IO[str]) -> None:
        from rich.errors import LiveError
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        super().__init__(total, description, interval=math.inf, emit=lambda _: None)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console_for(out),
        )
        self._task = self._progress.add_task(description, total=total, failed=0)
        try:
            self._progress.start()
        except LiveError as exc:
            raise _CannotDraw(str(exc)) from exc

    def _update(self) -> None:
        self._progress.update(self._task, completed=self.done, failed=self.failed)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._progress.stop()


def _failed(future: Future[Any]) -> bool:
    state = getattr(future, "state", None)  # a Token says so without retrieving its error
    if isinstance(state, str):
        return state == "failed"
    return future.exception(0) is not None


def open_bar(
    total: int | None,
    description: str,
    *,
    interval: float = DEFAULT_INTERVAL,
    file: IO[str] | None = None,
) -> Bar:
    """A rich bar on ``file`` (default stderr) if it is a terminal and rich is installed, else
    plain lines (see the module docstring)."""
    out = sys.stderr if file is None else file
    if _is_terminal(out):
        with contextlib.suppress(ImportError, _CannotDraw):
            return _RichBar(total, description, out=out)
    return Bar(total, description, interval=interval, emit=line_sink(progress_log, out))


def progress(
    tokens: Iterable[F],
    *,
    description: str = "tokens",
    timeout: float | None = None,
    interval: float = DEFAULT_INTERVAL,
    file: IO[str] | None = None,
) -> Iterator[F]:
    """Yield ``tokens`` as they complete (like ``as_completed``) while showing progress.

    On a terminal with rich installed: a progress bar on standard error (or ``file``) with done
    / total, failures, elapsed and remaining time. Otherwise a plain line every ``interval``
    seconds and one at the end, logged at INFO on ``tokengate.progress`` (written to the stream
    if logging is not configured). Works on any ``concurrent.futures.Future``. ``timeout`` is
    as for ``as_completed``: ``TimeoutError`` if they have not all completed by then. Reading a
    token's state for the failure count does not retrieve its error.
    """
    timeout = check_timeout(timeout)
    interval = _check_interval(interval)
    futures = list(tokens)
    for future in futures:
        if not isinstance(future, Future):
            raise TypeError(
                f"progress() takes tokens (or concurrent.futures futures), got "
                f"{type(future).__name__} {future!r}"
            )
    return _progress(futures, description, timeout, interval, file)


def _progress(
    futures: list[F],
    description: str,
    timeout: float | None,
    interval: float,
    file: IO[str] | None,
) -> Iterator[F]:
    bar = open_bar(len(set(futures)), description, interval=interval, file=file)
    try:
        for future in as_completed(futures, timeout):
            bar.advance(future)
            yield cast(F, future)
    finally:
        bar.close()


@contextlib.contextmanager
def live(
    coordinator: OperationsCoordinator,
    *,
    title: str = "tokengate",
    interval: float = 2.0,
    file: IO[str] | None = None,
) -> Iterator[None]:
    """The demos' live view of ``coordinator`` while the block runs (see
    ``OperationsCoordinator.live``)."""
    interval = _check_interval(interval)
    out = sys.stderr if file is None else file
    from .cli._display import LiveDisplay, PlainDisplay, plain_line

    display: LiveDisplay | PlainDisplay | None = None
    if _is_terminal(out):
        with contextlib.suppress(ImportError):
            display = LiveDisplay(
                coordinator, title, console=console_for(out), title=title, hint=""
            )
    if display is None:
        display = PlainDisplay(
            coordinator,
            title,
            interval=max(interval, 0.01),
            out=_SinkWriter(line_sink(progress_log, out)),  # type: ignore[arg-type]
            title=title,
            hint="",
        )
    display.start()
    try:
        yield
    finally:
        display.stop()
        if isinstance(display, PlainDisplay):  # the closing numbers, whatever the interval
            display.say(plain_line(display.status()))


class _SinkWriter:
    """A text stream that hands each line written to it to ``sink``."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self._sink = sink

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self._sink(line)
        return len(text)

    def flush(self) -> None:
        pass
