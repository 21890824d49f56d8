"""The runnable examples in ``examples/`` run as a user runs them, and print what they promise.

Each runs in a fresh interpreter (``sys.executable``, as ``python examples/<name>.py``), so they
are checked exactly as the docs tell a newcomer to run them, worker processes included.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Each example finishes in seconds; the bounds only catch a hang on a loaded machine.
pytestmark = pytest.mark.timeout(180)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Heavy work runs in worker processes where the platform has them and the GIL is on.
HEAVY_LANE = (
    "process"
    if os.name == "posix" and getattr(sys, "_is_gil_enabled", lambda: True)()
    else "thread"
)


def run_example(name: str) -> str:
    """Run ``examples/<name>`` to its end; return its output, failing with it on an error."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow  # one cold mypy run: seconds on an idle machine, a minute on a loaded one
@pytest.mark.timeout(300)
def test_the_examples_type_check_with_the_plugin(tmp_path: Path) -> None:
    """mypy --strict with tokengate's plugin (as docs/guide/chains.md configures it) accepts the
    examples' chains, which pass tokens where values are expected, with no ``type: ignore``."""
    api = pytest.importorskip("mypy.api")
    config = EXAMPLES.parent / "tests" / "typing" / "mypy.ini"
    paths = sorted(str(p) for p in EXAMPLES.glob("*.py"))
    stdout, stderr, status = api.run(
        ["--config-file", str(config), "--cache-dir", str(tmp_path), *paths]
    )
    assert status == 0, stdout + stderr
    assert not any("type: ignore" in Path(p).read_text(encoding="utf-8") for p in paths)


def test_every_example_is_run_by_a_test() -> None:
    tested = {"quickstart.py", "chain.py", "mixed_cpu_io.py", "pipeline.py", "pipeline_async.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart() -> None:
    out = run_example("quickstart.py")
    assert "fibonacci: [55, 6765, 832040]" in out
    assert "hello, tokengate" in out
    assert re.search(r"Submitted : 4\n\s+Resolved  : 4 ", out), out


def test_chain_runs_and_a_broken_chain_names_its_cause() -> None:
    out = run_example("chain.py")
    assert "poem: 12 words, most frequent: 'the' (3x)" in out
    assert "empty: no words" in out
    assert "missing: did not run, the chain broke with KeyError: 'missing'" in out


def test_mixed_cpu_and_io() -> None:
    out = run_example("mixed_cpu_io.py")
    assert "rendered 24 pages" in out
    assert f"lanes used: {', '.join(sorted({'io', HEAVY_LANE}))}" in out
    assert "resolved 48 of 48, failed 0" in out


@pytest.mark.parametrize(
    ("name", "first_line"),
    [("pipeline.py", "pipeline: 200 files"), ("pipeline_async.py", "async pipeline: 200 files")],
)
def test_the_200_file_pipeline(name: str, first_line: str) -> None:
    out = run_example(name)
    assert out.startswith(first_line), out
    assert f"where the steps ran: 200 crunch on {HEAVY_LANE}, 200 write on io" in out
    assert "tokens: 800 submitted, 800 resolved, 0 failed, 0 discarded" in out
    assert "outputs on disk: 200" in out
