"""Storage tiers: at most N tasks of a tier run at once, and waiting for a permit holds no worker.

The unit tests drive :class:`StorageThrottle` with small fake tokens; the coordinator tests prove
the limit with gates and a high-water counter taken under a lock (never with sleeps).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from types import FrameType, SimpleNamespace
from typing import Any

import pytest

from conftest import eventually
from tokengate import (
    ConfigError,
    CoordinatorConfig,
    OperationsCoordinator,
    TaskTimeout,
    TierStats,
    Token,
    task_token_guard,
)
from tokengate._config import DEFAULT_STORAGE_LIMITS
from tokengate._throttle import StorageThrottle

SEED_BANNER = """\
[STORAGE_THROTTLE] Initialized with speed tiers:
  SLOW: 10 concurrent I/O
  MODERATE: 25 concurrent I/O
  FAST: 50 concurrent I/O
  INSANE: 70 concurrent I/O"""


# -- unit tests with fake tokens ------------------------------------------------------------------
class FakeToken:
    """What the throttle reads of a token: its tier, ``done()`` and the permit flag."""

    def __init__(self, name: str, tier: str | None = "SLOW") -> None:
        self.name = name
        self.spec = SimpleNamespace(storage_speed=tier)
        self._holds_permit = False
        self.discarded = False

    def done(self) -> bool:
        return self.discarded

    def __repr__(self) -> str:
        return f"FakeToken({self.name})"


def make_throttle(**limits: int) -> StorageThrottle:
    return StorageThrottle(dict(DEFAULT_STORAGE_LIMITS, **limits))


def tokens(*names: str, tier: str = "SLOW") -> list[FakeToken]:
    return [FakeToken(name, tier) for name in names]


def test_acquire_up_to_the_limit_then_queue() -> None:
    throttle = make_throttle(SLOW=2)
    a, b, c, d = tokens("a", "b", "c", "d")
    assert throttle.try_acquire("SLOW", a)
    assert throttle.try_acquire("SLOW", b)
    assert not throttle.try_acquire("SLOW", c)
    assert not throttle.try_acquire("SLOW", d)
    assert (a._holds_permit, b._holds_permit, c._holds_permit, d._holds_permit) == (
        True,
        True,
        False,
        False,
    )
    assert throttle.waiting("SLOW") == 2
    assert throttle.limit("SLOW") == 2
    assert throttle.stats()["SLOW"] == TierStats("SLOW", 2, 2, 2, 2)
    # Other tiers are independent.
    assert throttle.stats()["MODERATE"] == TierStats("MODERATE", 25, 0, 0, 0)
    assert throttle.try_acquire("MODERATE", FakeToken("m", "MODERATE"))


def test_release_grants_in_fifo_order() -> None:
    throttle = make_throttle(SLOW=2)
    a, b, c, d, e = tokens("a", "b", "c", "d", "e")
    for tok in (a, b, c, d, e):
        throttle.try_acquire("SLOW", tok)
    assert throttle.release(a) == [c]
    assert c._holds_permit and not a._holds_permit
    assert throttle.release(b) == [d]
    assert throttle.release(c) == [e]
    assert throttle.stats()["SLOW"] == TierStats("SLOW", 2, 2, 0, 2)
    assert throttle.release(d) == []
    assert throttle.release(e) == []
    assert throttle.stats()["SLOW"] == TierStats("SLOW", 2, 0, 0, 2)


def test_a_newcomer_does_not_jump_the_queue() -> None:
    throttle = make_throttle(SLOW=1)
    a, b, c = tokens("a", "b", "c")
    assert throttle.try_acquire("SLOW", a)
    assert not throttle.try_acquire("SLOW", b)
    assert throttle.release(a) == [b]
    assert not throttle.try_acquire("SLOW", c)  # b holds the permit now
    assert throttle.release(b) == [c]


def test_discarded_waiting_tokens_are_skipped() -> None:
    throttle = make_throttle(SLOW=1)
    a, b, c, d = tokens("a", "b", "c", "d")
    for tok in (a, b, c, d):
        throttle.try_acquire("SLOW", tok)
    b.discarded = True
    c.discarded = True
    assert throttle.release(a) == [d]
    assert not b._holds_permit and not c._holds_permit
    assert throttle.stats()["SLOW"] == TierStats("SLOW", 1, 1, 0, 1)


def test_release_is_idempotent_and_ignores_tokens_without_a_permit() -> None:
    throttle = make_throttle(SLOW=1)
    a, b = tokens("a", "b")
    throttle.try_acquire("SLOW", a)
    throttle.try_acquire("SLOW", b)
    assert throttle.release(b) == []  # queued, holds nothing
    assert throttle.stats()["SLOW"].running == 1
    assert throttle.release(a) == [b]
    assert throttle.release(a) == []  # second release of a: no effect
    assert throttle.stats()["SLOW"].running == 1
    assert throttle.release(FakeToken("untiered", tier=None)) == []
    assert throttle.release(b) == []
    assert throttle.release(b) == []
    assert throttle.stats()["SLOW"] == TierStats("SLOW", 1, 0, 0, 1)


def test_resize_up_grants_waiting_tokens_in_order() -> None:
    throttle = make_throttle(SLOW=1)
    a, b, c, d = tokens("a", "b", "c", "d")
    for tok in (a, b, c, d):
        throttle.try_acquire("SLOW", tok)
    assert throttle.resize("SLOW", 3) == [b, c]
    assert throttle.stats()["SLOW"] == TierStats("SLOW", 3, 3, 1, 3)
    assert throttle.resize("SLOW", 3) == []


def test_resize_down_lets_running_tokens_finish_and_grants_nothing_until_below() -> None:
    throttle = make_throttle(SLOW=3)
    a, b, c, d = tokens("a", "b", "c", "d")
    for tok in (a, b, c, d):
        throttle.try_acquire("SLOW", tok)
    assert throttle.resize("SLOW", 1) == []
    assert throttle.release(a) == []  # 2 still running, limit 1
    assert throttle.release(b) == []  # 1 running, limit 1
    assert throttle.release(c) == [d]
    assert throttle.stats()["SLOW"] == TierStats("SLOW", 1, 1, 0, 3)


@pytest.mark.parametrize("limit", [0, -1, True, 2.5, "3", None])
def test_resize_refuses_bad_limits(limit: Any) -> None:
    throttle = make_throttle()
    with pytest.raises(ConfigError, match=r">= 1") as excinfo:
        throttle.resize("SLOW", limit)
    assert repr(limit) in str(excinfo.value)
    assert throttle.limit("SLOW") == 10


def test_resize_refuses_an_unknown_tier() -> None:
    throttle = make_throttle()
    with pytest.raises(ConfigError, match=r"'NVME'.*SLOW, MODERATE, FAST, INSANE"):
        throttle.resize("NVME", 3)


def test_drain_waiting_returns_every_waiting_token() -> None:
    throttle = make_throttle(SLOW=1, FAST=1)
    slow = tokens("s1", "s2", "s3")
    fast = tokens("f1", "f2", tier="FAST")
    for tok in slow:
        throttle.try_acquire("SLOW", tok)
    for tok in fast:
        throttle.try_acquire("FAST", tok)
    drained = throttle.drain_waiting()
    assert sorted(drained, key=repr) == sorted([slow[1], slow[2], fast[1]], key=repr)
    assert throttle.waiting("SLOW") == throttle.waiting("FAST") == 0
    assert throttle.drain_waiting() == []
    assert throttle.release(slow[0]) == []  # nothing left to grant
    assert throttle.stats()["SLOW"].running == 0


def test_banner_matches_the_seed() -> None:
    assert make_throttle().banner() == SEED_BANNER
    limits = CoordinatorConfig(storage_limits={"slow": 3, "INSANE": 99}).storage_limits
    banner = StorageThrottle(limits).banner().splitlines()
    assert banner[1] == "  SLOW: 3 concurrent I/O"
    assert banner[4] == "  INSANE: 99 concurrent I/O"


def test_concurrent_acquire_and_release_never_exceed_the_limit() -> None:
    throttle = make_throttle(SLOW=3)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def churn(worker: int) -> None:
        try:
            start.wait(10)
            for i in range(2_000):
                tok = FakeToken(f"{worker}-{i}")
                held = [tok] if throttle.try_acquire("SLOW", tok) else []
                while held:  # release what we hold and whatever the release granted
                    held.extend(throttle.release(held.pop()))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert errors == []
    stats = throttle.stats()["SLOW"]
    assert stats.running == 0
    assert stats.waiting == 0
    assert 1 <= stats.high_water <= 3


# -- coordinator tests ----------------------------------------------------------------------------
class Probe:
    """Counts how many task bodies run at once (high water under a lock) and gates them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.started = 0
        self.high_water = 0
        self.gate = threading.Event()

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.started += 1
            self.high_water = max(self.high_water, self.running)

    def leave(self) -> None:
        with self.lock:
            self.running -= 1


@task_token_guard(operation_type="slow_io", tags={"weight": "light", "storage_speed": "SLOW"})
def slow_io(probe: Probe, value: Any) -> Any:
    probe.enter()
    try:
        if not probe.gate.wait(30):
            raise RuntimeError("the test never opened the gate")
        return value
    finally:
        probe.leave()


@task_token_guard(operation_type="slow_now", tags={"weight": "light", "storage_speed": "SLOW"})
def slow_now(value: Any) -> Any:
    return value


@task_token_guard(
    operation_type="slow_overrun",
    tags={"weight": "light", "storage_speed": "SLOW", "timeout": 0.2, "retries": 0},
)
def slow_overrun(probe: Probe) -> str:
    probe.enter()
    try:
        probe.gate.wait(30)
        return "late"
    finally:
        probe.leave()


@task_token_guard(
    operation_type="moderate_io", tags={"weight": "medium", "storage_speed": "MODERATE"}
)
def moderate_io(value: Any) -> Any:
    return value


@task_token_guard(operation_type="light_cpu", tags={"weight": "light"})
def light_cpu(value: int) -> int:
    return value * 2


def total_load(coordinator: OperationsCoordinator) -> int:
    # Every lane's mailboxes: storage-tier tasks run on the I/O lane.
    return sum(
        sum(loads)
        for lane in coordinator.lanes
        for loads in coordinator.queue_depths(lane).values()
    )


def test_tier_limit_holds_and_cpu_work_keeps_flowing(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=8, storage_limits={"SLOW": 3})
    probe = Probe()
    toks = [slow_io(probe, i) for i in range(20)]
    eventually(lambda: probe.started == 3, what="three SLOW tasks to start")

    slow = coordinator.tier_stats()["SLOW"]
    assert (slow.limit, slow.running, slow.waiting, slow.high_water) == (3, 3, 17, 3)
    assert [t.state for t in toks[:3]] == ["running"] * 3  # FIFO: the first three
    assert all(t.state == "pending" for t in toks[3:])
    # The 17 waiting tokens sit in the tier's queue, not in a worker's mailbox.
    assert total_load(coordinator) == 3

    # The tier is full, yet tasks without a tier (or of another tier) still complete.
    assert [light_cpu(i).get(timeout=10) for i in range(50)] == [2 * i for i in range(50)]
    assert [moderate_io(i).get(timeout=10) for i in range(5)] == list(range(5))
    assert probe.started == 3
    assert probe.high_water == 3

    coordinator.set_storage_limit("SLOW", 5)
    eventually(lambda: probe.started == 5, what="two more SLOW tasks to start")
    assert coordinator.tier_stats()["SLOW"] == TierStats("SLOW", 5, 5, 15, 5)
    assert [t.state for t in toks[:5]] == ["running"] * 5
    assert total_load(coordinator) == 5
    assert light_cpu(21).get(timeout=10) == 42

    probe.gate.set()
    assert [t.get(timeout=10) for t in toks] == list(range(20))
    assert probe.started == 20
    assert probe.high_water == 5  # never above the limit in force
    assert coordinator.tier_stats()["SLOW"] == TierStats("SLOW", 5, 0, 0, 5)
    eventually(lambda: coordinator.stats().in_flight == 0)
    snap = coordinator.stats()
    assert snap.operations["slow_io"].resolved == 20


def test_shrinking_a_tier_takes_effect_as_tasks_finish(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=8, storage_limits={"SLOW": 4})
    probe = Probe()
    toks = [slow_io(probe, i) for i in range(10)]
    eventually(lambda: probe.started == 4)
    coordinator.set_storage_limit("slow", 1)  # tier names are case-insensitive here
    assert coordinator.tier_stats()["SLOW"].limit == 1
    probe.gate.set()
    for tok in toks[:4]:
        assert tok.get(timeout=10) in range(4)
    with probe.lock:  # from here on, count only what runs under the new limit
        probe.high_water = probe.running
    more = [slow_io(probe, i) for i in range(10, 14)]
    assert [t.get(timeout=10) for t in toks + more] == [*range(10), *range(10, 14)]
    assert probe.high_water == 1
    assert coordinator.tier_stats()["SLOW"] == TierStats("SLOW", 1, 0, 0, 4)


@pytest.mark.parametrize("limit", [0, -2, True, 1.5])
def test_set_storage_limit_refuses_bad_values(
    coordinator: OperationsCoordinator, limit: Any
) -> None:
    with pytest.raises(ConfigError):
        coordinator.set_storage_limit("SLOW", limit)
    with pytest.raises(ConfigError, match="known tiers"):
        coordinator.set_storage_limit("NVME", 3)
    assert coordinator.tier_stats()["SLOW"].limit == 10


def test_set_storage_limit_refuses_a_non_string_tier(coordinator: OperationsCoordinator) -> None:
    with pytest.raises(ConfigError):
        coordinator.set_storage_limit(None, 3)  # type: ignore[arg-type]


def test_cancelled_tier_tokens_are_skipped_and_counted(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=4, storage_limits={"SLOW": 1})
    probe = Probe()
    first = slow_io(probe, "first")
    eventually(lambda: probe.started == 1)
    waiting = [slow_io(probe, i) for i in range(4)]
    assert waiting[1].cancel() and waiting[2].cancel()
    probe.gate.set()
    assert first.get(timeout=10) == "first"
    assert waiting[0].get(timeout=10) == 0
    assert waiting[3].get(timeout=10) == 3
    assert probe.started == 3
    assert probe.high_water == 1
    assert [t.state for t in waiting] == ["resolved", "discarded", "discarded", "resolved"]
    assert coordinator.tier_stats()["SLOW"].running == 0


def test_stop_cancel_pending_discards_tokens_waiting_for_a_permit(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=4, storage_limits={"SLOW": 2})
    probe = Probe()
    toks = [slow_io(probe, i) for i in range(6)]
    eventually(lambda: probe.started == 2)
    stopper = threading.Thread(target=coordinator.stop, kwargs={"cancel_pending": True})
    stopper.start()
    eventually(lambda: all(t.done() for t in toks[2:]), what="waiting tokens to be discarded")
    probe.gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert [t.state for t in toks] == ["resolved"] * 2 + ["discarded"] * 4
    assert {t.discard_reason for t in toks[2:]} == {"stopped"}
    assert probe.started == 2
    snap = coordinator.stats()
    assert (snap.submitted, snap.resolved, snap.discarded, snap.in_flight) == (6, 2, 4, 0)


def test_timed_out_task_keeps_its_permit_until_its_body_returns(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=4, storage_limits={"SLOW": 1})
    probe = Probe()
    overrunning = slow_overrun(probe)
    eventually(lambda: probe.started == 1)
    queued = slow_io(probe, "next")
    try:
        assert isinstance(overrunning.exception(timeout=10), TaskTimeout)
        # The timed-out body is still inside the tier (blocked on the gate) ...
        assert probe.running >= 1
        # ... so the next SLOW token must still be waiting for the permit.
        assert coordinator.tier_stats()["SLOW"].waiting == 1
    finally:
        probe.gate.set()
    assert queued.get(timeout=10) == "next"
    assert probe.high_water == 1


def test_cancel_racing_a_permit_grant_does_not_leak_the_permit(
    make_coordinator: Callable[..., OperationsCoordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=4, storage_limits={"SLOW": 1})
    probe = Probe()
    holder = slow_io(probe, "holder")
    eventually(lambda: probe.started == 1)
    victim = slow_now("victim")
    original_done = Token.done
    forced: list[bool] = []

    def done_racing_a_cancel(self: Token[Any]) -> bool:
        # Force the interleaving: _grant reads done() (False), then, before it marks the
        # permit as held, another thread cancels the token.
        caller: FrameType = sys._getframe(1)
        if self is victim and not forced and caller.f_code.co_name == "_grant":
            forced.append(True)
            seen = original_done(self)
            canceller = threading.Thread(target=self.cancel)
            canceller.start()
            canceller.join(5)
            return seen
        return original_done(self)

    monkeypatch.setattr(Token, "done", done_racing_a_cancel)
    probe.gate.set()
    assert holder.get(timeout=10) == "holder"
    assert forced == [True]
    assert victim.state == "discarded"
    # The permit must come back: the tier is empty and the next SLOW token runs.
    eventually(
        lambda: coordinator.tier_stats()["SLOW"].running == 0, timeout=3, what="permit returned"
    )
    assert slow_now("after").get(timeout=10) == "after"
