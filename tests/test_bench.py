"""The benchmark harness: its arithmetic, its reporting of failures, and real smoke runs.

Runner logic is driven with fake case executors (no processes, no timings); a few real cases run
in subprocesses with timeouts. Nothing here asserts a timing: only that figures exist and that
outcomes are reported as what they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import eventually
from tokengate.bench import _runner, main
from tokengate.bench._case import measure
from tokengate.bench._model import (
    PEAK_RSS,
    CaseParams,
    Deadlocked,
    Figure,
    Figures,
    Scenario,
    System,
)
from tokengate.bench._report import (
    case_status,
    format_value,
    render_markdown,
    render_rich,
    render_text,
    summarize_case,
    summarize_runs,
)
from tokengate.bench._scenarios import SCENARIOS, get_scenario

Record = dict[str, Any]
MISSING_MODULE = "tokengate_bench_no_such_module"


def _never(_: CaseParams) -> Figures:
    raise AssertionError("the fake executor should have run this case")


def _scenario(
    *, higher: bool = True, systems: tuple[System, ...] | None = None, min_runs: int = 1
) -> Scenario:
    return Scenario(
        min_runs=min_runs,
        id="BX",
        title="fake",
        description="a fake scenario",
        figures=(
            Figure("speed", "speed", higher_is_better=higher),
            Figure("done", "done", kind="bool"),
        ),
        headline="speed",
        n=100,
        quick_n=10,
        systems=systems
        or (
            System("tg", "tokengate", _never, kind="tokengate"),
            System("a", "peer A", _never),
            System("b", "peer B", _never, n=50),
            System("floor", "the floor", _never, kind="floor"),
            System("gone", "missing peer", _never, requires=(MISSING_MODULE,)),
        ),
    )


def _run(status: str = "ok", **figures: Any) -> Record:
    return {"status": status, "figures": figures, "error": None if status == "ok" else "boom"}


class FakeExecutor:
    """Hands out canned runs per system key, in order, and records every call."""

    def __init__(self, runs: dict[str, list[Record]]) -> None:
        self.runs = {k: list(v) for k, v in runs.items()}
        self.calls: list[tuple[str, int, bool, float]] = []

    def __call__(
        self, scenario: Scenario, system: System, n: int, quick: bool, timeout: float
    ) -> Record:
        self.calls.append((system.key, n, quick, timeout))
        record = dict(self.runs[system.key].pop(0))
        record.update(scenario=scenario.id, system=system.key, n=n)
        return record


def _standard_runs() -> dict[str, list[Record]]:
    return {
        "tg": [_run(speed=s, done=True) for s in (30.0, 20.0, 25.0)],
        "a": [_run(speed=s, done=True) for s in (5.0, 7.0, 6.0)],
        "b": [_run(speed=s, done=True) for s in (14.0, 12.0, 13.0)],
        "floor": [_run(speed=s, done=True) for s in (100.0, 100.0, 100.0)],
    }


def _bench(scenario: Scenario, execute: FakeExecutor, **kw: Any) -> Record:
    return _runner.run_benchmarks(
        [scenario], execute=execute, progress=lambda _: None, command="tokengate bench", **kw
    )


def _case(report: Record, key: str) -> Record:
    cases = report["scenarios"][0]["cases"]
    return next(c for c in cases if c["system"] == key)


# -- arithmetic -----------------------------------------------------------------------------------


def test_median_and_range_over_ok_runs_only() -> None:
    runs = [_run(speed=30.0), _run(speed=10.0), _run("error"), _run(speed=20.0)]
    summary = summarize_runs(_scenario(), runs)
    assert summary["speed"] == {"median": 20.0, "min": 10.0, "max": 30.0, "runs": 3}


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    runs = [_run(speed=v) for v in (1.0, 4.0, 2.0, 10.0)]
    assert summarize_runs(_scenario(), runs)["speed"]["median"] == 3.0


def test_yes_no_figures_are_counted_and_deadlocked_runs_count() -> None:
    runs = [_run(done=True), _run("deadlocked", done=False), _run(done=True)]
    assert summarize_runs(_scenario(), runs)["done"] == {"yes": 2, "runs": 3}


def test_case_status_prefers_ok_then_the_worst_outcome() -> None:
    assert case_status([_run("error"), _run()]) == ("ok", "boom")
    assert case_status([_run("error"), _run("deadlocked")]) == ("deadlocked", "boom")
    assert case_status([_run("not installed")]) == ("not installed", "boom")


@pytest.mark.parametrize(
    ("higher", "best", "ratio", "verdict"),
    [
        # speed higher is better: best peer is B (13); tokengate 25 / 13, ranges apart -> better
        (True, "b", 25.0 / 13.0, "better"),
        # lower is better: best peer is A (6); tokengate 25 / 6, ranges apart -> worse
        (False, "a", 25.0 / 6.0, "worse"),
    ],
)
def test_ratio_to_the_best_peer_minds_the_direction(
    higher: bool, best: str, ratio: float, verdict: str
) -> None:
    report = _bench(_scenario(higher=higher), FakeExecutor(_standard_runs()))
    (entry,) = report["scenarios"][0]["ratios"]
    assert entry["system"] == "tg"
    assert entry["best_peer"] == best  # never the floor, though its figure is the best
    assert entry["ratio"] == pytest.approx(ratio)
    assert entry["verdict"] == verdict
    assert entry["higher_is_better"] is higher


def test_overlapping_ranges_are_within_noise() -> None:
    runs = _standard_runs()
    runs["b"] = [_run(speed=s, done=True) for s in (9.0, 25.0, 15.0)]
    report = _bench(_scenario(), FakeExecutor(runs))
    (entry,) = report["scenarios"][0]["ratios"]
    assert entry["verdict"] == "within noise"


def test_no_ratio_when_tokengate_failed_or_no_peer_ran() -> None:
    runs = _standard_runs()
    runs["tg"] = [_run("error")] * 3
    (entry,) = _bench(_scenario(), FakeExecutor(runs))["scenarios"][0]["ratios"]
    assert entry["ratio"] is None
    assert entry["verdict"] == "no tokengate result (error)"

    only_tg = _scenario(systems=(System("tg", "tokengate", _never, kind="tokengate"),))
    (entry,) = _bench(only_tg, FakeExecutor({"tg": _standard_runs()["tg"]}))["scenarios"][0][
        "ratios"
    ]
    assert entry["ratio"] is None
    assert entry["verdict"] == "no peer completed"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1_248_389.0, "1.25M"),
        (999_999.0, "1M"),
        (92_150.0, "92.2k"),
        (9_999.0, "9,999"),
        (24.43, "24.4"),
        (6.47, "6.47"),
        (0.1329, "0.133"),
        (0.0, "0"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


# -- the runner with fake cases -------------------------------------------------------------------


def test_missing_peer_is_reported_not_installed_and_never_run() -> None:
    execute = FakeExecutor(_standard_runs())
    report = _bench(_scenario(), execute)
    gone = _case(report, "gone")
    assert gone["status"] == "not installed"
    assert MISSING_MODULE in gone["error"]
    assert "gone" not in [key for key, *_ in execute.calls]
    text = render_text(report)
    assert "missing peer" in text
    assert f"not installed (needs {MISSING_MODULE})" in text


def test_a_failing_case_is_reported_and_the_run_goes_on() -> None:
    runs = _standard_runs()
    runs["a"] = [
        {"status": "error", "figures": {}, "error": "ValueError: peer A broke"},
        _run(speed=5.0, done=True),
        _run(speed=7.0, done=True),
    ]
    report = _bench(_scenario(), FakeExecutor(runs))
    a = _case(report, "a")
    assert a["status"] == "ok"
    assert (a["runs_ok"], a["runs_total"]) == (2, 3)
    assert a["error"] == "ValueError: peer A broke"
    assert a["summary"]["speed"]["median"] == 6.0
    assert _case(report, "b")["status"] == "ok"  # the systems after it still ran
    assert "peer A: 1 of 3 runs error: ValueError: peer A broke" in render_text(report)


def test_a_timed_out_case_is_not_repeated() -> None:
    runs = _standard_runs()
    runs["a"] = [{"status": "timeout", "figures": {}, "error": "no result within 5 s"}]
    execute = FakeExecutor(runs)
    report = _bench(_scenario(), execute)
    assert [key for key, *_ in execute.calls].count("a") == 1
    assert _case(report, "a")["status"] == "timeout"
    assert [key for key, *_ in execute.calls].count("b") == 3


def test_cases_run_in_rounds_so_drift_shifts_every_system_alike() -> None:
    execute = FakeExecutor(_standard_runs())
    _bench(_scenario(), execute)
    # One run of each system per round (the missing peer never runs), not one system's in a row.
    assert [key for key, *_ in execute.calls] == ["tg", "a", "b", "floor"] * 3


def test_a_scenario_runs_each_case_at_least_its_min_runs() -> None:
    runs = {key: records * 2 for key, records in _standard_runs().items()}
    execute = FakeExecutor(runs)
    report = _bench(_scenario(min_runs=5), execute, repeat=3)
    assert [key for key, *_ in execute.calls].count("tg") == 5
    assert _case(report, "tg")["runs_total"] == 5
    assert "repeats per case: 3 (BX 5: the scenario's minimum)" in render_markdown(report)
    execute = FakeExecutor(runs)
    _bench(_scenario(min_runs=2), execute, repeat=4)  # --repeat above it wins
    assert [key for key, *_ in execute.calls].count("b") == 4
    with pytest.raises(ValueError, match="min_runs must be at least 1, got 0"):
        _scenario(min_runs=0)


def test_task_counts_timeouts_and_system_filter_reach_the_executor() -> None:
    execute = FakeExecutor(_standard_runs())
    _bench(_scenario(), execute, quick=True, repeat=1, systems=["tg", "b"])
    assert execute.calls == [("tg", 10, True, 60.0), ("b", 10, True, 60.0)]

    execute = FakeExecutor(_standard_runs())
    report = _bench(_scenario(), execute, repeat=1, timeout=7.0, systems=["b"])
    assert execute.calls == [("b", 50, False, 7.0)]
    assert [c["system"] for c in report["scenarios"][0]["cases"]] == ["b"]
    # A scenario none of whose systems is selected is left out, not shown empty.
    assert _bench(_scenario(), FakeExecutor({}), systems=["elsewhere"])["scenarios"] == []


def test_the_dask_backend_cases_run_only_with_backend_dask() -> None:
    """``--backend dask`` runs the scenarios with a Dask-backend case, all their systems; the
    default leaves that case out. Its ratio is to the peer it names, not to the best one."""
    systems = (
        System("tg", "tokengate", _never, kind="tokengate"),
        System(
            "tg-dask",
            "tokengate on Dask",
            _never,
            kind="tokengate",
            backend="dask",
            compare_to="raw",
        ),
        System("a", "peer A", _never),
        System("raw", "raw Dask", _never),
    )
    runs = {
        "tg": [_run(speed=20.0, done=True)],
        "tg-dask": [_run(speed=3.0, done=True)],
        "a": [_run(speed=10.0, done=True)],
        "raw": [_run(speed=4.0, done=True)],
    }
    execute = FakeExecutor(runs)
    _bench(_scenario(systems=systems), execute, repeat=1)
    assert [key for key, *_ in execute.calls] == ["tg", "a", "raw"]

    execute = FakeExecutor(runs)
    report = _bench(_scenario(systems=systems), execute, repeat=1, backend="dask")
    assert [key for key, *_ in execute.calls] == ["tg", "tg-dask", "a", "raw"]
    ratios = {r["system"]: r for r in report["scenarios"][0]["ratios"]}
    assert (ratios["tg"]["best_peer"], ratios["tg"]["ratio"]) == ("a", 2.0)
    assert (ratios["tg-dask"]["best_peer"], ratios["tg-dask"]["ratio"]) == ("raw", 0.75)
    assert report["options"]["backend"] == "dask"
    # A scenario without a Dask-backend case is left out with --backend dask.
    assert _bench(_scenario(), FakeExecutor({}), backend="dask")["scenarios"] == []


def test_the_registry_has_dask_backend_cases_for_b1_and_b6() -> None:
    with_dask = {
        sc.id: [s.key for s in sc.systems if s.backend == "dask"] for sc in SCENARIOS.values()
    }
    assert {sid: keys for sid, keys in with_dask.items() if keys} == {
        "B1": ["tokengate-dask"],
        "B6": ["tokengate-dask"],
    }
    b1 = SCENARIOS["B1"].system("tokengate-dask")
    assert (b1.kind, b1.compare_to, b1.requires) == ("tokengate", "dask-submit", ("distributed",))
    assert SCENARIOS["B1"].system(b1.compare_to).kind == "peer"


def test_json_shape() -> None:
    report = json.loads(json.dumps(_bench(_scenario(), FakeExecutor(_standard_runs()))))
    assert {"tool", "command", "date", "machine", "options", "scenarios"} <= set(report)
    assert {"cores_usable", "python_version", "gil"} <= set(report["machine"])
    (sc,) = report["scenarios"]
    assert sc["headline"] == {
        "key": "speed",
        "label": "speed",
        "higher_is_better": True,
        "kind": "number",
    }
    assert [f["key"] for f in sc["figures"]] == ["speed", "done", PEAK_RSS.key]
    tg = _case(report, "tg")
    assert len(tg["runs"]) == 3
    assert [r["figures"]["speed"] for r in tg["runs"]] == [30.0, 20.0, 25.0]  # raw, in order
    assert tg["summary"]["speed"] == {"median": 25.0, "min": 20.0, "max": 30.0, "runs": 3}
    assert tg["summary"]["done"] == {"yes": 3, "runs": 3}
    assert {"system", "figure", "ratio", "verdict", "best_peer"} <= set(sc["ratios"][0])


def test_tables_in_text_and_markdown() -> None:
    report = _bench(_scenario(), FakeExecutor(_standard_runs()))
    text = render_text(report)
    assert "machine:" in text
    assert "25.0 [20.0–30.0]" in text
    assert "1.92x better" in text
    md = render_markdown(report)
    assert "- command: `tokengate bench`" in md
    assert "## BX fake" in md
    assert "| tokengate | 100 | 25.0 [20.0–30.0] | yes |" in md
    assert md.endswith("\n")


def test_rich_tables_when_rich_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    monkeypatch.setenv("COLUMNS", "250")  # rich's width when not writing to a terminal
    report = _bench(_scenario(), FakeExecutor(_standard_runs()))
    out = io.StringIO()
    assert render_rich(report, out) is True
    text = out.getvalue()
    assert "25.0 [20.0–30.0]" in text  # brackets survive: cells are not rich markup
    assert "not installed" in text


def test_summarize_case_with_no_runs() -> None:
    sc = _scenario()
    case = summarize_case(sc, sc.systems[0], 100, 1.0, [])
    assert case["status"] == "not run"
    assert case["summary"] == {}


# -- the in-process harness -----------------------------------------------------------------------


def _raises(_: CaseParams) -> Figures:
    raise ValueError("the system broke\nsecond line")


def _stuck(_: CaseParams) -> Figures:
    raise Deadlocked("all workers blocked", {"completed": False})


def _fine(p: CaseParams) -> Figures:
    return {"speed": float(p.n)}


def test_measure_reports_a_failing_system_instead_of_raising() -> None:
    sc = _scenario(systems=(System("x", "x", _raises),))
    record = measure(sc, sc.systems[0], quick=True)
    assert record["status"] == "error"
    assert record["error"] == "ValueError: the system broke"
    assert "Traceback" in record["traceback"]


def test_measure_reports_missing_modules_and_deadlocks() -> None:
    sc = _scenario(
        systems=(
            System("gone", "gone", _never, requires=(MISSING_MODULE,)),
            System("stuck", "stuck", _stuck),
            System("fine", "fine", _fine),
        )
    )
    assert measure(sc, sc.system("gone"), quick=False)["status"] == "not installed"
    stuck = measure(sc, sc.system("stuck"), quick=False)
    assert stuck["status"] == "deadlocked"
    assert stuck["figures"]["completed"] is False
    assert "peak_rss_mb" in stuck["figures"]
    fine = measure(sc, sc.system("fine"), quick=True, n=7)
    assert fine["figures"]["speed"] == 7.0
    assert fine["figures"]["peak_rss_mb"] > 0


def test_scenario_validation() -> None:
    with pytest.raises(ValueError, match="headline figure 'nope'"):
        Scenario("BY", "t", "d", (Figure("a", "a", higher_is_better=True),), "nope", 1, 1, ())
    with pytest.raises(ValueError, match="has no direction"):
        Scenario("BY", "t", "d", (Figure("a", "a"),), "a", 1, 1, ())


def test_registry_keys_and_headlines() -> None:
    assert list(SCENARIOS) == [
        "B1",
        "B2",
        "B2o",
        "B3",
        "B4",
        "B5",
        "B5b",
        "B6",
        "B7",
        "B8",
        "B8b",
        "IOSURGE",
        "OBS",
        "OBSLOG",
        "DASH",
        "DASHB6",
    ]
    for sc in SCENARIOS.values():
        assert any(s.kind == "tokengate" for s in sc.systems), sc.id
        assert any(s.kind == "peer" for s in sc.systems), sc.id


def test_new_scenarios_headlines_and_any_case_ids() -> None:
    expected = {
        "B2": ("speedup", True),
        "B2o": ("us_per_task", False),
        "B3": ("light_p95_ms", False),
        "B5": ("per_s", True),
        "B5b": ("per_s", True),
        "IOSURGE": ("wall_s", False),
        "OBS": ("us_per_task", False),
        "OBSLOG": ("us_per_task", False),
        "DASH": ("us_per_task", False),
        "DASHB6": ("p95_ms", False),
    }
    for sid, (headline, higher) in expected.items():
        sc = get_scenario(sid.lower())
        assert sc.id == sid
        assert sc.headline == headline
        assert sc.figure(headline).higher_is_better is higher
    # OBS / OBSLOG: the reference (everything off) is the one "peer", so the ratio is overhead
    for sid, ref in (
        ("OBS", "bare"),
        ("OBSLOG", "log-disabled"),
        ("DASH", "off"),
        ("DASHB6", "off"),
    ):
        assert [s.key for s in SCENARIOS[sid].systems if s.kind == "peer"] == [ref]
    assert SCENARIOS["B2"].system("serial").kind == "floor"


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_list_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "B1 overhead" in out
    assert "threadpool-4" in out
    with pytest.raises(SystemExit) as exc:
        main(["--only", "B99"])
    assert exc.value.code == 2
    assert "no scenario 'B99'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--repeat", "0"])
    with pytest.raises(SystemExit):
        main(["--systems", "nope"])
    with pytest.raises(SystemExit) as exc:
        main(["--address", "tcp://127.0.0.1:8786"])
    assert exc.value.code == 2
    assert "--address needs --backend dask" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--backend", "dask", "--only", "B2"])
    assert exc.value.code == 2
    assert "those that do: B1, B6" in capsys.readouterr().err


# -- the subprocess runner ------------------------------------------------------------------------


def _fake_python(tmp_path: Path, body: str) -> str:
    """An 'interpreter' that ignores its arguments and runs ``body`` with the real one."""
    script = tmp_path / "fake-python"
    code = tmp_path / "body.py"
    code.write_text(body, encoding="utf-8")
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{code}"\n', encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_subprocess_timeout_kills_the_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    body = (
        "import subprocess, sys, threading\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import threading; threading.Event().wait()'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "threading.Event().wait()\n"
    )
    monkeypatch.setattr(_runner.sys, "executable", _fake_python(tmp_path, body))
    sc = _scenario(systems=(System("hang", "hang", _never, timeout_status="deadlocked"),))
    try:
        record = _runner.run_case_subprocess(sc, sc.systems[0], 1, False, 6.0)
        assert record["status"] == "deadlocked"
        assert "no result within 6 s" in record["error"]
        # The grandchild held the output pipes, so the runner saw EOF only once it was killed.
        proc_stat = Path(f"/proc/{pid_file.read_text()}/stat")

        def gone() -> bool:  # killed: reaped (no /proc entry) or a zombie
            try:
                return proc_stat.read_text().split()[2] in ("Z", "X")
            except (FileNotFoundError, ProcessLookupError):
                return True

        eventually(gone, timeout=10, what="the grandchild to die")
    finally:
        if pid_file.exists():  # never leave the grandchild behind, even when the test fails
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_subprocess_without_a_result_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "import sys\nprint('not json')\nsys.stderr.write('it broke\\n')\nsys.exit(3)\n"
    monkeypatch.setattr(_runner.sys, "executable", _fake_python(tmp_path, body))
    sc = _scenario(systems=(System("x", "x", _never),))
    record = _runner.run_case_subprocess(sc, sc.systems[0], 1, False, 30.0)
    assert record["status"] == "error"
    assert "exited with code 3" in record["error"]
    assert "it broke" in record["error"]


def _bench_cli(tmp_path: Path, *args: str, timeout: float = 50.0) -> Record:
    out = tmp_path / "bench.json"
    md = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokengate.bench",
            "--plain",
            "--json",
            str(out),
            "--write-markdown",
            str(md),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    report: Record = json.loads(out.read_text(encoding="utf-8"))
    for sc in report["scenarios"]:
        assert f"## {sc['id']} {sc['title']}" in md.read_text(encoding="utf-8")
        assert f"{sc['id']} {sc['title']}" in proc.stdout
    return report


def test_smoke_quick_b1_peer_case(tmp_path: Path) -> None:
    report = _bench_cli(
        tmp_path, "--quick", "--only", "B1", "--repeat", "1", "--systems", "threadpool-4,ray"
    )
    (sc,) = report["scenarios"]
    pool, ray = sc["cases"]
    assert pool["status"] == "ok", pool["error"]
    for key in ("tasks_per_s", "us_per_task", "submit_us_per_task", "peak_rss_mb"):
        assert pool["summary"][key]["median"] > 0
    assert ray["status"] in ("ok", "not installed")


def test_smoke_quick_b2o_tokengate(tmp_path: Path) -> None:
    report = _bench_cli(
        tmp_path, "--quick", "--only", "b2o", "--repeat", "1", "--systems", "tokengate"
    )
    (sc,) = report["scenarios"]
    assert sc["id"] == "B2o"
    (case,) = sc["cases"]
    assert case["status"] == "ok", case["error"]
    assert case["summary"]["us_per_task"]["median"] > 0
    assert case["summary"]["round_trip_us"]["median"] > 0


def _case_subprocess(*args: str, timeout: float = 50.0) -> Record:
    proc = subprocess.run(
        [sys.executable, "-m", "tokengate.bench._case", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    record: Record = json.loads(proc.stdout.strip().splitlines()[-1])
    return record


def test_threadpool_nested_fanout_is_reported_deadlocked() -> None:
    record = _case_subprocess("B7", "threadpool", "--quick", "--n", "10")
    assert record["status"] == "deadlocked"
    assert record["figures"]["completed"] is False
    assert "workers blocked" in record["error"]


@pytest.mark.parametrize(
    ("scenario", "system", "n"),
    [
        ("B1", "tokengate", "500"),
        ("B4", "tokengate-callback", "300"),
        ("B4", "tokengate-map", "300"),
        ("B6", "tokengate", "1"),
        ("B7", "tokengate", "10"),
        ("B2", "tokengate", "2"),
        ("B3", "tokengate", "2"),
        ("B5", "tokengate", "20"),
        ("B5b", "tokengate", "20"),
        ("IOSURGE", "tier-on", "20"),
        ("OBS", "full", "500"),
        ("OBSLOG", "log-debug", "200"),
        ("B8", "tokengate", "4"),
        ("B8b", "tokengate", "4"),
        ("DASH", "page-open", "500"),
        ("DASH", "recent-tokens", "500"),
        ("DASHB6", "page-open", "1"),
    ],
)
def test_tokengate_cases_run(scenario: str, system: str, n: str) -> None:
    record = _case_subprocess(scenario, system, "--quick", "--n", n)
    assert record["status"] == "ok", record.get("traceback") or record["error"]
    assert record["figures"]["peak_rss_mb"] > 0
    if scenario == "B7":
        assert record["figures"]["completed"] is True
    if system == "recent-tokens":  # no dashboard: the deque alone
        assert isinstance(record["figures"]["recent_cost_pct"], float)
    elif scenario.startswith("DASH"):  # a short run may not see the server thread use any CPU
        assert 0 <= record["figures"]["server_cpu_pct"] < 100
    if scenario == "DASH" and system == "page-open":
        assert record["figures"]["snapshot_cost_pct"] is not None


def test_dash_reads_the_cpu_clock_of_the_thread_that_serves_requests(
    make_coordinator: Any,
) -> None:
    pytest.importorskip("starlette", reason="the dashboard needs tokengate[dashboard]")
    from tokengate.bench._dash_overhead import _health, _server_clock

    coordinator = make_coordinator()
    url = coordinator.serve_dashboard()
    clock = _server_clock()
    assert _health(url)["ok"]  # the server has started (its start-up is its own CPU too)
    before = time.clock_gettime(clock)
    spin_until = time.thread_time() + 0.05  # this thread's CPU is not the server's
    while time.thread_time() < spin_until:
        pass
    assert time.clock_gettime(clock) - before < 0.025
    before = time.clock_gettime(clock)
    for _ in range(20):
        assert _health(url)["clients"] == 0
    assert time.clock_gettime(clock) > before  # the requests were read and answered there


def test_snapshot_cost_is_the_excess_of_the_bursts_a_snapshot_fell_in() -> None:
    from tokengate.bench._dash_overhead import snapshot_cost

    # 3.2 s in all; the one burst with a snapshot took 0.2 s more than the mean of the others
    assert snapshot_cost([(1.0, False), (1.2, True), (1.0, False)]) == pytest.approx(6.25)
    assert snapshot_cost([(1.1, False), (0.9, False), (1.0, True)]) == pytest.approx(0.0)
    assert snapshot_cost([(1.0, False), (1.0, False)]) == 0.0  # nothing to compare
    assert snapshot_cost([(1.0, True)]) == 0.0


def test_paired_cost_stays_between_the_clusters_of_bimodal_pairs() -> None:
    from tokengate.bench._dash_overhead import paired_cost

    assert paired_cost([(1.02, 1.0)] * 5) == pytest.approx(2.0)
    # Costless, but a slow burst landed on the side with it in 6 pairs and without it in 5: the
    # median ratio reads +5 %, the trimmed geometric mean about +0.5 %.
    bimodal = [(1.05, 1.0)] * 6 + [(1.0, 1.05)] * 5
    assert abs(paired_cost(bimodal)) < 1.0
    # The highest and lowest tenth are left out: one burst slowed threefold does not count.
    assert paired_cost([(1.01, 1.0)] * 10 + [(3.0, 1.0)]) == pytest.approx(1.0)
    assert paired_cost([]) == 0.0


def test_a_snapshot_is_marked_in_every_burst_its_build_overlapped() -> None:
    from tokengate.bench._dash_overhead import overlapped

    bursts = [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]
    # One build from the end of the first burst into the second, one inside the last.
    marked = overlapped(bursts, [(0.9, 1.5), (3.2, 3.4)])
    assert marked == [(1.0, True), (1.0, True), (1.0, False), (1.0, True)]
    assert overlapped(bursts, []) == [(1.0, False)] * 4


def test_the_recent_tokens_case_switches_recording_on_for_one_burst_of_each_pair() -> None:
    from tokengate._token import next_seq
    from tokengate.bench._dash_overhead import measure_recent_tokens
    from tokengate.dashboard._registry import RecentTokens

    def recorded_in_bursts(case: str) -> int:
        registry = RecentTokens(capacity=100_000, budget=1e12)  # records every token
        figures = measure_recent_tokens(case, 400, bursts=4, registry=registry)
        assert figures["recent_cost_pct"] > -100 and figures["us_per_task"] > 0
        assert not registry.recording  # switched off at the end
        end = next_seq()
        bursts = range(end - 400, end)  # the run's last 400 tokens
        return sum(1 for record in registry.recent(100_000) if record.seq in bursts)

    assert recorded_in_bursts("recent-tokens") == 200  # one burst of 100 in each pair
    assert recorded_in_bursts("recent-null") == 0


def test_snapshot_tail_cost_compares_untouched_tasks_with_those_stand_in_windows_spare() -> None:
    from tokengate.bench._dash_overhead import snapshot_tail_cost

    period = 0.9
    windows = [(0.5 + i * period, 0.505 + i * period) for i in range(10)]

    def spans(delay: float) -> list[tuple[float, float]]:
        """A task every ms, latencies cycling through 1-100 ms every 0.1 s (so the stand-in
        windows, a third and two thirds of a period later, spare the same latencies the real
        ones do, and a long task is likelier to overlap a window than a short one); the tasks
        a real window overlaps take ``delay`` longer."""
        out = []
        for i in range(9_000):
            start = i / 1000
            end = start + (i % 100 + 1) / 1000
            if any(a < end and start < b for a, b in windows):
                end += delay
            out.append((start, end))
        return out

    calm = snapshot_tail_cost(spans(0.0), windows, period)
    # No cost, and no bias: the real and stand-in windows spare the same latencies.
    assert calm["p50_cost_pct"] == pytest.approx(0.0, abs=1e-6)
    assert calm["p95_cost_pct"] == pytest.approx(0.0, abs=1e-6)
    assert 1 < calm["touched_pct"] < 10
    slowed = snapshot_tail_cost(spans(0.2), windows, period)
    assert slowed["p95_cost_pct"] > 0 and slowed["p50_cost_pct"] > 0
    assert slowed["touched_pct"] == calm["touched_pct"]
    assert snapshot_tail_cost(spans(0.0), [], period) == {}  # no snapshot: nothing to say


@pytest.mark.parametrize(("scenario", "n"), [("B1", "100"), ("B6", "1")])
def test_tokengate_dask_backend_cases_run(scenario: str, n: str) -> None:
    pytest.importorskip("distributed", reason="the Dask backend needs tokengate[dask]")
    record = _case_subprocess(scenario, "tokengate-dask", "--quick", "--n", n, timeout=90)
    assert record["status"] == "ok", record.get("traceback") or record["error"]
    assert record["figures"]["peak_rss_mb"] > 0
    if scenario == "B6":
        assert record["figures"]["failed"] == 0
        assert record["figures"]["resolved"] == record["figures"]["submitted"] > 0


def test_cases_import_this_tokengate() -> None:
    import tokengate

    proc = subprocess.run(
        [sys.executable, "-c", "import tokengate; print(tokengate.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=_runner._child_env(),
        cwd="/",
    )
    assert Path(proc.stdout.strip()).resolve() == Path(tokengate.__file__).resolve()


def test_count_figures_print_as_whole_numbers_and_equal_ranges_collapse() -> None:
    from tokengate.bench._report import _cell

    assert _cell({"median": 20.0, "min": 19.0, "max": 21.0, "runs": 3}, "count") == "20 [19–21]"
    assert _cell({"median": 1699.0, "min": 1699.0, "max": 1699.0, "runs": 3}, "count") == "1,699"
    assert _cell({"median": 20.5, "min": 20.0, "max": 21.0, "runs": 2}, "count") == "20.5 [20–21]"
    assert _cell({"median": 9.78, "min": 9.781, "max": 9.779, "runs": 3}, "number") == "9.78"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss folding is Linux's")
def test_a_case_peak_rss_is_its_own_not_its_parents() -> None:
    """A case process started by a big parent must not report the parent's memory: on Linux
    ``ru_maxrss`` carries the parent's high-water mark across fork and exec."""
    parent = (
        "import subprocess, sys\n"
        "ballast = bytearray(300 * 2**20)\n"  # the parent's RSS: ~300 MB, touched
        "for i in range(0, len(ballast), 4096): ballast[i] = 1\n"
        "code = 'from tokengate.bench._rss import peak_rss_kib; print(peak_rss_kib())'\n"
        "out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)\n"
        "print(out.stdout.strip() or out.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", parent], capture_output=True, text=True, timeout=60, check=True
    )
    child_mb = int(done.stdout.strip()) / 1024
    assert 5 < child_mb < 150, done.stdout
