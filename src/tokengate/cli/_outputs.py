"""Checks on the files a command will write, made before it starts any work.

A run that can only write its results at the end (a demo's trace, the benchmark's JSON and
Markdown) must not find out then that it cannot: these checks turn a missing directory, a path
that is a directory, or one that cannot be written into a clear message and exit status 2
before anything runs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["output_problem"]


def output_problem(option: str, path: Path, *, make_parents: bool = False) -> str | None:
    """Why ``path`` (given as ``option``) cannot be written, or None if it can.

    ``make_parents``: the command creates missing directories itself, so only the nearest
    directory that exists has to be writable.
    """
    if path.is_dir():
        return f"{option} {path}: is a directory; give a file name, e.g. {path / 'out.json'}"
    if path.exists():
        if not os.access(path, os.W_OK):
            return f"{option} {path}: the file exists and cannot be written"
        return None
    parent = path.parent
    if not make_parents and not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        return (
            f"{option} {path}: the directory {parent} {what}; create it first "
            f"(mkdir -p {parent}) or choose another path"
        )
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{option} {path}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {path}: the directory {existing} cannot be written"
    return None
