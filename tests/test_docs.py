"""The docs site builds with warnings as errors, offline, and covers the public API.

``mkdocs build --strict`` fails on a broken link or anchor, a page missing from the navigation,
or a docstring the API reference cannot render. The built site must load nothing from the
network: no web fonts, no scripts or style sheets from a CDN.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tokengate

# The build takes seconds; the bound only catches a hang on a loaded machine.
pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# A resource the browser would fetch: a script, style sheet, image, font or CSS import/url().
REMOTE_RESOURCE = re.compile(
    r"""(?:<script[^>]*\ssrc|<link[^>]*\shref|<img[^>]*\ssrc|@import|url\()\s*=?\s*["']?https?://""",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip(
        "mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'"
    )
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_the_site_builds_strict(site: Path) -> None:
    pages = ["", "quickstart/", "reference/", "design/", "benchmarks/", "guide/tags/"]
    assert [page for page in pages if not (site / page / "index.html").is_file()] == []


def test_the_site_loads_nothing_from_the_network(site: Path) -> None:
    remote = [
        f"{path.relative_to(site)}: {match.group(0)}"
        for path in site.rglob("*")
        if path.suffix in {".html", ".css", ".js"}
        for match in REMOTE_RESOURCE.finditer(path.read_text(encoding="utf-8", errors="replace"))
    ]
    assert remote == []
    assert "fonts.googleapis.com" not in (site / "index.html").read_text(encoding="utf-8")


def test_the_api_reference_documents_every_public_name(site: Path) -> None:
    reference = (DOCS / "reference.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: tokengate\.(\w+)$", reference, re.MULTILINE))
    assert documented == set(tokengate.__all__) - {"__version__"}
    html = (site / "reference" / "index.html").read_text(encoding="utf-8")
    missing = [name for name in documented if f'id="tokengate.{name}"' not in html]
    assert missing == []
    assert ":class:" not in html and ":meth:" not in html  # Sphinx roles rendered as code


def test_the_quick_proof_is_introduced_once_by_its_full_name() -> None:
    """The document tokengate implements is named in full once, then "the Quick-Proof"."""
    pages = [*DOCS.rglob("*.md"), ROOT / "README.md"]
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages)
    assert text.count("TokenGate Quick-Proof") == 1
    assert not re.search(r"\bthe seed\b", text, re.IGNORECASE)
