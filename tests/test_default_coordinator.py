"""The default coordinator (``tokengate.use_default()``): started on first use, never preferred
over an explicit coordinator, drained at interpreter exit.

It is process-wide state, so each scenario runs in a fresh interpreter: the script asserts, and
prints what the test checks after it exited.
"""

from __future__ import annotations

import textwrap

import pytest

from conftest import run_code
from tokengate import CoordinatorNotRunning, task_token_guard

PRELUDE = """
import asyncio, atexit, threading
import tokengate
from tokengate import ConfigError, CoordinatorNotRunning, OperationsCoordinator, task_token_guard

THREADS = {"process_lane": False, "workers_per_core": 1}
GATE = threading.Event()

@task_token_guard("double")
def double(x: int) -> int:
    return 2 * x

@task_token_guard("held")
def held(n: int) -> int:
    assert GATE.wait(30)
    print("ran", n, flush=True)
    return n
"""


def run_with_prelude(body: str) -> str:
    """Run PRELUDE + ``body`` in a fresh interpreter; its stdout (it must exit 0)."""
    return run_code(PRELUDE + textwrap.dedent(body))


@task_token_guard("nobody_runs_me")
def nobody_runs_me() -> None:  # pragma: no cover - there is no coordinator
    pass


def test_a_call_with_no_coordinator_names_the_one_line_opt_in() -> None:
    with pytest.raises(CoordinatorNotRunning, match=r"tokengate\.use_default\(\)"):
        nobody_runs_me()


def test_the_default_starts_on_first_use_and_explicit_coordinators_win() -> None:
    out = run_with_prelude("""
        try:
            double(1)
        except CoordinatorNotRunning:
            pass
        else:
            raise AssertionError("a call before use_default() must raise")
        tokengate.use_default(**THREADS)
        tokengate.use_default(**THREADS)  # the same options again (a cell run twice): no-op
        assert double(2).get(timeout=10) == 4  # started by this call
        default = tokengate.default_coordinator()
        assert default.running and default.stats().submitted == 1

        # An explicit coordinator started after the default takes the calls while it runs.
        with OperationsCoordinator(**THREADS) as explicit:
            assert double(3).get(timeout=10) == 6
            assert list(double.map([1, 2])) == [2, 4]
        assert (explicit.stats().submitted, default.stats().submitted) == (3, 1)
        assert double(4).get(timeout=10) == 8  # back to the default
        assert default.stats().submitted == 2

        # ... and so does one started before the default (re)starts.
        default.stop()
        before = default.stats().submitted
        explicit = OperationsCoordinator(**THREADS).start()
        assert tokengate.default_coordinator() is default and default.running
        assert double(5).get(timeout=10) == 10
        assert (explicit.stats().submitted, default.stats().submitted) == (1, before)
        explicit.stop()

        async def from_asyncio() -> int:
            token = await double.submit_async(6)
            return await token

        assert asyncio.run(from_asyncio()) == 12
        assert list(double.map([7])) == [14]
        assert default.stats().submitted == before + 2

        try:
            tokengate.use_default(workers_per_core=2)
        except ConfigError as error:
            assert "already running" in str(error) and "stop it first" in str(error), error
        else:
            raise AssertionError("other options while the default runs must raise")
        print("ok")
    """)
    assert out.splitlines() == ["ok"]


def test_use_default_checks_its_options_at_once() -> None:
    out = run_with_prelude("""
        try:
            tokengate.use_default(workers_per_cor=2)
        except tokengate.TokenGateError as error:
            print(type(error).__name__, "workers_per_cor" in str(error))
        try:
            double(1)
        except CoordinatorNotRunning:
            print("still not opted in")
    """)
    assert out.splitlines() == ["TokenGateError True", "still not opted in"]


def test_the_default_drains_at_interpreter_exit() -> None:
    out = run_with_prelude("""
        def after_the_drain() -> None:  # registered first, so it runs after the drain
            stats = default.stats()
            print("exit", default.running, stats.submitted, stats.resolved, flush=True)
            try:
                double(1)
            except CoordinatorNotRunning as error:
                print("refused:", "interpreter exit" in str(error), flush=True)

        atexit.register(after_the_drain)
        tokengate.use_default(**THREADS)
        tokens = [held(i) for i in range(5)]
        default = tokengate.default_coordinator()
        assert not any(token.done() for token in tokens)
        GATE.set()  # the script ends with the tokens still in flight
    """)
    lines = out.splitlines()
    assert sorted(lines[:5]) == [f"ran {i}" for i in range(5)]
    assert lines[5:] == ["exit False 5 5", "refused: True"]
