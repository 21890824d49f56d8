"""Chains: a Token passed as an argument is a dependency.

A token whose arguments hold other tokens (directly, or inside a list, tuple or dict) waits here,
occupying no worker, until every dependency is terminal. Then its arguments are rebuilt with the
resolved values and it is admitted like any other token. If a dependency fails or is discarded,
the dependent fails with ``DependencyFailed`` chained to the cause, without running; its own
dependents follow through the same path.

The scan is the only cost on the hot path: one ``type()`` check per argument.

Releases never recurse. Failing a dependent runs its done-callbacks, which release *its*
dependents, and so on down the chain; done naively that is a few stack frames per link, and a
chain of a few hundred tokens broke the recursion limit half-way, leaving the rest pending for
ever. A thread already releasing queues further releases and its outermost call works through
them in a loop, so any chain length runs in constant stack depth.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ._errors import DependencyFailed
from ._token import Token

__all__ = ["DependencyTracker", "find_dependencies", "substitute"]

_CONTAINERS = (list, tuple, dict)
log = logging.getLogger("tokengate.dependencies")


def _collect(value: Any, out: list[Token[Any]]) -> None:
    kind = type(value)
    if isinstance(value, Token):
        out.append(value)
    elif kind is list or kind is tuple:
        for item in value:
            _collect(item, out)
    elif kind is dict:
        for item in value.values():
            _collect(item, out)


def find_dependencies(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Token[Any]]:
    """Every Token in ``args``/``kwargs``, in order, without duplicates; [] on the fast path."""
    found: list[Token[Any]] = []
    for value in args:
        if isinstance(value, Token) or type(value) in _CONTAINERS:
            _collect(value, found)
    if kwargs:
        for value in kwargs.values():
            if isinstance(value, Token) or type(value) in _CONTAINERS:
                _collect(value, found)
    if len(found) > 1:
        found = list(dict.fromkeys(found))
    return found


def _replace(value: Any) -> Any:
    if isinstance(value, Token):
        return value.result(0)
    kind = type(value)
    if kind is list:
        return [_replace(item) for item in value]
    if kind is tuple:
        return tuple(_replace(item) for item in value)
    if kind is dict:
        return {key: _replace(item) for key, item in value.items()}
    return value


def substitute(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with every (finished) Token replaced by its value."""
    return tuple(_replace(a) for a in args), {k: _replace(v) for k, v in kwargs.items()}


class _Releasing(threading.local):
    queue: deque[Token[Any]] | None = None


class DependencyTracker:
    """Holds tokens until their dependencies finish, then hands them to ``admit``."""

    def __init__(
        self,
        admit: Callable[[Token[Any]], None],
        fail: Callable[[Token[Any], BaseException], None],
    ) -> None:
        self._admit = admit
        self._fail = fail
        self._lock = threading.Lock()
        self._waiting: dict[Token[Any], list[Token[Any]]] = {}
        self._releasing = _Releasing()

    def __len__(self) -> int:
        return len(self._waiting)

    def park(self, token: Token[Any], deps: list[Token[Any]]) -> None:
        """Wait for ``deps``; whichever thread ends the last one admits (or fails) the token."""
        token._parked = "deps"
        with self._lock:
            self._waiting[token] = deps

        def on_done(_dep: Future[Any]) -> None:
            self._on_dependency_done(token)

        for dep in deps:
            dep.add_done_callback(on_done)

    def _on_dependency_done(self, token: Token[Any]) -> None:
        local = self._releasing
        queue = local.queue
        if queue is not None:  # already releasing on this thread: the loop below takes it
            queue.append(token)
            return
        queue = local.queue = deque((token,))
        try:
            while queue:
                waiting = queue.popleft()
                try:
                    self._release(waiting)
                except Exception:  # one bad release must not strand the rest of the queue
                    log.exception("releasing token %s after its dependencies raised", waiting.id)
        finally:
            local.queue = None

    def _release(self, token: Token[Any]) -> None:
        with self._lock:
            deps = self._waiting.get(token)
            if deps is None:
                return  # already released or failed
            if token.done():
                del self._waiting[token]  # discarded while waiting
                return
            failed = next((d for d in deps if d.done() and _failed(d)), None)
            if failed is None and not all(d.done() for d in deps):
                return
            del self._waiting[token]
        if failed is not None:
            self._fail(token, _dependency_error(token, failed))
            return
        try:
            token.args, token.kwargs = substitute(token.args, token.kwargs)
        except BaseException as exc:  # pragma: no cover - a finished dep always has a value
            self._fail(token, exc)
            return
        token._parked = None
        self._admit(token)

    def unfinished(self, token: Token[Any]) -> list[Token[Any]]:
        """The dependencies of ``token`` not yet finished (for help-while-waiting)."""
        with self._lock:
            deps = self._waiting.get(token, [])
        return [d for d in deps if not d.done()]

    def drain(self) -> list[Token[Any]]:
        """Remove and return every waiting token (stop with ``cancel_pending``)."""
        with self._lock:
            tokens = list(self._waiting)
            self._waiting.clear()
        return tokens


def _failed(dep: Token[Any]) -> bool:
    return dep.cancelled() or dep.exception(0) is not None


def _dependency_error(token: Token[Any], dep: Token[Any]) -> DependencyFailed:
    if dep.cancelled():
        cause: BaseException = dep._discarded_error()
        what = f"was discarded ({dep.discard_reason or 'cancelled'})"
    else:
        cause = dep.exception(0)  # type: ignore[assignment]
        what = f"failed with {type(cause).__name__}: {cause}"
    if isinstance(cause, DependencyFailed) and cause.root_cause is not None:
        # Name the root, not the whole chain: nesting each message in the next one made the
        # messages of a long chain grow with its length (quadratic memory overall).
        root, root_message = cause.root_cause, cause.root_message
        what = f"did not run either; the chain broke at {root_message}"
    else:
        root, root_message = cause, f"{dep.id} ({dep.operation_type}), which {what}"
    err = DependencyFailed(
        f"token {token.id} ({token.operation_type}) did not run: its dependency {dep.id} "
        f"({dep.operation_type}) {what}"
    )
    err.__cause__ = cause
    err.root_cause = root
    err.root_message = root_message
    return err
