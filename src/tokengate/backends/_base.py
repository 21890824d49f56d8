"""Backend: where an :class:`~tokengate.OperationsCoordinator` runs its tokens instead of its lanes.

The local coordinator runs every token on its own lanes (threads pinned to cores). A backend
takes over from the moment a token exists: ``OperationsCoordinator._submit`` still validates the
call, runs the ``before_submit`` middleware, creates the :class:`~tokengate.Token` and counts it
as submitted; then it hands the token to :meth:`Backend.submit` instead of routing it. The
backend ends every token through the same ``Token._finish`` / ``Token._discard`` transitions and
the coordinator's statistics and middleware, so ``stats()``, the logs and the reports read the same
on every backend.

The contract is small on purpose (anyio's backends, CPython's executors):

* :meth:`start` / :meth:`stop` follow the coordinator's lifecycle;
* :meth:`submit` takes a token that has just been counted, and must end it exactly once;
* :meth:`discarded` hears that a token was discarded (cancelled, deadline, stop) so the backend
  can stop it from running; :meth:`resized` that a storage tier's limit changed; :meth:`granted`
  receives tokens the coordinator's storage throttle has just given a permit;
* :meth:`has_room` tells ``submit_async`` whether a call would be taken without waiting;
* :meth:`not_started` lists the tokens a ``stop(cancel_pending=True)`` may discard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._coordinator import OperationsCoordinator
    from .._decorator import TaskFunction
    from .._spec import TaskSpec
    from .._token import Token

__all__ = ["Backend"]


class Backend(ABC):
    """Runs a coordinator's tokens somewhere else than its local lanes."""

    name: str = "backend"

    @abstractmethod
    def start(self, coordinator: OperationsCoordinator) -> None:
        """Connect (or start what is needed); called from ``coordinator.start()``."""

    @abstractmethod
    def submit(self, token: Token[Any], task: TaskFunction[..., Any], internal: bool) -> None:
        """Run ``token`` (already counted as submitted) and end it exactly once.

        ``internal`` is True for calls made on the coordinator's own threads: they must never
        block on backpressure.
        """

    @abstractmethod
    def discarded(self, token: Token[Any]) -> None:
        """``token`` was discarded before it ended; stop it from running if it can be."""

    @abstractmethod
    def resized(self, granted: list[Token[Any]]) -> None:
        """A storage limit changed (``set_storage_limit``); ``granted`` just got permits."""

    @abstractmethod
    def granted(self, tokens: list[Token[Any]]) -> None:
        """``tokens`` were just given a storage-tier permit by the coordinator's throttle (a
        permit came back from a discarded token): run them."""

    def has_room(self, spec: TaskSpec) -> bool:
        """Whether a call of ``spec`` would be taken now without waiting for room (asked by
        ``submit_async``, which then awaits instead of blocking). By default: always."""
        return True

    @abstractmethod
    def not_started(self) -> list[Token[Any]]:
        """The tokens known not to have started (``stop(cancel_pending=True)`` discards them)."""

    @abstractmethod
    def stop(self) -> None:
        """Disconnect; every token still in flight must be ended (discarded) first."""

    def describe(self) -> str:
        """One line for logs and reports."""
        return self.name
