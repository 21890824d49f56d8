"""What becomes of running coordinators when the interpreter exits or the process forks.

Interpreter exit is tested in a child interpreter (``sys.executable``) whose tasks cannot end
before the test has seen the drain begin: they wait for a file the test creates once the child
logged its WARNING. Fork is tested with ``os.fork`` (the child reports through a pipe and leaves
with ``os._exit``; every read of the parent has a deadline) and a ``multiprocessing`` pool with
the ``fork`` start method.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from conftest import run_code
from tokengate import CoordinatorNotRunning, OperationsCoordinator, task_token_guard

# Python 3.12+ warns when a process with threads forks (ours has the coordinator's workers):
# that is the very situation these tests put the library in.
FORK_WARNING = (
    r"ignore:This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to "
    r"deadlocks in the child:DeprecationWarning"
)
LIMIT = 30.0  # seconds: only a broken build ever waits this long


@task_token_guard(operation_type="lifecycle_square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


# -- interpreter exit --------------------------------------------------------------------------
# A thread task and a process task that each leave a marker file (holding the pid that ran it)
# once the test has created ``release``: they end during the drain at exit, never before.
EXIT_SCRIPT = """
import gc, logging, os, sys, time
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
from tokengate import OperationsCoordinator, task_token_guard

def finish(folder, name):
    sys.stderr.write(f"started {name}\\n")
    sys.stderr.flush()
    while not os.path.exists(os.path.join(folder, "release")):
        time.sleep(0.005)
    with open(os.path.join(folder, name), "w") as marker:
        marker.write(str(os.getpid()))

@task_token_guard(operation_type="exit_thread_task", tags={"weight": "light"})
def thread_task(folder):
    finish(folder, "thread.done")

@task_token_guard(operation_type="exit_process_task",
                  tags={"weight": "heavy", "executor": "process"})
def process_task(folder):
    finish(folder, "process.done")

folder, mode = sys.argv[1], sys.argv[2]
options = {"cores": 1, "workers_per_core": 1, "convergence": False}
if mode == "hang":  # one thread worker: the first token runs (and never ends), the rest queue
    coordinator = OperationsCoordinator(process_lane=False, **options).start()
    for _ in range(4):
        thread_task(folder)
elif mode == "default":  # tokengate.use_default(): draining at exit is what it is for
    import tokengate
    logging.getLogger("tokengate.coordinator").setLevel(logging.DEBUG)
    tokengate.use_default(**options)
    thread_task(folder)
    process_task(folder)
else:
    coordinator = OperationsCoordinator(**options).start()
    thread_task(folder)
    process_task(folder)
if mode == "drop":  # the last reference goes, and the garbage is collected
    del coordinator
    gc.collect()
# The script ends here, with no stop().
"""


class Child:
    """A child interpreter running ``EXIT_SCRIPT``, its stderr read line by line meanwhile."""

    def __init__(self, folder: Path, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", EXIT_SCRIPT, str(folder), mode],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, fragment: str) -> str:
        """The first line holding ``fragment``, read as the child writes it."""
        deadline = time.monotonic() + LIMIT
        while True:
            found = next((line for line in self.lines if fragment in line), None)
            if found is not None:
                return found
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {fragment!r} in {LIMIT}s: {self.stderr}") from None
            if line is None:
                raise AssertionError(f"the child ended without {fragment!r}: {self.stderr}")
            self.lines.append(line)

    def wait(self) -> int:
        code = self.proc.wait(LIMIT)
        while (line := self._queue.get(timeout=LIMIT)) is not None:
            self.lines.append(line)
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("mode", ["keep", "drop"])
def test_interpreter_exit_drains_running_work_and_warns(tmp_path: Path, mode: str) -> None:
    # keep: the script still holds the coordinator when it ends; drop: it dropped its last
    # reference and collected garbage first. Either way nothing is lost.
    child = Child(tmp_path, mode)
    try:
        warning = child.wait_for("pending tokens")
        (tmp_path / "release").touch()  # only now can the tasks end
        code = child.wait()
    finally:
        child.kill()
    assert code == 0, child.stderr
    assert warning.startswith("WARNING tokengate.coordinator: "), child.stderr
    assert "2 pending tokens" in warning, warning
    assert "stop(cancel_pending=True)" in warning, warning
    assert int((tmp_path / "thread.done").read_text()) == child.proc.pid
    ran_in = int((tmp_path / "process.done").read_text())
    assert ran_in != child.proc.pid  # a worker process, kept alive until its task ended
    assert "Traceback" not in child.stderr, child.stderr


def test_the_default_coordinator_drains_at_exit_without_a_warning(tmp_path: Path) -> None:
    child = Child(tmp_path, "default")
    try:
        child.wait_for("draining the default coordinator's 2 pending tokens at exit")
        (tmp_path / "release").touch()
        code = child.wait()
    finally:
        child.kill()
    assert code == 0, child.stderr
    assert (tmp_path / "thread.done").exists() and (tmp_path / "process.done").exists()
    assert "WARNING" not in child.stderr, child.stderr


def test_ctrl_c_ends_the_wait_at_exit_and_discards_what_has_not_started(tmp_path: Path) -> None:
    child = Child(tmp_path, "hang")  # no release ever: the running task never ends
    try:
        child.wait_for("started thread.done")  # the first token runs, the other three queue
        assert "4 pending tokens" in child.wait_for("pending tokens")
        child.proc.send_signal(signal.SIGINT)
        code = child.wait()
    finally:
        child.kill()
    assert code == 0, child.stderr
    line = child.wait_for("Ctrl-C while waiting at interpreter exit")
    assert line.startswith("WARNING tokengate.coordinator: "), child.stderr
    assert "3 tokens that had not started were discarded" in line, line
    assert not (tmp_path / "thread.done").exists()


# A non-daemon thread still running after the exit drain (the interpreter joins such threads
# after it): main_thread().join() returns once the main thread has finished, drain included.
LATE_START_SCRIPT = """
import threading
import tokengate
from tokengate import CoordinatorNotRunning, OperationsCoordinator, task_token_guard

@task_token_guard(operation_type="late_square", tags={"weight": "light"})
def square(x):
    return x * x

def late():
    threading.main_thread().join()
    for what, attempt in (
        ("start", lambda: OperationsCoordinator(process_lane=False).start()),
        ("default", lambda: square(3)),
    ):
        try:
            attempt()
        except CoordinatorNotRunning as exc:
            print(what, "refused:", exc, flush=True)
        else:
            print(what, "ACCEPTED", flush=True)

tokengate.use_default(cores=1, workers_per_core=1, process_lane=False)
assert square(2).get(timeout=30) == 4
threading.Thread(target=late).start()
"""


def test_nothing_starts_after_the_exit_drain() -> None:
    """Work accepted once running coordinators were drained at exit would be lost unrun: a
    coordinator (the default one included) refuses to start then."""
    lines = run_code(LATE_START_SCRIPT, timeout=LIMIT).splitlines()
    assert [line.split(" ")[:2] for line in lines] == [
        ["start", "refused:"],
        ["default", "refused:"],
    ]
    assert "interpreter is exiting" in lines[0] and "at interpreter exit" in lines[1]


def test_a_stopped_coordinator_is_not_kept_alive() -> None:
    coordinator = OperationsCoordinator(cores=1, workers_per_core=1).start()
    assert square(3).get(timeout=LIMIT) == 9
    coordinator.stop()
    ref = weakref.ref(coordinator)
    del coordinator
    gc.collect()
    assert ref() is None


# -- fork ----------------------------------------------------------------------------------------
def report_from_child(inherited: OperationsCoordinator) -> dict[str, Any]:
    """What a forked child sees: a decorated call and a call on the inherited coordinator
    (both must fail at once), its stop() (must return at once), and a fresh coordinator."""
    report: dict[str, Any] = {}
    for what, call in (
        ("call", lambda: square(3)),
        ("submit", lambda: inherited.submit(square, 3)),
    ):
        try:
            call()
        except CoordinatorNotRunning as exc:
            report[what] = str(exc)
        else:
            report[what] = "returned a Token"
    inherited.stop()
    with OperationsCoordinator(cores=1, workers_per_core=1, process_lane=False):
        report["fresh"] = square(4).get(timeout=LIMIT)
    return report


def in_forked_child(inherited: OperationsCoordinator) -> tuple[int, int]:
    """Fork; the child writes its report to a pipe and leaves with ``os._exit``. Returns the
    child's pid and the pipe's read end."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the test run
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(report_from_child(inherited)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


@task_token_guard(operation_type="lifecycle_fork_in_task", tags={"weight": "light"})
def fork_in_task(inherited: OperationsCoordinator) -> tuple[int, int]:
    return in_forked_child(inherited)


def read_report(pid: int, read_end: int) -> dict[str, Any]:
    """The child's report, read with a deadline; the child is killed if it hangs."""
    deadline = time.monotonic() + LIMIT
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the forked child reported nothing in {LIMIT}s (hung)")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, b"".join(chunks)
    report: dict[str, Any] = json.loads(b"".join(chunks))
    return report


def assert_refused_for_fork(message: str) -> None:
    assert "forked from process" in message, message
    assert "Start a new coordinator in this process" in message, message
    assert "'spawn' or 'forkserver'" in message, message


@pytest.mark.filterwarnings(FORK_WARNING)
@pytest.mark.parametrize("where", ["main thread", "inside a task"])
def test_a_forked_child_refuses_calls_at_once_and_runs_its_own_coordinator(
    make_coordinator: Any, where: str
) -> None:
    coordinator = make_coordinator(cores=1, workers_per_core=1)
    assert square(2).get(timeout=LIMIT) == 4
    if where == "main thread":
        pid, read_end = in_forked_child(coordinator)
    else:  # the child's only thread was a worker of the inherited coordinator
        pid, read_end = fork_in_task(coordinator).get(timeout=LIMIT)
    report = read_report(pid, read_end)
    assert_refused_for_fork(report["call"])
    assert "'lifecycle_square' was called" in report["call"]
    assert f"forked from process {os.getpid()}" in report["call"]
    assert_refused_for_fork(report["submit"])
    assert report["fresh"] == 16
    assert square(5).get(timeout=LIMIT) == 25  # the parent's coordinator is untouched


def report_from_pool_worker() -> dict[str, Any]:
    report: dict[str, Any] = {}
    try:
        square(3)
    except CoordinatorNotRunning as exc:
        report["call"] = str(exc)
    else:
        report["call"] = "returned a Token"
    with OperationsCoordinator(cores=1, workers_per_core=1, process_lane=False):
        report["fresh"] = square(4).get(timeout=LIMIT)
    return report


@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_fork_pool_worker_refuses_calls_at_once_and_runs_its_own_coordinator(
    make_coordinator: Any,
) -> None:
    make_coordinator(cores=1, workers_per_core=1)
    assert square(2).get(timeout=LIMIT) == 4
    with multiprocessing.get_context("fork").Pool(1) as pool:
        report = pool.apply_async(report_from_pool_worker).get(timeout=LIMIT)
    assert_refused_for_fork(report["call"])
    assert report["fresh"] == 16
    assert square(5).get(timeout=LIMIT) == 25


def pipes_held(pid: int | str) -> set[str]:
    """The pipes (``pipe:[inode]``) process ``pid`` holds a descriptor of."""
    found: set[str] = set()
    folder = f"/proc/{pid}/fd"
    for name in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.filterwarnings(FORK_WARNING)
def test_a_forked_child_holds_no_pipe_to_the_parent_s_worker_processes(
    make_coordinator: Any,
) -> None:
    """A child's copy of a worker's task pipe would keep it open after the parent's stop()
    closes its end: the worker would never see the EOF that ends it, and be killed late."""
    coordinator = make_coordinator(cores=1, workers_per_core=1)
    lane = coordinator.lanes["process"]
    assert lane.wait_ready(LIMIT)
    stdio = {
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in (0, 1, 2)
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    ours = pipes_held("self")
    shared = set().union(*(pipes_held(pid) & ours for pid in lane.pids())) - stdio
    assert shared, "the parent holds its end of each worker process's pipes"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the test run
        code = 1
        try:
            os.close(read_end)
            held = sorted(pipes_held("self") & shared)
            os.write(write_end, json.dumps({"held": held}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    assert read_report(pid, read_end) == {"held": []}


# The default coordinator is process-wide state: this runs in a child interpreter, which forks.
FORK_DEFAULT_SCRIPT = """
import os, signal
import tokengate
from tokengate import CoordinatorNotRunning, OperationsCoordinator, task_token_guard

@task_token_guard(operation_type="lifecycle_square", tags={"weight": "light"})
def square(x):
    return x * x

tokengate.use_default(cores=1, workers_per_core=1, process_lane=False)
assert square(2).get(timeout=30) == 4  # starts the default coordinator
pid = os.fork()
if pid == 0:
    signal.alarm(30)  # a hung child must not outlive the test
    try:
        square(3)
        print("child: returned a Token", flush=True)
    except CoordinatorNotRunning as error:
        print("child:", error, flush=True)
    with OperationsCoordinator(cores=1, workers_per_core=1, process_lane=False):
        print("child fresh:", square(4).get(timeout=30), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("parent:", square(5).get(timeout=30), os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_forked_child_refuses_calls_to_the_inherited_default_coordinator() -> None:
    call, fresh, parent = run_code(FORK_DEFAULT_SCRIPT).splitlines()
    assert call.startswith("child: 'lifecycle_square' was called: "), call
    assert_refused_for_fork(call)
    assert fresh == "child fresh: 16"
    assert parent == "parent: 25 0"
