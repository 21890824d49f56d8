"""Token interception: hold rules send a call's token to quarantine before it runs.

``coordinator.hold_when(rule)`` installs a rule, a function of the call's ``TaskSpec``, positional
and keyword arguments that returns why to hold it (a string, or ``True``) or a false value to let
it through. A held token is counted as submitted and in flight, but waits in quarantine, on no
worker, until the operator releases it (it is admitted as if just called) or rejects it (it ends
discarded with the reason given). Nothing held is lost: ``stop()`` discards what is still held,
with reason ``"stopped while quarantined"``, before it waits for the rest.

Rules see only calls from outside the coordinator's tasks: a task waiting on a quarantined child
would hold its worker until an operator acted. With no rule installed a call pays one truthiness
check; the held tokens wait in the coordinator's held-token backlog (as an executor's
``max_workers`` overflow does), so an external producer blocks once as many are held as the
mailboxes hold.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._coordinator import OperationsCoordinator
    from ._spec import TaskSpec
    from ._token import Token

__all__ = ["HoldRule", "Quarantine"]

log = logging.getLogger("tokengate.control")

HoldRule = Callable[["TaskSpec", tuple[Any, ...], dict[str, Any]], "str | bool | None"]
"""``rule(spec, args, kwargs)``: why to hold the call (a string, or True), or a false value."""

STOPPED = "stopped while quarantined"


class Quarantine:
    """Hold rules and the held tokens of one coordinator (``hold_when``, ``quarantine``,
    ``release`` and ``reject`` call it; ``_submit`` reads :attr:`rules` and calls
    :meth:`reason` and :meth:`add`; ``stop()`` calls :meth:`discard_all`)."""

    def __init__(self) -> None:
        self.rules: list[tuple[str | None, HoldRule]] = []
        self.held: dict[Token[Any], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def hold_when(self, rule: HoldRule, operation: str | None) -> None:
        """``coordinator.hold_when``."""
        if not callable(rule):
            raise TypeError(f"rule must be callable as rule(spec, args, kwargs), got {rule!r}")
        if operation is not None and (not isinstance(operation, str) or not operation):
            raise ValueError(f"operation must be an operation type name, got {operation!r}")
        self.rules.append((operation, rule))

    def reason(self, spec: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Why the rules hold this call, or None (called only while a rule is installed)."""
        for operation, rule in self.rules:
            if operation is not None and operation != spec.operation_type:
                continue
            verdict = rule(spec, args, kwargs)
            if verdict:
                name = getattr(rule, "__name__", "a hold rule")
                return verdict if isinstance(verdict, str) else f"held by {name}"
        return None

    def add(self, token: Token[Any], reason: str, *, accepting: Callable[[], bool]) -> None:
        """Record a token the rules held (it is in the coordinator's held backlog already);
        ``accepting()`` says whether the coordinator still takes calls (not stopping)."""
        if token.done():  # discarded while it was being held (stop() closed the workers)
            return
        with self._lock:
            self.held[token] = (reason, time.time())
        if log.isEnabledFor(logging.INFO):
            log.info("[QUARANTINE] Token %s held: %s", token.id, reason)
        if not accepting() and self._take(token):
            token._discard(STOPPED)  # stop() began meanwhile and did not see it

    def tokens(self) -> Mapping[Token[Any], str]:
        """``coordinator.quarantine``."""
        with self._lock:
            items = [(t, reason) for t, (reason, _) in self.held.items() if not t.done()]
        return dict(items)

    def _take(self, token: Token[Any]) -> bool:
        with self._lock:
            return self.held.pop(token, None) is not None

    def release(self, coordinator: OperationsCoordinator, token: Token[Any]) -> bool:
        """``coordinator.release``."""
        if not self._take(token):
            return False
        released = coordinator._release_held(token)
        log.info("[QUARANTINE] Token %s released by the operator", token.id)
        return released

    def reject(self, token: Token[Any], reason: str) -> bool:
        """``coordinator.reject``."""
        if not self._take(token):
            return False
        discarded = token._discard(reason)
        log.info("[QUARANTINE] Token %s rejected by the operator: %s", token.id, reason)
        return discarded

    def discard_all(self) -> int:
        """At stop: discard every token still held, so the drain does not wait for them."""
        with self._lock:
            held, self.held = list(self.held), {}
        count = sum(1 for token in held if token._discard(STOPPED))
        if count:
            log.warning("[QUARANTINE] %d quarantined tokens discarded at stop", count)
        return count
