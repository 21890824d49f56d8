"""The 200-file pipeline of ``pipeline.py``, driven from an asyncio ``main``.

The tasks are the same (imported from ``pipeline.py``); only the driver changes. From asyncio
code, submit with ``await task.submit_async(...)``: when the coordinator is saturated it awaits
room instead of blocking the event loop, and it returns the Token once admitted. Tokens are
awaitable, and passing one as an argument chains the steps exactly as in the plain version.
``async with OperationsCoordinator()`` starts and drains the coordinator on a thread, so the
event loop keeps running meanwhile.

Run it with ``python examples/pipeline_async.py``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path

from pipeline import crunch, make_inputs, parse, read, write
from tokengate import OperationsCoordinator


async def run_pipeline(paths: list[Path], out_dir: Path) -> tuple[list[Path], Counter[str]]:
    """Submit one chain per file without blocking the event loop, then await every write."""
    crunched, written = [], []
    for path in paths:
        text = await read.submit_async(path)
        numbers = await parse.submit_async(text)
        summary = await crunch.submit_async(numbers)
        crunched.append(summary)
        written.append(await write.submit_async(summary, out_dir / f"{path.stem}.summary"))
    outputs = list(await asyncio.gather(*written))
    lanes = Counter(f"{token.operation_type} on {token.lane}" for token in crunched + written)
    return outputs, lanes


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        in_dir, out_dir = Path(tmp, "in"), Path(tmp, "out")
        in_dir.mkdir()
        out_dir.mkdir()
        paths = make_inputs(in_dir)
        started = time.perf_counter()
        async with OperationsCoordinator() as coordinator:
            outputs, lanes = await run_pipeline(paths, out_dir)
        elapsed = time.perf_counter() - started
        stats = coordinator.stats()
        print(
            f"async pipeline: {len(outputs)} files read, parsed, crunched and written "
            f"in {elapsed:.2f}s"
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
    asyncio.run(main())
