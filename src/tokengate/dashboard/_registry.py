"""Recent tokens by id, failures with tracebacks, and the task stream, for the dashboard.

:class:`RecentTokens` keeps the last ``capacity`` attempts and discards (the tokens, in a bounded
deque), and the last ``failures`` failed tokens with their formatted tracebacks. It is attached
only when the first page (or API read) looks, so a coordinator that is never looked at pays
nothing. Once attached, the completion path appends each ended token to the deque itself (one C
call, no middleware call per token); only failures reach the middleware hook, for their
tracebacks. A look-up scans the deques, at request time. Tokens still queued or running are
found by scanning the lanes at lookup time, so the hot path never records them.

Holding the token (not a copy of its fields) keeps its result alive until it is evicted: the
capacity bounds that, and a page reads the token's own, always current, state. Failed tokens
are kept apart as well, so the last ``failures`` stay found however many tokens end after them.
"""

from __future__ import annotations

import traceback
from collections import deque
from typing import TYPE_CHECKING, Any

from .._middleware import Middleware
from .._token import _ID_BASE

if TYPE_CHECKING:
    from .._coordinator import OperationsCoordinator
    from .._token import Token

__all__ = ["RECENT_CAPACITY", "RecentTokens", "parse_token_id"]

#: How many ended tokens a dashboard keeps for look-up and the task stream.
RECENT_CAPACITY = 2_000


def parse_token_id(token_id: str) -> int | None:
    """The sequence number in ``<operation_type>_<number>``, or None if it is not one."""
    _, sep, number = token_id.rpartition("_")
    if not sep or not number.isdigit() or len(number) > 30:
        return None
    seq = int(number) - _ID_BASE
    return seq if seq >= 0 else None


class RecentTokens(Middleware):
    """The last ``capacity`` ended (or retried) tokens and the last ``failures`` tracebacks."""

    def __init__(self, capacity: int = RECENT_CAPACITY, failures: int = 50) -> None:
        self.capacity = capacity
        self.failures = failures
        # A bounded deque: appending is one atomic C call, no lock, the oldest falls out.
        self._tokens: deque[Token[Any]] = deque(maxlen=capacity)
        self._failed: deque[Token[Any]] = deque(maxlen=failures)
        self.tracebacks: deque[tuple[str, str]] = deque(maxlen=failures)

    def attach(self, coordinator: OperationsCoordinator) -> None:
        """Start recording ``coordinator``'s ends: its completion path fills the deque, and
        failures come to :meth:`after_failure` for their tracebacks."""
        coordinator._completion.recent = self._tokens
        coordinator.add_middleware(self)

    def after_failure(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        if exc is not None:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.tracebacks.append((token.id, text[-8_000:]))
            self._failed.append(token)

    def _snapshot(self) -> list[Token[Any]]:
        return _copy(self._tokens)

    def recent(self, limit: int) -> list[Token[Any]]:
        """The last ``limit`` runs recorded (a retried token once per attempt), oldest first,
        each token once."""
        seen: set[int] = set()
        tokens = []
        for token in reversed(self._snapshot()):
            if token.seq not in seen:
                seen.add(token.seq)
                tokens.append(token)
                if len(tokens) == limit:
                    break
        tokens.reverse()
        return tokens

    def find(self, coordinator: OperationsCoordinator, token_id: str) -> Token[Any] | None:
        """The token with this id: running, queued in a mailbox, in quarantine, or recently
        ended."""
        seq = parse_token_id(token_id)
        if seq is None:
            return None
        for token in (*reversed(self._snapshot()), *reversed(_copy(self._failed))):
            if token.seq == seq:
                return token if token.id == token_id else None
        for worker in coordinator.iter_workers():
            current = worker.current
            if current is not None and getattr(current, "seq", None) == seq:
                return current if current.id == token_id else None
        for held in coordinator.quarantine:
            if held.seq == seq:
                return held if held.id == token_id else None
        for lane in coordinator.lanes.values():
            for queued in lane.queued():
                if queued.seq == seq:
                    return queued if queued.id == token_id else None
        return None


def _copy(tokens: deque[Token[Any]]) -> list[Token[Any]]:
    """A copy of a deque other threads append to."""
    for _ in range(100):
        try:
            return list(tokens)
        except RuntimeError:  # appended to while copying: try again
            continue
    return []  # pragma: no cover - would need 100 appends racing 100 copies
