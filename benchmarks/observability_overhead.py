"""B1 with observability on and off, and with logging off vs on-but-filtered.

B1: ``N`` (100,000) calls of a light ``noop(i)`` task, all submitted, then every token gathered;
the figure is tasks/s over that whole span. Each case runs in a fresh interpreter (so no case
inherits another's threads, caches or heap), ``--reps`` times (3), the cases interleaved round
robin so slow drift of the machine spreads over all of them. Reported: median tasks/s and
µs/task, the range (min-max), and the overhead of the median against the reference cases
(and that of the best runs, the least disturbed by a noisy machine).

Cases (``--cases`` picks some):

=================  ========================================================================
bare               guard_house=False, overflow_guard=False: no observability at all
default            the defaults: Guard House passive monitor + Overflow Guard sampler
full               defaults + trace=True + serve_metrics() scraped over HTTP every second
log-disabled       defaults, logging.disable(CRITICAL): logging off
log-filtered       defaults, root handler at WARNING: logging on but every tokengate line
                   filtered (what "logging on in production" usually means)
log-debug          defaults, tokengate at DEBUG into a file handler (/dev/null): the cost of
                   actually emitting the routing and completion lines (informative)
=================  ========================================================================

Run: ``.venv/bin/python benchmarks/observability_overhead.py`` (``--json out.json`` to keep
the numbers). A harness can import :func:`run_cases` and :func:`summarise`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

CASES = ("bare", "default", "full", "log-disabled", "log-filtered", "log-debug")
# case -> the cases its overhead is reported against (medians of µs/task, and of the best runs)
REFERENCES: dict[str, tuple[str, ...]] = {
    "default": ("bare",),
    "full": ("bare", "default"),
    "log-filtered": ("log-disabled",),
    "log-debug": ("log-disabled",),
}


def _child(case: str, n: int) -> dict[str, Any]:
    """Run one case in this (fresh) interpreter and return its measurement."""
    import logging

    from tokengate import OperationsCoordinator, task_token_guard

    options: dict[str, Any] = {}
    if case == "bare":
        options = {"guard_house": False, "overflow_guard": False}
    elif case == "full":
        options = {"trace": True}
    elif case == "log-disabled":
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

    @task_token_guard(operation_type="noop", tags={"weight": "light"})
    def noop(i: int) -> int:
        return i

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
                    if stop.wait(1.0):
                        return

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
        for i in range(1000):  # warm up: threads started, code paths and caches hot
            noop(i).get(timeout=60)
        start = time.perf_counter()
        tokens = [noop(i) for i in range(n)]
        for token in tokens:
            token.get(timeout=120)
        elapsed = time.perf_counter() - start
        stop.set()
        if scraper is not None:
            scraper.join(15)
        snap = coordinator.stats()
        assert snap.resolved == n + 1000, str(snap)
        spans = len(coordinator.trace_spans()) if case == "full" else 0
    return {
        "case": case,
        "n": n,
        "seconds": elapsed,
        "tasks_per_s": n / elapsed,
        "us_per_task": elapsed * 1e6 / n,
        "scrapes": scrapes,
        "trace_spans": spans,
    }


def run_cases(cases: list[str], n: int, reps: int, *, quiet: bool = False) -> dict[str, list[Any]]:
    """Each case ``reps`` times, each run in a fresh subprocess, interleaved round robin."""
    results: dict[str, list[Any]] = {case: [] for case in cases}
    for rep in range(reps):
        for case in cases:
            out = subprocess.run(
                [sys.executable, __file__, "--child", case, "--n", str(n)],
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[case].append(result)
            if not quiet:
                print(
                    f"  rep {rep + 1}/{reps}  {case:<13} {result['tasks_per_s']:>10,.0f} tasks/s"
                    f"  {result['us_per_task']:6.2f} µs/task",
                    flush=True,
                )
    return results


def summarise(results: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for case, runs in results.items():
        rates = [r["tasks_per_s"] for r in runs]
        us = [r["us_per_task"] for r in runs]
        summary[case] = {
            "median_tasks_per_s": statistics.median(rates),
            "min_tasks_per_s": min(rates),
            "max_tasks_per_s": max(rates),
            "median_us_per_task": statistics.median(us),
            "min_us_per_task": min(us),
            "max_us_per_task": max(us),
        }
    for case, references in REFERENCES.items():
        for reference in references:
            if case in summary and reference in summary:
                ours, theirs = summary[case], summary[reference]
                ours[f"overhead_pct_vs_{reference}"] = 100.0 * (
                    ours["median_us_per_task"] / theirs["median_us_per_task"] - 1
                )
                ours[f"best_overhead_pct_vs_{reference}"] = 100.0 * (
                    ours["min_us_per_task"] / theirs["min_us_per_task"] - 1
                )
    return summary


def render(summary: dict[str, dict[str, Any]], n: int, reps: int) -> str:
    lines = [
        f"B1 observability overhead: {n:,} noop tasks, submit all then gather; median of {reps} "
        f"fresh processes per case (range min-max); {os.cpu_count()} CPUs, Python "
        f"{sys.version.split()[0]}",
        "",
        "| case | tasks/s (median) | range | µs/task (median) | range | overhead (medians) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, s in summary.items():
        overhead = (
            "; ".join(
                f"{s[f'overhead_pct_vs_{ref}']:+.1f}% vs {ref} (best runs "
                f"{s[f'best_overhead_pct_vs_{ref}']:+.1f}%)"
                for ref in REFERENCES.get(case, ())
                if f"overhead_pct_vs_{ref}" in s
            )
            or "—"
        )
        lines.append(
            f"| {case} | {s['median_tasks_per_s']:,.0f} | {s['min_tasks_per_s']:,.0f}-"
            f"{s['max_tasks_per_s']:,.0f} | {s['median_us_per_task']:.2f} | "
            f"{s['min_us_per_task']:.2f}-{s['max_us_per_task']:.2f} | {overhead} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="tasks per run (100,000)")
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per case (3)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--json", help="also write the raw runs and the summary here")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.n)))
        return 0
    results = run_cases(args.cases, args.n, args.reps)
    summary = summarise(results)
    print()
    print(render(summary, args.n, args.reps))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"n": args.n, "reps": args.reps, "runs": results, "summary": summary}, f, indent=2
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
