"""Reliability suite fixtures: a leak check around every test and the fault ledger's report."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict

import pytest

from ._support import LEDGER, Resources, ledger_table
from ._tasks import GATE, HANG


@pytest.fixture
def resources() -> Iterator[Resources]:
    """Threads and child processes alive before the test; the test asserts ``leaks() == []``."""
    yield Resources.now()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER:
        return
    terminalreporter.section("tokengate fault ledger")
    terminalreporter.write_line(ledger_table())
    path = os.environ.get("TOKENGATE_FAULT_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump([asdict(e) for e in LEDGER], fh, indent=2)


@pytest.fixture(autouse=True)
def _gates_open_after_each_test() -> Iterator[None]:
    """Gated and hanging tasks start closed and are always let go at the end of a test."""
    GATE.clear()
    HANG.clear()
    yield
    GATE.set()
    HANG.set()
