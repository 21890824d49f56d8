"""A 200-file pipeline: read -> parse -> crunch in worker processes -> write, chained.

Each file goes through four tasks, submitted at once as one chain per file::

    write(crunch(parse(read(path))), out_dir)

``read`` and ``write`` are I/O on the FAST storage tier (at most 50 at once, on the I/O lane's
threads), ``parse`` is light work on the thread lane, and ``crunch`` is CPU-bound, tagged
``heavy``, so it runs in the process lane's worker processes, in parallel despite the GIL. A
step starts as soon as the token it was given has resolved and holds no worker while it waits.
The program makes its own 200 input files in a temporary directory and prints a short summary.

``pipeline_async.py`` is the same pipeline driven from an asyncio ``main``.

Run it with ``python examples/pipeline.py``.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tokengate import OperationsCoordinator, Token, task_token_guard

FILES = 200
NUMBERS_PER_FILE = 500


@task_token_guard(operation_type="read", tags={"storage_speed": "FAST"})
def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@task_token_guard(operation_type="parse")
def parse(text: str) -> list[int]:
    return [int(field) for line in text.splitlines() for field in line.split(",") if field]


@task_token_guard(operation_type="crunch", tags={"weight": "heavy"})
def crunch(numbers: list[int]) -> dict[str, Any]:
    """CPU work: a few rounds of hashing over the numbers, and their statistics."""
    digest = b""
    for _ in range(20):
        digest = hashlib.sha256(digest + repr(numbers).encode()).digest()
    return {
        "count": len(numbers),
        "total": sum(numbers),
        "largest": max(numbers),
        "digest": digest.hex()[:16],
    }


@task_token_guard(operation_type="write", tags={"storage_speed": "FAST"})
def write(summary: dict[str, Any], path: Path) -> Path:
    line = ",".join(f"{key}={value}" for key, value in summary.items())
    path.write_text(line + "\n", encoding="utf-8")
    return path


def make_inputs(directory: Path) -> list[Path]:
    """Write the pipeline's input: FILES files of comma-separated numbers."""
    paths = []
    for i in range(FILES):
        path = directory / f"input_{i:03d}.csv"
        numbers = [(i * 7919 + j * 104729) % 100_003 for j in range(NUMBERS_PER_FILE)]
        rows = [",".join(map(str, numbers[k : k + 10])) for k in range(0, len(numbers), 10)]
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def run_pipeline(paths: list[Path], out_dir: Path) -> tuple[list[Path], Counter[str]]:
    """Submit one chain per file, then wait for every written file."""
    crunched: list[Token[dict[str, Any]]] = []
    written: list[Token[Path]] = []
    for path in paths:
        summary = crunch(parse(read(path)))
        crunched.append(summary)
        written.append(write(summary, out_dir / f"{path.stem}.summary"))
    outputs = [token.get(timeout=120) for token in written]
    lanes = Counter(f"{token.operation_type} on {token.lane}" for token in crunched + written)
    return outputs, lanes


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        in_dir, out_dir = Path(tmp, "in"), Path(tmp, "out")
        in_dir.mkdir()
        out_dir.mkdir()
        paths = make_inputs(in_dir)
        started = time.perf_counter()
        with OperationsCoordinator() as coordinator:
            outputs, lanes = run_pipeline(paths, out_dir)
        elapsed = time.perf_counter() - started
        stats = coordinator.stats()
        print(
            f"pipeline: {len(outputs)} files read, parsed, crunched and written in {elapsed:.2f}s"
        )
        print(
            "where the steps ran: " + ", ".join(f"{n} {lane}" for lane, n in sorted(lanes.items()))
        )
        print(
            f"tokens: {stats.submitted} submitted, {stats.resolved} resolved, "
            f"{stats.failed} failed, {stats.discarded} discarded"
        )
        print(f"outputs on disk: {sum(1 for _ in out_dir.iterdir())}")


if __name__ == "__main__":
    main()
