"""Operator controls: pause and resume, drain, cancel queued work, kill a token.

:class:`Controls` is the coordinator's control component: ``coordinator.pause()``,
``resume``, ``drain``, ``cancel_queued`` and ``kill`` call it; each is logged on
``tokengate.control``. Per-operation pauses and drains are a middleware (``before_submit``)
installed on the first such control, so a coordinator nobody controls pays nothing for them.
Pausing admission uses the admission gate's pause, as the Overflow Guard does: producers block
as under backpressure, nothing is dropped.

``CONTROLS`` maps the dashboard's action names to these methods: the page can do nothing the
Python API cannot, and nothing from the browser is ever run as code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ._errors import CoordinatorNotRunning, OperationBlocked, TokenGateError
from ._middleware import Middleware

if TYPE_CHECKING:
    from ._admission import AdmissionGate
    from ._coordinator import OperationsCoordinator
    from ._spec import TaskSpec
    from ._token import Token

__all__ = ["CONTROLS", "KILLED", "Controls"]

log = logging.getLogger("tokengate.control")

KILLED = "killed by operator"
"""The discard reason of a token ended by ``coordinator.kill``."""
_OPERATOR = "operator"  # the admission gate's pause reason


class _OperationGate(Middleware):
    """Per-operation pauses (calls wait) and drains (calls are refused), on ``before_submit``."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.paused: set[str] = set()
        self.draining: set[str] = set()
        self.stopped = False

    def before_submit(self, spec: TaskSpec) -> None:
        name = spec.operation_type
        if name not in self.paused and name not in self.draining:
            return
        if name in self.draining:
            raise OperationBlocked(
                f"{name!r} is draining: new calls are refused while its queued tokens finish. "
                f"Call coordinator.resume({name!r}) to accept calls again",
                operation_type=name,
            )
        with self.cond:
            while name in self.paused and not self.stopped:
                self.cond.wait()
        if self.stopped:
            raise CoordinatorNotRunning(
                f"the coordinator stopped while a call of {name!r} waited for it to be resumed"
            )

    def on_start(self, coordinator: Any) -> None:
        self.stopped = False

    def on_stop(self, coordinator: Any) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class Controls:
    """The operator's controls of one coordinator (``coordinator.pause()`` and the rest call
    these). It keeps no reference to the coordinator: each method takes it as an argument."""

    def __init__(self, gate: AdmissionGate, add_middleware: Callable[[Middleware], None]) -> None:
        self._gate = gate
        self._add_middleware = add_middleware
        self._operations: _OperationGate | None = None

    def _gate_of_operations(self) -> _OperationGate:
        gate = self._operations
        if gate is None:
            gate = self._operations = _OperationGate()
            self._add_middleware(gate)
        return gate

    def pause(self, operation: str | None = None) -> None:
        """``coordinator.pause``."""
        if operation is None:
            self._gate.pause(_OPERATOR, "paused by the operator")
            log.info("[CONTROL] Admission paused by the operator")
            return
        name = _name(operation)
        gate = self._gate_of_operations()
        with gate.cond:
            gate.paused.add(name)
        log.info("[CONTROL] %r paused by the operator", name)

    def resume(self, operation: str | None = None) -> None:
        """``coordinator.resume``."""
        if operation is None:
            self._gate.resume(_OPERATOR)
            log.info("[CONTROL] Admission resumed by the operator")
            return
        name = _name(operation)
        gate = self._gate_of_operations()
        with gate.cond:
            gate.paused.discard(name)
            gate.draining.discard(name)
            gate.cond.notify_all()
        log.info("[CONTROL] %r resumed by the operator", name)

    def paused_operations(self) -> dict[str, str]:
        """``coordinator.paused_operations``."""
        gate = self._operations
        if gate is None:
            return {}
        with gate.cond:
            states = dict.fromkeys(gate.paused, "paused")
            states.update(dict.fromkeys(gate.draining, "draining"))
        return states

    def drain(self, operation: str) -> None:
        """``coordinator.drain``."""
        name = _name(operation)
        gate = self._gate_of_operations()
        with gate.cond:
            gate.draining.add(name)
            gate.paused.discard(name)
            gate.cond.notify_all()  # paused callers now learn it drains
        log.info("[CONTROL] %r draining by the operator", name)

    @staticmethod
    def cancel_queued(coordinator: OperationsCoordinator, operation: str) -> int:
        """``coordinator.cancel_queued``."""
        name = _name(operation)
        cancelled = 0
        for lane in coordinator.lanes.values():
            for token in lane.queued():
                if token.operation_type == name and token._discard("cancelled by operator"):
                    cancelled += 1
        log.info("[CONTROL] Cancelled %d queued %r tokens", cancelled, name)
        return cancelled

    @staticmethod
    def kill(coordinator: OperationsCoordinator, token: Token[Any]) -> str:
        """``coordinator.kill``."""
        if token.done():
            return f"token {token.id} had already ended ({token.state})"
        if token._discard(KILLED):
            log.info("[CONTROL] Token %s discarded (not running) by the operator", token.id)
            return f"token {token.id} discarded before it ran"
        lane = coordinator.lanes.get("process")
        if lane is not None:
            for worker in lane.workers:
                if worker.current is token and worker.kill_current(token):
                    log.info(
                        "[CONTROL] Token %s killed by the operator: worker process %s replaced",
                        token.id,
                        worker.name,
                    )
                    return f"token {token.id} killed: its worker process was replaced"
        raise TokenGateError(
            f"cannot kill token {token.id}: it is running on the {token.lane or '?'} lane "
            f"({token.worker}), and kill() can end a running token only on the process lane, "
            f"by killing its worker process; a Python thread cannot be stopped safely mid-task. "
            f"Use a timeout tag, or run such work on the process lane (executor='process')"
        )


def _name(operation: object) -> str:
    if not isinstance(operation, str) or not operation:
        raise ValueError(f"operation must be an operation type name, got {operation!r}")
    return operation


# -- the dashboard's actions ---------------------------------------------------------------------
def _find(coordinator: Any, data: dict[str, Any]) -> Token[Any]:
    token_id = data.get("token")
    if not isinstance(token_id, str):
        raise ValueError('"token" must be a token id string')
    registry = coordinator._dashboards.registry  # every dashboard's, shared
    if registry is not None:
        live = registry.find_live(coordinator, token_id)
        if live is not None:
            return cast("Token[Any]", live)
        ended = registry.find(coordinator, token_id)
        if ended is not None:
            raise ValueError(f"token {token_id!r} has ended ({ended.state}): nothing to act on")
    raise ValueError(f"no token {token_id!r} among the running, queued and held tokens")


def _pause(c: Any, data: dict[str, Any]) -> str:
    c.pause()
    return "admission paused: new calls wait"


def _resume(c: Any, data: dict[str, Any]) -> str:
    c.resume()
    return "admission resumed"


def _op(data: dict[str, Any]) -> str:
    return _name(data.get("operation"))


def _pause_op(c: Any, data: dict[str, Any]) -> str:
    c.pause(_op(data))
    return f"{_op(data)!r} paused: its calls wait"


def _resume_op(c: Any, data: dict[str, Any]) -> str:
    c.resume(_op(data))
    return f"{_op(data)!r} resumed"


def _drain_op(c: Any, data: dict[str, Any]) -> str:
    c.drain(_op(data))
    return f"{_op(data)!r} draining: new calls refused, queued ones finish"


def _cancel_queued(c: Any, data: dict[str, Any]) -> str:
    return f"cancelled {c.cancel_queued(_op(data))} queued {_op(data)!r} tokens"


def _kill(c: Any, data: dict[str, Any]) -> str:
    return cast(str, c.kill(_find(c, data)))


def _open_breaker(c: Any, data: dict[str, Any]) -> str:
    c.guard_house.open(_op(data))
    log.info("[CONTROL] Circuit breaker of %r opened by the operator", _op(data))
    return f"circuit breaker of {_op(data)!r} opened"


def _close_breaker(c: Any, data: dict[str, Any]) -> str:
    c.guard_house.reset(_op(data))
    log.info("[CONTROL] Circuit breaker of %r closed by the operator", _op(data))
    return f"circuit breaker of {_op(data)!r} closed"


def _set_storage_limit(c: Any, data: dict[str, Any]) -> str:
    tier, limit = data.get("tier"), data.get("limit")
    if not isinstance(tier, str) or isinstance(limit, bool) or not isinstance(limit, int):
        raise ValueError(
            f'"tier" must be a tier name and "limit" an integer, got {tier!r}, {limit!r}'
        )
    c.set_storage_limit(tier, limit)
    log.info("[CONTROL] Storage tier %s limit set to %d by the operator", tier, limit)
    return f"storage tier {tier} limit set to {limit}"


def _release(c: Any, data: dict[str, Any]) -> str:
    token = _find(c, data)
    if not c.release(token):
        raise ValueError(f"token {token.id} is not in quarantine")
    return f"token {token.id} released from quarantine"


def _reject(c: Any, data: dict[str, Any]) -> str:
    token = _find(c, data)
    if not c.reject(token):
        raise ValueError(f"token {token.id} is not in quarantine")
    return f"token {token.id} rejected: discarded"


CONTROLS: dict[str, Callable[[Any, dict[str, Any]], str]] = {
    "pause": _pause,
    "resume": _resume,
    "pause_operation": _pause_op,
    "resume_operation": _resume_op,
    "drain_operation": _drain_op,
    "cancel_queued": _cancel_queued,
    "kill": _kill,
    "open_breaker": _open_breaker,
    "close_breaker": _close_breaker,
    "set_storage_limit": _set_storage_limit,
    "release": _release,
    "reject": _reject,
}
