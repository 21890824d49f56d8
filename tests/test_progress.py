"""Progress: ``tokengate.progress(tokens)``, ``fn.map(..., progress=True)`` and
``coordinator.live()``: a rich view on a terminal, plain lines (logged, or written when logging
is not configured) elsewhere."""

from __future__ import annotations

import gc
import io
import logging
import re
from collections.abc import Callable, Iterator

import pytest

import tokengate
from conftest import GATE, HEAVY_ON_THREADS, eventually
from tokengate import ConfigError, OperationsCoordinator, task_token_guard

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS

Make = Callable[..., OperationsCoordinator]


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, so rich draws on it."""

    def isatty(self) -> bool:
        return True


@task_token_guard(operation_type="double", tags={"retries": 0})
def double(n: int) -> int:
    if n < 0:
        raise ValueError(f"negative {n}")
    return 2 * n


@task_token_guard(operation_type="gated_double", tags={"retries": 0})
def gated_double(n: int) -> int:
    assert GATE.wait(30)
    return 2 * n


@pytest.fixture
def coordinator(one_worker: OperationsCoordinator) -> OperationsCoordinator:
    """This module's tests run on a single worker (conftest's ``one_worker``)."""
    return one_worker


@pytest.fixture
def progress_lines(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    caplog.set_level(logging.INFO, logger="tokengate.progress")
    yield lambda: [r.getMessage() for r in caplog.records if r.name == "tokengate.progress"]


def test_progress_yields_each_token_as_it_completes_and_logs_plain_lines(
    coordinator: OperationsCoordinator, progress_lines: Callable[[], list[str]]
) -> None:
    blocked = gated_double(0)  # holds the only worker: the rest cannot finish before it
    others = [double(n) for n in (1, 2, -3)]
    cancelled = double(4)
    assert cancelled.cancel()
    seen = []
    for token in tokengate.progress([blocked, *others, cancelled], interval=0):
        seen.append(token)
        if token is cancelled:
            GATE.set()
    assert sorted(map(id, seen)) == sorted(map(id, [blocked, *others, cancelled]))
    assert seen[0] is cancelled  # completed first: discarded before it ran
    lines = progress_lines()
    assert len(lines) == 6  # one per completion (interval=0), one at the end
    assert lines[-1].startswith("[progress] tokens: 5/5 done, 1 failed, 1 discarded, ")


def test_progress_counts_failures_without_retrieving_them(
    coordinator: OperationsCoordinator,
    progress_lines: Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tokengate.token")
    for token in tokengate.progress([double(-1)], description="checks"):
        token_id = token.id
    del token
    assert progress_lines()[-1].startswith("[progress] checks: 1/1 done, 1 failed")
    gc.collect()  # nobody asked for the error: it is still reported
    eventually(
        lambda: any(
            token_id in r.getMessage() for r in caplog.records if r.name == "tokengate.token"
        ),
        what="the unretrieved error's warning",
    )


def test_progress_writes_to_the_stream_when_logging_is_not_configured(
    coordinator: OperationsCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("tokengate.progress"), "propagate", False)
    out = io.StringIO()
    results = sorted(t.get(10) for t in tokengate.progress([double(1), double(2)], file=out))
    assert results == [2, 4]
    assert re.fullmatch(
        r"\[progress\] tokens: 2/2 done, 0 failed, 0 discarded, \d+\.\d s\n", out.getvalue()
    )


def test_progress_draws_a_rich_bar_on_a_terminal(coordinator: OperationsCoordinator) -> None:
    pytest.importorskip("rich")
    out = FakeTerminal()
    tokens = [double(n) for n in range(3)]
    assert len(list(tokengate.progress(tokens, description="doubling", file=out))) == 3
    text = out.getvalue()
    assert "doubling" in text and "3/3" in text and "0 failed" in text


def test_progress_rejects_what_is_not_a_token(coordinator: OperationsCoordinator) -> None:
    with pytest.raises(TypeError, match=r"progress\(\) takes tokens .* got int 3"):
        tokengate.progress([3])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="interval must be a number of seconds >= 0, got -1"):
        tokengate.progress([], interval=-1)


def test_map_with_progress_reports_the_total_when_the_input_has_a_length(
    coordinator: OperationsCoordinator, progress_lines: Callable[[], list[str]]
) -> None:
    assert list(double.map(range(4), progress=True)) == [0, 2, 4, 6]
    assert progress_lines()[-1].startswith("[progress] double: 4/4 done, 0 failed, 0 discarded")
    assert list(double.map(iter([5, 6]), progress=True)) == [10, 12]
    assert progress_lines()[-1].startswith("[progress] double: 2 done, 0 failed")
    with pytest.raises(ConfigError, match="progress must be True or False, got 'yes'"):
        double.map([1], progress="yes")  # type: ignore[arg-type]


def test_map_progress_counts_the_failure_that_ends_the_loop(
    coordinator: OperationsCoordinator, progress_lines: Callable[[], list[str]]
) -> None:
    with pytest.raises(ValueError, match="negative -1"):
        list(double.map([1, -1, 2], window=1, progress=True))
    assert progress_lines()[-1].startswith("[progress] double: 2/3 done, 1 failed")


def test_live_logs_plain_stats_lines_off_a_terminal(
    coordinator: OperationsCoordinator, progress_lines: Callable[[], list[str]]
) -> None:
    with coordinator.live(title="my-pipeline", interval=60):
        assert double(3).get(10) == 6
    line = progress_lines()[-1]
    assert "my-pipeline" in line and "submitted 1" in line and "resolved 1" in line


def test_live_draws_the_demo_view_on_a_terminal(coordinator: OperationsCoordinator) -> None:
    pytest.importorskip("rich")
    out = FakeTerminal()
    with coordinator.live(title="my-pipeline", file=out):
        assert double(3).get(10) == 6
    text = out.getvalue()
    for word in ("my-pipeline", "submitted", "resolved", "latency", "lane", "tier"):
        assert word in text, text


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @task_token_guard(operation_type="scale", tags={"retries": 0})
    def scale(self, n: int) -> int:
        return self.factor * n


def test_a_bound_method_map_knows_its_total(
    coordinator: OperationsCoordinator, progress_lines: Callable[[], list[str]]
) -> None:
    assert list(Scaler(3).scale.map([1, 2, 3], progress=True)) == [3, 6, 9]
    assert progress_lines()[-1].startswith("[progress] scale: 3/3 done, 0 failed")
