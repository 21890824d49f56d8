"""Backends: run the same decorated functions somewhere else than the local lanes.

``OperationsCoordinator()`` runs tokens on this machine's lanes (the ``"local"`` backend,
:class:`LocalBackend`, from ``tokengate.local``). ``OperationsCoordinator(backend="dask")`` runs
them on a Dask cluster: a ``LocalCluster`` sized to the machine, or the scheduler at
``address="tcp://host:8786"``. For more control pass a :class:`DaskBackend` object (``client=``,
``n_workers=``, ...).

Loaded lazily: importing ``tokengate`` (or this package) never imports Dask; only choosing the
Dask backend does, and without the extra the error says ``pip install 'tokengate[dask]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import ConfigError, TokenGateError
from ._base import Backend, BackendHost

if TYPE_CHECKING:
    from ..local import LocalBackend
    from ._dask import DaskBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendHost",
    "BackendUnavailable",
    "DaskBackend",
    "LocalBackend",
    "resolve_backend",
]

BACKENDS = ("local", "dask")


class BackendUnavailable(TokenGateError, ImportError):
    """The chosen backend needs an optional extra that is not installed."""


BackendUnavailable.__module__ = "tokengate.backends"


def _load_dask() -> Any:
    try:
        from . import _dask
    except ImportError as exc:
        raise BackendUnavailable(
            f"the Dask backend needs dask.distributed, which is not installed ({exc}); "
            f"install the extra with: pip install 'tokengate[dask]'"
        ) from exc
    return _dask


def __getattr__(name: str) -> Any:
    if name == "DaskBackend":
        return _load_dask().DaskBackend
    if name == "LocalBackend":
        from ..local import LocalBackend

        return LocalBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_backend(backend: object, address: object) -> Backend | None:
    """``OperationsCoordinator(backend=..., address=...)`` -> a Backend, or None for the local
    lanes (the coordinator makes its ``LocalBackend``)."""
    if isinstance(backend, Backend):
        if address is not None:
            raise ConfigError(
                f"address={address!r} goes to the backend object itself, e.g. "
                f"DaskBackend(address={address!r}); do not pass both"
            )
        return backend
    if backend is None or backend == "local":
        if address is not None:
            raise ConfigError(
                f"address={address!r} needs backend='dask'; the local backend runs on this "
                f"machine's cores"
            )
        return None
    if backend == "dask":
        if address is not None and not isinstance(address, str):
            raise ConfigError(
                f"address must be a scheduler address such as 'tcp://10.0.0.5:8786', "
                f"got {address!r}"
            )
        return _load_dask().DaskBackend(address=address)  # type: ignore[no-any-return]
    raise ConfigError(
        f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))} "
        f"or pass a Backend object such as DaskBackend(...)"
    )
