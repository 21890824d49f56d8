"""Calls the plugin must still reject: each marked line is one mypy error containing the text
after ``# E:`` (tests/test_typing.py checks that exactly these lines are reported)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from tokengate import OperationsCoordinator, task_token_guard


@task_token_guard(operation_type="parse")
def parse(data: bytes) -> str:
    return data.decode()


@task_token_guard(operation_type="crunch")
def crunch(n: int) -> int:
    return n


@task_token_guard(operation_type="total")
def total(values: list[int], seq: Sequence[int] = (), named: dict[str, int] | None = None) -> int:
    return sum(values) + sum(seq) + sum((named or {}).values())


def wrong() -> None:
    text = parse(b"x")
    number = crunch(1)
    crunch(text)  # E: incompatible type "Token[str]"; expected "int | Token[int]"
    crunch(n=text)  # E: incompatible type "Token[str]"
    crunch([number])  # E: incompatible type "list[Token[int]]"
    total([text])  # E: List item 0 has incompatible type "Token[str]"
    strings = [text, text]
    total(strings)  # E: incompatible type "list[Token[str]]"
    total([1], deque([number]))  # E: List item 0 has incompatible type "Token[int]"
    total([1], named={"a": text})  # E: Dict entry 0 has incompatible type "str": "Token[str]"
    total([1], [1], {"a": [number]})  # E: Dict entry 0 has incompatible type
    dicts = {"a": text}
    total([1], named=dicts)  # E: incompatible type "dict[str, Token[str]]"


async def wrong_async() -> None:
    await crunch.submit_async(parse(b"x"))  # E: incompatible type "Token[str]"


async def wrong_through_the_coordinator(coordinator: OperationsCoordinator) -> None:
    text = parse(b"x")
    coordinator.submit(crunch, text)  # E: "Token[str]"; expected "int | Token[int]"
    await coordinator.submit_async(crunch, text)  # E: incompatible type "Token[str]"
