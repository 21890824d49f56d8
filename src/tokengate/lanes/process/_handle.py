"""One running worker process as the parent holds it: how it is launched, its pipes, its pidfd,
and how its end is described.

The worker is a fresh interpreter (``python -c BOOTSTRAP`` through ``subprocess``: fork+exec in
C, safe from a threaded parent, never the ``fork`` start method). ``BOOTSTRAP``,
``ChildProcess``, ``USE_PDEATHSIG`` and ``USE_LIFELINE`` are read at each launch, so tests may
replace them to inject a failing start or take the portable lifeline path on Linux.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from ..._errors import ConfigError
from .. import _segments, _wire

__all__ = [
    "BOOTSTRAP",
    "USE_LIFELINE",
    "USE_PDEATHSIG",
    "ChildProcess",
    "WorkerSetup",
    "describe_exit",
]

_ENV = "TOKENGATE_PROCESS_WORKER"
# How a worker notices its parent's death: the kernel's PR_SET_PDEATHSIG where there is one,
# else a lifeline pipe.
USE_PDEATHSIG = sys.platform == "linux"
USE_LIFELINE = not USE_PDEATHSIG

# The worker's first lines: take the parent's sys.path, then import the worker loop. Failing
# to import tokengate is reported through the result pipe so the parent can say why.
BOOTSTRAP = """\
import os, sys, json
boot = json.loads(os.environ.pop("TOKENGATE_PROCESS_WORKER"))
sys.path[:] = boot["path"]
try:
    from tokengate.lanes.process._child import main
except BaseException:
    import struct, traceback
    message = b"B" + traceback.format_exc().encode()
    os.write(boot["results"], struct.pack("!Q", len(message)) + message)
    raise SystemExit(1)
main(boot)
"""


# -- what every worker process is started with ---------------------------------------------------
#: The variables that size native thread pools (the ones joblib and loky set).
NATIVE_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


@dataclass(frozen=True)
class WorkerSetup:
    """How every worker process of a lane starts: the size of its native thread pools (``None``:
    1 where the environment does not say) and its initializer, pickled with its arguments."""

    native_threads: int | None = None
    initializer: bytes | None = None

    @classmethod
    def from_config(cls, config: Any) -> WorkerSetup:
        init: bytes | None = None
        if config.process_initializer is not None:
            try:
                init = _wire.dumps((config.process_initializer, config.process_initargs))
            except Exception as exc:
                raise ConfigError(
                    f"process_initializer {config.process_initializer!r} and its "
                    f"process_initargs cannot be sent to a worker process "
                    f"({type(exc).__name__}: {exc}); use a module-level function and picklable "
                    f"arguments"
                ) from exc
        return cls(config.process_native_threads, init)

    def apply(self, env: dict[str, str]) -> None:
        """Size the native thread pools in a worker's environment ``env``."""
        n = self.native_threads
        for var in NATIVE_THREAD_VARS:
            if n is not None:
                env[var] = str(n)
            else:
                env.setdefault(var, "1")


_DEFAULT_SETUP = WorkerSetup()


# -- how a worker died -----------------------------------------------------------------------------
_SIGNAL_CAUSES = {
    "SIGKILL": (
        "a SIGKILL is often the OS reclaiming memory (the out-of-memory killer: check `dmesg` "
        "or the container's memory limit), or someone killed the process"
    ),
    "SIGSEGV": "a segmentation fault: a crash in C code (an extension module, ctypes)",
    "SIGBUS": "a bus error: a crash in C code, or a memory-mapped file that shrank",
    "SIGABRT": "abort(): a fatal error in C code (a failed assertion, or out of memory in C)",
    "SIGTERM": "another process asked it to terminate (a supervisor, or `kill`)",
    "SIGFPE": "an arithmetic fault in C code",
    "SIGILL": "an illegal instruction: C code built for another CPU",
}


def describe_exit(code: int) -> tuple[str, str]:
    """How a worker process ended (``died with SIGKILL (signal 9)``) and its likely cause."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return (
            f"died with {name} (signal {-code})",
            _SIGNAL_CAUSES.get(name, "a fatal signal"),
        )
    if code == 70:
        return "exited with code 70", "it lost its parent (the lifeline closed)"
    return (
        f"exited with code {code}",
        "the task called os._exit() or sys.exit() outside Python's control, or the interpreter "
        "hit an unrecoverable error",
    )


# -- the handle ------------------------------------------------------------------------------------
def _open_pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:  # an old kernel or a sandbox: the result pipe's EOF still says it died
        return None
    return fd


def _executable() -> str:
    """The interpreter for worker processes (honours ``multiprocessing.set_executable``, which
    can only have been called if ``multiprocessing`` is imported)."""
    spawn = sys.modules.get("multiprocessing.spawn")
    if spawn is None:
        return sys.executable
    return os.fsdecode(spawn.get_executable())


class ChildProcess:
    """A running worker process: its pipes, the socket that passes shared-memory descriptors
    both ways (``channel``), its pidfd and one ``poll`` object over the result pipe and pidfd.
    ``kept``: the keys of the shared objects it maps (it keeps them until told to forget them)."""

    __slots__ = (
        "channel",
        "kept",
        "lifeline",
        "pid",
        "pidfd",
        "poller",
        "proc",
        "reader",
        "results",
        "tasks",
    )

    def __init__(self, cpu: int | None, setup: WorkerSetup | None = None) -> None:
        setup = setup or _DEFAULT_SETUP
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        life_r: int | None = None
        life_w: int | None = None
        if USE_LIFELINE:  # the worker watches a pipe only this process holds the other end of
            life_r, life_w = os.pipe()
        channel, theirs = _segments.open_channel()
        boot = {
            "path": list(sys.path),
            "tasks": task_r,
            "results": result_w,
            "lifeline": life_r,
            "channel": theirs.fileno(),
            "pdeathsig": USE_PDEATHSIG,
            "cpu": cpu,
            "ppid": os.getpid(),
            "init": setup.initializer is not None,
        }
        env = dict(os.environ)
        setup.apply(env)
        env[_ENV] = json.dumps(boot)
        flags: list[str] = getattr(subprocess, "_args_from_interpreter_flags", list)()
        passed = [fd for fd in (task_r, result_w, life_r, theirs.fileno()) if fd is not None]
        try:
            self.proc = subprocess.Popen(
                [_executable(), *flags, "-c", BOOTSTRAP],
                stdin=subprocess.DEVNULL,
                pass_fds=passed,
                env=env,
                process_group=0,  # a terminal's Ctrl-C goes to the parent, which stops us
            )
        except BaseException:
            for fd in (task_r, task_w, result_r, result_w, life_r, life_w):
                if fd is not None:
                    os.close(fd)
            channel.close()
            theirs.close()
            raise
        theirs.close()
        for fd in passed[:-1]:
            os.close(fd)
        self.channel = channel
        if setup.initializer is not None:  # read first by the worker, before it says ready
            try:
                _wire.send(task_w, [setup.initializer])
            except BaseException:
                self.proc.kill()
                self.proc.wait()
                for fd in (task_w, result_r, life_w):
                    if fd is not None:
                        os.close(fd)
                channel.close()
                raise
        self.pid = self.proc.pid
        self.kept: set[int] = set()
        self.tasks = task_w
        self.results = result_r
        self.lifeline = life_w
        self.reader = _wire.Reader(result_r)
        self.pidfd = _open_pidfd(self.pid)
        self.poller = select.poll()
        self.poller.register(result_r, select.POLLIN)
        if self.pidfd is not None:
            self.poller.register(self.pidfd, select.POLLIN)

    def wait(self, timeout: float | None) -> str:
        """Block until a reply (``"reply"``), the process's end (``"exit"``) or ``"timeout"``."""
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        events = self.poller.poll(ms)
        if not events:
            return "timeout"
        for fd, _ in events:
            if fd == self.results:
                return "reply"  # data, or the EOF of a dead worker: recv() tells which
        return "exit"

    def kill(self) -> None:
        pidfd = self.pidfd  # read once: close() may run on the proxy thread meanwhile
        with contextlib.suppress(OSError):
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            else:
                self.proc.kill()

    def close_tasks(self) -> None:
        if self.tasks >= 0:
            with contextlib.suppress(OSError):
                os.close(self.tasks)
            self.tasks = -1

    def reap(self, timeout: float | None = None) -> int:
        """Wait for the process to end (killing it after ``timeout``); its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def close(self) -> None:
        """Close this process's descriptors, once: a number closed twice may by then belong
        to another file (a fork can run ``close`` again in the child, see ``ProcessLane``)."""
        self.close_tasks()
        pidfd, self.pidfd = self.pidfd, None
        results, self.results = self.results, -1
        lifeline, self.lifeline = self.lifeline, None
        self.channel.close()  # descriptors still queued in it are freed with it
        for fd in (results, pidfd, lifeline):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
