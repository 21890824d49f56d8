"""A failed token whose error nobody retrieves logs it once, at WARNING, when it is collected.

The rule (asyncio's "Task exception was never retrieved"): ``get()``/``result()`` raising it,
``exception()``, ``await`` or a done-callback retrieve the error; tokengate's own bookkeeping
(the executor's, the dependency tracker's) does not.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from conftest import GATE, HEAVY_ON_THREADS, eventually
from tokengate import DependencyFailed, OperationsCoordinator, Token, task_token_guard

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS

Make = Callable[..., OperationsCoordinator]


class Boom(ValueError):
    pass


@task_token_guard(operation_type="boom", tags={"retries": 0})
def boom(n: int) -> int:
    raise Boom(f"boom {n}")


@task_token_guard(operation_type="gated_boom", tags={"retries": 0})
def gated_boom(n: int) -> int:
    assert GATE.wait(30)
    raise Boom(f"gated boom {n}")


@task_token_guard(operation_type="plus_one", tags={"retries": 0})
def plus_one(n: int) -> int:
    return n + 1


@pytest.fixture
def coordinator(one_worker: OperationsCoordinator) -> OperationsCoordinator:
    """This module's tests run on a single worker (conftest's ``one_worker``)."""
    return one_worker


@pytest.fixture
def unretrieved(
    caplog: pytest.LogCaptureFixture, coordinator: OperationsCoordinator
) -> Iterator[Callable[[], list[logging.LogRecord]]]:
    """The unretrieved-error records logged once everything unreachable was collected.

    Reports are logged in order by one thread, so once a sentinel failure dropped last has
    been logged, every report before it has been too.
    """
    caplog.set_level(logging.WARNING, logger="tokengate.token")

    def records() -> list[logging.LogRecord]:
        gc.collect()
        sentinel = boom(-1)
        _ended(sentinel)
        sentinel_id = sentinel.id
        del sentinel
        gc.collect()

        def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "tokengate.token"]

        eventually(lambda: any(sentinel_id in r.getMessage() for r in logged()), what="sentinel")
        found = [r for r in logged() if sentinel_id not in r.getMessage()]
        caplog.clear()
        return found

    yield records


def _ended(token: Token[Any]) -> None:
    """Wait for the end without retrieving anything (``wait`` uses the stdlib waiters)."""
    from concurrent.futures import wait

    assert not wait([token], timeout=30).not_done


def test_a_failed_token_nobody_asked_logs_its_error_once_with_the_traceback(
    coordinator: OperationsCoordinator, unretrieved: Callable[[], list[logging.LogRecord]]
) -> None:
    token = boom(1)
    _ended(token)
    token_id = token.id
    assert token.state == "failed"  # reading the state is not retrieving the error
    del token
    records = unretrieved()
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    assert token_id in record.getMessage()
    assert "never retrieved" in record.getMessage()
    assert record.exc_info is not None
    assert record.exc_info[0] is Boom
    assert "boom 1" in str(record.exc_info[1])
    formatted = logging.Formatter().formatException(record.exc_info)
    assert "in boom" in formatted  # the task's own frame is in the traceback
    assert unretrieved() == []  # once


def _get(token: Token[Any]) -> None:
    with pytest.raises(Boom):
        token.get(30)


def _result(token: Token[Any]) -> None:
    with pytest.raises(Boom):
        token.result(30)


@pytest.mark.parametrize(
    "retrieve",
    [
        pytest.param(_get, id="get"),
        pytest.param(_result, id="result"),
        pytest.param(lambda t: t.exception(30), id="exception"),
        pytest.param(lambda t: t.add_done_callback(lambda _: None), id="callback-after"),
    ],
)
def test_a_retrieved_error_is_not_logged(
    coordinator: OperationsCoordinator,
    unretrieved: Callable[[], list[logging.LogRecord]],
    retrieve: Callable[[Token[Any]], object],
) -> None:
    token = boom(2)
    _ended(token)
    retrieve(token)
    del token
    assert unretrieved() == []


def test_a_done_callback_added_before_the_failure_counts(
    coordinator: OperationsCoordinator, unretrieved: Callable[[], list[logging.LogRecord]]
) -> None:
    seen: list[BaseException | None] = []
    called = threading.Event()

    def callback(future: Future[int]) -> None:
        seen.append(future.exception())
        called.set()

    token = gated_boom(3)
    token.add_done_callback(callback)
    GATE.set()
    assert called.wait(30)
    del token
    assert isinstance(seen[0], Boom)
    assert unretrieved() == []


def test_awaiting_retrieves_the_error(
    coordinator: OperationsCoordinator, unretrieved: Callable[[], list[logging.LogRecord]]
) -> None:
    async def main() -> None:
        token = boom(4)
        with pytest.raises(Boom):
            await token

    asyncio.run(main())
    assert unretrieved() == []


def test_resolved_and_discarded_tokens_log_nothing(
    coordinator: OperationsCoordinator, unretrieved: Callable[[], list[logging.LogRecord]]
) -> None:
    running = gated_boom(5)  # holds the only worker, so the next one is still queued
    queued = plus_one(1)
    assert queued.cancel()
    GATE.set()
    _get(running)
    done = plus_one(2)
    _ended(done)
    del running, queued, done
    assert unretrieved() == []


def test_a_broken_chain_logs_the_dependent_once_not_every_link(
    coordinator: OperationsCoordinator, unretrieved: Callable[[], list[logging.LogRecord]]
) -> None:
    first = boom(6)
    second = plus_one(first)  # type: ignore[arg-type]
    _ended(second)
    second_id = second.id
    del first, second
    records = unretrieved()
    assert [r.getMessage().split()[1] for r in records] == [second_id]
    exc_info = records[0].exc_info
    assert exc_info is not None and exc_info[0] is DependencyFailed
    assert isinstance(exc_info[1].__cause__, Boom)  # the root cause is in the traceback


def test_an_executor_future_nobody_asked_is_logged(
    coordinator: OperationsCoordinator, unretrieved: Callable[[], list[logging.LogRecord]]
) -> None:
    def fails() -> None:
        raise Boom("from the executor")

    executor = coordinator.executor()
    future = executor.submit(fails)
    from concurrent.futures import wait

    assert not wait([future], timeout=30).not_done
    del future
    records = unretrieved()
    assert len(records) == 1
    assert records[0].exc_info is not None and records[0].exc_info[0] is Boom
