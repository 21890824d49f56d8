"""What a dashboard records of ended tokens: plain records, sampled under load, only while a
page looks, and never a token's result kept alive."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable, Iterator

import pytest

from conftest import eventually
from tokengate import OperationsCoordinator, task_token_guard
from tokengate.dashboard._registry import RecentTokens

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


class Payload:
    """A result that can be watched for being freed."""


@task_token_guard(operation_type="rec_payload")
def payload(x: int) -> Payload:
    return Payload()


@task_token_guard(operation_type="rec_fails", tags={"retries": 0})
def rec_fails(x: int) -> int:
    raise ValueError(f"bad input {x}")


_gate = threading.Event()


@task_token_guard(operation_type="rec_blocks")
def blocks(x: int) -> int:
    _gate.wait(10)
    return x


def _in_a_period(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> tuple[OperationsCoordinator, RecentTokens, Iterator[float]]:
    """A one-worker coordinator recording five runs a second, one second's period just begun
    (``next(steps, None)`` ends it)."""
    coordinator = make_coordinator(workers_per_core=1, process_lane=False)
    registry = RecentTokens(capacity=1_000, budget=5.0)
    registry.attach(coordinator)
    steps = registry.cycle(period=1.0)
    assert next(steps) == 1.0
    return coordinator, registry, steps


def test_an_absorbed_token_keeps_no_result_alive(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(workers_per_core=1, process_lane=False)
    registry = RecentTokens(capacity=100)
    registry.attach(coordinator)
    tokens = [payload(i) for i in range(10)]
    results = [weakref.ref(token.get(timeout=10)) for token in tokens]
    ids = [token.id for token in tokens]
    del tokens
    assert registry.absorb() == 10
    gc.collect()
    assert [ref() for ref in results] == [None] * 10  # the page holds no result
    found = registry.find(coordinator, ids[3])
    assert found is not None and (found.id, found.state) == (ids[3], "resolved")
    assert [record.id for record in registry.recent(10)] == ids


def test_a_busy_period_records_its_first_runs_and_every_failure_and_discard(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator, registry, steps = _in_a_period(make_coordinator)
    completion = coordinator._completion
    assert registry.per_period == 5
    ran = [payload(i) for i in range(12)]  # one worker: they end in this order
    for token in ran:
        token.get(timeout=10)
    assert completion.recent is None  # the completion path stopped recording at five
    bad = rec_fails(1)
    with pytest.raises(ValueError):
        bad.get(timeout=10)
    _gate.clear()
    held = blocks(0)  # keeps the one worker busy, so the next call waits in its queue
    queued = blocks(1)
    assert queued.cancel()
    _gate.set()
    held.get(timeout=10)
    assert next(steps, None) is None  # the period ends with an absorb
    assert registry.limited
    recorded = {record.seq for record in registry.recent(1_000)}
    assert recorded & {t.seq for t in ran} == {t.seq for t in ran[:5]}
    assert queued.seq in recorded  # the discard, recorded all the same
    found = registry.find(coordinator, bad.id)  # and the failure
    assert found is not None and found.error == "ValueError: bad input 1"
    steps = registry.cycle(period=1.0)
    next(steps)  # the next period records again
    later = payload(99)
    later.get(timeout=10)
    assert later.seq in {record.seq for record in registry.recent(1_000)}


def test_a_quiet_program_is_recorded_whole(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(workers_per_core=1, process_lane=False)
    registry = RecentTokens(capacity=1_000, budget=1e12)
    registry.attach(coordinator)
    for _ in range(3):
        tokens = [payload(i) for i in range(30)]
        for token in tokens:
            token.get(timeout=10)
        assert not registry.limited
        assert {t.seq for t in tokens} <= {r.seq for r in registry.recent(1_000)}


def test_recording_stops_once_nobody_looks_and_the_next_look_starts_it_again(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    from test_dashboard import Dash

    coordinator = make_coordinator(workers_per_core=1, process_lane=False)
    dash = Dash(coordinator.serve_dashboard())
    server = coordinator._dashboards.servers[0]
    server.absorb_every, server.idle_after = 0.01, 0.0
    completion = coordinator._completion
    assert completion.recent is None  # nobody has looked yet: nothing is recorded
    dash.get_json("/api/snapshot")
    # The keeper absorbs, sees nobody looking, and stops recording.
    eventually(lambda: completion.recent is None, what="recording to stop")
    token = payload(1)
    token.get(timeout=10)
    assert not server.registry.recording
    server.idle_after = 60.0
    dash.get_json("/api/snapshot")
    assert completion.recent is not None and server.registry.recording
    coordinator.stop()  # closing the server lets go of the deque
    assert completion.recent is None and not server.registry.recording


def test_an_absorb_inside_a_period_does_not_give_it_more_runs_to_record(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    _, registry, steps = _in_a_period(make_coordinator)
    first = [payload(i) for i in range(3)]
    for token in first:
        token.get(timeout=10)
    assert registry.absorb() == 3  # a snapshot's absorb, in the middle of the period
    rest = [payload(i) for i in range(10)]
    for token in rest:
        token.get(timeout=10)
    next(steps, None)
    recorded = {record.seq for record in registry.recent(1_000)}
    assert recorded == {t.seq for t in first + rest[:2]}  # five in all, as in any period


def test_two_dashboards_of_one_coordinator_record_until_neither_looks(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    """The completion path records into one slot: the dashboards of a coordinator share it, so
    each finds every token, and closing the one that keeps it recording hands that on."""
    from test_dashboard import Dash

    coordinator = make_coordinator(workers_per_core=1, process_lane=False)
    dashes = [Dash(coordinator.serve_dashboard()), Dash(coordinator.serve_dashboard())]
    servers = coordinator._dashboards.servers
    assert servers[0].registry is servers[1].registry
    for server in servers:
        server.idle_after = 60.0
    for dash in dashes:
        dash.get_json("/api/snapshot")
    token = payload(1)
    token.get(timeout=10)
    for dash in dashes:
        assert dash.get_json(f"/api/token/{token.id}")["state"] == "resolved"
    registry = servers[0].registry
    keeper = registry.keeper
    assert keeper in servers
    keeper.close()  # the server whose event loop runs the recording; the other still looks
    heir = servers[1 - servers.index(keeper)]
    assert registry.keeper is heir and coordinator._completion.recent is not None
    later = payload(2)
    later.get(timeout=10)
    found = dashes[servers.index(heir)].get_json(f"/api/token/{later.id}")
    assert found["state"] == "resolved"
    heir.close()
    assert registry.keeper is None and not registry.recording
    assert coordinator._completion.recent is None  # no token is held for a closed page
