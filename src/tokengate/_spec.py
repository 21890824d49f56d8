"""TaskSpec: the validated, frozen form of ``operation_type`` + ``tags``.

Tags are checked once, at decoration time, so a typo fails where it was written rather than
deep inside a worker minutes later. Every message names the bad value and the allowed ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, get_args

from ._errors import ConfigError
from ._limits import MAX_WAIT_SECONDS, check_seconds
from ._rate import Rate, parse_rate

__all__ = [
    "EXECUTORS",
    "STORAGE_TIERS",
    "TAG_NAMES",
    "WEIGHTS",
    "ExecutorName",
    "StorageSpeed",
    "Tags",
    "TaskSpec",
    "Weight",
    "check_priority",
    "merge_tags",
]

Weight = Literal["light", "medium", "heavy"]
StorageSpeed = Literal["SLOW", "MODERATE", "FAST", "INSANE"]
ExecutorName = Literal["auto", "thread", "process"]
_Exceptions = type[BaseException] | tuple[type[BaseException], ...] | list[type[BaseException]]


class Tags(TypedDict, total=False):
    """The tags as a type: an editor completes the names and a type checker checks the values.

    ``@task_token_guard("op", weight="heavy", retries=2)`` takes them as keywords, and a
    ``tags: Tags = {...}`` mapping passes as ``tags=``. At run time the values are checked
    either way (and case is forgiven: ``"Heavy"``, ``"fast"``); the types name the canonical
    spelling.
    """

    weight: Weight
    storage_speed: StorageSpeed
    executor: ExecutorName
    retries: int
    retry_on: _Exceptions
    dont_retry_on: _Exceptions
    deadline: float
    timeout: float
    priority: int
    rate: str


WEIGHTS: tuple[str, ...] = get_args(Weight)
STORAGE_TIERS: tuple[str, ...] = get_args(StorageSpeed)
EXECUTORS: tuple[str, ...] = get_args(ExecutorName)
TAG_NAMES: tuple[str, ...] = (
    "weight",
    "storage_speed",
    "executor",
    "retries",
    "retry_on",
    "dont_retry_on",
    "deadline",
    "timeout",
    "priority",
    "rate",
)


def merge_tags(operation_type: Any, tags: Any, keywords: Mapping[str, Any]) -> Any:
    """``tags`` with the tags given as keywords added; the same tag given both ways with two
    different values is an error rather than a silent choice of one."""
    if not keywords:
        return tags
    if tags is None:
        return keywords
    if not isinstance(tags, Mapping):
        return tags  # from_tags names the bad value
    for name, value in keywords.items():
        if name in tags and tags[name] != value:
            raise ConfigError(
                f"tag {name!r} of operation {operation_type!r} is given twice with different "
                f"values: tags={{{name!r}: {tags[name]!r}}} and {name}={value!r}; give it once"
            )
    return {**tags, **keywords}


def _suggest(value: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _choice(tag: str, value: Any, choices: tuple[str, ...], *, fold_case: bool = False) -> str:
    if isinstance(value, str):
        candidate = value.upper() if fold_case else value.lower()
        if candidate in choices:
            return candidate
        hint = _suggest(candidate, choices)
    else:
        hint = ""
    raise ConfigError(
        f"tag {tag!r} has value {value!r}{hint}; allowed values are {', '.join(choices)}"
    )


def _seconds(tag: str, value: Any, operation_type: str) -> float:
    what = "a timeout" if tag == "timeout" else "a deadline"
    fix = f"give {what} of at most {MAX_WAIT_SECONDS:.0f} seconds, or leave the tag out for none"
    return check_seconds(f"tag {tag!r} of operation {operation_type!r}", value, fix=fix)


def check_priority(value: Any, what: str) -> int:
    """A priority is a whole number (higher runs first among queued tokens; default 0)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{what} must be a whole number (higher runs first, default 0), got {value!r}"
        )
    return value


def _exception_types(tag: str, value: Any) -> tuple[type[BaseException], ...] | None:
    if value is None:
        return None
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigError(
                f"tag {tag!r} takes exception classes (e.g. (ConnectionError, TimeoutError)), "
                f"got {item!r}"
            )
    return tuple(items)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a decorated function is: its operation type and validated tags.

    ``retries`` of ``None`` means "use the coordinator's retry policy for this weight";
    ``retry_on`` / ``dont_retry_on`` of ``None`` likewise defer to the policy. ``deadline`` and
    ``timeout`` are checked on construction however the spec is made (``from_tags``, directly,
    ``dataclasses.replace``): every lane waits on them, so none may exceed
    :data:`~tokengate._limits.MAX_WAIT_SECONDS`. ``priority`` orders queued tokens (higher
    first, see ``_priority.py``); ``rate`` is the parsed rate limit (``_rate.py``), ``None``
    for none.
    """

    operation_type: str
    weight: str = "light"
    storage_speed: str | None = None
    executor: str = "auto"
    retries: int | None = None
    retry_on: tuple[type[BaseException], ...] | None = None
    dont_retry_on: tuple[type[BaseException], ...] | None = None
    deadline: float | None = None
    timeout: float | None = None
    is_async: bool = False
    priority: int = 0
    rate: Rate | None = None

    def __post_init__(self) -> None:
        for tag in ("deadline", "timeout"):
            value = getattr(self, tag)
            if value is not None:
                checked = _seconds(tag, value, self.operation_type)
                if checked is not value:
                    object.__setattr__(self, tag, checked)  # an int becomes a float

    @classmethod
    def from_tags(
        cls, operation_type: Any, tags: Mapping[str, Any] | None, *, is_async: bool = False
    ) -> TaskSpec:
        """Validate ``operation_type`` and ``tags`` as the decorator receives them."""
        if not isinstance(operation_type, str) or not operation_type.strip():
            raise ConfigError(
                f"operation_type must be a non-empty string naming the operation "
                f"(e.g. 'fibonacci'), got {operation_type!r}"
            )
        if tags is None:
            tags = {}
        if not isinstance(tags, Mapping):
            raise ConfigError(
                f"tags must be a dict such as {{'weight': 'heavy'}}, got {type(tags).__name__} "
                f"{tags!r}"
            )
        for name in tags:
            if name not in TAG_NAMES:
                hint = _suggest(str(name), TAG_NAMES)
                raise ConfigError(
                    f"unknown tag {name!r}{hint} on operation {operation_type!r}; "
                    f"known tags are {', '.join(TAG_NAMES)}"
                )
        weight = _choice("weight", tags.get("weight", "light"), WEIGHTS)
        storage = tags.get("storage_speed")
        storage_speed = (
            None
            if storage is None
            else _choice("storage_speed", storage, STORAGE_TIERS, fold_case=True)
        )
        executor = _choice("executor", tags.get("executor", "auto"), EXECUTORS)
        retries = tags.get("retries")
        if retries is not None and (
            isinstance(retries, bool) or not isinstance(retries, int) or retries < 0
        ):
            raise ConfigError(
                f"tag 'retries' must be a whole number >= 0 (extra attempts after the first), "
                f"got {retries!r}"
            )
        if is_async and executor == "process":
            raise ConfigError(
                f"operation {operation_type!r} is an async function; it runs on the coordinator's "
                f"event loop and cannot use executor='process' (use 'auto' or 'thread')"
            )
        return cls(
            operation_type=operation_type,
            priority=check_priority(
                tags.get("priority", 0), f"tag 'priority' of {operation_type!r}"
            ),
            rate=parse_rate(tags.get("rate"), operation_type),
            weight=weight,
            storage_speed=storage_speed,
            executor=executor,
            retries=retries,
            retry_on=_exception_types("retry_on", tags.get("retry_on")),
            dont_retry_on=_exception_types("dont_retry_on", tags.get("dont_retry_on")),
            deadline=tags.get("deadline"),  # checked by __post_init__
            timeout=tags.get("timeout"),
            is_async=is_async,
        )
