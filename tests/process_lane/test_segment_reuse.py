"""A call's segment is written over by a later call instead of being freed and made again, but
only once its worker said it maps it no more, and only while some call is still in flight: an
idle lane keeps no spare segment, and a task that kept its argument keeps it intact."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Iterator

import pytest

import process_tasks as pt
from conftest import eventually
from tokengate.lanes import _segments, _wire
from tokengate.lanes.process import _child

from ._helpers import POSIX_ONLY, Make

np = pytest.importorskip("numpy")

pytestmark = [
    POSIX_ONLY,
    pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd segments"),
]
SIZE = _segments.SHARE_THRESHOLD
BIG = SIZE // 8 + 1  # float64 items: just above the threshold


def _inode(segment: _segments.Segment) -> int:
    return os.fstat(segment.fd).st_ino


@pytest.fixture(autouse=True)
def _no_call_in_flight() -> None:
    """Each test starts with no lent segment (calls of earlier tests dropped, cycles too)."""
    gc.collect()
    assert _segments.spare_count() == (0, 0)


@pytest.fixture
def in_flight() -> Iterator[_segments.Segment]:
    """One lent segment held for the whole test: a call still in flight, so spares are kept."""
    held = _segments.lend(bytes(SIZE))
    try:
        yield held
    finally:
        _segments.give_back(held, reuse=True)
    assert _segments.spare_count() == (0, 0)  # the last one back: every spare closed


def test_a_segment_given_back_unmapped_is_written_over_by_the_next_call(
    in_flight: _segments.Segment,
) -> None:
    first = _segments.lend(b"\x01" * (2 * SIZE))
    inode = _inode(first)
    _segments.give_back(first, reuse=True)
    assert _segments.spare_count() == (1, 1)
    second = _segments.lend(b"\x02" * SIZE)  # smaller: the spare shrinks to fit
    assert (_inode(second), second.size) == (inode, SIZE)
    assert os.pread(second.fd, 3 * SIZE, 0) == b"\x02" * SIZE
    assert _segments.spare_count() == (0, 2)
    _segments.give_back(second, reuse=False)  # still mapped somewhere: closed, not kept
    assert second.fd == -1 and _segments.spare_count() == (0, 1)


def test_spares_are_closed_when_the_last_lent_segment_comes_back() -> None:
    one, two = _segments.lend(bytes(SIZE)), _segments.lend(bytes(SIZE))
    _segments.give_back(one, reuse=True)
    assert _segments.spare_count() == (1, 1) and one.fd >= 0
    _segments.give_back(two, reuse=True)
    assert _segments.spare_count() == (0, 0) and one.fd == two.fd == -1


def test_a_lent_segment_dropped_without_give_back_still_counts_as_back() -> None:
    one = _segments.lend(bytes(SIZE))
    kept = _segments.lend(bytes(SIZE))
    _segments.give_back(kept, reuse=True)
    assert _segments.spare_count() == (1, 1)
    del one  # a discarded call's segment, closed when dropped
    assert _segments.spare_count() == (0, 0) and kept.fd == -1


def test_spares_hold_at_most_spare_bytes(
    in_flight: _segments.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_segments, "SPARE_BYTES", SIZE)
    one, two = _segments.lend(bytes(SIZE)), _segments.lend(bytes(SIZE))
    _segments.give_back(one, reuse=True)
    _segments.give_back(two, reuse=True)
    assert _segments.spare_count() == (1, 1) and two.fd == -1


def _reply(task: object, array: object) -> list[bytes]:
    """What a worker replies to ``task(array)``, run here through the worker's own loop step."""
    call = _wire.prepare_call(task, (array,), {}, has_dependencies=False)  # type: ignore[arg-type]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        _segments.send_fds(ours, call.fds())
        return _child._handle(memoryview(b"".join(call.message())), {}, theirs, {})
    finally:
        call.close()
        ours.close()
        theirs.close()


def test_the_worker_says_it_maps_a_call_s_segments_no_more_unless_the_task_kept_them() -> None:
    reply = _reply(pt.array_info, np.ones(BIG))
    assert reply[0] == _wire.RELEASED_MARK and reply[1] == b"V"
    pt.WORKER_STATE.clear()
    try:
        reply = _reply(pt.keep_array, np.ones(BIG))
        assert reply[0] == b"V"  # the task kept a view: the segment must not be written over
        assert pt.WORKER_STATE["kept"].sum() == BIG
    finally:
        pt.WORKER_STATE.clear()
    assert _reply(pt.length, b"small")[0] == b"V"  # no segment: nothing to say


def test_a_worker_s_segment_is_reused_for_the_next_call_once_let_go(
    procs: Make, in_flight: _segments.Segment
) -> None:
    procs(workers_per_core=1, cores=1)

    def settled() -> bool:  # every call's segment is back (only the held one is out)
        return _segments.spare_count()[1] == 1

    for value in (1.0, 3.0):  # the second call writes over the first one's pages
        info = pt.array_info(np.full(BIG, value)).get(timeout=30)
        assert (info["sum"], info["mapped"]) == (value * BIG, True)
        eventually(settled, what="the call's segment to come back")
        assert _segments.spare_count() == (1, 1)
    assert pt.keep_array(np.full(BIG, 5.0)).get(timeout=30) == 5.0 * BIG
    eventually(settled, what="the call's segment to come back")
    assert _segments.spare_count() == (0, 1)  # the worker keeps it: closed, never written over
    assert pt.kept_sum().get(timeout=30) == 5.0 * BIG


def test_a_big_call_buffer_is_filled_in_pieces_and_such_a_spare_serves_only_its_own_size(
    in_flight: _segments.Segment, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_segments, "LEND_PIECE_BYTES", SIZE)
    monkeypatch.setattr(_segments, "fill_threads", lambda: 2)
    first = _segments.lend(b"\x01" * (2 * SIZE))
    assert len(first.fds) == 2 and first.piece == SIZE  # two threads filled it
    inodes = [os.fstat(fd).st_ino for fd in first.fds]
    _segments.give_back(first, reuse=True)
    other = _segments.lend(b"\x02" * SIZE)  # another size: pieces cannot be resized
    assert _inode(other) not in inodes and _segments.spare_count() == (1, 2)
    again = _segments.lend(b"\x03" * SIZE + b"\x04" * SIZE)  # its size: written over, piecewise
    assert [os.fstat(fd).st_ino for fd in again.fds] == inodes
    assert _segments.spare_count() == (0, 3)
    whole = _segments.map_segment(again.fds, again.size, again.piece, writable=False)
    assert whole == b"\x03" * SIZE + b"\x04" * SIZE
    del whole
    for segment in (other, again):
        _segments.give_back(segment, reuse=False)
