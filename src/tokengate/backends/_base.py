"""Backend: where an :class:`~tokengate.OperationsCoordinator` runs its tokens.

Every coordinator has one. The local backend (``tokengate/local/``) runs tokens on this
machine's lanes (threads pinned to cores, worker processes, the I/O pools, an event loop); the
Dask backend on a cluster. The coordinator keeps what is the same everywhere: it validates the
call, runs the ``before_submit`` middleware, creates the :class:`~tokengate.Token` and counts it
as submitted, then hands it to :meth:`Backend.submit`. Every run ends through the coordinator's
one completion path (``_completion.py``), so ``stats()``, the logs and the reports read the same
on every backend.

A backend talks to its coordinator only through the :class:`BackendHost` it is given at
:meth:`Backend.start`: typed, public attributes, never the coordinator's private ones.

The contract (anyio's backends, CPython's executors):

* :meth:`configure` checks the coordinator's settings when it is made; :meth:`start` /
  :meth:`stop` follow its lifecycle;
* :meth:`prepare` may work on a call before its token exists (the local backend pickles a
  process-lane call there, so an unpicklable argument raises from the call, counting nothing);
* :meth:`submit` takes a token that has just been counted, and must end it exactly once;
* :meth:`discarded` hears that a token was discarded (cancelled, deadline, stop) so the backend
  can stop it from running; :meth:`granted` receives tokens the storage throttle has just given a
  permit; :meth:`resized` that a storage tier's limit changed;
* :meth:`retrying` / :meth:`readmit` / :meth:`stuck` / :meth:`help` serve the completion path
  of backends whose runs end through ``Completion.complete`` (the local lanes);
* :meth:`has_room` tells ``submit_async`` whether a call would be taken without waiting;
* :meth:`share` places an object once where every task reads it (shared memory, a cluster's
  store);
* :meth:`not_started` lists the tokens a ``stop(cancel_pending=True)`` may discard.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .._admission import AdmissionGate
    from .._affinity import AffinityPolicy
    from .._backlog import Backlog
    from .._byte_budget import ByteBudget
    from .._completion import Completion
    from .._config import CoordinatorConfig
    from .._convergence import ConvergenceEngine
    from .._decorator import TaskFunction
    from .._retry import RetryPolicy
    from .._spec import TaskSpec
    from .._state import Lifecycle
    from .._stats import StatsRecorder
    from .._throttle import StorageThrottle
    from .._token import Token
    from .._topology import Topology

__all__ = ["Backend", "BackendHost"]

_S = TypeVar("_S")


class BackendHost(Protocol):
    """What a backend may ask of its coordinator (built by the coordinator, one per start).

    ``config``, ``topology``, ``core_count``, ``affinity`` and ``policies`` (per weight, the
    retry policy) are the coordinator's settings. ``gate`` is where producers wait for room;
    ``lifecycle`` answers whether it takes calls, drains, has given up on pending work or has
    closed its workers. ``completion`` ends runs (resolve, retry, fail; the counts and
    middleware); ``backlog`` bounds the waits outside the mailboxes (rate limits, tier permits);
    ``throttle`` holds the storage tiers' permits; ``byte_budget`` bounds the pickled bytes of
    queued process calls; ``stats`` the counters. ``call_later`` runs a callback on the timer
    thread; ``on_worker_thread`` / ``on_internal_thread`` must be called first on every thread
    the backend starts (so that calls made there reach this coordinator).
    """

    @property
    def config(self) -> CoordinatorConfig: ...
    @property
    def topology(self) -> Topology: ...
    @property
    def core_count(self) -> int: ...
    @property
    def affinity(self) -> AffinityPolicy: ...
    @property
    def policies(self) -> Mapping[str, RetryPolicy]: ...
    @property
    def gate(self) -> AdmissionGate: ...
    @property
    def lifecycle(self) -> Lifecycle: ...
    @property
    def completion(self) -> Completion: ...
    @property
    def backlog(self) -> Backlog: ...
    @property
    def throttle(self) -> StorageThrottle: ...
    @property
    def byte_budget(self) -> ByteBudget: ...
    @property
    def stats(self) -> StatsRecorder: ...
    @property
    def owner(self) -> object: ...
    @property
    def call_later(self) -> Callable[..., Any]: ...
    @property
    def defer(self) -> Callable[..., None]: ...
    @property
    def count_event(self) -> Callable[..., None]: ...
    @property
    def on_worker_thread(self) -> Callable[[Any], None]: ...
    @property
    def on_internal_thread(self) -> Callable[[], None]: ...


class Backend(ABC):
    """Runs a coordinator's tokens somewhere else than its local lanes."""

    name: str = "backend"

    def configure(self, host: BackendHost) -> None:
        """Called once, when the coordinator is made: check its settings (a bad one raises
        there, at construction) and build what lasts as long as the coordinator."""
        return  # optional: nothing to do by default

    @abstractmethod
    def start(self, host: BackendHost) -> None:
        """Connect (or start what is needed); called from ``coordinator.start()``."""

    def prepare(
        self, task: TaskFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Work done on a call before its token exists, handed back to :meth:`submit` as
        ``payload`` (raise to refuse the call: nothing is counted). By default: nothing."""
        return None

    @abstractmethod
    def submit(
        self, token: Token[Any], task: TaskFunction[..., Any], internal: bool, payload: Any = None
    ) -> None:
        """Run ``token`` (already counted as submitted) and end it exactly once.

        ``internal`` is True for calls made on the coordinator's own threads: they must never
        block on backpressure. ``payload`` is what :meth:`prepare` returned for the call.
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

    def has_room(self, spec: TaskSpec, *, dependencies: bool, mailboxes: bool = True) -> bool:
        """Whether a call of ``spec`` would be taken now without waiting for room (asked by
        ``submit_async``, which then awaits instead of blocking): ``dependencies`` when tokens
        are among its arguments, ``mailboxes`` False when a full mailbox need not be waited for.
        By default: always."""
        return True

    def prioritize(self) -> None:
        """A token of non-zero priority was submitted: queues must keep priority order from
        now on (free until then)."""
        return  # optional: nothing to do by default

    def draining(self) -> None:
        """``stop()`` began: finish what was submitted; start nothing new of your own (e.g.
        no more resizing)."""
        return  # optional: nothing to do by default

    def retrying(self, token: Token[Any]) -> None:
        """``token`` failed an attempt and will be retried after its back-off."""
        return  # optional: nothing to do by default

    def readmit(self, token: Token[Any]) -> None:
        """``token``'s back-off is over: queue it again (back of the queue). Needed by a backend
        whose runs end through ``Completion.complete``."""
        raise NotImplementedError(f"{type(self).__name__} does not re-admit retried tokens")

    def stuck(self, token: Token[Any]) -> None:
        """``token`` ran past its timeout and its worker is still in it."""
        return  # optional: nothing to do by default

    def help(self, token: Token[Any], end: float | None) -> None:
        """A thread is about to wait for ``token``; it may run work meanwhile."""
        return  # optional: nothing to do by default

    def share(self, obj: _S) -> _S:
        """Place ``obj`` where this backend's tasks read it without a copy per call, and return
        what the caller passes to its calls instead (``OperationsCoordinator.share``).

        By default ``obj`` itself (nothing is placed anywhere); the local backend uses this
        machine's shared memory, the Dask backend ``scatter``."""
        return obj

    def wait_ready(self, timeout: float | None) -> bool:
        """Block until this backend's workers can take tasks (``OperationsCoordinator.
        wait_ready``); False at ``timeout``. By default True at once: nothing starts late."""
        return True

    @property
    def lanes(self) -> Mapping[str, Any]:
        """The local lanes this backend runs (none elsewhere)."""
        return {}

    @property
    def convergence(self) -> ConvergenceEngine | None:
        """The engine resizing this backend's pools while it runs, if any."""
        return None

    @abstractmethod
    def not_started(self) -> list[Token[Any]]:
        """The tokens known not to have started (``stop(cancel_pending=True)`` discards them)."""

    @abstractmethod
    def stop(self) -> list[Any]:
        """Stop running tokens and disconnect; a token the backend can no longer run is
        discarded. Returns the local workers still busy in user code (left behind)."""

    def describe(self) -> str:
        """One line for logs and reports."""
        return self.name
