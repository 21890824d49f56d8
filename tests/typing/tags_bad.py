"""Typed tags the plugin (or mypy itself, for keywords and ``Tags``) must reject; see
chains_bad.py for the ``# E:`` convention."""

from __future__ import annotations

from tokengate import Tags, task_token_guard

BAD: Tags = {"weight": "haevy"}  # E: TypedDict item "weight" has type


@task_token_guard(operation_type="a", weight="haevy")  # E: Argument "weight" to "task_token_guard"
def a() -> None: ...


@task_token_guard(operation_type="b", wieght="heavy")  # E: Unexpected keyword argument "wieght"
def b() -> None: ...


@task_token_guard("c", {"storage_speed": "FASTER"})  # E: TypedDict item "storage_speed" has type
def c() -> None: ...


@task_token_guard("d", tags={"retires": 2})  # E: Extra key "retires" for TypedDict "Tags"
def d() -> None: ...


@task_token_guard("e", retries="2")  # E: Argument "retries" to "task_token_guard"
def e() -> None: ...
