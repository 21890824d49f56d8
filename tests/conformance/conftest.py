"""The conformance harness: the same behavioural tests against every backend.

``harness`` is parametrised over ``local`` (the coordinator's own lanes) and ``dask`` (a
``LocalCluster`` of 2 worker processes with 4 threads each, started once for this package by the
tests themselves). A test asks the harness for a started coordinator and for probes that work on
both sides of a process boundary; every coordinator is stopped at teardown and its counts must
add up. Without dask installed the ``dask`` half is skipped, saying why.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import assert_counts_add_up
from tokengate import OperationsCoordinator, Token

from .probes import Gate, HighWater, Journal

DASK_WORKERS = 2
DASK_THREADS = 4

try:
    import distributed
except ImportError:  # pragma: no cover - the suite installs the dask extra
    distributed = None


@pytest.fixture(scope="package")
def dask_cluster() -> Iterator[Any]:
    """One LocalCluster for this package's tests (it starts in well under a second), closed
    after them: the rest of the suite runs without Dask processes alongside."""
    if distributed is None:
        pytest.skip("dask.distributed is not installed: pip install 'tokengate[dask]'")
    # Workers log task failures the tests provoke on purpose; keep them out of the output.
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    # Without the Active Memory Manager: its ReduceReplicas policy drops, every 2 s, the extra
    # replicas share() broadcasts, so what the tests read of them would depend on timing.
    import dask

    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False}):
        cluster = distributed.LocalCluster(
            n_workers=DASK_WORKERS,
            threads_per_worker=DASK_THREADS,
            processes=True,
            dashboard_address=":0",  # any free port: 8787 may be taken, and Dask warns
            silence_logs=logging.CRITICAL,
        )
    client = distributed.Client(cluster, set_as_default=False)
    cluster.probe_client = client  # for the gates the tests create
    try:
        yield cluster
    finally:
        client.close()
        cluster.close()


class Harness:
    """Coordinators and probes for one backend."""

    _names = itertools.count()

    def __init__(
        self, name: str, cluster: Any, tmp: str, defaults: dict[str, Any] | None = None
    ) -> None:
        self.name = name
        self.cluster = cluster
        self.tmp = tmp
        self.defaults = dict(defaults or {})
        self.made: list[OperationsCoordinator] = []

    @property
    def dask(self) -> bool:
        return self.name == "dask"

    def coordinator(self, **options: Any) -> OperationsCoordinator:
        """A started coordinator on this backend (stopped, and checked, at teardown).

        The test module's ``COORDINATOR_DEFAULTS`` apply first (the convention of
        ``tests/conftest.py``), then ``options``."""
        options = {**self.defaults, **options}
        if self.dask:
            from tokengate.backends import DaskBackend

            options.setdefault("backend", DaskBackend(address=self.cluster.scheduler_address))
        else:
            options.setdefault("workers_per_core", 2)
        coordinator = OperationsCoordinator(**options).start()
        self.made.append(coordinator)
        return coordinator

    def gate(self) -> Gate:
        if self.dask:
            name = f"tokengate-test-gate-{os.getpid()}-{next(self._names)}"
            return distributed.Event(name, client=self.cluster.probe_client)  # type: ignore[no-any-return]
        return threading.Event()

    def journal(self) -> Journal:
        return Journal(os.path.join(self.tmp, f"journal-{next(self._names)}"))

    def high_water(self) -> HighWater:
        return HighWater(os.path.join(self.tmp, f"high-water-{next(self._names)}"))

    def forgotten(self, coordinator: OperationsCoordinator, token: Token[Any]) -> bool:
        """Whether a discarded token can no longer start anywhere (on Dask: the scheduler has
        forgotten its task)."""
        if not self.dask:
            return True
        backend: Any = coordinator.backend
        key = backend._runner.key_of(token)

        def known(dask_scheduler: Any) -> bool:
            return key in dask_scheduler.tasks

        return not self.cluster.probe_client.run_on_scheduler(known)


@pytest.fixture
def dask_harness(dask_cluster: Any) -> Iterator[Harness]:
    """A harness on the session's Dask cluster only (for behaviour that exists there alone)."""
    with tempfile.TemporaryDirectory(prefix="tokengate-dask-") as tmp:
        harness = Harness("dask", dask_cluster, tmp)
        yield harness
        for coordinator in harness.made:
            coordinator.stop(cancel_pending=True, timeout=10)
            assert_counts_add_up(coordinator)


@pytest.fixture(params=["local", "dask"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    cluster = request.getfixturevalue("dask_cluster") if request.param == "dask" else None
    with tempfile.TemporaryDirectory(prefix="tokengate-conformance-") as tmp:
        defaults = getattr(request.module, "COORDINATOR_DEFAULTS", {})
        h = Harness(request.param, cluster, tmp, defaults)
        yield h
        for coordinator in h.made:
            coordinator.stop(cancel_pending=True, timeout=10)
            assert_counts_add_up(coordinator)


Make = Callable[..., OperationsCoordinator]
