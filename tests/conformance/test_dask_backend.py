"""What only the Dask backend has: loading, options, the cluster-wide tier limit, worker loss,
Token arguments as Dask dependencies, priorities, and the cluster it starts by itself."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import assert_counts_add_up, eventually
from tokengate import (
    ConfigError,
    CoordinatorNotRunning,
    OperationsCoordinator,
    SerializationError,
    WorkerCrashed,
    task_token_guard,
)
from tokengate.backends import Backend, BackendUnavailable, resolve_backend
from tokengate.demos.cpu import fibonacci_operation

from .conftest import DASK_WORKERS, Harness
from .probes import HighWater, Journal
from .tasks import blocker, record, slow_write

distributed = pytest.importorskip(
    "distributed", reason="the Dask backend needs dask.distributed: pip install 'tokengate[dask]'"
)
import dask  # noqa: E402  (needs the extra)

from tokengate.backends import DaskBackend  # noqa: E402

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# -- loading ---------------------------------------------------------------------------------------
def test_importing_tokengate_does_not_import_dask() -> None:
    result = _python(
        """
        import sys, tokengate, tokengate.backends
        from tokengate import OperationsCoordinator
        OperationsCoordinator()
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_choosing_dask_without_the_extra_says_which_extra_to_install() -> None:
    result = _python(
        """
        import sys
        sys.modules['distributed'] = None  # as if dask[distributed] were not installed
        from tokengate import OperationsCoordinator
        from tokengate.backends import BackendUnavailable
        try:
            OperationsCoordinator(backend='dask')
        except BackendUnavailable as exc:
            assert isinstance(exc, ImportError)
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'tokengate[dask]'" in result.stdout
    assert issubclass(BackendUnavailable, ImportError)


@pytest.mark.parametrize(
    ("backend", "address", "fragment"),
    [
        ("ray", None, "unknown backend 'ray'"),
        ("local", "tcp://h:8786", "needs backend='dask'"),
        ("dask", 8786, "scheduler address"),
    ],
)
def test_bad_backend_choices_fail_at_construction(
    backend: Any, address: Any, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        OperationsCoordinator(backend=backend, address=address)


def test_bad_dask_backend_options() -> None:
    with pytest.raises(ConfigError, match="not both"):
        DaskBackend("tcp://h:8786", client=object())
    with pytest.raises(ConfigError, match="do not apply"):
        DaskBackend("tcp://h:8786", n_workers=2)
    with pytest.raises(ConfigError, match="n_workers"):
        DaskBackend(n_workers=0)
    with pytest.raises(ConfigError, match=r"distributed\.Client"):
        DaskBackend(client="tcp://h:8786")
    with pytest.raises(ConfigError, match="goes to the backend object"):
        resolve_backend(DaskBackend(), "tcp://h:8786")
    assert isinstance(resolve_backend("dask", None), Backend)
    assert resolve_backend("local", None) is None


def test_a_backend_that_cannot_start_leaves_the_coordinator_stopped() -> None:
    coordinator = OperationsCoordinator(
        backend=DaskBackend("tcp://127.0.0.1:1", cluster_options=None)
    )
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "0.2s"}),
        pytest.raises(OSError),
    ):
        coordinator.start()
    assert not coordinator.running
    with pytest.raises(CoordinatorNotRunning):
        fibonacci_operation(3)


# -- on the session cluster ------------------------------------------------------------------------
def test_a_tier_limit_holds_across_workers_and_clients(dask_harness: Harness) -> None:
    """Two coordinators (two Dask clients) share the cluster's SLOW semaphore: at most 3 writers
    run at once in total, spread over both worker processes."""
    first = dask_harness.coordinator(storage_limits={"SLOW": 3})
    second = dask_harness.coordinator(storage_limits={"SLOW": 3})
    assert first.backend is not None and second.backend is not None
    high_water, gate = dask_harness.high_water(), dask_harness.gate()
    tokens = []
    for coordinator in (first, second):  # the innermost running coordinator takes calls
        coordinator.stop()
    for coordinator in (first, second):
        coordinator.start()
        tokens += [slow_write(high_water, gate) for _ in range(6)]
    eventually(lambda: high_water.read()[0] == 3, what="three writers inside at once")
    assert first.tier_stats()["SLOW"].running + second.tier_stats()["SLOW"].running == 6
    gate.set()
    assert [t.get(timeout=30) for t in tokens] == ["written"] * 12
    assert high_water.read() == (0, 3)
    assert len({t.worker for t in tokens}) == DASK_WORKERS


def test_token_arguments_become_dask_dependencies(dask_harness: Harness) -> None:
    coordinator = dask_harness.coordinator()
    gate, journal = dask_harness.gate(), dask_harness.journal()
    running = blocker(gate)
    dependent = record(journal, "after", [running])
    backend: Any = coordinator.backend
    dep_key, key = backend._runner.key_of(running), backend._runner.key_of(dependent)

    def dependencies(dask_scheduler: Any) -> list[str]:
        ts = dask_scheduler.tasks.get(key)
        return [] if ts is None else [d.key for d in ts.dependencies]

    probe = dask_harness.cluster.probe_client
    eventually(lambda: probe.run_on_scheduler(dependencies) == [dep_key], what="the dependency")
    gate.set()
    assert dependent.get(timeout=10) == "after"


@task_token_guard(operation_type="light_probe", tags={"weight": "light"})
def light_probe() -> str:
    return "light"


@task_token_guard(operation_type="async_double", tags={"weight": "light"})
async def async_double(x: int) -> int:
    import asyncio

    await asyncio.sleep(0)
    return 2 * x


def test_an_argument_that_cannot_be_pickled_fails_its_token(dask_harness: Harness) -> None:
    """Dask pickles a call when it is sent: at the call, or, for a token parked until its
    dependency is sent, on the backend's own thread. Either way the token fails naming the
    argument; none is left pending (stop() would wait for it for ever)."""
    coordinator = dask_harness.coordinator(storage_limits={"SLOW": 1})
    gate, journal, high_water = (
        dask_harness.gate(),
        dask_harness.journal(),
        dask_harness.high_water(),
    )
    direct = record(journal, threading.Lock())  # type: ignore[arg-type]
    error = direct.exception(timeout=30)
    assert isinstance(error, SerializationError)
    assert "argument 2 of 'record'" in str(error) and "_thread.lock" in str(error)
    holder = slow_write(high_water, gate)
    waiting = slow_write(high_water, gate)  # no SLOW permit yet: not sent to Dask
    eventually(lambda: high_water.read()[0] == 1, what="the SLOW permit to be taken")
    later = record(journal, "later", waiting, threading.Lock())
    assert not later.done()  # parked until its dependency is sent
    gate.set()
    assert [holder.get(timeout=30), waiting.get(timeout=30)] == ["written"] * 2
    error = later.exception(timeout=30)
    assert isinstance(error, SerializationError)
    assert "argument 4 of 'record'" in str(error)
    coordinator.stop(timeout=30)
    snap = coordinator.stats()
    assert (snap.submitted, snap.resolved, snap.failed, snap.in_flight) == (4, 2, 2, 0)
    assert journal.labels() == []


def test_async_def_tasks_run_on_the_workers(dask_harness: Harness) -> None:
    dask_harness.coordinator()
    assert [t.get(timeout=10) for t in [async_double(i) for i in range(5)]] == [0, 2, 4, 6, 8]


def test_weight_maps_onto_dask_priority(dask_harness: Harness) -> None:
    coordinator = dask_harness.coordinator()
    gate = dask_harness.gate()
    heavy, light = blocker(gate), light_probe()
    backend: Any = coordinator.backend
    keys = {backend._runner.key_of(heavy): 2, backend._runner.key_of(light): 0}

    def priorities(dask_scheduler: Any) -> dict[str, int]:
        return {k: -dask_scheduler.tasks[k].priority[0] for k in keys if k in dask_scheduler.tasks}

    seen: dict[str, int] = {}  # the light task may end, and be forgotten, before both are seen

    def both_seen() -> bool:
        seen.update(dask_harness.cluster.probe_client.run_on_scheduler(priorities))
        return len(seen) == 2

    eventually(both_seen)
    assert seen == keys
    gate.set()
    assert heavy.get(timeout=10) == "released" and light.get(timeout=10) == "light"


def test_an_existing_client_is_used_and_left_open(dask_cluster: Any) -> None:
    client = distributed.Client(dask_cluster, set_as_default=False)
    try:
        with OperationsCoordinator(backend=DaskBackend(client=client)) as coordinator:
            assert fibonacci_operation(10).get(timeout=10) == 55
            assert coordinator.backend is not None
            assert "2 workers" in coordinator.backend.describe()
        assert client.status == "running"
        assert_counts_add_up(coordinator)
    finally:
        client.close()


def test_address_string_and_verbose_logs(
    dask_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="tokengate"),
        OperationsCoordinator(backend="dask", address=dask_cluster.scheduler_address),
    ):
        token = fibonacci_operation(20)
        assert token.get(timeout=10) == 6765
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("[DASK] Backend ready: dask scheduler tcp://") for m in messages)
    assert "Operations Coordinator started successfully!" in messages
    assert not any(m.startswith("[CORE_PINNED_QUEUE] Start") for m in messages)  # no lanes
    assert any(f"[ROUTING] Token {token.id} (heavy) → Pos" in m for m in messages)
    assert any(f"✓ Completed {token.id}" in m for m in messages)
    assert token.lane == "dask" and token.worker is not None and token.worker.startswith("tcp://")
    assert token.started_at is not None and token.finished_at is not None
    assert token.submitted_at <= token.started_at <= token.finished_at


def test_with_no_address_a_local_cluster_is_started_and_closed() -> None:
    coordinator = OperationsCoordinator(backend="dask")
    with coordinator:
        backend: Any = coordinator.backend
        cluster = backend.cluster
        assert isinstance(cluster, distributed.LocalCluster)
        assert [t.get(timeout=30) for t in map(fibonacci_operation, (10, 20))] == [55, 6765]
    assert cluster.status.name == "closed"
    assert backend.client is None
    assert_counts_add_up(coordinator)


def test_stop_with_a_timeout_discards_what_still_runs_on_the_cluster(
    dask_harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = dask_harness.coordinator()
    gate, started = dask_harness.gate(), dask_harness.gate()
    running = blocker(gate, started)
    assert started.wait(10)
    with caplog.at_level(logging.WARNING, logger="tokengate.dask"):
        coordinator.stop(timeout=0.2)
    assert running.discard_reason == "stopped"
    assert any("still running on the cluster" in r.getMessage() for r in caplog.records)
    gate.set()
    assert_counts_add_up(coordinator)


SEED_SCRIPT = """
from tokengate import OperationsCoordinator, task_token_guard
from tokengate.backends import DaskBackend

@task_token_guard(operation_type='fibonacci', tags={'weight': 'heavy'})
def fibonacci_operation(n):
    if n <= 1:
        return n
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

@task_token_guard(operation_type='chain_seed', tags={'weight': 'light'})
def chain_seed(value: int):
    return value * 3 + 7

@task_token_guard(operation_type='chain_finalize', tags={'weight': 'light'})
def chain_finalize(value: int, label: str = "result"):
    return {label: value, 'parity': 'even' if value % 2 == 0 else 'odd'}

def main():
    import os
    address = os.environ.get("TOKENGATE_TEST_ADDRESS")
    if address:  # a cluster whose workers never saw this script
        coordinator = OperationsCoordinator(backend="dask", address=address)
    else:  # a LocalCluster the backend starts: its workers re-import the script
        coordinator = OperationsCoordinator(backend=DaskBackend(n_workers=1, threads_per_worker=2))
    coordinator.start()
    try:
        args = [100, 200, 300, 150, 250, 180, 220, 280]
        tokens = [fibonacci_operation(n) for n in args]
        results = [token.get(timeout=30) for token in tokens]
        print(f"Results: {results == [fibonacci_operation.__wrapped__(n) for n in args]}")
        print(chain_finalize(chain_seed(5), label="r").get(timeout=10))
    finally:
        coordinator.stop()
    print(coordinator.stats())

if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("where", ["own LocalCluster", "address"])
def test_a_seed_script_runs_with_its_own_functions(
    where: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """Tasks defined in the script itself (``__main__``): a LocalCluster the backend starts
    re-imports the script in its workers; any other cluster gets them by value."""
    script = tmp_path / "seed_proof_1.py"
    script.write_text(SEED_SCRIPT, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    env.pop("TOKENGATE_TEST_ADDRESS", None)
    if where == "address":
        env["TOKENGATE_TEST_ADDRESS"] = request.getfixturevalue("dask_cluster").scheduler_address
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Results: True" in result.stdout
    assert "{'r': 22, 'parity': 'even'}" in result.stdout
    assert "Submitted : 10" in result.stdout and "Resolved  : 10  (100.0%)" in result.stdout


def test_the_mixed_demo_reports_the_same_on_dask(dask_cluster: Any, tmp_path: Any) -> None:
    """The same seed submits the same waves: the reports differ only in their timings."""
    from tokengate.demos.mixed import MixedOrchestrator

    snaps, reports = {}, {}
    for name, options in (
        ("local", {}),
        ("dask", {"backend": "dask", "address": dask_cluster.scheduler_address}),
    ):
        demo = MixedOrchestrator(
            duration=1.0, seed=3, workdir=str(tmp_path / name), say=lambda *_: None
        )
        with OperationsCoordinator(**options) as c:
            demo.run(c)
        snaps[name] = c.stats("FINAL")
        reports[name] = demo.report(snaps[name])
    local, on_dask = snaps["local"], snaps["dask"]
    assert on_dask.failed == 0 and on_dask.discarded == 0, reports["dask"]
    assert on_dask.submitted == local.submitted == on_dask.resolved, reports
    assert on_dask.render_dispatched() == local.render_dispatched()
    report = reports["dask"]
    assert "MIXED ORCHESTRATOR COMPLETE" in report
    assert "(100.0%)" in report
    assert "Operations dispatched:" in report


def test_the_cli_runs_the_mixed_demo_on_dask(
    dask_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokengate.cli import main

    address = dask_cluster.scheduler_address
    argv = ["demo", "mixed", "--backend", "dask", "--address", address, "--duration", "1"]
    assert main([*argv, "--plain", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"[BACKEND] dask scheduler {address}: {DASK_WORKERS} workers" in out
    assert "MIXED ORCHESTRATOR COMPLETE" in out
    assert "(100.0%)" in out and "Operations dispatched:" in out


# -- worker loss (its own cluster: workers die here) -----------------------------------------------
@pytest.fixture(scope="module")
def fragile_cluster() -> Iterator[Any]:
    """Two worker processes; the scheduler gives up on a task after killing 2 workers."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        )
    try:
        yield cluster
    finally:
        cluster.close()


@task_token_guard(operation_type="dies_once", tags={"weight": "heavy"})
def dies_once(journal: Journal, times: int = 1) -> int:
    run = journal.record("run")
    if run <= times:
        os._exit(1)  # the worker process dies mid-task, as if the OS killed it
    return os.getpid()


def test_a_worker_killed_mid_task_is_retried_and_nothing_is_lost(
    fragile_cluster: Any, tmp_path: Any
) -> None:
    journal = Journal(str(tmp_path / "journal"))
    with OperationsCoordinator(
        backend=DaskBackend(fragile_cluster.scheduler_address)
    ) as coordinator:
        token = dies_once(journal)
        others = [fibonacci_operation(n) for n in range(30)]
        pid = token.get(timeout=60)
        assert [t.get(timeout=60) for t in others] == [
            fibonacci_operation.__wrapped__(n) for n in range(30)
        ]
    assert isinstance(pid, int) and pid != os.getpid()
    assert journal.runs("run") == 2  # killed once, run again elsewhere
    snap = coordinator.stats()
    assert (snap.submitted, snap.resolved, snap.failed, snap.discarded) == (31, 31, 0, 0)


def test_a_task_that_keeps_killing_workers_fails_with_worker_crashed(
    fragile_cluster: Any, tmp_path: Any
) -> None:
    journal = Journal(str(tmp_path / "journal"))
    with OperationsCoordinator(backend=DaskBackend(fragile_cluster.scheduler_address)):
        token = dies_once(journal, times=99)
        with pytest.raises(WorkerCrashed, match="allowed-failures") as info:
            token.get(timeout=60)
    assert isinstance(info.value.__cause__, distributed.KilledWorker)
    assert journal.runs("run") == 2  # allowed-failures=1: one re-run, then give up
    assert token.state == "failed"


def test_dask_sizes_an_outcome_by_its_payload() -> None:
    """Dask's memory accounting (spilling) must see a result's real size, not the wrapper's."""
    from dask.sizeof import sizeof

    from tokengate.backends._dask_protocol import OK, Call, Outcome

    payload = b"x" * 5_000_000
    assert sizeof(Outcome(OK, payload, 0.0, 0.0, "tcp://w")) >= 5_000_000
    assert sizeof(Call("k", b"", None, None, None, (payload,), {})) >= 5_000_000


def test_high_water_probe_counts_across_processes(tmp_path: Any) -> None:
    """The probe the tier tests rely on: exact under concurrent processes."""
    high_water = HighWater(str(tmp_path / "hw"))
    high_water.enter()
    high_water.enter()
    high_water.leave()
    assert high_water.read() == (1, 2)


def test_the_dashboard_shows_the_coordinators_tokens_and_links_to_dasks(
    dask_harness: Harness,
) -> None:
    pytest.importorskip("uvicorn")
    from tokengate.dashboard._views import snapshot

    from .tasks import echo

    coordinator = dask_harness.coordinator()
    coordinator.serve_dashboard()
    assert echo(1).get(timeout=30) == ((1,), {})
    snap = snapshot(coordinator)
    assert snap["backend"] == "DaskBackend"
    assert snap["stats"]["resolved"] == 1
    assert snap["workers"] == []  # no local lanes
    link = snap["backend_dashboard"]
    assert link is not None and link.startswith("http://")


# -- share(): scatter once ---------------------------------------------------------------------
def _shared_keys(cluster: Any, prefix: str) -> dict[str, int]:
    """The scheduler's keys starting with ``prefix``, with how many workers hold each."""

    def find(dask_scheduler: Any) -> dict[str, int]:
        return {
            key: len(ts.who_has)
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith(prefix)
        }

    return cluster.probe_client.run_on_scheduler(find)  # type: ignore[no-any-return]


def test_share_scatters_once_to_every_worker_and_calls_send_no_copy(
    dask_harness: Harness,
) -> None:
    from .tasks import PICKLED, Blob, blob_part_sum

    coordinator = dask_harness.coordinator()
    blob = Blob(bytes(range(256)) * 4096)  # 1 MiB
    del PICKLED[:]
    shared = coordinator.share(blob)
    assert shared is blob  # the caller keeps using it as before
    assert len(PICKLED) <= 1  # scattered once
    held = _shared_keys(dask_harness.cluster, "Blob-")
    assert list(held.values()) == [DASK_WORKERS], held  # broadcast: every worker has it
    del PICKLED[:]
    tokens = [blob_part_sum(shared, i) for i in range(16)]
    assert [t.result(timeout=30) for t in tokens] == [sum(blob.data[i::16]) for i in range(16)]
    assert PICKLED == []  # no call pickled the object again
    assert coordinator.share(blob) is blob  # the same object: no second scatter, no new key
    assert PICKLED == [] and _shared_keys(dask_harness.cluster, "Blob-").keys() == held.keys()


def test_share_frees_the_workers_copies_once_the_object_is_gone(dask_harness: Harness) -> None:
    import gc

    from .tasks import Blob, blob_part_sum

    coordinator = dask_harness.coordinator()
    blob = coordinator.share(Blob(bytes(1 << 16)))
    assert len(_shared_keys(dask_harness.cluster, "Blob-")) == 1
    assert blob_part_sum(blob, 3, parts=4).result(timeout=30) == 0
    del blob
    gc.collect()
    eventually(
        lambda: not _shared_keys(dask_harness.cluster, "Blob-"),
        what="the scheduler to forget the shared object",
    )


def test_share_holds_an_object_without_weak_references_until_stop(dask_harness: Harness) -> None:
    from .tasks import blob_part_sum

    coordinator = dask_harness.coordinator()
    values = coordinator.share(list(range(64)))
    assert blob_part_sum(values, 1).result(timeout=30) == sum(range(64)[1::16])
    assert len(_shared_keys(dask_harness.cluster, "list-")) == 1
    coordinator.stop()
    eventually(
        lambda: not _shared_keys(dask_harness.cluster, "list-"),
        what="the scheduler to forget the shared list",
    )


def test_share_before_start_names_the_fix(dask_cluster: Any) -> None:
    coordinator = OperationsCoordinator(backend=DaskBackend(address=dask_cluster.scheduler_address))
    with pytest.raises(CoordinatorNotRunning, match="start the coordinator"):
        coordinator.share(b"x")
