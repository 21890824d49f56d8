"""Big buffers travel in shared memory: a NumPy array, ``bytearray`` or ``memoryview`` argument
above the threshold reaches the worker as a read-only view of an anonymous segment, a big result
comes back the same way (writable, copy-on-write), small calls keep the pickle. And no segment
outlives its last user: not after a task raises, a worker is SIGKILLed while it holds one, the
coordinator stops with calls queued, or the parent itself is SIGKILLed (``/dev/shm`` and every
process's descriptors and memory map checked before and after)."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import process_tasks as pt
from conftest import eventually
from tokengate import OperationsCoordinator, RetryPolicy, WorkerCrashed
from tokengate.lanes import _segments, _sharing, _wire

from ._helpers import NO_CRASH_RETRY, POSIX_ONLY, Make, gone, lane_of

np = pytest.importorskip("numpy")

pytestmark = [
    POSIX_ONLY,
    pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc"),
]
BIG = _segments.SHARE_THRESHOLD // 8 + 1  # float64 items: just above the threshold


def segments_held(pid: int) -> tuple[int, int]:
    """(descriptors, mapped regions) of tokengate segments that process ``pid`` holds now."""
    fds = 0
    with_fds = Path(f"/proc/{pid}/fd")
    for entry in with_fds.iterdir():
        try:
            fds += "memfd:tokengate" in os.readlink(entry)
        except OSError:  # closed meanwhile
            continue
    maps = Path(f"/proc/{pid}/maps").read_text().count("memfd:tokengate")
    return fds, maps


def mapped_bytes(line: str) -> int:
    """The size of the region a line of ``/proc/<pid>/maps`` describes."""
    start, end = line.split(maxsplit=1)[0].split("-")
    return int(end, 16) - int(start, 16)


def nothing_held(pids: list[int]) -> bool:
    return all(segments_held(pid) == (0, 0) for pid in pids if not gone(pid))


@pytest.fixture(autouse=True)
def _dev_shm_unchanged() -> Iterator[None]:
    """No test leaves a name of tokengate's in /dev/shm (segments are anonymous; other programs
    on the machine may come and go there)."""
    shm = Path("/dev/shm")

    def ours() -> set[str]:
        return {n for n in os.listdir(shm) if "tokengate" in n} if shm.exists() else set()

    before = ours()
    yield
    assert ours() <= before, ours() - before


def everyone(coordinator: OperationsCoordinator) -> list[int]:
    return [os.getpid(), *lane_of(coordinator).pids()]


# -- the way in and out ----------------------------------------------------------------------------
def test_a_big_array_argument_arrives_as_a_read_only_view_of_shared_memory(procs: Make) -> None:
    coordinator = procs(workers_per_core=1, cores=1)
    array = np.arange(BIG, dtype=np.float64)
    info = pt.array_info(array).get(timeout=30)
    assert info == {
        "sum": float(array.sum()),
        "writeable": False,
        "mapped": True,
        "pid": info["pid"],
    }
    eventually(lambda: nothing_held(everyone(coordinator)), what="the segment to be let go")


def test_a_small_argument_stays_in_the_pickle(procs: Make) -> None:
    procs(workers_per_core=1, cores=1)
    array = np.arange(BIG - 2, dtype=np.float64)  # just below the threshold
    info = pt.array_info(array).get(timeout=30)
    assert (info["writeable"], info["mapped"]) == (True, False)
    data, segments = _wire.dumps_shared((array,))
    assert segments == [] and len(data) > array.nbytes  # in band, as before


def test_a_big_result_comes_back_through_shared_memory_writable(procs: Make) -> None:
    coordinator = procs(workers_per_core=1, cores=1)
    result = pt.make_array(BIG).get(timeout=30)
    assert result.sum() == np.arange(BIG, dtype=np.float64).sum()
    assert result.flags.writeable
    fds, maps = segments_held(os.getpid())
    assert maps == 1 and fds <= 1  # mapped copy-on-write (before 3.13 mmap keeps a dup'd fd)
    result[0] = -1.0  # a private copy of that page: nobody else sees it
    del result
    eventually(lambda: nothing_held(everyone(coordinator)), what="the result's mapping to go")


@pytest.mark.parametrize("kind", ["bytearray", "memoryview"])
def test_bytearray_and_memoryview_arguments_travel_shared(procs: Make, kind: str) -> None:
    procs(workers_per_core=1, cores=1)
    raw = bytearray(os.urandom(_segments.SHARE_THRESHOLD))
    data = raw if kind == "bytearray" else memoryview(raw)
    name, size, head, mapped = pt.buffer_info(data).get(timeout=30)
    assert (size, head) == (len(raw), sum(raw[:4096]))
    assert name == kind and mapped == (kind == "memoryview")  # bytearray(buffer) copies


def test_the_shared_bytes_of_a_queued_call_count_against_the_byte_budget() -> None:
    array = np.zeros(BIG)
    call = _wire.prepare_call(pt.array_info, (array,), {}, has_dependencies=False)
    assert [(p.length, p.owned) for p in call.parts] == [(array.nbytes, True)]
    assert array.nbytes < call.size() < array.nbytes + 1024
    call.close()
    assert call.size() < 1024 and call.parts == []


# -- nothing leaks ---------------------------------------------------------------------------------
def test_no_segment_is_left_after_a_task_raises(procs: Make) -> None:
    coordinator = procs(workers_per_core=1, cores=1, retry_policy=NO_CRASH_RETRY)
    with pytest.raises(ValueError, match="refused an array"):
        pt.array_raises(np.ones(BIG)).get(timeout=30)
    eventually(lambda: nothing_held(everyone(coordinator)), what="the segments to be freed")


def test_no_segment_is_left_after_its_worker_is_killed_mid_read(
    procs: Make, tmp_path: Path
) -> None:
    coordinator = procs(workers_per_core=1, cores=1, retry_policy=NO_CRASH_RETRY)
    marker = tmp_path / "pid"
    token = pt.hold_array(np.ones(BIG), str(marker))
    eventually(marker.exists, what="the worker to map its argument")
    pid = int(marker.read_text())
    assert segments_held(pid)[1] >= 1 and segments_held(os.getpid())[0] == 1
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        token.get(timeout=30)
    eventually(lambda: nothing_held(everyone(coordinator)), what="the segments to be freed")


def test_no_segment_is_left_when_the_coordinator_stops_with_calls_queued(tmp_path: Path) -> None:
    coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
    marker = tmp_path / "pid"
    running = pt.hold_array(np.ones(BIG), str(marker))
    eventually(marker.exists, what="the first call to run")
    queued = [pt.array_info(np.full(BIG, i)) for i in range(3)]
    assert segments_held(os.getpid())[0] == 4
    coordinator.stop(cancel_pending=True, timeout=0.1)
    with pytest.raises(Exception):  # killed by stop(), which gave up waiting
        running.get(timeout=5)
    assert {t.state for t in queued} == {"discarded"}
    assert segments_held(os.getpid()) == (0, 0)


PARENT_SCRIPT = """
import sys
import numpy
import process_tasks as pt
from tokengate import OperationsCoordinator

coordinator = OperationsCoordinator(workers_per_core=1, cores=1).start()
assert coordinator.lanes["process"].wait_ready(30)
token = pt.hold_array(numpy.ones(int(sys.argv[2])), sys.argv[1])
print(*coordinator.lanes["process"].pids(), flush=True)
sys.stdin.read()  # hold until the test kills us
"""


def test_no_segment_outlives_a_parent_killed_with_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    marker = tmp_path / "pid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(pt.__file__).parent), *sys.path])}
    with subprocess.Popen(
        [sys.executable, str(script), str(marker), str(BIG)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    ) as parent:
        try:
            assert parent.stdout is not None
            workers = [int(p) for p in parent.stdout.readline().split()]
            eventually(marker.exists, timeout=30, what="the worker to map its argument")
            (worker,) = workers
            assert segments_held(parent.pid)[0] == 1 and segments_held(worker)[1] >= 1
            parent.kill()
            assert parent.wait(30) == -signal.SIGKILL
            eventually(lambda: gone(worker), what="the worker to die with its parent")
        finally:
            parent.kill()
    holders = []
    for proc in psutil.process_iter():
        try:
            if any("memfd:tokengate" in f.path for f in proc.open_files()):
                holders.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    assert holders == []


def test_a_retried_call_sends_its_segments_again(procs: Make, tmp_path: Path) -> None:
    coordinator = procs(workers_per_core=1, cores=1, retry_policy=RetryPolicy(crash_retries=1))
    marker = tmp_path / "pid"
    token = pt.hold_array(np.ones(BIG), str(marker))
    eventually(marker.exists, what="the first attempt to map its argument")
    first = int(marker.read_text())
    marker.unlink()
    os.kill(first, signal.SIGKILL)
    eventually(marker.exists, timeout=30, what="the retry to map its argument again")
    assert int(marker.read_text()) != first
    os.kill(int(marker.read_text()), signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        token.get(timeout=30)
    assert token.attempts == 2
    eventually(lambda: nothing_held(everyone(coordinator)), what="the segments to be freed")


# -- share once, use many times --------------------------------------------------------------------
def test_share_places_an_object_once_and_calls_pass_slices_of_it_without_a_copy(
    procs: Make,
) -> None:
    coordinator = procs(workers_per_core=1, cores=1)
    original = np.arange(4 * BIG, dtype=np.float64)
    shared = coordinator.share(original)
    assert np.array_equal(shared, original) and not shared.flags.writeable
    snap = coordinator.stats()
    assert (snap.shared_objects, snap.shared_bytes) == (1, original.nbytes)
    assert "Shared    : 1 objects" in str(snap)
    step = BIG // 2  # slices below the threshold are still sent as places in the segment
    pieces = [shared[i * step : (i + 1) * step] for i in range(8)]
    call = _wire.prepare_call(pt.array_info, (pieces[3],), {}, has_dependencies=False)
    ((segment, offset, length, key),) = call.parts
    assert (offset, length, call.parts[0].owned) == (3 * step * 8, step * 8, False)
    assert key == _sharing.find(memoryview(shared))[2] != 0  # type: ignore[index]
    assert segment.size == original.nbytes and call.size() < 1024  # nothing copied for it
    call.close()
    assert segment.fd >= 0  # the shared segment is not the call's to close
    infos = [t.get(timeout=30) for t in [pt.array_info(p) for p in pieces]]
    assert [i["sum"] for i in infos] == [float(p.sum()) for p in pieces]
    assert all(i["mapped"] and not i["writeable"] for i in infos)
    fds, maps = segments_held(os.getpid())  # one segment, one mapping, for the 8 calls
    assert maps == 1 and fds <= 2  # (before Python 3.13 the mapping keeps a dup'd fd)
    del shared, pieces, call, segment
    assert coordinator.stats().shared_objects == 0
    eventually(lambda: nothing_held(everyone(coordinator)), what="the shared segment to go")


def test_a_worker_maps_a_shared_object_once_for_every_call_that_uses_it(procs: Make) -> None:
    coordinator = procs(workers_per_core=1, cores=1)
    shared = coordinator.share(np.arange(4 * BIG, dtype=np.float64))
    quarter = shared.size // 4
    parts = [shared[i * quarter : (i + 1) * quarter] for i in range(4)]
    # One worker: the first call maps the object, the next ones find that mapping kept.
    assert [pt.mapped_before(p).get(timeout=30) for p in parts] == [False, True, True, True]
    assert len(pt.worker_mappings().get(timeout=30)) == 1
    # A call's own big argument is mapped for that call alone, as before.
    own = [pt.mapped_before(np.ones(BIG)).get(timeout=30) for _ in range(2)]
    assert own == [False, False]


def test_a_worker_lets_go_of_a_shared_object_once_it_is_forgotten(procs: Make) -> None:
    coordinator = procs(workers_per_core=1, cores=1)
    shared = coordinator.share(np.arange(2 * BIG, dtype=np.float64))
    kept = coordinator.share(np.ones(BIG))
    tokens = [pt.array_info(shared), pt.array_info(kept)]
    assert [t.get(timeout=30)["sum"] for t in tokens] == [float(shared.sum()), float(BIG)]
    assert len(pt.worker_mappings().get(timeout=30)) == 2  # both kept for the next calls
    del shared, tokens
    # The worker hears of it before its next call: only the object still shared stays mapped.
    (left,) = pt.worker_mappings().get(timeout=30)
    assert mapped_bytes(left) == -(-kept.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    del kept
    assert pt.worker_mappings().get(timeout=30) == []
    eventually(lambda: nothing_held(everyone(coordinator)), what="the shared segments to go")


def test_a_big_shared_object_is_filled_in_pieces_and_mapped_whole(
    procs: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pieces as small as one threshold's worth, three fill threads: whatever the machine.
    monkeypatch.setattr(_segments, "PIECE_BYTES", _segments.SHARE_THRESHOLD)
    monkeypatch.setattr(_sharing, "fill_threads", lambda: 3)
    coordinator = procs(workers_per_core=1, cores=1)
    original = np.arange(5 * BIG, dtype=np.float64)
    shared = coordinator.share(original)
    assert np.array_equal(shared, original) and not shared.flags.writeable
    found = _sharing.find(memoryview(shared))
    assert found is not None and found[1] == 0
    segment = found[0]
    assert len(segment.fds) == 3 and segment.piece % mmap.ALLOCATIONGRANULARITY == 0
    assert segments_held(os.getpid())[1] == 3  # the pieces, mapped side by side
    # Slices across the pieces' borders reach the worker whole and read-only.
    step = original.size // 7
    slices = [shared[i * step : (i + 2) * step] for i in range(6)]
    infos = [t.get(timeout=30) for t in [pt.array_info(s) for s in slices]]
    assert [i["sum"] for i in infos] == [float(s.sum()) for s in slices]
    assert all(i["mapped"] and not i["writeable"] for i in infos)
    del shared, slices, found, segment
    eventually(lambda: nothing_held(everyone(coordinator)), what="every piece to be freed")


def test_pieces_mapped_copy_on_write_keep_their_writes_to_themselves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_segments, "PIECE_BYTES", _segments.SHARE_THRESHOLD)
    data = bytes(range(256)) * (3 * _segments.SHARE_THRESHOLD // 256)
    segment = _segments.share_buffer(data, pieces=3)
    assert len(segment.fds) == 3
    mine = _segments.map_segment(segment.fds, segment.size, segment.piece, writable=True)
    theirs = _segments.map_segment(segment.fds, segment.size, segment.piece, writable=False)
    assert mine == data and theirs == data and theirs.readonly
    mine[segment.piece : segment.piece + 4] = b"DONE"
    assert theirs == data  # the write stayed in this mapping
    del mine, theirs
    segment.close()
    assert segments_held(os.getpid()) == (0, 0)


def test_a_shared_object_is_freed_once_its_handle_and_the_tokens_using_it_are_gone(
    procs: Make, tmp_path: Path
) -> None:
    coordinator = procs(workers_per_core=1, cores=1, retry_policy=NO_CRASH_RETRY)
    marker = tmp_path / "pid"
    blocker = pt.hold_array(np.ones(BIG), str(marker))
    eventually(marker.exists, what="the worker to be busy")
    shared = coordinator.share(np.full(BIG, 2.0))
    queued = pt.array_info(shared)
    del shared  # the queued call holds the segment (and its token the object)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        blocker.get(timeout=30)
    assert queued.get(timeout=30)["sum"] == 2.0 * BIG
    del queued
    assert coordinator.stats().shared_objects == 0
    eventually(lambda: nothing_held(everyone(coordinator)), what="the segments to be freed")


def test_the_shared_objects_and_bytes_are_exported_to_prometheus(procs: Make) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from tokengate.observability import TokenGateCollector

    coordinator = procs(workers_per_core=1, cores=1)
    registry = prometheus_client.CollectorRegistry()
    registry.register(TokenGateCollector(coordinator))
    read = registry.get_sample_value
    assert (read("tokengate_shared_objects"), read("tokengate_shared_bytes")) == (0, 0)
    shared = coordinator.share(np.ones(BIG))
    assert (read("tokengate_shared_objects"), read("tokengate_shared_bytes")) == (1, shared.nbytes)
    del shared
    assert (read("tokengate_shared_objects"), read("tokengate_shared_bytes")) == (0, 0)


def test_share_refuses_an_object_without_buffers(coordinator: OperationsCoordinator) -> None:
    with pytest.raises(ValueError, match=r"found no buffer to share in a dict"):
        coordinator.share({"a": 1})


def test_a_call_argument_filled_in_pieces_reaches_the_worker_whole(
    procs: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_segments, "LEND_PIECE_BYTES", _segments.SHARE_THRESHOLD)
    monkeypatch.setattr(_segments, "fill_threads", lambda: 3)
    pieces: list[int] = []  # of each call buffer made, when made (a segment closes when done)
    lend = _segments.lend

    def counted(buffer: Any) -> _segments.Segment:
        segment = lend(buffer)
        pieces.append(len(segment.fds))
        return segment

    monkeypatch.setattr(_segments, "lend", counted)
    coordinator = procs(workers_per_core=1, cores=1)
    original = np.arange(4 * BIG, dtype=np.float64)
    info = pt.array_info(original).get(timeout=30)
    assert pieces == [3]  # the argument went in three pieces
    assert info["sum"] == float(original.sum()) and info["mapped"] and not info["writeable"]
    eventually(lambda: nothing_held(everyone(coordinator)), what="every piece to be freed")
