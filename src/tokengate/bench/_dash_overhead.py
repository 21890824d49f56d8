"""DASH and DASHB6: what the web dashboard costs, on B1's load and on B6's (the Quick-Proof's mix).

Every row is tokengate; the reference row (shown as the "peer") has no dashboard, so "vs best
peer" reads as the overhead (1.03x = 3 % slower). ``served`` serves the dashboard with nobody
looking; ``page-open`` also has a page open: a separate process reading the live stream (a
snapshot every 0.9 s, the server's ``REFRESH``, as the browser page gets it), so the page's own
drawing is not charged to the coordinator's process. ``snapshots`` counts the snapshots the
server took during the run; ``server CPU %`` is the CPU time of the server's thread (where the
stream's snapshots are built and every request is read and answered) over the run's wall time:
the dashboard's direct cost, read from a clock rather than from two noisy wall times. On B1's
load the run is cut into bursts, and ``snapshot cost %`` is what the page's snapshots cost that
run, measured inside it: each burst a snapshot's build overlapped, against the mean burst of the
same run without one. Between snapshots an open page's server is the ``served`` row's idle one,
but for the recording of ended tokens a page's look switches on (a slice of runs each quarter
second), which the ``recent-tokens`` row measures on its own (:func:`measure_recent_tokens`).
The cross-run ratio is the page's whole cost; the in-run figures say where it goes. On B6's
load, ``snapshot p50/p95 cost %`` is the same question asked of the latencies inside each run
(:func:`snapshot_tail_cost`).
"""

from __future__ import annotations

import bisect
import http.client
import json
import math
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tokengate.bench._b6_mixed import Span, percentile
from tokengate.bench._model import CaseParams, Figure, Figures, Scenario, System, SystemKind

if TYPE_CHECKING:
    from contextlib import AbstractContextManager as ContextManager

    from tokengate import OperationsCoordinator
    from tokengate.dashboard._registry import RecentTokens
    from tokengate.dashboard._server import DashboardServer

__all__ = [
    "SCENARIO",
    "SCENARIO_B6",
    "measure_case",
    "measure_recent_tokens",
    "overlapped",
    "paired_cost",
    "snapshot_cost",
    "snapshot_tail_cost",
]

WARM_UP = 1_000
#: Seconds of B1's load before a run's clock starts, in every case: with a page open, the server
#: has recorded this load in slices for two absorb periods by then, as on a program already
#: running when the page opened (a page's first period records up to the deque's capacity).
WARM_UP_S = 0.6
#: A DASH run submits its tasks in this many bursts (submit a burst, gather it, the next).
#: B1-length runs vary ±10-15 % from one process to the next on a 2-core machine, as much as the
#: dashboard could cost ten times over; bursts within one run let the run compare itself: the
#: bursts a page's snapshot was built during against those without one
#: (``snapshot_cost_pct``), on the same process, machine state and moment.
BURSTS = 60
RESULT_TIMEOUT_S = 120.0
#: Where the stand-in windows of :func:`snapshot_tail_cost` lie, in periods after the real ones.
PHANTOM_SHIFTS = (1 / 3, 2 / 3)

# The page: reads the server-sent events until it is terminated.
_READER = """
import http.client, sys, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1])
token = urllib.parse.parse_qs(url.query)["token"][0]
conn = http.client.HTTPConnection(url.hostname, url.port)
conn.request("GET", "/api/events", headers={"X-TokenGate-Token": token})
response = conn.getresponse()
while response.fp.readline():
    pass
"""


def _health(url: str) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    token = urllib.parse.parse_qs(parts.query)["token"][0]
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("GET", "/api/health", headers={"X-TokenGate-Token": token})
        data: dict[str, Any] = json.loads(conn.getresponse().read())
        return data
    finally:
        conn.close()


def _server_clock() -> int:
    """The CPU clock of the dashboard's server thread (where the live stream's snapshots are
    built and every request is read and answered)."""
    from tokengate.dashboard._server import THREAD_NAME

    for thread in threading.enumerate():
        if thread.name.startswith(f"{THREAD_NAME}-") and thread.ident is not None:
            return time.pthread_getcpuclockid(thread.ident)
    raise AssertionError(f"no {THREAD_NAME}-* thread: the dashboard is not served")


Body = Callable[["DashboardServer | None"], Figures]


def _with_dashboard(
    case: str, body: Body, start: Callable[[], ContextManager[OperationsCoordinator]] | None = None
) -> Figures:
    """Run ``body`` under the case's dashboard set-up; add the snapshot count and the share of
    the run's wall time the server thread spent on a CPU (its direct cost, free of the
    machine's run-to-run noise that the wall-time ratio carries). ``body`` gets the dashboard's
    server (None without one). ``start``: the coordinator, started as the scenario the load
    comes from starts it (a default one if None)."""
    from tokengate import OperationsCoordinator

    with (start or OperationsCoordinator)() as coordinator:
        if case == "off":
            return {**body(None), "snapshots": 0, "server_cpu_pct": 0.0}
        url = coordinator.serve_dashboard()
        server = coordinator._dashboards.servers[0]
        page = None
        if case == "page-open":
            page = subprocess.Popen([sys.executable, "-c", _READER, url])
            deadline = time.monotonic() + 30
            while _health(url)["clients"] < 1:  # the page is connected before the clock starts
                if time.monotonic() > deadline or page.poll() is not None:
                    raise AssertionError("the page never connected to the dashboard")
                time.sleep(0.05)
        before = _health(url)["samples"]
        clock = _server_clock()
        cpu0, wall0 = time.clock_gettime(clock), time.perf_counter()
        try:
            figures = body(server)
            cpu, wall = time.clock_gettime(clock) - cpu0, time.perf_counter() - wall0
        finally:
            if page is not None:
                page.terminate()
                page.wait(10)
        return {
            **figures,
            "snapshots": _health(url)["samples"] - before,
            "server_cpu_pct": 100.0 * cpu / wall,
        }


def _burst(size: int) -> float:
    """Seconds to submit ``size`` no-op tasks and gather them all (one burst of B1's load).
    As in B1, the burst's tokens are freed after the clock stops (unless a deque still holds
    them: then a later token's completion frees them, inside a later burst's time)."""
    from tokengate.bench._tasks import noop

    start = time.perf_counter()
    tokens = [noop(i) for i in range(size)]
    for token in tokens:
        token.get(timeout=RESULT_TIMEOUT_S)
    return time.perf_counter() - start


def _warm_up(size: int) -> None:
    """B1's load, the clock not running: :data:`WARM_UP` tasks, then bursts of ``size`` until
    :data:`WARM_UP_S` seconds have passed."""
    deadline = time.perf_counter() + WARM_UP_S
    _burst(WARM_UP)
    while time.perf_counter() < deadline:
        _burst(size)


def measure_case(case: str, n: int, bursts: int = BURSTS) -> Figures:
    """B1's load, ``n`` noop tasks in ``bursts`` bursts (submit a burst, gather it) under the
    case's dashboard: the run's rate, and what the bursts a snapshot fell in cost beyond the
    others (:func:`snapshot_cost`)."""

    size = max(1, n // bursts)

    def body(server: DashboardServer | None) -> Figures:
        _warm_up(size)
        spans: list[Span] = []
        for _ in range(bursts):
            start = time.perf_counter()
            spans.append((start, start + _burst(size)))
        windows = list(server.snapshot_windows) if server is not None else []
        elapsed, tasks = sum(end - start for start, end in spans), size * bursts
        return {
            "tasks_per_s": tasks / elapsed,
            "us_per_task": elapsed * 1e6 / tasks,
            "snapshot_cost_pct": snapshot_cost(overlapped(spans, windows)),
        }

    return _with_dashboard(case, body)


def measure_recent_tokens(
    case: str, n: int, bursts: int = BURSTS, registry: RecentTokens | None = None
) -> Figures:
    """B1's load in ``bursts`` bursts, no dashboard, with the recording of ended tokens that a
    page's look switches on (``RecentTokens``, run by a thread as the server runs it: a slice
    of runs each quarter second, absorbed) switched on for one burst of each pair, which one
    drawn at random (so nothing that recurs every other burst, or every few, counts as its
    cost): ``recent_cost_pct`` is :func:`paired_cost` over the pairs, in one process.
    ``recent-null`` draws the same bursts but never switches it on: what the reading is with
    nothing to find. ``registry``: the one to switch on (one of the dashboard's defaults if
    None)."""
    from tokengate import OperationsCoordinator
    from tokengate.dashboard._registry import RecentTokens

    size = max(1, n // bursts)
    draw = random.Random()
    chosen = [
        on
        for _ in range(bursts // 2)
        for on in ((True, False) if draw.random() < 0.5 else (False, True))
    ]
    times: list[float] = []
    registry = registry if registry is not None else RecentTokens()
    with OperationsCoordinator() as coordinator:
        registry.attach(coordinator)
        with _Recording(registry):  # as a page's server samples it, through the warm-up
            _warm_up(size)
        registry.pause()
        for on in chosen:
            registry.absorb()
            if on and case == "recent-tokens":
                with _Recording(registry):
                    times.append(_burst(size))
            else:
                times.append(_burst(size))
        registry.detach()
    # Each pair as (the burst with the recording, the burst without), whichever ran first.
    pairs = [
        (times[i], times[i + 1]) if chosen[i] else (times[i + 1], times[i])
        for i in range(0, len(chosen), 2)
    ]
    elapsed, tasks = sum(times), size * len(chosen)
    return {
        "tasks_per_s": tasks / elapsed,
        "us_per_task": elapsed * 1e6 / tasks,
        "recent_cost_pct": paired_cost(pairs),
    }


class _Recording:
    """A thread recording runs into ``registry`` as the dashboard's server does while a page
    looks (:meth:`RecentTokens.cycle`), from ``with`` to its end."""

    def __init__(self, registry: RecentTokens) -> None:
        from tokengate.dashboard._server import ABSORB_EVERY

        self._registry = registry
        self._period = ABSORB_EVERY
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dash-recording", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pause in self._registry.cycle(self._period):
                if self._stop.wait(pause):
                    break

    def __enter__(self) -> _Recording:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._registry.pause()


def paired_cost(pairs: Sequence[tuple[float, float]], trim: float = 0.1) -> float:
    """What the change costs (%), from pairs of adjacent bursts ``(with it, without it)``: the
    geometric mean of the pairs' ratios, leaving out the ``trim`` share of the lowest and of the
    highest. A pair compares bursts a moment apart, so slow drift cancels. Not the median ratio:
    the bursts' times are bimodal (a full garbage collection, or the machine's neighbour, lands
    in some bursts and not others), so the ratios cluster around 1 + g and 1 / (1 + g), and
    their median jumps from one cluster to the other with the luck of the draw, where their
    mean, trimmed of the rare outliers, stays between them. 0.0 without pairs."""
    if not pairs:
        return 0.0
    logs = sorted(math.log(with_it / without) for with_it, without in pairs)
    cut = int(len(logs) * trim)
    kept = logs[cut : len(logs) - cut] or logs
    return 100.0 * (math.exp(statistics.fmean(kept)) - 1)


def overlapped(spans: Sequence[Span], windows: Sequence[Span]) -> list[tuple[float, bool]]:
    """Each span's length, and whether any of ``windows`` (in order, disjoint) overlapped it."""
    starts = [start for start, _ in windows]
    marked = []
    for start, end in spans:
        last = bisect.bisect_left(starts, end) - 1  # the last window that began before the end
        marked.append((end - start, last >= 0 and windows[last][1] > start))
    return marked


def snapshot_cost(times: list[tuple[float, bool]]) -> float:
    """The share of a run's time (%) the snapshots cost: every burst a snapshot was built
    during (``True``) counted as its excess over the mean burst without one; 0.0 if there is no
    burst of either kind to compare. A snapshot is marked in every burst its build overlapped,
    not only the one it began in: under B1's load a build waits for the interpreter between its
    sections and spans tens of milliseconds, as long as a burst. A burst that ran long for any
    reason is likelier to be overlapped (overstating the cost a little)."""
    hit = [t for t, snapped in times if snapped]
    miss = [t for t, snapped in times if not snapped]
    if not hit or not miss:
        return 0.0
    excess = len(hit) * (statistics.fmean(hit) - statistics.fmean(miss))
    return 100.0 * excess / sum(t for t, _ in times)


def measure_case_b6(case: str, seconds: int) -> Figures:
    """B6's waves for ``seconds`` under the case's dashboard; with a page open, what its
    snapshots cost the latencies inside the run (:func:`snapshot_tail_cost`)."""
    from tokengate.bench._b6_mixed import drive, started_coordinator

    def body(server: DashboardServer | None) -> Figures:
        spans: list[Span] = []
        figures = drive(lambda fn, args: fn(*args), seconds, spans)
        if server is None or case != "page-open":
            return figures
        windows = list(server.snapshot_windows)
        return {**figures, **snapshot_tail_cost(spans, windows, server.refresh)}

    return _with_dashboard(case, body, started_coordinator)


def _untouched(spans: Sequence[Span], windows: Sequence[Span]) -> list[float]:
    """The latencies of the tasks that no window overlapped (``windows`` in order, disjoint)."""
    return [latency for latency, touched in overlapped(spans, windows) if not touched]


def snapshot_tail_cost(spans: Sequence[Span], windows: Sequence[Span], period: float) -> Figures:
    """What a page's snapshots cost B6's latencies, measured inside one run: a task a snapshot
    was built during (its window overlapped the task's span) may have waited for it.

    The tasks no snapshot overlapped stand for the run without the page; but they are not an
    unbiased sample of it, since a long task is likelier to overlap a window than a short one.
    So the same tasks are also filtered by stand-in windows of the same lengths a third and two
    thirds of a ``period`` later, where no snapshot was built: the excess of their p50/p95 over
    the p50/p95 of the tasks no real window overlapped is the cost (``p50_cost_pct``,
    ``p95_cost_pct``, in %), the bias cancelling. ``touched_pct``: the share of tasks a
    snapshot overlapped. Empty without windows or tasks."""
    if not spans or not windows:
        return {}
    real = _untouched(spans, windows)
    stand_ins = [
        _untouched(spans, [(a + k * period, b + k * period) for a, b in windows])
        for k in PHANTOM_SHIFTS
    ]
    figures: Figures = {"touched_pct": 100.0 * (1 - len(real) / len(spans))}
    for q in (50, 95):
        mine = percentile(real, q)
        reference = statistics.fmean(percentile(s, q) for s in stand_ins)
        figures[f"p{q}_cost_pct"] = 100.0 * (reference / mine - 1) if mine else 0.0
    return figures


_CASES: tuple[tuple[str, str, SystemKind, str], ...] = (
    ("off", "reference: no dashboard", "peer", "OperationsCoordinator() defaults"),
    ("served", "dashboard served", "tokengate", "serve_dashboard(), no page open"),
    (
        "page-open",
        "dashboard, page open",
        "tokengate",
        "serve_dashboard() and one page streaming snapshots (every 0.9 s) from another process",
    ),
)


def _measure_b1(case: str, p: CaseParams) -> Figures:
    return measure_case(case, p.n)


def _measure_b6(case: str, p: CaseParams) -> Figures:
    return measure_case_b6(case, p.n)


_RECENT_CASES: tuple[tuple[str, str, SystemKind, str], ...] = (
    (
        "recent-tokens",
        "recent-tokens recording, half the bursts",
        "tokengate",
        "no dashboard; the recording of ended tokens a page's look switches on, on for one "
        "burst of each pair (drawn at random): recent cost % is its cost in that run",
    ),
    (
        "recent-null",
        "recent-tokens recording, never (the measure's null)",
        "tokengate",
        "as recent-tokens with the recording never on: what recent cost % reads with nothing "
        "to find",
    ),
)


def _measure_recent(case: str, p: CaseParams) -> Figures:
    return measure_recent_tokens(case, p.n)


def _systems(
    measure: Callable[[str, CaseParams], Figures],
    cases: tuple[tuple[str, str, SystemKind, str], ...] = _CASES,
) -> tuple[System, ...]:
    def make(case: str, label: str, kind: SystemKind, note: str) -> System:
        def run(p: CaseParams) -> Figures:
            return measure(case, p)

        return System(case, label, run, kind=kind, note=note)

    return tuple(make(*case) for case in cases)


SCENARIO = Scenario(
    id="DASH",
    title="dashboard overhead (B1 load)",
    description=(
        f"noop(i) tasks in {BURSTS} bursts per run (submit a burst, gather it; {WARM_UP_S} s "
        "of the same load first, clock stopped); the reference row (shown as the peer) has no "
        "dashboard, so the ratio on µs/task is the overhead across runs; snapshot cost % "
        "compares, within each run, the "
        "bursts a snapshot's build overlapped with the others; recent cost % each burst with "
        "the page's recording of ended tokens on against its pair's burst without (trimmed "
        "geometric mean of the pairs), in one process"
    ),
    figures=(
        Figure("tasks_per_s", "tasks/s", higher_is_better=True),
        Figure("us_per_task", "µs/task", higher_is_better=False),
        Figure("snapshots", "snapshots", kind="count"),
        Figure("server_cpu_pct", "server CPU %", higher_is_better=False),
        Figure("snapshot_cost_pct", "snapshot cost %", higher_is_better=False),
        Figure("recent_cost_pct", "recent cost %", higher_is_better=False),
    ),
    headline="us_per_task",
    n=300_000,  # 60 bursts of 5,000: a few seconds, a few snapshots per run
    quick_n=30_000,
    min_runs=15,  # a 3 % target against ±10 % run-to-run noise: many runs, interleaved
    systems=_systems(_measure_b1) + _systems(_measure_recent, _RECENT_CASES),
)

SCENARIO_B6 = Scenario(
    id="DASHB6",
    title="dashboard overhead (B6 seed mixed load)",
    description=(
        "B6's waves (the Quick-Proof's Proof 3 load); the reference row (shown as the peer) has no "
        "dashboard, so the ratios on p50 and p95 are the overhead across runs; snapshot p50/p95 "
        "cost % compares, within each run, the tasks no snapshot overlapped with the tasks no "
        "stand-in window of the same lengths overlapped"
    ),
    figures=(
        Figure("submitted", "submitted", kind="count"),
        Figure("p50_ms", "p50 ms", higher_is_better=False),
        Figure("p95_ms", "p95 ms", higher_is_better=False),
        Figure("snapshots", "snapshots", kind="count"),
        Figure("server_cpu_pct", "server CPU %", higher_is_better=False),
        Figure("touched_pct", "tasks touched %", higher_is_better=False),
        Figure("p50_cost_pct", "snapshot p50 cost %", higher_is_better=False),
        Figure("p95_cost_pct", "snapshot p95 cost %", higher_is_better=False),
    ),
    headline="p95_ms",
    n=60,
    quick_n=10,
    n_label="seconds",
    timeout=180.0,
    quick_timeout=90.0,
    systems=_systems(_measure_b6),
)
