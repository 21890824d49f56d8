"""The I/O lane (per-tier thread pools) and resizable pools: add, retire, hand back, steal,
plus the Quick-Proof's Proof 2 I/O functions run as written."""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from conftest import GATE, assert_counts_add_up, eventually
from tokengate import OperationsCoordinator, task_token_guard
from tokengate._convergence import ConvergenceEngine
from tokengate.demos.seed_io import (
    append_log_slow,
    create_json_file,
    write_blob_moderate,
    write_json_fast,
)
from tokengate.lanes._thread import FAN_OUT, ThreadLane

Make = Callable[..., OperationsCoordinator]
LOCK = threading.Lock()
RUNNING = {"now": 0, "high": 0}


@pytest.fixture(autouse=True)
def _reset() -> None:
    RUNNING.update(now=0, high=0)


@task_token_guard(operation_type="fast_write", tags={"weight": "light", "storage_speed": "FAST"})
def fast_write(label: str) -> str:
    with LOCK:
        RUNNING["now"] += 1
        RUNNING["high"] = max(RUNNING["high"], RUNNING["now"])
    try:
        assert GATE.wait(30)
    finally:
        with LOCK:
            RUNNING["now"] -= 1
    return label


@task_token_guard(operation_type="where_fast", tags={"weight": "heavy", "storage_speed": "FAST"})
def where_fast() -> str:
    return threading.current_thread().name


@task_token_guard(operation_type="light_gated", tags={"weight": "light"})
def light_gated(label: str, started: threading.Event | None = None) -> str:
    if started is not None:
        started.set()
    assert GATE.wait(30)
    return label


@task_token_guard(operation_type="quick", tags={"weight": "light"})
def quick(x: int) -> int:
    return x + 1


@task_token_guard(operation_type="quick_fast", tags={"weight": "light", "storage_speed": "FAST"})
def quick_fast(x: int) -> int:
    return x + 1


def _idle_engine(coordinator: OperationsCoordinator) -> tuple[ConvergenceEngine, list[float]]:
    """An engine over ``coordinator``'s lanes, driven by hand: the interpreter looks 1% busy."""
    cpu = [0.0]
    engine = ConvergenceEngine(
        lambda: coordinator.lanes,
        on_change=coordinator.backend.router.invalidate,
        count_event=coordinator.count_event,
        process_cpu=lambda: (cpu[0], cpu[0]),
        run_queue_waits=lambda tids: None,
    )
    return engine, cpu


# -- routing ------------------------------------------------------------------------------------
def test_storage_tier_tasks_run_on_the_io_lane(coordinator: OperationsCoordinator) -> None:
    token = where_fast()
    name = token.get(timeout=10)
    assert name.startswith("tokengate-io_fast_")
    assert token.lane == "io" and token.core == 0
    assert re.fullmatch(r"io_fast_\d+", token.worker or "")
    assert quick(1).get(timeout=10) == 2
    assert set(coordinator.lanes) >= {"thread", "io", "async"}


def test_fifty_fast_writes_in_flight_once_the_pool_grows(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, convergence=False)
    engine, cpu = _idle_engine(coordinator)
    tokens = [fast_write(str(i)) for i in range(60)]
    eventually(lambda: RUNNING["now"] == 4, what="the 4 baseline FAST workers to be busy")
    assert coordinator.tier_stats()["FAST"].waiting == 10  # 50 permits, 10 wait for one
    engine.sample(now=0.0)
    cpu[0] = 0.01
    engine.sample(now=1.0)  # a second backlogged sample with an idle interpreter: grow
    assert len(coordinator.lanes["io"].pools["FAST"]) == 50
    eventually(lambda: RUNNING["now"] == 50, what="50 FAST writes running at once")
    GATE.set()
    assert sorted(int(t.get(timeout=10)) for t in tokens) == list(range(60))
    assert RUNNING["high"] == 50
    assert coordinator.tier_stats()["FAST"].high_water == 50


def test_cpu_work_keeps_flowing_while_a_tier_is_full(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, storage_limits={"FAST": 2}, io_workers=2)
    writes = [fast_write(str(i)) for i in range(5)]
    eventually(lambda: RUNNING["now"] == 2, what="the FAST tier to fill")
    assert [quick(i).get(timeout=10) for i in range(20)] == list(range(1, 21))
    assert coordinator.tier_stats()["FAST"].waiting == 3
    GATE.set()
    for token in writes:
        token.get(timeout=10)


@task_token_guard(operation_type="thread_parent", tags={"weight": "light"})
def thread_parent(barrier: threading.Barrier) -> int:
    barrier.wait(10)
    return quick_fast(1).get(timeout=30)  # waits on a token queued behind io_parent


@task_token_guard(operation_type="io_parent", tags={"weight": "light", "storage_speed": "FAST"})
def io_parent(barrier: threading.Barrier) -> int:
    barrier.wait(10)
    return quick(1).get(timeout=30)  # waits on a token queued behind thread_parent


def test_thread_and_io_workers_help_each_other_instead_of_deadlocking(
    make_coordinator: Make,
) -> None:
    make_coordinator(workers_per_core=1, cores=1, io_workers=1, convergence=False)
    barrier = threading.Barrier(2)
    a, b = thread_parent(barrier), io_parent(barrier)
    assert (a.get(timeout=30), b.get(timeout=30)) == (2, 2)


# -- resizing mechanics -------------------------------------------------------------------------
def test_an_added_worker_steals_from_a_backed_up_sibling(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1, convergence=False)
    started = threading.Event()
    blocker = light_gated("first", started)
    assert started.wait(10)
    queued = [quick(i) for i in range(10)]  # all queued behind the blocked worker
    lane = coordinator.lanes["thread"]
    lane.add_worker(1)
    coordinator.backend.router.invalidate()
    assert [t.get(timeout=10) for t in queued] == list(range(1, 11))  # while the first blocks
    assert {t.worker for t in queued} == {lane.pools[1][1].name}
    GATE.set()
    blocker.get(timeout=10)


def test_a_thief_takes_the_older_half_of_the_busiest_queue_in_order() -> None:
    # One steal per token cost more than a short token under the GIL (B1): an idle worker
    # takes the older half of the busiest sibling's queue, ahead of anything routed to it since.
    lane = ThreadLane({1: None}, 3, host=cast(Any, None))  # workers built, never started
    victim, thief, other = lane.pools[1]
    victim.mailbox.extend(range(10))
    other.mailbox.extend(range(100, 103))
    thief.mailbox.append("routed meanwhile")
    assert lane.steal(thief) == 0  # the oldest token of the busiest sibling, to run now
    assert list(thief.mailbox) == [1, 2, 3, 4, "routed meanwhile"]
    assert list(victim.mailbox) == [5, 6, 7, 8, 9]
    assert list(other.mailbox) == [100, 101, 102]
    thief.mailbox.clear()  # it ran those: idle again
    assert lane.steal(thief) == 5  # a queue of 5: the first, and (5 - 1) // 2 more
    assert (list(thief.mailbox), list(victim.mailbox)) == ([6, 7], [8, 9])


def test_retiring_a_busy_worker_hands_back_its_queue_then_it_exits(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = make_coordinator(workers_per_core=2, cores=1, convergence=False)
    lane = coordinator.lanes["thread"]
    first, second = lane.pools[1]
    started = [threading.Event(), threading.Event()]
    blockers = [light_gated(str(i), started[i]) for i in range(2)]
    for event in started:
        assert event.wait(10)
    queued = [light_gated(f"q{i}") for i in range(10)]
    assert len(first.mailbox) == len(second.mailbox) == 5
    with caplog.at_level("DEBUG", logger="tokengate.worker"):
        assert lane.retire_worker(second)
        coordinator.backend.router.invalidate()
        assert lane.pools[1] == [first]
        eventually(lambda: len(first.mailbox) == 10, what="the queue to be handed back")
        assert not second.closed  # still running its current token
        GATE.set()
        assert [t.get(timeout=10) for t in blockers + queued] == [
            "0",
            "1",
            *(f"q{i}" for i in range(10)),
        ]
        second.thread.join(10)
    assert second.closed and not second.thread.is_alive()
    assert {t.worker for t in queued} == {first.name}
    assert f"[{second.name}] Retired" in caplog.text
    assert not lane.retire_worker(first)  # never the last worker of a pool


def test_workers_added_together_start_each_other(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A growth to the tier's limit must not pay one thread start-up after another on the
    engine's thread: the new threads start the pending ones too."""
    coordinator = make_coordinator(workers_per_core=1, convergence=False)
    lane = coordinator.lanes["io"]
    starters: list[str] = []
    start_pending = ThreadLane.start_pending

    def recording(self: ThreadLane, pending: Any) -> None:
        starters.append(threading.current_thread().name)
        start_pending(self, pending)

    monkeypatch.setattr(ThreadLane, "start_pending", recording)
    tokens = [fast_write(str(i)) for i in range(50)]
    eventually(lambda: RUNNING["now"] == 4, what="the 4 baseline FAST workers to be busy")
    added = lane.add_workers("FAST", 46)
    coordinator.backend.router.invalidate()
    assert len(added) == 46 and len(lane.pools["FAST"]) == 50
    eventually(lambda: RUNNING["now"] == 50, what="50 FAST writes running at once")
    assert starters[0] == threading.current_thread().name
    assert any(name.startswith("tokengate-io_fast_") for name in starters), starters
    GATE.set()
    assert sorted(int(t.get(timeout=10)) for t in tokens) == list(range(50))
    assert_counts_add_up(coordinator)


def test_new_threads_start_as_a_tree_so_the_first_serve_at_once(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's thread, and then each new thread, starts at most FAN_OUT of the pending
    threads and goes on: none waits for all 46 start-ups before it serves (or returns)."""
    coordinator = make_coordinator(workers_per_core=1, convergence=False)
    lane = coordinator.lanes["io"]
    make_worker = type(lane)._make_worker
    starts: dict[str, int] = {}
    lock = threading.Lock()

    def counted(self: Any, pool: Any) -> Any:
        worker = make_worker(self, pool)
        start = worker.thread.start

        def counting_start() -> None:
            with lock:
                name = threading.current_thread().name
                starts[name] = starts.get(name, 0) + 1
            start()

        worker.thread.start = counting_start
        return worker

    monkeypatch.setattr(type(lane), "_make_worker", counted)
    added = lane.add_workers("FAST", 46)
    coordinator.backend.router.invalidate()
    eventually(lambda: all(w.thread.is_alive() for w in added), what="46 new threads running")
    assert sum(starts.values()) == 46
    # At most FAN_OUT each: fewer when the tree below took the pending ones first (the caller
    # may get the GIL back only after its first thread's descendants emptied the queue).
    assert 1 <= starts[threading.current_thread().name] <= FAN_OUT, starts
    assert max(starts.values()) <= FAN_OUT, starts
    assert len(starts) > 1  # the new threads started the rest
    tokens = [quick_fast(i) for i in range(100)]
    assert [t.get(timeout=10) for t in tokens] == [i + 1 for i in range(100)]
    assert_counts_add_up(coordinator)


def test_a_worker_whose_thread_cannot_start_is_not_added(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = make_coordinator(workers_per_core=1, convergence=False)
    lane = coordinator.lanes["io"]
    make_worker = type(lane)._make_worker
    made: list[Any] = []

    def fails_second(self: Any, pool: Any) -> Any:
        worker = make_worker(self, pool)
        made.append(worker)
        if len(made) == 2:

            def start() -> None:
                raise RuntimeError("can't start new thread")

            worker.thread.start = start
        return worker

    monkeypatch.setattr(type(lane), "_make_worker", fails_second)
    added = lane.add_workers("FAST", 4)
    coordinator.backend.router.invalidate()
    assert made[1] in added
    # whichever thread popped it from the pending starts retires it (maybe a new worker's)
    eventually(lambda: made[1] not in lane.pools["FAST"], what="the unstarted worker retired")
    assert len(lane.pools["FAST"]) == 4 + 3
    tokens = [quick_fast(i) for i in range(100)]
    assert [t.get(timeout=10) for t in tokens] == [i + 1 for i in range(100)]
    assert_counts_add_up(coordinator)


def test_a_push_racing_with_retirement_is_handed_back(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1, io_workers=1, convergence=False)
    lane = coordinator.lanes["io"]
    (keeper,) = lane.pools["FAST"]
    blocker = fast_write("blocker")
    eventually(lambda: RUNNING["now"] == 1, what="the FAST worker to be busy")
    extra = lane.add_worker("FAST")
    assert lane.retire_worker(extra)
    extra.thread.join(10)
    assert extra.closed
    token = fast_write("late")
    assert list(keeper.mailbox) == [token]
    # a router holding a stale route pushes to the retired worker anyway
    assert keeper.mailbox.popleft() is token
    extra.push(token)
    assert list(keeper.mailbox) == [token] and not extra.mailbox
    GATE.set()
    assert [blocker.get(timeout=10), token.get(timeout=10)] == ["blocker", "late"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tokens_survive_workers_added_and_retired_under_load(
    make_coordinator: Make, seed: int
) -> None:
    coordinator = make_coordinator(workers_per_core=2, convergence=False)
    rng = random.Random(seed)
    stop = threading.Event()
    lanes = [(coordinator.lanes["thread"], key) for key in coordinator.lanes["thread"].pools]
    lanes.append((coordinator.lanes["io"], "FAST"))

    def churn() -> None:
        while not stop.is_set():
            lane, key = rng.choice(lanes)
            members = lane.pools[key]
            roll = rng.random()
            if roll < 0.2:  # as many added as retired, on average
                lane.add_workers(key, rng.randint(1, 3))
            elif roll < 0.4 or len(members) < 2:
                lane.add_worker(key)
            else:
                lane.retire_worker(rng.choice(members))
            coordinator.backend.router.invalidate()
            stop.wait(0.001)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        tokens = [quick(i) if i % 3 else quick_fast(i) for i in range(3000)]
        assert [t.get(timeout=30) for t in tokens] == [i + 1 for i in range(3000)]
    finally:
        stop.set()
        churner.join(10)
    for lane, _ in lanes:
        names = [w.name for w in lane.workers]
        assert len(names) == len(set(names))
    assert_counts_add_up(coordinator)


# -- the Quick-Proof's Proof 2, as written (its functions: tokengate.demos.seed_io) ----------------
def test_the_seeds_io_proof_runs_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with OperationsCoordinator(workers_per_core=1, verbose=True) as coordinator:
        writes = [
            write_json_fast(str(tmp_path / "json" / f"{i}.json"), {"i": i, "v": [i] * 10})
            for i in range(10)
        ]
        logs = [
            append_log_slow(str(tmp_path / "logs" / "out.log"), f"entry {i}") for i in range(10)
        ]
        blobs = [write_blob_moderate(str(tmp_path / "blobs" / f"{i}.bin"), 16) for i in range(6)]
        results = [t.get(timeout=30) for t in writes + logs + blobs]
        made = [create_json_file(i, tmp_path) for i in range(3)]
    out = capsys.readouterr().out
    assert "[STORAGE_THROTTLE] Initialized with speed tiers:" in out
    for line in ("SLOW: 10", "MODERATE: 25", "FAST: 50", "INSANE: 70"):
        assert f"  {line} concurrent I/O" in out
    assert "Convergence: ENABLED" in out and "Convergence monitoring started" in out
    assert "Event loop started" in out
    assert re.search(r"\[IO_FAST_\d+\] ✓ Completed write_json_fast_\d+", out)
    assert [r["keys"] for r in results[:10]] == [2] * 10
    assert (tmp_path / "logs" / "out.log").read_text().count("\n") == 10
    assert [r["bytes"] for r in results[20:]] == [16 * 1024] * 6
    assert all(m["size_bytes"] > 20_000 for m in made)
    assert json.loads(Path(made[0]["filename"]).read_text())["id"] == 0
    snap = coordinator.stats()
    assert (snap.resolved, snap.failed) == (29, 0)


def test_the_io_proof_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tokengate.demos import io_proof

    assert io_proof.run(show_calm=False) == 0
    out = capsys.readouterr().out
    assert "[STORAGE_THROTTLE] Initialized with speed tiers:" in out
    assert "10/10 resolved  |  0 failed" in out
    assert "✓ I/O proof complete." in out


@task_token_guard(operation_type="gated_fast", tags={"weight": "light", "storage_speed": "FAST"})
def gated_fast(started: threading.Event, gate: threading.Event) -> None:
    started.set()
    if not gate.wait(30):
        raise RuntimeError("the test never opened the gate")


def test_a_token_queued_behind_a_busy_io_worker_reports_a_backlog(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1, io_workers=1, convergence=False)
    lane = coordinator.lanes["io"]
    backlogs: list[int] = []
    lane.on_backlog = lambda: backlogs.append(1)  # type: ignore[attr-defined]
    started, gate = threading.Event(), threading.Event()
    try:
        first = gated_fast(started, gate)
        assert started.wait(10)
        assert backlogs == []  # an idle worker took it: no backlog
        second = gated_fast(threading.Event(), gate)  # queues behind the first
        assert backlogs == [1]
    finally:
        gate.set()
    first.get(timeout=10)
    second.get(timeout=10)
