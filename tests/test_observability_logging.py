"""The Quick-Proof's Proof 4 log lines, each on its own ``tokengate.*`` logger, and the config
knobs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from conftest import HEAVY_ON_THREADS
from tokengate import ConfigError, OperationsCoordinator, task_token_guard

COORDINATOR_DEFAULTS = HEAVY_ON_THREADS
#: A failed token of an earlier test may be collected, and its error reported, at any time.
UNRETRIEVED = "tokengate.token"


# Proof 4's lines in the Quick-Proof's order (a subsequence of what verbose=True prints). Worker
# start lines come from the worker threads themselves, so only their presence is checked.
SEED_ORDER = [
    "Operations Coordinator - Initializing...",
    "Detecting CPU topology...",
    "CPU Topology Detected:",
    "Creating foundation components...",
    "[OVERFLOW_GUARD] Initialized",
    "  Base budget: ",
    "  Retry policies loaded for all complexity levels",
    "[GUARD_HOUSE] Passive Monitoring initialized",
    "  Mode: Post-execution analysis",
    "  Auto-blocking: DISABLED (observation only)",
    "[AFFINITY] Policy for",
    "Overflow guard initialized",
    "Guard House initialized",
    "Core affinity policy created",
    "Building execution pipeline...",
    "[CORE_PINNED_QUEUE] Initialized:",
    "Worker queue created",
    "Admission gate configured",
    "Operations Coordinator ready!",
    "Starting Operations Coordinator...",
    "[CORE_PINNED_QUEUE] Starting ",
    "[GATE] Admission gate started - full saturation mode",
    "Worker queue started",
    "Admission gate started",
    "Operations Coordinator started successfully!",
    "[ROUTING] Token seed_log_",
    "[WORKER_0_CORE_1] ✓ Completed seed_log_",
    "[DEBUG] Recorded: seed_log_",
    "Stopping Operations Coordinator...",
    "[GATE] Admission gate stopped",
    "[CORE_PINNED_QUEUE] Stopping all workers...",
    "[CORE_PINNED_QUEUE] All workers stopped",
    "All components stopped",
    "Operations shutdown complete!",
]


@task_token_guard(operation_type="seed_log", tags={"weight": "heavy"})
def seed_log(n: int) -> int:
    return n


def test_verbose_prints_proof_4_in_the_seed_order(capsys: pytest.CaptureFixture[str]) -> None:
    with OperationsCoordinator(process_lane=False, workers_per_core=1, cores=2, verbose=True):
        seed_log(1).get(timeout=10)
    out = capsys.readouterr().out
    position = 0
    for line in SEED_ORDER:
        found = out.find(line, position)
        assert found >= 0, f"{line!r} missing (or out of order) after position {position}:\n{out}"
        position = found + len(line)
    assert re.search(r"  Base budget: \d+ MB\n", out)
    assert re.search(r"\[CORE_PINNED_QUEUE\] Starting \d+ mailbox workers\.\.\.\n", out)
    for worker in ("[worker_0_core_1] Started on Core 1 (local 0)", "[worker_0_core_1] Stopped"):
        assert worker in out


def test_each_part_logs_on_its_own_logger(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="tokengate"),
        OperationsCoordinator(
            process_lane=False, workers_per_core=1, cores=2, trace=True
        ) as coordinator,
    ):
        seed_log(1).get(timeout=10)
        coordinator.serve_metrics()
        coordinator.export_trace(tmp_path / "t.json")
    where = {}
    for record in caplog.records:
        where.setdefault(record.getMessage().split("\n")[0], record.name)

    def logger_of(prefix: str) -> str:
        return next(name for message, name in where.items() if message.startswith(prefix))

    assert logger_of("[OVERFLOW_GUARD] Initialized") == "tokengate.overflow"
    assert logger_of("Overflow guard initialized") == "tokengate.overflow"
    assert logger_of("[GUARD_HOUSE] Passive Monitoring") == "tokengate.guard_house"
    assert logger_of("Guard House initialized") == "tokengate.guard_house"
    assert logger_of("[ROUTING] Token seed_log_") == "tokengate.routing"
    assert logger_of("[WORKER_0_CORE_1] ✓ Completed") == "tokengate.worker"
    assert logger_of("[DEBUG] Recorded: seed_log_") == "tokengate.stats"
    assert logger_of("[worker_0_core_1] Started on Core 1") == "tokengate.worker"
    assert logger_of("[METRICS] Serving Prometheus metrics on http://127.0.0.1:") == (
        "tokengate.metrics"
    )
    assert logger_of("[TRACE] Wrote 1 spans to") == "tokengate.trace"
    assert logger_of("Operations shutdown complete!") == "tokengate.coordinator"


def test_info_shows_one_start_and_one_stop_line_not_the_banner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # logging.basicConfig(level=INFO) must not print the Quick-Proof's banner and a start/stop line
    # per worker: start-up detail is DEBUG (verbose=True still prints it, test above).
    caplog.set_level(logging.INFO)
    with OperationsCoordinator(workers_per_core=2, cores=2):
        assert seed_log(1).get(timeout=10) == 1
        assert seed_log(2).get(timeout=10) == 2
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("tokengate") and r.name != UNRETRIEVED
    ]
    assert lines == [
        "Operations Coordinator started successfully!",
        "Operations shutdown complete!",
    ]


def test_turning_on_one_logger_shows_only_that_part(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with (
        caplog.at_level(logging.DEBUG, logger="tokengate.guard_house"),
        OperationsCoordinator(process_lane=False, workers_per_core=1, cores=1),
    ):
        seed_log(1).get(timeout=10)
    records = [r for r in caplog.records if r.name != UNRETRIEVED]
    names = {r.name for r in records}
    assert names == {"tokengate.guard_house"}, names
    messages = [r.getMessage().split("\n")[0] for r in records]
    assert messages == ["[GUARD_HOUSE] Passive Monitoring initialized", "Guard House initialized"]


def test_a_level_changed_while_running_applies_from_the_next_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The hot path reads logging's own cache of level answers before asking isEnabledFor:
    # a change of level (which empties that cache) must show at once, both ways.
    caplog.set_level(logging.WARNING)
    routing = logging.getLogger("tokengate.routing")

    def routed(n: int) -> bool:
        caplog.clear()
        seed_log(n).get(timeout=10)
        return any(r.name == "tokengate.routing" for r in caplog.records)

    with OperationsCoordinator(process_lane=False, workers_per_core=1, cores=1):
        assert not routed(1)  # answers cached: DEBUG is off
        with caplog.at_level(logging.DEBUG, logger="tokengate.routing"):
            assert routed(2)
            routing.disabled = True  # not in the cache; isEnabledFor still honours it
            try:
                assert not routed(3)
            finally:
                routing.disabled = False
        assert not routed(4)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"guard_house": "on"}, "guard_house must be True or False, got 'on'"),
        ({"auto_block": 1}, "auto_block must be True or False, got 1"),
        ({"auto_block": True, "guard_house": False}, "auto_block=True needs the Guard House"),
        ({"block_after": 0}, "block_after must be a whole number >= 1, got 0"),
        ({"block_cooldown": -1}, "block_cooldown must be a positive number of seconds, got -1"),
        ({"block_cooldown": float("inf")}, "block_cooldown is inf seconds"),
        ({"memory_check_interval": 0}, "memory_check_interval must be a positive number"),
        # a wait past time_t killed the Overflow Guard's thread; 2**1100 raised OverflowError
        ({"memory_check_interval": 1e12}, "at most 2000000 seconds"),
        ({"memory_check_interval": 2**1100}, "an int of 1101 bits"),
        ({"overflow_guard": None}, "overflow_guard must be True or False"),
        ({"memory_budget": "huge"}, "memory_budget must be a number of bytes"),
        ({"trace": "yes"}, "trace must be True or False"),
        ({"trace_buffer": 0}, "trace_buffer must be a whole number >= 1, got 0"),
        ({"trace_buffer": 2.5}, "got 2.5"),
    ],
)
def test_bad_observability_options(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        OperationsCoordinator(process_lane=False, **options)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_memory_budget_is_normalised_to_bytes() -> None:
    coordinator = OperationsCoordinator(process_lane=False, memory_budget="64MB")
    assert coordinator.config.memory_budget == 64 << 20
    assert coordinator.overflow_guard.budget == 64 << 20
