"""Batched maps: many small calls of one task run as one token.

A token costs a few microseconds to make, hand over and complete; a call of a cheap function
costs less than that, so ``fn.map`` over cheap calls spends most of its time on tokens. A
*batch* runs up to ``size`` calls of the task's body in one token, one after another on one
worker, and hands back every call's own outcome, so each item still ends on its own: its value,
or its own exception raised at its own position in the results.

The batch token is of a twin task (``"<operation>[batch]"``, the same tags, no retries of its
own), so statistics count batches under that name and calls that ran on their own under the
operation's. A
call that fails inside a batch with an error its task would retry is run again as an ordinary
call of the task, with the retries it has left (one attempt is spent), so retries mean what
they mean outside a batch.

How big: an explicit ``chunksize`` is used as given. The automatic size (``chunksize=None``)
follows the measured cost of a call. The map submits one call and waits for it up to
:data:`PROBE_S`: a cheap call has ended by then and the next batches start at up to 16 calls;
after that a batch aims at :data:`TARGET_S` of work, so batches of cheap calls grow (at most
doubling per batch, up to :data:`AUTO_MAX`) and an expensive call runs on its own, where it
keeps every worker's load balanced. The window bounds the calls in flight: the oldest results
are taken until a whole batch fits. A map's default window grows with its batches, to room for
:data:`BATCHES_IN_FLIGHT` of them, so a map of expensive calls (or of big arguments) keeps the
coordinator's ``mailbox_max`` calls in flight, not four of the largest batches; an explicit
window caps the automatic size at a quarter of it instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

from ._errors import ConfigError

if TYPE_CHECKING:
    from ._spec import TaskSpec
    from ._token import Token

__all__ = [
    "AUTO_MAX",
    "BATCHES_IN_FLIGHT",
    "PROBE_S",
    "TARGET_S",
    "BatchSizer",
    "WithFailures",
    "batch_refusal",
    "run_batch",
    "twin_spec",
]

AUTO_MAX = 2048
"""The largest automatic batch. :data:`TARGET_S` bounds how long a batch runs; this bounds how
many calls' arguments and results one holds. It is well above ``ProcessPoolExecutor``'s usual
256 because every batch is a hand-off between threads under one GIL, and where waking a thread
on another CPU is slow (virtual machines), 256 calls of a no-op (~25 µs of work) do not pay
for it: on two vCPUs a map of no-ops ran 1.0-1.2 µs a call at 256 and 0.4-0.6 at 2,048."""
BATCHES_IN_FLIGHT = 4
"""How many batches a map keeps in flight: its default window grows to this many of its
current batch size, and an explicit window caps the automatic size at this fraction of it."""
TARGET_S = 0.002
"""How long an automatic batch aims to run: long beside a token's overhead, short beside the
latency anyone waits for."""
PROBE_S = TARGET_S
"""How long an automatic map waits for its first call before it goes on: a cheap call ends
well within it and sizes the first batches; an expensive one costs the map this much, once."""


class Failed:
    """One call's exception inside a batch's results (a value can never be one)."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


class WithFailures(list[Any]):
    """A batch's outcomes of which at least one is :class:`Failed`. A plain ``list`` says that
    none is, so the caller hands those values on as they are, without looking at each."""

    __slots__ = ()


def run_batch(fn: Callable[..., Any], items: list[tuple[Any, ...]]) -> list[Any]:
    """The body of a batch token: every call, in order, each outcome kept on its own."""
    out: list[Any] = []
    append = out.append
    failed = False
    for args in items:
        try:
            append(fn(*args))
        except Exception as exc:  # this call's own error; the rest of the batch runs on
            append(Failed(exc))
            failed = True
    return WithFailures(out) if failed else out


def batch_refusal(spec: TaskSpec, *, processes: bool = False) -> str | None:
    """Why calls of ``spec`` cannot share a token, or None if they can.

    A batch holds one worker for all its calls, so per-call limits (a timeout, a deadline, a
    rate, a storage permit) would no longer mean per call; async tasks run on the event loop
    and process-lane tasks in other processes, where a batch would need its body by value
    (``processes=True``: the caller sends it so, as the executor adapter's chunks do)."""
    if spec.is_async:
        return "it is an async task"
    if spec.timeout is not None or spec.deadline is not None:
        return "a timeout or deadline is per call"
    if spec.rate is not None:
        return "its rate is per call"
    if spec.storage_speed is not None:
        return "a storage tier's limit is per call"
    if not processes and (spec.weight == "heavy" or spec.executor == "process"):
        return "heavy calls may run in worker processes, one call each"
    return None


def check_chunksize(chunksize: object) -> int | None:
    """``chunksize`` as given (None: automatic); a clear error for anything else."""
    if chunksize is None:
        return None
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ConfigError(
            f"chunksize must be a whole number >= 1 (calls per token) or None (automatic), "
            f"got {chunksize!r}"
        )
    return chunksize


def twin_spec(spec: TaskSpec) -> TaskSpec:
    """The spec of ``spec``'s batches: the same tags, its own name, no retries of its own (a
    batch never raises what its calls raise)."""
    return dataclasses.replace(
        spec,
        operation_type=f"{spec.operation_type}[batch]",
        retries=0,
        retry_on=None,
        dont_retry_on=(BaseException,),
    )


def calls_in_target(token: Token[Any]) -> int:
    """How many calls like ``token``'s (ended) one fit in :data:`TARGET_S`; 1 if it has not
    ended or did not run."""
    started, finished = token.started_at, token.finished_at
    if not token.done() or started is None or finished is None:
        return 1
    return max(1, int(TARGET_S / max(finished - started, 1e-9)))


class BatchSizer:
    """The automatic batch size of one map, from the measured cost of its calls."""

    __slots__ = ("cap", "size")

    def __init__(self, window: int | None = None) -> None:
        cap = AUTO_MAX if window is None else min(AUTO_MAX, window // BATCHES_IN_FLIGHT)
        self.cap = max(1, cap)
        self.size = 1

    def probed(self, token: Token[Any]) -> None:
        """The map's first call, waited for up to :data:`PROBE_S`: if it ended, the size may
        grow sixteenfold at once (later measurements at most double it)."""
        if token.done():
            self.measured(token, 1, growth=16)

    def measured_one(self, future: Future[Any]) -> None:
        """A done-callback: an ordinary call ended (benign race: the last writer wins)."""
        self.measured(cast("Token[Any]", future), 1)

    def measured(self, token: Token[Any], calls: int, growth: int = 2) -> None:
        """A batch of ``calls`` calls ended: aim the next one at ``TARGET_S`` of work."""
        started, finished = token.started_at, token.finished_at
        if started is None or finished is None or calls < 1:
            return
        per_call = max(finished - started, 1e-9) / calls
        aim = int(TARGET_S / per_call)
        self.size = max(1, min(aim, self.size * growth, self.cap))
