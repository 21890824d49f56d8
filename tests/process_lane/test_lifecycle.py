"""Worker processes from start to stop: one warm pinned process per core, a light boot, the
routing log, stop (graceful, cancelling, or killing what still runs) and no process outliving
its parent, killed or not."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import process_tasks as pt
from conftest import assert_counts_add_up, eventually
from tokengate import (
    OperationsCoordinator,
    TaskTimeout,
)
from tokengate.lanes.process import (
    SlotState,
    _handle,
)

from ._helpers import (
    POSIX_ONLY,
    Make,
    gone,
    lane_of,
    own_children,
)

pytestmark = POSIX_ONLY


def test_one_pinned_worker_process_per_core_kept_warm(procs: Make) -> None:
    coordinator = procs(workers_per_core=2)
    lane = lane_of(coordinator)
    pids = lane.pids()
    assert len(lane.workers) == coordinator.core_count == len(set(pids))
    assert all(len(workers) == 1 for workers in lane.by_core.values())
    tokens = [pt.whoami() for _ in range(40)]
    for token in tokens:
        info = token.get(timeout=30)
        assert info["pid"] in pids and info["ppid"] == os.getpid()
        cpu = coordinator.topology.cpu_for_core(token.core or 0)
        assert info["cpus"] == [cpu]  # pinned to its core's CPU
    assert lane.pids() == pids  # the same warm processes served every task
    assert {t.core for t in tokens} <= set(coordinator.affinity.allowed("heavy"))


def test_a_slot_starts_its_worker_process_with_its_first_token(make_coordinator: Make) -> None:
    """No interpreter starts for a program that runs no process-lane task (one booting would
    take a core from the work running on threads meanwhile): a slot starts its worker process
    with its first token, and ``wait_ready()`` starts the rest."""
    before = own_children()
    coordinator = make_coordinator(workers_per_core=1)
    lane = lane_of(coordinator)
    assert lane.pids() == [] and {w.state for w in lane.workers} == {SlotState.UNSTARTED}
    token = pt.whoami()
    info = token.get(timeout=30)
    (ran,) = [w for w in lane.workers if w.name == token.worker]
    assert lane.pids() == [ran.pid] == [info["pid"]]
    assert own_children() - before == {info["pid"]}
    assert all(w.state is SlotState.UNSTARTED for w in lane.workers if w is not ran)
    assert coordinator.wait_ready(30)
    assert len(set(lane.pids())) == len(lane.workers)
    assert {w.state for w in lane.workers} == {SlotState.READY}


def test_a_token_for_an_unstarted_slot_leaves_an_unstarted_sibling_asleep(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Siblings are woken to take tokens queued at a slot that is not ready: one that has not
    started its own worker process could not take them either."""
    coordinator = make_coordinator(workers_per_core=1)
    lane = lane_of(coordinator)
    if len(lane.workers) < 2:
        pytest.skip("needs two cores")
    eventually(lambda: all(w.sleeping for w in lane.workers), what="the slots to wait")
    woken: list[str] = []
    for worker in lane.workers:

        def wake(worker: object = worker, wake: object = worker.wake) -> None:
            woken.append(worker.name)  # type: ignore[attr-defined]
            wake()  # type: ignore[operator]

        monkeypatch.setattr(worker, "wake", wake)
    token = pt.whoami()
    token.get(timeout=30)
    (other,) = [w for w in lane.workers if w.name != token.worker]
    assert other.name not in woken and other.state is SlotState.UNSTARTED
    assert token.worker in woken  # its own slot was woken by the push


def test_a_lane_never_used_stops_without_starting_a_process(
    make_coordinator: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[object] = []
    launch = _handle.ChildProcess

    def spy(*args: object) -> object:
        launched.append(args)
        return launch(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_handle, "ChildProcess", spy)
    coordinator = make_coordinator(workers_per_core=1)
    assert pt.light_double(4).get(timeout=30) == 8  # thread-lane work starts none
    coordinator.stop(timeout=10)
    lane = lane_of(coordinator)
    assert {w.state for w in lane.workers} == {SlotState.STOPPED}
    assert not any(w.thread.is_alive() for w in lane.workers)
    assert launched == []


def test_a_worker_process_boots_without_the_coordinator_stack() -> None:
    """Start-up (B2's figure) is mostly the worker's imports: it needs the decorator and the
    wire format, not the coordinator, observability or asyncio (the package is lazy)."""
    probe = (
        "import sys, tokengate.lanes.process._child; "
        "print(sorted(m for m in ('asyncio', 'tokengate._coordinator', 'tokengate.observability',"
        " 'psutil') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_routing_log_and_worker_lines_for_process_workers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with OperationsCoordinator(workers_per_core=1, verbose=True) as coordinator:
        token = pt.square(3)
        assert token.get(timeout=30) == 9
        assert lane_of(coordinator).wait_ready(30)
    out = capsys.readouterr().out
    assert re.search(
        rf"\[ROUTING\] Token {token.id} \(heavy\) → Pos \d+ \(Core \d, Worker \d\)", out
    )
    assert re.search(r"\[process_0_core_1\] Started on Core 1 \(pid \d+\)", out), out
    assert "[process_0_core_1] Stopped" in out
    assert f"✓ Completed {token.id}" in out


def test_stop_shuts_every_worker_process_down() -> None:
    before = own_children()
    coordinator = OperationsCoordinator(workers_per_core=1).start()
    lane = lane_of(coordinator)
    assert lane.wait_ready(30)
    pids = lane.pids()
    assert set(pids) <= own_children() - before
    assert pt.square(3).get(timeout=30) == 9
    coordinator.stop()
    assert all(gone(pid) for pid in pids)
    assert own_children() <= before


def test_stop_right_after_start_does_not_wait_for_workers_to_boot() -> None:
    before = own_children()
    OperationsCoordinator(workers_per_core=1).start().stop()
    assert own_children() <= before


def test_stop_with_cancel_pending_discards_queued_process_tokens(tmp_path: Path) -> None:
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
    marker = tmp_path / "pid"
    running = pt.block_until_killed(str(marker), 0.5)  # ends on its own after 0.5 s
    eventually(marker.exists, what="the task to start")
    queued = [pt.square(i) for i in range(5)]
    coordinator.stop(cancel_pending=True)
    assert running.get(timeout=1) == "not killed"  # what had started finished
    assert {t.state for t in queued} == {"discarded"}
    assert {t.discard_reason for t in queued} == {"stopped"}
    assert running._payload is None  # the pickled call is let go once the token ended
    assert_counts_add_up(coordinator)


def test_stop_kills_a_worker_still_running_when_it_gives_up(tmp_path: Path) -> None:
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
    marker = tmp_path / "pid"
    token = pt.block_until_killed(str(marker))
    eventually(marker.exists, what="the task to start")
    coordinator.stop(timeout=0.1)
    with pytest.raises(TaskTimeout, match="when stop"):
        token.get(timeout=1)
    assert gone(int(marker.read_text()))
    assert_counts_add_up(coordinator)


PARENT_SCRIPT = """
import sys
from tokengate import OperationsCoordinator
from tokengate.lanes.process import _handle
from process_tasks import square

if sys.argv[2] == "lifeline":  # the portable path, as on macOS: no PR_SET_PDEATHSIG
    _handle.USE_PDEATHSIG, _handle.USE_LIFELINE = False, True

coordinator = OperationsCoordinator(workers_per_core=1).start()
assert square(4).get(timeout=30) == 16
print(*coordinator.lanes["process"].pids(), flush=True)
if sys.argv[1] == "hold":
    sys.stdin.read()  # hold until the test kills us
# else: leave without stop(), as a script that forgets it does
"""


@pytest.mark.parametrize("watch", ["pdeathsig", "lifeline"])
@pytest.mark.parametrize("end", ["killed", "exits-without-stop"])
def test_worker_processes_die_with_their_parent(tmp_path: Path, end: str, watch: str) -> None:
    if watch == "pdeathsig" and not _handle.USE_PDEATHSIG:
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    mode = "hold" if end == "killed" else "leave"
    with subprocess.Popen(
        [sys.executable, str(script), mode, watch],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    ) as parent:
        try:
            assert parent.stdout is not None
            pids = [int(p) for p in parent.stdout.readline().split()]
            assert pids
            if end == "killed":
                assert all(psutil.Process(p).ppid() == parent.pid for p in pids)
                parent.kill()
            assert parent.wait(30) in (0, -signal.SIGKILL)
            eventually(lambda: all(gone(p) for p in pids), what="workers to die with their parent")
        finally:
            parent.kill()


def test_the_process_lane_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokengate.bench._case", "B2o", "tokengate", "--quick", "--n", "50"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["figures"]["us_per_task"] > 0
