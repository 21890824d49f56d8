"""Token interception: hold rules, the quarantine, release and reject, and stop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from conftest import assert_counts_add_up
from tokengate import OperationsCoordinator, TaskSpec, TokenDiscarded, task_token_guard


@task_token_guard(operation_type="q_resize")
def resize(size: int) -> int:
    return size * 2


@task_token_guard(operation_type="q_other")
def other(size: int) -> int:
    return -size


def too_big(spec: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    return f"size {args[0]} over 1000" if args and args[0] > 1000 else None


@pytest.fixture
def guarded(make_coordinator: Callable[..., OperationsCoordinator]) -> OperationsCoordinator:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    c.hold_when(too_big, operation="q_resize")
    return c


def test_a_held_call_waits_until_released(
    guarded: OperationsCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokengate.control")
    small, big = resize(3), resize(5000)
    assert small.get(timeout=10) == 6
    assert guarded.quarantine == {big: "size 5000 over 1000"}
    assert big.state == "pending" and guarded.stats().in_flight == 1
    assert other(5000).get(timeout=10) == -5000  # the rule is for q_resize only
    assert guarded.release(big) is True
    assert big.get(timeout=10) == 10000
    assert guarded.quarantine == {}
    assert guarded.release(big) is False  # not held any more
    assert "held: size 5000 over 1000" in caplog.text and "released by the operator" in caplog.text


def test_a_rejected_token_ends_discarded_with_its_reason(guarded: OperationsCoordinator) -> None:
    big = resize(2000)
    assert guarded.reject(big, "too large for this host") is True
    with pytest.raises(TokenDiscarded):
        big.get(timeout=10)
    assert big.discard_reason == "too large for this host"
    assert guarded.stats().discarded == 1 and guarded.quarantine == {}


def test_stop_discards_what_is_still_held_and_the_counts_add_up(
    make_coordinator: Callable[..., OperationsCoordinator],
) -> None:
    c = make_coordinator(workers_per_core=1, process_lane=False)
    c.hold_when(lambda spec, args, kwargs: True)
    held = [resize(i) for i in range(3)]
    c.stop()  # drains: must not wait for the operator
    assert [t.discard_reason for t in held] == ["stopped while quarantined"] * 3
    assert c.stats().discarded == 3
    assert_counts_add_up(c)


def test_a_true_verdict_names_the_rule(guarded: OperationsCoordinator) -> None:
    def everything(spec: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return True

    guarded.hold_when(everything, operation="q_other")
    token = other(1)
    assert guarded.quarantine[token] == "held by everything"
    guarded.release(token)
    assert token.get(timeout=10) == -1


def test_a_rule_that_raises_refuses_the_call_and_counts_nothing(
    guarded: OperationsCoordinator,
) -> None:
    def broken(spec: TaskSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        raise RuntimeError("rule bug")

    guarded.hold_when(broken, operation="q_other")
    with pytest.raises(RuntimeError, match="rule bug"):
        other(1)
    assert guarded.stats().submitted == 0


@pytest.mark.parametrize(
    ("rule", "operation", "error"),
    [("nope", None, TypeError), (lambda s, a, k: None, "", ValueError)],
)
def test_bad_rules_are_refused(
    guarded: OperationsCoordinator, rule: Any, operation: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        guarded.hold_when(rule, operation=operation)
