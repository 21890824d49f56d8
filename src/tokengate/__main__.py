"""``python -m tokengate``: the same command as the ``tokengate`` console script."""

from __future__ import annotations

import sys

from tokengate.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
