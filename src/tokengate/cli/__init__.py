"""The ``tokengate`` command: ``info``, ``demo NAME``, ``bench``.

``main(argv)`` is the entry point of the console script and of ``python -m tokengate``; it
returns the exit status (0 ok, 1 a demo's tasks failed, 2 bad options, 130 interrupted).
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `tokengate info | head -3`: the reader has gone, so be quiet
        from tokengate.cli._display import silence_stdout

        silence_stdout()
        return 141


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:  # the harness owns its options (argparse REMAINDER drops "-x")
        from tokengate.bench import main as bench_main

        return bench_main(argv[1:])
    from tokengate.cli._args import build_parser

    args = build_parser().parse_args(argv)
    if args.command == "info":
        from tokengate.cli._info import info_text

        print(info_text())
        return 0
    from tokengate.cli._demo import run_demo

    return run_demo(args)
