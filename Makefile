# Two commands from a fresh clone: `make demo` (the main job on the embedded default) and `make test`.
# Both create ./.venv on first use and install the project with the versions in requirements/constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CI machines keep the CPU torch wheel in /opt/wheels; elsewhere pip uses the package index.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint format install clean docs

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) -c requirements/constraints.txt torch
	$(PIP) install -q $(FIND_LINKS) -c requirements/constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/convlora demo

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The quick tier while working: everything but end-to-end runs, subprocesses and soaks (marked `slow`).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The documentation site, built into site/ (mkdocs.yml is strict: any warning fails the build).
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
