"""Which tokens the process lane takes, and whether this platform has one."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from ..._errors import ConfigError

if TYPE_CHECKING:
    from ..._spec import TaskSpec

__all__ = ["check_process_lane_option", "process_lane_supported", "runs_in_process"]


def runs_in_process(spec: TaskSpec, *, gil: bool) -> bool:
    """Whether tokens of ``spec`` belong in the process lane (the rule in docs/guide/executors.md).

    ``executor='process'`` always; ``'thread'`` never; ``'auto'`` when the work is CPU-heavy
    (``weight='heavy'``), not storage-bound (no ``storage_speed``: I/O releases the GIL, so
    threads serve it without pickling) and the GIL is on (on a free-threaded build threads
    already run in parallel, with no pickling and shared memory).
    """
    if spec.executor == "process":
        return True
    if spec.executor == "thread" or spec.is_async:
        return False
    return gil and spec.weight == "heavy" and spec.storage_speed is None


def process_lane_supported() -> bool:
    """Worker processes need POSIX pipes passed to a child (``pass_fds``)."""
    return os.name == "posix"


def check_process_lane_option(value: bool | None) -> bool:
    """Resolve ``CoordinatorConfig.process_lane``: None means "where supported"."""
    if value is None:
        return process_lane_supported()
    if value and not process_lane_supported():
        raise ConfigError(
            f"process_lane=True, but worker processes are not supported on {sys.platform}; "
            f"use process_lane=None (automatic) or False"
        )
    return value
