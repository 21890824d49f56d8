"""MkDocs hook: render the Sphinx roles of the docstrings (``:class:`Token```) as plain code.

The source's docstrings use Sphinx cross-reference roles, which Markdown would show literally as
``:class:`` followed by the name; the API reference shows just the name, in code.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|meth|func|attr|exc|mod|data|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("", html)
