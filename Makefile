# Clare's developer entry points. `make test` is what CI runs (.ci/run): lint, then the whole suite.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python

.PHONY: test test-fast lint bench stress clean

test: lint
	$(VPY) -m pytest -q

# The edit-test loop: the suite without the tests marked slow (`make test` runs those too).
test-fast: $(VENV)/.installed
	$(VPY) -m pytest -q -m "not slow"

# Dev-only tools (requirements-dev.txt); their settings are in pyproject.toml.
lint: $(VENV)/.installed
	$(VPY) -m ruff check .
	$(VPY) -m mypy

bench: $(VENV)/.installed
	$(VPY) bench/run.py

# The long fault cases (a 3-host cluster in network namespaces; root, iproute2, faketime): minutes.
stress: $(VENV)/.installed
	$(VPY) bench/stress.py

$(VENV)/.installed: requirements-dev.txt
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache tests/artifacts
