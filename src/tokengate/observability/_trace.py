"""Trace export: recent task spans as Chrome trace-event JSON (Perfetto, ``chrome://tracing``).

With ``trace=True`` a :class:`TraceRecorder` middleware appends one small tuple per attempt to a
``deque(maxlen=trace_buffer)``: a ring buffer, so memory is bounded whatever the run length, and
``deque.append`` is atomic, so worker threads record without a lock. Nothing about the token is
kept but plain values (no reference to its arguments or result).

``export_trace(path)`` writes the JSON object format: one complete (``"ph": "X"``) event per
attempt, on a track per worker grouped by core (``pid`` = core, ``tid`` = worker), with
``process_name``/``thread_name`` metadata so the viewer shows ``Core 3`` / ``worker_9_core_3``.
Times are microseconds from the first exported span. A worker normally runs one token at a time,
so its spans never overlap; a token run *inside* another on the same worker (a task waiting on a
child it runs itself) nests within its parent, which the viewers draw as a stack. Should a lane
run several tokens at once per worker, spans that would partially overlap are moved to extra
tracks (``worker_3_core_2 #2``), so every track is well formed.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .._middleware import Middleware
from .._token import _ID_BASE, Token

__all__ = ["Span", "TraceRecorder", "trace_events", "write_trace"]

_perf = time.perf_counter


class Span(NamedTuple):
    """One attempt of one token. ``start``/``end`` are ``time.perf_counter()`` seconds."""

    operation_type: str
    token_id: str
    attempt: int
    core: int
    worker: str
    lane: str
    start: float
    end: float
    outcome: str  # resolved / failed / retried
    error: str | None  # exception type name when the attempt raised


class TraceRecorder(Middleware):
    """Keeps the last ``capacity`` spans; installed only when ``trace=True``."""

    def __init__(self, capacity: int = 10_000) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"trace buffer capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        # Raw tuples: (spec, seq, attempt, core, worker, lane, start, end, outcome, error); the
        # token id is formatted at export (as Token.id does), not on the hot path, and the token
        # itself is not kept (its arguments and result could be large).
        self._buffer: deque[tuple[Any, ...]] = deque(maxlen=capacity)
        self._append = self._buffer.append

    def after_attempt(self, token: Token[Any], outcome: str, exc: BaseException | None) -> None:
        start = token.started_at
        if start is None:  # never ran (a dependency failed)
            return
        end = token.finished_at  # None for a retried attempt: the token is not terminal
        self._append(
            (
                token.spec,
                token.seq,
                token.attempts,
                token.core,
                token.worker,
                token.lane,
                start,
                _perf() if end is None else end,
                outcome,
                None if exc is None else type(exc).__name__,
            )
        )

    def spans(self) -> list[Span]:
        """A copy of the buffered spans, oldest first."""
        for _ in range(100):
            try:
                raw = list(self._buffer)
                break
            except RuntimeError:  # mutated while copying (a worker appended): try again
                continue
        else:  # pragma: no cover - would need 100 appends racing 100 copies
            raw = []
        return [
            Span(
                spec.operation_type,
                f"{spec.operation_type}_{_ID_BASE + seq}",
                attempt,
                core if core is not None else 0,
                worker or "?",
                lane or "?",
                start,
                end,
                outcome,
                error,
            )
            for spec, seq, attempt, core, worker, lane, start, end, outcome, error in raw
        ]

    @property
    def full(self) -> bool:
        """Whether the buffer is full, so older spans are being dropped."""
        return len(self._buffer) >= self.capacity

    def clear(self) -> None:
        self._buffer.clear()


_DIGITS = re.compile(r"(\d+)")


def _natural(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(text)]


def _tracks(spans: Sequence[Span]) -> dict[int, tuple[int, str, int]]:
    """Assign each span (by index) to (core, track name, tid) so no track has partial overlaps."""
    by_worker: dict[tuple[int, str, str], list[int]] = {}
    for i, s in enumerate(spans):
        by_worker.setdefault((s.core, s.lane, s.worker), []).append(i)
    out: dict[int, tuple[int, str, int]] = {}
    tid = 0
    for core, lane, worker in sorted(by_worker, key=lambda k: (k[0], k[1], _natural(k[2]))):
        indices = sorted(
            by_worker[(core, lane, worker)], key=lambda i: (spans[i].start, -spans[i].end)
        )
        # Each sub-track keeps the stack of ends of its open spans: a span fits a track if it
        # starts after everything there ended, or lies wholly inside the innermost open span.
        stacks: list[list[float]] = []
        tids: list[int] = []
        base = worker if lane == "thread" else f"{worker} ({lane})"
        for i in indices:
            s = spans[i]
            for n, stack in enumerate(stacks):
                while stack and stack[-1] <= s.start:
                    stack.pop()
                if not stack or s.end <= stack[-1]:
                    stack.append(s.end)
                    out[i] = (core, base if n == 0 else f"{base} #{n + 1}", tids[n])
                    break
            else:
                tid += 1
                stacks.append([s.end])
                tids.append(tid)
                n = len(stacks) - 1
                out[i] = (core, base if n == 0 else f"{base} #{n + 1}", tid)
    return out


def trace_events(
    spans: Sequence[Span], *, capacity: int | None = None, full: bool = False
) -> dict[str, Any]:
    """The Chrome trace-event JSON object for ``spans``."""
    events: list[dict[str, Any]] = []
    if spans:
        origin = min(s.start for s in spans)
        tracks = _tracks(spans)
        named_cores: set[int] = set()
        named_tracks: set[int] = set()
        for i, s in enumerate(spans):
            core, track, tid = tracks[i]
            if core not in named_cores:
                named_cores.add(core)
                events.append(_meta("process_name", core, 0, {"name": f"Core {core}"}))
                events.append(_meta("process_sort_index", core, 0, {"sort_index": core}))
            if tid not in named_tracks:
                named_tracks.add(tid)
                events.append(_meta("thread_name", core, tid, {"name": track}))
                events.append(_meta("thread_sort_index", core, tid, {"sort_index": tid}))
            args: dict[str, Any] = {
                "token": s.token_id,
                "attempt": s.attempt,
                "outcome": s.outcome,
                "lane": s.lane,
                "worker": s.worker,
                "core": s.core,
            }
            if s.error is not None:
                args["error"] = s.error
            events.append(
                {
                    "name": s.operation_type,
                    "cat": s.outcome,
                    "ph": "X",
                    "ts": round((s.start - origin) * 1e6, 3),
                    "dur": round(max(0.0, s.end - s.start) * 1e6, 3),
                    "pid": core,
                    "tid": tid,
                    "args": args,
                }
            )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "producer": "tokengate",
            "spans": len(spans),
            "buffer_capacity": capacity,
            "older_spans_dropped": full,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}


def write_trace(
    path: str | os.PathLike[str],
    spans: Iterable[Span],
    *,
    capacity: int | None = None,
    full: bool = False,
) -> int:
    """Write ``spans`` to ``path`` atomically (a temporary file, then rename); returns the count."""
    spans = list(spans)
    data = trace_events(spans, capacity=capacity, full=full)
    target = os.fspath(path)
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(spans)
