"""AffinityPolicy and the core-worker mapping: the Quick-Proof's values, small-machine fallback,
properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokengate._affinity import (
    WEIGHTS,
    AffinityPolicy,
    core_worker_mapping,
    mapping_banner,
)
from tokengate._errors import ConfigError

SEED_AFFINITY_BANNER = """\
[AFFINITY] Policy for 8 cores:
  Heavy:  [1, 2, 3, 4, 5, 6, 7, 8] (preferred: 1)
  Medium: [2, 3, 4, 5, 6, 7, 8] (preferred: 2)
  Light:  [3, 4, 5, 6, 7, 8] (preferred: 3)"""

SEED_MAPPING_BANNER = """\
[CORE_PINNED_QUEUE] Initialized:
  Cores: 8
  Workers per core: 4
  Total workers: 32
  Core-worker mapping:
    Core 1: Workers [0, 1, 2, 3]
    Core 2: Workers [4, 5, 6, 7]
    Core 3: Workers [8, 9, 10, 11]
    Core 4: Workers [12, 13, 14, 15]
    Core 5: Workers [16, 17, 18, 19]
    Core 6: Workers [20, 21, 22, 23]
    Core 7: Workers [24, 25, 26, 27]
    Core 8: Workers [28, 29, 30, 31]"""


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, {"heavy": ((1,), 1), "medium": ((1,), 1), "light": ((1,), 1)}),
        (2, {"heavy": ((1, 2), 1), "medium": ((2,), 2), "light": ((2,), 2)}),
        (3, {"heavy": ((1, 2, 3), 1), "medium": ((2, 3), 2), "light": ((3,), 3)}),
        (
            8,
            {
                "heavy": ((1, 2, 3, 4, 5, 6, 7, 8), 1),
                "medium": ((2, 3, 4, 5, 6, 7, 8), 2),
                "light": ((3, 4, 5, 6, 7, 8), 3),
            },
        ),
    ],
)
def test_exact_sets(n: int, expected: dict[str, tuple[tuple[int, ...], int]]) -> None:
    policy = AffinityPolicy(n)
    for weight, (cores, preferred) in expected.items():
        assert policy.allowed(weight) == cores
        assert policy.preferred(weight) == preferred


def test_weights_constant() -> None:
    assert WEIGHTS == ("heavy", "medium", "light")
    assert AffinityPolicy(4).weights == WEIGHTS


@given(st.integers(min_value=1, max_value=256))
def test_policy_properties(n: int) -> None:
    policy = AffinityPolicy(n)
    everything = set(range(1, n + 1))
    for weight in WEIGHTS:
        allowed = policy.allowed(weight)
        assert allowed, weight
        assert policy.preferred(weight) == allowed[0]
        assert list(allowed[1:]) == sorted(allowed[1:])
        assert len(set(allowed)) == len(allowed)
        assert set(allowed) <= everything
    heavy, medium, light = (set(policy.allowed(w)) for w in WEIGHTS)
    assert heavy >= medium >= light
    assert heavy == everything
    if n >= 2:
        # The protected first core never takes medium or light work when another core exists.
        assert 1 not in medium
        assert 1 not in light


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "8", None])
def test_bad_core_count_raises_naming_value(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        AffinityPolicy(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["Heavy", "huge", "", ["heavy"]])
def test_unknown_weight_raises_naming_it_and_allowed(bad: object) -> None:
    policy = AffinityPolicy(8)
    for method in (policy.allowed, policy.preferred):
        with pytest.raises(ConfigError) as info:
            method(bad)  # type: ignore[arg-type]
        message = str(info.value)
        assert repr(bad) in message
        for weight in WEIGHTS:
            assert weight in message


def test_policy_is_frozen_and_comparable() -> None:
    policy = AffinityPolicy(4)
    assert policy == AffinityPolicy(4)
    assert hash(policy) == hash(AffinityPolicy(4))
    assert policy != AffinityPolicy(5)
    with pytest.raises(AttributeError):
        policy.core_count = 5  # type: ignore[misc]


def test_affinity_banner_matches_seed_exactly() -> None:
    assert AffinityPolicy(8).banner() == SEED_AFFINITY_BANNER


def test_affinity_banner_small_machine() -> None:
    assert AffinityPolicy(2).banner() == (
        "[AFFINITY] Policy for 2 cores:\n"
        "  Heavy:  [1, 2] (preferred: 1)\n"
        "  Medium: [2] (preferred: 2)\n"
        "  Light:  [2] (preferred: 2)"
    )


def test_core_worker_mapping() -> None:
    assert core_worker_mapping(3, 2) == {1: [0, 1], 2: [2, 3], 3: [4, 5]}
    assert core_worker_mapping(1, 1) == {1: [0]}


@given(st.integers(min_value=1, max_value=64), st.integers(min_value=1, max_value=16))
def test_core_worker_mapping_partitions_workers(n: int, k: int) -> None:
    mapping = core_worker_mapping(n, k)
    assert list(mapping) == list(range(1, n + 1))
    assert all(len(workers) == k for workers in mapping.values())
    flat = [w for workers in mapping.values() for w in workers]
    assert flat == list(range(n * k))


@pytest.mark.parametrize(
    ("core_count", "workers_per_core", "name", "value"),
    [(0, 4, "core_count", 0), (8, 0, "workers_per_core", 0), (8, -2, "workers_per_core", -2)],
)
def test_core_worker_mapping_rejects_bad_counts(
    core_count: int, workers_per_core: int, name: str, value: int
) -> None:
    for fn in (core_worker_mapping, mapping_banner):
        with pytest.raises(ConfigError, match=name) as info:
            fn(core_count, workers_per_core)
        assert repr(value) in str(info.value)


def test_mapping_banner_matches_seed_exactly() -> None:
    assert mapping_banner(8, 4) == SEED_MAPPING_BANNER
