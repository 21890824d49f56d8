"""What crosses the pipes between the process lane and its worker processes, and how.

Both sides import this module; it keeps no state but a lazily built pickler class. Three concerns:

**Pickling.** Plain ``pickle`` first (fast, in C), ``cloudpickle`` where plain pickle cannot: a
function or class defined in ``__main__`` (a worker process never imports the user's script, so
such objects travel *by value*), a lambda, a function defined inside another, a decorated
function rebound under another name. :class:`_MainAware` makes plain pickle give up early on
anything from ``__main__`` (it would pickle by a name the worker cannot resolve), and
:class:`_ByValue` makes cloudpickle send such a :class:`TaskFunction` as its raw function plus
its spec, so the worker runs the body and never re-submits it.

**Framing.** A message is an 8-byte big-endian length and the payload. Writes use one
``writev``; reads take whatever the pipe holds in one ``read`` and loop only for big messages.

**Big buffers.** Buffers of at least ``SHARE_THRESHOLD`` bytes that pickle protocol 5 hands
over out of band (NumPy arrays, ``bytearray``, ``memoryview``) travel in shared memory, their
descriptors over a Unix socket beside the pipes (:mod:`._segments`); a buffer inside an object
shared with ``share()`` is sent as its segment and offset, without a copy (:mod:`._sharing`).
A call message says where they are: ``!II`` (function length, buffer count), ``!QQQQ`` per
buffer (its segment's size and piece size, its offset and length there), the function, the
arguments; the descriptors of each segment's pieces come over the socket in the same order. A call
without big buffers is the same message with a count of 0, and costs what it did.

**Replies.** The first byte of a reply from a worker says what follows: ``R`` ready (its pid),
``B`` boot failure (traceback text), ``V`` a value, ``O`` a value with big buffers (a count,
their places, then the pickle), ``E`` an exception (pickled with its traceback as text), ``S`` a
serialization failure inside the worker (text). A reply to a call with big buffers may be
preceded by ``F``: the worker maps the call's segments no more, so they may be reused.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import struct
import traceback
import types
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from .._decorator import TaskFunction, _rebuild_task, resolves_by_name
from .._errors import SerializationError
from . import _segments, _sharing
from ._segments import Part

if TYPE_CHECKING:
    import socket

__all__ = [
    "RELEASED",
    "RELEASED_MARK",
    "ProcessCall",
    "Reader",
    "RemoteTraceback",
    "decode_failure",
    "decode_shared_value",
    "dumps",
    "dumps_arguments",
    "dumps_arguments_shared",
    "dumps_shared",
    "encode_exception",
    "encode_value",
    "forget_message",
    "forgotten_keys",
    "function_payload",
    "loads_shared",
    "pack_places",
    "prepare_call",
    "receive_views",
    "send",
    "split_call",
    "unpack_places",
]

PROTOCOL = pickle.HIGHEST_PROTOCOL
_HEADER = struct.Struct("!Q")
_CALL_HEAD = struct.Struct("!II")
_COUNT = struct.Struct("!I")
_PLACE = struct.Struct("!QQQQQ")
_KEY = struct.Struct("!Q")
_READ_CHUNK = 1 << 16

READY = ord("R")
BOOT_ERROR = ord("B")
VALUE = ord("V")
SHARED_VALUE = ord("O")
ERROR = ord("E")
SERIAL = ord("S")
_V, _O, _E, _S = b"V", b"O", b"E", b"S"
RELEASED = ord("F")
RELEASED_MARK = b"F"


# -- pickling ------------------------------------------------------------------------------------
class _NeedsCloudpickle(Exception):
    """Raised inside plain pickling to switch to cloudpickle (never escapes this module)."""


def _from_main(obj: Any) -> bool:
    return getattr(obj, "__module__", None) == "__main__"


class _MainAware(pickle.Pickler):
    """Plain pickle that refuses what a worker could not unpickle by name.

    ``reducer_override`` is not called for ints, strs, lists, dicts and the other basic types,
    so the usual arguments cost nothing extra.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TaskFunction):
            if _from_main(obj) or not resolves_by_name(obj):
                raise _NeedsCloudpickle
        elif isinstance(obj, type | types.FunctionType) and _from_main(obj):
            raise _NeedsCloudpickle
        elif type(obj) is memoryview and obj.contiguous:  # out of band when big, a view again
            return memoryview, (pickle.PickleBuffer(obj),)
        return NotImplemented


BufferCallback = Callable[[pickle.PickleBuffer], Any]


def _plain(obj: Any, buffer_callback: BufferCallback | None = None) -> bytes:
    buf = io.BytesIO()
    _MainAware(buf, PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buf.getvalue()


_by_value_pickler: Any = None


def _make_by_value_pickler() -> Any:
    import cloudpickle

    class _ByValue(cloudpickle.Pickler):  # type: ignore[misc]
        """cloudpickle, with tasks the worker cannot import sent as (raw function, spec), and
        code keeping its file name (cloudpickle blanks it), so remote tracebacks show source."""

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, TaskFunction) and (_from_main(obj) or not resolves_by_name(obj)):
                return _rebuild_task, (obj.__wrapped__, obj.spec, obj._binding)
            return super().reducer_override(obj)

    code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)
    if code_reduce is not None:

        def reduce_code(code: types.CodeType) -> Any:
            make, args = code_reduce(code)
            name = code.co_filename
            return make, tuple(
                name if isinstance(a, str) and a == "<dynamic-code>" else a for a in args
            )

        _ByValue.dispatch_table = ChainMap(
            {types.CodeType: reduce_code}, cloudpickle.Pickler.dispatch_table
        )
    return _ByValue


def _cloud(obj: Any, buffer_callback: BufferCallback | None = None) -> bytes:
    global _by_value_pickler
    if _by_value_pickler is None:
        _by_value_pickler = _make_by_value_pickler()
    buf = io.BytesIO()
    _by_value_pickler(buf, PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buf.getvalue()


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` for the other side: plain pickle, or cloudpickle where it cannot.

    Raises whatever cloudpickle raised when neither can (the caller words the error).
    """
    try:
        return _plain(obj)
    except Exception:
        pass
    return _cloud(obj)


class _BigBuffers:
    """A ``buffer_callback`` that keeps the out-of-band buffers of at least ``threshold`` bytes,
    and smaller ones that lie in a shared object (returning False: not in the pickle), and lets
    the others stay in band."""

    __slots__ = ("buffers", "threshold")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.buffers: list[memoryview] = []

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickle copies it in band
            return True
        if raw.nbytes < self.threshold and _sharing.find(raw) is None:
            return True
        self.buffers.append(raw)
        return False


def _part(buffer: memoryview, lent: bool) -> Part:
    found = _sharing.find(buffer)
    if found is not None:
        return Part(found[0], found[1], buffer.nbytes, found[2])
    segment = _segments.lend(buffer) if lent else _segments.share_buffer(buffer)
    return Part(segment, 0, segment.size, 0)


def dumps_shared(obj: Any, *, lent: bool = False) -> tuple[bytes, list[Part]]:
    """:func:`dumps`, with the big out-of-band buffers in shared memory (in pickle order):
    copied into new segments (``lent``: from :func:`._segments.lend`, to be handed back with
    :func:`._segments.give_back`), or found in a shared object's. No segment is made for a
    value without big buffers."""
    keep = _BigBuffers(_segments.SHARE_THRESHOLD)
    try:
        data = _plain(obj, keep)
    except Exception:
        keep.buffers.clear()
        data = _cloud(obj, keep)
    if not keep.buffers:
        return data, []
    parts: list[Part] = []
    try:
        for buffer in keep.buffers:
            parts.append(_part(buffer, lent))
    except BaseException:
        for part in parts:
            if part.owned:
                _close_owned(part.segment, lent)
        raise
    finally:
        keep.buffers.clear()
    return data, parts


def _close_owned(segment: _segments.Segment, lent: bool, reuse: bool = False) -> None:
    if lent:
        _segments.give_back(segment, reuse=reuse)
    else:
        segment.close()


#: A buffer's segment size and piece size, offset, length, and its shared object's key (or 0).
Place = tuple[int, int, int, int, int]


def pack_places(parts: list[Part]) -> bytes:
    return b"".join(
        _PLACE.pack(p.segment.size, p.segment.piece, p.offset, p.length, p.key) for p in parts
    )


def unpack_places(data: memoryview, start: int, count: int) -> list[Place]:
    return [_PLACE.unpack_from(data, start + i * _PLACE.size) for i in range(count)]


def part_fds(parts: list[Part]) -> list[int]:
    """The descriptors of the parts' segments, each segment's pieces in order."""
    return [fd for part in parts for fd in part.segment.fds]


def loads_shared(data: Any, views: list[memoryview]) -> Any:
    """Unpickle what :func:`dumps_shared` made, its buffers given as mapped views."""
    return pickle.loads(data, buffers=views) if views else pickle.loads(data)


def receive_views(
    sock: socket.socket,
    places: list[Place],
    *,
    writable: bool,
    kept: dict[int, memoryview] | None = None,
) -> list[memoryview]:
    """Receive and map the segments of one message, each view its buffer's place in its
    segment (the descriptors are closed once mapped).

    ``kept`` (a worker's): the mappings of shared objects, by key, kept across calls. A shared
    object's segment found there is not mapped again; one not found is mapped and kept."""
    counts = [_segments.piece_count(size, piece) for size, piece, _, _, _ in places]
    fds = _segments.receive_fds(sock, sum(counts))
    try:
        views = []
        at = 0
        for count, (size, piece, offset, length, key) in zip(counts, places, strict=True):
            mapping = kept.get(key) if kept is not None and key else None
            if mapping is None:
                mapping = _segments.map_segment(
                    fds[at : at + count], size, piece, writable=writable
                )
                if kept is not None and key:
                    kept[key] = mapping
            views.append(mapping[offset : offset + length])
            at += count
        return views
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def forget_message(keys: list[int]) -> list[bytes]:
    """A message telling a worker to let go of the mappings of these shared objects' keys (it
    has no function, which no call lacks, and gets no reply)."""
    return [_CALL_HEAD.pack(0, len(keys)), b"".join(_KEY.pack(key) for key in keys)]


def forgotten_keys(message: memoryview) -> list[int] | None:
    """The keys of a :func:`forget_message`; None for a call (worker side)."""
    n, count = _CALL_HEAD.unpack_from(message)
    if n:
        return None
    start = _CALL_HEAD.size
    return [_KEY.unpack_from(message, start + i * _KEY.size)[0] for i in range(count)]


def _type_name(obj: Any) -> str:
    kind = type(obj)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _culprit(value: Any, path: str, depth: int = 0) -> tuple[str, Any] | None:
    """The innermost element of ``value`` (through lists, tuples, sets and dicts) that cannot be
    pickled, with its path; None if ``value`` pickles."""
    try:
        dumps(value)
    except Exception:
        pass
    else:
        return None
    if depth < 4:
        items: list[tuple[str, Any]] = []
        if isinstance(value, list | tuple):
            items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
        elif isinstance(value, set | frozenset):
            items = [(f"{path} (an element)", item) for item in value]
        elif isinstance(value, Mapping):
            items = [(f"{path}[{key!r}]", item) for key, item in value.items()]
        for sub_path, item in items:
            found = _culprit(item, sub_path, depth + 1)
            if found is not None:
                return found
    return path, value


def _reason(value: Any) -> str:
    try:
        dumps(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "it could not be pickled"  # pragma: no cover - only when pickling is non-deterministic


def _describe(task: Any) -> str:
    name = getattr(task, "__qualname__", None) or repr(task)
    spec = getattr(task, "spec", None)
    return name if spec is None else f"{name} (operation {spec.operation_type!r})"


def dumps_arguments(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call's arguments, or raise :class:`SerializationError` naming the culprit."""
    try:
        return dumps((args, kwargs))
    except Exception as exc:
        _unpicklable(task, args, kwargs, exc)


def dumps_arguments_shared(
    task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[bytes, list[Part]]:
    """:func:`dumps_arguments`, big buffers in shared memory (:func:`dumps_shared`)."""
    try:
        return dumps_shared((args, kwargs), lent=True)
    except Exception as exc:
        _unpicklable(task, args, kwargs, exc)


def _unpicklable(
    task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
) -> NoReturn:
    """Raise :class:`SerializationError` naming the argument that cannot be pickled."""
    found: tuple[str, Any] | None = None
    for i, arg in enumerate(args):
        found = _culprit(arg, f"argument {i + 1}")
        if found is not None:
            break
    else:
        for key, arg in kwargs.items():
            found = _culprit(arg, f"keyword argument {key!r}")
            if found is not None:
                break
    if found is None:  # each pickles alone but not together (e.g. a recursion limit)
        where, what, reason = "the arguments", (args, kwargs), f"{type(error).__name__}: {error}"
    else:
        where, what = found
        reason = _reason(what)
    raise SerializationError(
        f"cannot send {where} of {_describe(task)} to a worker process: a {_type_name(what)} "
        f"cannot be pickled ({reason}). Pass picklable values (plain data, module-level "
        f"functions and classes), or tag the task executor='thread' to run it in this process"
    ) from error


def function_payload(task: TaskFunction[..., Any]) -> bytes:
    """The pickled task for a worker process, made once per task and cached on it.

    An importable task travels by name (the worker imports its module); one defined in
    ``__main__`` or not reachable by its name travels by value, once: the globals it uses are
    captured at its first call.
    """
    cached: bytes | None = task.__dict__.get("_tokengate_payload")
    if cached is not None:
        return cached
    try:
        payload = dumps(task)
    except Exception as exc:
        raise SerializationError(
            f"cannot send the function {_describe(task)} to a worker process "
            f"({type(exc).__name__}: {exc}). Define it at module level, or tag the task "
            f"executor='thread' to run it in this process"
        ) from exc
    task.__dict__["_tokengate_payload"] = payload
    return payload


class ProcessCall:
    """A process token's call, pickled: the function and (once dependencies are resolved) the
    arguments, their big buffers in shared memory (``parts``). Pickled once at submit time;
    retries send the same bytes and segments. ``held`` is what the call holds of the
    coordinator's byte budget while it is queued (``_byte_budget.py``). :meth:`close` lets the
    segments go (the last holder of a segment frees it)."""

    __slots__ = ("args", "fn", "held", "parts", "released", "task")

    def __init__(
        self,
        task: TaskFunction[..., Any] | None,
        fn: bytes,
        args: bytes | None,
        parts: list[Part] | None = None,
    ) -> None:
        self.task = task
        self.fn = fn
        self.args = args
        self.parts = parts or []
        self.held = 0
        #: The last worker that ran the call said it no longer maps the call's segments (its
        #: reply began with ``F``): they may be written over for another call.
        self.released = False

    def set_arguments(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pickle the arguments now (their tokens resolved since the call was made)."""
        self.args, self.parts = dumps_arguments_shared(task, args, kwargs)

    def size(self) -> int:
        """The bytes this call holds of its own: its pickled arguments and the segments made
        for it (a shared object's segments are charged once, by ``share()``; the function's
        bytes are made once per task and shared by every call)."""
        args = self.args
        own = 0 if args is None else len(args)
        for part in self.parts:
            if part.owned:
                own += part.segment.size
        return own

    def fds(self) -> list[int]:
        """The descriptors of the shared buffers, to pass before the message."""
        return part_fds(self.parts)

    def shared_keys(self) -> list[int]:
        """The keys of the shared objects whose segments the call passes."""
        return [part.key for part in self.parts if part.key]

    def message(self) -> list[bytes]:
        """The buffers of the task message (lengths and places, function, arguments)."""
        assert self.args is not None
        parts = self.parts
        if not parts:
            return [_CALL_HEAD.pack(len(self.fn), 0), self.fn, self.args]
        return [_CALL_HEAD.pack(len(self.fn), len(parts)), pack_places(parts), self.fn, self.args]

    def close(self) -> None:
        """Let the shared buffers go: hand back the segments made for this call, for reuse if
        no worker maps them any more (a shared object's stay with their other holders; the last
        holder of a segment frees it)."""
        parts, self.parts = self.parts, []
        for part in parts:
            if part.owned:
                _segments.give_back(part.segment, reuse=self.released)


def prepare_call(
    task: TaskFunction[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    has_dependencies: bool,
) -> ProcessCall:
    """Pickle a process token's call on the caller's thread (raises ``SerializationError``).

    Arguments holding tokens are pickled later, once the tokens' values replace them.
    """
    fn = function_payload(task)
    if has_dependencies:
        return ProcessCall(task, fn, None)
    return ProcessCall(task, fn, *dumps_arguments_shared(task, args, kwargs))


def split_call(data: memoryview) -> tuple[memoryview, memoryview, list[Place]]:
    """The function and argument parts of a task message, and the places of its shared buffers
    (worker side)."""
    n, count = _CALL_HEAD.unpack_from(data)
    start = _CALL_HEAD.size
    places = unpack_places(data, start, count)
    start += count * _PLACE.size
    return data[start : start + n], data[start + n :], places


# -- replies (worker side) -------------------------------------------------------------------------
def encode_value(value: Any, what: str, channel: socket.socket | None = None) -> list[bytes]:
    """``V`` + the pickled value, or ``S`` + why it cannot be pickled (buffers for ``send``).

    With a ``channel``, big buffers go into shared memory and their descriptors through the
    channel at once: ``O`` + their count and sizes + the pickle.
    """
    try:
        if channel is None:
            return [_V, dumps(value)]
        data, parts = dumps_shared(value)
        if not parts:
            return [_V, data]
        try:
            _segments.send_fds(channel, part_fds(parts))
        finally:
            for part in parts:
                if part.owned:
                    part.segment.close()  # the kernel holds it for the parent now
        return [_O, _COUNT.pack(len(parts)), pack_places(parts), data]
    except Exception as exc:
        message = (
            f"{what} returned a {_type_name(value)}, which cannot be pickled to come back from "
            f"the worker process ({type(exc).__name__}: {exc}). Return picklable data, or tag "
            f"the task executor='thread'"
        )
        return [_S, pickle.dumps((message, ""), PROTOCOL)]


def encode_exception(exc: BaseException) -> list[bytes]:
    """``E`` + (the pickled exception or None, its type, its text, the traceback as text).

    The traceback starts at the task's own frame (the worker loop's frame is left out).
    """
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    blob: bytes | None
    try:
        blob = dumps(exc)
        pickle.loads(blob)  # an exception class whose __init__ needs other args fails here
    except Exception:
        blob = None
    try:
        message = str(exc)
    except Exception:
        message = "<str() failed>"
    return [_E, pickle.dumps((blob, _type_name(exc), message, text), PROTOCOL)]


# -- replies (parent side) -------------------------------------------------------------------------
def decode_shared_value(body: memoryview, channel: socket.socket) -> Any:
    """The value of an ``O`` reply: its segments received from ``channel`` and mapped
    copy-on-write (writable, copied only where written)."""
    (count,) = _COUNT.unpack_from(body)
    start = _COUNT.size
    views = receive_views(channel, unpack_places(body, start, count), writable=True)
    return loads_shared(body[start + count * _PLACE.size :], views)


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process, as text.

    Set as the ``__cause__`` of the exception ``get()`` raises, as ``concurrent.futures`` does,
    so the traceback printed in the parent shows where the task failed in the worker.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def decode_failure(status: int, body: memoryview, what: str) -> BaseException:
    """Rebuild the exception of an ``E`` or ``S`` reply, with the remote traceback attached."""
    if status == SERIAL:
        message, text = pickle.loads(body)
        exc: BaseException = SerializationError(message)
    else:
        blob, type_name, message, text = pickle.loads(body)
        remote: BaseException | None = None
        if blob is not None:
            with contextlib.suppress(Exception):
                remote = pickle.loads(blob)
        if isinstance(remote, BaseException):
            exc = remote
        else:
            exc = SerializationError(
                f"{what} raised {type_name}: {message} — an exception that could not be pickled "
                f"to come back from the worker process (its traceback is attached)"
            )
    if text:
        exc.__cause__ = RemoteTraceback(text)
    return exc


# -- framing ---------------------------------------------------------------------------------------
def send(fd: int, buffers: list[bytes]) -> None:
    """Write one message made of ``buffers`` (raises ``BrokenPipeError`` if nobody reads)."""
    size = sum(len(b) for b in buffers)
    parts: list[Any] = [_HEADER.pack(size), *buffers]
    total = _HEADER.size + size
    written = os.writev(fd, parts)
    if written < total:  # interrupted part-way (a signal): write the rest
        view = memoryview(b"".join(parts))[written:]
        while view:
            view = view[os.write(fd, view) :]


class Reader:
    """Reads whole messages from a pipe; one message per ``recv``."""

    __slots__ = ("_buf", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""

    def recv(self) -> memoryview:
        """The next message; raises ``EOFError`` if the writer is gone."""
        buf = self._buf
        while len(buf) < _HEADER.size:
            chunk = os.read(self.fd, _READ_CHUNK)
            if not chunk:
                raise EOFError
            buf += chunk
        (size,) = _HEADER.unpack_from(buf)
        end = _HEADER.size + size
        if len(buf) < end:
            parts = [buf]
            have = len(buf)
            while have < end:
                chunk = os.read(self.fd, max(_READ_CHUNK, end - have))
                if not chunk:
                    raise EOFError
                parts.append(chunk)
                have += len(chunk)
            buf = b"".join(parts)
        self._buf = buf[end:]
        return memoryview(buf)[_HEADER.size : end]
