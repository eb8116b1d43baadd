# Clare's developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python

.PHONY: test bench clean

test: $(VENV)/.installed
	$(VPY) -m pytest -q

bench: $(VENV)/.installed
	$(VPY) bench/run.py

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis tests/artifacts
