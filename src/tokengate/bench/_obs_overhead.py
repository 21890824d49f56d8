"""OBS and OBSLOG: what observability and logging cost on B1's load.

B1's load: N (100,000) light ``noop(i)`` tasks, all submitted, then every token gathered, after
1,000 warm-up tasks; tasks/s and µs/task over that span. Every row is tokengate; the reference
row (shown as the "peer") is the one with the thing switched off, so "vs best peer" reads as the
overhead: 1.05x on µs/task is 5 % slower than the reference.

OBS, reference ``bare`` (guard_house=False, overflow_guard=False: no observability at all):
``default`` (the Guard House passive monitor and the Overflow Guard sampler) and ``full``
(defaults + trace=True + serve_metrics() scraped over HTTP every second).

OBSLOG, reference ``log-disabled`` (defaults, logging.disable(CRITICAL)): ``log-filtered``
(defaults, root handler at WARNING: logging on but every tokengate line filtered, what "logging
on in production" usually means) and ``log-debug`` (tokengate at DEBUG into a file handler on
/dev/null: the cost of actually emitting the routing and completion lines; informative).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from typing import Any

from tokengate.bench._model import CaseParams, Figure, Figures, Scenario, System, SystemKind

__all__ = ["SCENARIO", "SCENARIO_LOG", "measure_case"]

WARM_UP = 1_000
SCRAPE_EVERY_S = 1.0
RESULT_TIMEOUT_S = 120.0


def _configure(case: str) -> dict[str, Any]:
    """Set logging up for the case; return the coordinator's options."""
    if case == "bare":
        return {"guard_house": False, "overflow_guard": False}
    if case == "full":
        return {"trace": True}
    if case == "log-disabled":
        logging.disable(logging.CRITICAL)
    elif case == "log-filtered":
        logging.basicConfig(level=logging.WARNING, stream=open(os.devnull, "w"))  # noqa: SIM115
    elif case == "log-debug":
        handler = logging.FileHandler(os.devnull)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        tokengate_log = logging.getLogger("tokengate")
        tokengate_log.addHandler(handler)
        tokengate_log.setLevel(logging.DEBUG)
        tokengate_log.propagate = False
    return {}


def measure_case(case: str, n: int) -> Figures:
    """Run one case in this (fresh) interpreter and return its figures."""
    from tokengate import OperationsCoordinator
    from tokengate.bench._tasks import noop

    options = _configure(case)
    scrapes = 0
    with OperationsCoordinator(**options) as coordinator:
        stop = threading.Event()
        scraper = None
        if case == "full":
            port = coordinator.serve_metrics(port=0)

            def scrape() -> None:
                nonlocal scrapes
                url = f"http://127.0.0.1:{port}/metrics"
                while True:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        response.read()
                    scrapes += 1
                    if stop.wait(SCRAPE_EVERY_S):
                        return

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
        for i in range(WARM_UP):  # threads started, code paths and caches hot
            noop(i).get(timeout=60)
        start = time.perf_counter()
        tokens = [noop(i) for i in range(n)]
        for token in tokens:
            token.get(timeout=RESULT_TIMEOUT_S)
        elapsed = time.perf_counter() - start
        stop.set()
        if scraper is not None:
            scraper.join(15)
        snap = coordinator.stats()
        if snap.resolved != n + WARM_UP:
            raise AssertionError(f"resolved {snap.resolved}, expected {n + WARM_UP}: {snap}")
        spans = len(coordinator.trace_spans()) if case == "full" else 0
    return {
        "tasks_per_s": n / elapsed,
        "us_per_task": elapsed * 1e6 / n,
        "scrapes": scrapes,
        "trace_spans": spans,
    }


def _system(case: str, label: str, kind: SystemKind, note: str) -> System:
    def run(p: CaseParams) -> Figures:
        return measure_case(case, p.n)

    return System(case, label, run, kind=kind, note=note)


FIGURES = (
    Figure("tasks_per_s", "tasks/s", higher_is_better=True),
    Figure("us_per_task", "µs/task", higher_is_better=False),
)
_HOW = (
    "noop(i) tasks, submit all then gather (1,000 warm-up tasks first); every row is tokengate, "
    "the reference row (shown as the peer) has {} off, so the ratio on µs/task is the overhead "
    "(1.05x = 5 % slower)"
)

SCENARIO = Scenario(
    id="OBS",
    title="observability overhead",
    description=_HOW.format("all observability"),
    figures=(
        *FIGURES,
        Figure("scrapes", "scrapes", kind="count"),
        Figure("trace_spans", "trace spans", kind="count"),
    ),
    headline="us_per_task",
    n=100_000,
    quick_n=10_000,
    min_runs=9,  # an overhead of a few percent, against ±10 % run-to-run noise
    systems=(
        _system(
            "bare",
            "reference: observability off",
            "peer",
            "guard_house=False, overflow_guard=False",
        ),
        _system(
            "default",
            "defaults",
            "tokengate",
            "OperationsCoordinator() defaults: Guard House monitor + Overflow Guard sampler",
        ),
        _system(
            "full",
            "defaults + trace + metrics",
            "tokengate",
            f"trace=True and serve_metrics() scraped over HTTP every {SCRAPE_EVERY_S:g} s",
        ),
    ),
)

SCENARIO_LOG = Scenario(
    id="OBSLOG",
    title="logging overhead",
    description=_HOW.format("logging"),
    figures=FIGURES,
    headline="us_per_task",
    n=100_000,
    quick_n=10_000,
    systems=(
        _system(
            "log-disabled",
            "reference: logging off",
            "peer",
            "defaults, logging.disable(CRITICAL)",
        ),
        _system(
            "log-filtered",
            "logging on, filtered",
            "tokengate",
            "defaults, root handler at WARNING: every tokengate line filtered",
        ),
        _system(
            "log-debug",
            "tokengate at DEBUG",
            "tokengate",
            "defaults, tokengate logger at DEBUG into a file handler on /dev/null (informative)",
        ),
    ),
)
