"""What the process-lane tests share: the skip mark, the lane and its worker processes as
psutil sees them, and the two fault injectors (a reply cut short, a start that fails)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from tokengate import OperationsCoordinator, RetryPolicy
from tokengate.lanes import _wire
from tokengate.lanes.process import _handle, process_lane_supported

Make = Callable[..., OperationsCoordinator]
NO_CRASH_RETRY = RetryPolicy(crash_retries=0, max_retries=0)

#: Every module here runs only where the platform has worker processes.
POSIX_ONLY = pytest.mark.skipif(not process_lane_supported(), reason="worker processes need POSIX")


def lane_of(coordinator: OperationsCoordinator) -> Any:
    """The coordinator's process lane (``coordinator.lanes["process"]``)."""
    return coordinator.lanes["process"]


def own_children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def start_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The WARNING/ERROR records of failed starts (each names its next attempt)."""
    return [
        r
        for r in caplog.records
        if r.name == "tokengate.process" and "next attempt in" in r.getMessage()
    ]


class ReplyFault:
    """Makes the proxy thread raise once, between sending the next call and reading its whole
    reply, at one of three points: ``send`` (half the call written), ``wait`` (the wait for the
    reply) or ``read`` (part of the reply read). ``arm()`` sets it for the next call; arm it
    once the lane is ready, so that a worker's start-up handshake is never hit."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
        self.where = where
        self.armed = False
        fault = self
        real_send = _wire.send

        def send(fd: int, buffers: list[bytes]) -> None:
            if fault.fire("send"):
                data = b"".join(buffers)
                os.write(fd, len(data).to_bytes(8, "big") + data[: len(data) // 2])
                raise RuntimeError("injected: the send stopped half-way")
            real_send(fd, buffers)

        class Child(_handle.ChildProcess):
            def wait(self, timeout: float | None) -> str:
                if fault.fire("wait"):
                    raise OverflowError("injected: timeout is too large")
                event: str = super().wait(timeout)
                if event == "reply" and fault.fire("read"):
                    os.read(self.results, 3)
                    raise RuntimeError("injected: the read stopped part-way")
                return event

        monkeypatch.setattr(_wire, "send", send)
        monkeypatch.setattr(_handle, "ChildProcess", Child)

    def arm(self) -> None:
        self.armed = True

    def fire(self, where: str) -> bool:
        if self.armed and where == self.where:
            self.armed = False
            return True
        return False


class StartGate:
    """Makes the worker slot on one proxy thread fail to launch (``OSError``) while ``failing``;
    ``wait_for(n)`` blocks until it has failed ``n`` times (a condition, not a delay)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, thread: str, error: OSError) -> None:
        self.thread, self.error = thread, error
        self.failing = True
        self.count = 0
        self.cond = threading.Condition()
        gate = self

        class Child(_handle.ChildProcess):
            def __init__(self, cpu: int | None, setup: Any = None) -> None:
                if gate.failing and threading.current_thread().name == gate.thread:
                    with gate.cond:
                        gate.count += 1
                        gate.cond.notify_all()
                    raise gate.error
                super().__init__(cpu, setup)

        monkeypatch.setattr(_handle, "ChildProcess", Child)

    def wait_for(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.count >= n, timeout=30), self.count
