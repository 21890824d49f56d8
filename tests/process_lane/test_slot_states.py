"""The process worker slot's state machine: every move the table allows works, every other one
is refused with an error naming both states, and the ``ready`` event follows the state."""

from __future__ import annotations

import itertools

import pytest

from tokengate.lanes.process import SlotState
from tokengate.lanes.process._state import TRANSITIONS, IllegalTransition, SlotStateMachine

ALLOWED = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets, key=str)]
REFUSED = [(a, b) for a, b in itertools.product(SlotState, SlotState) if b not in TRANSITIONS[a]]


def test_the_table_covers_every_state_and_only_stopped_is_final() -> None:
    assert set(TRANSITIONS) == set(SlotState)
    assert [s for s, targets in TRANSITIONS.items() if not targets] == [SlotState.STOPPED]
    assert all(SlotState.STOPPED in TRANSITIONS[s] for s in SlotState if s is not SlotState.STOPPED)
    assert len(ALLOWED) + len(REFUSED) == len(SlotState) ** 2


@pytest.mark.parametrize(("here", "to"), ALLOWED, ids=lambda s: s.name)
def test_every_allowed_move_works(here: SlotState, to: SlotState) -> None:
    machine = SlotStateMachine("slot", here)
    machine.move(to)
    assert machine.state is to


@pytest.mark.parametrize(("here", "to"), REFUSED, ids=lambda s: s.name)
def test_every_other_move_is_refused(here: SlotState, to: SlotState) -> None:
    machine = SlotStateMachine("process_0_core_1", here)
    with pytest.raises(IllegalTransition) as info:
        machine.move(to)
    message = str(info.value)
    assert "process_0_core_1" in message
    assert f"from {here.name} to {to.name}" in message
    for allowed in TRANSITIONS[here]:
        assert allowed.name in message
    assert machine.state is here  # a refused move changes nothing


def test_ready_is_set_exactly_while_a_worker_is_ready_or_the_slot_is_broken() -> None:
    machine = SlotStateMachine("slot")
    assert machine.state is SlotState.UNSTARTED and not machine.ready.is_set()
    path = [
        (SlotState.STARTING, False),
        (SlotState.READY, True),
        (SlotState.STARTING, False),
        (SlotState.COOLING_DOWN, False),
        (SlotState.STARTING, False),
        (SlotState.BROKEN, True),
        (SlotState.COOLING_DOWN, False),
        (SlotState.STARTING, False),
        (SlotState.BROKEN, True),
        (SlotState.READY, True),
        (SlotState.STOPPED, True),  # STOPPED leaves the event as it was
    ]
    for state, ready in path:
        machine.move(state)
        assert machine.ready.is_set() is ready, state
