"""DaskBackend: run the same decorated functions on a Dask cluster.

``OperationsCoordinator(backend="dask")`` starts a ``LocalCluster`` sized to the machine;
``OperationsCoordinator(backend="dask", address="tcp://host:8786")`` connects to a running
scheduler; ``OperationsCoordinator(backend=DaskBackend(client=client))`` uses a client you already
have (and leaves it open). Nothing else changes for the caller: calls return Tokens at once,
``get(timeout)``, chains, nested calls, cancellation, ``stop()``, ``stats()`` and middleware work
as on the local backend. How each tag maps onto Dask is in docs/guide/dask.md:

============== =============================================================================
weight         Dask ``priority`` (heavy 2, medium 1, light 0); FIFO within a weight
priority       orders within a weight (the tag, or ``fn.options(priority=...)``), sent as part
               of Dask's ``priority`` (below the weight's level)
rate           client-side: the coordinator's own RateLimiter, before a token is sent (Dask's
               own retries of a sent task are not rate limited)
storage_speed  a client-side permit (the coordinator's own StorageThrottle: waiting tokens are
               not sent, so they hold no worker thread) *and* a cluster-wide
               ``distributed.Semaphore`` per tier held while the body runs, so the limit holds
               across every worker and every client sharing the cluster
retries        Dask ``retries``, with tokengate's retryable-exception rule applied on the worker
               (Dask would retry everything); worker loss: Dask's own rescheduling
               (``distributed.scheduler.allowed-failures``), ``KilledWorker`` -> WorkerCrashed
deadline       checked when the task starts on the worker (wall clock), discarded if late
timeout        the body runs on (a thread cannot be killed); at the limit the token fails with
               ``TaskTimeout`` and the late result is dropped and logged, as on thread lanes
executor       ignored: every task runs in a worker process's thread pool
============== =============================================================================

The client-side half (this module and ``_dask_runner``) creates no Token of its own: the
coordinator creates and counts every token, this backend sends it, and the runner ends it through
the coordinator's completion path (``Completion.finish``: the counts, middleware and logs). The
worker side is ``_dask_task``; what the two sides exchange is in the leaf module
``_dask_protocol``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import ConfigError, CoordinatorNotRunning, Overloaded
from .._token import Token
from ._base import Backend
from ._dask_protocol import Context
from ._dask_runner import Route, Runner
from ._dask_shared import ClusterShares
from ._dask_task import close_worker_runner, connect_worker_client, executing_keys, run_task

try:
    import distributed
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "the Dask backend needs dask.distributed: pip install 'tokengate[dask]'"
    ) from exc

if TYPE_CHECKING:
    from .._decorator import TaskFunction
    from .._spec import TaskSpec
    from ._base import BackendHost

__all__ = ["DaskBackend"]

_S = TypeVar("_S")

log = logging.getLogger("tokengate.dask")
_INFO = logging.INFO


class DaskBackend(Backend):
    """Runs an :class:`~tokengate.OperationsCoordinator`'s tokens on a Dask cluster.

    ``address``: a running scheduler (``"tcp://10.0.0.5:8786"``). ``client``: an existing
    ``distributed.Client`` to use (not closed on stop). With neither, a ``LocalCluster`` of
    worker *processes* is started with the coordinator and closed with it; ``n_workers``,
    ``threads_per_worker`` and ``cluster_options`` (more ``LocalCluster`` keywords) size it,
    and by default Dask sizes it to the machine.
    """

    name = "dask"

    def __init__(
        self,
        address: str | None = None,
        *,
        client: Any = None,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        cluster_options: Mapping[str, Any] | None = None,
    ) -> None:
        if address is not None and client is not None:
            raise ConfigError("give DaskBackend either address= or client=, not both")
        if address is not None and not isinstance(address, str):
            raise ConfigError(
                f"address must be a scheduler address such as 'tcp://10.0.0.5:8786', "
                f"got {address!r}"
            )
        if client is not None and not isinstance(client, distributed.Client):
            raise ConfigError(f"client must be a distributed.Client, got {client!r}")
        local = (n_workers, threads_per_worker, cluster_options)
        if (address is not None or client is not None) and any(x is not None for x in local):
            raise ConfigError(
                "n_workers, threads_per_worker and cluster_options size the LocalCluster "
                "DaskBackend starts; they do not apply with address= or client="
            )
        for label, value in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{label} must be a whole number >= 1, got {value!r}")
        self.address = address
        self._given_client = client
        self._cluster_options: dict[str, Any] = {"dashboard_address": ":0"}
        if n_workers is not None:
            self._cluster_options["n_workers"] = n_workers
        if threads_per_worker is not None:
            self._cluster_options["threads_per_worker"] = threads_per_worker
        self._cluster_options.update(cluster_options or {})
        self.client: Any = None
        self._shares: ClusterShares | None = None
        self.cluster: Any = None
        self._host: BackendHost | None = None
        self._runner: Runner | None = None
        self._routes: dict[int, Route] = {}
        self._ctx_blob = b""
        self._topic = ""
        self._bound = 1
        self._low_water = 1
        self._starts = itertools.count(1)

    def share(self, obj: _S) -> _S:
        """Scatter ``obj`` to every worker once (``client.scatter(obj, broadcast=True)``) and
        return it as it is: calls that pass this very object send its Dask key instead of its
        bytes; Dask frees the workers' copies once it is gone here and its tasks have ended."""
        shares = self._shares
        if shares is None:
            raise CoordinatorNotRunning(
                "share() on the Dask backend scatters to the cluster: start the coordinator "
                "(coordinator.start(), or use it as a context manager) before sharing"
            )
        return shares.share(obj)

    def describe(self) -> str:
        if self.client is None:
            return "dask (not started)"
        workers = self.client.nthreads()
        where = "LocalCluster" if self.cluster is not None else "scheduler"
        return (
            f"dask {where} {self.client.scheduler.address}: {len(workers)} workers, "
            f"{sum(workers.values())} threads"
        )

    def wait_ready(self, timeout: float | None) -> bool:
        """At least one worker has joined the scheduler (a cluster given by ``address`` may
        still be starting its workers)."""
        if self.client is None:
            return False
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, host: BackendHost) -> None:
        self._host = host
        try:
            self._start(host)
        except BaseException:
            self.stop()
            raise

    def _start(self, host: BackendHost) -> None:
        if self._given_client is not None:
            self.client = self._given_client
        elif self.address is not None:
            self.client = distributed.Client(  # type: ignore[no-untyped-call]
                self.address, set_as_default=False
            )
        else:
            self.cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
                processes=True, **self._cluster_options
            )
            self.client = distributed.Client(  # type: ignore[no-untyped-call]
                self.cluster, set_as_default=False
            )
        nonce = f"{uuid.uuid4().hex[:8]}{next(self._starts)}"
        self._topic = f"tokengate-{nonce}"
        self._routes = {}
        self._refresh_context()
        self._shares = ClusterShares(self.client)
        self._runner = Runner(
            self.client,
            nonce,
            run_task,
            on_thread_start=host.on_internal_thread,
            shares=self._shares,
        )
        self._runner.subscribe(self._topic)
        nthreads = self.client.nthreads()
        self._connect_workers(list(nthreads), nonce)
        threads = sum(nthreads.values()) or 1
        # The local backend bounds each worker's mailbox; here the bound is the same total: a
        # producer faster than the cluster waits once mailbox_max tokens per thread are in flight.
        self._bound = host.config.mailbox_max * threads
        self._low_water = max(1, self._bound // 2)
        host.backlog.bound = lambda: self._bound
        host.stats.reset_clock()  # elapsed counts from here, not from the cluster's start
        if log.isEnabledFor(_INFO):
            log.info("[DASK] Backend ready: %s", self.describe())

    def _connect_workers(self, workers: list[str], nonce: str) -> None:
        """Connect every worker's own client before the first token (see
        ``connect_worker_client``); a worker that joins later connects on first use."""
        futures = [
            self.client.submit(
                connect_worker_client,
                key=f"tokengate-connect-{nonce}-{i}",
                workers=[address],
                allow_other_workers=False,
                pure=False,
            )
            for i, address in enumerate(workers)
        ]
        try:
            self.client.gather(futures)
        except Exception:  # pragma: no cover - a worker went away meanwhile
            log.warning("[DASK] could not connect every worker's client up front", exc_info=True)

    def _refresh_context(self) -> None:
        host = self._host
        assert host is not None
        limits = {tier: s.limit for tier, s in host.throttle.stats().items()}
        ctx = Context(self._topic, host.policies, limits, host.config.mailbox_max)
        self._ctx_blob = ctx.dumps()

    def stop(self) -> list[Any]:
        runner, host = self._runner, self._host
        if runner is not None:
            # Normally nothing is left (stop() drained, or discarded what had not started); after
            # stop(timeout=...) tasks may still run: cancel them in one go, then end their tokens.
            # What has not started is discarded first, quietly: stop() gave up on it anyway.
            for token in self.not_started():
                token._discard("stopped")
            running = list(runner.in_flight().values())
            runner.cancel([e.future for e in map(runner.forget, running) if e is not None])
            left = [*running, *runner.parked()]
            abandoned = sum(1 for token in left if token._discard("stopped"))
            if abandoned:
                log.warning(
                    "[DASK] %d tokens still running on the cluster when the coordinator stopped "
                    "were discarded (reason 'stopped'); their results are dropped",
                    abandoned,
                )
            runner.close()
            if self._shares is not None:
                self._shares.clear()
            if self.client is not None and self.cluster is None:  # workers outlive us
                try:
                    self.client.run(close_worker_runner, self._topic)
                except Exception:
                    log.debug("could not close the workers' runners", exc_info=True)
        self._runner = None
        self._shares = None
        try:
            if self.client is not None and self._given_client is None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            self.client = self.cluster = None
        if host is not None and log.isEnabledFor(_INFO):
            log.info("[DASK] Backend stopped")
        return []

    # -- submission --------------------------------------------------------------------------
    def _route(self, task: TaskFunction[..., Any]) -> Route:
        host = self._host
        assert host is not None
        spec = task.spec
        retries = spec.retries
        if retries is None:
            retries = host.policies[spec.weight].max_retries
        tier = spec.storage_speed
        limit = None if tier is None else host.throttle.limit(tier)
        # Only the workers of a LocalCluster started here are sure to import the script itself.
        route = Route(
            spec, task, retries, limit, self._ctx_blob, main_by_value=self.cluster is None
        )
        self._routes[id(spec)] = route
        return route

    def submit(
        self, token: Token[Any], task: TaskFunction[..., Any], internal: bool, payload: Any = None
    ) -> None:
        runner = self._runner
        assert runner is not None
        route = self._routes.get(id(task.spec))
        if route is None or route.spec is not task.spec:
            route = self._route(task)
        if not internal and runner.load() >= self._bound and not self._wait_for_room(token):
            return
        runner.admit(token, self, route, internal)

    def has_room(self, spec: TaskSpec, *, dependencies: bool, mailboxes: bool = True) -> bool:
        """Whether a call of ``spec`` would be sent now without waiting (``submit_async``)."""
        runner, host = self._runner, self._host
        if runner is None or host is None:
            return True  # not running: submit raises at once
        if runner.load() >= self._bound:
            return False
        tier = spec.storage_speed
        return tier is None or host.throttle.waiting(tier) < self._bound

    def _wait_for_room(self, token: Token[Any]) -> bool:
        """Wait until fewer than the bound are in flight; False if stop() gave up meanwhile
        (the token is then discarded, as a producer waiting on the local lanes is)."""
        host, runner = self._host, self._runner
        assert host is not None and runner is not None
        if host.config.admission == "reject":
            token._discard("overloaded")
            raise Overloaded(
                f"{self._bound} tokens are in flight on the Dask cluster (mailbox_max per worker "
                f"thread); {token.operation_type!r} was refused. Slow the producer, raise "
                f"mailbox_max, or use admission='block'"
            )
        return host.backlog.wait_for_room(token, runner.load)

    # -- Host: what the runner asks of the coordinator's side ----------------------------------
    def acquire(self, token: Token[Any], internal: bool) -> bool:
        """The client-side rate limit and tier permit (the coordinator's own RateLimiter and
        StorageThrottle): a token waiting for either is not sent, so it holds no worker."""
        host = self._host
        assert host is not None
        if token.spec.rate is not None and host.backlog.hold_for_rate(
            token, internal, self._rate_released
        ):
            return False  # sent once its operation's bucket lets it go
        if token.spec.storage_speed is None or token._holds_permit:
            return True
        return host.backlog.acquire_tier(token, internal)

    def settled(self, token: Token[Any]) -> None:
        host, runner = self._host, self._runner
        assert host is not None
        if token._holds_permit:
            self.granted(host.throttle.release(token))
        gate = host.gate
        if gate.unwoken and (runner is None or runner.load() <= self._low_water):
            gate.notify()
        if host.lifecycle.draining:
            host.completion.notify_drain()

    def granted(self, tokens: list[Token[Any]]) -> None:
        """Tokens just given a tier permit (a release, or a larger limit): send them."""
        runner = self._runner
        for token in tokens:
            token._parked = None
            route = self._routes.get(id(token.spec))
            if runner is None or route is None:  # pragma: no cover - stopping
                token._discard("stopped")
                continue
            runner.admit(token, self, route, True)

    def _rate_released(self, token: Token[Any]) -> None:
        self.granted([token])  # admitted again: passes the rate once, then the tier permit

    def resized(self, tokens: list[Token[Any]]) -> None:
        """A storage limit changed: new semaphores for new tokens, then send those granted."""
        self._refresh_context()
        self._routes = {}
        self.granted(tokens)

    def finish(self, token: Token[Any], value: Any, exc: BaseException | None) -> bool:
        """End a token the cluster ran (or failed before it ran) through the coordinator's
        completion path: counted, middleware told, then its waiters woken."""
        assert self._host is not None
        return self._host.completion.finish(token, value, exc)

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        host = self._host
        if host is not None:
            host.completion.attempt_ended(token, outcome, exc)

    def record_retried(self, token: Token[Any]) -> None:
        assert self._host is not None
        self._host.stats.record_retried(token.spec.operation_type, token.spec.weight)

    def merge_nested(self, nested: dict[str, list[Any]]) -> None:
        """Counts of the tokens task bodies submitted on the workers, into the coordinator's
        statistics (on this thread's own shard, like every other record)."""
        assert self._host is not None
        shard = self._host.stats.shard()
        for op, (weight, sub, res, fail, disc, retried, latencies) in nested.items():
            counters = shard.op(op, weight)
            counters.submitted += sub
            counters.resolved += res
            counters.failed += fail
            counters.discarded += disc
            counters.retried += retried
            record = counters.latency.record
            for latency in latencies:
                record(latency)

    def late(self, token: Token[Any], what: str) -> None:
        assert self._host is not None
        self._host.completion.late(token, what)

    def expire_later(self, callback: Any) -> None:
        host = self._host
        if host is not None:
            with contextlib.suppress(RuntimeError):  # stopping: the timer queue closed
                host.call_later(0, callback)

    # -- discards and stop ------------------------------------------------------------------
    def discarded(self, token: Token[Any]) -> None:
        runner = self._runner
        if runner is not None:
            runner.discarded(token)
        self.settled(token)  # hands a tier permit on before the coordinator would

    def not_started(self) -> list[Token[Any]]:
        """Tokens parked here, and those sent to Dask that no worker is running right now.

        Their Dask tasks are cancelled here, in one message; the coordinator then discards the
        tokens. A task that starts in between runs, and its result is dropped.
        """
        runner = self._runner
        if runner is None:
            return []
        tokens = runner.in_flight()
        out: list[Token[Any]] = runner.parked()
        if tokens:
            try:
                running = {key for keys in self.client.run(executing_keys).values() for key in keys}
            except Exception:  # pragma: no cover - workers unreachable: nothing is known to run
                log.warning("could not ask the Dask workers what they run", exc_info=True)
                running = set()
            futures = []
            for key, token in tokens.items():
                if key in running:
                    continue
                entry = runner.forget(token)
                if entry is not None:
                    futures.append(entry.future)
                out.append(token)
            runner.cancel(futures)
        return out
