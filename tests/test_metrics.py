"""Prometheus metrics: scraped over HTTP on loopback and parsed with prometheus_client.parser."""

from __future__ import annotations

import gc
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import GATE, run_code
from tokengate import (
    CoordinatorNotRunning,
    OperationsCoordinator,
    TokenGateCollector,
    task_token_guard,
)
from tokengate.observability._metrics import METRICS

Make = Callable[..., OperationsCoordinator]


@task_token_guard(operation_type="mx_light", tags={"weight": "light"})
def light(x: int) -> int:
    return x


@task_token_guard(operation_type="mx_fail", tags={"weight": "medium"})
def fail(x: int) -> int:
    raise ValueError(x)


@task_token_guard(operation_type="mx_flaky", tags={"weight": "light", "retries": 1})
def flaky(state: list[int]) -> int:
    state.append(1)
    if len(state) == 1:
        raise ConnectionResetError("once")
    return len(state)


@task_token_guard(operation_type="mx_hold", tags={"weight": "heavy", "storage_speed": "SLOW"})
def hold(started: threading.Event) -> str:
    started.set()
    assert GATE.wait(30)
    return "held"


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[dict[str, Any], Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: Samples = {}
    for family in families.values():
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_scrape_over_http(make_coordinator: Make) -> None:
    # One worker per core and no resizing: the worker counts below are fixed, and the medium
    # and light tokens share core 2's one worker, so the failures' Guard House hooks (run on
    # that worker after get() wakes) are done before the later tokens there complete.
    coordinator = make_coordinator(workers_per_core=1, convergence=False)
    for i in range(5):
        light(i).get(timeout=10)
    for i in range(2):
        with pytest.raises(ValueError):
            fail(i).get(timeout=10)
    assert flaky([]).get(timeout=10) == 2
    coordinator.set_storage_limit("SLOW", 1)
    started = threading.Event()
    held = hold(started)
    assert started.wait(10)
    assert hold(threading.Event()).cancel()  # waited for the SLOW permit: discarded
    coordinator.count_event("convergence_swaps", 3)
    coordinator.count_event("process_restarts")
    coordinator.count_event("something_new", 2)

    port = coordinator.serve_metrics(port=0)
    assert isinstance(port, int) and port > 0
    families, samples = scrape(port)

    op = {"operation_type": "mx_light", "weight": "light"}
    assert value(samples, "tokengate_tokens_submitted_total", **op) == 5
    assert value(samples, "tokengate_tokens_resolved_total", **op) == 5
    failing = {"operation_type": "mx_fail", "weight": "medium"}
    assert value(samples, "tokengate_tokens_failed_total", **failing) == 2
    assert value(samples, "tokengate_tokens_discarded_total", **failing) == 0
    flaky_op = {"operation_type": "mx_flaky", "weight": "light"}
    assert value(samples, "tokengate_tokens_retried_total", **flaky_op) == 1
    holding = {"operation_type": "mx_hold", "weight": "heavy"}
    assert value(samples, "tokengate_tokens_in_flight", **holding) == 1
    assert value(samples, "tokengate_tokens_discarded_total", **holding) == 1

    assert families["tokengate_tokens_submitted"].type == "counter"
    latency = families["tokengate_token_latency_seconds"]
    assert latency.type == "histogram"
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in latency.samples
        if s.name.endswith("_bucket") and s.labels["operation_type"] == "mx_light"
    ]
    assert buckets[-1] == (float("inf"), 5)
    assert [n for _, n in buckets] == sorted(n for _, n in buckets)  # cumulative
    assert value(samples, "tokengate_token_latency_seconds_count", **op) == 5
    assert value(samples, "tokengate_token_latency_seconds_sum", **op) > 0

    cores = coordinator.queue_depths()
    for core, loads in cores.items():
        lane = {"lane": "thread", "core": str(core)}
        assert value(samples, "tokengate_workers", **lane) == len(loads) == 1
        assert value(samples, "tokengate_queue_depth", **lane) == 0
    busy = {
        dict(labels)["lane"]: v
        for (name, labels), v in samples.items()
        if name == "tokengate_workers_busy" and v
    }
    assert busy == {"io": 1}  # the held token: a storage-tier task runs on the I/O lane

    assert value(samples, "tokengate_storage_in_flight", tier="SLOW") == 1
    assert value(samples, "tokengate_storage_limit", tier="SLOW") == 1
    assert value(samples, "tokengate_storage_limit", tier="INSANE") == 70
    assert value(samples, "tokengate_storage_waiting", tier="FAST") == 0

    assert value(samples, "tokengate_convergence_swaps_total") == 3
    assert value(samples, "tokengate_process_restarts_total") == 1
    assert value(samples, "tokengate_events_total", event="something_new") == 2

    assert value(samples, "tokengate_admission_paused", reason="overflow_guard") == 0
    assert value(samples, "tokengate_memory_rss_bytes") > 0
    assert value(samples, "tokengate_memory_budget_bytes") == coordinator.overflow_guard.budget
    assert value(samples, "tokengate_guard_house_runs_total", operation_type="mx_flaky") == 2
    assert value(samples, "tokengate_guard_house_errors_total", operation_type="mx_fail") == 2
    assert value(samples, "tokengate_coordinator_running") == 1
    assert "process_resident_memory_bytes" in families or sys.platform != "linux"

    GATE.set()
    held.get(timeout=10)
    _, samples = scrape(port)  # read at scrape time: the values moved
    assert value(samples, "tokengate_tokens_in_flight", **holding) == 0
    assert value(samples, "tokengate_storage_in_flight", tier="SLOW") == 0
    assert value(samples, "tokengate_storage_high_water", tier="SLOW") == 1


def test_names_follow_prometheus_conventions() -> None:
    for name, kind, labels, doc in METRICS:
        assert name.startswith("tokengate_") and name == name.lower(), name
        assert not name.endswith("_total"), name  # the client appends it to counters
        assert kind in ("counter", "gauge", "histogram"), name
        if "seconds" in name or "bytes" in name:
            assert name.endswith(("_seconds", "_bytes")), name
        assert doc.endswith("."), name
        assert all(label.isidentifier() for label in labels), name


def test_server_stops_with_the_coordinator() -> None:
    coordinator = OperationsCoordinator(workers_per_core=1).start()
    try:
        port = coordinator.serve_metrics()
        light(1).get(timeout=10)
        scrape(port)
    finally:
        coordinator.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    with pytest.raises(CoordinatorNotRunning, match="serve_metrics"):
        coordinator.serve_metrics()


def test_collector_with_any_registry(coordinator: OperationsCoordinator) -> None:
    light(1).get(timeout=10)
    registry = CollectorRegistry()
    registry.register(TokenGateCollector(coordinator, buckets=(0.001, 1.0)))
    text = generate_latest(registry).decode()
    assert 'tokengate_tokens_resolved_total{operation_type="mx_light",weight="light"} 1.0' in text
    assert 'le="0.001"' in text and 'le="1.0"' in text and 'le="0.005"' not in text
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(TokenGateCollector(coordinator))  # same names twice: refused


def test_metrics_collector_shortcut(coordinator: OperationsCoordinator) -> None:
    registry = CollectorRegistry()
    registry.register(coordinator.metrics_collector(buckets=(0.5,)))
    assert b"tokengate_coordinator_running 1.0" in generate_latest(registry)


def test_collector_does_not_keep_the_coordinator_alive() -> None:
    collector = TokenGateCollector(OperationsCoordinator())
    gc.collect()  # the coordinator refers to itself through its middleware and lanes
    assert list(collector.collect()) == []


def test_bad_arguments(coordinator: OperationsCoordinator) -> None:
    with pytest.raises(ValueError, match=r"port must be an int in 0\.\.65535"):
        coordinator.serve_metrics(port=70000)
    with pytest.raises(ValueError, match="buckets must be positive"):
        TokenGateCollector(coordinator, buckets=(-1.0,))


def test_missing_extra_says_how_to_install(
    coordinator: OperationsCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'tokengate\[metrics\]'"):
        coordinator.serve_metrics()
    with pytest.raises(ImportError, match=r"pip install 'tokengate\[metrics\]'"):
        TokenGateCollector(coordinator)


def test_importing_tokengate_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, tokengate\n"
        "c = tokengate.OperationsCoordinator(workers_per_core=1).start()\n"
        "c.stop()\n"
        "bad = [m for m in sys.modules if m.startswith(('prometheus_client', 'wsgiref'))]\n"
        "assert not bad, bad\n"
    )
    run_code(code, timeout=60)
