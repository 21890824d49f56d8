"""The Guard House's circuit breaker (``auto_block=True``): one circuit per operation type.

``block_after`` consecutive failed tokens (their final outcome, after retries; dependency
failures do not count) open it: calls of that operation type raise :class:`OperationBlocked`
at once. After ``block_cooldown`` seconds it is half-open: one call is let through as a probe,
the others are still refused; the next outcome of that operation type closes it (success) or
opens it again for another cool-down (failure).

Why it is its own middleware: it is the only part of the Guard House that acts rather than
watches, and the only one with a ``before_submit`` hook, so it is not installed at all unless
``auto_block`` is set and costs a call nothing then. The clock is injected (``clock``) so tests
need no sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._errors import DependencyFailed, OperationBlocked
from ..._middleware import Middleware
from ._monitor import type_name

if TYPE_CHECKING:
    from ..._spec import TaskSpec
    from ..._token import Token

__all__ = ["CLOSED", "HALF_OPEN", "OFF", "OPEN", "CircuitBreaker"]

log = logging.getLogger("tokengate.guard_house")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
OFF = "off"


class _Circuit:
    __slots__ = ("consecutive", "last_error", "opened_at", "probe_at", "state")

    def __init__(self) -> None:
        self.state = CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.probe_at: float | None = None
        self.last_error = ""


class CircuitBreaker(Middleware):
    """Refuses calls of an operation type after repeated failures, then probes."""

    def __init__(
        self,
        *,
        block_after: int = 5,
        block_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        count_event: Callable[[str, int], None] | None = None,
    ) -> None:
        self.block_after = block_after
        self.block_cooldown = block_cooldown
        self.clock = clock
        self._count_event = count_event
        self._circuits: dict[str, _Circuit] = {}
        self._blocked: dict[str, int] = {}  # calls refused, by operation type (never reset)
        self._lock = threading.Lock()

    # -- hooks -------------------------------------------------------------------------------------
    def before_submit(self, spec: TaskSpec) -> None:
        """Refuse a call whose operation type's circuit is open."""
        name = spec.operation_type
        circuit = self._circuits.get(name)
        if circuit is None or circuit.state == CLOSED:
            return
        with self._lock:
            now = self.clock()
            if circuit.state == OPEN:
                reopen = circuit.opened_at + self.block_cooldown
                if now >= reopen:
                    circuit.state = HALF_OPEN
                    circuit.probe_at = now
                    log.info("[GUARD_HOUSE] %r half-open: letting one probe call through", name)
                    return
                retry_in = reopen - now
                reason = (
                    f"its circuit breaker opened after {circuit.consecutive} consecutive "
                    f"failures (last: {circuit.last_error})"
                )
            elif circuit.state == HALF_OPEN:
                probe = circuit.probe_at
                if probe is None or now - probe >= self.block_cooldown:
                    circuit.probe_at = now
                    return
                retry_in = probe + self.block_cooldown - now
                reason = "a probe call is running after repeated failures"
            else:
                return
            self._blocked[name] = self._blocked.get(name, 0) + 1
        if self._count_event is not None:
            self._count_event("guard_house_blocked", 1)
        raise OperationBlocked(
            f"{name!r} is blocked by the Guard House: {reason}. Calls are refused for "
            f"{retry_in:.1f}s more, then one probe call is let through (auto_block=True; "
            f"block_after={self.block_after}, block_cooldown={self.block_cooldown:g}s)",
            operation_type=name,
            retry_in=retry_in,
        )

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        """Feed a token's final outcome to its circuit."""
        if outcome == "retried" or token.started_at is None or isinstance(exc, DependencyFailed):
            return
        name = token.spec.operation_type
        circuit = self._circuits.get(name)
        if outcome == "resolved":
            if circuit is None or (circuit.state == CLOSED and not circuit.consecutive):
                return
            with self._lock:
                was = circuit.state
                circuit.state = CLOSED
                circuit.consecutive = 0
                circuit.probe_at = None
            if was != CLOSED:
                log.info("[GUARD_HOUSE] %r closed again: a call succeeded", name)
            return
        with self._lock:
            if circuit is None:
                circuit = self._circuits[name] = _Circuit()
            circuit.consecutive += 1
            circuit.last_error = type_name(exc) if exc is not None else "?"
            was = circuit.state
            if was == HALF_OPEN or (was == CLOSED and circuit.consecutive >= self.block_after):
                circuit.state = OPEN
                circuit.opened_at = self.clock()
                circuit.probe_at = None
            else:
                return
        if self._count_event is not None:
            self._count_event("guard_house_opened", 1)
        log.warning(
            "[GUARD_HOUSE] %r blocked for %gs after %d consecutive failures (last: %s)%s",
            name,
            self.block_cooldown,
            circuit.consecutive,
            circuit.last_error,
            "; the probe failed" if was == HALF_OPEN else "",
        )

    def after_discard(self, token: Token[Any]) -> None:
        """A discarded token may have been the probe: let another call probe."""
        circuit = self._circuits.get(token.spec.operation_type)
        if circuit is not None and circuit.state == HALF_OPEN:
            with self._lock:
                circuit.probe_at = None

    # -- reading and control -----------------------------------------------------------------------
    def state(self, operation_type: str) -> str:
        """``closed``, ``open`` or ``half-open`` (as the next call would find it)."""
        circuit = self._circuits.get(operation_type)
        if circuit is None:
            return CLOSED
        if circuit.state == OPEN and self.clock() >= circuit.opened_at + self.block_cooldown:
            return HALF_OPEN  # the next call will be let through as the probe
        return circuit.state

    def retry_in(self, operation_type: str, now: float) -> float | None:
        """Seconds until an open circuit lets a probe through (None unless open)."""
        circuit = self._circuits.get(operation_type)
        if circuit is None or circuit.state != OPEN:
            return None
        return max(0.0, circuit.opened_at + self.block_cooldown - now)

    def blocked(self, operation_type: str) -> int:
        """How many calls of ``operation_type`` were refused."""
        return self._blocked.get(operation_type, 0)

    def names(self) -> set[str]:
        """The operation types with a circuit or a refused call."""
        with self._lock:
            return set(self._circuits) | set(self._blocked)

    def open(self, operation_type: str) -> None:
        """Open the circuit of ``operation_type`` by hand, as ``block_after`` failures do."""
        with self._lock:
            circuit = self._circuits.get(operation_type)
            if circuit is None:
                circuit = self._circuits[operation_type] = _Circuit()
            circuit.state = OPEN
            circuit.opened_at = self.clock()
            circuit.probe_at = None
            circuit.last_error = "opened by the operator"

    def reset(self, operation_type: str | None = None) -> None:
        """Close the circuit of one operation type (or all) by hand."""
        with self._lock:
            if operation_type is None:
                self._circuits.clear()
            else:
                self._circuits.pop(operation_type, None)
