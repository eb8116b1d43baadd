# Clare's developer entry points. `make test` is what CI runs (.ci/run): lint, then the whole suite.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python

# The real Claude Code the real-CLI tests drive: the version is pinned in tests/claude_code_version.txt.
CLAUDE_CODE_VERSION := $(shell cat tests/claude_code_version.txt)
CLAUDE_CODE_PREFIX  ?= $(or $(CLARE_TEST_CACHE),$(HOME)/.cache/clare-tests)/claude-code-$(CLAUDE_CODE_VERSION)

.PHONY: test test-fast lint bench stress clean claude-code

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

# The long fault cases (a 3-host cluster in network namespaces; root, iproute2, faketime): minutes;
# then a real client's latency while strangers misbehave (500 idle connections...) against goals.
stress: $(VENV)/.installed
	$(VPY) bench/stress.py
	$(VPY) bench/stress_slots.py

$(VENV)/.installed: requirements-dev.txt
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

claude-code:
	test -x $(CLAUDE_CODE_PREFIX)/node_modules/@anthropic-ai/claude-code/bin/claude.exe || \
	  npm install --no-audit --no-fund --prefix $(CLAUDE_CODE_PREFIX) @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache tests/artifacts
