"""What the two sides of the Dask backend say to each other: a leaf module both import.

The client side (``_dask``, ``_dask_runner``) sends each token as a :class:`Call` with a pickled
:class:`Context`; the worker side (``_dask_task``) answers with an :class:`Outcome` whose
``kind`` is one of the outcome codes below, and meanwhile publishes ``retry`` and ``timeout``
events on the coordinator's topic (built by :func:`retry_event` and :func:`timeout_event`, read
by the runner with the ``EVENT_*`` and ``MSG_*`` names). Nothing here imports either side, so
neither side imports the other to know what a message means.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._config import MAILBOX_MAX
from .._retry import RetryPolicy

if TYPE_CHECKING:
    from .._spec import TaskSpec

__all__ = [
    "DEADLINE",
    "DEP_FAILED",
    "ERROR",
    "EVENT_RETRY",
    "EVENT_TIMEOUT",
    "OK",
    "Call",
    "Context",
    "Outcome",
    "context_of",
    "dump_exception",
    "load_exception",
    "retry_event",
    "semaphore_name",
    "timeout_event",
]

#: An Outcome's ``kind``: the body returned, raised (not retryable), was not run because a
#: dependency failed, or was not run because it started past its deadline.
OK, ERROR, DEP_FAILED, DEADLINE = 0, 1, 2, 3

#: Events a worker publishes on the coordinator's topic (``MSG_KIND`` says which).
EVENT_RETRY, EVENT_TIMEOUT = "retry", "timeout"
#: Their fields: the kind, the task's key, the pickled exception, its repr (when it does not
#: unpickle), the worker's address and the attempt's wall-clock start.
MSG_KIND, MSG_KEY, MSG_ERROR, MSG_REPR, MSG_WORKER, MSG_STARTED = "x", "k", "e", "r", "w", "s"


def retry_event(key: str, exc: BaseException, worker: str, started: float) -> dict[str, Any]:
    """A retryable failure of ``key``'s attempt that began at ``started`` (wall clock)."""
    return {
        MSG_KIND: EVENT_RETRY,
        MSG_KEY: key,
        MSG_ERROR: dump_exception(exc),
        MSG_REPR: repr(exc)[:500],
        MSG_WORKER: worker,
        MSG_STARTED: started,
    }


def timeout_event(key: str, worker: str) -> dict[str, Any]:
    """``key`` has run past its timeout on ``worker``."""
    return {MSG_KIND: EVENT_TIMEOUT, MSG_KEY: key, MSG_WORKER: worker}


class Outcome:
    """What a task returns to Dask: the value or the error, plus where and when it ran.

    ``nested`` counts the tokens the body submitted and saw end, by operation type:
    ``{op: [weight, submitted, resolved, failed, discarded, retried, [latencies]]}``.
    """

    __slots__ = ("ended", "kind", "nested", "payload", "started", "tb", "worker")

    def __init__(
        self,
        kind: int,
        payload: Any,
        started: float,
        ended: float,
        worker: str,
        nested: dict[str, list[Any]] | None = None,
        tb: dict[str, Any] | None = None,
    ) -> None:
        self.kind = kind
        self.payload = payload
        self.started = started
        self.ended = ended
        self.worker = worker
        self.nested = nested
        self.tb = tb

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            Outcome,
            (self.kind, self.payload, self.started, self.ended, self.worker, self.nested, self.tb),
        )

    def error(self) -> BaseException:
        """The task's exception, with its remote traceback re-attached."""
        exc: BaseException = self.payload
        if self.tb is not None:
            with contextlib.suppress(Exception):
                from tblib import Traceback

                exc = exc.with_traceback(Traceback.from_dict(self.tb).as_traceback())
        return exc


class Context:
    """The coordinator settings a worker needs: the retry rule and budgets per weight, the tier
    limits and the topic its events go to. Shipped pre-pickled with every task (a few hundred
    bytes copied, never re-pickled) and unpickled once per worker process."""

    __slots__ = ("limits", "mailbox_max", "policies", "topic")

    def __init__(
        self,
        topic: str,
        policies: Mapping[str, RetryPolicy],
        limits: Mapping[str, int],
        mailbox_max: int = MAILBOX_MAX,
    ) -> None:
        self.topic = topic
        self.policies = dict(policies)
        self.limits = dict(limits)
        self.mailbox_max = mailbox_max

    def __reduce__(self) -> tuple[Any, ...]:
        # The policies' random source (a bound method of the random module) pickles to ~4 KB;
        # the worker needs only the rule and the budgets.
        rules = {
            weight: (p.max_retries, p.retry_on, p.dont_retry_on, p.crash_retries)
            for weight, p in self.policies.items()
        }
        return (_context_from_rules, (self.topic, rules, self.limits, self.mailbox_max))

    def dumps(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)


def _context_from_rules(
    topic: str,
    rules: Mapping[str, tuple[Any, ...]],
    limits: Mapping[str, int],
    mailbox_max: int,
) -> Context:
    policies = {
        weight: RetryPolicy(
            max_retries=retries, retry_on=retry_on, dont_retry_on=dont, crash_retries=crash
        )
        for weight, (retries, retry_on, dont, crash) in rules.items()
    }
    return Context(topic, policies, limits, mailbox_max)


_contexts: dict[bytes, Context] = {}


def context_of(blob: bytes) -> Context:
    """The unpickled context of ``blob``, cached per worker process."""
    ctx = _contexts.get(blob)
    if ctx is None:
        if len(_contexts) > 64:
            _contexts.clear()
        ctx = _contexts[blob] = pickle.loads(blob)
    return ctx


def semaphore_name(tier: str, limit: int) -> str:
    """One cluster-wide semaphore per tier and limit: coordinators with the same limit share it."""
    return f"tokengate-storage-{tier}-{limit}"


def dump_exception(exc: BaseException) -> bytes | None:
    try:
        return pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None


def load_exception(blob: bytes | None, fallback: str) -> BaseException:
    if blob is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(blob)
            if isinstance(exc, BaseException):
                return exc
    return RuntimeError(fallback)


class Call:
    """One token's call as Dask sees it: a single opaque argument.

    Dask walks every list, tuple and dict argument of a task looking for futures (and sizes
    them); a call without Token arguments has none, so its arguments travel inside this object
    and Dask parses two arguments instead of the whole call. A call with Token arguments passes
    them to Dask separately (``run_task(target, call, args, kwargs)``) so they become
    dependencies.
    """

    __slots__ = ("args", "ctx_blob", "deadline", "key", "kwargs", "spec", "tier")

    def __init__(
        self,
        key: str,
        ctx_blob: bytes,
        tier: tuple[str, int] | None,
        deadline: float | None,
        spec: TaskSpec | None,
        args: tuple[Any, ...] | None,
        kwargs: dict[str, Any] | None,
    ) -> None:
        self.key = key
        self.ctx_blob = ctx_blob
        self.tier = tier
        self.deadline = deadline
        self.spec = spec
        self.args = args
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            Call,
            (self.key, self.ctx_blob, self.tier, self.deadline, self.spec, self.args, self.kwargs),
        )


def _register_sizeof() -> None:
    """Dask sizes results to manage worker memory: an Outcome weighs what its payload does."""
    from dask.sizeof import sizeof

    @sizeof.register(Outcome)  # type: ignore[untyped-decorator,no-untyped-call]
    def _sizeof_outcome(outcome: Outcome) -> int:
        return int(sizeof(outcome.payload)) + 200

    @sizeof.register(Call)  # type: ignore[untyped-decorator,no-untyped-call]
    def _sizeof_call(call: Call) -> int:
        return int(sizeof(call.args)) + int(sizeof(call.kwargs)) + 400


_register_sizeof()
