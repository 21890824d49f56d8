"""Chains that must type-check with the plugin: a Token[T] (or a list, tuple or dict of them)
wherever a T is expected, as the runtime substitutes it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import assert_type

from tokengate import OperationsCoordinator, Token, task_token_guard


@task_token_guard(operation_type="download")
def download(path: str) -> bytes:
    return path.encode()


@task_token_guard(operation_type="parse")
def parse(data: bytes) -> str:
    return data.decode()


@task_token_guard(operation_type="crunch", tags={"weight": "heavy"})
def crunch(text: str) -> int:
    return len(text)


@task_token_guard(operation_type="store", tags={"storage_speed": "FAST"})
def store(n: int, label: str = "n") -> None:
    print(label, n)


@task_token_guard(operation_type="total")
def total(
    values: list[int],
    weights: dict[str, int],
    pair: tuple[int, str],
    extra: list[int] | None = None,
) -> int:
    return sum(values) + sum(weights.values()) + pair[0] + sum(extra or [])


@task_token_guard(operation_type="summary")
def summary(seq: Sequence[int], it: Iterable[int], named: Mapping[str, int]) -> int:
    return sum(seq) + sum(it) + sum(named.values())


@task_token_guard(operation_type="maybe")
async def maybe(n: int | None, *rest: int, scale: float = 1.0) -> float:
    return (n or 0) * scale + sum(rest)


def pipeline(path: str) -> Token[None]:
    assert_type(store(crunch(parse(download(path)))), Token[None])
    return store(crunch(parse(download(path))), label=parse(download("label")))


def containers() -> None:
    a = crunch("a")
    b = crunch("b")
    tokens = [a, b]
    plain = [1, 2]
    mixed: list[int | Token[int]] = [a, 1]
    assert_type(total(tokens, {"a": a}, (a, "s")), Token[int])
    total(plain, {"a": 1}, (1, parse(b"s")))
    total(mixed, {"a": a, "b": 2}, (1, "s"))
    total([a, 1], {k: a for k in "ab"}, (a, parse(b"s")))
    total([t for t in tokens], {}, (1, "s"), extra=[a, 1])
    total([], {}, (1, "s"), extra=tokens)
    total([], {}, (1, "s"), None)
    summary(tokens, (a, 1), {"a": a})
    summary([a, 2], plain, {"a": 1})
    summary((a, b), [a, 2], dict(a=a))


async def from_asyncio() -> float:
    n = crunch("n")
    maybe(None, n, 2, scale=1.5)
    maybe(n)
    maybe(store(1))  # a Token[None] fits `int | None`
    token = await crunch.submit_async(parse(download("p")))
    assert_type(token, Token[int])
    return await maybe(token)


async def through_the_coordinator(coordinator: OperationsCoordinator) -> None:
    text = parse(download("p"))
    assert_type(coordinator.submit(crunch, text), Token[int])
    assert_type(coordinator.submit(store, crunch(text), label=text), Token[None])
    assert_type(await coordinator.submit_async(crunch, text), Token[int])
    assert_type(coordinator.submit(len, "plain callables keep their own type"), Token[int])


def main() -> None:
    with OperationsCoordinator():
        print(pipeline("p").get(timeout=10))
