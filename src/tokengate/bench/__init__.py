"""``tokengate bench``: tokengate side by side with its peers, one fresh process per case.

``main(argv)`` is the command; ``python -m tokengate.bench`` runs it. Scenarios live one per
module (``_b1_overhead.py`` …) and are registered in ``_scenarios.py``; ``_case.py`` runs one
case in a fresh interpreter, ``_runner.py`` repeats cases and collects them, ``_report.py`` does
the arithmetic (medians, ranges, ratios) and the tables.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run ``tokengate bench`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    # Imported here so that a case process (``tokengate.bench._case``) does not load the runner.
    from tokengate.bench._runner import main as run

    return run(argv)
