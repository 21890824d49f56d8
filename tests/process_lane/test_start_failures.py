"""Starts that fail: a cool-down that doubles, a slot never given up, its tokens taken by a
live sibling meanwhile, and a setup failure (tokengate cannot be imported) failing tokens
loudly until the environment is fixed."""

from __future__ import annotations

import logging
import os
import signal
import textwrap
from pathlib import Path

import pytest

import process_tasks as pt
from conftest import eventually
from tokengate import (
    RetryPolicy,
    WorkerCrashed,
)
from tokengate.lanes.process import (
    _handle,
    _slot,
    restart_delay,
)

from ._helpers import (
    NO_CRASH_RETRY,
    POSIX_ONLY,
    Make,
    StartGate,
    lane_of,
    start_failures,
)

pytestmark = POSIX_ONLY


def test_restart_delay_doubles_from_the_second_retry_up_to_its_cap() -> None:
    delays = [restart_delay(n, base=0.1, cap=10.0) for n in range(1, 12)]
    assert delays == pytest.approx([0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10, 10, 10])
    assert restart_delay(10_000) == _slot.RESTART_DELAY_CAP  # no overflow


def test_a_worker_killed_while_starting_again_and_again_is_started_after_a_cool_down(
    make_coordinator: Make,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    quick_cool_down: tuple[float, float],
) -> None:
    """Five SIGKILLs in a row while starting (a signal is no setup failure: the slot never
    turns BROKEN):
    each is followed by a longer cool-down, logged at WARNING; the token sent meanwhile waits
    and runs on the first worker that comes up, charged nothing."""
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    die_first = textwrap.dedent(
        f"""\
        import os, signal
        if len(os.listdir({str(deaths)!r})) < 5:
            open(os.path.join({str(deaths)!r}, str(os.getpid())), "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    monkeypatch.setattr(_handle, "BOOTSTRAP", die_first + _handle.BOOTSTRAP)
    caplog.set_level(logging.WARNING, logger="tokengate.process")
    coordinator = make_coordinator(workers_per_core=1, cores=1, retry_policy=NO_CRASH_RETRY)
    token = pt.whoami()  # sent while the slot fails to start
    assert token.get(timeout=30)["pid"] != os.getpid()
    assert token.attempts == 1 and token.state == "resolved"
    assert len(os.listdir(deaths)) == 5
    lane = lane_of(coordinator)
    (worker,) = lane.workers
    assert worker.broken is None and lane.wait_ready(0)
    assert coordinator.stats().events["process_start_failures"] == 5
    records = start_failures(caplog)
    base, cap = quick_cool_down
    assert [r.levelno for r in records] == [logging.WARNING] * 5
    assert [r.args[-1] for r in records] == pytest.approx(  # type: ignore[index]
        [0, base, 2 * base, cap, cap]
    )
    assert all("died with SIGKILL (signal 9) while starting" in r.getMessage() for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("error", "broken"),
    [
        pytest.param(OSError(11, "injected: resource temporarily unavailable"), False, id="EAGAIN"),
        pytest.param(FileNotFoundError(2, "injected: no such interpreter"), True, id="setup"),
    ],
)
def test_tokens_for_a_slot_that_cannot_start_go_to_a_live_sibling_while_it_keeps_trying(
    make_coordinator: Make,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    quick_cool_down: tuple[float, float],
    tmp_path: Path,
    error: OSError,
    broken: bool,
) -> None:
    """The preferred worker (core 1) cannot launch its process. It goes on trying well past
    3 attempts. Meanwhile the heavy tokens routed to it (the least loaded)
    run on its sibling: an idle sibling is woken to take them; a busy one takes them when it is
    free (while the failure may pass, EAGAIN) or is handed them at once (a setup failure: the
    slot is ``broken``). Once a launch works again the slot is back."""
    gate = StartGate(monkeypatch, "tokengate-process_0_core_1", error)
    caplog.set_level(logging.WARNING, logger="tokengate.process")
    coordinator = make_coordinator(workers_per_core=1, retry_policy=NO_CRASH_RETRY)
    if coordinator.core_count < 2:
        pytest.skip("needs two cores")
    lane = lane_of(coordinator)
    failing, live = lane.workers
    assert failing.name == "process_0_core_1"
    for worker in lane.workers:  # now: a slot otherwise starts its process with its first token
        worker.request_start()
    assert live.ready.wait(30)
    gate.wait_for(6)  # still trying, well past 3 attempts
    eventually(lambda: (failing.broken is not None) == broken, what="the slot's state")
    # Hold the slot in one long cool-down, the sibling asleep: only the tokens' arrival may
    # wake it (no failure does in between).
    monkeypatch.setattr(_slot, "RESTART_DELAY_BASE", 3600.0)
    monkeypatch.setattr(_slot, "RESTART_DELAY_CAP", 3600.0)
    eventually(lambda: failing.cool_down_left() > 60, what="a long cool-down")
    eventually(lambda: live.sleeping, what="the live worker to sleep")
    for i in range(10):  # one at a time: each finds both mailboxes empty, so goes to core 1
        token = pt.square(i)
        assert token.get(timeout=10) == i * i
        assert (token.worker, token.attempts) == (live.name, 1)
    events = coordinator.stats().events
    assert events.get("process_steals", 0) + events.get("process_handovers", 0) == 10
    # The sibling busy: a token routed to the failing slot waits there (EAGAIN), or is handed
    # over at once (broken); either way it runs on the sibling once that is free.
    marker = tmp_path / "running"
    blocker = pt.block_until_killed(str(marker))
    eventually(marker.exists, what="the sibling to be busy")
    token = pt.square(11)
    where = live if broken else failing
    eventually(lambda: token in where.mailbox, what=f"the token to be queued at {where.name}")
    assert not token.done()
    os.kill(int(marker.read_text()), signal.SIGKILL)  # frees the sibling (after its restart)
    with pytest.raises(WorkerCrashed):
        blocker.get(timeout=30)
    assert token.get(timeout=30) == 121 and token.worker == live.name
    assert ("process_handovers" in coordinator.stats().events) == broken
    assert failing.pid is None and failing.thread.is_alive()
    # The cause goes away; end the cool-down early (as its timer would) and the slot is back.
    gate.failing = False
    monkeypatch.undo()
    failing.retry_now()
    eventually(lambda: lane.wait_ready(0), timeout=30, what="the next attempt to launch it")
    assert failing.broken is None and len(lane.pids()) == 2
    assert pt.square(12).get(timeout=30) == 144
    messages = [r.getMessage() for r in start_failures(caplog)]
    assert all("could not be launched" in m and "injected" in m for m in messages)
    assert any("failed to start 3 times in a row" in m for m in messages) == broken


def test_a_worker_that_cannot_import_tokengate_fails_tokens_loudly_but_is_not_given_up(
    make_coordinator: Make,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    quick_cool_down: tuple[float, float],
) -> None:
    """A setup failure (the worker says it cannot import tokengate) is reported at once to the
    tokens no live worker can take, instead of letting them wait for ever; the slot still
    retries, so once the cause is fixed the lane recovers on its own."""
    original = _handle.BOOTSTRAP
    monkeypatch.setattr(
        _handle,
        "BOOTSTRAP",
        original.replace("tokengate.lanes.process._child", "tokengate.no_such_module"),
    )
    coordinator = make_coordinator(
        workers_per_core=1, cores=1, retry_policy=RetryPolicy(crash_retries=0)
    )
    lane = lane_of(coordinator)
    assert not lane.wait_ready(30)
    with pytest.raises(WorkerCrashed, match=r"(?s)failed to start \d+ times in a row.*No module"):
        pt.square(2).get(timeout=30)
    assert "failed to start 3 times in a row" in caplog.text
    monkeypatch.setattr(_handle, "BOOTSTRAP", original)  # the environment is fixed
    eventually(lambda: lane.wait_ready(0), timeout=30, what="the slot to recover")
    assert pt.square(3).get(timeout=30) == 9
