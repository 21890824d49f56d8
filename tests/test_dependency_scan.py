"""Finding the tokens among a call's arguments: every one found, and big plain arguments (a
batched map's calls) looked at without a Python step per item."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest

from tokengate import Token, _dependencies
from tokengate._dependencies import find_dependencies


class _Sub(Token[Any]):
    """A subclass counts as a token too."""


def _token(cls: type[Token[Any]] = Token) -> Token[Any]:
    return cls.__new__(cls)


@pytest.mark.parametrize(
    "shape",
    [
        lambda t: [t],
        lambda t: (1, t),
        lambda t: [(1, 2), (3, t)],  # a batch's items, a token in one call's arguments
        lambda t: [(1,), [t]],
        lambda t: [(1, (2, t))],
        lambda t: [{"k": t}],
        lambda t: {"k": [(1, t)]},
    ],
)
@pytest.mark.parametrize("cls", [Token, _Sub])
def test_a_token_anywhere_in_lists_tuples_and_dicts_is_found(shape: Any, cls: Any) -> None:
    token = _token(cls)
    assert find_dependencies((shape(token),), {}) == [token]
    assert find_dependencies((), {"x": shape(token)}) == [token]


def test_a_batch_of_plain_arguments_is_not_walked_item_by_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def walked(root: Any, out: list[Token[Any]]) -> None:
        raise AssertionError("walked item by item")

    monkeypatch.setattr(_dependencies, "_collect", walked)
    batch: list[tuple[Any, ...]] = [(i, f"s{i}", 1.5, None, Future()) for i in range(1000)]
    assert find_dependencies((batch,), {}) == []
    assert find_dependencies((list(range(1000)),), {"x": tuple(range(10))}) == []
