"""Recent tokens by id, failures with tracebacks, and the task stream, for the dashboard.

Two costs are kept off the program a page looks at:

* **Its tokens' results are not kept alive.** The completion path hands ended tokens to a
  bounded deque (one C call, no middleware call per token); the server *absorbs* that deque a
  few times a second (:meth:`RecentTokens.absorb`), turning each token into a
  :class:`TokenRecord` of plain values, and lets go of the token. A token is held at most until
  the next absorb, and only while someone looks: the server stops recording once no page has
  streamed or read for a while. Failures come to :meth:`RecentTokens.after_failure` and are
  kept as records with their formatted tracebacks, not as tokens (a traceback holds frames).
* **A busy program is recorded in slices, not copied.** Recording every run of a program
  ending a hundred thousand a second would cost it several per cent (an append per token, and
  each token pushed out of the deque freed in the completion path). So each absorb period
  (:meth:`RecentTokens.cycle`) records at most :attr:`RecentTokens.per_period` runs, about
  :data:`SAMPLE_BUDGET` a second: the completion path switches recording off itself once the
  deque holds that many, and the next period switches it on again. While it is off the
  completion path does exactly what it does with no page open. Below that rate every run is
  recorded; above it, the runs of the start of each period, every one of them, so the task
  stream shows each worker's runs and gaps as they were. Failures and discards are always
  recorded: they are rare, and the ones an operator looks up.

Tokens still queued or running are found by scanning the lanes at look-up time, so the hot path
never records them.
"""

from __future__ import annotations

import threading
import traceback
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from .._middleware import Middleware
from .._token import _ID_BASE

if TYPE_CHECKING:
    from .._coordinator import OperationsCoordinator
    from .._token import Token

__all__ = [
    "RECENT_CAPACITY",
    "SAMPLE_BUDGET",
    "RecentTokens",
    "TokenRecord",
    "parse_token_id",
    "record_of",
]

#: How many ended tokens a dashboard keeps (as records) for look-up and the task stream.
RECENT_CAPACITY = 2_000
#: About how many runs a second are recorded once a program ends more than that (sampling).
SAMPLE_BUDGET = 1_000

_T = TypeVar("_T")


class TokenRecord(NamedTuple):
    """What a page shows of one token, as plain values (times are ``perf_counter`` seconds)."""

    seq: int
    id: str
    operation_type: str
    weight: str
    state: str
    attempts: int
    lane: str | None
    worker: str | None
    core: int | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    discard_reason: str | None


def record_of(token: Token[Any]) -> TokenRecord:
    """``token`` as it is now, as plain values (no reference to its arguments or result)."""
    error = None
    if token.state == "failed":
        exc = token._exception  # not exception(): that would mark the error as retrieved
        error = f"{type(exc).__name__}: {exc}"
    return TokenRecord(
        token.seq,
        token.id,
        token.operation_type,
        token.weight,
        token.state,
        token.attempts,
        token.lane,
        token.worker,
        token.core,
        token.submitted_at,
        token.started_at,
        token.finished_at,
        error,
        token.discard_reason,
    )


def parse_token_id(token_id: str) -> int | None:
    """The sequence number in ``<operation_type>_<number>``, or None if it is not one."""
    _, sep, number = token_id.rpartition("_")
    if not sep or not number.isdigit() or len(number) > 30:
        return None
    seq = int(number) - _ID_BASE
    return seq if seq >= 0 else None


class RecentTokens(Middleware):
    """The last ``capacity`` recorded runs and discards, and the last ``failures`` failures."""

    def __init__(
        self, capacity: int = RECENT_CAPACITY, failures: int = 50, budget: float = SAMPLE_BUDGET
    ) -> None:
        self.capacity = capacity
        self.failures = failures
        self.budget = budget
        #: Runs recorded at most per absorb period of ``period`` seconds (set by :meth:`cycle`).
        self.per_period = capacity
        self.period = 0.0
        #: Whether the last whole period recorded as many runs as it could (more ended
        #: unrecorded), so the task stream is a sample.
        self.limited = False
        # Filled by the completion path (one atomic C call, no lock, the oldest falls out) and
        # emptied by absorb(); only the records outlive an absorb.
        self._fresh: deque[Token[Any]] = deque(maxlen=capacity)
        self._records: deque[TokenRecord] = deque(maxlen=capacity)
        self._failed: deque[TokenRecord] = deque(maxlen=failures)
        self.tracebacks: deque[tuple[str, str]] = deque(maxlen=failures)
        self._lock = threading.Lock()
        self._coordinator: OperationsCoordinator | None = None
        self._middleware_added = False
        #: The dashboards of one coordinator share one registry (the completion path has one
        #: slot to record into): ``keeper`` is the one whose event loop runs the cycles while
        #: any of them looks, None while nothing is recorded; changed under ``keeper_lock``.
        self.keeper: Any = None
        self.keeper_lock = threading.Lock()

    @property
    def recording(self) -> bool:
        """Whether ended tokens are being recorded now (runs perhaps only in slices)."""
        return self._coordinator is not None

    def attach(self, coordinator: OperationsCoordinator) -> None:
        """Start recording ``coordinator``'s ends: its completion path fills the deque with
        runs (up to :attr:`per_period` until the next :meth:`absorb`) and every discard, and
        failures come to :meth:`after_failure` for their tracebacks."""
        with self._lock:
            self._coordinator = coordinator
            completion = coordinator._completion
            completion.recent_discards = self._fresh
            if not self._middleware_added:
                self._middleware_added = True
                coordinator.add_middleware(self)
        self._resume()

    def _resume(self) -> None:
        """Record runs again, up to :attr:`per_period` more (the completion path stops itself
        there). Does nothing unless attached."""
        with self._lock:
            coordinator = self._coordinator
            if coordinator is not None:
                completion = coordinator._completion
                completion.recent_limit = len(self._fresh) + self.per_period
                completion.recent = self._fresh

    def pause(self) -> None:
        """Record no more runs until the next period (discards and failures still are)."""
        with self._lock:
            if self._coordinator is not None:
                self._coordinator._completion.recent = None

    def cycle(self, period: float) -> Iterator[float]:
        """One absorb period of ``period`` seconds: record at most ``budget * period`` runs
        (every run, below that rate), then absorb. Yields the seconds to wait, so that the
        server's event loop (or a thread) runs it without holding anything while it waits."""
        self.period = period
        self.per_period = max(1, min(self.capacity, round(self.budget * period)))
        self._resume()
        yield period
        with self._lock:
            coordinator = self._coordinator
            hit = coordinator is not None and coordinator._completion.recent is None
        self.absorb()
        self.limited = hit

    def detach(self) -> None:
        """Stop recording: the completion path forgets the deque, and what it holds is absorbed
        (so no token is held any more). Failures still come to :meth:`after_failure`."""
        with self._lock:
            coordinator, self._coordinator = self._coordinator, None
            if coordinator is not None:
                coordinator._completion.recent = None
                coordinator._completion.recent_discards = None
        self.absorb()

    def after_failure(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        if exc is not None:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.tracebacks.append((token.id, text[-8_000:]))
            self._failed.append(record_of(token))

    def absorb(self) -> int:
        """Turn the tokens recorded since the last absorb into records and let go of them;
        returns how many were absorbed."""
        with self._lock:
            fresh, popleft = self._fresh, self._fresh.popleft
            tokens = []
            for _ in range(len(fresh)):  # popleft, not a copy and clear: appends go on meanwhile
                tokens.append(popleft())
            self._records.extend(record_of(token) for token in tokens)
            coordinator = self._coordinator
            if coordinator is not None and coordinator._completion.recent is not None:
                # Still recording: the period's allowance left, counted from the shorter deque.
                coordinator._completion.recent_limit -= len(tokens)
        return len(tokens)

    def recent(self, limit: int) -> list[TokenRecord]:
        """The last ``limit`` runs recorded (a retried token once, as last recorded), oldest
        first."""
        self.absorb()
        seen: set[int] = set()
        records = []
        for record in reversed(_copy(self._records)):
            if record.seq not in seen:
                seen.add(record.seq)
                records.append(record)
                if len(records) == limit:
                    break
        records.reverse()
        return records

    def find(self, coordinator: OperationsCoordinator, token_id: str) -> TokenRecord | None:
        """The token with this id, as it is now: running, queued in a mailbox, in quarantine,
        or recorded since it ended (its last record)."""
        live = self.find_live(coordinator, token_id)
        if live is not None:
            return record_of(live)
        seq = parse_token_id(token_id)
        if seq is None:
            return None
        self.absorb()
        for record in (*reversed(_copy(self._records)), *reversed(_copy(self._failed))):
            if record.seq == seq:
                return record if record.id == token_id else None
        return None

    @staticmethod
    def find_live(coordinator: OperationsCoordinator, token_id: str) -> Token[Any] | None:
        """The token with this id if it is running, queued in a mailbox or in quarantine."""
        seq = parse_token_id(token_id)
        if seq is None:
            return None
        live = RecentTokens._live(coordinator, seq)
        return live if live is not None and live.id == token_id else None

    @staticmethod
    def _live(coordinator: OperationsCoordinator, seq: int) -> Token[Any] | None:
        for worker in coordinator.iter_workers():
            current: Token[Any] | None = worker.current
            if current is not None and getattr(current, "seq", None) == seq:
                return current
        for held in coordinator.quarantine:
            if held.seq == seq:
                return held
        for lane in coordinator.lanes.values():
            queued: Token[Any]
            for queued in lane.queued():
                if queued.seq == seq:
                    return queued
        return None


def _copy(items: deque[_T]) -> list[_T]:
    """A copy of a deque other threads append to."""
    for _ in range(100):
        try:
            return list(items)
        except RuntimeError:  # appended to while copying: try again
            continue
    return []  # pragma: no cover - would need 100 appends racing 100 copies
