"""Type checks are tests: mypy, with tokengate's plugin, on the typed examples in tests/typing/.

``*_ok.py`` must check clean; in ``*_bad.py`` each line marked ``# E: text`` must be reported
(with that text) and no other line. One mypy run covers every file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# One cold mypy run (seconds on an idle machine; it may take a minute on a loaded one).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
api = pytest.importorskip("mypy.api")

HERE = Path(__file__).parent / "typing"
EXAMPLES = sorted(HERE.glob("*.py"))
GOOD = [p for p in EXAMPLES if p.stem.endswith("_ok")]
BAD = [p for p in EXAMPLES if p.stem.endswith("_bad")]
_ERROR = re.compile(r"^(?P<file>[^:]+\.py):(?P<line>\d+): error: (?P<message>.*)$")


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], str]:
    """(file name, line) -> mypy's error message, for every error in tests/typing/."""
    cache = tmp_path_factory.mktemp("mypy_cache")
    args = ["--config-file", str(HERE / "mypy.ini"), "--cache-dir", str(cache)]
    stdout, stderr, status = api.run([*args, *map(str, EXAMPLES)])
    assert status in (0, 1) and not stderr, (status, stdout, stderr)  # 2: mypy itself failed
    errors: dict[tuple[str, int], str] = {}
    for row in stdout.splitlines():
        match = _ERROR.match(row)
        if match:
            key = (Path(match["file"]).name, int(match["line"]))
            errors[key] = errors.get(key, "") + match["message"]
    return errors


def expected(path: Path) -> dict[tuple[str, int], str]:
    marks = {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if "# E: " in text:
            marks[(path.name, number)] = text.split("# E: ", 1)[1].strip()
    return marks


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_typed_examples_check_clean(reported: dict[tuple[str, int], str], path: Path) -> None:
    errors = {key: message for key, message in reported.items() if key[0] == path.name}
    assert errors == {}


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_wrong_calls_are_still_reported(reported: dict[tuple[str, int], str], path: Path) -> None:
    marks = expected(path)
    assert marks, f"{path.name} marks no line with '# E:'"
    errors = {key: message for key, message in reported.items() if key[0] == path.name}
    assert sorted(errors) == sorted(marks), errors
    for key, fragment in marks.items():
        assert fragment in errors[key], (key, errors[key])


def test_the_project_checks_its_own_chains_with_the_plugin() -> None:
    """demos/chain.py passes tokens where values are expected, with no ``type: ignore``."""
    chain = Path(__file__).parents[1] / "src" / "tokengate" / "demos" / "chain.py"
    assert "type: ignore" not in chain.read_text()
