"""Topology: explicit values, detection on this machine, and thread pinning."""

from __future__ import annotations

import logging
import os
import threading

import psutil
import pytest

from tokengate._errors import ConfigError
from tokengate._topology import Topology, detect_topology, pin_current_thread

SEED_TOPOLOGY_BANNER = """\
CPU Topology Detected:
  Physical cores: 8
  Logical cores: 8
  SMT enabled: False
  SMT ratio: 1.0x
  Available cores: 8"""

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="os.sched_setaffinity not available"
)


def test_seed_example_properties(eight_cores: Topology) -> None:
    topo = eight_cores
    assert topo.smt_enabled is False
    assert topo.smt_ratio == 1.0
    assert topo.core_count == 8


def test_smt_machine() -> None:
    topo = Topology(physical_cores=4, logical_cores=8, available_cpus=tuple(range(8)))
    assert topo.smt_enabled is True
    assert topo.smt_ratio == 2.0
    assert "  SMT enabled: True\n  SMT ratio: 2.0x\n" in topo.banner()


def test_banner_gives_no_worker_advice_that_nothing_follows() -> None:
    # Worker counts "recommended" per weight sized no pool: the banner shows only facts.
    topo = Topology(physical_cores=8, logical_cores=16, available_cpus=(0, 1))
    assert topo.core_count == 2
    assert "Recommended" not in topo.banner()
    assert not hasattr(topo, "recommended_workers")


def test_banner_matches_seed_exactly(eight_cores: Topology) -> None:
    assert eight_cores.banner() == SEED_TOPOLOGY_BANNER


def test_available_cpus_are_sorted_and_deduplicated() -> None:
    topo = Topology(physical_cores=2, logical_cores=4, available_cpus=(3, 1, 3, 0))
    assert topo.available_cpus == (0, 1, 3)
    assert topo == Topology(physical_cores=2, logical_cores=4, available_cpus=(0, 1, 3))


def test_core_count_is_at_least_one() -> None:
    topo = Topology(physical_cores=1, logical_cores=1, available_cpus=())
    assert topo.core_count == 1


@pytest.mark.parametrize("field", ["physical_cores", "logical_cores"])
@pytest.mark.parametrize("bad", [0, -3, True, 2.0])
def test_bad_counts_raise_config_error_naming_value(field: str, bad: object) -> None:
    kwargs: dict[str, object] = {"physical_cores": 2, "logical_cores": 2, "available_cpus": (0,)}
    kwargs[field] = bad
    with pytest.raises(ConfigError, match=field) as info:
        Topology(**kwargs)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


def test_bad_cpu_id_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="-1"):
        Topology(physical_cores=1, logical_cores=1, available_cpus=(0, -1))


def test_cpu_for_core_maps_one_based_numbers_onto_available_cpus() -> None:
    topo = Topology(physical_cores=4, logical_cores=8, available_cpus=(2, 4, 6))
    assert [topo.cpu_for_core(k) for k in (1, 2, 3, 4)] == [2, 4, 6, 2]
    with pytest.raises(ConfigError, match="0"):
        topo.cpu_for_core(0)


def test_detect_topology_agrees_with_os_and_psutil() -> None:
    detect_topology.cache_clear()
    topo = detect_topology()
    if hasattr(os, "sched_getaffinity"):
        expected_cpus = tuple(sorted(os.sched_getaffinity(0)))
    else:  # pragma: no cover - non-Linux
        expected_cpus = tuple(range(os.cpu_count() or 1))
    assert topo.available_cpus == expected_cpus
    assert topo.core_count == len(expected_cpus)
    assert topo.logical_cores == (psutil.cpu_count() or os.cpu_count())
    physical = psutil.cpu_count(logical=False) or topo.logical_cores
    assert topo.physical_cores == min(physical, topo.logical_cores)
    assert topo.smt_enabled == (topo.logical_cores > topo.physical_cores)


def test_detect_topology_is_memoised() -> None:
    assert detect_topology() is detect_topology()


def test_detect_topology_falls_back_when_psutil_cannot_count_physical(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = psutil.cpu_count

    def fake_cpu_count(logical: bool = True) -> int | None:
        return real() if logical else None

    monkeypatch.setattr(psutil, "cpu_count", fake_cpu_count)
    detect_topology.cache_clear()
    try:
        topo = detect_topology()
        assert topo.physical_cores == topo.logical_cores
        assert topo.smt_enabled is False
    finally:
        detect_topology.cache_clear()


def run_in_fresh_thread(target_cpus: object) -> tuple[bool, set[int]]:
    """Pin a new thread and report what it sees, so the test thread itself stays unpinned."""
    result: dict[str, object] = {}

    def body() -> None:
        result["pinned"] = pin_current_thread(target_cpus)  # type: ignore[arg-type]
        result["seen"] = set(os.sched_getaffinity(0))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    return result["pinned"], result["seen"]  # type: ignore[return-value]


@needs_affinity
def test_pin_current_thread_pins_only_the_calling_thread() -> None:
    before = os.sched_getaffinity(0)
    cpu = max(before)
    pinned, seen = run_in_fresh_thread([cpu])
    assert pinned is True
    assert seen == {cpu}
    assert os.sched_getaffinity(0) == before


@needs_affinity
def test_pin_current_thread_accepts_any_iterable() -> None:
    before = os.sched_getaffinity(0)
    pinned, seen = run_in_fresh_thread(iter(sorted(before)))
    assert pinned is True
    assert seen == before


@needs_affinity
@pytest.mark.parametrize("bad", [[4095], [1_000_000], [-1], [], [2**40], ["a"], None])
def test_pin_current_thread_refused_returns_false(
    bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    before = os.sched_getaffinity(0)
    with caplog.at_level(logging.DEBUG, logger="tokengate.topology"):
        pinned, seen = run_in_fresh_thread(bad)
    assert pinned is False
    assert seen == before
    assert any(r.name == "tokengate.topology" for r in caplog.records)


def test_pin_current_thread_without_os_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)
    assert pin_current_thread([0]) is False
