"""AdmissionGate bookkeeping: a registration is taken back by whoever ends it (a notify, the
waiter finding room, or the waiter's timeout), so workers test one honest ``unwoken`` count."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tokengate._admission import AdmissionGate


def test_a_wait_that_times_out_takes_its_registration_back() -> None:
    gate = AdmissionGate()
    assert gate.wait_for(lambda: None, timeout=0.05) is None
    assert (gate.unwoken, gate.waiters) == (0, 0)


def test_an_async_wait_that_times_out_takes_its_registration_back() -> None:
    gate = AdmissionGate()
    assert asyncio.run(gate.wait_for_async(lambda: None, timeout=0.05)) is None
    assert (gate.unwoken, gate.waiters) == (0, 0)


def test_a_producer_is_registered_until_notified_and_then_finds_room() -> None:
    gate = AdmissionGate()
    asked = threading.Event()
    room = threading.Event()
    result: list[Any] = []

    def attempt() -> str | None:
        if room.is_set():
            return "room"
        asked.set()
        return None

    waiter = threading.Thread(target=lambda: result.append(gate.wait_for(attempt, timeout=30)))
    waiter.start()
    assert asked.wait(10)
    assert gate.unwoken == 1  # registered before its attempt: a worker making room will see it
    room.set()
    gate.notify()  # takes the condition only once the waiter sleeps in it
    waiter.join(10)
    assert result == ["room"]
    assert (gate.unwoken, gate.waiters) == (0, 0)
