"""The ``tokengate`` command line: subcommands and their options, validated by argparse."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import tokengate

__all__ = ["DEMO_NAMES", "build_parser"]

DEMO_NAMES = ("cpu", "io", "mixed", "chain", "endurance")
DEMO_HELP = {
    "cpu": (
        "Proof 1: the Quick-Proof's CPU functions in batches, every result checked (default 10 s)"
    ),
    "io": "Proof 2: JSON writes, log appends, blob writes by storage tier (default 5 s)",
    "mixed": "Proof 3: waves of 10-20 CPU and I/O tasks every 0.1-1.0 s (default 20 s)",
    "chain": "Proof 3: the five-step chain of dependent tasks, many in flight (default 5 s)",
    "endurance": "the endurance run: normal, surge and idle phases (default 60 s)",
}


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0: any free port), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokengate",
        description="Run ordinary Python functions as managed concurrent tasks.",
        epilog="Ctrl-C stops a demo cleanly: tokens not started are discarded, running ones "
        "finish, and the closing report still prints (exit status 130).",
    )
    parser.add_argument("--version", action="version", version=f"tokengate {tokengate.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,demo,bench}")
    sub.add_parser(
        "info",
        help="topology, worker counts, affinity policy, core-worker mapping, storage tiers, GIL",
        description="Print the Quick-Proof's initialisation banner for this machine.",
    )

    demo = sub.add_parser(
        "demo",
        help="run one of the Quick-Proof's proofs with live stats",
        description="Run one of the Quick-Proof's proofs with live stats, then its closing "
        "report.\n\n" + "\n".join(f"  {name:<10} {text}" for name, text in DEMO_HELP.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("name", choices=DEMO_NAMES, help="which demo")
    demo.add_argument(
        "--duration",
        type=_positive_seconds,
        metavar="SECONDS",
        help="how long to submit work (default: the demo's own, see above)",
    )
    demo.add_argument(
        "--seed", type=int, metavar="N", help="seed of the random waves, for a reproducible run"
    )
    demo.add_argument(
        "--verbose",
        action="store_true",
        help="print the Quick-Proof's log lines (banner, routing, completions); implies --plain",
    )
    demo.add_argument(
        "--plain",
        action="store_true",
        help="periodic plain stats lines instead of the live display (the default when piped)",
    )
    demo.add_argument(
        "--interval",
        type=_positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="seconds between plain stats lines (default 2)",
    )
    demo.add_argument(
        "--trace", type=Path, metavar="FILE", help="write a Chrome/Perfetto trace of the tasks"
    )
    demo.add_argument(
        "--metrics-port",
        type=_port,
        metavar="N",
        help="serve Prometheus metrics on this port while the demo runs (0: any free port)",
    )
    demo.add_argument(
        "--dashboard",
        type=_port,
        nargs="?",
        const=0,
        metavar="PORT",
        help="serve the web dashboard on loopback while the demo runs and print its URL "
        "(PORT: default any free port); needs the dashboard extra",
    )
    demo.add_argument(
        "--backend",
        choices=("local", "dask"),
        default="local",
        help="where tasks run: the embedded coordinator (default) or a Dask cluster",
    )
    demo.add_argument(
        "--address",
        metavar="ADDR",
        help="with --backend dask: a running Dask scheduler (tcp://host:8786); without it a "
        "LocalCluster sized to this machine is started and closed with the demo",
    )

    sub.add_parser(
        "bench",
        help="benchmarks side by side with the peers (see: tokengate bench --help)",
        add_help=False,
    )
    return parser
