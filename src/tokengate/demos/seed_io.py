"""The Quick-Proof's Proof 2 I/O functions, as written (the import changed, type hints added).

One copy, because the I/O demos, benchmark B5 and the tests all mean *the Quick-Proof's* functions:
``write_json_fast`` (FAST tier), ``append_log_slow`` (SLOW), ``write_blob_moderate``
(MODERATE), ``generate_medium_json`` (the ~50 KB record) and ``create_json_file``. Their
operation types and tags are the Quick-Proof's; B5 and the demos' reports count them by those names,
so they stay as they are. ``create_json_file`` takes the one change docs/guide/quick-proof.md
explains: a decorated call returns a Token, so it reads ``generate_medium_json(index).get()``;
it also takes the directory to write under instead of the current one.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from tokengate import task_token_guard

__all__ = [
    "append_log_slow",
    "create_json_file",
    "generate_medium_json",
    "write_blob_moderate",
    "write_json_fast",
]


@task_token_guard(
    operation_type="write_json_fast", tags={"weight": "light", "storage_speed": "FAST"}
)
def write_json_fast(path: str, payload: dict[str, Any]) -> dict[str, Any]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    return {
        "path": path,
        "bytes": os.path.getsize(path),
        "keys": len(payload),
    }


@task_token_guard(
    operation_type="append_log_slow", tags={"weight": "heavy", "storage_speed": "SLOW"}
)
def append_log_slow(path: str, message: str) -> dict[str, Any]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(message + "\n")
    return {
        "path": path,
        "chars": len(message),
    }


@task_token_guard(
    operation_type="write_blob_moderate", tags={"weight": "medium", "storage_speed": "MODERATE"}
)
def write_blob_moderate(path: str, size_kb: int) -> dict[str, Any]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    blob = b"x" * (size_kb * 1024)
    with open(path, "wb") as f:
        f.write(blob)
    return {
        "path": path,
        "bytes": len(blob),
    }


@task_token_guard(
    operation_type="json_fast",
    tags={
        "weight": "medium",  # Core routing
        "storage_speed": "FAST",  # Storage throttling
    },
)
def generate_medium_json(index: int) -> dict[str, Any]:
    """Generate medium-sized JSON (~50KB)."""
    return {
        "id": index,
        "timestamp": time.time(),
        "records": [
            {
                "id": i,
                "value": random.random(),
                "label": f"record_{i}",
                "tags": [f"tag_{j}" for j in range(5)],
                "nested": {
                    "x": random.randint(0, 100),
                    "y": random.randint(0, 100),
                    "data": [random.random() for _ in range(10)],
                },
            }
            for i in range(100)
        ],
        "metadata": {
            "version": "1.0",
            "type": "medium",
            "generator": "json_medium",
            "stats": {"total_records": 100, "created_at": time.time()},
        },
    }


def create_json_file(index: int, base: Path) -> dict[str, Any]:
    """The Quick-Proof's ``create_json_file``; the one change is the ``.get()``."""
    _dir = base / "jsons"
    _dir.mkdir(exist_ok=True)

    # Generate data
    data = generate_medium_json(index).get()  # the Quick-Proof: data = generate_medium_json(index)

    # Write file - throttling happens automatically!
    timestamp = int(time.time() * 1000)
    filename = _dir / f"json_fast_{timestamp}_{index:04d}.json"

    start = time.time()
    with open(filename, "w") as f:
        json.dump(data, f, indent=2)

    duration = time.time() - start
    file_size = filename.stat().st_size

    if index % 100 == 0:
        print(f"[JSON-{index:04d}] Created {file_size:,} bytes in {duration:.3f}s")

    return {
        "index": index,
        "filename": str(filename),
        "size_bytes": file_size,
        "write_time": duration,
    }
