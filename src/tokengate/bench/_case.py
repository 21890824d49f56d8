"""Run one (scenario, system) case in this fresh process and print one JSON line.

    python -m tokengate.bench._case B1 threadpool-4 [--quick] [--n N] [--address ADDR]

A fresh interpreter per case is the only honest way to measure peak RSS (a high-water mark
is process-wide) and to keep one system's threads, processes and garbage away from
the next. Whatever happens, the last line of stdout is the JSON result: ``status`` is ``ok``,
``not installed``, ``error`` or ``deadlocked``; anything the system itself prints goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import traceback
from typing import IO, Any

from tokengate.bench._model import CaseParams, Deadlocked, Figures, Scenario, System, usable_cores
from tokengate.bench._rss import peak_rss_kib
from tokengate.bench._scenarios import get_scenario

__all__ = ["main", "measure"]


def _missing(system: System) -> list[str]:
    return [m for m in system.requires if importlib.util.find_spec(m) is None]


def _preload(system: System) -> list[str]:
    modules = list(system.requires)
    if system.kind == "tokengate":
        modules.append("tokengate.bench._tasks")
    return modules


def _memory(n: int, baseline_kib: int) -> Figures:
    peak = peak_rss_kib()
    growth = max(peak - baseline_kib, 0)
    return {
        "peak_rss_mb": peak / 1024,
        "rss_growth_mb": growth / 1024,
        "rss_growth_kb_per_task": growth / n if n else 0.0,
    }


def measure(
    scenario: Scenario,
    system: System,
    *,
    quick: bool,
    n: int | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """Run the system here and now; return the result record (never raises for the system)."""
    count = n if n is not None else system.task_count(scenario, quick=quick)
    record: dict[str, Any] = {
        "scenario": scenario.id,
        "system": system.key,
        "label": system.label,
        "kind": system.kind,
        "n": count,
        "quick": quick,
        "status": "ok",
        "figures": {},
        "error": None,
    }
    missing = _missing(system)
    if missing:
        record.update(status="not installed", error=f"needs {', '.join(missing)}")
        return record
    params = CaseParams(n=count, quick=quick, cores=usable_cores(), address=address)
    baseline = peak_rss_kib()
    try:
        # Imports first, so the RSS growth is the work's, not the modules'.
        for module in _preload(system):
            importlib.import_module(module)
        baseline = peak_rss_kib()
        figures = system.run(params)
    except Deadlocked as stuck:
        record.update(status="deadlocked", error=str(stuck), figures=stuck.figures)
    except ImportError as exc:
        top = (exc.name or "").partition(".")[0]
        if top in system.requires:
            record.update(status="not installed", error=f"needs {top}: {exc}")
        else:
            record.update(status="error", error=_describe(exc), traceback=traceback.format_exc())
    except Exception as exc:
        record.update(status="error", error=_describe(exc), traceback=traceback.format_exc())
    else:
        record["figures"] = figures
    if record["status"] in ("ok", "deadlocked"):
        record["figures"].update(_memory(count, baseline))
    return record


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _result_stream() -> IO[str]:
    """Keep the real stdout for the JSON line; send everything else written to fd 1 to stderr."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokengate.bench._case", description=__doc__)
    parser.add_argument("scenario")
    parser.add_argument("system")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None, help="task count (overrides the default)")
    parser.add_argument(
        "--address", default=None, help="a Dask scheduler for the systems that use Dask"
    )
    args = parser.parse_args(argv)
    scenario = get_scenario(args.scenario)
    system = scenario.system(args.system)
    out = _result_stream()
    record = measure(scenario, system, quick=args.quick, n=args.n, address=args.address)
    record["python"] = platform.python_version()
    record["pid"] = os.getpid()
    out.write(json.dumps(record) + "\n")
    out.flush()
    if record["status"] == "deadlocked":
        # Its threads are stuck for good: interpreter shutdown would join them forever.
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
