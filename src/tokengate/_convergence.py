"""ConvergenceEngine: more threads while queued work waits on I/O, back to baseline after.

The Quick-Proof's convergence detector "detects a surge and hot-swaps worker counts". Here that is::

    sampler thread, every ``interval`` s, and at once when a lane says a backlog began
    (``nudge``: the I/O lane does, so a surge of waiting I/O is not left on the baseline for
    an interval), or a test calling ``engine.sample(now=...)``
      └─> for every resizable pool (thread lane: one per core; I/O lane: one per storage tier)
            PoolSample: workers, busy, backlog (queued, not started), oldest queued wait,
                        CPU seconds its threads used (their thread CPU clocks)
          + ProcessSample: the process's user and total CPU seconds over the same interval
      └─> ConvergencePolicy.decide (pure arithmetic on the samples) -> Verdict
      └─> grow: lane.add_workers / retire: lane.retire_worker; cached routes invalidated;
          every swap logged on ``tokengate.convergence`` and counted in the stats' events

Why these signals. A pool whose backlog lasts a whole interval had every worker busy for that
interval; its threads' CPU time over that wall time (their ``thread_time``) says how much of a
task runs on a CPU, the I/O-boundness every log line reports. It cannot decide alone: under the
GIL four threads running ``json.dump`` each get a quarter of the interpreter and look 75% idle,
while work in C or in the kernel (an ``fsync`` on a fast disk) uses a CPU with the GIL released,
where more threads do run in parallel. So the verdict rests on the two capacities threads share:
the *interpreter*, read as the process's user CPU seconds per wall second (Python bytecode runs
in user mode; blocking I/O, which releases the GIL, does not), and the *cores*, read as user and
system CPU plus time spent waiting for a CPU, against the cores the coordinator uses. If the
interpreter is half busy or the cores are three-quarters busy, more threads cannot make the
work faster and only add GIL hand-offs and context switches: the engine holds, says so once per
surge, and counts it (``convergence_cpu_bound``). Otherwise the pool grows toward the thread
count that would keep both below their targets (only the pool's own threads' CPU, read from
their clocks, multiplies with them: a thread submitting the surge does not), bounded by the
backlog and the pool's maximum (``max_workers_per_core``; a storage tier's limit), and at least
doubles: a surge of waiting
tasks reaches a tier's limit in a step or two. A grown pool whose own threads then
saturate the interpreter sheds the extra ones (contention); a pool with no backlog for
``cooldown`` seconds and most of its threads idle retires its idle extra workers down to the
baseline (at a tier's limit a steady flow leaves no backlog, yet every thread is in use).

Every growth is then checked against what it was for: throughput. The next interval's
completions per second must beat the interval before by ``min_gain`` (15%), or the added
threads are retired again and the pool is left alone for ``trial_hold`` seconds
(``convergence_reverted``). That makes one more move safe: when the cores are busy but the
interpreter is not, the CPU time is spent in the kernel or in C code with the GIL released
(an ``fsync``), where counters cannot tell whether more threads help (a file system may batch
concurrent fsyncs into one journal commit). If the interpreter is under 30% busy and system
CPU time (the kernel's work for the tasks' syscalls) fills at least a quarter of the cores and
exceeds user time, the engine then *probes*: it doubles the pool and
keeps the threads only if throughput rose (``convergence_probe``). Python-bound work is never
probed. Throughput is only trusted when at least ``min_completions`` tasks finished in the
interval before; with long tasks (a few per interval), and for a growth made in the first
milliseconds of a surge, the CPU verdict of the interval after the growth is its check: if the
interpreter is busy then, the added threads go again (Python-bound writers can read idle over
a few milliseconds, caught between GIL hand-offs or creating their files in the kernel).

Four rules keep it honest: a backlog must be seen at two consecutive samples before the engine
acts (a CPU-bound surge that began just before a sample would otherwise look idle); a surge
once judged CPU-bound grows only after two consecutive samples say otherwise; CPU is
counted only for workers present at both ends of the interval; and only CPU time this process
used counts as demand. Time a thread spent runnable but *waiting for a CPU* measures the
machine's load, not the task: on a machine other processes keep busy, a task that sleeps 20 ms
or blocks in ``fsync`` waits a few milliseconds for a CPU after every wake-up, and counting that
as demand made such tasks look CPU-bound and kept the baseline exactly when more threads
helped most. Pure-Python work still reads as CPU-bound whatever the load (its user CPU keeps
the interpreter busy); where the load starves it of a CPU, the throughput trial undoes a growth
that did not pay. The run-queue wait (``/proc/self/task/<tid>/schedstat`` on Linux, read only
for the threads of backed-up pools) is reported in the log lines, beside the threads' CPU share.

The threads a growth adds join the pool at once and start each other
(``ThreadLane.add_workers``): a thread start waits until the new thread is scheduled, and 46 of
them in a row on a loaded machine took as long as the surge they were for.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigError

__all__ = [
    "ConvergenceEngine",
    "ConvergencePolicy",
    "PoolSample",
    "ProcessSample",
    "Swap",
    "Verdict",
    "read_process_cpu",
    "read_thread_cpu",
]

log = logging.getLogger("tokengate.convergence")
_INFO = logging.INFO
_DEBUG = logging.DEBUG
#: How soon a backlog just seen is sampled again, to confirm it and read the CPU it used: thread
#: and process CPU clocks count microseconds, so a few milliseconds tell waiting (sleep, I/O)
#: from running, and every millisecond before a surge grows is spent on the baseline.
CONFIRM_WAIT = 0.005
#: When a backlog begins, the engine first looks :data:`QUICK_WAIT` later whether anything but
#: itself used a CPU meanwhile; if the process was all but idle (under :data:`QUIET_BELOW` of
#: one CPU: the queued tasks' workers are all asleep or blocked), the backlog is confirmed
#: then rather than after :data:`CONFIRM_WAIT`, and a surge of waiting I/O grows milliseconds
#: sooner. Anything busier (CPU-bound work, a thread still submitting) is judged over the full
#: window as before. Only where the process CPU clock counts microseconds (Linux); elsewhere it
#: may tick every 15 ms and read idle when it is not.
QUICK_WAIT = 0.001
QUIET_BELOW = 0.1
_QUICK = sys.platform.startswith("linux")


# -- probes --------------------------------------------------------------------------------------
def read_thread_cpu(worker: Any) -> float | None:
    """CPU seconds used so far by ``worker``'s thread, or None where that cannot be read."""
    clock = getattr(worker, "cpu_clock", None)
    if clock is None:
        return None
    try:
        return time.clock_gettime(clock)
    except OSError:
        return None


if sys.platform == "win32":  # pragma: no cover

    def read_process_cpu() -> tuple[float, float]:
        """(user, user + system) CPU seconds of the whole process so far."""
        times = os.times()
        return times.user, times.user + times.system

else:
    import resource

    _RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)

    def read_process_cpu() -> tuple[float, float]:
        """(user, user + system) CPU seconds of the process so far, less the calling thread's
        own where the platform counts threads apart (Linux). The engine's sampler is the
        caller, and its sampling is measurement, not demand: over a 1 ms confirmation it was
        a quarter of a CPU, enough to make a surge of sleeps look a quarter busy and grow it
        by a fraction of what it needed."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        user, total = usage.ru_utime, usage.ru_utime + usage.ru_stime
        if _RUSAGE_THREAD is not None:
            own = resource.getrusage(_RUSAGE_THREAD)
            user -= own.ru_utime
            total -= own.ru_utime + own.ru_stime
        total = max(0.0, total)
        return max(0.0, min(user, total)), total


_SCHEDSTAT = "/proc/self/task"


def read_run_queue_waits(tids: Iterable[int]) -> dict[int, float] | None:
    """For each native thread id, the seconds it has spent runnable but waiting for a CPU
    (Linux); None where the kernel does not expose it. One small /proc read per thread."""
    waits: dict[int, float] = {}
    available = False
    for tid in tids:
        try:
            with open(f"{_SCHEDSTAT}/{tid}/schedstat", "rb") as f:
                fields = f.read().split()
            waits[tid] = int(fields[1]) / 1e9
            available = True
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        except (OSError, ValueError, IndexError):
            return None  # no schedstat on this kernel
    return waits if available else None


# -- samples and decisions -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PoolSample:
    """One pool at one sample; ``cpu`` covers the interval since the previous sample."""

    label: str
    workers: int
    baseline: int
    maximum: int
    busy: int
    backlog: int
    oldest_wait: float = 0.0
    cpu: float | None = None  # thread CPU seconds of the ``tracked`` workers over the interval
    tracked: int = 0
    stall: float = 0.0  # seconds those workers were runnable but waiting for a CPU
    completed: int | None = None  # tokens the ``tracked`` workers finished over the interval


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """The process over one interval: ``dt`` wall seconds, ``user``/``total`` CPU seconds and
    ``stall``, seconds its threads were runnable but waiting for a CPU (0 where unknown)."""

    dt: float
    user: float
    total: float
    stall: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a pool: ``action`` is hold, grow, probe, retire, contention or
    cpu-bound (a hold worth saying)."""

    action: str
    target: int
    reason: str


@dataclass(frozen=True)
class ConvergencePolicy:
    """The thresholds of the engine's decision; pure arithmetic, no clock, no threads.

    ``gil_capacity`` is how many CPUs the interpreter can keep busy with Python code at once
    (1 with the GIL, the core count without); ``cores`` is how many CPUs the coordinator uses.
    """

    gil_grow_below: float = 0.5
    gil_target: float = 0.6
    gil_shrink_above: float = 0.9
    cpu_grow_below: float = 0.75
    cpu_target: float = 0.8
    cooldown: float = 1.0
    gil_capacity: float = 1.0
    cores: int = 1
    probe_gil_below: float = 0.3
    probe_kernel_above: float = 0.25
    min_gain: float = 0.15
    min_completions: int = 8
    trial_hold: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "gil_grow_below",
            "gil_target",
            "gil_shrink_above",
            "cpu_grow_below",
            "probe_gil_below",
            "probe_kernel_above",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 1:
                raise ConfigError(f"ConvergencePolicy.{name} must be in (0, 1], got {value!r}")
        if not isinstance(self.cpu_target, int | float) or self.cpu_target <= 0:
            raise ConfigError(f"ConvergencePolicy.cpu_target must be > 0, got {self.cpu_target!r}")
        if not isinstance(self.cooldown, int | float) or self.cooldown < 0:
            raise ConfigError(f"ConvergencePolicy.cooldown must be >= 0 s, got {self.cooldown!r}")
        if not isinstance(self.gil_capacity, int | float) or self.gil_capacity <= 0:
            raise ConfigError(
                f"ConvergencePolicy.gil_capacity must be > 0, got {self.gil_capacity!r}"
            )
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ConfigError(f"ConvergencePolicy.cores must be an int >= 1, got {self.cores!r}")
        if not isinstance(self.min_gain, int | float) or self.min_gain < 0:
            raise ConfigError(f"ConvergencePolicy.min_gain must be >= 0, got {self.min_gain!r}")
        if not isinstance(self.min_completions, int) or self.min_completions < 1:
            raise ConfigError(
                f"ConvergencePolicy.min_completions must be an int >= 1, "
                f"got {self.min_completions!r}"
            )
        if not isinstance(self.trial_hold, int | float) or self.trial_hold < 0:
            raise ConfigError(
                f"ConvergencePolicy.trial_hold must be >= 0 s, got {self.trial_hold!r}"
            )

    def measurable(self, pool: PoolSample) -> bool:
        """Whether enough tasks finished in the interval for throughput to mean something."""
        return pool.completed is not None and pool.completed >= self.min_completions

    def kept(self, before: float, after: float) -> bool:
        """Whether a growth paid off: throughput ``after`` beats ``before`` by ``min_gain``."""
        return after >= before * (1.0 + self.min_gain)

    def decide(
        self,
        pool: PoolSample,
        proc: ProcessSample,
        *,
        sustained: bool,
        calm_for: float,
        may_probe: bool = False,
    ) -> Verdict:
        """The verdict for ``pool`` after one interval (see the module docstring).

        ``may_probe``: the engine can check a growth by throughput (the pool is measurable
        and not held after a failed trial), so busy cores with an idle interpreter are worth
        a try."""
        n = pool.workers
        if pool.backlog <= 0:
            # A pool grown to its tier's limit has no backlog while the flow lasts (every
            # permitted token has a thread), so "no backlog" alone is not calm: it retires
            # only once most of its threads are idle, or it would shed threads mid-surge and
            # grow them back an interval later.
            if n > pool.baseline and calm_for >= self.cooldown and pool.busy <= n // 2:
                target = max(pool.baseline, pool.busy)
                if target < n:
                    return Verdict("retire", target, f"no backlog for {calm_for:.1f}s")
            return Verdict("hold", n, "no backlog")
        if not sustained or proc.dt <= 0:
            return Verdict("hold", n, "backlog building")
        # Only CPU time this process used counts as demand. Time a thread spent runnable but
        # waiting for a CPU measures the machine's load, not the task: a task that sleeps or
        # blocks in fsync waits a little for a CPU after every wake-up on a loaded machine,
        # and counting that as demand made waiting tasks look CPU-bound (it is reported only).
        gil = proc.user / proc.dt / self.gil_capacity
        cpu = proc.total / proc.dt / max(1, self.cores)
        figures = _figures(pool, proc.dt, gil, cpu, self.cores)
        if n > pool.baseline and gil >= self.gil_shrink_above:
            pool_rate = None if pool.cpu is None else pool.cpu / proc.dt
            if pool_rate is not None and pool_rate >= 0.5 * proc.user / proc.dt:
                target = max(pool.baseline, math.floor(n * self.gil_target / gil))
                if target < n:
                    return Verdict(
                        "contention",
                        target,
                        f"its own threads saturate the interpreter ({figures})",
                    )
        if gil >= self.gil_grow_below:
            return Verdict("cpu-bound", n, f"the interpreter is busy ({figures})")
        if cpu >= self.cpu_grow_below:
            target = min(pool.maximum, n + pool.backlog, 2 * n)
            system = max(0.0, proc.total - proc.user)
            kernel = system / proc.dt / max(1, self.cores)
            if (
                may_probe
                and target > n
                and gil < self.probe_gil_below
                and kernel >= self.probe_kernel_above
                and system > proc.user
            ):
                return Verdict(
                    "probe",
                    target,
                    f"the CPUs are busy in the kernel ({kernel:.0%} system time) while the "
                    f"interpreter is not, so more threads may help ({figures})",
                )
            return Verdict("cpu-bound", n, f"the CPUs are saturated ({figures})")
        # The tasks wait (on I/O, a sleep, a lock): at least double, or straight to the count
        # the interpreter and the cores have headroom for, bounded by the backlog and the
        # maximum, so a surge reaches the tier's limit in a step or two; the trial that
        # follows retires the threads again if throughput did not rise.
        scale = self._headroom(pool, proc.dt, gil, cpu)
        target = min(pool.maximum, n + pool.backlog, max(2 * n, math.floor(n * scale)))
        if target > n:
            return Verdict("grow", target, f"tasks wait on I/O ({figures})")
        return Verdict("hold", n, f"at its maximum of {pool.maximum}")

    def _headroom(self, pool: PoolSample, dt: float, gil: float, cpu: float) -> float:
        """How many times its size the pool may grow before the interpreter or the cores
        reach their targets. Only the pool's own threads bring more demand as they multiply:
        the rest of the process's (a thread submitting the surge, other pools) stays what it
        is, so it is subtracted from the headroom rather than scaled with the pool. Without
        the pool's thread clocks, the whole process's demand is taken as the pool's."""
        own_gil, own_cpu = gil, cpu
        if pool.cpu is not None and pool.tracked > 0:
            rate = pool.cpu / pool.tracked * pool.workers / dt  # CPUs the pool's threads use
            own_gil = min(gil, rate / self.gil_capacity)
            own_cpu = min(cpu, rate / max(1, self.cores))
        return min(
            (self.gil_target - (gil - own_gil)) / max(own_gil, 0.01),
            (self.cpu_target - (cpu - own_cpu)) / max(own_cpu, 0.01),
        )


def _figures(pool: PoolSample, dt: float, gil: float, cpu: float, cores: int) -> str:
    on_cpu = "unknown"
    if pool.cpu is not None and pool.tracked > 0:
        wall = pool.tracked * dt
        on_cpu = f"{pool.cpu / wall:.0%} (waiting for a CPU {pool.stall / wall:.0%})"
    return (
        f"backlog {pool.backlog}, oldest wait {pool.oldest_wait:.3f}s, tasks on a CPU {on_cpu} "
        f"of their time, interpreter {gil:.0%} busy, CPU demand {cpu:.0%} of "
        f"{cores} core{'s' if cores != 1 else ''}"
    )


@dataclass(frozen=True, slots=True)
class Swap:
    """A change of a pool's worker count, as logged."""

    at: float
    label: str
    action: str
    before: int
    after: int
    reason: str


@dataclass
class _PoolState:
    backlogged: bool = False
    confirmed: bool = False  # the backlog was there at the previous sample too
    calm_since: float | None = None
    cpu_seen: dict[Any, float] = field(default_factory=dict)
    announced: str = ""  # the last hold-type verdict logged, so it is logged once per surge
    doubted: bool = False  # a grow verdict seen once after a CPU-bound one: wait for a second
    done_seen: dict[Any, int] = field(default_factory=dict)
    trial: tuple[int, float] | None = None  # (workers before, throughput before) of a growth
    unproven: int | None = None  # workers before a growth too early to measure throughput for
    hold_until: float = 0.0  # no growth before this time (after a trial that did not pay)
    peak: int = 0


def pool_label(lane: str, pool: Hashable) -> str:
    return f"{lane}:core{pool}" if isinstance(pool, int) else f"{lane}:{pool}"


# -- the engine ----------------------------------------------------------------------------------
class ConvergenceEngine:
    """Samples the resizable lanes and applies :class:`ConvergencePolicy` verdicts.

    ``lanes`` returns the coordinator's lanes by name; a lane takes part if it has ``pools``,
    ``pool_limits``, ``add_worker`` and ``retire_worker`` (``ThreadLane``, ``IOLane``).
    ``on_change`` is called after the worker set of a lane changed (the coordinator drops its
    cached routes); ``count_event`` counts swaps in the stats. ``clock``, ``process_cpu`` and
    ``thread_cpu`` are injectable, so tests drive :meth:`sample` with no timers at all.
    """

    def __init__(
        self,
        lanes: Callable[[], Mapping[str, Any]],
        *,
        interval: float = 0.1,
        policy: ConvergencePolicy | None = None,
        on_change: Callable[[], None] = lambda: None,
        count_event: Callable[[str, int], None] = lambda name, n: None,
        clock: Callable[[], float] = time.monotonic,
        wait_clock: Callable[[], float] = time.perf_counter,
        process_cpu: Callable[[], tuple[float, float]] = read_process_cpu,
        thread_cpu: Callable[[Any], float | None] = read_thread_cpu,
        run_queue_waits: Callable[[Iterable[int]], dict[int, float] | None] = read_run_queue_waits,
    ) -> None:
        self._lanes = lanes
        self.interval = interval
        self.policy = policy if policy is not None else ConvergencePolicy()
        self._on_change = on_change
        self._count = count_event
        self._clock = clock
        self._wait_clock = wait_clock
        self._process_cpu = process_cpu
        self._thread_cpu = thread_cpu
        self._run_queue_waits = run_queue_waits
        self._waits_seen: dict[int, float] = {}
        self._states: dict[tuple[str, Hashable], _PoolState] = {}
        self._prev: tuple[float, float, float] | None = None  # now, user, total
        self._lock = threading.Lock()  # one sample at a time (thread vs a test)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and by nudge()
        self._nudged = False  # a nudge is pending or its surge is not over yet
        self._mark: _QuietMark | None = None  # a backlog began at the last sample (QUICK_WAIT)
        self._thread: threading.Thread | None = None
        self.history: deque[Swap] = deque(maxlen=256)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the low-frequency sampler thread."""
        self._stop.clear()
        self._wake.clear()
        self._nudged = False
        self._thread = threading.Thread(target=self._run, name="tokengate-convergence", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """A backlog just began (a lane saw a token queue behind a busy worker): sample now
        rather than at the next interval, so a surge is confirmed and answered within a few
        milliseconds (:data:`CONFIRM_WAIT`) of its start. Once per surge: the flag stays set
        until a sample finds no backlog anywhere, so a flood of pushes costs one flag read
        each."""
        if not self._nudged:
            self._nudged = True
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self._thread = None

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait(self._next_wait())
            wake.clear()
            if self._stop.is_set():
                return
            mark, self._mark = self._mark, None
            if mark is not None and not mark.quiet():
                # not clearly waiting: confirm the backlog over the full window
                wake.wait(max(0.0, mark.at + CONFIRM_WAIT - time.perf_counter()))
                wake.clear()
                if self._stop.is_set():
                    return
            try:
                self.sample()
            except Exception:
                log.exception("convergence sample failed; the engine keeps running")

    def _next_wait(self) -> float:
        """``interval``, or :data:`CONFIRM_WAIT` when a backlog was just seen: confirming it (and
        reading the CPU counters over that short window) answers a surge sooner; first
        :data:`QUICK_WAIT`, for the look that confirms a quiet one at once (``_run``). A growth is
        always judged over a full interval: throughput over less is too noisy to act on."""
        if self._mark is not None:
            return min(self.interval / 4, QUICK_WAIT)
        states = list(self._states.values())
        if any(s.trial is None and s.backlogged and not s.confirmed for s in states):
            return min(self.interval / 4, CONFIRM_WAIT)
        return self.interval

    # -- observation ---------------------------------------------------------------------------
    def worker_counts(self) -> dict[str, tuple[int, int, int]]:
        """Per pool: (baseline, current, peak) worker counts."""
        out: dict[str, tuple[int, int, int]] = {}
        for lane_name, lane in self._resizable().items():
            for key, members in lane.pools.items():
                baseline, _ = lane.pool_limits(key)
                state = self._states.get((lane_name, key))
                peak = max(len(members), state.peak if state else 0)
                out[pool_label(lane_name, key)] = (baseline, len(members), peak)
        return out

    def _resizable(self) -> dict[str, Any]:
        return {
            name: lane
            for name, lane in self._lanes().items()
            if all(
                hasattr(lane, attr)
                for attr in ("pools", "pool_limits", "add_worker", "retire_worker")
            )
        }

    # -- one sample ----------------------------------------------------------------------------
    def sample(self, now: float | None = None) -> list[Swap]:
        """Measure every pool, decide, and apply; returns the swaps made."""
        with self._lock:
            now = self._clock() if now is None else now
            user, total = self._process_cpu()
            pools = []
            for lane_name, lane in self._resizable().items():
                for key, members in list(lane.pools.items()):
                    state = self._states.setdefault((lane_name, key), _PoolState())
                    pools.append(
                        (lane_name, lane, key, members, state, self._measure(members, state))
                    )
            # Run-queue waits: only of the threads of backed-up pools (one /proc read each).
            tids = [
                tid
                for *_, members, _, measured in pools
                if measured.backlog > 0
                for w in members
                if (tid := getattr(getattr(w, "thread", None), "native_id", None)) is not None
            ]
            waits = self._stalls(tids) if tids else {}
            if not tids:
                self._waits_seen = {}
            prev = self._prev
            self._prev = (now, user, total)
            proc = None
            if prev is not None and now > prev[0]:
                proc = ProcessSample(
                    now - prev[0],
                    max(0.0, user - prev[1]),
                    max(0.0, total - prev[2]),
                    sum(waits.values()),
                )
            if not any(measured.backlog for *_, measured in pools):
                self._nudged = False  # the surge is over: the next one may nudge again
            swaps: list[Swap] = []
            began = False  # a backlog began in some pool: look again in QUICK_WAIT
            for lane_name, lane, key, members, state, measured in pools:
                sample = self._pool_sample(lane_name, lane, key, members, state, measured, waits)
                state.peak = max(state.peak, sample.workers)
                sustained = state.backlogged and sample.backlog > 0
                began = began or (sample.backlog > 0 and not state.backlogged and not state.trial)
                state.confirmed = sustained
                state.backlogged = sample.backlog > 0
                if sample.backlog > 0:
                    state.calm_since = None
                elif state.calm_since is None:
                    state.calm_since = now
                if proc is None:
                    continue
                swap = self._decide(lane_name, lane, key, sample, state, proc, sustained, now)
                if swap is not None:
                    swaps.append(swap)
            self._mark = _QuietMark.now() if began and _QUICK else None
            return swaps

    def _decide(
        self,
        lane_name: str,
        lane: Any,
        key: Hashable,
        sample: PoolSample,
        state: _PoolState,
        proc: ProcessSample,
        sustained: bool,
        now: float,
    ) -> Swap | None:
        policy = self.policy
        trial, state.trial = state.trial, None
        if trial is not None and sustained:
            before_n, before_rate = trial
            if policy.measurable(sample):
                rate = (sample.completed or 0) / proc.dt
                if not policy.kept(before_rate, rate):
                    why = (
                        f"throughput {rate:.0f}/s did not beat {before_rate:.0f}/s by "
                        f"{policy.min_gain:.0%}"
                    )
                    verdict = self._revert(state, before_n, why, now)
                    return self._apply(lane_name, lane, key, sample, state, verdict, now)
                if log.isEnabledFor(_DEBUG):
                    log.debug(
                        "[CONVERGENCE] %s: kept %d workers, throughput %.0f/s -> %.0f/s",
                        sample.label,
                        sample.workers,
                        before_rate,
                        rate,
                    )
        measurable = policy.measurable(sample)
        held = now < state.hold_until
        calm_for = 0.0 if state.calm_since is None else now - state.calm_since
        verdict = policy.decide(
            sample, proc, sustained=sustained, calm_for=calm_for, may_probe=measurable and not held
        )
        unproven, state.unproven = state.unproven, None
        gil = proc.user / proc.dt / policy.gil_capacity if proc.dt > 0 else 0.0
        if (
            unproven is not None
            and sustained
            and sample.workers > unproven
            and verdict.action == "cpu-bound"
            and gil >= policy.gil_grow_below
        ):
            # A growth judged on a window too short to measure throughput in: the interval
            # after it is its check. Python-bound work reads busy there (a short window can
            # catch it between GIL hand-offs, or creating its files in the kernel).
            figures = _figures(
                sample, proc.dt, gil, proc.total / proc.dt / policy.cores, policy.cores
            )
            why = f"the interpreter is busy with them ({figures})"
            verdict = self._revert(state, unproven, why, now)
            return self._apply(lane_name, lane, key, sample, state, verdict, now)
        if verdict.action in ("grow", "probe"):
            if held:
                verdict = Verdict("hold", sample.workers, "held after a trial that did not pay")
            elif measurable:
                state.trial = (sample.workers, (sample.completed or 0) / proc.dt)
            else:
                state.unproven = sample.workers
        return self._apply(lane_name, lane, key, sample, state, verdict, now)

    def _revert(self, state: _PoolState, target: int, why: str, now: float) -> Verdict:
        """The verdict that takes a growth back to ``target`` workers; the pool is left alone
        for ``trial_hold`` and the revert counted."""
        hold = self.policy.trial_hold
        state.hold_until = now + hold
        self._count("convergence_reverted", 1)
        return Verdict("revert", target, f"{why}; leaving it for {hold:.0f}s")

    def _stalls(self, tids: list[int]) -> dict[int, float]:
        """Per thread id, run-queue seconds since the previous reading (threads seen twice)."""
        current = self._run_queue_waits(tids)
        if current is None:
            self._waits_seen = {}
            return {}
        seen = self._waits_seen
        self._waits_seen = current
        return {tid: max(0.0, w - seen[tid]) for tid, w in current.items() if tid in seen}

    def _measure(self, members: list[Any], state: _PoolState) -> _Measured:
        measured = _Measured()
        wait_now = self._wait_clock()
        for worker in members:
            queued = len(worker.mailbox)
            if queued:
                measured.backlog += queued
                with contextlib.suppress(IndexError, AttributeError, TypeError):
                    age = wait_now - worker.mailbox[0].submitted_at
                    measured.oldest = max(measured.oldest, age)
            if worker.current is not None:
                measured.busy += 1
        if measured.backlog <= 0:
            state.cpu_seen = {}
            state.done_seen = {}
            return measured
        readings: dict[Any, float] = {}
        done: dict[Any, int] = {}
        for worker in members:
            value = self._thread_cpu(worker)
            if value is not None:
                readings[worker] = value
            count = getattr(worker, "completed", None)
            if count is not None:
                done[worker] = count
        seen = state.cpu_seen
        deltas = [value - seen[w] for w, value in readings.items() if w in seen]
        if deltas:
            measured.cpu = max(0.0, sum(deltas))
            measured.tracked = len(deltas)
        finished = [count - state.done_seen[w] for w, count in done.items() if w in state.done_seen]
        if finished:
            measured.completed = max(0, sum(finished))
        state.cpu_seen = readings
        state.done_seen = done
        return measured

    def _pool_sample(
        self,
        lane_name: str,
        lane: Any,
        key: Hashable,
        members: list[Any],
        state: _PoolState,
        measured: _Measured,
        waits: dict[int, float],
    ) -> PoolSample:
        stall = 0.0
        if measured.cpu is not None and waits:
            for worker in state.cpu_seen:
                tid = getattr(getattr(worker, "thread", None), "native_id", None)
                if tid is not None:
                    stall += waits.get(tid, 0.0)
        baseline, maximum = lane.pool_limits(key)
        return PoolSample(
            label=pool_label(lane_name, key),
            workers=len(members),
            baseline=baseline,
            maximum=max(maximum, baseline),
            busy=measured.busy,
            backlog=measured.backlog,
            oldest_wait=max(0.0, measured.oldest),
            cpu=measured.cpu,
            tracked=measured.tracked,
            stall=stall,
            completed=measured.completed,
        )

    def _apply(
        self,
        lane_name: str,
        lane: Any,
        key: Hashable,
        sample: PoolSample,
        state: _PoolState,
        verdict: Verdict,
        now: float,
    ) -> Swap | None:
        action = verdict.action
        if action == "grow" and state.announced == "cpu-bound" and not state.doubted:
            # This surge was judged CPU-bound: one interval that looks otherwise (a GC pause,
            # writeback throttling) is not enough; the next one must agree.
            state.doubted = True
            state.trial = state.unproven = None
            return None
        state.doubted = False
        if action in ("hold", "cpu-bound"):
            if action == "cpu-bound" and state.announced != "cpu-bound":
                self._count("convergence_cpu_bound", 1)
                if log.isEnabledFor(_INFO):
                    log.info(
                        "[CONVERGENCE] %s: no workers added, %s: keeping %d",
                        sample.label,
                        verdict.reason,
                        sample.workers,
                    )
            if sample.backlog <= 0:
                state.announced = ""
            elif action == "cpu-bound":
                state.announced = action
            return None
        before = sample.workers
        if action in ("grow", "probe"):
            count = verdict.target - before
            add_many = getattr(lane, "add_workers", None)
            if add_many is not None:  # started together: k threads in about log2(k) start-ups
                added = list(add_many(key, count))
            else:
                added = [lane.add_worker(key) for _ in range(count)]
            for worker in added:
                # counted from zero, so the trial sees what the new threads finish
                state.done_seen[worker] = getattr(worker, "completed", 0)
            after = len(lane.pools.get(key, ()))
            self._count("convergence_grow" if action == "grow" else "convergence_probe", 1)
            self._count("workers_added", after - before)
        else:  # retire / contention / revert: newest first, idle ones only when calm
            members = list(lane.pools.get(key, ()))
            excess = len(members) - verdict.target
            idle_only = action == "retire"
            victims = [w for w in reversed(members) if not w.mailbox and w.current is None]
            if not idle_only:
                victims += [w for w in reversed(members) if w not in victims]
            retired = 0
            for worker in victims[:excess]:
                if lane.retire_worker(worker):
                    retired += 1
            if retired == 0:
                return None
            after = before - retired
            self._count("convergence_retire", 1)
            self._count("workers_retired", retired)
        self._on_change()  # the coordinator drops its cached routes
        if action != "probe":
            state.announced = action
        state.peak = max(state.peak, after)
        swap = Swap(now, sample.label, action, before, after, verdict.reason)
        self.history.append(swap)
        if log.isEnabledFor(_INFO):
            log.info(
                "[CONVERGENCE] %s %s: %d -> %d workers: %s",
                sample.label,
                _WHAT[action],
                before,
                after,
                verdict.reason,
            )
        return swap


_WHAT = {
    "grow": "surge",
    "probe": "probe",
    "retire": "calm",
    "contention": "contention",
    "revert": "trial failed",
}


@dataclass(frozen=True, slots=True)
class _QuietMark:
    """When a backlog was first seen, and the CPU clocks then: the process's, and the sampler
    thread's own, so that its own sampling does not count against the quiet."""

    at: float
    process: float
    own: float

    @classmethod
    def now(cls) -> _QuietMark:
        return cls(time.perf_counter(), time.process_time(), time.thread_time())

    def quiet(self) -> bool:
        """Whether every thread but this one used under :data:`QUIET_BELOW` of a CPU since."""
        wall = time.perf_counter() - self.at
        others = (time.process_time() - self.process) - (time.thread_time() - self.own)
        return wall > 0 and others < QUIET_BELOW * wall


@dataclass
class _Measured:
    backlog: int = 0
    busy: int = 0
    oldest: float = 0.0
    cpu: float | None = None
    tracked: int = 0
    completed: int | None = None
