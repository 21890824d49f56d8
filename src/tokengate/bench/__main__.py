"""``python -m tokengate.bench``."""

from __future__ import annotations

import sys

from tokengate.bench import main

if __name__ == "__main__":
    sys.exit(main())
