"""A Token is a real ``concurrent.futures.Future``: stdlib helpers, asyncio, callbacks, errors.

Most tests run on one worker (``cores=1, workers_per_core=1``) so that a task blocked on a gate
Event holds the only worker and every later token is deterministically still queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import math
import re
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from conftest import eventually
from tokengate import (
    OperationsCoordinator,
    TaskTimeout,
    Token,
    TokenDiscarded,
    TokenGateError,
    task_token_guard,
)


class Boom(Exception):
    """The error a task raises; a private type, so nothing else can produce it."""


# -- tasks (module level, as the coordinator requires) --------------------------------------------
@task_token_guard(operation_type="echo", tags={"weight": "light"})
def echo(value: Any) -> Any:
    return value


@task_token_guard(operation_type="hold", tags={"weight": "light"})
def hold(started: threading.Event, gate: threading.Event, value: Any = None) -> Any:
    started.set()
    if not gate.wait(30):
        raise RuntimeError("the test never opened the gate")
    return value


@task_token_guard(operation_type="explode", tags={"weight": "light"})
def explode_in_task(raised: list[BaseException]) -> None:
    exc = Boom("raised inside the task")
    raised.append(exc)
    raise exc


@task_token_guard(operation_type="explode_later", tags={"weight": "light"})
def explode_after_gate(gate: threading.Event) -> None:
    if not gate.wait(30):
        raise RuntimeError("the test never opened the gate")
    raise Boom("after the gate")


@task_token_guard(operation_type="overrun", tags={"weight": "light", "timeout": 0.2})
def overrun(runs: list[int], gate: threading.Event) -> str:
    runs.append(1)
    gate.wait(30)
    return "late"


class Data(bytearray):
    """Call data a test can watch being freed (a bytearray takes no weak references)."""


@task_token_guard(operation_type="measure", tags={"weight": "light"})
def measure(data: Data, *, extra: Data | None = None) -> int:
    return len(data) + (0 if extra is None else len(extra))


def add(a: int, b: int = 0) -> int:
    """A plain, undecorated function for ``coordinator.submit``."""
    return a + b


# -- helpers --------------------------------------------------------------------------------------
class Blocked:
    """The single worker held by a ``hold`` token until :meth:`release`."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()
        self.token: Token[Any] = hold(self.started, self.gate, "blocker")
        assert self.started.wait(10), "the blocker never started"

    def release(self) -> None:
        self.gate.set()


def failed_token() -> Token[Any]:
    tok = explode_in_task([])
    assert isinstance(tok.exception(timeout=10), Boom)
    return tok


# -- identity with the standard library -----------------------------------------------------------
def test_token_is_a_future(coordinator: OperationsCoordinator) -> None:
    tok = echo(1)
    assert isinstance(tok, cf.Future)
    assert isinstance(tok, Token)
    assert tok.get(timeout=10) == 1
    assert tok.done() and not tok.cancelled() and not tok.running()


def test_wait_first_completed_with_resolved_failed_cancelled_and_pending(
    one_worker: OperationsCoordinator,
) -> None:
    resolved = echo("ok")
    assert resolved.get(timeout=10) == "ok"
    failed = failed_token()
    blocked = Blocked()
    cancelled = echo("never")
    assert cancelled.cancel()
    pending = echo("later")

    done, not_done = cf.wait(
        [resolved, failed, cancelled, pending], timeout=10, return_when=cf.FIRST_COMPLETED
    )
    assert done == {resolved, failed, cancelled}
    assert not_done == {pending}

    # Nothing finished yet among these two: wait() must be woken by the worker.
    waiter_installed = threading.Event()

    def open_gate_once_waited() -> None:
        eventually(lambda: len(blocked.token._waiters) > 0, what="wait() to install its waiter")
        waiter_installed.set()
        blocked.release()

    helper = threading.Thread(target=open_gate_once_waited)
    helper.start()
    done, not_done = cf.wait([blocked.token, pending], timeout=10, return_when=cf.FIRST_COMPLETED)
    helper.join(10)
    assert waiter_installed.is_set()
    assert blocked.token in done
    assert blocked.token.result() == "blocker"


def test_wait_all_completed_and_first_exception(one_worker: OperationsCoordinator) -> None:
    resolved = echo(1)
    resolved.get(timeout=10)
    blocked = Blocked()
    cancelled = echo(2)
    assert cancelled.cancel()
    gate = threading.Event()
    fails_later = explode_after_gate(gate)
    queued_ok = echo(3)
    everything = [resolved, blocked.token, cancelled, fails_later, queued_ok]

    # ALL_COMPLETED with a short timeout returns what is done so far.
    done, not_done = cf.wait(everything, timeout=0.05, return_when=cf.ALL_COMPLETED)
    assert done == {resolved, cancelled}
    assert not_done == {blocked.token, fails_later, queued_ok}

    # FIRST_EXCEPTION returns once the failure is in, whatever is still running.
    blocked.release()
    gate.set()
    done, not_done = cf.wait(everything, timeout=10, return_when=cf.FIRST_EXCEPTION)
    assert fails_later in done
    assert isinstance(fails_later.exception(), Boom)

    done, not_done = cf.wait(everything, timeout=10, return_when=cf.ALL_COMPLETED)
    assert not not_done
    assert done == set(everything)
    assert queued_ok.result() == 3


def test_wait_first_exception_returns_at_once_for_an_already_failed_token(
    one_worker: OperationsCoordinator,
) -> None:
    failed = failed_token()
    blocked = Blocked()
    done, not_done = cf.wait([failed, blocked.token], timeout=10, return_when=cf.FIRST_EXCEPTION)
    assert done == {failed}
    assert not_done == {blocked.token}
    blocked.release()


def test_as_completed_with_a_timeout_then_all(one_worker: OperationsCoordinator) -> None:
    resolved = echo(1)
    resolved.get(timeout=10)
    failed = failed_token()
    blocked = Blocked()
    cancelled = echo(2)
    assert cancelled.cancel()
    pending = echo(3)
    tokens = [resolved, failed, cancelled, pending, blocked.token]

    seen: list[cf.Future[Any]] = []
    with pytest.raises(TimeoutError, match=r"2 \(of 5\) futures unfinished"):
        for fut in cf.as_completed(tokens, timeout=0.05):
            seen.append(fut)
    assert set(seen) == {resolved, failed, cancelled}

    blocked.release()
    finished = list(cf.as_completed(tokens, timeout=10))
    assert len(finished) == 5
    assert set(finished) == set(tokens)
    assert pending.result() == 3


def test_asyncio_wrap_future_and_await(one_worker: OperationsCoordinator) -> None:
    resolved = echo("first")
    resolved.get(timeout=10)
    failed = failed_token()
    blocked = Blocked()
    cancelled = echo("never")
    assert cancelled.cancel()
    queued = echo("queued")

    async def main() -> list[Any]:
        out: list[Any] = [await resolved, await asyncio.wrap_future(resolved)]
        with pytest.raises(Boom):
            await failed
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wrap_future(cancelled)
        # Pending tokens complete on a worker thread while the loop awaits them.
        waiting = asyncio.gather(asyncio.wrap_future(blocked.token), queued)
        blocked.release()
        out.extend(await asyncio.wait_for(waiting, timeout=10))
        return out

    assert asyncio.run(main()) == ["first", "first", "blocker", "queued"]


# -- callbacks ------------------------------------------------------------------------------------
def test_done_callback_added_before_completion_runs_once(one_worker: OperationsCoordinator) -> None:
    blocked = Blocked()
    tok = echo(7)
    calls: list[cf.Future[Any]] = []
    tok.add_done_callback(calls.append)
    assert calls == []
    blocked.release()
    assert tok.get(timeout=10) == 7
    # The single worker runs callbacks before it takes its next token.
    assert echo(8).get(timeout=10) == 8
    assert calls == [tok]
    assert calls[0] is tok


def test_done_callback_added_after_completion_runs_at_once(
    coordinator: OperationsCoordinator,
) -> None:
    tok = echo(9)
    tok.get(timeout=10)
    calls: list[tuple[cf.Future[Any], str]] = []
    tok.add_done_callback(lambda t: calls.append((t, threading.current_thread().name)))
    assert calls == [(tok, threading.current_thread().name)]
    assert echo(10).get(timeout=10) == 10
    assert len(calls) == 1


def test_done_callback_on_discarded_and_failed_tokens(one_worker: OperationsCoordinator) -> None:
    blocked = Blocked()
    raised: list[BaseException] = []
    fails = explode_in_task(raised)
    cancelled = echo(1)
    calls: list[cf.Future[Any]] = []
    fails.add_done_callback(calls.append)
    cancelled.add_done_callback(calls.append)
    assert cancelled.cancel()
    assert calls == [cancelled]  # the cancelling thread runs it
    blocked.release()
    assert isinstance(fails.exception(timeout=10), Boom)
    assert echo(2).get(timeout=10) == 2
    assert calls == [cancelled, fails]


def _raising_callback(tok: cf.Future[Any]) -> None:
    raise RuntimeError(f"callback bug for {tok!r}")


def test_raising_callback_is_logged_and_worker_survives(
    one_worker: OperationsCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="tokengate.callbacks")
    blocked = Blocked()
    tok = echo("value")
    tok.add_done_callback(_raising_callback)
    later_calls: list[cf.Future[Any]] = []
    tok.add_done_callback(later_calls.append)  # a later callback still runs
    blocked.release()
    assert tok.get(timeout=10) == "value"
    # The only worker is still alive: later tokens run.
    assert [echo(i).get(timeout=10) for i in range(5)] == list(range(5))
    records = [r for r in caplog.records if r.name == "tokengate.callbacks"]
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert records[0].exc_info is not None
    assert records[0].exc_info[0] is RuntimeError
    assert tok.id in records[0].getMessage()
    assert later_calls == [tok]


def test_raising_callback_added_after_completion_is_logged_on_tokengate_logger(
    coordinator: OperationsCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    tok = echo(1)
    tok.get(timeout=10)
    tok.add_done_callback(_raising_callback)
    names = [r.name for r in caplog.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert names == ["tokengate.callbacks"]


# -- waiting with timeouts ------------------------------------------------------------------------
def test_result_get_exception_time_out_while_pending_then_succeed(
    one_worker: OperationsCoordinator,
) -> None:
    blocked = Blocked()
    tok = blocked.token
    with pytest.raises(TimeoutError, match=tok.id):
        tok.result(timeout=0.02)
    with pytest.raises(TimeoutError):
        tok.get(timeout=0)
    with pytest.raises(TimeoutError):
        tok.exception(timeout=0.02)
    assert not tok.done()
    blocked.release()
    assert tok.get(timeout=10) == "blocker"
    assert tok.result(timeout=0) == "blocker"
    assert tok.exception(timeout=0) is None


@pytest.mark.parametrize("method", ["get", "result", "exception"])
def test_bad_timeouts_are_refused_while_pending(
    one_worker: OperationsCoordinator, method: str
) -> None:
    blocked = Blocked()
    wait = getattr(blocked.token, method)
    with pytest.raises(ValueError, match="-1"):
        wait(timeout=-1)
    with pytest.raises(ValueError, match="nan"):
        wait(timeout=math.nan)
    with pytest.raises(TypeError, match="'5'"):
        wait(timeout="5")
    with pytest.raises(TypeError):
        wait(timeout=True)
    assert not blocked.token.done()
    blocked.release()
    blocked.token.result(timeout=10)


def test_bad_timeout_is_refused_on_a_finished_token_too(coordinator: OperationsCoordinator) -> None:
    """Validation must not depend on whether the token happened to finish first."""
    tok = echo(1)
    assert tok.get(timeout=10) == 1
    with pytest.raises(ValueError, match="-1"):
        tok.get(timeout=-1)


@pytest.mark.parametrize("huge", [math.inf, 1e10])
def test_huge_timeout_waits_or_is_refused_clearly(
    one_worker: OperationsCoordinator, huge: float
) -> None:
    """A timeout beyond threading.TIMEOUT_MAX used to overflow the lock (OverflowError)."""
    blocked = Blocked()
    tok = blocked.token

    def open_gate_when_waited() -> None:
        with contextlib.suppress(AssertionError):  # get() refused the timeout: no waiting
            eventually(
                lambda: bool(tok._sleepers) or blocked.gate.is_set(),
                timeout=2,
                what="get() to start waiting",
            )
        blocked.release()

    helper = threading.Thread(target=open_gate_when_waited)
    helper.start()
    try:
        try:
            assert tok.get(timeout=huge) == "blocker"
        except ValueError as exc:  # refusing a non-finite timeout clearly is also fine
            assert "timeout" in str(exc)
    finally:
        blocked.release()
        helper.join(10)


# -- cancellation ---------------------------------------------------------------------------------
def test_cancel_a_queued_token(one_worker: OperationsCoordinator) -> None:
    blocked = Blocked()
    runs: list[int] = []
    tok = one_worker.submit(runs.append, 1)
    before = one_worker.stats()
    assert tok.state == "pending"
    assert tok.cancel() is True
    assert tok.cancel() is True  # idempotent, as for a Future
    assert tok.cancelled() and tok.done()
    assert tok.state == "discarded"
    assert tok.discard_reason == "cancelled"
    with pytest.raises(TokenDiscarded) as excinfo:
        tok.get()
    assert isinstance(excinfo.value, cf.CancelledError)
    assert excinfo.value.reason == "cancelled"
    assert tok.id in str(excinfo.value)
    with pytest.raises(cf.CancelledError):
        tok.exception(timeout=0)
    assert one_worker.stats().discarded == before.discarded + 1
    blocked.release()
    assert echo(1).get(timeout=10) == 1  # the worker skipped the discarded token
    assert runs == []
    assert tok.attempts == 0
    assert tok.started_at is None


def test_cancel_a_running_or_finished_token_returns_false(
    one_worker: OperationsCoordinator,
) -> None:
    blocked = Blocked()
    assert blocked.token.running()
    assert blocked.token.cancel() is False
    assert blocked.token.state == "running"
    blocked.release()
    assert blocked.token.get(timeout=10) == "blocker"
    assert blocked.token.cancel() is False
    failed = failed_token()
    assert failed.cancel() is False
    assert failed.state == "failed"
    assert not blocked.token.cancelled() and not failed.cancelled()


def test_state_transitions(one_worker: OperationsCoordinator) -> None:
    blocked = Blocked()
    assert blocked.token.state == "running"
    ok = echo("v")
    gate = threading.Event()
    bad = explode_after_gate(gate)
    dropped = echo("x")
    assert (ok.state, bad.state, dropped.state) == ("pending", "pending", "pending")
    dropped.cancel()
    assert dropped.state == "discarded"
    blocked.release()
    gate.set()
    assert ok.get(timeout=10) == "v"
    assert isinstance(bad.exception(timeout=10), Boom)
    assert (blocked.token.state, ok.state, bad.state) == ("resolved", "resolved", "failed")
    assert repr(ok).startswith(f"<Token {ok.id} resolved")


# -- identity, attempts, where it ran -------------------------------------------------------------
def test_token_ids_have_the_seed_format_and_are_unique(coordinator: OperationsCoordinator) -> None:
    tokens = [echo(i) for i in range(10_000)]
    ids = [tok.id for tok in tokens]
    assert all(re.fullmatch(r"echo_\d+", i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    assert [tok.get(timeout=30) for tok in tokens] == list(range(10_000))
    assert tokens[0].operation_type == "echo"
    assert tokens[0].weight == "light"


def test_token_ids_are_unique_across_coordinators() -> None:
    """Ids used to be _ID_BASE + a per-coordinator counter, repeating across coordinators."""
    ids = []
    for _ in range(2):
        with OperationsCoordinator(workers_per_core=1, cores=1):
            tok = echo(1)
            tok.get(timeout=10)
            ids.append(tok.id)
    assert ids[0] != ids[1]


def test_run_details_are_recorded(coordinator: OperationsCoordinator) -> None:
    tok = echo(5)
    assert tok.get(timeout=10) == 5
    assert tok.attempts == 1
    assert tok.lane == "thread"
    assert tok.core in range(1, coordinator.core_count + 1)
    assert tok.worker is not None
    assert re.fullmatch(rf"worker_\d+_core_{tok.core}", tok.worker)
    assert tok.worker in {w.name for w in coordinator.iter_workers()}
    assert tok.started_at is not None and tok.finished_at is not None
    assert tok.submitted_at <= tok.started_at <= tok.finished_at


def test_run_details_are_empty_before_the_run(one_worker: OperationsCoordinator) -> None:
    blocked = Blocked()
    tok = echo(1)
    assert (tok.attempts, tok.core, tok.worker, tok.lane) == (0, None, None, None)
    assert tok.started_at is None and tok.finished_at is None
    blocked.release()
    tok.get(timeout=10)
    assert tok.attempts == 1


@pytest.mark.parametrize("end", ["resolved", "with keyword arguments", "discarded"])
def test_an_ended_token_lets_go_of_its_arguments(
    one_worker: OperationsCoordinator, end: str
) -> None:
    """A caller keeping tokens for their results must not keep every input alive with them."""
    data, extra = Data(1000), Data(10)
    freed = threading.Event()
    weakref.finalize(data, freed.set)
    blocked = Blocked() if end == "discarded" else None
    tok = measure(data, extra=extra) if end == "with keyword arguments" else measure(data)
    assert tok.args == (data,)  # held while it may still run
    del data, extra
    if blocked is not None:
        assert tok.cancel()
        blocked.release()
    else:
        assert tok.get(timeout=10) in (1000, 1010)
    assert tok.args == () and tok.kwargs == {}
    assert freed.wait(10), "the ended token still holds its arguments"


def test_an_ended_token_lets_go_of_the_object_of_its_bound_method(
    one_worker: OperationsCoordinator,
) -> None:
    data = Data(100)
    freed = threading.Event()
    weakref.finalize(data, freed.set)
    tok = one_worker.submit(data.__len__)
    del data
    assert tok.get(timeout=10) == 100
    assert freed.wait(10), "the ended token still holds its function's object"


def test_many_threads_waiting_on_one_token_are_all_woken(
    one_worker: OperationsCoordinator,
) -> None:
    blocked = Blocked()
    tok = blocked.token
    n = 12
    barrier = threading.Barrier(n + 1)
    results: list[Any] = []
    lock = threading.Lock()
    ways: list[Callable[[], Any]] = [
        lambda: tok.get(timeout=10),
        lambda: tok.result(timeout=10),
        lambda: tok.exception(timeout=10) or "no error",
        lambda: next(iter(cf.wait([tok], timeout=10).done)).result(),
    ]

    def waiter(i: int) -> None:
        barrier.wait(10)
        value = ways[i % len(ways)]()
        with lock:
            results.append(value)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait(10)
    # Every waiter is blocked on the token (own sleepers plus stdlib waiters) before the release.
    eventually(
        lambda: len(tok._sleepers or []) + len(tok._waiters) == n,
        what="all threads to wait on the token",
    )
    assert results == []
    blocked.release()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert sorted(map(str, results)) == sorted(["blocker"] * (n - n // 4) + ["no error"] * (n // 4))


# -- errors ---------------------------------------------------------------------------------------
def test_original_exception_and_traceback_reach_get(coordinator: OperationsCoordinator) -> None:
    raised: list[BaseException] = []
    tok = explode_in_task(raised)
    with pytest.raises(Boom, match="raised inside the task") as excinfo:
        tok.get(timeout=10)
    assert excinfo.value is raised[0]
    frames = [frame.name for frame in traceback.extract_tb(excinfo.value.__traceback__)]
    assert "explode_in_task" in frames
    assert tok.exception() is raised[0]
    assert tok.state == "failed"
    assert tok.attempts == 1  # a Boom is not retryable by default


def test_set_result_and_set_exception_belong_to_the_coordinator(
    coordinator: OperationsCoordinator,
) -> None:
    tok = echo(1)
    tok.get(timeout=10)
    with pytest.raises(TokenGateError, match="set_result"):
        tok.set_result(2)
    with pytest.raises(TokenGateError, match="set_exception"):
        tok.set_exception(Boom())
    assert tok.result() == 1


def test_submit_a_plain_function(coordinator: OperationsCoordinator) -> None:
    tok = coordinator.submit(add, 2, b=40)
    assert isinstance(tok, Token)
    assert tok.get(timeout=10) == 42
    assert tok.operation_type == "add"
    assert re.fullmatch(r"add_\d+", tok.id)
    assert coordinator.submit(max, 3, 9).get(timeout=10) == 9  # a builtin, not weak-referenceable
    assert coordinator.stats().operations["add"].resolved == 1


def test_thread_timeout_fails_the_token_without_rerunning_it(
    coordinator: OperationsCoordinator,
) -> None:
    runs: list[int] = []
    gate = threading.Event()
    tok = overrun(runs, gate)
    try:
        # Either the token fails at its limit, or (the bug) a second run starts meanwhile.
        eventually(lambda: tok.done() or len(runs) > 1, what="the timeout to fire")
        assert len(runs) == 1, "the task was re-run while its first run was still running"
        assert isinstance(tok.exception(timeout=10), TaskTimeout)
        assert tok.attempts == 1
    finally:
        gate.set()


# -- the stripe / on-demand lock protocol --------------------------------------------------------
JITTER_GATE = threading.Event()


@task_token_guard(operation_type="jittery", tags={"weight": "light"})
def jittery(i: int) -> int:
    assert JITTER_GATE.wait(30)
    return sum(range(i % 50))


def test_stdlib_waits_race_completion_and_cancellation_without_deadlock_or_loss(
    make_coordinator: Callable[..., OperationsCoordinator],
    request: pytest.FixtureRequest,
) -> None:
    """Many threads wait()/as_completed() on overlapping token sets (each token's stdlib lock
    is made on demand while other tokens' locks are held) while workers finish them and a
    thread cancels some: every waiter sees every token done, and nothing hangs."""
    import random

    JITTER_GATE.clear()
    # Switch threads as often as the interpreter can, so the lock windows really interleave.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    request.addfinalizer(lambda: sys.setswitchinterval(previous))
    make_coordinator(workers_per_core=4)
    tokens = [jittery(i) for i in range(1200)]  # fits the mailboxes; held at the gate
    rng = random.Random(7)
    sets = [rng.sample(tokens, 150) for _ in range(12)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(sets) + 1)

    def waiter(k: int, fs: list[Token[int]]) -> None:
        try:
            barrier.wait(10)
            if k % 2:
                done, not_done = cf.wait(fs, timeout=30)
                assert not not_done
                assert len(done) == len(set(fs))
            else:
                seen = list(cf.as_completed(fs, timeout=30))
                assert len(seen) == len(set(fs))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(k, fs)) for k, fs in enumerate(sets)]
    for thread in threads:
        thread.start()
    barrier.wait(10)
    JITTER_GATE.set()  # completions now race the waiters' lock set-up
    for token in tokens[::7]:
        token.cancel()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a waiter hung"
    assert errors == []
    # The waiters covered random subsets: the tokens none of them waited on end in their own time.
    _, not_done = cf.wait(tokens, timeout=30)
    assert not not_done
