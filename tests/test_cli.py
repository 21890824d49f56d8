"""The ``tokengate`` command: info, each demo's closing report, piped mode, Ctrl-C, bad options.

Demos run for a fraction of a second in-process through ``main([...])`` (stdout captured, so not a
terminal: the plain display). The Ctrl-C test runs the real command in a subprocess, waits for
its "started" line, sends SIGINT and expects the report and exit status 130 — no sleeping.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import tokengate
from tokengate.cli import main
from tokengate.cli._demo import accepts_backend
from tokengate.cli._display import plain_line, read_status

SHORT = "0.3"


def counts(text: str) -> dict[str, int]:
    """Submitted / Resolved / Failed / Discarded from a closing report (stats block or the
    Quick-Proof's)."""
    found: dict[str, int] = {}
    for key in ("Submitted", "Resolved", "Failed", "Discarded"):
        match = re.findall(rf"^\s*{key}\s*:\s*(\d+)", text, flags=re.MULTILINE)
        if match:
            found[key.lower()] = int(match[-1])
    return found


def assert_adds_up(text: str) -> dict[str, int]:
    c = counts(text)
    assert c["submitted"] > 0, text
    assert c["submitted"] == c["resolved"] + c["failed"] + c.get("discarded", 0), text
    return c


def test_info_prints_the_seed_banner(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for part in (
        "CPU Topology Detected:",
        "Physical cores:",
        "SMT enabled:",
        "[AFFINITY] Policy for",
        "Heavy:  [1",
        "Core-worker mapping:",
        "Core 1: Workers [0,",
        "[STORAGE_THROTTLE] Initialized with speed tiers:",
        "SLOW: 10 concurrent I/O",
        "INSANE: 70 concurrent I/O",
        "GIL enabled:",
        tokengate.__version__,
    ):
        assert part in out, part


@pytest.mark.parametrize(
    ("name", "title"),
    [
        ("cpu", "CPU PROOF COMPLETE"),
        ("io", "✓ I/O proof complete."),
        ("mixed", "MIXED ORCHESTRATOR COMPLETE"),
        ("chain", "CHAIN PROOF COMPLETE"),
        ("endurance", "ENDURANCE RUN COMPLETE"),
    ],
)
def test_each_demo_prints_its_closing_report(
    name: str, title: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["demo", name, "--duration", SHORT, "--seed", "7", "--interval", "60"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"[DEMO] {name} started" in out
    assert title in out
    assert "Operations dispatched:" in out
    c = assert_adds_up(out)
    assert c["failed"] == 0
    assert "Seed: 7" in out


def test_mixed_report_has_the_seed_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "mixed", "--duration", SHORT, "--seed", "3"]) == 0
    out = capsys.readouterr().out
    for line in (
        "Total wall-clock :",
        "Waves            :",
        "Latency p50      :",
        "Latency p95      :",
        "Latency max      :",
    ):
        assert line in out


def test_io_demo_prints_the_seed_groups_and_respects_tiers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "io", "--duration", SHORT]) == 0
    out = capsys.readouterr().out
    assert "── I/O-BOUND PROOF" in out
    assert "Submitting 10 tasks → JSON writes\n10/10 resolved  |  0 failed\n✓ JSON writes" in out
    assert "Submitting 10 tasks → Log appends" in out
    assert "Submitting 6 tasks → Blob writes\n6/6 resolved  |  0 failed" in out
    most = dict(re.findall(r"^\s+(SLOW|MODERATE|FAST|INSANE)\s+(\d+) of", out, re.MULTILINE))
    assert int(most["SLOW"]) <= 10 and int(most["MODERATE"]) <= 25 and int(most["FAST"]) <= 50


def test_endurance_reports_tasks_per_phase(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "endurance", "--duration", "1", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    per_phase = dict(re.findall(r"^\s+(IDLE|NORMAL|SURGE)\s+: (\d+) submitted", out, re.MULTILINE))
    assert set(per_phase) == {"IDLE", "NORMAL", "SURGE"}
    assert sum(map(int, per_phase.values())) == counts(out)["submitted"]
    for phase in ("NORMAL", "SURGE", "IDLE"):  # the Quick-Proof's block at the end of each phase
        assert f"── [{phase}] Stats at" in out


def test_same_seed_same_waves(capsys: pytest.CaptureFixture[str]) -> None:
    import random

    from tokengate.demos.mixed import plan_wave

    first = [plan_wave(random.Random(5), "/x", w) for w in range(3)]
    again = [plan_wave(random.Random(5), "/x", w) for w in range(3)]
    assert first == again


def test_piped_mode_prints_plain_stats_lines() -> None:
    """Not a terminal: periodic one-line stats, no terminal control codes."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokengate",
            "demo",
            "mixed",
            "--duration",
            "1.2",
            "--interval",
            "0.25",
            "--seed",
            "2",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if re.match(r"^\[\s*\d+\.\ds\] mixed ", ln)]
    assert len(lines) >= 2, proc.stdout
    assert "submitted" in lines[0] and "p95" in lines[0] and "queues c1:" in lines[0]
    assert "\x1b[" not in proc.stdout
    assert "MIXED ORCHESTRATOR COMPLETE" in proc.stdout


def test_plain_line_and_status_read_the_public_api(make_coordinator) -> None:  # type: ignore[no-untyped-def]
    from tokengate.demos.mixed import MixedOrchestrator

    coordinator = make_coordinator(workers_per_core=1)
    demo = MixedOrchestrator(duration=0.1, seed=1, say=lambda *_: None)
    status = read_status(coordinator, demo, "mixed", 0.0)
    line = plain_line(status)
    assert "mixed starting" in line and "submitted 0" in line and "tiers idle" in line
    assert set(status.queues) == set(coordinator.lanes)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(tokengate.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.parametrize("name", ["mixed", "endurance"])
def test_ctrl_c_stops_cleanly_and_still_reports(name: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokengate", "demo", name, "--duration", "600", "--seed", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until the demo has started (or the process died)
        assert f"[DEMO] {name} started" in first, first
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = first + rest
    assert proc.returncode == 130, (out, err)
    assert "Interrupted: stopping" in err
    assert "COMPLETE" in out
    assert "Interrupted after" in out
    c = counts(out)
    assert c["submitted"] == c["resolved"] + c["failed"] + c.get("discarded", 0), out
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo"], "the following arguments are required: name"),
        (["demo", "nope"], "invalid choice: 'nope'"),
        (["demo", "mixed", "--duration", "0"], "must be a positive number of seconds"),
        (["demo", "mixed", "--duration", "soon"], "expected a number of seconds"),
        (["demo", "mixed", "--metrics-port", "70000"], "a port is 0..65535"),
        (["demo", "mixed", "--backend", "spark"], "invalid choice: 'spark'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_address_without_the_dask_backend_exits_2_before_starting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "mixed", "--duration", SHORT, "--address", "tcp://h:8786"]) == 2
    captured = capsys.readouterr()
    assert "--address tcp://h:8786 needs --backend dask" in captured.err
    assert "started" not in captured.out


def test_options_this_build_lacks_exit_2_before_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tokengate import OperationsCoordinator

    cases = []
    if not hasattr(OperationsCoordinator, "export_trace"):
        cases.append((["--trace", str(tmp_path / "t.json")], "--trace is not available"))
    if not hasattr(OperationsCoordinator, "serve_metrics"):
        cases.append((["--metrics-port", "0"], "--metrics-port is not available"))
    if not accepts_backend():
        cases.append((["--backend", "dask"], "--backend dask is not available"))
    if not cases:
        pytest.skip("this build has every optional part")
    for extra, message in cases:
        assert main(["demo", "mixed", "--duration", SHORT, *extra]) == 2
        captured = capsys.readouterr()
        assert message in captured.err
        assert "started" not in captured.out


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("missing/t.json", "the directory {tmp}/missing does not exist; create it first"),
        (".", "is a directory; give a file name"),
        ("a_file/t.json", "the directory {tmp}/a_file is not a directory"),
    ],
)
def test_a_trace_that_could_not_be_written_exits_2_before_the_demo_starts(
    where: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_file").write_text("", encoding="utf-8")
    trace = tmp_path / where
    assert main(["demo", "mixed", "--duration", "600", "--trace", str(trace)]) == 2
    captured = capsys.readouterr()
    assert "tokengate demo: error: --trace " in captured.err
    assert message.format(tmp=tmp_path) in captured.err
    assert "started" not in captured.out and "Traceback" not in captured.err


@pytest.mark.parametrize("option", ["--json", "--write-markdown"])
def test_bench_outputs_that_could_not_be_written_exit_2_before_any_case_runs(
    option: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokengate.bench import _runner

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmarks ran before the outputs were checked")

    monkeypatch.setattr(_runner, "run_benchmarks", must_not_run)
    (tmp_path / "a_file").write_text("", encoding="utf-8")
    for target, message in (
        (tmp_path / "a_file" / "out", "a_file is not a directory"),
        (tmp_path, "is a directory; give a file name"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--quick", "--only", "B1", option, str(target)])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    # A directory that does not exist yet is fine: bench creates it.
    monkeypatch.setattr(_runner, "run_benchmarks", lambda *a, **k: {"scenarios": []})
    monkeypatch.setattr(_runner, "render_text", lambda report: "")
    monkeypatch.setattr(_runner, "render_markdown", lambda report: "")
    assert main(["bench", "--plain", option, str(tmp_path / "new" / "out")]) == 0
    assert (tmp_path / "new" / "out").is_file()


def test_bench_quick_does_not_promise_a_minute(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "about a minute" not in text  # it takes several, even scaled down
    assert "--quick scaled-down scenarios, still every case and peer: several minutes" in text


def test_bench_is_forwarded_to_the_harness(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    assert "B6 seed mixed orchestrator" in capsys.readouterr().out


def test_trace_metrics_and_backend_reach_the_coordinator_when_present(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The wiring for builds that have them: options passed, APIs called, results reported."""
    from tokengate import OperationsCoordinator
    from tokengate.cli import _demo

    calls: dict[str, object] = {}

    class Observable(OperationsCoordinator):
        def __init__(
            self,
            *,
            trace: bool = False,
            backend: str = "local",
            address: str | None = None,
            **options: object,
        ):
            calls["trace"], calls["backend"], calls["address"] = trace, backend, address
            super().__init__(**options)  # type: ignore[arg-type]

        def serve_metrics(self, port: int = 0) -> int:
            calls["port"] = port
            return 9464

        def export_trace(self, path: object) -> int:
            calls["path"] = path
            return 42

    monkeypatch.setattr(_demo, "OperationsCoordinator", Observable)
    monkeypatch.setattr(_demo, "_config_fields", lambda: {"trace": None, "backend": None})
    trace = tmp_path / "demo.trace.json"
    argv = [
        "demo",
        "chain",
        "--duration",
        SHORT,
        "--trace",
        str(trace),
        "--metrics-port",
        "0",
        "--backend",
        "dask",
        "--address",
        "tcp://10.0.0.5:8786",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert calls == {
        "trace": True,
        "backend": "dask",
        "address": "tcp://10.0.0.5:8786",
        "port": 0,
        "path": trace,
    }
    assert "http://127.0.0.1:9464/metrics" in out
    assert f"Trace: 42 task spans written to {trace}" in out


def test_dashboard_prints_its_url_and_stops_with_the_demo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("uvicorn")
    assert main(["demo", "chain", "--duration", SHORT, "--plain", "--dashboard"]) == 0
    out = capsys.readouterr().out
    assert "[DASHBOARD] Open http://127.0.0.1:" in out
    assert "?token=" in out
    assert not any(t.name.startswith("tokengate-dashboard") for t in threading.enumerate())


def test_dashboard_without_the_extra_exits_2_and_says_how(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["demo", "chain", "--duration", SHORT, "--dashboard", "0"]) == 2
    assert "pip install 'tokengate[dashboard]'" in capsys.readouterr().err
