"""Shared memory for the big buffers of process-lane calls and results.

A NumPy array, a ``bytearray`` or a ``memoryview`` above :data:`SHARE_THRESHOLD` does not travel
through the pipe: pickle protocol 5 hands it over *out of band* (a ``PickleBuffer``), its bytes
are written once into an anonymous shared-memory segment, and the segment's descriptor is passed
to the other process over a Unix socket (``SCM_RIGHTS``). The receiver maps it: the unpickled
array is a view of that mapping, not a copy. ::

    caller: pickle(args, buffer_callback) ──> small pickle ─────────────pipe──> worker
                          └─> big buffer ──write once──> segment ──fd──socket──> mmap ─> array

The segments are anonymous (``memfd_create``; elsewhere ``shm_open`` and ``shm_unlink`` at once),
so no name is left in ``/dev/shm`` and the kernel frees a segment when the last descriptor and
mapping of it go away: when its token ends, or when the processes holding it die, SIGKILL of
the parent included. A :class:`Segment` closes its descriptor when it is dropped.

A worker maps its arguments read-only (a task that writes to an argument array gets NumPy's
"assignment destination is read-only"; copy it first). Results are mapped copy-on-write in the
caller: writable, and still not copied until written.

Reuse: filling a fresh segment costs the kernel a page allocation per 4 KiB (and freeing it
later as much again), more than the copy itself. So a call's segment whose worker said it no
longer maps it (nothing kept a view of the argument) is kept as a *spare* and the next call's
buffer is written over its pages (:func:`lend`, :func:`give_back`). Spares are held only while
some call still holds a lent segment, up to :data:`SPARE_BYTES`; when the last lent segment
comes back they are all closed, so an idle lane holds no shared memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import socket
import sys
import threading
from collections.abc import Iterable
from typing import Any, NamedTuple

__all__ = [
    "SHARE_THRESHOLD",
    "SPARE_BYTES",
    "Part",
    "Segment",
    "give_back",
    "lend",
    "map_segment",
    "open_channel",
    "receive_fds",
    "send_fds",
    "share_buffer",
    "spare_count",
]

#: Buffers of at least this many bytes go through shared memory; smaller ones stay in the pickle
#: (a segment costs a few system calls, which a pipe beats for small data).
SHARE_THRESHOLD = 256 * 1024
#: At most this many bytes of spare segments are kept for reuse (see the module's docstring).
SPARE_BYTES = 128 * 1024 * 1024
_FDS_PER_MESSAGE = 200  # below the kernel's SCM_MAX_FD (253)
_NAME = "tokengate"
# Before Python 3.13 a mapping keeps a duplicate of its descriptor until it is unmapped.
_NO_DUP: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def _anonymous(size: int) -> int:
    """A descriptor of ``size`` bytes of fresh shared memory that has no name anywhere."""
    create = getattr(os, "memfd_create", None)
    if create is not None:
        fd: int = create(_NAME, getattr(os, "MFD_CLOEXEC", 1))
    else:  # pragma: no cover - macOS and the BSDs: a POSIX segment, unlinked at once
        import _posixshmem  # type: ignore[import-not-found]

        name = f"/{_NAME}-{os.getpid()}-{secrets.token_hex(8)}"
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        _posixshmem.shm_unlink(name)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Segment:
    """One shared-memory segment holding a copy of one buffer; owns its descriptor, which it
    closes on :meth:`close` or when dropped (so a segment never outlives its last holder)."""

    __slots__ = ("__weakref__", "fd", "lent", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.lent = False  # from lend(), not yet given back

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.lent:  # closed without give_back (a discarded call): it is back all the same
            with contextlib.suppress(Exception):  # (at interpreter exit the pool may be gone)
                _spares.back(self, False)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Segment(fd={self.fd}, size={self.size})"


class Part(NamedTuple):
    """One out-of-band buffer of a message: ``length`` bytes at ``offset`` in ``segment``.
    ``owned``: the segment was made for this message alone (else it is a shared object's)."""

    segment: Segment
    offset: int
    length: int
    owned: bool


def share_buffer(buffer: Any) -> Segment:
    """Copy ``buffer`` (anything with the buffer protocol) into a new segment."""
    view = memoryview(buffer).cast("B")
    size = view.nbytes
    fd = _anonymous(size)
    try:
        _write(fd, view)
    except BaseException:
        os.close(fd)
        raise
    return Segment(fd, size)


def _write(fd: int, view: memoryview) -> None:
    size = view.nbytes
    done = 0
    while done < size:
        done += os.pwrite(fd, view[done:], done)


class _Spares:
    """The spare segments of this process, and how many lent segments are out. A lent segment
    comes back by :func:`give_back`, or by being closed or dropped on any other path (a
    discarded call), so the count cannot drift and leave spares held."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # re-entered if a dropped segment closes during a take
        self.segments: list[Segment] = []
        self.bytes = 0
        self.lent = 0

    def take(self, size: int) -> Segment | None:
        """Count one more lent segment; the spare closest to ``size`` (the smallest that fits,
        else the biggest), or None."""
        with self.lock:
            self.lent += 1
            spares = self.segments
            if not spares:
                return None
            fits = [s for s in spares if s.size >= size]
            best = min(fits, key=_size) if fits else max(spares, key=_size)
            spares.remove(best)
            self.bytes -= best.size
            return best

    def back(self, segment: Segment | None, reuse: bool) -> None:
        """A lent segment is back (None: one counted by :meth:`take` was never made)."""
        drop: list[Segment] = []
        with self.lock:
            if segment is None or segment.lent:
                self.lent = max(self.lent - 1, 0)
            if segment is not None:
                segment.lent = False
                if reuse and segment.fd >= 0 and self.bytes + segment.size <= SPARE_BYTES:
                    self.segments.append(segment)
                    self.bytes += segment.size
                else:
                    drop.append(segment)
            if self.lent == 0:  # nothing in flight: an idle lane keeps no shared memory
                drop.extend(self.segments)
                self.segments.clear()
                self.bytes = 0
        for spare in drop:
            spare.close()


def _size(segment: Segment) -> int:
    return segment.size


_spares = _Spares()


def lend(buffer: Any) -> Segment:
    """A segment holding a copy of ``buffer`` for one call: a spare's pages written over when
    there is one, else a new segment. Hand it back with :func:`give_back`."""
    view = memoryview(buffer).cast("B")
    size = view.nbytes
    segment = _spares.take(size)
    if segment is None:
        try:
            segment = share_buffer(view)
        except BaseException:
            _spares.back(None, False)
            raise
        segment.lent = True
        return segment
    segment.lent = True
    try:
        if segment.size != size:
            os.ftruncate(segment.fd, size)
            segment.size = size
        _write(segment.fd, view)
    except BaseException:
        _spares.back(segment, False)
        raise
    return segment


def give_back(segment: Segment, *, reuse: bool) -> None:
    """Return a segment from :func:`lend`: kept as a spare when ``reuse`` (no other process
    maps it any more) and there is room, else closed."""
    _spares.back(segment, reuse)


def spare_count() -> tuple[int, int]:
    """(spare segments, lent segments) now, in this process."""
    with _spares.lock:
        return len(_spares.segments), _spares.lent


def map_segment(fd: int, size: int, *, writable: bool) -> memoryview:
    """Map a received segment: read-only, or copy-on-write when ``writable``. The mapping lives
    as long as the returned view (and whatever is built on it); ``fd`` may be closed at once."""
    if size == 0:
        return memoryview(b"")
    access = mmap.ACCESS_COPY if writable else mmap.ACCESS_READ
    return memoryview(mmap.mmap(fd, size, access=access, **_NO_DUP))


# -- passing descriptors ---------------------------------------------------------------------------
def open_channel() -> tuple[socket.socket, socket.socket]:
    """A pair of connected Unix datagram sockets for passing segment descriptors."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)


def send_fds(sock: socket.socket, fds: Iterable[int]) -> None:
    """Pass ``fds`` to the other end (the kernel holds them until it receives them)."""
    batch = list(fds)
    for start in range(0, len(batch), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"F"], batch[start : start + _FDS_PER_MESSAGE])


def receive_fds(sock: socket.socket, count: int) -> list[int]:
    """Receive ``count`` descriptors sent by :func:`send_fds`; ``EOFError`` if the peer is gone."""
    fds: list[int] = []
    try:
        while len(fds) < count:
            # Never blocks: the sender passes the descriptors before the message naming them.
            data, got, flags, _ = socket.recv_fds(
                sock, 1, min(_FDS_PER_MESSAGE, count - len(fds)), socket.MSG_DONTWAIT
            )
            fds.extend(got)
            if not data or flags & getattr(socket, "MSG_CTRUNC", 0):
                raise EOFError("the descriptors of a shared buffer did not arrive")
    except BlockingIOError:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise EOFError("the descriptors of a shared buffer did not arrive") from None
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return fds
