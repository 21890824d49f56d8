"""Sharded, lock-free counters on the hot path and frozen snapshots for everyone else.

Why sharded: completion happens on many worker threads at once. ``x += 1`` on a shared int is a
read-modify-write that loses updates between threads, and a lock would serialise every
completion. So each thread records into its own :class:`StatsShard` (found through a
``threading.local``) and only ever touches its own ints; :meth:`StatsRecorder.snapshot` reads
and adds up all shards into a frozen :class:`StatsSnapshot`, whose ``str()`` is the block the
TokenGate Quick-Proof prints.

The recorder's lock is taken only on rare, structural events: a thread's first record (the
shard is registered), the first record of an operation type on a thread (a counter is added
to the shard's dict), :meth:`StatsRecorder.count_event` and :meth:`StatsRecorder.snapshot`.

Run times (``OperationCounters.runs``: started to end of each attempt, queueing excluded) are
what run-time watching middleware (the Guard House) see. They live here, beside the latency, so
the coordinator records both with the one counters lookup it makes per token, and a watcher
costs a completion a record and two compares rather than a middleware call (``_run_watch.py``).
The Guard House reads the merged histograms (:meth:`StatsRecorder.run_times`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokengate._histogram import LatencyHistogram
from tokengate._rate import RateStats
from tokengate._run_watch import RunWatch, Watcher, first_checks, limits_for
from tokengate.observability._options import format_bytes

__all__ = [
    "OperationCounters",
    "OperationStats",
    "StatsRecorder",
    "StatsShard",
    "StatsSnapshot",
]


_NO_RATE = RateStats()


class OperationCounters:
    """Counts for one operation type on one thread; mutated only by the thread owning the shard.

    ``submitted`` is incremented once per token, before the token can possibly complete; a retry
    bumps ``retried`` and not ``submitted``, so ``submitted == resolved + failed + discarded +
    in_flight`` holds per token.
    """

    __slots__ = (
        "checks",
        "discarded",
        "failed",
        "latency",
        "next_check",
        "resolved",
        "retried",
        "runs",
        "submitted",
        "watch",
        "weight",
    )

    def __init__(
        self, weight: str, watch: RunWatch | None = None, next_check: int = sys.maxsize
    ) -> None:
        self.weight = weight
        self.submitted = 0
        self.resolved = 0
        self.failed = 0
        self.discarded = 0
        self.retried = 0
        self.latency = LatencyHistogram()
        self.runs = LatencyHistogram()
        self.watch = RunWatch() if watch is None else watch
        self.next_check = next_check
        self.checks: list[int] = []  # each run watcher's next check-in (_run_watch.py)

    def record_run(self, seconds: float) -> bool:
        """Add one run time; True if a run watcher must see it (``_run_watch.deliver``).
        ``Completion.record_terminal`` inlines this: keep the two in step."""
        runs = self.runs
        runs.record(seconds)
        return seconds > self.watch.slow_after or runs.count >= self.next_check

    def __repr__(self) -> str:
        return (
            f"OperationCounters(weight={self.weight!r}, submitted={self.submitted}, "
            f"resolved={self.resolved}, failed={self.failed}, discarded={self.discarded}, "
            f"retried={self.retried}, latency={self.latency!r})"
        )


class StatsShard:
    """One thread's counters, by operation type.

    Only the owning thread mutates the counters. Adding a key to ``ops`` takes the recorder's
    lock, so a snapshot can copy the dict from another thread without it changing size mid-copy.
    """

    __slots__ = ("_lock", "_recorder", "ops")

    def __init__(
        self, lock: threading.Lock | None = None, recorder: StatsRecorder | None = None
    ) -> None:
        self.ops: dict[str, OperationCounters] = {}
        self._lock = lock if lock is not None else threading.Lock()
        self._recorder = recorder

    def op(self, operation_type: str, weight: str) -> OperationCounters:
        """The counters for ``operation_type``, created on first use (the first weight sticks)."""
        try:
            return self.ops[operation_type]
        except KeyError:
            recorder = self._recorder
            # The run watchers' thresholds are asked outside the lock (they are middleware).
            watchers = () if recorder is None else recorder.watchers
            limits = limits_for(watchers, operation_type) if watchers else None
            with self._lock:
                if recorder is None:
                    counters = OperationCounters(weight)
                else:
                    watch = recorder._watch_locked(operation_type, limits)
                    counters = OperationCounters(weight, watch, first_checks(watchers))
                    counters.checks = [1 if w.checks else sys.maxsize for w in watchers]
                self.ops[operation_type] = counters
            return counters


class _ShardLocal(threading.local):
    shard: StatsShard


def _empty_mapping() -> Mapping[str, Any]:
    return types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class OperationStats:
    """Frozen totals for one operation type. Latencies are in seconds.

    ``latency`` is the operation's merged histogram (for exporters: Prometheus buckets per
    operation type); a private copy, left out of ``==`` and ``repr``. Treat it as read-only.
    For an operation with a ``rate`` tag: ``rate_waiting`` tokens wait for the rate now,
    ``rate_delayed`` ever had to wait for it, and ``rate_wait_seconds`` is their wait in all.
    """

    operation_type: str
    weight: str
    submitted: int
    resolved: int
    failed: int
    discarded: int
    retried: int
    in_flight: int
    latency_p50: float
    latency_p95: float
    latency_p99: float
    latency_max: float
    latency_mean: float
    latency: LatencyHistogram = field(default_factory=LatencyHistogram, compare=False, repr=False)
    rate_waiting: int = 0
    rate_delayed: int = 0
    rate_wait_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Frozen totals at one instant; ``str()`` renders the Quick-Proof's "Stats at" block.

    ``latency`` is the merged histogram behind the percentiles, kept for exporters (Prometheus
    buckets); it is a private copy, left out of ``==`` and ``repr``. Treat it as read-only.
    ``process_queue_bytes`` is what queued process-lane calls hold now of pickled arguments
    (bounded by ``CoordinatorConfig.process_queue_bytes``), and
    ``process_queue_bytes_high_water`` the most they ever held at once. ``rate_waiting``,
    ``rate_delayed`` and ``rate_wait_seconds`` add up the operations' (see
    :class:`OperationStats`): the wait for ``rate`` limits. ``shared_objects`` and
    ``shared_bytes``: the objects placed in shared memory by ``share()`` in this process and
    still alive, and the bytes they hold.
    """

    label: str
    elapsed: float
    submitted: int
    resolved: int
    failed: int
    discarded: int
    retried: int
    in_flight: int
    latency_p50: float
    latency_p95: float
    latency_p99: float
    latency_max: float
    latency_mean: float
    operations: Mapping[str, OperationStats] = field(default_factory=_empty_mapping)
    events: Mapping[str, int] = field(default_factory=_empty_mapping)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram, compare=False, repr=False)
    process_queue_bytes: int = 0
    process_queue_bytes_high_water: int = 0
    rate_waiting: int = 0
    rate_delayed: int = 0
    rate_wait_seconds: float = 0.0
    shared_objects: int = 0
    shared_bytes: int = 0

    def with_label(self, label: str) -> StatsSnapshot:
        """The same numbers under another label (``[FINAL]``, a phase name, ...)."""
        return dataclasses.replace(self, label=label)

    def _percent(self, part: int) -> str:
        return f"{100.0 * part / self.submitted:.1f}%" if self.submitted else "0.0%"

    def __str__(self) -> str:
        lines = [
            f"  ── [{self.label}] Stats at {self.elapsed:.0f}s ──",
            f"     Submitted : {self.submitted}",
            f"     Resolved  : {self.resolved}  ({self._percent(self.resolved)})",
            f"     Discarded : {self.discarded}  ({self._percent(self.discarded)})",
            f"     Failed    : {self.failed}",
            f"     Retried   : {self.retried}",
        ]
        if self.in_flight > 0:
            lines.append(f"     In flight : {self.in_flight}")
        lines.append(
            f"     Latency   : p50={self.latency_p50:.3f}s  p95={self.latency_p95:.3f}s"
            f"  max={self.latency_max:.3f}s"
        )
        if self.process_queue_bytes_high_water:  # only once the process lane queued bytes
            lines.append(
                f"     Queued    : {format_bytes(self.process_queue_bytes)} of process-lane "
                f"arguments  (peak {format_bytes(self.process_queue_bytes_high_water)})"
            )
        if self.shared_objects:  # only while objects are shared (OperationsCoordinator.share)
            lines.append(
                f"     Shared    : {self.shared_objects} objects, "
                f"{format_bytes(self.shared_bytes)} in shared memory"
            )
        if self.rate_delayed:  # only once a rate limit made a token wait
            lines.append(
                f"     Rate wait : {self.rate_waiting} waiting now, {self.rate_delayed} waited "
                f"({self.rate_wait_seconds:.1f}s in all)"
            )
        return "\n".join(lines)

    def render_dispatched(self, width: int = 36) -> str:
        """The Quick-Proof's "Operations dispatched:" block: a bar per operation type, busiest
        first.

        Rows are sorted by submitted count (descending, ties by name); the largest count gets
        ``width`` blocks, the others ``count * width // largest`` but at least one if non-zero.
        Columns widen for names over 36 characters or counts over 4 digits.
        """
        if width < 1:
            raise ValueError(f"render_dispatched width must be at least 1 block, got {width!r}")
        header = "  Operations dispatched:"
        rows = sorted(self.operations.values(), key=lambda o: (-o.submitted, o.operation_type))
        if not rows:
            return f"{header}\n    (none)"
        top = rows[0].submitted
        name_w = max(36, *(len(o.operation_type) for o in rows))
        count_w = max(4, len(str(top)))
        lines = [header]
        for o in rows:
            blocks = max(1, o.submitted * width // top) if o.submitted > 0 else 0
            line = f"    {o.operation_type:<{name_w}} {o.submitted:>{count_w}}  {'█' * blocks}"
            lines.append(line.rstrip())
        return "\n".join(lines)


def _latency_summary(h: LatencyHistogram) -> tuple[float, float, float, float, float]:
    """p50, p95, p99, max and mean of ``h``, in seconds."""
    return h.percentile(50), h.percentile(95), h.percentile(99), h.max, h.mean


class StatsRecorder:
    """Per-thread shards, merged on demand into a :class:`StatsSnapshot`.

    The ``record_*`` methods are the hot path: a thread-local lookup, a dict lookup and an int
    increment, with no lock after a thread's first use of an operation type. Shards are kept
    in a list owned by the recorder, so counts outlive the threads that made them; shards of
    finished threads are folded into one at the next snapshot, so thread churn (worker
    restarts) does not grow memory.
    """

    __slots__ = (
        "_clock",
        "_events",
        "_lock",
        "_retired",
        "_shards",
        "_start",
        "_watches",
        "per_thread",
        "watchers",
    )

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        # ``per_thread.shard.ops[operation_type]`` is the calling thread's counters once it has
        # recorded that operation: the coordinator's per-token paths read it inline (a method
        # call costs as much as the lookup) and fall back to :meth:`counters`.
        self.per_thread = _ShardLocal()
        self._shards: list[tuple[threading.Thread, StatsShard]] = []
        self._retired = StatsShard(self._lock)
        self._events: dict[str, int] = {}
        self._watches: dict[str, RunWatch] = {}
        # The middleware that watch run times (``_run_watch.py``); none: runs are not shown.
        self.watchers: tuple[Watcher, ...] = ()

    # -- shards -----------------------------------------------------------------------------

    def shard(self) -> StatsShard:
        """The calling thread's shard, created and registered on the thread's first use."""
        try:
            return self.per_thread.shard
        except AttributeError:
            shard = StatsShard(self._lock, self)
            with self._lock:
                self._shards.append((threading.current_thread(), shard))
            self.per_thread.shard = shard
            return shard

    def counters(self, operation_type: str, weight: str) -> OperationCounters:
        """The calling thread's counters of ``operation_type`` (for the coordinator's own
        records that need more than a count: latency, run times)."""
        try:
            return self.per_thread.shard.ops[operation_type]
        except (AttributeError, KeyError):
            return self.shard().op(operation_type, weight)

    # -- hot path ---------------------------------------------------------------------------

    def record_submitted(self, operation_type: str, weight: str) -> None:
        """Count a token as submitted. Call it before the token can possibly complete."""
        try:  # _counters, inline: once per submitted token
            counters = self.per_thread.shard.ops[operation_type]
        except (AttributeError, KeyError):
            counters = self.shard().op(operation_type, weight)
        counters.submitted += 1

    def record_resolved(self, operation_type: str, weight: str, latency_s: float) -> None:
        """Count a token resolved after ``latency_s`` seconds."""
        c = self.counters(operation_type, weight)
        c.resolved += 1
        c.latency.record(latency_s)

    def record_failed(self, operation_type: str, weight: str, latency_s: float) -> None:
        """Count a token failed after ``latency_s`` seconds (its latency is recorded too)."""
        c = self.counters(operation_type, weight)
        c.failed += 1
        c.latency.record(latency_s)

    def record_discarded(self, operation_type: str, weight: str) -> None:
        """Count a token discarded (cancelled, past its deadline, dropped on stop)."""
        self.counters(operation_type, weight).discarded += 1

    def record_retried(self, operation_type: str, weight: str) -> None:
        """Count one retry; the token stays in flight and is not counted as submitted again."""
        self.counters(operation_type, weight).retried += 1

    # -- run times (run-time watching middleware: the Guard House) ----------------------------

    def watch_runs(self, watchers: tuple[Watcher, ...]) -> None:
        """Show run times to ``watchers`` (``_run_watch.py``) from now on: every operation's
        thresholds are asked again, and a thread's counters made before meet their first
        check-in at their next run."""
        with self._lock:
            self.watchers = watchers
            watches = dict(self._watches)
        for operation_type, watch in watches.items():
            limits = limits_for(watchers, operation_type)
            watch.limits = limits
            watch.slow_after = min(limits, default=math.inf)
        first = first_checks(watchers)
        with self._lock:
            shards = [self._retired, *(s for _, s in self._shards)]
            for shard in shards:
                for counters in list(shard.ops.values()):
                    # Another thread's counters: a racing write of its own delivery wins, which
                    # only delays this first check-in to that delivery's.
                    counters.checks = []
                    if first != sys.maxsize:
                        counters.next_check = min(counters.next_check, counters.runs.count + 1)

    def _watch_locked(self, operation_type: str, limits: list[float] | None = None) -> RunWatch:
        watch = self._watches.get(operation_type)
        if watch is None:
            watch = self._watches[operation_type] = RunWatch(limits)
        return watch

    def run_times(self) -> dict[str, LatencyHistogram]:
        """Every operation type's run times so far, merged across threads (copies)."""
        with self._lock:
            self._fold_finished_threads()
            shards = [self._retired, *(s for _, s in self._shards)]
            parts: dict[str, list[LatencyHistogram]] = {}
            for shard in shards:
                for op_type, c in list(shard.ops.items()):
                    parts.setdefault(op_type, []).append(c.runs)
        return {op_type: LatencyHistogram.merged(hists) for op_type, hists in parts.items()}

    # -- rare events ------------------------------------------------------------------------

    def count_event(self, name: str, n: int = 1) -> None:
        """Count a rare event (convergence swap, worker restart, ...) under the lock."""
        with self._lock:
            self._events[name] = self._events.get(name, 0) + n

    def reset_clock(self) -> None:
        """Restart the clock behind ``StatsSnapshot.elapsed``."""
        self._start = self._clock()

    # -- snapshot ---------------------------------------------------------------------------

    def _fold_finished_threads(self) -> None:
        """Merge the shards of finished threads into ``_retired``; call with the lock held.

        Safe without coordination: a finished thread writes no more, and its last writes
        happened before ``is_alive()`` turned false.
        """
        alive: list[tuple[threading.Thread, StatsShard]] = []
        for thread, shard in self._shards:
            if thread.is_alive():
                alive.append((thread, shard))
                continue
            for op_type, c in shard.ops.items():
                r = self._retired.ops.get(op_type)
                if r is None:
                    r = self._retired.ops[op_type] = OperationCounters(c.weight, c.watch)
                r.submitted += c.submitted
                r.resolved += c.resolved
                r.failed += c.failed
                r.discarded += c.discarded
                r.retried += c.retried
                r.latency.merge(c.latency)
                r.runs.merge(c.runs)
        self._shards = alive

    def snapshot(
        self,
        label: str = "STATS",
        *,
        queued_bytes: tuple[int, int] = (0, 0),
        rate: Mapping[str, RateStats] | None = None,
    ) -> StatsSnapshot:
        """Add up every shard into a frozen :class:`StatsSnapshot` (``queued_bytes``: the
        process lane's queued bytes now and at most; ``rate``: the rate limiter's figures per
        operation type; both read by the caller).

        ``in_flight >= 0`` without stopping the writers: a token's ``submitted`` increment
        happens before its terminal one (resolved/failed/discarded), so reading the terminal
        counters of *every* shard first and ``submitted`` afterwards can only see more
        submissions than completions, never fewer. The lock is held meanwhile so no counter
        (hence no submission) can appear that the terminal pass did not cover.
        """
        now = self._clock()
        with self._lock:
            self._fold_finished_threads()
            entries = [
                (op_type, c)
                for shard in (self._retired, *(s for _, s in self._shards))
                for op_type, c in shard.ops.items()
            ]
            terminal = [(c.resolved, c.failed, c.discarded) for _, c in entries]
            started = [(c.submitted, c.retried) for _, c in entries]
            events = dict(self._events)

        totals: dict[str, list[int]] = {}
        weights: dict[str, str] = {}
        hists: dict[str, list[LatencyHistogram]] = {}
        for (op_type, c), (res, fail, disc), (sub, retr) in zip(
            entries, terminal, started, strict=True
        ):
            t = totals.setdefault(op_type, [0, 0, 0, 0, 0])
            t[0] += sub
            t[1] += res
            t[2] += fail
            t[3] += disc
            t[4] += retr
            weights.setdefault(op_type, c.weight)
            hists.setdefault(op_type, []).append(c.latency)

        operations: dict[str, OperationStats] = {}
        merged_ops: list[LatencyHistogram] = []
        for op_type in sorted(totals):
            sub, res, fail, disc, retr = totals[op_type]
            h = LatencyHistogram.merged(hists[op_type])
            merged_ops.append(h)
            p50, p95, p99, lmax, lmean = _latency_summary(h)
            waits = _NO_RATE if rate is None else rate.get(op_type, _NO_RATE)
            operations[op_type] = OperationStats(
                operation_type=op_type,
                weight=weights[op_type],
                submitted=sub,
                resolved=res,
                failed=fail,
                discarded=disc,
                retried=retr,
                in_flight=sub - res - fail - disc,
                latency_p50=p50,
                latency_p95=p95,
                latency_p99=p99,
                latency_max=lmax,
                latency_mean=lmean,
                latency=h,
                rate_waiting=waits.waiting,
                rate_delayed=waits.delayed,
                rate_wait_seconds=waits.wait_seconds,
            )
        overall = LatencyHistogram.merged(merged_ops)
        sub = sum(o.submitted for o in operations.values())
        res = sum(o.resolved for o in operations.values())
        fail = sum(o.failed for o in operations.values())
        disc = sum(o.discarded for o in operations.values())
        p50, p95, p99, lmax, lmean = _latency_summary(overall)
        return StatsSnapshot(
            label=label,
            elapsed=now - self._start,
            submitted=sub,
            resolved=res,
            failed=fail,
            discarded=disc,
            retried=sum(o.retried for o in operations.values()),
            in_flight=sub - res - fail - disc,
            operations=types.MappingProxyType(operations),
            events=types.MappingProxyType(events),
            latency_p50=p50,
            latency_p95=p95,
            latency_p99=p99,
            latency_max=lmax,
            latency_mean=lmean,
            latency=overall,
            process_queue_bytes=queued_bytes[0],
            process_queue_bytes_high_water=queued_bytes[1],
            rate_waiting=sum(o.rate_waiting for o in operations.values()),
            rate_delayed=sum(o.rate_delayed for o in operations.values()),
            rate_wait_seconds=sum(o.rate_wait_seconds for o in operations.values()),
        )
