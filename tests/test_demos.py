"""The demos as library code: public API only, the Quick-Proof's functions, stop, and B6's waves."""

from __future__ import annotations

import ast
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tokengate
from conftest import assert_counts_add_up
from tokengate import OperationsCoordinator
from tokengate.bench import _b6_mixed
from tokengate.demos import chain, cpu, endurance, io, mixed, seed_io

DEMO_DIR = Path(mixed.__file__).parent
DEMO_MODULES = sorted(p for p in DEMO_DIR.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", DEMO_MODULES, ids=lambda p: p.name)
def test_demos_use_only_the_public_api(path: Path) -> None:
    """A user can copy a demo: it imports tokengate's public names and other demos only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokengate"):
            if node.module == "tokengate":
                names = {alias.name for alias in node.names}
                assert names <= set(tokengate.__all__), names - set(tokengate.__all__)
            else:
                assert node.module.startswith("tokengate.demos."), node.module
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("tokengate") for a in node.names)


def test_the_seed_functions_compute_what_the_seed_says() -> None:
    with OperationsCoordinator(workers_per_core=1):
        fibs = [cpu.fibonacci_operation(n) for n in (0, 1, 10, 100)]
        assert [t.get(timeout=10) for t in fibs] == [0, 1, 55, 354224848179261915075]
        assert cpu.simple_operation(10).get(timeout=10) == 45
        assert cpu.complex_operation(3).get(timeout=10) == 9
        assert cpu.normal_processing([1, 2, 3]).get(timeout=10) == 14
        assert mixed.prime_operation(97).get(timeout=10) is True
        assert mixed.prime_operation(91).get(timeout=10) is False
        assert chain.start_chain(5).get(timeout=10) == chain.direct(5)
    assert cpu.heavy_operation.spec.weight == "heavy"
    assert seed_io.write_json_fast.spec.storage_speed == "FAST"
    assert seed_io.append_log_slow.spec.storage_speed == "SLOW"
    assert seed_io.write_blob_moderate.spec.storage_speed == "MODERATE"


DemoFactory = Callable[..., Any]


@pytest.mark.parametrize(
    "make",
    [
        cpu.CpuProof,
        io.IoProof,
        mixed.MixedOrchestrator,
        chain.ChainProof,
        endurance.EnduranceRun,
    ],
    ids=["cpu", "io", "mixed", "chain", "endurance"],
)
def test_a_set_stop_event_ends_a_demo_at_once(make: DemoFactory, tmp_path: Path) -> None:
    """With ``stop`` already set a demo does its first step at most, and its report renders."""
    said: list[str] = []
    demo = make(duration=600.0, seed=1, say=said.append)
    if hasattr(demo, "workdir"):
        demo.workdir = str(tmp_path)
    stop = threading.Event()
    stop.set()
    with OperationsCoordinator(workers_per_core=1) as coordinator:
        demo.run(coordinator, stop)
    assert_counts_add_up(coordinator)
    snap = coordinator.stats("FINAL")
    text = demo.report(snap)
    assert "[FINAL]" in text or "COMPLETE" in text
    assert demo.phase in ("done", "draining")


def test_mixed_waves_draw_from_the_seed_eleven_types() -> None:
    rng = random.Random(0)
    seen = set()
    sizes = []
    for wave in range(200):
        calls = mixed.plan_wave(rng, "/base", wave)
        sizes.append(len(calls))
        seen.update(fn.spec.operation_type for fn, _ in calls)
    assert min(sizes) >= 10 and max(sizes) <= 20
    assert len(seen) == 11
    gaps = [mixed.next_gap(rng) for _ in range(200)]
    assert min(gaps) >= 0.1 and max(gaps) <= 1.0


def test_b6_replays_the_same_waves_for_every_system() -> None:
    first = list(_b6_mixed.schedule(5.0, "/base"))
    again = list(_b6_mixed.schedule(5.0, "/base"))
    assert first == again
    assert [at for at, _ in first] == sorted(at for at, _ in first)
    assert all(at < 5.0 for at, _ in first)


def test_b6_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert _b6_mixed.percentile(values, 50) == 50.0
    assert _b6_mixed.percentile(values, 95) == 95.0
    assert _b6_mixed.percentile(values, 100) == 100.0
    assert _b6_mixed.percentile([3.0], 95) == 3.0
    assert _b6_mixed.percentile([], 50) == 0.0


def test_b6_drive_counts_every_task_with_a_plain_executor() -> None:
    """The driver on an executor that runs inline: counts add up, latencies measured."""
    from concurrent.futures import Future

    def inline(fn: Any, args: tuple[Any, ...]) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn.__wrapped__(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    figures = _b6_mixed.drive(inline, 0.05)
    assert figures["waves"] >= 1
    assert figures["submitted"] == figures["resolved"] + figures["failed"]
    assert figures["failed"] == 0
    assert figures["max_ms"] >= figures["p95_ms"] >= figures["p50_ms"] >= 0
