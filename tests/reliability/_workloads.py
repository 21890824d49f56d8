"""The flood and the soak, run in a fresh interpreter so that peak RSS is theirs alone.

    python tests/reliability/_workloads.py flood --tokens 1000000
    python tests/reliability/_workloads.py soak --seconds 600

Each prints one JSON object on its last line (the soak prints its tables and the Quick-Proof's stats
blocks before it). ``tests/reliability/test_load.py`` runs them and checks the figures.

The flood submits N tokens of six kinds (light / medium / heavy, half of them with a storage
tier) from one producer as fast as it can, keeping none: a done-callback tallies each result.
It opens with the heavy workers held (``HOLD``) and only heavy tokens submitted, until the
producer is made to wait with every mailbox they may use full; then they are released and the
six kinds follow. So the mailboxes' bound is reached whatever the machine's speed (the heavy
kind, 0.2 ms, is slower than the producer too, so they keep filling after that). Everything
alive at once is bounded by the mailboxes (workers x ``mailbox_max``) and the tier queues, so
peak RSS must not depend on N.

The soak follows the Quick-Proof's endurance run: cycles of idle (a trickle), normal (a steady,
closed loop of mixed work) and surge (four producers flooding mixed weights and tiers through
bounded mailboxes) phases, sampling RSS and thread count as it goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from tokengate import OperationsCoordinator, Token, task_token_guard
from tokengate.bench._rss import peak_rss_kib

HEAVY = {"weight": "heavy", "executor": "thread"}  # the flood measures mailboxes, not processes
#: Heavy tasks wait on it: cleared at the start of the flood, set once its mailboxes are full.
HOLD = threading.Event()
HOLD.set()


@task_token_guard(operation_type="flood_light", tags={"weight": "light"})
def light(i: int) -> int:
    return i


@task_token_guard(operation_type="flood_medium", tags={"weight": "medium"})
def medium(i: int) -> int:
    return i


@task_token_guard(operation_type="flood_heavy", tags=HEAVY)
def heavy(i: int) -> int:
    """Held at the start of the flood until its mailboxes are full (see :class:`FillWatch`), then
    slower than the producer (0.2 ms without the GIL, as I/O or a C extension would be)."""
    HOLD.wait(60)
    time.sleep(0.0002)
    return i


@task_token_guard(operation_type="flood_fast", tags={"weight": "light", "storage_speed": "FAST"})
def fast_io(i: int) -> int:
    return i


@task_token_guard(
    operation_type="flood_moderate", tags={"weight": "medium", "storage_speed": "MODERATE"}
)
def moderate_io(i: int) -> int:
    return i


@task_token_guard(operation_type="flood_slow", tags={**HEAVY, "storage_speed": "SLOW"})
def slow_io(i: int) -> int:
    return i


KINDS: tuple[Callable[[int], Token[int]], ...] = (
    light,  # type: ignore[list-item]
    medium,  # type: ignore[list-item]
    heavy,  # type: ignore[list-item]
    fast_io,  # type: ignore[list-item]
    moderate_io,  # type: ignore[list-item]
    slow_io,  # type: ignore[list-item]
)


class Tally:
    """Counts and sums results from done-callbacks on many threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.total = 0
        self.errors = 0

    def __call__(self, token: Any) -> None:
        try:
            value = token.result(0)
        except BaseException:
            with self.lock:
                self.errors += 1
            return
        with self.lock:
            self.count += 1
            self.total += value


def rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def peak_rss_mb() -> float:
    """This process's own peak RSS (the bench harness's measure: ``VmHWM`` on Linux, since
    ``ru_maxrss`` carries a big parent's mark across ``exec``). The kernel updates ``VmHWM``
    lazily (memory given back with ``madvise`` may leave it a little below a peak), so the
    callers also take the largest RSS they sampled."""
    return peak_rss_kib() / 1024


class FillWatch:
    """Opens ``HOLD`` once the producer waits for room with a mailbox at ``mailbox_max``.

    While the heavy workers are held nothing leaves their mailboxes, so the producer, submitting
    only heavy tokens, fills every one it may use and then must wait at the admission gate (a
    mailbox with no bound would never make it wait: then ``blocked`` stays False and the hold
    ends after ``patience`` seconds). The loads at that moment are recorded: the fullest reached
    ``mailbox_max``, and all together are within the bound.
    """

    def __init__(self, coordinator: OperationsCoordinator, patience: float = 30.0) -> None:
        self.coordinator = coordinator
        self.patience = patience
        self.finished = threading.Event()  # the flood is over: stop watching
        self.blocked = False
        self.fullest = self.total = self.workers = 0
        self.thread = threading.Thread(target=self.watch, name="fill-watch", daemon=True)

    def start(self) -> FillWatch:
        HOLD.clear()
        self.thread.start()
        return self

    def watch(self) -> None:
        coordinator, limit = self.coordinator, self.coordinator.config.mailbox_max
        deadline = time.monotonic() + self.patience
        pause = threading.Event()
        try:
            while not self.finished.is_set() and time.monotonic() < deadline:
                if coordinator.admission.waiters:  # the producer found no room (a condition wait)
                    loads = [w.load() for w in coordinator.iter_workers()]
                    if max(loads) >= limit:
                        self.blocked = True
                        self.fullest, self.total, self.workers = max(loads), sum(loads), len(loads)
                        return
                pause.wait(0.001)
        finally:
            HOLD.set()

    def stop(self) -> None:
        self.finished.set()
        self.thread.join(60)


def flood(tokens: int) -> dict[str, Any]:
    coordinator = OperationsCoordinator().start()
    tally = Tally()
    for i in range(2_000):  # warm up: threads, stats shards, code paths
        KINDS[i % 6](i).add_done_callback(tally)
    while coordinator.stats().in_flight:
        threading.Event().wait(0.01)
    baseline = rss_mb()
    tally = Tally()
    # Sampled every 256 submits (off the hot path): tokens alive at once (submitted, not
    # finished), the fullest mailbox and all mailboxes together (queued + running, every lane),
    # and the workers there were (the convergence engine may add some).
    high_water = mailbox_high = queued_high = workers = 0
    sampled_rss = 0.0
    started = time.perf_counter()
    watch = FillWatch(coordinator).start()
    i = 0
    # Past ``tokens`` while still held: the convergence engine may grow the held pools (their
    # threads look idle) up to their limit, and filling those may take more.
    while i < tokens or not HOLD.is_set():
        (KINDS[i % 6] if HOLD.is_set() else heavy)(i).add_done_callback(tally)
        i += 1
        if not i & 255:
            high_water = max(high_water, coordinator.stats().in_flight)
            sampled_rss = max(sampled_rss, rss_mb())
            loads = [w.load() for w in coordinator.iter_workers()]
            mailbox_high = max(mailbox_high, *loads)
            queued_high = max(queued_high, sum(loads))
            workers = max(workers, len(loads))
    tokens = i
    watch.stop()
    mailbox_high = max(mailbox_high, watch.fullest)
    queued_high = max(queued_high, watch.total)
    workers = max(workers, watch.workers)
    coordinator.stop()
    seconds = time.perf_counter() - started
    snap = coordinator.stats()
    gc.collect()
    alive = sum(isinstance(o, Token) for o in gc.get_objects())
    return {
        "tokens_alive_after": alive,  # Tokens are gc-tracked: a kept one is found
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds),
        "workers": coordinator.core_count * coordinator.config.workers_per_core,
        "mailbox_max": coordinator.config.mailbox_max,
        "producer_waited_with_mailboxes_full": watch.blocked,
        "in_flight_high_water": high_water,
        "mailbox_high_water": mailbox_high,
        "mailboxes_high_water": queued_high,
        "workers_high_water": workers,
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(max(peak_rss_mb(), sampled_rss), 1),
        "callbacks": tally.count,
        "callback_errors": tally.errors,
        "checksum_ok": tally.total == tokens * (tokens - 1) // 2,
        "submitted": snap.submitted - 2_000,
        "resolved": snap.resolved - 2_000,
        "failed": snap.failed,
        "discarded": snap.discarded,
        "in_flight": snap.in_flight,
        "tier_high_water": {t: s.high_water for t, s in coordinator.tier_stats().items()},
        "tier_limits": {t: s.limit for t, s in coordinator.tier_stats().items()},
    }


# -- soak -----------------------------------------------------------------------------------------
@task_token_guard(operation_type="normal_operation", tags={"weight": "light"})
def normal_processing(items: list[int]) -> int:
    """The Quick-Proof's normal operation."""
    return sum(x**2 for x in items)


@task_token_guard(operation_type="fibonacci", tags=HEAVY)
def fibonacci_operation(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@task_token_guard(operation_type="json_fast", tags={"weight": "medium", "storage_speed": "FAST"})
def json_fast(i: int) -> int:
    return len(json.dumps({"id": i, "records": list(range(20))}))


PHASES = (("IDLE", 0.25), ("NORMAL", 0.40), ("SURGE", 0.35))


class Soak:
    def __init__(self, seconds: float, cycles: int) -> None:
        self.seconds = seconds
        self.cycles = cycles
        # convergence=False: the engine rightly adds threads during a surge; the soak checks that
        # nothing leaks, which needs a thread count that only a leak can move.
        self.coordinator = OperationsCoordinator(convergence=False).start()
        self.tally = Tally()
        self.phase = "START"
        self.per_phase: dict[str, int] = {name: 0 for name, _ in PHASES}
        self.samples: list[dict[str, Any]] = []
        self.phase_ends: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.stop_sampling = threading.Event()

    def sample(self, label: str | None = None) -> dict[str, Any]:
        snap = self.coordinator.stats()
        row = {
            "t": round(time.monotonic() - self.t0, 1),
            "phase": label or self.phase,
            "rss_mb": round(rss_mb(), 1),
            "threads": threading.active_count(),
            "tokengate_threads": sum(
                t.name.startswith("tokengate-") for t in threading.enumerate()
            ),
            "submitted": snap.submitted,
            "resolved": snap.resolved,
            "in_flight": snap.in_flight,
        }
        return row

    def sampler(self, every: float) -> None:
        while not self.stop_sampling.wait(every):  # a periodic timer, not a wait for threads
            self.samples.append(self.sample())

    def submit(self, i: int) -> Token[Any]:
        kind = i % 4
        if kind == 0:
            token: Token[Any] = normal_processing(list(range(i % 50)))
        elif kind == 1:
            token = fibonacci_operation(100 + i % 200)
        elif kind == 2:
            token = json_fast(i)
        else:
            token = KINDS[i % 6](i)
        self.per_phase[self.phase] += 1
        token.add_done_callback(self.tally)
        return token

    def idle(self, until: float) -> None:
        pause = threading.Event()
        i = 0
        while time.monotonic() < until:
            self.submit(i).get(timeout=60)
            i += 1
            pause.wait(0.05)  # the phase's pace: one task every 50 ms

    def normal(self, until: float) -> None:
        i = 0
        while time.monotonic() < until:  # closed loop: a batch, then wait for it
            batch = [self.submit(i + k) for k in range(200)]
            for token in batch:
                token.get(timeout=60)
            i += 200

    def surge(self, until: float) -> None:
        def producer(offset: int) -> None:
            i = offset
            while time.monotonic() < until:
                for _ in range(500):
                    self.submit(i)
                    i += 4

        threads = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def run(self, sample_every: float) -> dict[str, Any]:
        sampler = threading.Thread(target=self.sampler, args=(sample_every,), daemon=True)
        self.samples.append(self.sample("START"))
        sampler.start()
        cycle = self.seconds / self.cycles
        for n in range(self.cycles):
            for name, share in PHASES:
                self.phase = name
                until = time.monotonic() + cycle * share
                getattr(self, name.lower())(until)
                while self.coordinator.stats().in_flight:  # let the phase's work finish
                    threading.Event().wait(0.01)
                end = self.sample(name)
                end["cycle"] = n + 1
                self.phase_ends.append(end)
                print(self.coordinator.stats(name), flush=True)
        self.stop_sampling.set()
        sampler.join()
        self.samples.append(self.sample("END"))
        self.coordinator.stop()
        snap = self.coordinator.stats("FINAL")
        print(snap, flush=True)
        gc.collect()
        return {
            "tokens_alive_after": sum(isinstance(o, Token) for o in gc.get_objects()),
            "seconds": self.seconds,
            "cycles": self.cycles,
            "per_phase": self.per_phase,
            "submitted": snap.submitted,
            "resolved": snap.resolved,
            "failed": snap.failed,
            "discarded": snap.discarded,
            "in_flight": snap.in_flight,
            "callbacks": self.tally.count,
            "callback_errors": self.tally.errors,
            "peak_rss_mb": round(max(peak_rss_mb(), *(r["rss_mb"] for r in self.samples)), 1),
            "samples": self.samples,
            "phase_ends": self.phase_ends,
        }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'at':>8}  {'phase':<7}  {'RSS MB':>7}  {'threads':>7}  "
        f"{'submitted':>10}  {'in flight':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['t']:>7}s  {r['phase']:<7}  {r['rss_mb']:>7}  {r['threads']:>7}  "
            f"{r['submitted']:>10}  {r['in_flight']:>9}"
        )
    return "\n".join(lines)


def soak(seconds: float, cycles: int, sample_every: float) -> dict[str, Any]:
    result = Soak(seconds, cycles).run(sample_every)
    samples = result["samples"]
    picks = [samples[0], samples[len(samples) // 2], samples[-1]]
    print("\nRSS and threads at start, middle and end:", flush=True)
    print(table(picks), flush=True)
    print("\nAt the end of every phase (work drained):", flush=True)
    print(table(result["phase_ends"]), flush=True)
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("flood")
    f.add_argument("--tokens", type=int, default=1_000_000)
    s = sub.add_parser("soak")
    s.add_argument("--seconds", type=float, default=600)
    s.add_argument("--cycles", type=int, default=10)
    s.add_argument("--sample-every", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.what == "flood":
        result = flood(args.tokens)
    else:
        result = soak(args.seconds, args.cycles, args.sample_every)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
