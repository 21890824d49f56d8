"""``tokengate bench``: run every (scenario, system) case in a fresh process, a few times.

    for each scenario, repeat times (at least the scenario's min_runs), for each system:
        python -m tokengate.bench._case <scenario> <system> --n N [--quick]
            -> one JSON line (or a timeout: the case's process group is killed)
    -> median and [min–max] of each figure, tokengate's ratio to the best peer
    -> one table per scenario; --json FILE; --write-markdown FILE

Nothing a case does can stop the run: a missing peer is "not installed", a crash is an error
with its message, a hang is killed at the per-case timeout. A case that timed out or is not
installed is not repeated (the outcome would only cost the same again).

A scenario's cases run in rounds (each system once, then each again), not one system's runs in
a row: a machine that slows down or speeds up during the scenario then shifts every system's
runs alike, and the same-run ratios stay fair.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.util
import json
import os
import shlex
import signal
import site
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tokengate
from tokengate.bench._model import Scenario, System
from tokengate.bench._report import (
    compare,
    machine_info,
    render_markdown,
    render_rich,
    render_text,
    summarize_case,
)
from tokengate.bench._scenarios import SCENARIOS, get_scenario
from tokengate.cli._outputs import output_problem

__all__ = ["CaseExecutor", "main", "run_benchmarks", "run_case_subprocess"]

Record = dict[str, Any]
#: (scenario, system, n, quick, timeout) -> one run's record.
CaseExecutor = Callable[[Scenario, System, int, bool, float], Record]

DEFAULT_TIMEOUT_S, QUICK_TIMEOUT_S = 300.0, 60.0
DEFAULT_REPEAT = 3
#: Outcomes that would only repeat themselves: not worth running again.
FINAL = ("not installed", "timeout")
_RESULT_GRACE_S = 10.0


def _child_env() -> dict[str, str]:
    """The case imports the same tokengate as this process, installed or run from a checkout.

    The directory holding the package goes first on ``PYTHONPATH`` unless it is a site-packages
    directory (putting one of those ahead of the standard library could shadow it).
    """
    env = dict(os.environ)
    home = Path(tokengate.__file__).resolve().parent.parent
    site_dirs = {Path(p).resolve() for p in (*site.getsitepackages(), site.getusersitepackages())}
    if home not in site_dirs:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(home), env.get("PYTHONPATH")) if p)
    return env


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the case and whatever it started (pools, clusters): its own process group."""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    else:  # pragma: no cover - Windows
        proc.kill()


def _parse_result(stdout: str) -> Record | None:
    for raw in reversed(stdout.splitlines()):
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "status" in record:
            return record
    return None


def _tail(text: str, lines: int = 1) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(kept[-lines:]) if kept else "(no output)"


def run_case_subprocess(
    scenario: Scenario,
    system: System,
    n: int,
    quick: bool,
    timeout: float,
    *,
    address: str | None = None,
) -> Record:
    """Run one case in a fresh interpreter; never raises for what the case does.

    ``address``: a Dask scheduler the case's Dask systems connect to (``--address``)."""
    cmd = [sys.executable, "-m", "tokengate.bench._case", scenario.id, system.key, "--n", str(n)]
    if quick:
        cmd.append("--quick")
    if address is not None:
        cmd += ["--address", address]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Still running: a real timeout. Already exited: something it started holds the pipes.
        timed_out = proc.poll() is None
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=_RESULT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", "(the case's output pipes stayed open after it was killed)"
    elapsed = time.perf_counter() - started
    record = _parse_result(out)
    if record is None:
        record = {"scenario": scenario.id, "system": system.key, "n": n, "figures": {}}
        if timed_out:
            record["status"] = system.timeout_status
            record["error"] = f"no result within {timeout:g} s; the case's processes were killed"
        else:
            record["status"] = "error"
            record["error"] = (
                f"the case process exited with code {proc.returncode} and no result: {_tail(err)}"
            )
    elif timed_out:
        record["exit"] = f"did not exit within {timeout:g} s after its result; killed"
    if record["status"] == "error":
        record["stderr_tail"] = _tail(err, 20)
    record["elapsed_s"] = elapsed
    return record


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_benchmarks(
    scenarios: Sequence[Scenario],
    *,
    quick: bool = False,
    repeat: int = DEFAULT_REPEAT,
    timeout: float | None = None,
    systems: Sequence[str] | None = None,
    execute: CaseExecutor = run_case_subprocess,
    progress: Callable[[str], None] = _progress,
    command: str = "tokengate bench",
    backend: str = "local",
) -> Record:
    """Run the cases and return the full report (the dict ``--json`` writes).

    ``backend="local"`` leaves out the tokengate systems that run on the Dask backend;
    ``backend="dask"`` runs only the scenarios that have one, with all their systems (the local
    tokengate beside it, and the peers)."""
    default_timeout = QUICK_TIMEOUT_S if quick else DEFAULT_TIMEOUT_S
    report: Record = {
        "tool": "tokengate bench",
        "format": 1,
        "command": command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "options": {
            "quick": quick,
            "repeat": repeat,
            "timeout_s": timeout,
            "only": [s.id for s in scenarios],
            "systems": list(systems) if systems else None,
            "backend": backend,
        },
        "scenarios": [],
    }
    for scenario in scenarios:
        chosen = [s for s in backend_systems(scenario, backend) if not systems or s.key in systems]
        if not chosen:
            continue
        rounds = max(repeat, scenario.min_runs)
        runs = _run_rounds(
            scenario, chosen, quick, timeout, default_timeout, rounds, execute, progress
        )
        cases = [
            summarize_case(scenario, system, n, limit, system_runs)
            for system, (n, limit, system_runs) in zip(chosen, runs, strict=True)
        ]
        report["scenarios"].append(
            {
                "id": scenario.id,
                "title": scenario.title,
                "description": scenario.description,
                "n_label": scenario.n_label,
                "rounds": rounds,
                "headline": _figure_dict(scenario, scenario.headline),
                "figures": [_figure_dict(scenario, f.key) for f in scenario.all_figures()],
                "notes": list(scenario.notes),
                "cases": cases,
                "ratios": compare(scenario, cases),
            }
        )
    return report


def backend_systems(scenario: Scenario, backend: str) -> list[System]:
    """The systems of ``scenario`` that ``tokengate bench --backend <backend>`` runs."""
    if backend == "local":
        return [s for s in scenario.systems if s.backend == "local"]
    if any(s.backend == backend for s in scenario.systems):
        return list(scenario.systems)
    return []


def _run_rounds(
    scenario: Scenario,
    systems: Sequence[System],
    quick: bool,
    timeout: float | None,
    default_timeout: float,
    rounds: int,
    execute: CaseExecutor,
    progress: Callable[[str], None],
) -> list[tuple[int, float, list[Record]]]:
    """Each system's (n, time limit, runs): ``rounds`` rounds of one run per system, a system
    leaving the rounds once its outcome is final (not installed, timed out)."""
    cases: list[tuple[int, float, list[Record]]] = []
    for system in systems:
        n = system.task_count(scenario, quick=quick)
        limit = timeout
        if limit is None:
            limit = system.time_limit(scenario, quick=quick, default=default_timeout)
        cases.append((n, limit, _not_installed(scenario, system, n, progress)))
    for i in range(rounds):
        for system, (n, limit, runs) in zip(systems, cases, strict=True):
            if runs and runs[-1].get("status") in FINAL:
                continue
            record = execute(scenario, system, n, quick, limit)
            runs.append(record)
            status = record.get("status")
            took = record.get("elapsed_s")
            took_text = f" in {took:.1f} s" if isinstance(took, float) else ""
            detail = f": {record.get('error')}" if status != "ok" else ""
            progress(
                f"[{scenario.id}] {system.label} run {i + 1}/{rounds}: {status}{took_text}{detail}"
            )
    return cases


def _not_installed(
    scenario: Scenario, system: System, n: int, progress: Callable[[str], None]
) -> list[Record]:
    """The one record of a system whose modules are missing (no run), or no record."""
    missing = [m for m in system.requires if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    error = f"needs {', '.join(missing)}"
    progress(f"[{scenario.id}] {system.label}: not installed ({error})")
    return [
        {
            "scenario": scenario.id,
            "system": system.key,
            "n": n,
            "status": "not installed",
            "figures": {},
            "error": error,
        }
    ]


def _figure_dict(scenario: Scenario, key: str) -> Record:
    fig = scenario.figure(key)
    return {
        "key": fig.key,
        "label": fig.label,
        "higher_is_better": fig.higher_is_better,
        "kind": fig.kind,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokengate bench",
        description=(
            "Run tokengate's benchmark scenarios side by side with its peers, each case in a "
            "fresh process, and print one table per scenario with tokengate's ratio to the "
            "best peer."
        ),
        epilog=(
            "Exit status: 0 when every tokengate case produced figures (peers that fail or are "
            "not installed are reported, not fatal); 1 when a tokengate case failed; 2 for bad "
            "options."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="scaled-down scenarios, still every case and peer: several minutes (10 min 50 s "
        "measured on a busy 2-core machine); add --repeat 1 or --only B1,B6 for a first look",
    )
    parser.add_argument(
        "--only", metavar="IDS", help="comma-separated scenario ids, e.g. B1,B4 (default: all)"
    )
    parser.add_argument(
        "--systems",
        metavar="KEYS",
        help="comma-separated system keys to run (see --list; default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        metavar="N",
        help=f"runs per case; medians and ranges over them (default {DEFAULT_REPEAT})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"per-case timeout in seconds, overriding every default "
        f"(default {DEFAULT_TIMEOUT_S:g}, quick {QUICK_TIMEOUT_S:g}, "
        "or the scenario's own)",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        type=Path,
        help="write every figure (raw runs, medians, ranges, ratios) as JSON",
    )
    parser.add_argument(
        "--write-markdown",
        metavar="FILE",
        type=Path,
        help="write the tables as Markdown (the project's BENCHMARKS.md)",
    )
    parser.add_argument(
        "--plain", action="store_true", help="plain-text tables even when rich is installed"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the scenarios and their systems, then exit"
    )
    parser.add_argument(
        "--backend",
        choices=("local", "dask"),
        default="local",
        help="local (default): tokengate's own lanes; dask: the scenarios that have a Dask-backend "
        "case (B1 against raw client.submit, B6 beside the local backend), with their peers",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="with --backend dask: a running Dask scheduler (tcp://host:8786) for every Dask "
        "case, tokengate's and the peers', instead of a LocalCluster started per case",
    )
    return parser


def _select(parser: argparse.ArgumentParser, only: str | None) -> list[Scenario]:
    if not only:
        return list(SCENARIOS.values())
    chosen = []
    for raw in only.split(","):
        try:
            chosen.append(get_scenario(raw))
        except KeyError:
            parser.error(f"--only: no scenario {raw.strip()!r}; known: {', '.join(SCENARIOS)}")
    return chosen


def _listing() -> str:
    lines = []
    for sc in SCENARIOS.values():
        lines.append(f"{sc.id} {sc.title}: {sc.description}")
        for s in sc.systems:
            needs = f"  (needs {', '.join(s.requires)})" if s.requires else ""
            only = f"  [--backend {s.backend}]" if s.backend != "local" else ""
            lines.append(f"    {s.key:<24} {s.label}{needs}{only}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The ``tokengate bench`` command; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.list:
        sys.stdout.write(_listing())
        return 0
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout:g}")
    if args.address is not None and args.backend != "dask":
        parser.error("--address needs --backend dask")
    scenarios = _select(parser, args.only)
    if args.backend != "local":
        scenarios = [sc for sc in scenarios if backend_systems(sc, args.backend)]
        if not scenarios:
            with_backend = [sc.id for sc in SCENARIOS.values() if backend_systems(sc, args.backend)]
            parser.error(
                f"--backend {args.backend}: none of the chosen scenarios has a case on it; "
                f"those that do: {', '.join(with_backend)}"
            )
    systems = [s.strip() for s in args.systems.split(",")] if args.systems else None
    if systems:
        known = {s.key for sc in scenarios for s in backend_systems(sc, args.backend)}
        unknown = [s for s in systems if s not in known]
        if unknown:
            parser.error(f"--systems: unknown {unknown}; known: {', '.join(sorted(known))}")
    for option, path in (("--json", args.json), ("--write-markdown", args.write_markdown)):
        problem = None if path is None else output_problem(option, path, make_parents=True)
        if problem:  # found now, not after minutes of benchmarks
            parser.error(problem)
    command = shlex.join(["tokengate", "bench", *args_list])
    execute: CaseExecutor = run_case_subprocess
    if args.address is not None:
        execute = functools.partial(run_case_subprocess, address=args.address)
    report = run_benchmarks(
        scenarios,
        quick=args.quick,
        repeat=args.repeat,
        timeout=args.timeout,
        systems=systems,
        execute=execute,
        command=command,
        backend=args.backend,
    )
    if args.plain or not (sys.stdout.isatty() and render_rich(report, sys.stdout)):
        sys.stdout.write(render_text(report) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.write_markdown:
        args.write_markdown.parent.mkdir(parents=True, exist_ok=True)
        args.write_markdown.write_text(render_markdown(report), encoding="utf-8")
    failed = [
        f"{sc['id']} {case['label']}"
        for sc in report["scenarios"]
        for case in sc["cases"]
        if case["kind"] == "tokengate" and case["status"] != "ok"
    ]
    return 1 if failed else 0
