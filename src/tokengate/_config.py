"""CoordinatorConfig: every knob the TokenGate Quick-Proof names, frozen and validated.

Defaults work on any machine; ``OperationsCoordinator(**kwargs)`` builds one of these, so a bad
value fails when the coordinator is made, not when the first token meets it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._errors import ConfigError
from ._limits import MAX_WAIT_SECONDS, check_seconds
from ._retry import RetryPolicy, default_retry_policies
from ._spec import STORAGE_TIERS, WEIGHTS
from .observability._options import parse_byte_size, validate_observability

__all__ = ["DEFAULT_STORAGE_LIMITS", "MAILBOX_MAX", "PROCESS_QUEUE_BYTES", "CoordinatorConfig"]

MAILBOX_MAX = 425
PROCESS_QUEUE_BYTES = 64 << 20
"""The default byte budget of queued process-lane calls (64 MiB): see ``_byte_budget.py``."""
DEFAULT_STORAGE_LIMITS: Mapping[str, int] = MappingProxyType(
    {"SLOW": 10, "MODERATE": 25, "FAST": 50, "INSANE": 70}
)
_MAX_WORKERS_PER_CORE = 256
_ADMISSION_MODES = ("block", "reject")


def _positive_int(name: str, value: Any, *, upper: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    if upper is not None and value > upper:
        raise ConfigError(
            f"{name}={value} is beyond the supported maximum of {upper}; "
            f"threads past that only add contention"
        )


@dataclass(frozen=True)
class CoordinatorConfig:
    """Configuration of one :class:`OperationsCoordinator`.

    ``mailbox_max`` bounds each worker's mailbox (the Quick-Proof's ``MAILBOX_MAX``); when every
    mailbox a token may use is full, ``admission='block'`` makes the caller wait and ``'reject'``
    raises ``Overloaded``. ``storage_limits`` caps how many tasks of each storage tier run at once.
    ``retry_policy`` is one :class:`RetryPolicy` for every weight or a mapping per weight. ``cores``
    limits the coordinator to the first N usable cores (``None``: all of them).

    Observability (``docs/guide/observability.md``): ``guard_house`` watches every run per
    operation type;
    ``auto_block`` turns it into a circuit breaker that opens after ``block_after`` consecutive
    failures and lets one probe through after ``block_cooldown`` seconds. ``overflow_guard``
    pauses admission while the process's RSS is over ``memory_budget`` (bytes, ``"512MB"``,
    ``"25%"``; ``None``: half the memory this process may use), sampled every
    ``memory_check_interval`` seconds. ``trace`` keeps the last ``trace_buffer`` task spans for
    ``export_trace``. ``dashboard`` serves the web dashboard on loopback from ``start()`` to
    ``stop()`` (``True``: any free port; a number: that port); ``dashboard_url`` says where.
    I/O lane and convergence engine: ``io_workers`` threads per storage tier to start with;
    ``convergence`` turns the engine on, sampling every ``convergence_interval`` seconds and
    growing a backed-up core up to ``max_workers_per_core`` workers (a storage tier up to its
    limit) while the queued work waits on I/O. ``async_concurrency`` caps the ``async def``
    tasks running at once on the coordinator's event loop; ``async_stall_after`` is how long
    that loop may go without running before its watchdog logs the task holding it (one that
    does not await) and enforces that task's ``timeout``.
    ``process_lane`` runs CPU-heavy tasks in worker processes, one per core (``None``: wherever
    the platform supports it; ``False``: never, every task runs on threads).
    ``process_queue_bytes`` bounds the bytes of pickled arguments held by process-lane calls
    waiting for a worker process (bytes, ``"64MB"``, ``"5%"``; ``None``: no byte bound): a call
    that does not fit waits like a full mailbox (or is refused with ``admission='reject'``), and
    one larger than the whole budget is let in alone. The default, 64 MiB, is a fixed size on
    purpose: it keeps dozens of megabyte-sized calls queued per worker (a worker needs one to
    stay busy) while a flood of large arguments costs the caller at most that much beyond its
    own data, the same on a laptop as on a 1 TB server (a share of RAM would not be).
    ``process_native_threads`` is how many threads each worker process lets native thread pools
    (BLAS, OpenMP, MKL, numexpr) start, so that one worker per core does not start a pool per
    core each: ``None`` (automatic) keeps those of ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
    ``MKL_NUM_THREADS``, ``VECLIB_MAXIMUM_THREADS`` and ``NUMEXPR_NUM_THREADS`` already set in the
    environment and sets the others to 1; a number sets them all to it.
    ``process_initializer`` is called with ``process_initargs`` once in each worker process as
    it starts, before it takes a task (as ``ProcessPoolExecutor``'s ``initializer``): set up
    per-process state there (a loaded model, an opened file). One that raises makes that start
    fail; after 3 such failures in a row the worker's tokens fail with its traceback.
    """

    workers_per_core: int = 4
    mailbox_max: int = MAILBOX_MAX
    storage_limits: Mapping[str, int] = field(default_factory=lambda: DEFAULT_STORAGE_LIMITS)
    retry_policy: RetryPolicy | Mapping[str, RetryPolicy] = field(
        default_factory=default_retry_policies
    )
    admission: str = "block"
    cores: int | None = None
    verbose: bool = False
    convergence_verbose: bool = False
    # -- observability; validated by observability/_options.py ---------------------------------
    guard_house: bool = True
    auto_block: bool = False
    block_after: int = 5
    block_cooldown: float = 30.0
    overflow_guard: bool = True
    memory_budget: int | str | None = None
    memory_check_interval: float = 0.5
    trace: bool = False
    trace_buffer: int = 10_000
    dashboard: bool | int = False
    # -- async tasks, the I/O lane and the convergence engine ----------------------------------
    io_workers: int = 4
    max_workers_per_core: int = 32
    async_concurrency: int = 512
    async_stall_after: float = 1.0
    convergence: bool = True
    convergence_interval: float = 0.1
    process_lane: bool | None = None  # see lanes/process/
    process_queue_bytes: int | str | None = PROCESS_QUEUE_BYTES  # see _byte_budget.py
    process_native_threads: int | None = None
    process_initializer: Callable[..., object] | None = None
    process_initargs: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        _positive_int("workers_per_core", self.workers_per_core, upper=_MAX_WORKERS_PER_CORE)
        _positive_int("mailbox_max", self.mailbox_max)
        if self.cores is not None:
            _positive_int("cores", self.cores)
        if self.admission not in _ADMISSION_MODES:
            raise ConfigError(
                f"admission must be one of {', '.join(_ADMISSION_MODES)}, got {self.admission!r}"
            )
        if not isinstance(self.storage_limits, Mapping):
            raise ConfigError(
                f"storage_limits must be a mapping such as {{'FAST': 50}}, "
                f"got {self.storage_limits!r}"
            )
        limits = dict(DEFAULT_STORAGE_LIMITS)
        for tier, limit in self.storage_limits.items():
            key = tier.upper() if isinstance(tier, str) else tier
            if key not in STORAGE_TIERS:
                raise ConfigError(
                    f"unknown storage tier {tier!r} in storage_limits; "
                    f"known tiers are {', '.join(STORAGE_TIERS)}"
                )
            _positive_int(f"storage_limits[{tier!r}]", limit)
            limits[key] = limit
        object.__setattr__(self, "storage_limits", MappingProxyType(limits))
        policy = self.retry_policy
        if isinstance(policy, RetryPolicy):
            policies = dict.fromkeys(WEIGHTS, policy)
        elif isinstance(policy, Mapping):
            policies = dict(default_retry_policies())
            for weight, item in policy.items():
                if weight not in WEIGHTS:
                    raise ConfigError(
                        f"unknown weight {weight!r} in retry_policy; "
                        f"known weights are {', '.join(WEIGHTS)}"
                    )
                if not isinstance(item, RetryPolicy):
                    raise ConfigError(
                        f"retry_policy[{weight!r}] must be a RetryPolicy, got {item!r}"
                    )
                policies[weight] = item
        else:
            raise ConfigError(
                f"retry_policy must be a RetryPolicy or a mapping of weight to RetryPolicy, "
                f"got {policy!r}"
            )
        object.__setattr__(self, "retry_policy", MappingProxyType(policies))
        for name in ("verbose", "convergence_verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        validate_observability(self)  # observability knobs
        self._check_io_lane()
        if self.process_lane is not None and not isinstance(self.process_lane, bool):
            raise ConfigError(
                f"process_lane must be True, False or None (automatic), got {self.process_lane!r}"
            )
        if self.process_native_threads is not None:
            _positive_int("process_native_threads", self.process_native_threads)
        if self.process_initializer is not None and not callable(self.process_initializer):
            raise ConfigError(
                f"process_initializer must be a callable or None, got {self.process_initializer!r}"
            )
        if not isinstance(self.process_initargs, tuple):
            raise ConfigError(
                f"process_initargs must be a tuple, got {type(self.process_initargs).__name__}"
            )
        object.__setattr__(
            self,
            "process_queue_bytes",
            parse_byte_size("process_queue_bytes", self.process_queue_bytes, "no byte bound"),
        )

    def _check_io_lane(self) -> None:
        """The async, I/O lane and convergence knobs."""
        _positive_int("io_workers", self.io_workers, upper=_MAX_WORKERS_PER_CORE)
        _positive_int(
            "max_workers_per_core", self.max_workers_per_core, upper=_MAX_WORKERS_PER_CORE
        )
        _positive_int("async_concurrency", self.async_concurrency)
        check_seconds(
            "async_stall_after",
            self.async_stall_after,
            fix=f"give at most {MAX_WAIT_SECONDS:.0f} seconds (e.g. 1.0)",
        )
        if not isinstance(self.convergence, bool):
            raise ConfigError(f"convergence must be True or False, got {self.convergence!r}")
        check_seconds(
            "convergence_interval",
            self.convergence_interval,
            fix=f"give at most {MAX_WAIT_SECONDS:.0f} seconds (e.g. 0.1)",
        )

    def policy_for(self, weight: str) -> RetryPolicy:
        """The retry policy of one weight class."""
        policies = self.retry_policy
        assert isinstance(policies, Mapping)
        return policies[weight]
