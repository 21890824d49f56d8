"""The byte budget of queued process-lane calls (``process_queue_bytes``).

Every test holds the one worker process on a file gate (``hold_until_open``) so that calls
queue behind it; a producer blocked at the budget is seen through the admission gate's
``waiters``, never through timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import process_tasks as pt
from conftest import assert_counts_add_up, eventually
from tokengate import (
    ConfigError,
    CoordinatorConfig,
    OperationsCoordinator,
    Overloaded,
    Token,
    TokenDiscarded,
)
from tokengate.lanes.process import process_lane_supported
from tokengate.observability import TokenGateCollector

pytestmark = pytest.mark.skipif(not process_lane_supported(), reason="worker processes need POSIX")

Make = Callable[..., OperationsCoordinator]
SIZE = 100_000  # one call's argument; its pickled call is a few bytes more
DATA = bytes(SIZE)


class Held:
    """The single worker process, held on a file gate until :meth:`open`."""

    def __init__(self, tmp_path: Path) -> None:
        self.marker = tmp_path / "holding"
        self.gate = tmp_path / "gate"
        self.token: Token[str] | None = None

    def hold(self, coordinator: OperationsCoordinator) -> Token[str]:
        self.token = pt.hold_until_open(str(self.marker), str(self.gate))
        eventually(self.marker.exists, timeout=30, what="the worker process to be held")
        # Sent, so its own (small) arguments no longer count: the tests start from 0.
        eventually(lambda: queued_bytes(coordinator) == 0, what="the held call's release")
        return self.token

    def open(self) -> None:
        self.gate.touch()


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Held]:
    gate = Held(tmp_path)
    yield gate
    gate.open()  # whatever the test did, the worker is let go


@pytest.fixture
def one_worker(make_coordinator: Make) -> Callable[..., OperationsCoordinator]:
    """A started coordinator with one worker process (ready), and the given options."""

    def make(**options: Any) -> OperationsCoordinator:
        coordinator = make_coordinator(cores=1, workers_per_core=1, **options)
        assert coordinator.lanes["process"].wait_ready(30)  # type: ignore[attr-defined]
        return coordinator

    return make


def queued_bytes(coordinator: OperationsCoordinator) -> int:
    return coordinator.stats().process_queue_bytes


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` on a producer thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# -- the knob --------------------------------------------------------------------------------------
def test_the_default_budget_is_64_mib_and_sizes_are_parsed() -> None:
    assert CoordinatorConfig().process_queue_bytes == 64 << 20
    assert CoordinatorConfig(process_queue_bytes="1MB").process_queue_bytes == 1 << 20
    assert CoordinatorConfig(process_queue_bytes="2 GiB").process_queue_bytes == 2 << 30
    assert CoordinatorConfig(process_queue_bytes=4096).process_queue_bytes == 4096
    assert CoordinatorConfig(process_queue_bytes=None).process_queue_bytes is None


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "lots", "0MB", "150%", [64]])
def test_a_bad_budget_is_refused_naming_the_knob_and_what_is_allowed(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"process_queue_bytes must be .*None") as info:
        OperationsCoordinator(process_queue_bytes=bad)
    assert repr(bad) in str(info.value)


# -- backpressure ----------------------------------------------------------------------------------
def test_a_producer_waits_while_queued_calls_fill_the_budget_and_resumes_when_room_is_made(
    one_worker: Make, held: Held
) -> None:
    coordinator = one_worker(process_queue_bytes=int(SIZE * 2.5))  # two calls fit, not three
    held.hold(coordinator)
    made: list[Token[int]] = []
    thread, out = in_thread(lambda: [made.append(pt.length(DATA)) for _ in range(3)])
    eventually(lambda: coordinator.admission.waiters == 1, what="the producer to wait for room")
    assert len(made) == 2  # the third call waits, holding none of the budget
    two = queued_bytes(coordinator)
    assert 2 * SIZE < two <= SIZE * 2.5
    assert made[0].cancel()  # room is made: the waiting producer goes on
    thread.join(30)
    assert not thread.is_alive() and out == [[None, None, None]]
    assert len(made) == 3 and queued_bytes(coordinator) == two
    held.open()
    assert [t.get(timeout=30) for t in made[1:]] == [SIZE, SIZE]
    with pytest.raises(TokenDiscarded):
        made[0].get(timeout=1)
    snap = coordinator.stats()
    assert snap.process_queue_bytes == 0
    assert snap.process_queue_bytes_high_water == two
    assert "Queued    : 0 B of process-lane arguments  (peak 195 KB)" in str(snap)


def test_an_asyncio_producer_awaits_room_without_blocking_its_loop(
    one_worker: Make, held: Held
) -> None:
    coordinator = one_worker(process_queue_bytes=int(SIZE * 1.5))
    held.hold(coordinator)
    first = pt.length(DATA)

    async def produce() -> Token[int]:
        second = asyncio.ensure_future(pt.length.submit_async(DATA))
        while coordinator.admission.waiters == 0:  # this loop keeps running while it waits
            await asyncio.sleep(0.001)
        assert not second.done()
        assert first.cancel()  # room is made: the awaiting submit goes on
        return await second

    second = asyncio.run(produce())
    held.open()
    assert second.get(timeout=30) == SIZE
    assert queued_bytes(coordinator) == 0


def test_a_call_larger_than_the_whole_budget_goes_through_alone(
    one_worker: Make, held: Held
) -> None:
    coordinator = one_worker(process_queue_bytes=1000)
    assert pt.length(DATA).get(timeout=30) == SIZE  # nothing queued: let in at once
    held.hold(coordinator)
    big = pt.length(DATA)  # nothing else queued: let in, over the budget
    assert queued_bytes(coordinator) > 1000
    thread, out = in_thread(lambda: pt.length(DATA))
    eventually(lambda: coordinator.admission.waiters == 1, what="the second call to wait")
    held.open()  # the worker takes `big`: the queue is empty, the second goes in alone
    thread.join(30)
    assert not thread.is_alive()
    assert [big.get(timeout=30), out[0].get(timeout=30)] == [SIZE, SIZE]
    assert queued_bytes(coordinator) == 0


def test_reject_refuses_a_call_that_does_not_fit(one_worker: Make, held: Held) -> None:
    coordinator = one_worker(process_queue_bytes=int(SIZE * 1.5), admission="reject")
    held.hold(coordinator)
    first = pt.length(DATA)
    before = queued_bytes(coordinator)
    with pytest.raises(Overloaded, match=r"process_queue_bytes=150000.*admission='block'"):
        pt.length(DATA)
    assert queued_bytes(coordinator) == before
    held.open()
    assert first.get(timeout=30) == SIZE
    snap = coordinator.stats()
    assert snap.operations["length"].discarded == 1 and snap.process_queue_bytes == 0


def test_calls_made_by_tasks_never_wait_for_the_budget(one_worker: Make, held: Held) -> None:
    coordinator = one_worker(process_queue_bytes=1000)
    held.hold(coordinator)
    tokens = pt.submits_lengths(DATA, 3).get(timeout=30)  # would deadlock if it waited
    assert queued_bytes(coordinator) > 3 * SIZE
    held.open()
    assert [t.get(timeout=30) for t in tokens] == [SIZE] * 3
    assert queued_bytes(coordinator) == 0


# -- every path gives the bytes back ---------------------------------------------------------------
def test_bytes_come_back_when_calls_fail_or_are_retried(one_worker: Make, tmp_path: Path) -> None:
    coordinator = one_worker()
    with pytest.raises(ValueError, match=r"^0{20}$"):
        pt.fails_with("0" * SIZE).get(timeout=30)
    assert pt.crash_once(str(tmp_path / "crashed")).get(timeout=30) == "recovered"
    snap = coordinator.stats()
    assert snap.events["process_crashes"] == 1 and snap.retried == 1
    assert snap.process_queue_bytes == 0 and snap.process_queue_bytes_high_water > SIZE


def test_a_retried_call_holds_its_bytes_again_while_it_waits(
    one_worker: Make, tmp_path: Path
) -> None:
    coordinator = one_worker()
    first, second = Held(tmp_path / "1"), Held(tmp_path / "2")
    for gate in (first, second):
        gate.marker.parent.mkdir()
    try:
        first.hold(coordinator)
        crashing = pt.crash_once_sized(str(tmp_path / "crashed"), DATA)
        size = queued_bytes(coordinator)
        assert size > SIZE
        second.token = pt.hold_until_open(str(second.marker), str(second.gate))
        first.open()  # the worker crashes on `crashing`, then takes the second hold
        eventually(second.marker.exists, timeout=30, what="the second hold to run")
        # The retry waits behind the second hold, holding its pickled arguments again.
        eventually(lambda: queued_bytes(coordinator) == size, what="the retry to be queued")
        assert coordinator.stats().retried == 1
    finally:
        first.open()
        second.open()
    assert crashing.get(timeout=30) == SIZE
    assert queued_bytes(coordinator) == 0


def test_stop_with_cancel_pending_gives_back_the_bytes_of_queued_and_waiting_calls(
    one_worker: Make, held: Held
) -> None:
    coordinator = one_worker(process_queue_bytes=int(SIZE * 2.5))
    running = held.hold(coordinator)
    queued = [pt.length(DATA), pt.length(DATA)]
    thread, out = in_thread(lambda: pt.length(DATA))
    eventually(lambda: coordinator.admission.waiters == 1, what="the producer to wait for room")
    # Let the held task end once stop() has discarded the queue, so stop() need not kill it.
    queued[-1].add_done_callback(lambda _: held.open())
    coordinator.stop(cancel_pending=True, timeout=30)
    thread.join(30)
    assert not thread.is_alive()
    waiting = out[0]
    assert [t.state for t in (*queued, waiting)] == ["discarded"] * 3
    assert running.get(timeout=1) == "released"
    snap = coordinator.stats()
    assert snap.process_queue_bytes == 0 and snap.discarded == 3
    assert_counts_add_up(coordinator)


# -- metrics -------------------------------------------------------------------------------------
def test_the_queued_bytes_are_exported_to_prometheus(one_worker: Make, held: Held) -> None:
    coordinator = one_worker(process_queue_bytes="1MB")
    registry = CollectorRegistry()
    registry.register(TokenGateCollector(coordinator))
    held.hold(coordinator)
    queued = pt.length(DATA)
    read = registry.get_sample_value
    assert read("tokengate_process_queue_bytes") == queued_bytes(coordinator) > SIZE
    assert read("tokengate_process_queue_limit_bytes") == 1 << 20
    held.open()
    assert queued.get(timeout=30) == SIZE
    assert read("tokengate_process_queue_bytes") == 0
    assert read("tokengate_process_queue_high_water_bytes") > SIZE


def test_a_done_callback_of_a_cancelled_call_finds_the_room_that_call_held(
    one_worker: Make, held: Held
) -> None:
    coordinator = one_worker(process_queue_bytes=int(SIZE * 1.5))  # one call fits, not two
    held.hold(coordinator)
    queued = pt.length(DATA)
    made: list[Token[int]] = []
    queued.add_done_callback(lambda _: made.append(pt.length(DATA)))  # resubmit on cancel
    thread, out = in_thread(queued.cancel)
    eventually(
        lambda: not thread.is_alive() or coordinator.admission.waiters > 0,
        what="cancel() to return or its callback to wait for room",
    )
    assert coordinator.admission.waiters == 0, "the callback waits for room its own token holds"
    thread.join(30)
    assert not thread.is_alive() and out == [True] and len(made) == 1
    held.open()
    assert made[0].get(timeout=30) == SIZE
    assert queued_bytes(coordinator) == 0
