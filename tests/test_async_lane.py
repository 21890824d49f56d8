"""Async tasks on the coordinator's event loop, awaitable tokens and ``submit_async``."""

from __future__ import annotations

import asyncio
import logging
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, assert_type

import pytest

from conftest import GATE, HEAVY_ON_THREADS, assert_counts_add_up, eventually, run_code
from tokengate import (
    ConfigError,
    CoordinatorNotRunning,
    DependencyFailed,
    OperationsCoordinator,
    Overloaded,
    RetryPolicy,
    TaskTimeout,
    Token,
    TokenDiscarded,
    TokenGateError,
    task_token_guard,
)
from tokengate._limits import MAX_WAIT_SECONDS

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS


Make = Callable[..., OperationsCoordinator]
SEEN: dict[str, int] = {}
LOCK = threading.Lock()


@pytest.fixture(autouse=True)
def _reset() -> None:
    SEEN.clear()


@task_token_guard(operation_type="double_async", tags={"weight": "light"})
async def double_async(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


@task_token_guard(operation_type="where_async", tags={"weight": "light"})
async def where_async() -> tuple[str, bool]:
    loop = asyncio.get_running_loop()
    return threading.current_thread().name, loop.is_running()


@task_token_guard(operation_type="square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="gated", tags={"weight": "heavy"})
def gated(label: str, started: threading.Event | None = None) -> str:
    if started is not None:
        started.set()
    assert GATE.wait(30)
    return label


@task_token_guard(operation_type="nested_async", tags={"weight": "light"})
async def nested_async(x: int) -> int:
    # awaits a sync task (runs on a thread worker) and an async one (this same loop)
    return await square(x) + await double_async(x)


@task_token_guard(operation_type="fails_async", tags={"weight": "light"})
async def fails_async(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


@task_token_guard(
    operation_type="flaky_async", tags={"weight": "light", "retries": 2, "retry_on": (OSError,)}
)
async def flaky_async(label: str, failures: int) -> str:
    with LOCK:
        seen = SEEN.get(label, 0)
        SEEN[label] = seen + 1
    if seen < failures:
        raise ConnectionError(f"{label} attempt {seen + 1}")
    return label


CANCELLED = threading.Event()


@task_token_guard(operation_type="slow_async", tags={"weight": "light", "timeout": 0.05})
async def slow_async() -> str:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        CANCELLED.set()
        raise
    return "late"


SLOW_ONCE: list[int] = []


@task_token_guard(operation_type="slow_once_async", tags={"weight": "light", "timeout": 0.05})
async def slow_once_async() -> str:
    SLOW_ONCE.append(1)
    if len(SLOW_ONCE) == 1:
        await asyncio.sleep(30)  # cancelled by the timeout
    return "second attempt"


@task_token_guard(operation_type="gated_async", tags={"weight": "light"})
async def gated_async(started: threading.Event) -> str:
    started.set()
    while not GATE.is_set():
        await asyncio.sleep(0.005)
    return "released"


@task_token_guard(operation_type="stuck_async", tags={"weight": "light"})
async def stuck_async(started: threading.Event) -> str:
    started.set()
    await asyncio.Event().wait()  # never set: only stop() ends it
    return "never"


@task_token_guard(operation_type="blocking_get", tags={"weight": "light"})
async def blocking_get() -> int:
    return square(3).get(timeout=5)  # wrong on the event loop: must raise, not block


TIER_RUNNING = 0
TIER_HIGH = 0


def _enter() -> None:
    global TIER_RUNNING, TIER_HIGH
    with LOCK:
        TIER_RUNNING += 1
        TIER_HIGH = max(TIER_HIGH, TIER_RUNNING)


def _leave() -> None:
    global TIER_RUNNING
    with LOCK:
        TIER_RUNNING -= 1


@task_token_guard(operation_type="tier_sync", tags={"storage_speed": "SLOW"})
def tier_sync() -> str:
    _enter()
    try:
        assert GATE.wait(30)
    finally:
        _leave()
    return "sync"


@task_token_guard(operation_type="tier_async", tags={"storage_speed": "SLOW"})
async def tier_async() -> str:
    _enter()
    try:
        while not GATE.is_set():
            await asyncio.sleep(0.005)
    finally:
        _leave()
    return "async"


# -- running async tasks ------------------------------------------------------------------------
def test_async_tasks_run_on_the_coordinators_event_loop(
    coordinator: OperationsCoordinator,
) -> None:
    tokens = [double_async(i) for i in range(20)]
    assert_type(tokens[0], Token[int])  # an async task's token holds what the coroutine returns
    assert [t.get(timeout=10) for t in tokens] == [2 * i for i in range(20)]
    token = where_async()
    name, running = token.get(timeout=10)
    assert (name, running) == ("tokengate-event-loop", True)
    assert (token.lane, token.worker, token.attempts) == ("async", "event_loop", 1)
    assert coordinator.stats().operations["double_async"].resolved == 20


def test_async_errors_keep_type_and_traceback(coordinator: OperationsCoordinator) -> None:
    token = fails_async("bad 7")
    with pytest.raises(ValueError, match="bad 7") as info:
        token.get(timeout=10)
    assert any(entry.name == "fails_async" for entry in info.traceback)
    assert token.attempts == 1  # a programming error is not retried


def test_async_tasks_are_retried_by_the_same_policy(make_coordinator: Make) -> None:
    make_coordinator(workers_per_core=1, retry_policy=RetryPolicy(backoff_base=0.0))
    token = flaky_async("a", 2)
    assert token.get(timeout=10) == "a"
    assert token.attempts == 3


def test_an_async_timeout_really_cancels_the_coroutine(make_coordinator: Make) -> None:
    CANCELLED.clear()
    coordinator = make_coordinator(
        workers_per_core=1, retry_policy=RetryPolicy(retry_on=(ConnectionError,))
    )
    token = slow_async()
    with pytest.raises(TaskTimeout, match=r"timeout of 0\.05s on the event loop and was cancelled"):
        token.get(timeout=10)
    assert CANCELLED.is_set()  # the coroutine itself saw the cancellation
    assert coordinator.stats().failed == 1


def test_a_cancelled_async_timeout_may_be_retried(make_coordinator: Make) -> None:
    # unlike a thread, the timed-out coroutine really stopped: running it again is safe
    SLOW_ONCE.clear()
    make_coordinator(workers_per_core=1, retry_policy=RetryPolicy(backoff_base=0.0))
    token = slow_once_async()
    assert token.get(timeout=10) == "second attempt"
    assert token.attempts == 2


def test_async_and_sync_tasks_share_one_limit_per_tier(make_coordinator: Make) -> None:
    global TIER_HIGH
    TIER_HIGH = 0
    coordinator = make_coordinator(workers_per_core=1, storage_limits={"SLOW": 3}, io_workers=3)
    tokens = [tier_sync() if i % 2 else tier_async() for i in range(10)]
    eventually(lambda: coordinator.tier_stats()["SLOW"].running == 3, what="3 SLOW permits taken")
    eventually(lambda: TIER_RUNNING == 3, what="3 SLOW tasks running")
    assert coordinator.tier_stats()["SLOW"].waiting == 7
    GATE.set()
    assert sorted(t.get(timeout=10) for t in tokens) == ["async"] * 5 + ["sync"] * 5
    assert TIER_HIGH == 3
    assert coordinator.tier_stats()["SLOW"].high_water == 3


def test_async_tasks_nest_and_chain(coordinator: OperationsCoordinator) -> None:
    assert nested_async(4).get(timeout=10) == 16 + 8
    # a token as an argument is a dependency, across lanes both ways
    assert square(double_async(3)).get(timeout=10) == 36
    assert double_async(square(3)).get(timeout=10) == 18
    with pytest.raises(DependencyFailed):
        square(fails_async("x")).get(timeout=10)


def test_get_on_the_event_loop_raises_instead_of_blocking(
    coordinator: OperationsCoordinator,
) -> None:
    with pytest.raises(TokenGateError, match="await token"):
        blocking_get().get(timeout=10)


# -- asyncio callers ----------------------------------------------------------------------------
def test_await_any_token_from_asyncio(coordinator: OperationsCoordinator) -> None:
    async def main() -> tuple[int, int, int]:
        return await square(5), await double_async(5), await nested_async(2)

    assert asyncio.run(main()) == (25, 10, 4 + 4)


def test_awaiting_a_failed_or_discarded_token_raises_its_own_error(make_coordinator: Make) -> None:
    make_coordinator(workers_per_core=1, cores=1)
    started = threading.Event()
    blocker = gated("first", started)
    assert started.wait(10)
    queued = gated("queued")
    assert queued.cancel()

    async def main() -> None:
        with pytest.raises(ValueError, match="boom"):
            await fails_async("boom")
        with pytest.raises(TokenDiscarded) as info:
            await queued
        assert info.value.reason == "cancelled"

    asyncio.run(main())
    GATE.set()
    blocker.get(timeout=10)


def test_cancelling_the_awaiting_task_cancels_a_pending_token(make_coordinator: Make) -> None:
    make_coordinator(workers_per_core=1, cores=1)
    started = threading.Event()
    blocker = gated("first", started)
    assert started.wait(10)
    queued = gated("queued")

    async def main() -> None:
        waiter = asyncio.ensure_future(_await(queued))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
    assert queued.discard_reason == "cancelled"
    GATE.set()
    blocker.get(timeout=10)


async def _await(token: Any) -> Any:
    return await token


def test_submit_async_awaits_room_and_keeps_the_loop_responsive(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1, mailbox_max=2)
    started = threading.Event()
    first = gated("first", started)
    assert started.wait(10)
    second = gated("second")  # load 2 = mailbox_max: the coordinator is saturated

    async def main() -> list[str]:
        producer = asyncio.ensure_future(coordinator.submit_async(gated, "third"))
        ticks = 0
        for _ in range(50):  # the loop keeps running other coroutines meanwhile
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 50
        assert not producer.done()
        assert coordinator.admission.waiters == 1
        GATE.set()  # the worker finishes, makes room, and the gate wakes this loop
        token = await asyncio.wait_for(producer, 10)
        via_task_function = await square.submit_async(6)
        return [await first, await second, await token, str(await via_task_function)]

    assert asyncio.run(main()) == ["first", "second", "third", "36"]
    assert coordinator.admission.waiters == 0


def test_submit_async_with_reject_admission_raises_overloaded(make_coordinator: Make) -> None:
    coordinator = make_coordinator(workers_per_core=1, cores=1, mailbox_max=1, admission="reject")
    started = threading.Event()
    first = gated("first", started)
    assert started.wait(10)

    async def main() -> None:
        with pytest.raises(Overloaded):
            await coordinator.submit_async(gated, "refused")

    asyncio.run(main())
    GATE.set()
    first.get(timeout=10)
    assert coordinator.stats().discarded == 1


def test_submit_async_needs_a_running_coordinator() -> None:
    coordinator = OperationsCoordinator(process_lane=False, workers_per_core=1)

    async def main() -> None:
        with pytest.raises(CoordinatorNotRunning):
            await coordinator.submit_async(square, 2)
        with pytest.raises(CoordinatorNotRunning):
            await square.submit_async(2)

    asyncio.run(main())


# -- stopping -----------------------------------------------------------------------------------
def test_stop_drains_async_tasks() -> None:
    coordinator = OperationsCoordinator(process_lane=False, workers_per_core=1).start()
    started = threading.Event()
    running = gated_async(started)
    assert started.wait(10)
    queued = [double_async(i) for i in range(30)]
    stopper = threading.Thread(target=coordinator.stop)
    stopper.start()
    GATE.set()
    stopper.join(10)
    assert running.get(timeout=1) == "released"
    assert [t.get(timeout=1) for t in queued] == [2 * i for i in range(30)]
    assert_counts_add_up(coordinator)


def test_stop_timeout_cancels_async_tasks_that_would_not_end() -> None:
    coordinator = OperationsCoordinator(process_lane=False, workers_per_core=1).start()
    started = threading.Event()
    stuck = stuck_async(started)
    assert started.wait(10)
    coordinator.stop(timeout=0.05)
    with pytest.raises(TokenGateError, match="cancelled while running") as info:
        stuck.get(timeout=5)
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert_counts_add_up(coordinator)


def test_the_event_loop_thread_ends_with_the_coordinator() -> None:
    with OperationsCoordinator(process_lane=False, workers_per_core=1):
        assert double_async(1).get(timeout=10) == 2
        names = {t.name for t in threading.enumerate()}
        assert "tokengate-event-loop" in names
    eventually(
        lambda: "tokengate-event-loop" not in {t.name for t in threading.enumerate()},
        what="the event loop thread to end",
    )


# -- tasks that do not await ----------------------------------------------------------------------
#: Lets a task that holds the event loop go; every test that starts one sets it in a finally, so
#: no thread is left spinning.
LET_GO = threading.Event()
WATCHDOG = "tokengate-loop-watchdog"


@pytest.fixture
def let_go() -> Iterator[threading.Event]:
    LET_GO.clear()
    try:
        yield LET_GO
    finally:
        LET_GO.set()


@task_token_guard(operation_type="blocks_past_timeout", tags={"weight": "light", "timeout": 0.05})
async def blocks_past_timeout(fail: bool) -> str:
    time.sleep(0.3)  # blocking code: the loop cannot fire the timeout until this awaits
    await asyncio.sleep(0)
    if fail:
        raise ValueError("late error")
    return "late"


@task_token_guard(operation_type="spins", tags={"weight": "light", "timeout": 0.05})
async def spins(started: threading.Event) -> str:
    started.set()
    while not LET_GO.is_set():  # never awaits: holds the event loop
        pass
    return "late"


@task_token_guard(operation_type="spins_untimed", tags={"weight": "light"})
async def spins_untimed(started: threading.Event) -> str:
    started.set()
    while not LET_GO.is_set():
        pass
    return "late"


def _thread_names() -> set[str]:
    return {t.name for t in threading.enumerate()}


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
def test_an_async_task_that_blocks_past_its_timeout_fails_with_task_timeout(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture, fail: bool
) -> None:
    coordinator = make_coordinator(
        workers_per_core=1, retry_policy=RetryPolicy(retry_on=(ConnectionError,))
    )
    with caplog.at_level(logging.WARNING, logger="tokengate"):
        token = blocks_past_timeout(fail)
        with pytest.raises(TaskTimeout, match=r"timeout of 0\.05s: it held the event loop") as info:
            token.get(timeout=10)
    if fail:
        assert isinstance(info.value.__cause__, ValueError)
    # the late outcome is dropped, and the log says so
    assert f"'blocks_past_timeout' (token {token.id}) ended after its timeout" in caplog.text
    assert ("error (ValueError) is dropped" if fail else "result is dropped") in caplog.text
    assert token.attempts == 1
    assert coordinator.stats().failed == 1


def test_the_watchdog_names_a_task_holding_the_loop_and_fails_it_at_its_timeout(
    make_coordinator: Make, caplog: pytest.LogCaptureFixture, let_go: threading.Event
) -> None:
    coordinator = make_coordinator(
        workers_per_core=1,
        async_stall_after=0.05,
        retry_policy=RetryPolicy(retry_on=(ConnectionError,)),
    )
    started = threading.Event()
    with caplog.at_level(logging.WARNING, logger="tokengate"):
        token = spins(started)
        assert started.wait(10)
        behind = double_async(2)  # cannot run while the loop is held
        with pytest.raises(TaskTimeout, match="still holds the event loop without awaiting"):
            token.get(timeout=10)  # failed while its body still runs
        assert f"'spins' (token {token.id}) has held the event loop" in caplog.text
        assert not behind.done()
        let_go.set()
        assert behind.get(timeout=10) == 4  # the loop runs again once the task lets it go
    assert f"late result of spins (token {token.id}) dropped" in caplog.text
    assert token.attempts == 1  # the body was still running: never retried
    assert coordinator.stats().failed == 1


def test_stop_gives_up_on_an_event_loop_held_by_a_task_that_never_awaits(
    let_go: threading.Event,
) -> None:
    coordinator = OperationsCoordinator(
        process_lane=False, workers_per_core=1, async_stall_after=0.05
    ).start()
    started = threading.Event()
    token = spins_untimed(started)
    assert started.wait(10)
    queued = [double_async(i) for i in range(3)]
    coordinator.stop(timeout=0.1)
    assert not coordinator.running
    with pytest.raises(TokenGateError, match="still running when the coordinator stopped"):
        token.get(timeout=0)  # ended by stop(), though its body still runs
    assert "event loop held by 'spins_untimed'" in str(token.exception(timeout=0))
    assert [t.discard_reason for t in queued] == ["stopped"] * 3
    assert_counts_add_up(coordinator)
    let_go.set()
    eventually(
        lambda: not {"tokengate-event-loop", WATCHDOG} & _thread_names(),
        what="the event loop and its watchdog to end once let go",
    )


def test_a_program_whose_event_loop_is_held_still_exits_after_stop() -> None:
    script = textwrap.dedent(
        """
        import threading
        from tokengate import OperationsCoordinator, task_token_guard

        @task_token_guard(operation_type="spin", tags={"weight": "light"})
        async def spin(started):
            started.set()
            while True:  # never awaits, never ends
                pass

        coordinator = OperationsCoordinator(
            process_lane=False, workers_per_core=1, async_stall_after=0.05
        ).start()
        started = threading.Event()
        token = spin(started)
        assert started.wait(30)
        coordinator.stop(timeout=0.1)
        print(type(token.exception(timeout=0)).__name__, coordinator.stats().in_flight)
        """
    )
    assert run_code(script).split() == ["TokenGateError", "0"]


@task_token_guard(operation_type="spins_until", tags={"weight": "light", "timeout": 0.05})
async def spins_until(go: threading.Event) -> str:
    while not go.is_set():  # never awaits: holds the event loop until let go
        pass
    return "late"


@task_token_guard(operation_type="waits_at_gate", tags={"weight": "light"})
def waits_at_gate() -> bool:
    return GATE.wait(30)


def test_the_watchdog_runs_no_callback_so_a_blocked_callback_cannot_stop_it(
    make_coordinator: Make,
) -> None:
    coordinator = make_coordinator(
        cores=1, workers_per_core=1, mailbox_max=2, async_stall_after=0.05, convergence=False
    )
    go_first, go_second = threading.Event(), threading.Event()
    ran_on: list[str] = []
    made: list[Token[bool]] = []

    def resubmit(_: Any) -> None:
        ran_on.append(threading.current_thread().name)
        made.append(waits_at_gate())  # an outside producer would wait here: the mailbox is full

    try:
        full = [waits_at_gate() for _ in range(2)]  # the only light worker's mailbox is full
        first = spins_until(go_first)
        first.add_done_callback(resubmit)
        second = spins_until(go_second)  # runs once the first's body lets the loop go
        with pytest.raises(TaskTimeout, match="still holds the event loop"):
            first.get(timeout=10)  # failed by the watchdog while its body still spins
        eventually(lambda: len(made) == 1, what="the callback to submit")
        assert ran_on != [WATCHDOG]
        go_first.set()  # the second task now holds the loop: the watchdog must fail it too
        with pytest.raises(TaskTimeout, match="still holds the event loop"):
            second.get(timeout=10)
    finally:
        go_first.set()
        go_second.set()
        GATE.set()
    assert [t.get(timeout=10) for t in (*full, *made)] == [True] * 3
    eventually(lambda: coordinator.stats().in_flight == 0, what="the late results")


def test_the_watchdog_starts_with_the_first_async_task_and_ends_with_the_coordinator() -> None:
    with OperationsCoordinator(process_lane=False, workers_per_core=1):
        assert WATCHDOG not in _thread_names()  # a coordinator running no async task has none
        assert double_async(1).get(timeout=10) == 2
        assert WATCHDOG in _thread_names()
    eventually(lambda: WATCHDOG not in _thread_names(), what="the watchdog to end")


@pytest.mark.parametrize(
    "bad", [0, -1.0, True, "1", float("nan"), float("inf"), 1e300, MAX_WAIT_SECONDS + 1]
)
def test_async_stall_after_is_validated(bad: object) -> None:
    """Checked as every other number of seconds is, against the longest wait tokengate honours."""
    with pytest.raises(
        ConfigError, match=r"async_stall_after (must be a positive number|is .* longest wait)"
    ) as info:
        OperationsCoordinator(async_stall_after=bad)
    assert repr(bad) in str(info.value)


# -- async with ---------------------------------------------------------------------------------
def test_async_with_exit_leaves_the_event_loop_running_while_it_drains() -> None:
    """Leaving ``async with`` drains on a thread: a coroutine of the caller's loop runs while
    stop() still waits on a held task, and it is what releases that task."""
    started = threading.Event()

    async def main() -> tuple[OperationsCoordinator, Token[str], bool]:
        held_done_meanwhile = True
        async with OperationsCoordinator(process_lane=False, workers_per_core=1) as coordinator:
            assert coordinator.running
            held = gated("held", started)
            assert await asyncio.to_thread(started.wait, 30)
            ran = asyncio.Event()

            async def meanwhile() -> None:
                nonlocal held_done_meanwhile
                held_done_meanwhile = held.done()
                ran.set()
                GATE.set()  # the only release of the held task

            asyncio.get_running_loop().create_task(meanwhile())
        assert ran.is_set()
        return coordinator, held, held_done_meanwhile

    coordinator, held, held_done_meanwhile = asyncio.run(main())
    assert held_done_meanwhile is False  # it ran while the exit was waiting
    assert held.result(timeout=0) == "held"  # released by the coroutine, not timed out
    assert not coordinator.running
    assert_counts_add_up(coordinator)


def test_async_with_leaving_on_an_exception_discards_what_has_not_started() -> None:
    started = threading.Event()

    async def main() -> tuple[OperationsCoordinator, Token[str], Token[str]]:
        options: dict[str, Any] = {"process_lane": False, "workers_per_core": 1, "cores": 1}
        with pytest.raises(KeyError):
            async with OperationsCoordinator(**options) as coordinator:
                running = gated("running", started)
                assert await asyncio.to_thread(started.wait, 30)
                queued = gated("queued")  # behind the running one: there is one worker

                async def release_once_discarded() -> None:
                    with pytest.raises(TokenDiscarded):
                        await queued
                    GATE.set()

                asyncio.get_running_loop().create_task(release_once_discarded())
                raise KeyError("boom")
        return coordinator, running, queued

    coordinator, running, queued = asyncio.run(main())
    assert running.result(timeout=0) == "running"
    assert queued.state == "discarded"
    assert not coordinator.running
    assert_counts_add_up(coordinator)
