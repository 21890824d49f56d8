"""The live view (``tokengate demo`` on a terminal, ``coordinator.live()``) fits 80 x 24."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tokengate import OperationsCoordinator
from tokengate.cli._display import Status, read_status, render_rich

pytest.importorskip("rich")

Make = Callable[..., OperationsCoordinator]
HEADERS = ("submitted", "resolved", "failed", "discarded", "retried", "in flight", "p50", "p95")


def render(status: Status) -> list[str]:
    from rich.console import Console

    console = Console(width=80, height=24, record=True, force_terminal=True)
    console.print(render_rich(status))
    return console.export_text().rstrip("\n").split("\n")


def assert_fits(lines: list[str]) -> None:
    assert len(lines) <= 24, "\n".join(lines)
    assert all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    for header in (*HEADERS, "lane", "workers", "load", "per worker", "tier", "limit"):
        assert header in text, f"{header!r} missing or cut:\n{text}"


def test_the_demo_view_of_this_machine_fits_80_by_24(make_coordinator: Make) -> None:
    coordinator = make_coordinator(cores=2, workers_per_core=4)
    lines = render(read_status(coordinator, None, "mixed", 0.0, hint="(Ctrl-C stops cleanly)"))
    assert_fits(lines)
    text = "\n".join(lines)
    assert "…" not in text  # nothing cut: the I/O lane's 16 workers included
    assert lines[0].startswith("tokengate demo mixed") and "(Ctrl-C stops cleanly)" in lines[0]
    assert "core 0" not in text  # the I/O lane is not pinned, and says so
    assert "io (unpinned)" in text
    assert "thread core 1" in text and "thread core 2" in text


def test_a_many_core_view_folds_each_lane_into_one_row(make_coordinator: Make) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=1)
    real = read_status(coordinator, None, "mixed", 0.0)
    queues = {
        "thread": {core: [3, 0, 12, 1] for core in range(1, 33)},
        "io": {0: [1] * 40},
        "process": {core: [1] for core in range(1, 33)},
    }
    big = Status(
        demo="mixed",
        phase="waves",
        elapsed=12345.6,
        duration=20000,
        snap=real.snap,
        tiers=real.tiers,
        queues=queues,
        title="tokengate demo mixed",
        hint="(Ctrl-C stops cleanly)",
    )
    lines = render(big)
    assert_fits(lines)
    text = "\n".join(lines)
    assert "thread cores 1-32" in text and "process cores 1-32" in text
    assert "io (unpinned)" in text and "core 0" not in text
