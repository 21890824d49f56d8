"""Trace export: Chrome trace-event JSON, one track per worker grouped by core, bounded buffer."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import HEAVY_ON_THREADS
from tokengate import OperationsCoordinator, RetryPolicy, Span, TokenGateError, task_token_guard
from tokengate.observability._trace import trace_events

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS


Make = Callable[..., OperationsCoordinator]


@task_token_guard(operation_type="tr_square", tags={"weight": "light"})
def square(x: int) -> int:
    return sum(i * i for i in range(x))


@task_token_guard(operation_type="tr_heavy", tags={"weight": "heavy"})
def heavy(x: int) -> int:
    return sum(range(x))


@task_token_guard(operation_type="tr_fib", tags={"weight": "heavy"})
def fib(n: int) -> int:
    if n < 2:
        return n
    return fib(n - 1).get(timeout=30) + fib(n - 2).get(timeout=30)


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def check_trace_event_format(data: dict[str, Any]) -> None:
    """The JSON object format of the Trace Event Format, as Perfetto and chrome://tracing read."""
    assert isinstance(data["traceEvents"], list)
    assert data["displayTimeUnit"] in ("ms", "ns")
    for event in data["traceEvents"]:
        assert event["ph"] in ("X", "M"), event
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int), event
        assert isinstance(event["name"], str) and event["name"], event
        if event["ph"] == "X":
            assert isinstance(event["ts"], int | float) and event["ts"] >= 0, event
            assert isinstance(event["dur"], int | float) and event["dur"] >= 0, event
            assert isinstance(event["args"], dict), event
        else:
            assert event["name"] in (
                "process_name",
                "process_sort_index",
                "thread_name",
                "thread_sort_index",
            ), event
            assert isinstance(event["args"], dict), event


def spans_by_track(data: dict[str, Any]) -> dict[tuple[int, int], list[tuple[float, float]]]:
    tracks: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for e in data["traceEvents"]:
        if e["ph"] == "X":
            tracks[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    return tracks


def test_export_is_valid_trace_event_json(make_coordinator: Make, tmp_path: Path) -> None:
    coordinator = make_coordinator(workers_per_core=2, trace=True)
    tokens = [square(200) for _ in range(150)] + [heavy(1000) for _ in range(50)]
    for token in tokens:
        token.get(timeout=30)
    path = tmp_path / "run.trace.json"
    assert coordinator.export_trace(path) == 200
    data = load(path)
    check_trace_event_format(data)
    assert data["otherData"]["older_spans_dropped"] is False
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 200
    assert {e["args"]["token"] for e in spans} == {t.id for t in tokens}
    by_id = {t.id: t for t in tokens}
    for e in spans:
        token = by_id[e["args"]["token"]]
        assert e["name"] == token.operation_type
        assert e["pid"] == token.core == e["args"]["core"]
        assert e["args"]["worker"] == token.worker
        assert (e["args"]["lane"], e["args"]["outcome"], e["cat"]) == (
            "thread",
            "resolved",
            "resolved",
        )
    # one named track per worker, grouped under its core
    meta = [e for e in data["traceEvents"] if e["ph"] == "M"]
    cores = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert cores == {core: f"Core {core}" for core in {e["pid"] for e in spans}}
    for e in spans:
        assert threads[(e["pid"], e["tid"])] == e["args"]["worker"]
    assert len(set(threads.values())) == len(threads)  # a worker is one track


def test_spans_do_not_overlap_on_a_worker(make_coordinator: Make, tmp_path: Path) -> None:
    coordinator = make_coordinator(workers_per_core=2, trace=True)
    for token in [square(300) for _ in range(400)]:
        token.get(timeout=30)
    path = tmp_path / "t.json"
    coordinator.export_trace(path)
    for track, intervals in spans_by_track(load(path)).items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, (track, end, start)


def test_nested_runs_nest_on_their_worker(make_coordinator: Make, tmp_path: Path) -> None:
    """A waiting worker runs its child itself: the child's span lies inside its parent's."""
    coordinator = make_coordinator(workers_per_core=1, trace=True)
    assert fib(8).get(timeout=30) == 21
    path = tmp_path / "fib.json"
    coordinator.export_trace(path)
    data = load(path)
    check_trace_event_format(data)
    nested = 0
    for intervals in spans_by_track(data).values():
        intervals.sort(key=lambda iv: (iv[0], -iv[1]))
        open_ends: list[float] = []
        for start, end in intervals:
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + 1e-3, "partial overlap on one track"
            nested += bool(open_ends)
            open_ends.append(end)
    assert nested > 0  # fib(8) as tasks always runs some children inline


def test_one_span_per_attempt(make_coordinator: Make) -> None:
    coordinator = make_coordinator(
        workers_per_core=1, trace=True, retry_policy=RetryPolicy(backoff_base=0)
    )
    calls = []

    @task_token_guard(operation_type="tr_flaky", tags={"weight": "light"})
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("try again")
        return "done"

    token = flaky()
    assert token.get(timeout=10) == "done"
    spans = [s for s in coordinator.trace_spans() if s.token_id == token.id]
    assert [(s.attempt, s.outcome, s.error) for s in spans] == [
        (1, "retried", "ConnectionResetError"),
        (2, "retried", "ConnectionResetError"),
        (3, "resolved", None),
    ]
    assert all(isinstance(s, Span) and s.end >= s.start for s in spans)
    assert spans[0].end <= spans[1].start <= spans[2].start


def test_buffer_is_a_bounded_ring(make_coordinator: Make, tmp_path: Path) -> None:
    coordinator = make_coordinator(workers_per_core=1, trace=True, trace_buffer=10)
    tokens = [square(5) for _ in range(50)]
    for token in tokens:
        token.get(timeout=10)
    spans = coordinator.trace_spans()
    assert len(spans) == 10
    path = tmp_path / "ring.json"
    assert coordinator.export_trace(path) == 10
    other = load(path)["otherData"]
    assert (other["buffer_capacity"], other["older_spans_dropped"]) == (10, True)
    assert {s.token_id for s in spans} <= {t.id for t in tokens[-20:]}


def test_trace_is_off_by_default(coordinator: OperationsCoordinator, tmp_path: Path) -> None:
    assert coordinator._observability.trace is None
    with pytest.raises(TokenGateError, match=r"tracing is off: .*trace=True"):
        coordinator.export_trace(tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_export_of_nothing_is_still_a_trace(make_coordinator: Make, tmp_path: Path) -> None:
    coordinator = make_coordinator(trace=True)
    assert coordinator.export_trace(tmp_path / "empty.json") == 0
    data = load(tmp_path / "empty.json")
    check_trace_event_format(data)
    assert data["traceEvents"] == []


def make_span(worker: str, start: float, end: float, core: int = 1, lane: str = "thread") -> Span:
    return Span("op", f"op_{start}", 1, core, worker, lane, start, end, "resolved", None)


def test_overlapping_spans_of_one_worker_spill_to_extra_tracks() -> None:
    """A lane running several tokens at once per worker still gives well-formed tracks."""
    spans = [
        make_span("slot_0_core_1", 0.0, 1.0, lane="async"),
        make_span("slot_0_core_1", 0.5, 1.5, lane="async"),  # partial overlap: spills
        make_span("slot_0_core_1", 0.6, 0.7, lane="async"),  # inside the first: nests
        make_span("slot_0_core_1", 2.0, 3.0, lane="async"),  # after both: first track
    ]
    data = trace_events(spans)
    check_trace_event_format(data)
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    tids = [e["tid"] for e in events]
    assert tids[0] == tids[2] == tids[3] != tids[1]
    names = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert names == {tids[0]: "slot_0_core_1 (async)", tids[1]: "slot_0_core_1 (async) #2"}
    assert events[0]["ts"] == 0.0 and events[1]["ts"] == 500000.0
    assert events[1]["dur"] == 1000000.0


def test_tracks_are_ordered_by_core_then_worker() -> None:
    spans = [
        make_span("worker_10_core_2", 0, 1, core=2),
        make_span("worker_9_core_2", 0, 1, core=2),
        make_span("worker_0_core_1", 0, 1, core=1),
    ]
    data = trace_events(spans)
    names = [e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"]
    order = sorted(
        (e["tid"], e["args"]["name"]) for e in data["traceEvents"] if e["name"] == "thread_name"
    )
    assert [name for _, name in order] == ["worker_0_core_1", "worker_9_core_2", "worker_10_core_2"]
    assert len(names) == 3
