"""``python -m tokengate.demos.<name> [seconds]``: one demo on its own, without the CLI.

Every demo's ``main`` takes the same steps: the duration from the command line (else the demo's
own default), a coordinator for the run, the closing report on stdout, and exit status 1 when a
task failed. They are written once here, so a demo's ``main`` says only what is its own: which
demo, and what else counts as a failure (a chain result or a CPU result that differs from the
direct call). The CLI (``tokengate demo NAME``) runs the same classes with a live display.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar

from tokengate import OperationsCoordinator, StatsSnapshot

__all__ = ["Demo", "run_standalone"]


class Demo(Protocol):
    """What every demo class offers: a run on a started coordinator, and a closing report."""

    def run(
        self, coordinator: OperationsCoordinator, stop: threading.Event | None = None
    ) -> None: ...

    def report(self, snap: StatsSnapshot) -> str: ...


D = TypeVar("D", bound=Demo)


def run_standalone(
    make: Callable[..., D],
    argv: list[str] | None = None,
    *,
    wrong: Callable[[D], object] = lambda demo: False,
) -> int:
    """Run ``make(duration=argv[0])`` (or ``make()``) to the end and print its report.

    Returns 1 if a task failed or ``wrong(demo)`` is true, else 0: the process's exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    demo = make(duration=float(argv[0])) if argv else make()
    with OperationsCoordinator() as coordinator:
        demo.run(coordinator)
    print(demo.report(coordinator.stats("FINAL")))
    return 1 if coordinator.stats().failed or wrong(demo) else 0
