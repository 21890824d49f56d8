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
    """One reading of a running demo."""

    demo: str
    phase: str
    elapsed: float
    duration: float
    snap: StatsSnapshot
    tiers: Mapping[str, TierStats]
    #: lane name -> core -> load (queued + running) of each worker of that core.
    queues: Mapping[str, Mapping[int, list[int]]]


def read_status(coordinator: OperationsCoordinator, demo: Any, name: str, started: float) -> Status:
    return Status(
        demo=name,
        phase=str(getattr(demo, "phase", "")),
        elapsed=time.monotonic() - started,
        duration=float(getattr(demo, "duration", 0.0)),
        snap=coordinator.stats(str(getattr(demo, "phase", "STATS")).upper()),
        tiers=coordinator.tier_stats(),
        queues={lane: coordinator.queue_depths(lane) for lane in coordinator.lanes},
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


def plain_line(s: Status) -> str:
    """One line per reading, for logs and pipes."""
    snap = s.snap
    cores = " ".join(
        f"c{core}:{sum(loads)}/{len(loads)}w"
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
    def __init__(self, coordinator: OperationsCoordinator, name: str) -> None:
        self.coordinator = coordinator
        self.name = name
        self.demo: Any = None
        self.started = time.monotonic()
        #: Set when stdout's reader went away; ``on_broken`` is called once, then.
        self.broken = False
        self.on_broken: Callable[[], None] = lambda: None

    def status(self) -> Status:
        return read_status(self.coordinator, self.demo, self.name, self.started)


class PlainDisplay(_Base):
    """Prints :func:`plain_line` every ``interval`` seconds from a thread of its own."""

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        name: str,
        *,
        interval: float = 2.0,
        out: IO[str] | None = None,
    ) -> None:
        super().__init__(coordinator, name)
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

    def __init__(self, coordinator: OperationsCoordinator, name: str) -> None:
        from rich.console import Console
        from rich.live import Live

        super().__init__(coordinator, name)
        self.console = Console()
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


def render_rich(s: Status) -> Any:
    """The live view of one reading: counts, latencies, cores and storage tiers."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    snap = s.snap
    progress = f"{s.elapsed:.1f} s" + (f" of {s.duration:g} s" if s.duration else "")
    head = Text.assemble(
        ("tokengate demo ", "bold"),
        (s.demo, "bold cyan"),
        "   phase: ",
        (s.phase, "bold yellow"),
        f"   {progress}   (Ctrl-C stops cleanly)",
    )

    counts = Table(box=box.SIMPLE_HEAVY, title="tokens", title_justify="left")
    for col in ("submitted", "resolved", "failed", "discarded", "retried", "in flight"):
        counts.add_column(col, justify="right")
    counts.add_column("p50", justify="right")
    counts.add_column("p95", justify="right")
    counts.add_column("p99", justify="right")
    counts.add_column("max", justify="right")
    counts.add_row(
        str(snap.submitted),
        Text(str(snap.resolved), style="green"),
        Text(str(snap.failed), style="red" if snap.failed else ""),
        str(snap.discarded),
        str(snap.retried),
        str(snap.in_flight),
        _ms(snap.latency_p50),
        _ms(snap.latency_p95),
        _ms(snap.latency_p99),
        _ms(snap.latency_max),
    )

    cores = Table(box=box.SIMPLE_HEAVY, title="cores", title_justify="left")
    for col, justify in (
        ("lane", "left"),
        ("core", "right"),
        ("workers", "right"),
        ("queued+running", "right"),
        ("per worker", "left"),
    ):
        cores.add_column(col, justify=justify)  # type: ignore[arg-type]
    for lane, by_core in s.queues.items():
        for core, loads in by_core.items():
            cores.add_row(
                lane, str(core), str(len(loads)), str(sum(loads)), " ".join(map(str, loads))
            )

    tiers = Table(box=box.SIMPLE_HEAVY, title="storage tiers", title_justify="left")
    for col in ("tier", "running", "limit", "waiting", "most at once"):
        tiers.add_column(col, justify="left" if col == "tier" else "right")
    for t in s.tiers.values():
        tiers.add_row(t.tier, str(t.running), str(t.limit), str(t.waiting), str(t.high_water))

    side_by_side = Table.grid(padding=(0, 2))
    side_by_side.add_row(cores, tiers)
    return Group(head, counts, side_by_side)


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
