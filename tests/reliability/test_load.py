"""Load: a flood of tokens in bounded memory, and a soak that stays flat.

Both run in a fresh interpreter (``_workloads.py``) so that peak RSS is theirs alone
(``VmHWM``, see the end). ``make test`` runs the short forms (a 100,000-token flood, a
4-second soak); ``make soak`` runs the 1,000,000-token flood and the soak for
``TOKENGATE_SOAK_SECONDS`` (600 by default).

**The flood's bound.** Peak RSS stays under 150 MB, and within 100 MB of the RSS measured after
start-up (interpreter, tokengate, psutil, the workers: about 30 MB). Why that is enough: what
may be alive at once is bounded by the mailboxes, each worker's ``mailbox_max`` (425) tokens,
plus the tier queues (bounded by the same total). With the default 8 CPU workers and 16 I/O
workers that is some 20,000 tokens; with the convergence engine grown to its limits (32
workers per core, a tier's pool up to its limit) about 100,000 tokens of under 1 KB each, so
at most some 70 MB. Measured: 1 to 3 MB above start-up (peak about 30 MB at 100,000 and at
1,000,000 tokens). Why it is tight enough: a leak of 100 bytes per token breaks it at
1,000,000 tokens; and, independent of allocator noise, no Token object may still be alive
after the flood (a leaked token is counted, whatever its size). And the mailboxes' bound
itself is checked, not only its effect on RSS. The flood opens with the heavy workers held
on an event and only heavy tokens submitted, until the producer waits at the admission gate
with a mailbox at ``mailbox_max``; then they are released (``FillWatch`` in ``_workloads.py``).
So the bound is reached on any machine, however fast its workers are against the producer (it
used to rest on the heavy kind, 0.2 ms, being slower than the producer: on a quiet 2-core
machine the fullest mailbox once held only 18). While they are held their threads look idle,
so the convergence engine may grow their pools to the limit (seen: 64 threads and 27,200
queued tokens on 2 cores); the flood goes on past N until the hold ends. At that moment and
sampled every 256 submits, all mailboxes together (queued + running) never hold more than the
workers times ``mailbox_max``, plus the storage permits (a token granted a permit is routed by
the thread that released it, which never blocks). One mailbox alone may pass
``mailbox_max``: a worker the convergence engine retires hands its queue to a sibling (seen
once in 30 runs: 778 in one mailbox, 6,800 in all of 39).
Found by a mutation check: with tasks as fast as the producer, a coordinator whose mailboxes
had no bound at all passed the 100,000-token flood (peak RSS stays low while the workers keep
up); with the slow kind it holds 26,000 to 36,000 tokens in 27 mailboxes (bound: 11,560).

**The soak's flatness.** The soak cycles through the Quick-Proof's idle / normal / surge phases and
samples RSS and thread counts; at the end of every phase the work has drained. It runs with the
convergence engine off (the engine rightly adds threads in a surge; its growth is tested in
tests/test_convergence.py), so only a leak can move the thread count. The first cycles are the
warm-up (allocator arenas, histograms, stats shards grow to their working size), so flat
means: no growth in the second half. RSS at the last phase end is within 10 MB of RSS at the
middle phase end: the allocator takes memory in steps (a one-off step of 5.5 MB was seen once
in a 10-minute run, flat before and after), while a leak of one byte per token would add some
20 MB over the second half (about 20 million tokens). No Token object may be alive after the
soak, and the thread count is the same at the end of every idle phase.

Peak RSS is the child's own (``VmHWM``): ``ru_maxrss`` survives ``exec`` on Linux, so a child
of pytest reports pytest's high-water mark (the figures before this was noticed were pytest's
50 to 65 MB, not the workload's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ._support import env_int

WORKLOADS = Path(__file__).with_name("_workloads.py")
PEAK_RSS_BOUND_MB = 150
GROWTH_BOUND_MB = 100
SOAK_RSS_TOLERANCE_MB = 10
SOAK_SECONDS = env_int("TOKENGATE_SOAK_SECONDS", 600)


def run_workload(*args: object, timeout: float) -> tuple[dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, str(WORKLOADS), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    *text, last = proc.stdout.strip().splitlines()
    return json.loads(last), "\n".join(text)


def check_flood(result: dict[str, Any]) -> None:
    n = result["tokens"]
    assert result["resolved"] == result["submitted"] == n, result
    assert (result["failed"], result["discarded"], result["in_flight"]) == (0, 0, 0), result
    assert result["callbacks"] == n and result["callback_errors"] == 0, result
    assert result["checksum_ok"], result
    assert result["tokens_alive_after"] == 0, result
    for tier, high in result["tier_high_water"].items():
        assert high <= result["tier_limits"][tier], result
    assert result["peak_rss_mb"] < PEAK_RSS_BOUND_MB, result
    assert result["peak_rss_mb"] - result["baseline_rss_mb"] < GROWTH_BOUND_MB, result
    # invariant 3, and the premise that makes it a test: the producer was made to wait with
    # the held kind's mailboxes full (forced, so it holds on any machine)
    assert result["producer_waited_with_mailboxes_full"], result
    assert result["mailbox_high_water"] >= result["mailbox_max"], result
    permits = sum(result["tier_limits"].values())
    bound = result["workers_high_water"] * result["mailbox_max"] + permits
    assert result["mailboxes_high_water"] <= bound, (bound, result)


def summary(result: dict[str, Any]) -> str:
    return (
        f"flood of {result['tokens']:,} tokens: {result['seconds']} s "
        f"({result['tokens_per_second']:,}/s), peak RSS {result['peak_rss_mb']} MB "
        f"(after start-up {result['baseline_rss_mb']} MB), at most "
        f"{result['in_flight_high_water']:,} tokens alive at once and "
        f"{result['mailboxes_high_water']:,} in {result['workers_high_water']} mailboxes "
        f"(the fullest {result['mailbox_high_water']}; mailbox_max {result['mailbox_max']}), "
        f"all resolved"
    )


def test_flood_of_100_000_tokens_in_bounded_memory(capsys: pytest.CaptureFixture[str]) -> None:
    result, _ = run_workload("flood", "--tokens", 100_000, timeout=50)
    check_flood(result)
    with capsys.disabled():
        print("\n" + summary(result))


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_flood_of_1_000_000_tokens_in_bounded_memory(capsys: pytest.CaptureFixture[str]) -> None:
    result, _ = run_workload("flood", "--tokens", 1_000_000, timeout=850)
    with capsys.disabled():
        print("\n" + summary(result))
    check_flood(result)


def check_soak(result: dict[str, Any], *, flat: bool) -> None:
    assert result["resolved"] == result["submitted"] == result["callbacks"], result["submitted"]
    assert (result["failed"], result["discarded"], result["in_flight"]) == (0, 0, 0)
    assert result["callback_errors"] == 0
    assert result["tokens_alive_after"] == 0, result["tokens_alive_after"]
    assert all(result["per_phase"].values()), result["per_phase"]
    assert result["peak_rss_mb"] < PEAK_RSS_BOUND_MB
    ends = result["phase_ends"]
    assert all(e["in_flight"] == 0 for e in ends)
    idle_threads = {e["threads"] for e in ends if e["phase"] == "IDLE"}
    assert len(idle_threads) == 1, ends  # the same threads at every idle phase's end
    if flat:  # no growth in the second half
        middle, end = ends[len(ends) // 2]["rss_mb"], ends[-1]["rss_mb"]
        assert end - middle <= SOAK_RSS_TOLERANCE_MB, ends


def test_a_short_soak_through_every_phase() -> None:
    result, _ = run_workload(
        "soak", "--seconds", 4, "--cycles", 2, "--sample-every", 0.5, timeout=50
    )
    check_soak(result, flat=False)  # 4 s is mostly warm-up: RSS flatness is the long run's


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 300)
def test_soak_rss_and_threads_stay_flat(capsys: pytest.CaptureFixture[str]) -> None:
    cycles = 10 if SOAK_SECONDS >= 100 else 5
    result, text = run_workload(
        "soak",
        "--seconds",
        SOAK_SECONDS,
        "--cycles",
        cycles,
        "--sample-every",
        max(0.5, SOAK_SECONDS / 60),
        timeout=SOAK_SECONDS + 240,
    )
    with capsys.disabled():
        print(f"\nsoak of {SOAK_SECONDS} s ({cycles} cycles of idle / normal / surge)")
        print(text[text.index("RSS and threads at start") :])
        print(
            f"tokens per phase: {result['per_phase']}; peak RSS {result['peak_rss_mb']} MB; "
            f"tolerance: +{SOAK_RSS_TOLERANCE_MB} MB from the middle to the end, idle threads equal"
        )
    check_soak(result, flat=True)
