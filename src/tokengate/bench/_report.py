"""Turn raw case runs into medians, ranges and ratios, and render them.

Everything here is a pure function of JSON-ready dicts (the same dicts ``--json`` writes), so
the arithmetic is tested without running a benchmark.

A case's summary has, per figure, ``{"median", "min", "max", "runs"}`` for numbers and
``{"yes", "runs"}`` for yes/no figures, over the runs that produced figures (``ok``, and
``deadlocked`` runs for what they got done). The ratio is tokengate's headline median divided by
the best peer's; ``verdict`` reads it in the figure's direction and says ``within noise`` when
the two [min–max] ranges overlap. Floors are shown, never counted as peers.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any

from tokengate.bench._model import Scenario, System, usable_cores

__all__ = [
    "case_status",
    "compare",
    "format_value",
    "machine_info",
    "machine_line",
    "render_markdown",
    "render_rich",
    "render_text",
    "scenario_header",
    "summarize_case",
    "summarize_runs",
    "table",
    "versions_line",
]

Record = dict[str, Any]

#: Statuses whose runs carry figures.
MEASURED = ("ok", "deadlocked")
PEERS = ("loky", "distributed", "dask", "ray", "rich")


# -- arithmetic ---------------------------------------------------------------------------------


def summarize_runs(scenario: Scenario, runs: Sequence[Record]) -> dict[str, Record]:
    """Median and range of each figure over the runs that measured something."""
    measured = [r for r in runs if r.get("status") in MEASURED]
    out: dict[str, Record] = {}
    for fig in scenario.all_figures():
        values = [r["figures"][fig.key] for r in measured if fig.key in r.get("figures", {})]
        if not values:
            continue
        if fig.kind == "bool":
            out[fig.key] = {"yes": sum(1 for v in values if v), "runs": len(values)}
        else:
            nums = [float(v) for v in values]
            out[fig.key] = {
                "median": statistics.median(nums),
                "min": min(nums),
                "max": max(nums),
                "runs": len(nums),
            }
    return out


def case_status(runs: Sequence[Record]) -> tuple[str, str | None]:
    """One status for a case: ``ok`` if any run was, else the worst outcome, with its error."""
    if not runs:
        return "not run", None
    first_error = next((r.get("error") for r in runs if r.get("status") != "ok"), None)
    statuses = [r.get("status", "error") for r in runs]
    if "ok" in statuses:
        return "ok", first_error
    for status in ("deadlocked", "timeout", "error", "not installed"):
        if status in statuses:
            return status, first_error
    return statuses[0], first_error


def summarize_case(
    scenario: Scenario, system: System, n: int, timeout: float, runs: Sequence[Record]
) -> Record:
    status, error = case_status(runs)
    return {
        "system": system.key,
        "label": system.label,
        "kind": system.kind,
        "n": n,
        "note": system.note,
        "timeout_s": timeout,
        "status": status,
        "error": error,
        "runs_ok": sum(1 for r in runs if r.get("status") == "ok"),
        "runs_total": len(runs),
        "summary": summarize_runs(scenario, runs),
        "runs": list(runs),
    }


def _verdict(tg: Record, peer: Record, higher_is_better: bool) -> str:
    if tg["min"] <= peer["max"] and peer["min"] <= tg["max"]:
        return "within noise" if tg["median"] != peer["median"] else "equal"
    tg_ahead = tg["median"] > peer["median"]
    return "better" if tg_ahead == higher_is_better else "worse"


def compare(scenario: Scenario, cases: Sequence[Record]) -> list[Record]:
    """tokengate's ratio to the best peer on the headline figure, one entry per tokengate case
    (or to the peer the system names in ``compare_to``, if that one completed)."""
    head = scenario.figure(scenario.headline)
    higher = bool(head.higher_is_better)
    peers = [
        c for c in cases if c["kind"] == "peer" and c["status"] == "ok" and head.key in c["summary"]
    ]
    best_peer: Record | None = None
    if peers:
        pick = max if higher else min
        best_peer = pick(peers, key=lambda c: c["summary"][head.key]["median"])
    by_key = {c["system"]: c for c in peers}
    out: list[Record] = []
    for case in cases:
        if case["kind"] != "tokengate":
            continue
        best = best_peer
        with contextlib.suppress(KeyError):
            best = by_key.get(scenario.system(case["system"]).compare_to or "", best_peer)
        entry: Record = {
            "system": case["system"],
            "label": case["label"],
            "figure": head.key,
            "higher_is_better": higher,
            "value": None,
            "best_peer": best["system"] if best else None,
            "best_peer_label": best["label"] if best else None,
            "peer_value": None,
            "ratio": None,
            "verdict": None,
        }
        mine = case["summary"].get(head.key) if case["status"] == "ok" else None
        if best is not None:
            entry["peer_value"] = best["summary"][head.key]["median"]
        if mine is None:
            entry["verdict"] = f"no tokengate result ({case['status']})"
        elif best is None:
            entry["value"] = mine["median"]
            entry["verdict"] = "no peer completed"
        else:
            theirs = best["summary"][head.key]
            entry["value"] = mine["median"]
            entry["ratio"] = mine["median"] / theirs["median"] if theirs["median"] else None
            entry["verdict"] = _verdict(mine, theirs, higher)
        out.append(entry)
    return out


# -- the machine --------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> Record:
    gil_probe = getattr(sys, "_is_gil_enabled", None)  # 3.13+; before that the GIL is on
    gil = "off" if gil_probe is not None and not gil_probe() else "on"
    return {
        "cores_usable": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "python_implementation": platform.python_implementation(),
        "python_version": platform.python_version(),
        "gil": gil,
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "versions": {name: _version(name) for name in ("tokengate", *PEERS)},
    }


def machine_line(machine: Record) -> str:
    return (
        f"machine: {machine['cores_usable']} usable cores (os.sched_getaffinity; "
        f"{machine['logical_cpus']} logical CPUs), {machine['python_implementation']} "
        f"{machine['python_version']}, GIL {machine['gil']}, {machine['platform']}"
    )


def versions_line(machine: Record) -> str:
    """tokengate's and the optional peers' versions; a missing peer says so."""
    versions = machine.get("versions", {})
    parts = [f"{name} {version or 'not installed'}" for name, version in versions.items()]
    return "versions: " + ", ".join(parts)


# -- formatting ---------------------------------------------------------------------------------


def format_value(value: float) -> str:
    """About three significant figures: 1.25M / 92.2k / 1,234 / 24.4 / 6.47 / 0.133."""
    size = abs(value)
    for suffix, scale, floor in (("M", 1e6, 999_500.0), ("k", 1e3, 9_999.5)):
        if size >= floor:
            text = f"{value / scale:.3g}"
            return text + suffix if "e" not in text else f"{value:,.0f}"
    if size >= 99.95:
        return f"{value:,.0f}"
    if size >= 9.995:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    if size == 0:
        return "0"
    return f"{value:.3g}"


def _count(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def _cell(summary: Record | None, kind: str) -> str:
    if summary is None:
        return "—"
    if kind == "bool":
        yes, runs = summary["yes"], summary["runs"]
        if yes == runs:
            return "yes"
        return "no" if yes == 0 else f"{yes}/{runs}"
    fmt = _count if kind == "count" else format_value
    text = fmt(summary["median"])
    low, high = fmt(summary["min"]), fmt(summary["max"])
    if summary["runs"] > 1 and low != high:  # a range that prints as one value is no range
        text += f" [{low}–{high}]"
    return text


def _status_cell(case: Record) -> str:
    status = case["status"]
    if status == "ok":
        if case["runs_ok"] < case["runs_total"]:
            return f"ok {case['runs_ok']}/{case['runs_total']} runs"
        return "ok"
    if status == "not installed" and case.get("error"):
        return f"not installed ({case['error']})"
    return str(status)


def _ratio_cell(entry: Record | None) -> str:
    if entry is None:
        return ""
    if entry["ratio"] is None:
        return str(entry["verdict"])
    return f"{entry['ratio']:.2f}x {entry['verdict']}"


def table(scenario_report: Record) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of one scenario's table (shared by text, Markdown and rich output)."""
    figures = scenario_report["figures"]
    headers = [
        "system",
        scenario_report["n_label"],
        *(f["label"] for f in figures),
        "status",
        "vs best peer",
    ]
    ratios = {r["system"]: r for r in scenario_report["ratios"]}
    rows = []
    for case in scenario_report["cases"]:
        label = case["label"] + (" (floor)" if case["kind"] == "floor" else "")
        rows.append(
            [
                label,
                f"{case['n']:,}",
                *(_cell(case["summary"].get(f["key"]), f["kind"]) for f in figures),
                _status_cell(case),
                _ratio_cell(ratios.get(case["system"])),
            ]
        )
    return headers, rows


def scenario_header(scenario_report: Record) -> str:
    head = scenario_report["headline"]
    direction = "higher" if head["higher_is_better"] else "lower"
    return (
        f"{scenario_report['id']} {scenario_report['title']}: {scenario_report['description']}. "
        f"Headline: {head['label']} ({direction} is better)."
    )


def _footnotes(scenario_report: Record) -> list[str]:
    lines = []
    head = scenario_report["headline"]
    for entry in scenario_report["ratios"]:
        if entry["ratio"] is None:
            continue
        lines.append(
            f"{entry['label']}: {format_value(entry['value'])} {head['label']} vs best peer "
            f"{entry['best_peer_label']} {format_value(entry['peer_value'])} = "
            f"{entry['ratio']:.2f}x ({entry['verdict']})"
        )
    for case in scenario_report["cases"]:
        if case["note"]:
            lines.append(f"{case['label']}: {case['note']}")
        lines.extend(_run_problems(case))
    lines.extend(scenario_report["notes"])
    return lines


def _run_problems(case: Record) -> list[str]:
    """One line per distinct failed outcome: '1 of 3 runs deadlocked: <first error>'."""
    if case["status"] == "not installed":
        return []
    seen: dict[str, tuple[int, str]] = {}
    for run in case["runs"]:
        status = run.get("status", "error")
        if status == "ok":
            continue
        count, error = seen.get(status, (0, str(run.get("error"))))
        seen[status] = (count + 1, error)
    total = len(case["runs"])
    return [
        f"{case['label']}: {count} of {total} runs {status}: {error}"
        for status, (count, error) in seen.items()
    ]


def _aligned(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Iterable[str]) -> str:
        parts = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            parts.append(cell.ljust(width) if i == 0 or i >= len(widths) - 2 else cell.rjust(width))
        return "  ".join(parts).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def render_text(report: Record) -> str:
    out = [machine_line(report["machine"]), f"command: {report['command']}", ""]
    for sc in report["scenarios"]:
        out.append(scenario_header(sc))
        headers, rows = table(sc)
        out.extend(_aligned(headers, rows))
        out.extend(f"  {line}" for line in _footnotes(sc))
        out.append("")
    return "\n".join(out)


def _md_escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def _repeats(report: Record) -> str:
    """``--repeat``, and the scenarios that ran more rounds (their own minimum)."""
    repeat = report["options"]["repeat"]
    more = [
        f"{sc['id']} {sc['rounds']}"
        for sc in report["scenarios"]
        if sc.get("rounds", repeat) > repeat
    ]
    return f"{repeat}" + (f" ({', '.join(more)}: the scenario's minimum)" if more else "")


def render_markdown(report: Record) -> str:
    out = [
        "# tokengate — benchmark results",
        "",
        "The latest full run of `tokengate bench`. Each case ran in a fresh process, a "
        "scenario's cases in rounds (each system once, then each again, so a machine that "
        "drifts shifts them alike); figures are "
        "medians with the [min–max] range over the runs. Peak RSS is the case's own process "
        '(`VmHWM` on Linux), not worker processes it started. "vs best peer" is tokengate\'s '
        "median divided by the best peer's on the scenario's headline figure (floors are not "
        'peers); "within noise" means the two ranges overlap.',
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- {machine_line(report['machine'])}",
        f"- repeats per case: {_repeats(report)}"
        + (" (quick mode)" if report["options"]["quick"] else ""),
        f"- {versions_line(report['machine'])}",
        "",
    ]
    for sc in report["scenarios"]:
        out.extend([f"## {sc['id']} {sc['title']}", "", scenario_header(sc), ""])
        headers, rows = table(sc)
        out.append("| " + " | ".join(_md_escape(h) for h in headers) + " |")
        align = ["---" if i == 0 or i >= len(headers) - 2 else "---:" for i in range(len(headers))]
        out.append("|" + "|".join(align) + "|")
        out.extend("| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows)
        notes = _footnotes(sc)
        if notes:
            out.append("")
            out.extend(f"- {_md_escape(line)}" for line in notes)
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def render_rich(report: Record, file: IO[str]) -> bool:
    """Print the tables with rich if it is installed; return False (print nothing) if not."""
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        return False
    console = Console(file=file)
    console.print(machine_line(report["machine"]), highlight=False, markup=False)
    console.print(f"command: {report['command']}", highlight=False, markup=False)
    for sc in report["scenarios"]:
        headers, rows = table(sc)
        tab = Table(title=Text(scenario_header(sc)), title_justify="left", highlight=False)
        for i, h in enumerate(headers):
            tab.add_column(Text(h), justify="left" if i == 0 or i >= len(headers) - 2 else "right")
        for row in rows:
            tab.add_row(*(Text(cell) for cell in row))
        console.print(tab)
        for line in _footnotes(sc):
            console.print(f"  {line}", highlight=False, markup=False)
    return True
