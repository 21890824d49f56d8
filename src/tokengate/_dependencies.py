"""Chains: a Token passed as an argument is a dependency.

A token whose arguments hold other tokens (directly, or inside a list, tuple or dict) waits here,
occupying no worker, until every dependency is terminal. Then its arguments are rebuilt with the
resolved values and it is admitted like any other token. If a dependency fails or is discarded,
the dependent fails with ``DependencyFailed`` chained to the cause, without running; its own
dependents follow through the same path.

The scan is the only cost on the hot path: one ``type()`` check per argument. It and the
substitution walk containers with a loop, not recursion, so no nesting depth breaks them.

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
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from itertools import chain
from typing import Any

from ._errors import DependencyFailed
from ._parking import Parking, park
from ._token import Token

__all__ = ["DependencyTracker", "find_dependencies", "replace_tokens", "substitute"]

_CONTAINERS = (list, tuple, dict)
_TRACK_DEPTH = 32  # from this nesting depth on, the scan remembers containers (cycles)
_TRACK_AFTER = 256  # after this many containers too (shared ones: ``x = [x, x]`` over and over)
log = logging.getLogger("tokengate.dependencies")


def _collect(root: Any, out: list[Token[Any]]) -> None:
    """Append the Tokens inside the container ``root`` to ``out``, depth first, in order.

    A loop over a stack of iterators, not recursion: an argument nested thousands deep (a
    linked list made of pairs, say) is an ordinary value, and must not end the call with a
    bare ``RecursionError``. Below ``_TRACK_DEPTH`` levels, or past ``_TRACK_AFTER`` containers,
    the containers met are remembered and each is looked into once, so one that holds itself
    ends the walk, and one shared by many places (a value built as ``x = [x, x]`` twenty times
    has a million paths) is walked once. Small values, the usual case, cost no bookkeeping.
    """
    stack = [iter(root.values() if type(root) is dict else root)]
    seen: set[int] | None = None
    walked = 0
    while stack:
        for item in stack[-1]:
            kind = type(item)
            if kind is list or kind is tuple or kind is dict:
                walked += 1
                if len(stack) >= _TRACK_DEPTH or walked > _TRACK_AFTER:
                    if seen is None:
                        seen = set()
                    elif id(item) in seen:
                        continue
                    seen.add(id(item))
                stack.append(iter(item.values() if kind is dict else item))
                break  # go down into it; this level's iterator resumes afterwards
            if isinstance(item, Token):
                out.append(item)
        else:
            stack.pop()


def _token_kind(kinds: set[type]) -> bool:
    return any(issubclass(kind, Token) for kind in kinds)


def _may_hold_tokens(value: list[Any] | tuple[Any, ...]) -> bool:
    """False when a look at C speed proves that ``value`` holds no Token: none of its items is
    a Token or a container, or every item is a tuple (a batched map's calls' arguments) and
    none of theirs is. True sends it to :func:`_collect`, whose walk costs a Python step per
    item: a batch of a thousand calls is looked at in microseconds instead of milliseconds."""
    kinds = set(map(type, value))
    if kinds.isdisjoint(_CONTAINERS):
        return _token_kind(kinds)
    if kinds == {tuple}:
        inner = set(map(type, chain.from_iterable(value)))
        if inner.isdisjoint(_CONTAINERS):
            return _token_kind(inner)
    return True


def find_dependencies(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Token[Any]]:
    """Every Token in ``args``/``kwargs``, in order, without duplicates; [] on the fast path."""
    found: list[Token[Any]] = []
    for value in args:
        if isinstance(value, Token):
            found.append(value)
        elif type(value) in _CONTAINERS and (type(value) is dict or _may_hold_tokens(value)):
            _collect(value, found)
    if kwargs:
        for value in kwargs.values():
            if isinstance(value, Token):
                found.append(value)
            elif type(value) in _CONTAINERS and (type(value) is dict or _may_hold_tokens(value)):
                _collect(value, found)
    if len(found) > 1:
        found = list(dict.fromkeys(found))
    return found


def replace_tokens(value: Any, replace: Callable[[Token[Any]], Any]) -> Any:
    """``value`` with every Token in it (through lists, tuples and dicts) replaced by
    ``replace(token)``; those containers are rebuilt, anything else is passed as it is.

    Iterative, for the reason given in :func:`_collect`. Rebuilt as ``copy.deepcopy`` rebuilds
    them: a container shared by two places is rebuilt once and still shared, and one that holds
    itself holds its rebuilt self.
    """
    if isinstance(value, Token):
        return replace(value)
    kind = type(value)
    if kind is list or kind is tuple:  # the usual case first: a flat list of tokens (fan-in)
        flat = []
        for item in value:
            if isinstance(item, Token):
                flat.append(replace(item))
            elif type(item) in _CONTAINERS:
                break  # nested: rebuilt below (``replace`` is idempotent)
            else:
                flat.append(item)
        else:
            return flat if kind is list else tuple(flat)
    elif kind is not dict:
        return value
    memo: dict[int, Any] = {}
    stack = [_Frame(value, memo)]
    while True:
        frame = stack[-1]
        built, is_dict = frame.built, frame.is_dict
        key = None
        for entry in frame.items:
            if is_dict:
                key, item = entry
            else:
                item = entry
            if isinstance(item, Token):
                item = replace(item)
            else:
                kind = type(item)
                if kind is list or kind is tuple or kind is dict:
                    done = memo.get(id(item))
                    if done is None:
                        frame.key = key
                        stack.append(_Frame(item, memo))
                        break  # rebuild it first; it is added to this one when complete
                    item = done
            if is_dict:
                built[key] = item
            else:
                built.append(item)
        else:
            stack.pop()
            result = frame.finish(memo)
            if not stack:
                return result
            parent = stack[-1]
            if parent.is_dict:
                parent.built[parent.key] = result
            else:
                parent.built.append(result)


class _Frame:
    """A container being rebuilt by :func:`replace_tokens`."""

    __slots__ = ("built", "is_dict", "items", "key", "original")

    def __init__(self, original: Any, memo: dict[int, Any]) -> None:
        self.original = original
        self.key: Any = None  # the dict key of the item being rebuilt below this frame
        kind = type(original)
        self.is_dict = kind is dict
        self.items: Iterator[Any] = iter(original.items() if self.is_dict else original)
        self.built: Any = {} if self.is_dict else []
        if kind is not tuple:  # registered before its items: one that holds it gets the new one
            memo[id(original)] = self.built

    def finish(self, memo: dict[int, Any]) -> Any:
        if type(self.original) is not tuple:
            return self.built
        # A tuple inside a cycle (through a list or dict of its own) was rebuilt already on the
        # way back round to it: that one is the result, as in deepcopy.
        done = memo.get(id(self.original))
        if done is None:
            done = memo[id(self.original)] = tuple(self.built)
        return done


def substitute(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with every (finished) Token replaced by its value."""
    return (
        tuple(replace_tokens(a, _value) for a in args),
        {k: replace_tokens(v, _value) for k, v in kwargs.items()},
    )


def _value(token: Token[Any]) -> Any:
    return token.result(0)


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
        park(token, Parking.DEPS)
        with self._lock:
            self._waiting[token] = deps

        def on_done(_dep: Future[Any]) -> None:
            self._on_dependency_done(token)

        for dep in deps:
            dep._add_callback(on_done)  # a failure is passed on (exception(0))

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
