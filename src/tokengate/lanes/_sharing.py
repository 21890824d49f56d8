"""Share once, use many times: an object placed in shared memory once, then passed to any number
of process-lane calls without a copy (``OperationsCoordinator.share``).

:func:`share` pickles the object with its big buffers out of band, copies each buffer once into
a segment (:mod:`._segments`), maps the segment here and rebuilds the object on the mapping:
what it returns is an equal, read-only object whose big buffers *are* the shared memory. Each
mapping is registered by its address range. When a call is pickled, a big buffer that lies in a
registered mapping (the object, or a slice of it) is sent as that segment plus an offset: no
bytes are copied, the worker maps the same pages. ::

    share(array) ──copy once──> segment ──map──> read-only array (registered)
    task(shared[i::16]) ──pickle──> buffer in a registered range ──> (segment, offset), fd only

Each worker maps a shared object once, at the first call that uses it, and keeps that mapping
for the calls after it: a task that reads the whole object faults its pages in once per worker,
not once per call, and no call pays for unmapping it. The worker lets it go when this process
forgets the object (the worker's proxy sends it the keys of the objects gone, :func:`watch`).

Lifetime: the registry holds a segment while the returned object (or any view of it) is alive
here; a call holds the segments it uses until its token ends; a worker holds the ones it mapped
until it hears they were forgotten. The kernel frees a segment once none of them holds it.

The shared bytes are shown in ``stats()`` (``shared_objects``, ``shared_bytes``) but not charged
to ``process_queue_bytes``: they are held once, whatever the number of queued calls that use
them, and a bound on queued calls must not make every producer wait for as long as a shared
object lives.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import pickle
import threading
import weakref
from typing import Any, NamedTuple, Protocol, TypeVar

from ._segments import Segment, fill_threads, map_segment, share_buffer

__all__ = ["SharedReading", "Watcher", "alive", "find", "reading", "share", "watch", "with_shared"]

_S = TypeVar("_S")


class SharedReading(NamedTuple):
    """The objects shared now, and the bytes their segments hold."""

    objects: int
    bytes: int


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address(buffer: Any) -> int:
    """Where ``buffer``'s bytes start in this process's memory."""
    view = _PyBuffer()
    _get_buffer(buffer, ctypes.byref(view), 0)
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


class _Entry:
    """One registered mapping: its segment, its address range and its key (a number never given
    to another entry in this process, by which workers know the segment they already map)."""

    __slots__ = ("end", "key", "segment", "start")

    def __init__(self, segment: Segment, start: int, key: int) -> None:
        self.segment = segment
        self.start = start
        self.end = start + segment.size
        self.key = key


class Watcher(Protocol):
    """What :func:`watch` tells when a shared object is forgotten (called on whichever thread
    let go of it: must only take note and return)."""

    def shared_forgotten(self) -> None: ...


_lock = threading.Lock()
_entries: dict[int, _Entry] = {}  # by start address
_live: set[int] = set()  # the keys of the entries
_keys = itertools.count(1)  # 0 is no shared object's
_watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()


def find(buffer: memoryview) -> tuple[Segment, int, int] | None:
    """The registered segment ``buffer`` lies in, its offset there and the entry's key; None if
    it lies in none (the common case: no registered mapping at all costs one dict check)."""
    if not _entries:
        return None
    start = _address(buffer)
    end = start + buffer.nbytes
    with _lock:
        for entry in _entries.values():
            if entry.start <= start and end <= entry.end:
                return entry.segment, start - entry.start, entry.key
    return None


def alive(key: int) -> bool:
    """Whether the shared object of ``key`` is still registered here."""
    return key in _live


def watch(watcher: Watcher) -> None:
    """Have ``watcher.shared_forgotten()`` called each time a shared object is forgotten (until
    ``watcher`` is garbage; a worker's proxy watches once its worker maps a shared object)."""
    with _lock:
        _watchers.add(watcher)


def reading() -> SharedReading:
    """What is shared now in this process."""
    with _lock:
        return SharedReading(len(_entries), sum(e.segment.size for e in _entries.values()))


def with_shared(snapshot: _S) -> _S:
    """``snapshot`` (a ``StatsSnapshot``) with the shared objects' count and bytes filled in."""
    if not _entries:
        return snapshot
    now = reading()
    return dataclasses.replace(  # type: ignore[type-var]
        snapshot, shared_objects=now.objects, shared_bytes=now.bytes
    )


def _forget(start: int) -> None:
    with _lock:
        entry = _entries.pop(start, None)  # the segment closes once the calls using it let it go
        if entry is None:
            return
        _live.discard(entry.key)
        watchers = list(_watchers)
    for watcher in watchers:
        watcher.shared_forgotten()


def share(obj: _S, *, threshold: int = 0) -> _S:
    """An equal copy of ``obj`` whose buffers of at least ``threshold`` bytes live in shared
    memory, read-only, registered so that process-lane calls pass them without copying."""
    buffers: list[memoryview] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:
            return True
        if raw.nbytes < max(threshold, 1):
            return True
        buffers.append(raw)
        return False

    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL, buffer_callback=keep)
    if not buffers:
        raise ValueError(
            f"share() found no buffer to share in a {type(obj).__name__} (NumPy arrays, "
            f"bytearray, memoryview and objects that pickle through them have buffers); pass "
            f"the object itself to the task instead"
        )
    views = []
    for raw in buffers:
        segment = share_buffer(raw, pieces=fill_threads())
        mapping = map_segment(segment.fds, segment.size, segment.piece, writable=True)
        start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        with _lock:
            entry = _Entry(segment, start, next(_keys))
            _entries[start] = entry
            _live.add(entry.key)
        weakref.finalize(mapping.obj, _forget, start)
        views.append(mapping.toreadonly())
    buffers.clear()
    shared: _S = pickle.loads(data, buffers=views)
    return shared
