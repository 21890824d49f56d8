"""Sharded stats: exact counts across threads, in-flight arithmetic, the Quick-Proof's rendering."""

from __future__ import annotations

import dataclasses
import queue
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

from tokengate._histogram import RELATIVE_PRECISION, LatencyHistogram
from tokengate._stats import (
    OperationCounters,
    OperationStats,
    StatsRecorder,
    StatsShard,
    StatsSnapshot,
)

OP_FIELDS = ("submitted", "resolved", "failed", "discarded", "retried", "in_flight")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_threads(n: int, target: Callable[[int], object]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()


def op_stats(name: str, weight: str, **counts: int) -> OperationStats:
    values = {f: 0 for f in OP_FIELDS} | counts
    return OperationStats(
        operation_type=name,
        weight=weight,
        latency_p50=0.0,
        latency_p95=0.0,
        latency_p99=0.0,
        latency_max=0.0,
        latency_mean=0.0,
        **values,
    )


def snapshot_of(ops: dict[str, int]) -> StatsSnapshot:
    operations = {name: op_stats(name, "light", submitted=n) for name, n in ops.items()}
    total = sum(ops.values())
    return StatsSnapshot(
        label="STATS",
        elapsed=0.0,
        submitted=total,
        resolved=0,
        failed=0,
        discarded=0,
        retried=0,
        in_flight=total,
        latency_p50=0.0,
        latency_p95=0.0,
        latency_p99=0.0,
        latency_max=0.0,
        latency_mean=0.0,
        operations=types.MappingProxyType(operations),
    )


@pytest.mark.timeout(30)
def test_counts_from_many_threads_add_up_exactly() -> None:
    rec = StatsRecorder()
    n_threads, n = 8, 3000
    barrier = threading.Barrier(n_threads)

    def work(i: int) -> None:
        op, weight = ("fib", "heavy") if i % 2 else ("echo", "light")
        barrier.wait(timeout=10)
        for k in range(n):
            rec.record_submitted(op, weight)
            rec.record_submitted("shared", "medium")
            rec.record_retried("shared", "medium")
            if k % 3 == 0:
                rec.record_failed("shared", "medium", 0.002)
            elif k % 3 == 1:
                rec.record_discarded("shared", "medium")
            else:
                rec.record_resolved("shared", "medium", 0.001)
            rec.record_resolved(op, weight, 0.01 * (i + 1))
            rec.count_event("loop")

    run_threads(n_threads, work)
    snap = rec.snapshot()
    total = n_threads * n
    assert snap.submitted == 2 * total
    assert snap.resolved == total + total // 3
    assert snap.failed == total // 3
    assert snap.discarded == total // 3
    assert snap.retried == total
    assert snap.in_flight == 0
    assert snap.events == {"loop": total}
    assert snap.latency.count == snap.resolved + snap.failed

    shared = snap.operations["shared"]
    assert (shared.submitted, shared.resolved, shared.failed, shared.discarded) == (
        total,
        total // 3,
        total // 3,
        total // 3,
    )
    assert shared.retried == total
    assert shared.weight == "medium"
    assert snap.operations["fib"].submitted == snap.operations["echo"].submitted == total // 2
    assert snap.operations["fib"].weight == "heavy"
    # fib ran on threads 1,3,5,7 with latencies 0.02, 0.04, 0.06, 0.08
    assert snap.operations["fib"].latency_max == pytest.approx(0.08)
    assert snap.operations["echo"].latency_max == pytest.approx(0.07)
    assert snap.latency_max == pytest.approx(0.08)


def test_per_operation_breakdown_and_latencies() -> None:
    rec = StatsRecorder()
    for i in range(1, 101):
        rec.record_submitted("resize", "medium")
        rec.record_resolved("resize", "medium", i / 100)  # 0.01 .. 1.00
    rec.record_submitted("upload", "light")
    rec.record_failed("upload", "light", 2.5)
    rec.record_submitted("upload", "heavy")  # the first weight sticks

    snap = rec.snapshot()
    assert set(snap.operations) == {"resize", "upload"}
    resize = snap.operations["resize"]
    assert (resize.submitted, resize.resolved, resize.failed, resize.in_flight) == (100, 100, 0, 0)
    assert resize.weight == "medium"
    assert resize.latency_p50 == pytest.approx(0.50, rel=RELATIVE_PRECISION)
    assert resize.latency_p95 == pytest.approx(0.95, rel=RELATIVE_PRECISION)
    assert resize.latency_p99 == pytest.approx(0.99, rel=RELATIVE_PRECISION)
    assert resize.latency_max == 1.0
    assert resize.latency_mean == pytest.approx(0.505)

    upload = snap.operations["upload"]
    assert (upload.submitted, upload.failed, upload.in_flight, upload.weight) == (2, 1, 1, "light")
    assert upload.latency_max == 2.5
    assert snap.latency_max == 2.5
    assert snap.latency.count == 101


def test_in_flight_arithmetic_and_its_line() -> None:
    rec = StatsRecorder()
    for _ in range(10):
        rec.record_submitted("op", "light")
    for _ in range(3):
        rec.record_resolved("op", "light", 0.1)
    for _ in range(2):
        rec.record_failed("op", "light", 0.1)
    rec.record_discarded("op", "light")
    rec.record_retried("op", "light")

    snap = rec.snapshot()
    assert snap.in_flight == 10 - 3 - 2 - 1 == snap.operations["op"].in_flight
    assert snap.submitted == snap.resolved + snap.failed + snap.discarded + snap.in_flight
    lines = str(snap).splitlines()
    assert lines[5:7] == ["     Retried   : 1", "     In flight : 4"]

    for _ in range(4):
        rec.record_resolved("op", "light", 0.1)
    done = rec.snapshot()
    assert done.in_flight == 0
    assert "In flight" not in str(done)


@pytest.mark.timeout(30)
def test_in_flight_never_negative_while_threads_hand_tokens_over() -> None:
    """Submit on one thread, complete on another, snapshot from a third, all at once."""
    rec = StatsRecorder()
    handoff: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    n = 20_000
    start = threading.Barrier(3)
    done = threading.Event()

    def producer() -> None:
        start.wait(timeout=10)
        for k in range(n):
            rec.record_submitted(f"op{k % 3}", "light")
            handoff.put(k)
        handoff.put(None)

    def consumer() -> None:
        start.wait(timeout=10)
        while (k := handoff.get(timeout=10)) is not None:
            rec.record_resolved(f"op{k % 3}", "light", 0.001)
        done.set()

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    start.wait(timeout=10)
    snapshots = 0
    while not done.is_set() or snapshots == 0:
        snap = rec.snapshot()
        snapshots += 1
        assert snap.in_flight >= 0
        assert snap.resolved <= snap.submitted
        for op in snap.operations.values():
            assert op.in_flight >= 0
    for t in threads:
        t.join(timeout=10)
    final = rec.snapshot()
    assert (final.submitted, final.resolved, final.in_flight) == (n, n, 0)


class RacingCounters(OperationCounters):
    """Counters whose ``submitted`` read is followed at once by a token submitted here and
    completed on ``completes_on``: the race a snapshot meets while workers run."""

    __slots__ = ("completes_on",)

    def __init__(self, completes_on: OperationCounters | None = None) -> None:
        super().__init__("light")
        self.completes_on = completes_on or self

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name == "submitted":
            super().__setattr__("submitted", value + 1)
            self.completes_on.resolved += 1
        return value


def test_snapshot_reads_terminal_counters_before_submitted() -> None:
    """A token submitted on one shard and resolved on another between two reads can only make
    ``in_flight`` larger, never negative, because every terminal counter is read first."""
    rec = StatsRecorder()
    completer = RacingCounters()
    submitter = RacingCounters(completes_on=completer)
    rec.shard().ops["op"] = submitter
    other = StatsShard()
    other.ops["op"] = completer
    rec._shards.append((threading.current_thread(), other))
    for _ in range(3):
        snap = rec.snapshot()
        assert snap.in_flight >= 0
        assert snap.operations["op"].in_flight >= 0


def test_shards_of_exited_threads_are_still_counted_once() -> None:
    rec = StatsRecorder()

    def work(i: int) -> None:
        for _ in range(10):
            rec.record_submitted("job", "light")
            rec.record_resolved("job", "light", 0.5)

    run_threads(5, work)
    assert rec.snapshot().resolved == 50
    # Finished threads' shards are folded away, and not counted twice afterwards.
    assert len(rec._shards) == 0
    assert rec.snapshot().resolved == 50
    run_threads(3, work)
    rec.record_submitted("job", "light")
    snap = rec.snapshot()
    assert (snap.submitted, snap.resolved, snap.in_flight) == (81, 80, 1)
    assert snap.latency.count == 80
    assert len(rec._shards) == 1  # only this (live) thread's shard remains


def test_each_thread_gets_its_own_shard() -> None:
    rec = StatsRecorder()
    mine = rec.shard()
    assert isinstance(mine, StatsShard)
    assert rec.shard() is mine
    seen: list[StatsShard] = []
    run_threads(1, lambda i: seen.append(rec.shard()))
    assert seen[0] is not mine


def test_shard_op_get_or_create() -> None:
    shard = StatsShard()
    a = shard.op("x", "heavy")
    assert shard.op("x", "light") is a
    assert a.weight == "heavy"
    assert shard.ops == {"x": a}
    assert (a.submitted, a.resolved, a.failed, a.discarded, a.retried) == (0, 0, 0, 0, 0)
    assert isinstance(a.latency, LatencyHistogram)
    assert not hasattr(a, "__dict__")


def test_events_and_elapsed_use_the_injected_clock() -> None:
    clock = FakeClock(500.0)
    rec = StatsRecorder(clock=clock)
    clock.now = 542.6
    rec.count_event("convergence_swap")
    rec.count_event("worker_restart", 3)
    rec.count_event("convergence_swap")
    snap = rec.snapshot("NORMAL")
    assert snap.elapsed == pytest.approx(42.6)
    assert str(snap).splitlines()[0] == "  ── [NORMAL] Stats at 43s ──"
    assert snap.events == {"convergence_swap": 2, "worker_restart": 3}
    rec.reset_clock()
    clock.now = 550.0
    assert rec.snapshot().elapsed == pytest.approx(7.4)


def test_str_matches_the_seed_block_exactly() -> None:
    snap = dataclasses.replace(snapshot_of({}), label="NORMAL", elapsed=709.4)
    snap = dataclasses.replace(
        snap,
        submitted=5888,
        resolved=5888,
        in_flight=0,
        latency_p50=0.3091,
        latency_p95=1.4066,
        latency_max=1.89,
    )
    assert str(snap) == (
        "  ── [NORMAL] Stats at 709s ──\n"
        "     Submitted : 5888\n"
        "     Resolved  : 5888  (100.0%)\n"
        "     Discarded : 0  (0.0%)\n"
        "     Failed    : 0\n"
        "     Retried   : 0\n"
        "     Latency   : p50=0.309s  p95=1.407s  max=1.890s"
    )


def test_str_with_partial_outcomes_and_with_nothing_submitted() -> None:
    snap = dataclasses.replace(
        snapshot_of({}),
        label="FINAL",
        elapsed=3.7,
        submitted=3,
        resolved=1,
        failed=1,
        discarded=1,
        retried=2,
        in_flight=0,
    )
    assert str(snap).splitlines()[:6] == [
        "  ── [FINAL] Stats at 4s ──",
        "     Submitted : 3",
        "     Resolved  : 1  (33.3%)",
        "     Discarded : 1  (33.3%)",
        "     Failed    : 1",
        "     Retried   : 2",
    ]
    empty = StatsRecorder(clock=FakeClock()).snapshot()
    assert str(empty) == (
        "  ── [STATS] Stats at 0s ──\n"
        "     Submitted : 0\n"
        "     Resolved  : 0  (0.0%)\n"
        "     Discarded : 0  (0.0%)\n"
        "     Failed    : 0\n"
        "     Retried   : 0\n"
        "     Latency   : p50=0.000s  p95=0.000s  max=0.000s"
    )


SEED_DISPATCHED = """\
  Operations dispatched:
    heavy_operation                       180  ████████████████████████████████████
    fibonacci_operation                   179  ███████████████████████████████████
    trivial_operation                     178  ███████████████████████████████████
    complex_operation                     176  ███████████████████████████████████
    write_blob_moderate                   169  █████████████████████████████████
    string_operation                      163  ████████████████████████████████
    append_log_slow                       150  ██████████████████████████████
    write_json_fast                       150  ██████████████████████████████
    moderate_operation                    149  █████████████████████████████
    prime_operation                       148  █████████████████████████████
    simple_operation                      147  █████████████████████████████"""


def test_render_dispatched_matches_the_seed() -> None:
    counts = {
        "simple_operation": 147,
        "write_json_fast": 150,
        "heavy_operation": 180,
        "prime_operation": 148,
        "append_log_slow": 150,
        "trivial_operation": 178,
        "string_operation": 163,
        "fibonacci_operation": 179,
        "moderate_operation": 149,
        "write_blob_moderate": 169,
        "complex_operation": 176,
    }
    assert snapshot_of(counts).render_dispatched() == SEED_DISPATCHED


def test_render_dispatched_orders_and_scales_bars() -> None:
    snap = snapshot_of({"b": 1, "a": 1, "big": 1000, "mid": 500, "idle": 0})
    lines = snap.render_dispatched(width=10).splitlines()
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["big", "mid", "a", "b", "idle"]
    bars = [line.count("█") for line in lines[1:]]
    assert bars == [10, 5, 1, 1, 0]  # a non-zero count always gets a block
    assert lines[-1] == "    idle" + " " * 33 + "   0"


def test_render_dispatched_widens_columns_and_handles_nothing() -> None:
    long_name = "x" * 40
    lines = snapshot_of({long_name: 123456, "y": 1}).render_dispatched(width=4).splitlines()
    assert lines[1] == f"    {long_name} 123456  ████"
    assert lines[2] == "    y" + " " * 39 + "      1  █"
    assert snapshot_of({}).render_dispatched() == "  Operations dispatched:\n    (none)"
    with pytest.raises(ValueError, match="width"):
        snapshot_of({"a": 1}).render_dispatched(width=0)


def test_snapshot_is_frozen_and_its_mappings_read_only() -> None:
    rec = StatsRecorder()
    rec.record_submitted("op", "light")
    rec.count_event("swap")
    snap = rec.snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.submitted = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.operations["op"].submitted = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.operations["new"] = snap.operations["op"]  # type: ignore[index]
    with pytest.raises(TypeError):
        snap.events["swap"] = 9  # type: ignore[index]
    # later records do not leak into an existing snapshot
    rec.record_submitted("op", "light")
    rec.record_resolved("op", "light", 0.2)
    rec.count_event("swap")
    assert (snap.submitted, snap.operations["op"].submitted, snap.events["swap"]) == (1, 1, 1)
    assert snap.latency.count == 0


def test_with_label_and_equality_ignore_the_histogram() -> None:
    clock = FakeClock()
    rec = StatsRecorder(clock=clock)
    rec.record_submitted("op", "light")
    rec.record_resolved("op", "light", 0.25)
    snap = rec.snapshot()
    final = snap.with_label("FINAL")
    assert (snap.label, final.label) == ("STATS", "FINAL")
    assert dataclasses.replace(final, label="STATS") == snap
    assert str(final).startswith("  ── [FINAL] Stats at 0s ──")
    other = dataclasses.replace(snap, latency=LatencyHistogram())
    assert other == snap
    assert "LatencyHistogram" not in repr(snap)
    assert rec.snapshot() == snap  # nothing changed: equal numbers, different histogram objects
