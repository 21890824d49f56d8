"""The dashboard as a person uses it: headless Chromium (Debian's ``chromium``) driven by
Playwright, against a real coordinator and server on loopback.

``make test`` installs the browser (``.ci/browser``) and sets ``TOKENGATE_REQUIRE_BROWSER=1``, so
there a missing browser fails the run; elsewhere these tests skip when it is absent. Waits are the
browser's own wait-for-selector with a timeout, never a sleep.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import process_tasks as pt
from conftest import GATE, eventually
from tokengate import (
    AnomalyRule,
    OperationBlocked,
    OperationsCoordinator,
    Token,
    TokenDiscarded,
    task_token_guard,
)

CHROMIUM = os.environ.get("TOKENGATE_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 15_000  # each wait for the page; a hang fails here, well inside pytest's timeout

if not Path(CHROMIUM).exists():
    if os.environ.get("TOKENGATE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (bash .ci/browser)")
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")


@task_token_guard(operation_type="web_square")
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="web_measure")
def measure(data: bytes) -> int:
    return len(data)


@task_token_guard(operation_type="web_gated")
def gated(started: threading.Event) -> str:
    started.set()
    assert GATE.wait(30)
    return "opened"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], timeout=60_000
        )
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[OperationsCoordinator], Any]]:
    pages: list[Any] = []

    def open_(coordinator: OperationsCoordinator) -> Any:
        context = browser.new_context(accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(coordinator.serve_dashboard())
        page.wait_for_selector("#status.live")
        pages.append(context)
        return page

    yield open_
    for context in pages:
        context.close()


def _text_is(selector: str, text: str) -> str:
    return f"{selector}:text-is({json.dumps(text)})"


def test_counts_move_while_a_workload_runs(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    page = open_page(c)
    page.wait_for_selector(_text_is("#total-submitted", "0"))
    tokens = [square(i) for i in range(50)]
    assert [t.get(timeout=10) for t in tokens] == [i * i for i in range(50)]
    page.wait_for_selector(_text_is("#total-resolved", "50"))
    page.wait_for_selector("#guard-house tr[data-operation='web_square'] td.EXCELLENT")
    page.wait_for_selector("#workers tr[data-lane='thread']")
    page.wait_for_selector("#tiers tr[data-tier='SLOW']")
    assert "/?token=" not in page.url  # the token went into a cookie, out of the address bar


def test_the_task_stream_says_when_a_busy_program_is_sampled(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    page = open_page(c)
    page.wait_for_selector("#stream[data-sampled='no']")
    c._dashboards.servers[0].registry.budget = 4.0  # one run per quarter second: busy
    busy = threading.Event()

    def load() -> None:
        while not busy.is_set():
            square(2).get(timeout=10)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        page.wait_for_selector("#stream[data-sampled='yes']")
    finally:
        busy.set()
        thread.join(10)
    page.wait_for_selector("#stream[data-sampled='no']")  # calm again: every run recorded


def test_the_page_refuses_without_the_token(
    make_coordinator: Callable[..., OperationsCoordinator], browser: Any
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    url = c.serve_dashboard().split("?")[0]
    context = browser.new_context()
    try:
        page = context.new_page()
        response = page.goto(url)
        assert response is not None and response.status == 403
        assert "access token" in page.content()
    finally:
        context.close()


def test_pause_blocks_submissions_until_resume(
    make_coordinator: Callable[..., OperationsCoordinator],
    open_page: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tokengate.control")
    c = make_coordinator(workers_per_core=1, process_lane=False)
    page = open_page(c)
    page.click("#pause")
    page.wait_for_selector("#notice:has-text('admission paused')")
    page.wait_for_selector("#admission[data-paused='yes']")
    out: list[Token[int]] = []
    producer = threading.Thread(target=lambda: out.append(square(6)), daemon=True)
    producer.start()
    eventually(lambda: c.admission.waiters == 1, what="the producer to block")
    assert not out
    page.click("#resume")
    page.wait_for_selector("#notice:has-text('admission resumed')")
    producer.join(10)
    assert out[0].get(timeout=10) == 36
    page.wait_for_selector("#admission[data-paused='no']")
    assert "Admission paused by the operator" in caplog.text


def test_kill_a_running_process_task_from_the_page(
    make_coordinator: Callable[..., OperationsCoordinator],
    open_page: Callable[..., Any],
    tmp_path: Path,
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=True)
    page = open_page(c)
    marker = tmp_path / "running"
    token = pt.block_until_killed(str(marker))
    eventually(marker.exists, timeout=30, what="the task to start")
    page.click(f"#processes button[data-action='kill'][data-token='{token.id}']")
    page.wait_for_selector("#notice:has-text('its worker process was replaced')")
    with pytest.raises(TokenDiscarded):
        token.get(timeout=30)
    assert token.discard_reason == "killed by operator"
    page.wait_for_selector(_text_is("#total-discarded", "1"))
    page.wait_for_selector("#processes td.restarts:text-is('1')")


def test_open_and_close_a_breaker(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False, auto_block=True)
    assert square(2).get(timeout=10) == 4
    page = open_page(c)
    row = "#guard-house tr[data-operation='web_square']"
    page.click(f"{row} button[data-action='open_breaker']")
    page.wait_for_selector(f"{row} td.breaker.open")
    with pytest.raises(OperationBlocked, match="opened by the operator"):
        square(3)
    page.wait_for_selector(f"{row} td.breaker:has-text('1 blocked')")
    page.click(f"{row} button[data-action='close_breaker']")
    page.wait_for_selector(f"{row} td.breaker.closed")
    assert square(3).get(timeout=10) == 9


def test_opening_a_breaker_without_auto_block_says_why_in_the_page(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    assert square(2).get(timeout=10) == 4
    page = open_page(c)
    page.click("#guard-house tr[data-operation='web_square'] button[data-action='open_breaker']")
    page.wait_for_selector("#notice.error:has-text('auto_block=True')")


def test_drain_and_cancel_queued_from_the_page(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(cores=1, workers_per_core=1, process_lane=False, convergence=False)
    started = threading.Event()
    running = gated(started)
    assert started.wait(10)
    queued = [square(i) for i in range(4)]
    page = open_page(c)
    row = "#guard-house tr[data-operation='web_square']"
    page.wait_for_selector(row)
    page.click(f"{row} button[data-action='drain_operation']")
    page.wait_for_selector("#notice:has-text('draining')")
    page.wait_for_selector(f"{row} .op-state:text-is('draining')")
    with pytest.raises(OperationBlocked, match="draining"):
        square(9)
    page.click(f"{row} button[data-action='cancel_queued']")
    page.wait_for_selector("#notice:has-text('cancelled 4 queued')")
    assert all(t.discard_reason == "cancelled by operator" for t in queued)
    page.click(f"{row} button[data-action='resume_operation']")
    page.wait_for_selector("#notice:has-text('resumed')")
    GATE.set()
    assert running.get(timeout=10) == "opened"
    assert square(5).get(timeout=10) == 25


def test_resize_a_storage_tier(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    page = open_page(c)
    page.fill("input.tier-limit[data-tier='SLOW']", "3")
    page.click("button[data-action='set_storage_limit'][data-tier='SLOW']")
    page.wait_for_selector("#notice:has-text('SLOW limit set to 3')")
    page.wait_for_selector(_text_is("#tiers tr[data-tier='SLOW'] td.limit", "3"))
    assert c.tier_stats()["SLOW"].limit == 3
    page.fill("input.tier-limit[data-tier='SLOW']", "0")
    page.click("button[data-action='set_storage_limit'][data-tier='SLOW']")
    page.wait_for_selector("#notice.error")
    assert c.tier_stats()["SLOW"].limit == 3


def test_look_up_a_token(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    page = open_page(c)
    token = square(8)
    assert token.get(timeout=10) == 64
    page.fill("#lookup-id", token.id)
    page.click("#lookup")
    page.wait_for_selector("#lookup-result[data-state='resolved']")
    text = page.inner_text("#lookup-result")
    assert f"worker: {token.worker}" in text and "attempts: 1" in text
    page.fill("#lookup-id", "web_square_1")
    page.click("#lookup")
    page.wait_for_selector("#lookup-result[data-state='missing']")


def test_download_the_stats_and_the_trace(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False, trace=True)
    assert square(4).get(timeout=10) == 16
    page = open_page(c)
    with page.expect_download() as stats:
        page.click("#download-stats")
    assert json.loads(Path(stats.value.path()).read_text())["resolved"] == 1
    with page.expect_download() as trace:
        page.click("#download-trace")
    events = json.loads(Path(trace.value.path()).read_text())["traceEvents"]
    assert any(e.get("name") == "web_square" for e in events)


def test_release_and_reject_quarantined_tokens_from_the_page(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    c.hold_when(lambda spec, args, kwargs: f"x={args[0]} needs a look" if args[0] > 99 else None)
    page = open_page(c)
    released, rejected = square(100), square(200)
    row = "#quarantine tr[data-token='{}']"
    page.wait_for_selector(row.format(released.id) + " :text('x=100 needs a look')")
    page.click(row.format(released.id) + " button[data-action='release']")
    page.wait_for_selector("#notice:has-text('released from quarantine')")
    assert released.get(timeout=10) == 10000
    page.click(row.format(rejected.id) + " button[data-action='reject']")
    page.wait_for_selector("#notice:has-text('rejected')")
    with pytest.raises(TokenDiscarded):
        rejected.get(timeout=10)
    assert rejected.discard_reason == "rejected by operator"
    page.wait_for_selector("#quarantine :text('nothing held')")


def test_an_anomalous_call_is_held_and_released_from_the_page(
    make_coordinator: Callable[..., OperationsCoordinator], open_page: Callable[..., Any]
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    c.hold_when(AnomalyRule(min_runs=3, time_factor=None))
    for _ in range(3):
        assert measure(bytes(1000)).get(timeout=10) == 1000
    page = open_page(c)
    big = measure(bytes(100_000))
    row = f"#quarantine tr[data-token='{big.id}']"
    page.wait_for_selector(row + " :text('argument size 100 KB is 97x the operation')")
    page.click(row + " button[data-action='release']")
    page.wait_for_selector("#notice:has-text('released from quarantine')")
    assert big.get(timeout=10) == 100_000
    page.wait_for_selector("#quarantine :text('nothing held')")
