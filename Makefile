# The two Quickstart commands are `make up` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install up test check lint format bench clean sandbox-deps browser-deps

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required (found %s)" % sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[embedded,dev,bench,llm,mcp,docker]"
	@command -v bwrap >/dev/null 2>&1 || $(MAKE) --no-print-directory sandbox-deps
	@touch $@

## The process sandbox needs bubblewrap (Debian/Ubuntu package; root or sudo).
sandbox-deps:
	@if command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq bubblewrap \
	  || { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq bubblewrap; }; \
	else echo "install bubblewrap with your package manager (the process sandbox needs it)"; fi

## The dashboard's browser tests drive Debian's Chromium (Playwright's own browser download
## is not used); only `make test` installs it. Debian/Ubuntu package; root or sudo.
browser-deps:
	@if command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium \
	  || { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }; \
	else echo "install chromium at /usr/bin/chromium with your package manager (tests/e2e/test_dashboard.py needs it)"; fi

## Start Postgres, NATS, a control plane and two workers; run the demo workflow; Ctrl-C stops.
up: install
	$(BIN)/agentflow up --demo

## Lint, type-check, then run every test against real Postgres and NATS.
test: install check
	@[ -x /usr/bin/chromium ] || $(MAKE) --no-print-directory browser-deps
	$(BIN)/pytest -q

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy libs services

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench.agentflow_bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
