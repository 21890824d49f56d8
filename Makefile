# The two commands a new user needs: `make demo` and `make test`; `make bench` for the figures.
# Each creates .venv and installs what it needs on a fresh machine (Python 3.11+).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test bench soak lint venv docs clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tokengate needs Python 3.11+, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,cli,metrics,dask,docs,dashboard]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m tokengate demo mixed --duration 20

test: $(STAMP)
	@bash .ci/browser
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests examples docs
	$(PY) -m mypy

# The docs site, built into site/ (tests/test_docs.py builds it too, with --strict).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Optional peers: installed where the platform has them; a peer that is missing is reported
# "not installed" in the tables, never an error.
bench: $(STAMP)
	$(PY) -m pip install --quiet loky joblib 'dask[distributed]' || echo "make bench: loky / joblib / dask could not be installed; their cases will say 'not installed'"
	$(PY) -m pip install --quiet ray >/dev/null 2>&1 || echo "make bench: ray is not available here (optional); its cases will say 'not installed'"
	$(PY) -m tokengate bench --json benchmarks/latest.json --write-markdown BENCHMARKS.md

# The long reliability runs (make test deselects them): the 1,000,000-token flood, the
# idle/normal/surge soak (TOKENGATE_SOAK_SECONDS, default 600) and 1,000 random schedules.
soak: $(STAMP)
	$(PY) -m pytest tests/reliability -m soak --timeout 900 -o faulthandler_timeout=0 -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
