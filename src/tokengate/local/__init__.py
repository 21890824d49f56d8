"""The local backend: tokens run on this machine's lanes (see ``_backend.py``)."""

from ._backend import LocalBackend

__all__ = ["LocalBackend"]
