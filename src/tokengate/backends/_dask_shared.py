"""Share once, use many times on a Dask cluster: ``coordinator.share(obj)`` scatters ``obj`` to
every worker once (``client.scatter(obj, broadcast=True)``) and returns ``obj`` itself.

Calls whose arguments include that very object (by identity, at the top level of ``args`` and
``kwargs``) send its Dask future in its place, outside tokengate's pickled call, so Dask hands the
worker's copy to the task instead of pickling the object again per call::

    share(array) ──scatter once──> every worker holds it under one key
    task(array, i) ──submit──> run_task(..., args=(<Future key>, i)) ──> worker's copy, no send

Returning the object itself (not the future) keeps user code the same on every backend: the
caller can still read it, and the local backend returns an equal object too.

Lifetime: the registry holds the future while the object is alive here (a weak reference sees it
go; an object that takes no weak reference is held until the coordinator stops); a task sent
with it holds it on the cluster until the task ends. Dask frees the workers' copies once nothing
holds the key.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, TypeVar

__all__ = ["ClusterShares"]

_S = TypeVar("_S")


class _Share:
    __slots__ = ("future", "keep")

    def __init__(self, future: Any, keep: Any) -> None:
        self.future = future
        self.keep = keep  # the object itself when it takes no weak reference (keeps its id)


class ClusterShares:
    """The objects scattered by one Dask backend, by identity, and their futures."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._shares: dict[int, _Share] = {}

    def share(self, obj: _S) -> _S:
        """Scatter ``obj`` to every worker once (a second call with the same object is free)."""
        key = id(obj)
        with self._lock:
            if key in self._shares:
                return obj
        # In a list of one: Dask scatters a list, tuple or dict given alone item by item.
        [future] = self._client.scatter([obj], broadcast=True, hash=False)
        try:
            weakref.finalize(obj, self._forget, key)
            keep = None
        except TypeError:  # no weak reference (list, dict, bytes...): held until stop
            keep = obj
        with self._lock:
            self._shares[key] = _Share(future, keep)
        return obj

    def _forget(self, key: int) -> None:
        with self._lock:
            self._shares.pop(key, None)  # dropping the future lets Dask free the key

    def __len__(self) -> int:
        return len(self._shares)

    def keys(self) -> list[str]:
        """The Dask keys of what is shared now."""
        with self._lock:
            return [share.future.key for share in self._shares.values()]

    def substitute(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
        """``args``/``kwargs`` with each shared object replaced by its future, and whether any
        was (the call must then send its arguments where Dask sees futures)."""
        shares = self._shares
        if not shares:
            return args, kwargs, False
        with self._lock:
            new_args = [_swap(arg, shares) for arg in args]
            new_kwargs = {name: _swap(value, shares) for name, value in kwargs.items()}
        found = any(a is not b for a, b in zip(new_args, args, strict=True)) or any(
            new_kwargs[name] is not value for name, value in kwargs.items()
        )
        if not found:
            return args, kwargs, False
        return tuple(new_args), new_kwargs, True

    def clear(self) -> None:
        """Release everything (the coordinator stops)."""
        with self._lock:
            self._shares.clear()


def _swap(value: Any, shares: dict[int, _Share]) -> Any:
    share = shares.get(id(value))
    return value if share is None else share.future
