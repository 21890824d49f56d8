"""``tokengate demo NAME``: run a demo with a display, stop it cleanly, print its report.

The order of things::

    check the options this build can honour (else exit 2, before anything starts)
    build the coordinator (trace / backend options) and the demo
    install the Ctrl-C handler  ->  start the coordinator  ->  metrics server  ->  display
    print the "started" line    ->  demo.run(coordinator, stop)   (returns early on Ctrl-C)
    stop the display  ->  coordinator.stop(): drain, or discard what has not started if stopped
    the demo's closing report   ->  the trace file

Ctrl-C (or SIGTERM) only sets the ``stop`` event the demo polls between waves: no exception is
raised into tokengate's own code, so no count is left half-updated and the drain cannot hang on
a token that was counted but never routed. A second Ctrl-C raises ``KeyboardInterrupt`` for the
impatient; the report is printed all the same.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import logging
import random
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import tokengate
from tokengate import OperationsCoordinator, TokenGateError
from tokengate.cli._display import make_display
from tokengate.cli._outputs import output_problem

__all__ = ["DEMOS", "run_demo", "unavailable"]

#: name -> (module, class); imported only when chosen.
DEMOS = {
    "cpu": ("tokengate.demos.cpu", "CpuProof"),
    "io": ("tokengate.demos.io", "IoProof"),
    "mixed": ("tokengate.demos.mixed", "MixedOrchestrator"),
    "chain": ("tokengate.demos.chain", "ChainProof"),
    "endurance": ("tokengate.demos.endurance", "EnduranceRun"),
}
#: Demos that write files get a temporary directory, removed at the end.
WRITES_FILES = ("io", "mixed")
#: How long an interrupted demo waits for its running tasks before leaving them behind.
STOP_TIMEOUT_S = 10.0
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `... | head`


def _config_fields() -> dict[str, Any]:
    return dict(getattr(tokengate.CoordinatorConfig, "__dataclass_fields__", {}))


def accepts_backend(coordinator_class: Any = None) -> bool:
    """Whether ``OperationsCoordinator`` takes ``backend=`` (the Dask backend is in this build)."""
    cls = OperationsCoordinator if coordinator_class is None else coordinator_class
    return "backend" in inspect.signature(cls).parameters


def unavailable(args: argparse.Namespace) -> str | None:
    """Why an option cannot be honoured (a part this build lacks, an output file that could
    not be written at the end), or None if all can."""
    fields = _config_fields()
    if args.trace is not None and not (
        hasattr(OperationsCoordinator, "export_trace") and "trace" in fields
    ):
        return (
            "--trace is not available in this build: it needs the observability part "
            "(OperationsCoordinator.export_trace)"
        )
    if args.metrics_port is not None and not hasattr(OperationsCoordinator, "serve_metrics"):
        return (
            "--metrics-port is not available in this build: it needs the observability part "
            "(OperationsCoordinator.serve_metrics)"
        )
    if args.dashboard is not None:
        from ..dashboard._server import require

        try:
            require()
        except ImportError as exc:
            return f"--dashboard: {exc}"
    if args.backend != "local" and not accepts_backend():
        return (
            f"--backend {args.backend} is not available in this build: it needs the Dask "
            "backend (OperationsCoordinator(backend='dask'))"
        )
    if args.address is not None and args.backend != "dask":
        return f"--address {args.address} needs --backend dask"
    if args.trace is not None:  # written at the end of the run: check it can be, up front
        return output_problem("--trace", args.trace)
    return None


class StopOnSignal:
    """Ctrl-C / SIGTERM set ``stop``; a second Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, say: Any) -> None:
        self.stop = threading.Event()
        self.say = say
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop.set()
        sys.stderr.write(
            "\nInterrupted: stopping. Tokens not started are discarded, running ones finish "
            "(Ctrl-C again to stop waiting for them).\n"
        )
        sys.stderr.flush()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _workdir(name: str) -> Iterator[str | None]:
    if name not in WRITES_FILES:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix=f"tokengate_demo_{name}_") as path:
        yield path


def _fail(message: str) -> int:
    sys.stderr.write(f"tokengate demo: error: {message}\n")
    return 2


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo ``args.name``; returns the exit status."""
    problem = unavailable(args)
    if problem:
        return _fail(problem)
    if args.verbose:
        # The Quick-Proof's log lines go to stdout from worker threads; if its reader goes away
        # (`| head`), the display notices and stops the demo: no traceback per log line meanwhile.
        logging.raiseExceptions = False
    options: dict[str, Any] = {"verbose": bool(args.verbose)}
    if args.trace is not None:
        options["trace"] = True
    if args.backend != "local":
        options["backend"] = args.backend
    if args.address is not None:
        options["address"] = args.address
    try:
        coordinator = OperationsCoordinator(**options)
    except (TokenGateError, ImportError) as exc:
        return _fail(str(exc))
    observable: Any = coordinator  # serve_metrics / export_trace: checked by unavailable()

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    module_name, class_name = DEMOS[args.name]
    demo_class = getattr(importlib.import_module(module_name), class_name)
    live = sys.stdout.isatty() and not (args.plain or args.verbose)
    display = make_display(coordinator, args.name, live=live, interval=args.interval)

    with _workdir(args.name) as workdir:
        kwargs: dict[str, Any] = {"seed": seed, "say": display.say}
        if args.duration is not None:
            kwargs["duration"] = args.duration
        if workdir is not None:
            kwargs["workdir"] = workdir
        demo = demo_class(**kwargs)
        display.demo = demo
        forced = False
        with StopOnSignal(display.say) as signals:
            display.on_broken = signals.stop.set
            coordinator.start()
            try:
                if args.metrics_port is not None:
                    port = observable.serve_metrics(args.metrics_port)
                    display.say(f"[METRICS] Prometheus metrics at http://127.0.0.1:{port}/metrics")
                if args.dashboard is not None:
                    url = observable.serve_dashboard(args.dashboard)
                    display.say(f"[DASHBOARD] Open {url}")
                display.start()
                backend = getattr(coordinator, "backend", None)
                if backend is not None and backend.name != "local":
                    display.say(f"[BACKEND] {backend.describe()}")
                display.say(
                    f"[DEMO] {args.name} started: {demo.duration:g} s, seed {seed} "
                    "(Ctrl-C stops it cleanly)"
                )
                demo.run(coordinator, signals.stop)
            except KeyboardInterrupt:
                forced = True
            except Exception as exc:
                display.stop()
                coordinator.stop(cancel_pending=True, timeout=STOP_TIMEOUT_S)
                if isinstance(exc, TokenGateError | ImportError | OSError | ValueError):
                    return _fail(f"{type(exc).__name__}: {exc}")
                raise
            finally:
                display.stop()
            interrupted = forced or signals.stop.is_set()
            try:
                coordinator.stop(
                    cancel_pending=interrupted, timeout=STOP_TIMEOUT_S if interrupted else None
                )
            except KeyboardInterrupt:  # a second Ctrl-C while draining
                interrupted = True
                coordinator.stop(cancel_pending=True, timeout=STOP_TIMEOUT_S)
        snap = coordinator.stats("FINAL")
        print()
        print(demo.report(snap))
        if interrupted:
            print(f"\n  Interrupted after {snap.elapsed:.1f}s: {snap.discarded} tokens discarded.")
        print(f"  Seed: {seed} (tokengate demo {args.name} --seed {seed} replays these waves)")
    if args.trace is not None:
        count = observable.export_trace(args.trace)
        print(f"  Trace: {count} task spans written to {args.trace} (open in ui.perfetto.dev)")
    sys.stdout.flush()
    if display.broken:
        return EXIT_BROKEN_PIPE
    if interrupted:
        return EXIT_INTERRUPTED
    problems = snap.failed + getattr(demo, "mismatches", 0) + getattr(demo, "wrong", 0)
    return 1 if problems else 0
