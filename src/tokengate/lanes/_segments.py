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

Big shared objects are filled in parallel: a buffer of at least :data:`PIECE_BYTES` × 2 given to
``share()`` is split into page-aligned *pieces*, one segment descriptor each, written by several
threads at once (a write into one descriptor holds its file's lock, so one descriptor cannot be
filled by two threads), and the receiver maps the pieces side by side into one reserved range
of addresses: one contiguous buffer again, still without a copy.

A call's own big argument or result is filled in pieces too, from twice
:data:`LEND_PIECE_BYTES`: its copy is made before the call returns to its caller, and two threads
make it in about half the time.

Reuse: filling a fresh segment costs the kernel a page allocation per 4 KiB (and freeing it
later as much again), more than the copy itself. So a call's segment whose worker said it no
longer maps it (nothing kept a view of the argument) is kept as a *spare* and the next call's
buffer is written over its pages (:func:`lend`, :func:`give_back`). Spares are held only while
some call still holds a lent segment, up to :data:`SPARE_BYTES`; when the last lent segment
comes back they are all closed, so an idle lane holds no shared memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
import socket
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any, NamedTuple

__all__ = [
    "LEND_PIECE_BYTES",
    "PIECE_BYTES",
    "SHARE_THRESHOLD",
    "SPARE_BYTES",
    "Part",
    "Segment",
    "fill_threads",
    "give_back",
    "lend",
    "map_segment",
    "open_channel",
    "piece_count",
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
#: A shared object's buffer is cut into pieces of at least this size, filled by as many threads
#: as there are cores (allocating the pages is what a fill mostly costs, and it scales).
PIECE_BYTES = 32 * 1024 * 1024
#: The same for a call's own big argument or result that no spare segment can take: from
#: twice this size it is filled in pieces too (16 fresh 32 MB buffers: 265 ms by one thread,
#: 150 ms in two pieces each, on a 2-core machine; one call with a 128 MB array, call to
#: result: 106 → 92 ms). Smaller, a fill's threads cost more than they save.
LEND_PIECE_BYTES = 8 * 1024 * 1024
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
    """One shared-memory segment holding a copy of one buffer; owns its descriptors, which it
    closes on :meth:`close` or when dropped (so a segment never outlives its last holder).

    Most segments are one descriptor (``fd``). A big shared object's is several pieces of
    ``piece`` bytes each (the last may be shorter): ``fd`` and then ``more``."""

    __slots__ = ("__weakref__", "fd", "lent", "more", "piece", "size")

    def __init__(self, fd: int, size: int, more: tuple[int, ...] = (), piece: int = 0) -> None:
        self.fd = fd
        self.size = size
        self.more = more
        self.piece = piece if more else size
        self.lent = False  # from lend(), not yet given back

    @property
    def fds(self) -> list[int]:
        """Every descriptor, in order (what a receiver needs to map the whole segment)."""
        return [self.fd, *self.more]

    def close(self) -> None:
        fds, self.fd, self.more = self.fds, -1, ()
        for fd in fds:
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
    ``key``: the shared object's the segment is (0: it was made for this message alone)."""

    segment: Segment
    offset: int
    length: int
    key: int

    @property
    def owned(self) -> bool:
        """The segment was made for this message alone: the message closes it."""
        return self.key == 0


def share_buffer(buffer: Any, *, pieces: int = 1, least: int | None = None) -> Segment:
    """Copy ``buffer`` (anything with the buffer protocol) into a new segment: in up to
    ``pieces`` pieces of at least ``least`` bytes (:data:`PIECE_BYTES` if None), filled by as
    many threads."""
    view = memoryview(buffer).cast("B")
    size = view.nbytes
    piece = _piece_size(size, pieces, PIECE_BYTES if least is None else least)
    fds: list[int] = []
    try:
        for start in range(0, size, piece) if size else (0,):
            fds.append(_anonymous(min(piece, size - start)))
        _fill(fds, view, piece)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Segment(fds[0], size, tuple(fds[1:]), piece)


def fill_threads() -> int:
    """How many threads fill a big shared object's pieces: one per core this process may use."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _piece_size(size: int, pieces: int, least: int) -> int:
    """Bytes per piece when ``size`` bytes are cut into at most ``pieces`` pieces of at least
    ``least`` bytes, each a whole number of pages (so the pieces map side by side)."""
    count = min(pieces, size // max(least, 1))
    if count < 2:
        return size
    granule = mmap.ALLOCATIONGRANULARITY
    return -(-size // count // granule) * granule


def _fill(fds: list[int], view: memoryview, piece: int) -> None:
    """Write ``view`` into the pieces, one thread per piece (``pwrite`` lets go of the GIL)."""
    errors: list[BaseException] = []

    def write(index: int) -> None:
        try:
            start = index * piece
            _write(fds[index], view[start : start + piece])
        except BaseException as exc:
            errors.append(exc)

    helpers = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(1, len(fds))]
    for helper in helpers:
        helper.start()
    write(0)
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]


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
        else the biggest), or None. A spare in pieces is taken only for its very size (its
        pieces cannot be resized as one descriptor can)."""
        with self.lock:
            self.lent += 1
            spares = self.segments
            fits = [s for s in spares if s.size == size or (s.size > size and not s.more)]
            whole = [s for s in spares if not s.more]
            if not fits and not whole:
                return None
            best = min(fits, key=_size) if fits else max(whole, key=_size)
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
            segment = share_buffer(view, pieces=fill_threads(), least=LEND_PIECE_BYTES)
        except BaseException:
            _spares.back(None, False)
            raise
        segment.lent = True
        return segment
    segment.lent = True
    try:
        if segment.size != size:  # one descriptor (take() says so)
            os.ftruncate(segment.fd, size)
            segment.size = segment.piece = size
        _fill(segment.fds, view, segment.piece)
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


def map_segment(fds: list[int], size: int, piece: int, *, writable: bool) -> memoryview:
    """Map a received segment (its pieces' descriptors, in order): read-only, or copy-on-write
    when ``writable``. The mapping lives as long as the returned view (and whatever is built on
    it); the descriptors may be closed at once."""
    if size == 0:
        return memoryview(b"")
    if len(fds) > 1:
        return _map_pieces(fds, size, piece, writable=writable)
    access = mmap.ACCESS_COPY if writable else mmap.ACCESS_READ
    return memoryview(mmap.mmap(fds[0], size, access=access, **_NO_DUP))


def piece_count(size: int, piece: int) -> int:
    """How many descriptors a segment of ``size`` bytes in pieces of ``piece`` bytes has."""
    return 1 if piece >= size or piece <= 0 else -(-size // piece)


class _Libc:
    """``mmap``/``munmap`` with ``MAP_FIXED``, which the ``mmap`` module does not offer: the
    pieces of one segment are mapped side by side into one reserved range."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap = libc.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self.munmap = libc.munmap
        self.munmap.restype = ctypes.c_int
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def map(self, address: int | None, size: int, prot: int, flags: int, fd: int) -> int:
        got = self.mmap(address, size, prot, flags, fd, 0)
        if got is None or got == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of a shared segment piece failed: {os.strerror(err)}")
        return int(got)


_libc: _Libc | None = None
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)


def _map_pieces(fds: list[int], size: int, piece: int, *, writable: bool) -> memoryview:
    global _libc
    if _libc is None:
        _libc = _Libc()
    libc = _libc
    base = libc.map(None, size, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)  # PROT_NONE
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = (mmap.MAP_PRIVATE if writable else mmap.MAP_SHARED) | _MAP_FIXED
        for index, fd in enumerate(fds):
            start = index * piece
            libc.map(base + start, min(piece, size - start), prot, flags, fd)
        region = (ctypes.c_ubyte * size).from_address(base)
    except BaseException:
        libc.munmap(base, size)
        raise
    # Unmapped with the last view of it; never at interpreter exit, while views may be in use.
    weakref.finalize(region, libc.munmap, base, size).atexit = False
    view = memoryview(region).cast("B")
    return view if writable else view.toreadonly()


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
