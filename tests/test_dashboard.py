"""The dashboard's server over real HTTP on loopback: its security, its views, its life.

The browser tests (tests/test_dashboard_browser.py) drive the page; these talk HTTP directly,
so each security rule is checked on the exact request that must be refused.
"""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import eventually
from tokengate import CoordinatorNotRunning, OperationsCoordinator, task_token_guard
from tokengate._middleware import overridden
from tokengate.dashboard._views import health_class

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@task_token_guard(operation_type="dash_square")
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="dash_fails", tags={"retries": 0})
def fails(x: int) -> int:
    raise ValueError(f"bad input {x}")


class Dash:
    """The URL's parts and a small client that sends exactly the request a test asks for."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.url = url
        self.host = parsed.hostname or ""
        self.port = parsed.port or 0
        self.token = urllib.parse.parse_qs(parsed.query)["token"][0]
        self.origin = f"http://{self.host}:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: bool = True,
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            sent = dict(headers or {})
            if token:
                sent.setdefault("X-TokenGate-Token", self.token)
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        status, body, _ = self.request("GET", path)
        assert status == 200, body
        return json.loads(body)

    def post(self, body: bytes, **headers: str) -> tuple[int, bytes]:
        sent = {"Origin": self.origin, "Content-Type": "application/json", **headers}
        status, data, _ = self.request("POST", "/api/control", body=body, headers=sent)
        return status, data


@pytest.fixture
def served(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> Iterator[tuple[OperationsCoordinator, Dash]]:
    coordinator = make_coordinator(workers_per_core=1, process_lane=False)
    yield coordinator, Dash(coordinator.serve_dashboard())


def test_the_url_is_loopback_with_a_token_and_the_page_is_served(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    coordinator, dash = served
    assert dash.host == "127.0.0.1"
    assert len(dash.token) >= 32
    assert coordinator.dashboard_url == dash.url
    status, body, headers = dash.request("GET", "/")
    assert status == 200
    assert b"<title>tokengate dashboard</title>" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert not any(k.lower().startswith("access-control") for k in headers)  # no CORS at all
    status, body, _ = dash.request("GET", "/static/dashboard.js")
    assert status == 200 and b"EventSource" in body


def test_the_printed_url_sets_a_strict_cookie_and_drops_the_token_from_the_address(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    _, dash = served
    status, _, headers = dash.request("GET", f"/?token={dash.token}", token=False)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"tokengate-dashboard-{dash.port}={dash.token}")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    status, _, _ = dash.request(
        "GET", "/api/health", token=False, headers={"Cookie": cookie.split(";")[0]}
    )
    assert status == 200


@pytest.mark.parametrize("path", ["/", "/api/snapshot", "/api/events", "/static/dashboard.js"])
@pytest.mark.parametrize("how", ["missing", "wrong", "wrong-length"])
def test_every_request_needs_the_token(
    served: tuple[OperationsCoordinator, Dash], path: str, how: str
) -> None:
    _, dash = served
    headers = {}
    if how == "wrong":
        headers["X-TokenGate-Token"] = dash.token[:-1] + ("A" if dash.token[-1] != "A" else "B")
    elif how == "wrong-length":
        headers["X-TokenGate-Token"] = "x"
    status, body, _ = dash.request("GET", path, token=False, headers=headers)
    assert status == 403
    assert b"access token" in body


def test_a_loopback_dashboard_refuses_another_host_name(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    _, dash = served  # a DNS-rebinding page would send its own name as Host
    status, body, _ = dash.request("GET", "/api/health", headers={"Host": "evil.example:80"})
    assert status == 403 and b"loopback only" in body
    status, _, _ = dash.request("GET", "/api/health", headers={"Host": f"localhost:{dash.port}"})
    assert status == 200


@pytest.mark.parametrize(
    "origin", [None, "http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1"]
)
def test_a_post_from_another_origin_is_refused(
    served: tuple[OperationsCoordinator, Dash], origin: str | None
) -> None:
    _, dash = served
    headers = {"Content-Type": "application/json"}
    if origin is not None:
        headers["Origin"] = origin
    status, body, _ = dash.request(
        "POST", "/api/control", body=b'{"action": "pause"}', headers=headers
    )
    assert status == 403 and b"cross-origin" in body


def test_bad_bodies_get_a_clear_4xx_and_the_server_keeps_serving(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    _, dash = served
    status, body = dash.post(b"x" * (10 * 1024 * 1024))
    assert status == 413 and b"over 65536 bytes" in body
    status, body = dash.post(b"{not json")
    assert status == 400 and b"malformed JSON" in body
    status, body = dash.post(b"[1, 2]")
    assert status == 400 and b"JSON object" in body
    status, body = dash.post(b'{"action": "__import__"}')
    assert status == 400 and b"unknown action" in body
    status, body = dash.post(b'{"action": "pause"}', **{"Content-Type": "text/plain"})
    assert status == 415
    status, _, _ = dash.request("DELETE", "/api/control")
    assert status == 405
    assert dash.get_json("/api/health")["ok"] is True


def test_a_chunked_body_without_length_is_cut_off_too(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    _, dash = served
    conn = http.client.HTTPConnection(dash.host, dash.port, timeout=10)
    try:
        chunks = (b"x" * 65536 for _ in range(160))  # 10 MB, no Content-Length
        headers = {
            "X-TokenGate-Token": dash.token,
            "Origin": dash.origin,
            "Content-Type": "application/json",
        }
        try:
            conn.request("POST", "/api/control", body=chunks, headers=headers, encode_chunked=True)
            response = conn.getresponse()
            status, body = response.status, response.read()
        except (BrokenPipeError, ConnectionResetError):  # refused before all of it was sent
            response = conn.getresponse()
            status, body = response.status, response.read()
    finally:
        conn.close()
    assert status == 413 and b"over 65536 bytes" in body
    assert dash.get_json("/api/health")["ok"] is True


def test_the_snapshot_reads_the_coordinator(served: tuple[OperationsCoordinator, Dash]) -> None:
    coordinator, dash = served
    assert [square(i).get(timeout=10) for i in range(6)] == [i * i for i in range(6)]
    with pytest.raises(ValueError):
        fails(7).get(timeout=10)
    snap = dash.get_json("/api/snapshot")
    assert snap["running"] is True
    assert snap["stats"]["submitted"] == 7
    assert snap["stats"]["resolved"] == 6 and snap["stats"]["failed"] == 1
    assert {w["lane"] for w in snap["workers"]} >= {"thread"}
    assert {t["tier"] for t in snap["tiers"]} == set(coordinator.tier_stats())
    ops = {o["operation_type"]: o for o in snap["guard_house"]["operations"]}
    assert ops["dash_square"]["health"] == "EXCELLENT"
    assert ops["dash_fails"]["health"] == "UNKNOWN"  # one run: too few to judge
    assert snap["guard_house"]["failures"][-1]["exception_type"] == "ValueError"
    assert snap["overflow"]["budget"] == coordinator.overflow_guard.status().budget


def test_a_token_is_found_by_id_with_its_error_and_traceback(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    _, dash = served
    dash.get_json("/api/snapshot")  # a page is looking from now on
    ok = square(5)
    bad = fails(3)
    assert ok.get(timeout=10) == 25
    with pytest.raises(ValueError):
        bad.get(timeout=10)
    found = dash.get_json(f"/api/token/{ok.id}")
    assert found["state"] == "resolved" and found["attempts"] == 1
    assert found["worker"] == ok.worker and found["lane"] == "thread"
    found = dash.get_json(f"/api/token/{bad.id}")
    assert found["state"] == "failed" and found["error"] == "ValueError: bad input 3"
    tracebacks = dash.get_json("/api/snapshot")["tracebacks"]
    assert any(t["token_id"] == bad.id and "bad input 3" in t["traceback"] for t in tracebacks)
    for missing in ("nope", "dash_square_1", f"other_{ok.id.rpartition('_')[2]}"):
        status, body, _ = dash.request("GET", f"/api/token/{missing}")
        assert status == 404 and b"no token" in body
    # A control on an ended token says so (it is found, but there is nothing to act on).
    status, body = dash.post(json.dumps({"action": "kill", "token": ok.id}).encode())
    assert status == 409 and b"has ended (resolved)" in body, body
    status, body = dash.post(json.dumps({"action": "kill", "token": "nope_1"}).encode())
    assert status == 409 and b"no token 'nope_1'" in body, body


def test_a_failed_token_is_found_after_later_tokens_push_it_out_of_the_recent_ones(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    from tokengate.dashboard._registry import RecentTokens

    coordinator = make_coordinator(workers_per_core=1, process_lane=False)
    registry = RecentTokens(capacity=3)  # as if thousands had ended since
    registry.attach(coordinator)

    def one_per_period(calls: range) -> None:
        for i in calls:  # a period each, as the server runs them: none goes unrecorded
            steps = registry.cycle(period=1.0)
            next(steps)
            square(i).get(timeout=10)
            next(steps, None)

    bad = fails(7)
    with pytest.raises(ValueError):
        bad.get(timeout=10)
    one_per_period(range(5))
    assert bad.seq not in {record.seq for record in registry.recent(3)}  # pushed out
    found = registry.find(coordinator, bad.id)  # still found, among the failures
    assert found is not None and (found.id, found.state) == (bad.id, "failed")
    assert found.error == "ValueError: bad input 7"
    early = square(99)
    early.get(timeout=10)
    assert registry.find(coordinator, early.id) is not None
    one_per_period(range(5))
    assert registry.find(coordinator, early.id) is None


_flaky_calls: list[int] = []


@task_token_guard(operation_type="dash_flaky", tags={"retries": 1})
def flaky(x: int) -> int:
    _flaky_calls.append(x)
    if _flaky_calls.count(x) == 1:
        raise ConnectionError(f"first try of {x}")
    return x


def test_retried_and_discarded_tokens_are_found_without_a_hook_per_attempt(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    coordinator, dash = served
    dash.get_json("/api/snapshot")  # a page is looking from now on
    # Recording costs the hot path no middleware call: no installed hook hears every attempt.
    assert not any(overridden(m, "after_attempt") for m in coordinator.middleware)
    retried = flaky(4)
    assert retried.get(timeout=10) == 4 and retried.attempts == 2
    coordinator.hold_when(lambda spec, args, kwargs: "held for the test", operation="dash_square")
    held = square(9)
    assert coordinator.reject(held, "not today")
    found = dash.get_json(f"/api/token/{retried.id}")
    assert found["state"] == "resolved" and found["attempts"] == 2
    found = dash.get_json(f"/api/token/{held.id}")
    assert found["state"] == "discarded" and found["discard_reason"] == "not today"
    stream = {span["token_id"] for span in dash.get_json("/api/snapshot")["stream"]}
    assert retried.id in stream


def test_stats_and_trace_download(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    coordinator = make_coordinator(workers_per_core=1, process_lane=False, trace=True)
    dash = Dash(coordinator.serve_dashboard())
    square(2).get(timeout=10)
    status, body, headers = dash.request("GET", "/api/stats")
    assert status == 200 and "attachment" in headers["content-disposition"]
    assert json.loads(body)["resolved"] == 1
    status, body, headers = dash.request("GET", "/api/trace")
    assert status == 200 and "tokengate-trace.json" in headers["content-disposition"]
    assert any(e.get("name") == "dash_square" for e in json.loads(body)["traceEvents"])


def test_trace_download_without_tracing_says_how(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    _, dash = served
    status, body, _ = dash.request("GET", "/api/trace")
    assert status == 409 and b"trace=True" in body


def _read_events(dash: Dash, count: int) -> list[dict[str, Any]]:
    conn = http.client.HTTPConnection(dash.host, dash.port, timeout=10)
    try:
        conn.request("GET", "/api/events", headers={"X-TokenGate-Token": dash.token})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type", "").startswith("text/event-stream")
        events = []
        while len(events) < count:
            line = response.fp.readline()
            assert line, "the stream ended early"
            if line.startswith(b"data: "):
                data = json.loads(line[6:])
                if not data.get("hello"):
                    events.append(data)
        return events
    finally:
        conn.close()


def test_snapshots_are_taken_only_while_a_page_streams(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    _, dash = served
    assert dash.get_json("/api/health")["samples"] == 0  # served, nobody looking: nothing read
    square(3).get(timeout=10)
    events = _read_events(dash, 2)
    assert events[-1]["stats"]["resolved"] == 1
    health = dash.get_json("/api/health")
    assert health["samples"] >= 2
    # The stream's end is noticed at its next write; after that, sampling stops for good.
    eventually(lambda: dash.get_json("/api/health")["clients"] == 0, what="the stream to end")
    # Sampling happens only inside a page's stream or a view request: with no stream left
    # nothing is scheduled to sample, so two reads in a row see the same count.
    after = dash.get_json("/api/health")["samples"]
    assert dash.get_json("/api/health")["samples"] == after


class _Stream:
    """One page's live stream, read event by event."""

    def __init__(self, dash: Dash) -> None:
        self.conn = http.client.HTTPConnection(dash.host, dash.port, timeout=10)
        self.conn.request("GET", "/api/events", headers={"X-TokenGate-Token": dash.token})
        self.response = self.conn.getresponse()
        assert self.response.status == 200

    def next(self) -> dict[str, Any]:
        while True:
            line = self.response.fp.readline()
            assert line, "the stream ended early"
            if line.startswith(b"data: "):
                data: dict[str, Any] = json.loads(line[6:])
                return data


def test_open_pages_share_one_snapshot_per_refresh(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    _, dash = served
    pages = [_Stream(dash) for _ in range(3)]
    try:
        for page in pages:
            assert page.next().get("hello")
        eventually(lambda: dash.get_json("/api/health")["clients"] == 3, what="three pages")
        first = pages[0]
        first.next()
        shown = first.next()["time"]  # built after all three pages were streaming
        for page in pages[1:]:
            times = [page.next()["time"] for _ in range(2)]
            while times[-1] < shown and len(times) < 20:
                times.append(page.next()["time"])
            assert shown in times, "each page got a snapshot of its own, not the shared one"
    finally:
        for page in pages:
            page.conn.close()
    eventually(lambda: dash.get_json("/api/health")["clients"] == 0, what="the streams to end")
    after = dash.get_json("/api/health")["samples"]
    assert dash.get_json("/api/health")["samples"] == after  # nobody streams: nothing built


def test_a_snapshot_that_fails_ends_the_streams_and_the_next_page_is_served(
    served: tuple[OperationsCoordinator, Dash],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tokengate.dashboard import _server

    _, dash = served

    def broken(*args: object) -> Iterator[None]:
        raise RuntimeError("a view broke")
        yield  # a generator, as the real sections are

    real = _server.snapshot_sections
    monkeypatch.setattr(_server, "snapshot_sections", broken)
    page = _Stream(dash)
    try:
        assert page.next().get("hello")
        with pytest.raises(AssertionError, match="ended early"):
            page.next()  # the stream ends instead of waiting for a snapshot that never comes
    finally:
        page.conn.close()
    assert "could not build a snapshot" in caplog.text
    monkeypatch.setattr(_server, "snapshot_sections", real)
    assert "stats" in _read_events(dash, 1)[0]


def test_the_live_snapshot_is_built_in_sections_with_the_same_data(
    served: tuple[OperationsCoordinator, Dash],
) -> None:
    """The stream lets other threads have the GIL between sections: the sections together
    give what one snapshot() gives."""
    from tokengate.dashboard._views import snapshot, snapshot_sections

    coordinator, _ = served
    out: dict[str, Any] = {}
    steps = sum(1 for _ in snapshot_sections(coordinator, None, out))
    assert steps >= 3
    assert set(out) == set(snapshot(coordinator))
    assert out["stats"]["submitted"] == coordinator.stats().submitted


def test_the_stream_pauses_between_the_snapshot_sections(
    served: tuple[OperationsCoordinator, Dash], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pause is an await on the event loop, whose wait lets go of the GIL."""
    import asyncio

    from tokengate.dashboard import _server
    from tokengate.dashboard._views import snapshot_sections

    coordinator, _ = served
    server = coordinator._dashboards.servers[0]
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    here = threading.current_thread()

    async def recording(delay: float, *args: Any) -> Any:
        if threading.current_thread() is not here:  # the server's own loop sleeps too
            return await real_sleep(delay, *args)
        pauses.append(delay)
        return await real_sleep(0)

    monkeypatch.setattr(_server.asyncio, "sleep", recording)
    server.snapshot_windows.clear()
    before = time.perf_counter()
    text = asyncio.run(server._stream_snapshot())
    after = time.perf_counter()
    sections = sum(1 for _ in snapshot_sections(coordinator, None, {}))
    assert pauses == [_server.SECTION_PAUSE] * sections
    assert "stats" in json.loads(text)
    # Its build time, pauses included, is kept for measuring what snapshots cost.
    ((start, end),) = server.snapshot_windows
    assert before <= start < end <= after


def test_the_dashboard_stops_with_the_coordinator() -> None:
    coordinator = OperationsCoordinator(workers_per_core=1, process_lane=False).start()
    dash = Dash(coordinator.serve_dashboard())
    assert dash.get_json("/api/health")["ok"]
    coordinator.stop()
    assert coordinator.dashboard_url is None
    assert not any(t.name.startswith("tokengate-dashboard") for t in threading.enumerate())
    with pytest.raises(OSError):
        dash.request("GET", "/api/health")
    with pytest.raises(CoordinatorNotRunning, match="before stop"):
        coordinator.serve_dashboard()


def test_dashboard_true_serves_it_from_start_to_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tokengate.dashboard")
    with OperationsCoordinator(workers_per_core=1, process_lane=False, dashboard=True) as c:
        url = c.dashboard_url
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert Dash(url).get_json("/api/health")["ok"]
    assert url in caplog.text
    assert c.dashboard_url is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": -1}, "port must be an int in 0..65535"),
        ({"port": True}, "port must be an int"),
        ({"addr": "example.com"}, "addr must be an IP address"),
        ({"addr": ""}, "addr must be an IP address"),
    ],
)
def test_bad_arguments_are_refused(
    served: tuple[OperationsCoordinator, Dash], kwargs: dict[str, Any], message: str
) -> None:
    coordinator, _ = served
    with pytest.raises(ValueError, match=message):
        coordinator.serve_dashboard(**kwargs)


@pytest.mark.parametrize("value", [-1, 70000, "yes", 1.5])
def test_the_dashboard_option_is_validated(value: object) -> None:
    from tokengate import ConfigError

    with pytest.raises(ConfigError, match="dashboard must be True"):
        OperationsCoordinator(dashboard=value)


def test_another_address_is_served_only_when_asked_and_warns(
    served: tuple[OperationsCoordinator, Dash], caplog: pytest.LogCaptureFixture
) -> None:
    coordinator, default = served
    assert default.host == "127.0.0.1"
    caplog.set_level(logging.WARNING, logger="tokengate.dashboard")
    url = coordinator.serve_dashboard(addr="0.0.0.0")
    assert url.startswith("http://0.0.0.0:")
    assert "reachable from other machines" in caplog.text
    dash = Dash(url)  # reached over loopback; any Host is accepted, the token still is not
    status, _, _ = dash.request("GET", "/api/health", headers={"Host": "myhost.lan"})
    assert status == 200
    status, _, _ = dash.request("GET", "/api/health", token=False)
    assert status == 403


def test_missing_extra_says_how_to_install(
    served: tuple[OperationsCoordinator, Dash], monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator, _ = served
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ImportError, match=r"pip install 'tokengate\[dashboard\]'"):
        coordinator.serve_dashboard()


def test_importing_tokengate_does_not_import_the_web_stack() -> None:
    code = (
        "import sys, tokengate\n"
        "c = tokengate.OperationsCoordinator(workers_per_core=1).start()\n"
        "c.stats(); c.guard_house.report()\n"
        "c.stop()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'uvicorn', 'anyio', 'h11', 'tokengate.dashboard')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("runs", "failure_rate", "expected"),
    [
        (4, 1.0, "UNKNOWN"),
        (5, 0.0, "EXCELLENT"),
        (100, 0.05, "HEALTHY"),
        (100, 0.20, "HEALTHY"),
        (100, 0.21, "AT_RISK"),
        (100, 0.50, "AT_RISK"),
        (100, 0.51, "PROBLEMATIC"),
    ],
)
def test_health_classes(runs: int, failure_rate: float, expected: str) -> None:
    assert health_class(runs, failure_rate) == expected


def test_process_workers_show_pid_restarts_and_the_last_crash(
    make_coordinator: Callable[..., OperationsCoordinator], tmp_path: Path
) -> None:
    import process_tasks as pt

    coordinator = make_coordinator(workers_per_core=1, process_lane=True)
    dash = Dash(coordinator.serve_dashboard())
    assert pt.crash_once(str(tmp_path / "crashed")).get(timeout=30) == "recovered"
    rows = [w for w in dash.get_json("/api/snapshot")["workers"] if w["lane"] == "process"]
    # A slot no token reached has not started its worker process yet.
    assert rows and all(
        isinstance(w["pid"], int) or (w["pid"] is None and w["state"] == "unstarted") for w in rows
    )
    assert any(isinstance(w["pid"], int) for w in rows)
    crashed = [w for w in rows if w["restarts"] >= 1]
    assert len(crashed) == 1
    assert crashed[0]["last_crash"].startswith("exited with code 9")
