"""Bad tags fail at decoration time and bad options at construction, naming value and fix."""

from __future__ import annotations

import dataclasses
import threading
import types

import pytest

import tokengate
from tokengate import (
    ConfigError,
    CoordinatorConfig,
    OperationsCoordinator,
    RetryPolicy,
    TaskSpec,
    TokenGateError,
    task_token_guard,
)
from tokengate._limits import MAX_WAIT_SECONDS


def test_public_surface_matches_all() -> None:
    exported = {
        name
        for name in dir(tokengate)
        if not name.startswith("_") and not isinstance(getattr(tokengate, name), types.ModuleType)
    }
    assert set(tokengate.__all__) - {"__version__"} == exported
    assert {"Tags", "default_coordinator", "progress", "use_default"} <= exported
    for name in tokengate.__all__:
        obj = getattr(tokengate, name)
        if isinstance(obj, type):
            assert obj.__module__ == "tokengate", name


def test_good_tags_are_normalised() -> None:
    spec = TaskSpec.from_tags(
        "io", {"weight": "Heavy", "storage_speed": "fast", "retries": 3, "timeout": 2}
    )
    assert (spec.weight, spec.storage_speed, spec.retries, spec.timeout) == (
        "heavy",
        "FAST",
        3,
        2.0,
    )
    assert TaskSpec.from_tags("x", None).weight == "light"


@pytest.mark.parametrize(
    ("tags", "fragments"),
    [
        ({"wieght": "heavy"}, ["'wieght'", "did you mean 'weight'", "known tags are"]),
        ({"weight": "hevy"}, ["'hevy'", "did you mean 'heavy'", "light, medium, heavy"]),
        ({"weight": 3}, ["3", "allowed values"]),
        ({"storage_speed": "LUDICROUS"}, ["'LUDICROUS'", "SLOW, MODERATE, FAST, INSANE"]),
        ({"executor": "gpu"}, ["'gpu'", "auto, thread, process"]),
        ({"retries": -1}, ["-1", ">= 0"]),
        ({"retries": True}, ["True"]),
        ({"timeout": 0}, ["'timeout'", "0"]),
        ({"deadline": "soon"}, ["'deadline'", "'soon'"]),
        ({"timeout": float("inf")}, ["inf"]),
        ({"retry_on": ValueError()}, ["exception classes", "ValueError()"]),
    ],
)
def test_bad_tags_fail_at_decoration_time(tags: dict[str, object], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:

        @task_token_guard(operation_type="op", tags=tags)
        def op() -> None:  # pragma: no cover - never decorated
            pass

    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("tag", ["timeout", "deadline"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (3e6, "3000000.0"),  # past poll()'s 2**31 - 1 ms: the process lane's wait overflowed
        (1e12, "1000000000000.0"),  # past time_t: it killed the timer thread
        (2**1100, "an int of 1101 bits"),  # raised OverflowError, not ConfigError
        (10**5000, "an int of 16610 bits"),  # too long for str(): no ValueError either
        (float("inf"), "inf"),
        (float("nan"), "nan"),
        (-1, "-1"),
        (-(2**1100), "minus an int of 1101 bits"),
        (0, "0"),
        (True, "True"),
        ("5", "'5'"),
    ],
    ids=["3e6", "1e12", "2**1100", "10**5000", "inf", "nan", "-1", "-2**1100", "0", "True", "str"],
)
def test_timeout_and_deadline_must_be_waits_every_lane_can_honour(
    tag: str, value: object, shown: str
) -> None:
    """Checked at decoration, naming the tag, the value, the maximum and the fix."""
    with pytest.raises(ConfigError) as info:
        task_token_guard(operation_type="op", tags={tag: value})(print)
    message = str(info.value)
    assert f"tag {tag!r} of operation 'op'" in message
    assert shown in message
    assert f"at most {MAX_WAIT_SECONDS:.0f} seconds, or leave the tag out" in message


@pytest.mark.parametrize(
    "option",
    ["async_stall_after", "convergence_interval", "memory_check_interval", "block_cooldown"],
)
@pytest.mark.parametrize("value", [2**1100, 10**5000], ids=["2**1100", "10**5000"])
def test_wait_options_refuse_huge_ints_with_a_config_error(option: str, value: int) -> None:
    """``math.isfinite`` of such an int raised ``OverflowError`` (and ``repr`` of the second
    raises ``ValueError``): the message shows its size instead."""
    with pytest.raises(ConfigError, match=option) as info:
        OperationsCoordinator(**{option: value})  # type: ignore[arg-type]
    assert "an int of" in str(info.value)


def test_the_longest_wait_is_below_every_platform_limit() -> None:
    assert MAX_WAIT_SECONDS * 1000 < 2**31 - 1  # poll() takes milliseconds in a C int
    assert MAX_WAIT_SECONDS < threading.TIMEOUT_MAX
    spec = TaskSpec.from_tags("op", {"timeout": int(MAX_WAIT_SECONDS), "deadline": 0.001})
    assert (spec.timeout, spec.deadline) == (MAX_WAIT_SECONDS, 0.001)
    assert type(spec.timeout) is float


def test_a_spec_made_without_from_tags_is_checked_too() -> None:
    """``TaskSpec`` is public: built directly or through ``dataclasses.replace`` it cannot carry
    a wait no lane can honour either."""
    with pytest.raises(ConfigError, match="'timeout' of operation 'x'"):
        TaskSpec(operation_type="x", timeout=3e6)
    spec = TaskSpec.from_tags("op", {"timeout": 1})
    with pytest.raises(ConfigError, match="'deadline'"):
        dataclasses.replace(spec, deadline=2**1100)
    assert dataclasses.replace(spec, timeout=2).timeout == 2.0


@pytest.mark.parametrize("operation_type", ["", "   ", None, 42])
def test_bad_operation_type(operation_type: object) -> None:
    with pytest.raises(ConfigError, match="operation_type"):
        task_token_guard(operation_type=operation_type, tags={})(lambda: None)  # type: ignore[arg-type]


def test_tags_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="tags must be a dict"):
        task_token_guard("op", tags=["weight", "heavy"])(lambda: None)  # type: ignore[arg-type]


def test_tags_as_keywords_give_the_same_spec_as_the_dict() -> None:
    def body() -> None:
        pass

    by_keywords = task_token_guard(
        "op", weight="heavy", storage_speed="FAST", retries=2, retry_on=(OSError,), timeout=2
    )(body)
    by_dict = task_token_guard(
        "op",
        {"weight": "heavy", "storage_speed": "FAST", "retries": 2, "retry_on": (OSError,)},
    )(body)
    assert by_dict.spec.timeout is None
    assert by_keywords.spec == TaskSpec.from_tags(
        "op",
        {
            "weight": "heavy",
            "storage_speed": "FAST",
            "retries": 2,
            "retry_on": (OSError,),
            "timeout": 2,
        },
    )
    both = task_token_guard("op", {"weight": "heavy"}, weight="heavy", retries=1)(body)
    assert (both.spec.weight, both.spec.retries) == ("heavy", 1)  # same value twice: no conflict


def test_a_tag_given_twice_with_different_values_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        task_token_guard("op", {"weight": "light"}, weight="heavy")
    message = str(info.value)
    for fragment in ("'weight'", "'op'", "tags={'weight': 'light'}", "weight='heavy'", "once"):
        assert fragment in message, message


def test_keyword_tags_are_validated_like_the_dict() -> None:
    with pytest.raises(ConfigError, match=r"unknown tag 'wieght' \(did you mean 'weight'\?\)"):
        task_token_guard("op", wieght="heavy")(lambda: None)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"'haevy'.*did you mean 'heavy'"):
        task_token_guard("op", weight="haevy")(lambda: None)  # type: ignore[arg-type]


def test_typed_tags_name_every_tag() -> None:
    tags = {field.name for field in dataclasses.fields(TaskSpec)} - {"operation_type", "is_async"}
    assert set(tokengate.Tags.__annotations__) == tags
    assert tokengate.Tags.__optional_keys__ == frozenset(tags)  # total=False: each is optional


def test_bare_decorator_and_double_decoration_are_refused() -> None:
    def f() -> None:
        pass

    with pytest.raises(ConfigError, match="needs arguments"):
        task_token_guard(f)  # type: ignore[arg-type]
    once = task_token_guard("f", {})(f)
    with pytest.raises(ConfigError, match="already decorated"):
        task_token_guard("g", {})(once)
    with pytest.raises(ConfigError, match="decorates functions"):
        task_token_guard("h", {})(42)  # type: ignore[arg-type]


def test_decorated_function_keeps_identity() -> None:
    def add(a: int, b: int = 1) -> int:
        """Adds."""
        return a + b

    task = task_token_guard("add", {"weight": "medium"})(add)
    assert task.__wrapped__ is add
    assert task.__name__ == "add"
    assert task.__doc__ == "Adds."
    assert task.spec.weight == "medium"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"mailbox_max": 0}, "mailbox_max must be a whole number >= 1, got 0"),
        ({"workers_per_core": -1}, "workers_per_core must be a whole number >= 1, got -1"),
        ({"workers_per_core": 100_000}, "beyond the supported maximum"),
        ({"workers_per_core": 2.5}, "got 2.5"),
        ({"storage_limits": {"TURBO": 5}}, "unknown storage tier 'TURBO'"),
        ({"storage_limits": {"SLOW": 0}}, "storage_limits['SLOW'] must be a whole number >= 1"),
        ({"admission": "drop"}, "admission must be one of block, reject, got 'drop'"),
        ({"retry_policy": {"huge": RetryPolicy()}}, "unknown weight 'huge'"),
        ({"retry_policy": 3}, "retry_policy must be a RetryPolicy"),
        ({"verbose": "yes"}, "verbose must be True or False"),
        ({"cores": 0}, "cores must be a whole number >= 1, got 0"),
    ],
)
def test_bad_configuration_fails_at_construction(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        OperationsCoordinator(**options)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(TokenGateError, match=r"known options are .*mailbox_max"):
        OperationsCoordinator(mailbox_size=3)  # type: ignore[call-arg]


def test_config_is_frozen_and_fills_tier_defaults() -> None:
    config = CoordinatorConfig(storage_limits={"slow": 3})
    assert dict(config.storage_limits) == {"SLOW": 3, "MODERATE": 25, "FAST": 50, "INSANE": 70}
    with pytest.raises(AttributeError):
        config.mailbox_max = 5  # type: ignore[misc]
    assert config.mailbox_max == tokengate.MAILBOX_MAX == 425


@pytest.mark.parametrize(
    "kwargs",
    [{"max_retries": -1}, {"backoff_factor": 0.5}, {"jitter": 2}, {"backoff_base": -1}],
)
def test_bad_retry_policy(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), True, "2"], ids=["nan", "bool", "str"])
def test_a_backoff_factor_that_is_not_a_number_at_least_1_is_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"RetryPolicy\.backoff_factor must be a number >= 1"):
        RetryPolicy(backoff_factor=bad)  # type: ignore[arg-type]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    fixed = RetryPolicy(
        backoff_base=0.1, backoff_factor=2, backoff_cap=0.5, jitter=0.5, rng=lambda: 0.0
    )
    assert [fixed.backoff(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    jittered = RetryPolicy(backoff_base=0.1, jitter=0.5, rng=lambda: 1.0)
    assert jittered.backoff(1) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="starts at 1"):
        fixed.backoff(0)


def test_default_retry_rule_is_safe() -> None:
    policy = RetryPolicy()
    assert policy.is_retryable(ConnectionResetError())
    assert policy.is_retryable(TimeoutError())
    assert policy.is_retryable(tokengate.WorkerCrashed("lost"))
    for programming_error in (TypeError(), ValueError(), KeyError(), AttributeError()):
        assert not policy.is_retryable(programming_error)
    assert not policy.is_retryable(KeyboardInterrupt())
    assert policy.is_retryable(ValueError(), retry_on=(ValueError,))
    assert not policy.is_retryable(ConnectionError(), dont_retry_on=(ConnectionError,))
    assert policy.budget(tokengate.WorkerCrashed("x")) == policy.crash_retries
    assert policy.budget(ConnectionError(), 7) == 7
