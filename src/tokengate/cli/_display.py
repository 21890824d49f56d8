"""What a running demo shows: a live rich view on a terminal, plain periodic lines otherwise.

Both read the coordinator through its public observation methods (``stats``, ``tier_stats``,
``queue_depths``, ``lanes``) from their own thread, so the demo's thread only submits work. Both
offer ``say(text)``: a line from the demo, printed above the live view (or in order with the
plain lines), never torn by a refresh.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, Protocol

from tokengate import OperationsCoordinator, StatsSnapshot, TierStats

__all__ = [
    "Display",
    "LiveDisplay",
    "PlainDisplay",
    "Status",
    "make_display",
    "read_status",
    "silence_stdout",
]


@dataclass(frozen=True)
class Status:
    """One reading of a running demo (or of a user program's coordinator, ``live()``)."""

    demo: str
    phase: str
    elapsed: float
    duration: float
    snap: StatsSnapshot
    tiers: Mapping[str, TierStats]
    #: lane name -> core -> load (queued + running) of each worker of that core; core 0 holds
    #: the workers of a lane that are not pinned (the I/O lane).
    queues: Mapping[str, Mapping[int, list[int]]]
    #: The first words of the live view's heading.
    title: str = "tokengate"
    #: Said at the end of the heading (the demos: how to stop them).
    hint: str = ""


def read_status(
    coordinator: OperationsCoordinator,
    demo: Any,
    name: str,
    started: float,
    *,
    title: str | None = None,
    hint: str = "",
) -> Status:
    return Status(
        demo=name,
        phase=str(getattr(demo, "phase", "")),
        elapsed=time.monotonic() - started,
        duration=float(getattr(demo, "duration", 0.0)),
        snap=coordinator.stats(str(getattr(demo, "phase", "STATS")).upper()),
        tiers=coordinator.tier_stats(),
        queues={lane: coordinator.queue_depths(lane) for lane in coordinator.lanes},
        title=f"tokengate demo {name}" if title is None else title,
        hint=hint,
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


def plain_line(s: Status) -> str:
    """One line per reading, for logs and pipes."""
    snap = s.snap
    cores = " ".join(
        f"{f'c{core}' if core else lane}:{sum(loads)}/{len(loads)}w"
        for lane, by_core in s.queues.items()
        for core, loads in by_core.items()
        if lane == "thread" or any(loads)
    )
    tiers = " ".join(
        f"{t.tier} {t.running}/{t.limit}" + (f"+{t.waiting}" if t.waiting else "")
        for t in s.tiers.values()
        if t.running or t.waiting or t.high_water
    )
    return (
        f"[{s.elapsed:6.1f}s] {s.demo} {s.phase:<9} "
        f"submitted {snap.submitted}  resolved {snap.resolved}  failed {snap.failed}  "
        f"discarded {snap.discarded}  in flight {snap.in_flight}  "
        f"p50 {_ms(snap.latency_p50)} p95 {_ms(snap.latency_p95)} max {_ms(snap.latency_max)}  "
        f"| queues {cores or '-'} | tiers {tiers or 'idle'}"
    )


class Display(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def say(self, text: str = "") -> None: ...


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so later writes (log handlers too) cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass
    finally:
        os.close(devnull)


class _Base:
    def __init__(
        self,
        coordinator: OperationsCoordinator,
        name: str,
        *,
        title: str | None = None,
        hint: str = "(Ctrl-C stops cleanly)",
    ) -> None:
        self.coordinator = coordinator
        self.name = name
        self.title = title
        self.hint = hint
        self.demo: Any = None
        self.started = time.monotonic()
        #: Set when stdout's reader went away; ``on_broken`` is called once, then.
        self.broken = False
        self.on_broken: Callable[[], None] = lambda: None

    def status(self) -> Status:
        return read_status(
            self.coordinator, self.demo, self.name, self.started, title=self.title, hint=self.hint
        )


class PlainDisplay(_Base):
    """Prints :func:`plain_line` every ``interval`` seconds from a thread of its own."""

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        name: str,
        *,
        interval: float = 2.0,
        out: IO[str] | None = None,
        **heading: Any,
    ) -> None:
        super().__init__(coordinator, name, **heading)
        self.interval = interval
        self.out = out if out is not None else sys.stdout
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tokengate-display", daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            self.say(plain_line(self.status()))

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def say(self, text: str = "") -> None:
        with self._lock:
            if self.broken:
                return
            try:
                self.out.write(text + "\n")
                self.out.flush()
            except BrokenPipeError:  # `tokengate demo ... | head`: the reader has gone
                self.broken = True
                silence_stdout()
                self.on_broken()


class LiveDisplay(_Base):
    """A rich ``Live`` view refreshed four times a second; demo lines print above it."""

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        name: str,
        *,
        console: Any = None,
        **heading: Any,
    ) -> None:
        from rich.console import Console
        from rich.live import Live

        super().__init__(coordinator, name, **heading)
        self.console = Console() if console is None else console
        self.live = Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=4,
            transient=False,
            redirect_stdout=True,
            redirect_stderr=False,
        )

    def start(self) -> None:
        self.started = time.monotonic()
        self.live.start(refresh=True)

    def stop(self) -> None:
        self.live.stop()

    def say(self, text: str = "") -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _render(self) -> Any:
        return render_rich(self.status())


#: Rows the lane table may take before each lane is folded into one row: with the header, the
#: token counts and the latency line this keeps the view within an 80 x 24 terminal.
MAX_LANE_ROWS = 14
#: The per-worker loads column (one character per worker) is cut with an ellipsis past this
#: many workers; only it gives way when the lane labels are long, never a header.
PER_WORKER_WIDTH = 16


def _where(lane: str, core: int) -> str:
    """A lane's worker group: ``core 3`` when pinned; core 0 means its threads are not pinned
    (the I/O lane's pools, the async lane's event loop)."""
    if core:
        return f"{lane} core {core}"
    return f"{lane} (unpinned)"


def _cores(cores: list[int]) -> str:
    pinned = sorted(c for c in cores if c)
    if not pinned:
        return "(unpinned)"
    if pinned == list(range(pinned[0], pinned[-1] + 1)) and len(pinned) > 1:
        return f"cores {pinned[0]}-{pinned[-1]}"
    return "cores " + ",".join(map(str, pinned))


def lane_rows(queues: Mapping[str, Mapping[int, list[int]]]) -> list[tuple[str, list[int]]]:
    """(label, per-worker loads) per lane and core; one row per lane when that would not fit."""
    rows = [
        (_where(lane, core), loads)
        for lane, by_core in queues.items()
        for core, loads in by_core.items()
    ]
    if len(rows) <= MAX_LANE_ROWS:
        return rows
    return [
        (f"{lane} {_cores(list(by_core))}", [load for loads in by_core.values() for load in loads])
        for lane, by_core in queues.items()
    ]


def heading(s: Status) -> str:
    """The first line: what runs, the phase, the time, and the hint."""
    parts = [s.title]
    if s.phase:
        parts.append(f"phase {s.phase}")
    parts.append(f"{s.elapsed:.1f} s" + (f" of {s.duration:g} s" if s.duration else ""))
    if s.hint:
        parts.append(s.hint)
    return "   ".join(parts)


def render_rich(s: Status) -> Any:
    """The live view of one reading, laid out for an 80 x 24 terminal: counts, latencies, the
    load of each lane's workers and the storage tiers (side by side)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    snap = s.snap
    head = Text(heading(s), style="bold", no_wrap=True, overflow="ellipsis")

    counts = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for col in ("submitted", "resolved", "failed", "discarded", "retried", "in flight"):
        counts.add_column(col, justify="right", no_wrap=True)
    counts.add_row(
        str(snap.submitted),
        Text(str(snap.resolved), style="green"),
        Text(str(snap.failed), style="red" if snap.failed else ""),
        str(snap.discarded),
        str(snap.retried),
        str(snap.in_flight),
    )
    latency = Text(
        f"latency  p50 {_ms(snap.latency_p50)}   p95 {_ms(snap.latency_p95)}   "
        f"p99 {_ms(snap.latency_p99)}   max {_ms(snap.latency_max)}",
        no_wrap=True,
        overflow="ellipsis",
    )

    lanes = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=0,
        header_style="bold",
    )
    rows = lane_rows(s.queues)
    widest = max((len(label) for label, _ in rows), default=4)
    lanes.add_column("lane", no_wrap=True, min_width=max(4, widest))
    lanes.add_column("workers", justify="right", no_wrap=True, min_width=7)
    lanes.add_column("load", justify="right", no_wrap=True, min_width=4)
    lanes.add_column(
        "per worker", no_wrap=True, overflow="ellipsis", min_width=10, max_width=PER_WORKER_WIDTH
    )
    for label, loads in rows:
        lanes.add_row(label, str(len(loads)), str(sum(loads)), "".join(_digit(n) for n in loads))

    tiers = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=0,
        header_style="bold",
    )
    tiers.add_column("tier", no_wrap=True)
    for col in ("run", "limit", "wait", "peak"):
        tiers.add_column(col, justify="right", no_wrap=True)
    for t in s.tiers.values():
        tiers.add_row(t.tier, str(t.running), str(t.limit), str(t.waiting), str(t.high_water))

    side_by_side = Table.grid(padding=(0, 2))
    side_by_side.add_row(lanes, tiers)
    return Group(head, Text(""), counts, latency, Text(""), side_by_side)


def _digit(load: int) -> str:
    """One character per worker: its load, ``+`` past 9."""
    return str(load) if load < 10 else "+"


def make_display(
    coordinator: OperationsCoordinator,
    name: str,
    *,
    live: bool,
    interval: float,
) -> PlainDisplay | LiveDisplay:
    """A live view if asked for and rich is installed, else plain lines."""
    if live:
        try:
            return LiveDisplay(coordinator, name)
        except ImportError:
            pass
    return PlainDisplay(coordinator, name, interval=interval)
