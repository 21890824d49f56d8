"""The lifecycle and parking state machines: every allowed move works, every other is refused.

The tables (``_state.TRANSITIONS``, ``_parking.TRANSITIONS``) are the one place the moves are
written down; these tests hold the machines to them, pair by pair.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tokengate import OperationsCoordinator
from tokengate._parking import TRANSITIONS as PARKING_MOVES
from tokengate._parking import Parking, park
from tokengate._state import FLAGS, TRANSITIONS, CoordinatorState, IllegalTransition, Lifecycle

S = CoordinatorState
ALL_PAIRS = list(itertools.product(S, S))


def _at(state: CoordinatorState) -> Lifecycle:
    """A lifecycle brought to ``state`` through allowed moves only."""
    path = {
        S.NEW: [],
        S.STARTING: [S.STARTING],
        S.RUNNING: [S.STARTING, S.RUNNING],
        S.DRAINING: [S.STARTING, S.RUNNING, S.DRAINING],
        S.DISCARDING: [S.STARTING, S.RUNNING, S.DRAINING, S.DISCARDING],
        S.CLOSING: [S.STARTING, S.RUNNING, S.DRAINING, S.CLOSING],
        S.STOPPED: [S.STARTING, S.RUNNING, S.DRAINING, S.CLOSING, S.STOPPED],
        S.FORKED: [S.STARTING, S.RUNNING, S.FORKED],
    }[state]
    life = Lifecycle()
    for step in path:
        life.move(step)
    assert life.state is state
    return life


def test_every_state_is_reachable_and_only_forked_is_final() -> None:
    reached = {S.NEW}
    frontier = [S.NEW]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert reached == set(S)
    assert [s for s in S if not TRANSITIONS[s]] == [S.FORKED]


@pytest.mark.parametrize(("src", "dst"), ALL_PAIRS, ids=lambda s: s.value)
def test_a_lifecycle_move_is_made_iff_the_table_allows_it(
    src: CoordinatorState, dst: CoordinatorState
) -> None:
    life = _at(src)
    if dst in TRANSITIONS[src]:
        assert life.move(dst) is src
        assert life.state is dst
    else:
        with pytest.raises(IllegalTransition, match=f"{src.value} -> {dst.value}"):
            life.move(dst)
        assert life.state is src  # nothing moved


@pytest.mark.parametrize("state", list(S), ids=lambda s: s.value)
def test_the_hot_path_flags_always_match_the_state(state: CoordinatorState) -> None:
    life = _at(state)
    assert (life.accepting, life.draining, life.discarding, life.closed) == FLAGS[state]
    # Only a running coordinator takes outside calls; a closed one has given up on pending work.
    assert life.accepting == (state is S.RUNNING)
    assert not life.closed or life.discarding


def test_a_guarded_move_from_another_state_does_nothing() -> None:
    life = _at(S.STOPPED)
    assert life.move(S.DRAINING, allowed_from=frozenset({S.RUNNING})) is S.STOPPED
    assert life.state is S.STOPPED


def test_a_coordinator_walks_the_lifecycle_in_order() -> None:
    coordinator = OperationsCoordinator(cores=1, workers_per_core=1, process_lane=False)
    seen: list[CoordinatorState] = []
    life = coordinator._life  # white-box: the moves it makes, in order
    real_move = life.move

    def recording_move(to: CoordinatorState, **kw: Any) -> CoordinatorState:
        left = real_move(to, **kw)
        seen.append(life.state)
        return left

    life.move = recording_move  # type: ignore[method-assign]
    coordinator.start()
    coordinator.stop(cancel_pending=True)
    assert seen == [S.STARTING, S.RUNNING, S.DRAINING, S.DISCARDING, S.CLOSING, S.STOPPED]
    coordinator.start()  # a stopped coordinator starts again
    assert coordinator.running
    coordinator.stop()


class _Token:
    id = "probe_1"
    _parked: Parking | None = None


PLACES: list[Parking | None] = [None, *Parking]


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(PLACES, PLACES)), ids=str)
def test_a_token_parks_in_one_place_at_a_time(src: Parking | None, dst: Parking | None) -> None:
    token = _Token()
    token._parked = src
    if dst in PARKING_MOVES[src]:
        park(token, dst)
        assert token._parked is dst
    else:
        with pytest.raises(IllegalTransition, match="must be released first"):
            park(token, dst)
        assert token._parked is src
