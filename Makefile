# Clare's developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python

# The real Claude Code the real-CLI tests drive: the version is pinned in tests/claude_code_version.txt.
CLAUDE_CODE_VERSION := $(shell cat tests/claude_code_version.txt)
CLAUDE_CODE_PREFIX  ?= $(or $(CLARE_TEST_CACHE),$(HOME)/.cache/clare-tests)/claude-code-$(CLAUDE_CODE_VERSION)

.PHONY: test bench clean claude-code

test: $(VENV)/.installed
	$(VPY) -m pytest -q

bench: $(VENV)/.installed
	$(VPY) bench/run.py

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

claude-code:
	test -x $(CLAUDE_CODE_PREFIX)/node_modules/@anthropic-ai/claude-code/bin/claude.exe || \
	  npm install --no-audit --no-fund --prefix $(CLAUDE_CODE_PREFIX) @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis tests/artifacts
