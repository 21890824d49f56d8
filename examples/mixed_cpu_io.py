"""CPU and I/O in one program: heavy work in worker processes, writes on a storage tier.

``render`` is CPU-bound pure Python, so it is tagged ``heavy`` and runs in the process lane
(one warm worker process per core, in parallel despite the GIL). ``save`` writes a file, so it is
tagged with a storage tier: at most that tier's limit of writes run at once, on the I/O lane's
threads, and a write waiting for its tier holds no worker. Each ``save`` gets the ``render``
token as its argument, so it starts as soon as its own page is rendered.

Run it with ``python examples/mixed_cpu_io.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tokengate import OperationsCoordinator, task_token_guard


@task_token_guard(operation_type="render", tags={"weight": "heavy"})
def render(page: int) -> str:
    """CPU work: a table of squares, checksummed."""
    rows = [f"{page:03d}:{i}:{(i * i + page) % 9973}" for i in range(20_000)]
    checksum = sum(len(row) for row in rows)
    return "\n".join(rows[:3]) + f"\n... {len(rows)} rows, checksum {checksum}\n"


@task_token_guard(operation_type="save", tags={"storage_speed": "FAST"})
def save(text: str, path: Path) -> int:
    """I/O: write one page (FAST tier: at most 50 writes at once)."""
    path.write_text(text, encoding="utf-8")
    return len(text)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, OperationsCoordinator() as coordinator:
        rendered = [render(page) for page in range(24)]
        saved = [save(text, Path(tmp) / f"page{i:02d}.txt") for i, text in enumerate(rendered)]
        written = sum(token.get(timeout=60) for token in saved)
        lanes = sorted({str(token.lane) for token in rendered + saved})
        tiers = coordinator.tier_stats()
        stats = coordinator.stats()
        print(f"rendered {len(rendered)} pages and wrote {written} bytes")
        print(f"lanes used: {', '.join(lanes)}")
        print(f"most FAST writes at once: {tiers['FAST'].high_water} (limit {tiers['FAST'].limit})")
        print(f"resolved {stats.resolved} of {stats.submitted}, failed {stats.failed}")


if __name__ == "__main__":
    main()
